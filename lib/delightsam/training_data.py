"""Training data: labelled volumes (``TrainItem``) read as inference reads them, their box atlas entries, and
``SliceData``, their 2-D slices fitted to the model's input with structure masks, sampled with a preference for
slices that hold foreground (augmented by ``augmentation``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .augmentation import augment_slice
from .box_atlas import atlas_entry
from .geometry import affine_of, fit_to_square, fitted_size, grey_levels, intensity_of, model_input, orient
from .label_maps import relabel, structure_mask
from .model import DeLightSAM
from .multiplanar import planes_for
from .normalization import get_normalization
from .reading import READ_ERRORS, read_error, read_label, read_volume

logger = logging.getLogger(__name__)


@dataclass
class TrainItem:
    id: str
    image: str  # a volume file or a DICOM series folder
    label: str  # a label map on the image's grid
    modality: str
    # voxel value in the label file -> the modality's label id (other values are background); None: the file's
    # values are the modality's label ids
    values: dict[int, int] | None = None
    # the structures that the label speaks for (a structure a user did not send is unknown, not absent, and is
    # not trained); None: all of the modality's structures
    known: list[str] | None = None


def item_label(item: TrainItem, image) -> torch.Tensor:
    """An item's label on the image's grid, in the modality's label ids."""
    label = read_label(item.label, image).as_subclass(torch.Tensor).round().to(torch.int64).clamp_(min=0)
    return label if item.values is None else relabel(label, item.values)


def known_structures(item: TrainItem, spec) -> torch.Tensor:
    """[S] whether the item's label speaks for each of the modality's structures."""
    return torch.tensor([item.known is None or s.name in item.known for s in spec.structures])


# ---- a labelled volume as inference reads it ---------------------------------------------------------
def oriented_labels(item: TrainItem, spec, every_plane: bool = True):
    """A labelled volume read as inference reads it, per plane, one at a time: (its ``Oriented`` geometry, the label
    map in the plane's layout, [S] whether the label speaks for each structure, whether inference sees the volume in
    this plane). The acquisition plane comes first, always (the box atlas and the grey levels are read in it); a 3-D
    volume of a modality seen in several planes (``multiplanar``) is then cut in the others it is seen in, and its
    acquisition plane is seen only where it is one of them. ``every_plane`` False: the acquisition plane only."""
    image = read_volume(item.image)
    label, known = item_label(item, image), known_structures(item, spec)
    first = orient(image)
    planes = planes_for(spec, affine_of(image)) if every_plane else []
    yield first, first.to_layout(label), known, not planes or first.plane in planes
    for plane in planes:
        if plane != first.plane:
            oriented = orient(image, plane=plane)
            yield oriented, oriented.to_layout(label), known, True


def volume_atlas_entry(item_id: str, oriented, label: torch.Tensor, spec, known: torch.Tensor) -> dict:
    """A volume's box atlas entry (``box_atlas.atlas_entry``, with its id) from its label in the plane's layout:
    the structures its label speaks for."""
    masks = {s.name: structure_mask(label, s) for s, k in zip(spec.structures, known.tolist()) if k}
    return {"id": item_id, **atlas_entry(masks, oriented.spacing, oriented.plane)}


def atlas_entries(items: list[TrainItem], model: DeLightSAM) -> dict[str, list[dict]]:
    """Per modality, the box atlas entries of labelled volumes (what ``update_box_atlas`` takes), without cutting
    their slices for training. A volume that cannot be read is an error that names it."""
    entries: dict[str, list[dict]] = {}
    for item in items:
        spec = model.config.modality(item.modality)
        try:
            oriented, label, known, _ = next(oriented_labels(item, spec, every_plane=False))
        except READ_ERRORS as e:
            raise ValueError(f"{item.id}: cannot be read: {read_error(e)}") from e
        entries.setdefault(item.modality, []).append(volume_atlas_entry(item.id, oriented, label, spec, known))
    return entries


class SliceData:
    """The training volumes as fitted grey slices and structure masks, with seeded sampling. With ``spill_dir``
    the slices live in memory-mapped files there (a datastore of hundreds of volumes trains in bounded memory;
    the pages a batch reads come back from the OS's file cache); without it, in memory."""

    def __init__(self, items: list[TrainItem], model: DeLightSAM, spill_dir: str | Path | None = None) -> None:
        self.size = model.config.img_size
        self.grey, self.fitted, self.masks, self.modality, self.foreground, self.known = [], [], [], [], [], []
        # per volume and plane it is cut in (``oriented_labels``): its slices and their masks, ...
        self.whole = []  # ... and the index of its modality's whole structure (the brain), where it has one
        self.atlas: dict[str, list[dict]] = {}  # per modality, its volumes' box atlas entries (box_atlas)
        self.refused: dict[str, str] = {}  # volumes that could not be read, and why
        self.normalise = get_normalization(model)
        for item in items:
            spec = model.config.modality(item.modality)
            try:
                for k, (oriented, label, known, seen) in enumerate(oriented_labels(item, spec)):
                    if k == 0:  # the acquisition plane's: the box atlas, and the grey levels of every plane
                        self.atlas.setdefault(item.modality, []).append(
                            volume_atlas_entry(item.id, oriented, label, spec, known))
                        levels = grey_levels(oriented.data, intensity_of(spec))
                    if seen:
                        self._add(item.modality, spec, *self._cut(oriented, label, spec, levels), known, spill_dir)
            except READ_ERRORS as e:  # an unreadable file, a label off the image's grid
                self.refused[item.id] = f"cannot be read for training: {read_error(e)}"
                logger.warning(f"not training on {item.id}: {self.refused[item.id]}")
        if not self.grey:
            raise ValueError("no training volume could be read: " + "; ".join(f"{k}: {v}" for k, v in self.refused.items()))
        self.index = [(v, s) for v, g in enumerate(self.grey) for s in range(g.shape[0])]
        fg = torch.cat(self.foreground)
        self.fg_index = [i for i, f in zip(self.index, fg.tolist()) if f]
        self.bg_index = [i for i, f in zip(self.index, fg.tolist()) if not f]
        self.max_structures = max(m.shape[1] for m in self.masks)

    def _cut(self, oriented, label: torch.Tensor, spec, levels) -> tuple:
        """A volume's slices in one plane as inference cuts them (``geometry``: the plane's layout, the volume's grey
        levels, NaN policy, fitting), with the structure masks of its label on the same slices: fitted grey slices
        [Z, 1, size, size] (float16), the fitted size and masks [Z, S, size, size]."""
        grey = levels(oriented.data).movedim(2, 0)  # [Z, H, W]
        label = label.movedim(2, 0)
        masks = torch.stack([structure_mask(label, s) for s in spec.structures], dim=1).float()  # [Z, S, H, W]
        fitted = fitted_size(tuple(grey.shape[-2:]), self.size, oriented.spacing[:2], spec.pixel_mm)
        grey, fitted = fit_to_square(grey[:, None], self.size, fitted=fitted)
        masks, _ = fit_to_square(masks, self.size, mode="nearest", fitted=fitted)
        return grey.to(torch.float16), fitted, masks.bool()

    def _add(self, modality: str, spec, grey, fitted, masks, known, spill_dir) -> None:
        """One plane's slices of a volume, spilled to ``spill_dir`` where there is one."""
        if spill_dir is not None:
            grey, masks = (_memory_mapped(Path(spill_dir) / f"{len(self.grey)}-{k}.npy", t)
                           for k, t in (("grey", grey), ("masks", masks)))
        self.grey.append(grey)
        self.fitted.append(fitted)
        self.masks.append(masks)
        self.modality.append(modality)
        self.whole.append(next((i for i, st in enumerate(spec.structures) if st.parts), None))
        self.known.append(known)
        self.foreground.append(masks.flatten(1).any(1))

    def sample(self, epoch: int, step: int, n: int, seed: int, fg_fraction: float) -> list[tuple[int, int]]:
        """The same n slices on every process for a given (seed, epoch, step)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + step)
        picks = []
        for _ in range(n):
            pool = self.fg_index if (self.fg_index and (not self.bg_index or torch.rand(1, generator=g) < fg_fraction)) \
                else self.bg_index
            picks.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        return picks

    def batch(self, picks: list[tuple[int, int]], augmented: list[int] | None = None) -> \
            tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
        """(model input [B, 3, S, S], grey [B, 3, S, S] for the teacher, masks [B, S_max, S, S], modalities,
        known [B, S_max]: whether each mask is known), the model input made exactly as inference makes it.
        ``augmented``: per pick, a seed for ``augmentation`` or -1 for none."""
        greys, masks = [], torch.zeros(len(picks), self.max_structures, self.size, self.size)
        known = torch.zeros(len(picks), self.max_structures, dtype=torch.bool)
        for i, (v, s) in enumerate(picks):
            grey, mask = self.grey[v][s].float(), self.masks[v][s].float()
            if augmented and augmented[i] >= 0:
                grey, mask = augment_slice(grey, mask, augmented[i], self.modality[v], self.whole[v])
                nh, nw = self.fitted[v]
                mask[:, nh:], mask[:, :, nw:] = 0, 0  # what moved into the padding is not shown to the model
            greys.append(grey)
            masks[i, : mask.shape[0]] = mask
            known[i, : self.masks[v].shape[1]] = self.known[v]
        inputs = torch.stack([model_input(g[None], self.fitted[v], self.normalise)[0] for g, (v, _) in zip(greys, picks)])
        return inputs, torch.stack(greys).expand(-1, 3, -1, -1), masks, [self.modality[v] for v, _ in picks], known

    def augmented(self, epoch: int, step: int, n: int, seed: int, share: float) -> list[int]:
        """Per pick of ``sample``'s (seed, epoch, step): an augmentation seed, or -1 (the same on every process)."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 10_007 + step + 7)
        return [int(torch.randint(2**31 - 1, (1,), generator=g)) if torch.rand(1, generator=g) < share else -1
                for _ in range(n)]


def _memory_mapped(path: Path, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` written to ``path`` and read back as a copy-on-write memory map (nothing stays in RAM)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, tensor.numpy(), allow_pickle=False)
    return torch.from_numpy(np.load(path, mmap_mode="c"))

