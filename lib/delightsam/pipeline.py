"""The served pipeline: how a modality is segmented, in one stage or two, with which settings. The app's infer tasks,
the train task's validation (and so its publish decision), the bundle and the evaluation all segment through it,
so the figures describe what users get."""

from __future__ import annotations

from dataclasses import dataclass, field

from .model import DeLightSAM
from .volume import VolumeResult, segment_volume


@dataclass
class Pipeline:
    refined: list[str] = field(default_factory=list)  # modalities segmented in two stages (the refiner's boxes)
    size: int = 96  # the refiner's input for a whole slice (the app's refine_size)
    prompts: str = "slice"  # the second stage's boxes: per slice or one per structure ("3d")
    refine_every_mm: float = 10.0  # the refiner decodes one slice about every this many mm
    first_every_mm: float = 3.0  # in two stages, the first stage sees one slice about every this many mm

    def refines(self, modality: str) -> bool:
        return modality in self.refined or "*" in self.refined

    def refiner(self, model: DeLightSAM) -> DeLightSAM:
        """The second stage for ``model``: the foundation with the adaptation ``model`` carries, at ``size``."""
        from .foundation import foundation_model

        return foundation_model(model, img_size=self.size).to(next(model.parameters()).device)

    def segment(self, model: DeLightSAM, image, modality: str, refiner: DeLightSAM | None = None,
                **options) -> VolumeResult:
        """``segment_volume`` as served: two stages where the pipeline refines ``modality`` and a ``refiner`` is
        given (``refiner``), else the first stage on every slice. ``options``: batch_size, cleanup, doubt..."""
        two = refiner is not None and self.refines(modality)
        return segment_volume(model, image, modality, refiner=refiner if two else None, prompts=self.prompts,
                              refine_every_mm=self.refine_every_mm, every_mm=self.first_every_mm if two else None,
                              **options)

    def describe(self, modality: str, adapted: bool) -> str:
        """The pipeline's name for a modality (the model card's, /info's and each result's); ``adapted``: whether the
        refiner carries queries and heads trained on users' labels for it (``is_adapted``)."""
        if not self.refines(modality):
            return "De-LightSAM, one stage (prompt-free masks on every slice)"
        return (f"De-LightSAM coarse masks (a slice about every {self.first_every_mm:g} mm) -> boxes "
                f"({'per slice' if self.prompts == 'slice' else '3-D'}) -> LiteMedSAM "
                f"{'with queries and heads adapted on users labels' if adapted else '(frozen)'} at input {self.size}, "
                f"a slice about every {self.refine_every_mm:g} mm")


def is_adapted(model: DeLightSAM, modality: str) -> bool:
    """Whether ``model`` carries an adapted refiner for ``modality`` (``refiner_training``)."""
    return f"decoder.query_groups.{model.config.modality(modality).query_group}" in getattr(model, "refiner_state", {})
