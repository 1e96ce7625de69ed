"""What a MONAI Bundle's configs need to run De-LightSAM with MONAI's own tools (``python -m monai.bundle run``).

The bundle's configs/inference.json loads the checkpoint with ``delightsam.load_model``, reads volumes with
MONAI's ``LoadImaged``, runs a ``SupervisedEvaluator`` with ``VolumeInferer`` (the app's whole-volume path, in two
stages for CT as the app serves it: ``pipeline.Pipeline``) and writes label maps with ``SaveImaged``.
"""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer

from .pipeline import Pipeline


class VolumeInferer(Inferer):
    """inputs [B, 1, X, Y, Z] (MetaTensors with their affines) -> label maps [B, 1, X, Y, Z] on the same grids."""

    def __init__(self, modality: str, batch_size: int = 4, cleanup: bool = False, refine: bool = False,
                 refine_size: int = Pipeline.size, prompts: str = Pipeline.prompts,
                 refine_every_mm: float = Pipeline.refine_every_mm, first_every_mm: float = Pipeline.first_every_mm) -> None:
        self.modality, self.batch_size, self.cleanup = modality, batch_size, cleanup
        self.pipeline = Pipeline([modality] if refine else [], refine_size, prompts, refine_every_mm, first_every_mm)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        outputs = []
        for i in range(inputs.shape[0]):
            result = self.pipeline.segment(network, inputs[i, 0], self.modality, batch_size=self.batch_size,
                                           cleanup=self.cleanup)
            outputs.append(torch.from_numpy(result.labels)[None])
        labels = torch.stack(outputs)
        return MetaTensor(labels, meta=inputs.meta, applied_operations=inputs.applied_operations) \
            if isinstance(inputs, MetaTensor) else labels
