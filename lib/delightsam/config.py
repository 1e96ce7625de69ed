"""Configuration of a De-LightSAM network: architecture, modalities, structures, normalisation.

A checkpoint carries its configuration (see ``checkpoint.py``), so every value here is what a
model file records about itself. Shapes that the released code hard-codes for a 1024-pixel input
(the 64x64 embedding grid, the 32x32 patch grid, the stage resolutions) are derived from
``img_size`` here.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

FORMAT_VERSION = 1

# The released code's modality order (its dataloader's ``mcls``), with the structure each
# released per-modality checkpoint segments.
RELEASED_MODALITIES = (
    ("dermoscopy", "skin lesion"),
    ("xray", "lung"),
    ("ultrasound", "breast lesion"),
    ("fundus", "retinal vessel"),
    ("microscopy", "nucleus"),
    ("colonoscopy", "polyp"),
)
RELEASED_QUERY_TOKENS = 7  # 6 decoding channels plus one query that only takes part in attention
# The DC-Encoder's stem: its stride, and so the token grid of the first stage. MobileSAM's (and the released
# model's) two 3x3 stride-2 convolutions give input/4 tokens; LiteMedSAM's two 1x1 stride-1 convolutions give a
# token per pixel (LiteMedSAM at input 256 has the token grids of MobileSAM at 1024).
STEM_STRIDES = {"mobile_sam": 4, "lite_medsam": 1}
# the words of a structure's name that put it on one side (kidney_left, Left-Hippocampus, hippocampus_L, Lt-Amygdala,
# lh.cortex); a letter with digits is not one (vertebrae_L1 is a lumbar vertebra, its own mirror image)
SIDE_WORDS = {"left", "right", "l", "r", "lt", "rt", "lh", "rh", "sin", "dex", "sinister", "dexter"}
# SAM's mask decoder has an IoU token and 4 mask tokens; with box prompts the QM-Decoder keeps the IoU token and
# the mask tokens other than the first as "foundation tokens" (the first is the structure's query)
FOUNDATION_TOKENS = 4
RELEASED_QUERY_GROUP = "released"

# The released code sets pixel_std from pixel_mean, so it divides by the mean (x / mean - 1).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
RELEASED_STD = IMAGENET_MEAN


@dataclass
class Structure:
    """One target structure: its label name, its id in label maps, and the decoding query that predicts it."""

    name: str
    label: int
    token: int  # index of the query in the modality's query group
    # label ids of other structures of the modality that lie inside this one (the brain holds grey and white
    # matter): its mask is the union, and in a label map the parts are drawn over it
    parts: list[int] = field(default_factory=list)

    @property
    def target_labels(self) -> list[int]:
        """The label ids that make up this structure's mask in a label map."""
        return [self.label, *self.parts]


@dataclass
class Modality:
    """A modality selects a controller of the DC-Encoder and a query group of the QM-Decoder."""

    name: str
    controller: str
    query_group: str
    structures: list[Structure]
    # How a volume's intensities become the 0..255 grey levels the model sees (see geometry.py):
    # {"window": [low, high]} (CT, in HU), {"percentiles": [low, high]} (MR), or None (min-max).
    intensity: dict | None = None
    # what the viewers list as this modality's auto-segmentation model, e.g. "CT abdomen"; "" for the name
    title: str = ""
    # In-plane millimetres per input pixel: slices are shown to the network at this fixed physical scale (an
    # organ has the same size in pixels whatever the scan's field of view), shrunk further only where a slice
    # would not fit. None: the slice's longer side fills the input (SAM's convention; the scale then follows
    # the field of view).
    pixel_mm: float | None = None
    # Where its structures lie relative to each other (``box_atlas``: the second stage's context prompts): per
    # training volume, {"plane": acquisition plane, "boxes": {structure name: [6 numbers: low, high corner, mm]}}.
    box_atlas: list[dict] = field(default_factory=list)
    # What the model was measured on (``scope``): {"contrasts": MR contrasts, "slice_mm": [thinnest, thickest]};
    # {} where nobody recorded it. A request outside it still gets a mask, with a note saying so.
    measured: dict = field(default_factory=dict)
    # The planes a volume with no axis 2.5 times the next (a 3-D MR, a 2x2x3 mm series) is seen in, their
    # probabilities averaged (``multiplanar``); [] for its acquisition plane only. A thick-sliced series (5 mm
    # slices of 1.5 mm pixels) is always seen in its own plane, its axial or coronal slices mirrored too (``mirrors``).
    planes: list[str] = field(default_factory=list)
    # Whether each of its structures is its own left-right mirror image (a whole brain, its grey and white matter;
    # not a left kidney, a spleen or a left hippocampus): declared by whoever trains it, never guessed from names.
    # Only then may a thick series of a modality with ``planes`` be decoded mirrored too (``multiplanar.mirrors``).
    symmetric: bool = False


@dataclass
class DeLightSAMConfig:
    img_size: int = 1024
    # DC-Encoder trunk: MobileSAM's TinyViT-5M
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # MobileSAM keeps stride 1 into the last stage
    stem: str = "mobile_sam"  # a key of STEM_STRIDES
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    # SP-Generator and QM-Decoder
    prompt_dim: int = 256
    patch_head_dim: int = 64
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    # name -> number of decoding queries; modalities that share a group attend to each other's queries
    query_groups: dict[str, int] = field(default_factory=dict)
    # query groups with a hypernetwork head of their own (others share the released one), so that a
    # new modality's head can train without changing the outputs of the others
    own_heads: list[str] = field(default_factory=list)
    modalities: list[Modality] = field(default_factory=list)
    # the decoder can also take one box per structure, as the foundation's prompt encoder and mask decoder do
    # (the SP-Generator's boxes, see foundation.py); adds the box corner embeddings and the foundation tokens
    box_prompts: bool = False
    # normalisation of 0..255 RGB input: (x - mean) / std, per channel
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD
    version: str = "0"
    description: str = ""

    def __post_init__(self) -> None:
        self.embed_dims, self.depths, self.num_heads = tuple(self.embed_dims), tuple(self.depths), tuple(self.num_heads)
        self.window_sizes, self.merge_strides = tuple(self.window_sizes), tuple(self.merge_strides)
        self.pixel_mean, self.pixel_std = tuple(self.pixel_mean), tuple(self.pixel_std)
        self.modalities = [m if isinstance(m, Modality) else _modality_from_dict(m) for m in self.modalities]
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def stage_resolutions(self) -> tuple[int, ...]:
        """Token grid side of each encoder stage (the released code: 256, 128, 64, 64 at 1024)."""
        res = [self.img_size // STEM_STRIDES[self.stem]]
        for stride in self.merge_strides:
            res.append(-(-res[-1] // stride))
        return tuple(res)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 at 1024)."""
        return self.stage_resolutions[-1]

    @property
    def patch_grid(self) -> int:
        """Side of the SP-Generator's patch grid (32 at 1024): one patch per 2x2 embedding cells."""
        return self.embedding_size // 2

    @property
    def controller_names(self) -> list[str]:
        return list(dict.fromkeys(m.controller for m in self.modalities))

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality(self, name: str) -> Modality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"unknown modality {name!r}; this model has: {', '.join(self.modality_names) or 'none'}")

    # ---- checks and (de)serialisation -----------------------------------------------------
    def validate(self) -> None:
        if self.img_size <= 0 or self.img_size % 32:
            raise ValueError(f"img_size must be a positive multiple of 32, got {self.img_size}")
        if self.stem not in STEM_STRIDES:
            raise ValueError(f"stem must be one of {sorted(STEM_STRIDES)}, got {self.stem!r}")
        n = len(self.depths)
        if not (len(self.embed_dims) == len(self.num_heads) == len(self.window_sizes) == n == len(self.merge_strides) + 1):
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage, merge_strides one fewer")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError("pixel_mean and pixel_std need 3 values, std > 0")
        unknown_heads = set(self.own_heads) - set(self.query_groups)
        if unknown_heads:
            raise ValueError(f"own_heads names unknown query groups: {sorted(unknown_heads)}")
        names = self.modality_names
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique: {names}")
        for m in self.modalities:
            if m.query_group not in self.query_groups:
                raise ValueError(f"modality {m.name!r} uses unknown query group {m.query_group!r}")
            if not m.structures:
                raise ValueError(f"modality {m.name!r} has no structures")
            labels = [s.label for s in m.structures]
            if len(set(labels)) != len(labels) or min(labels) < 1 or max(labels) > 255:
                raise ValueError(f"modality {m.name!r}: label ids must be unique and within 1..255 (uint8 label "
                                 f"maps), got {labels}")
            if m.intensity is not None and (len(m.intensity) != 1 or not set(m.intensity) <= {"window", "percentiles"}
                                            or len(next(iter(m.intensity.values()))) != 2):
                raise ValueError(f"modality {m.name!r}: intensity must be {{'window': [low, high]}} or "
                                 f"{{'percentiles': [low, high]}}, got {m.intensity}")
            if m.pixel_mm is not None and not m.pixel_mm > 0:
                raise ValueError(f"modality {m.name!r}: pixel_mm must be a positive number of millimetres, got {m.pixel_mm}")
            _check_box_atlas(m)
            _check_measured(m)
            if not isinstance(m.planes, list) or len(m.planes) == 1 or len(set(m.planes)) != len(m.planes) \
                    or not set(m.planes) <= {"axial", "coronal", "sagittal"}:
                raise ValueError(f"modality {m.name!r}: planes must be [] or a list of two or three distinct planes "
                                 f"among axial, coronal and sagittal, got {m.planes!r}")
            _check_symmetric(m)
            for s in m.structures:
                if set(s.parts) - set(labels) or s.label in s.parts:
                    raise ValueError(f"structure {s.name!r} of {m.name!r}: parts {s.parts} must be label ids of the "
                                     f"modality's other structures ({labels})")
                if not 0 <= s.token < self.query_groups[m.query_group]:
                    raise ValueError(f"structure {s.name!r} of {m.name!r}: token {s.token} is outside "
                                     f"query group {m.query_group!r} ({self.query_groups[m.query_group]} queries)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeLightSAMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown configuration keys: {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> "DeLightSAMConfig":
        return DeLightSAMConfig.from_dict({**self.to_dict(), **changes})


def _check_measured(m: Modality) -> None:
    """``measured`` as ``scope`` reads it: known contrasts, and two slice thicknesses, thinnest first."""
    from .scope import CONTRASTS

    contrasts, thickness = m.measured.get("contrasts", []), m.measured.get("slice_mm")
    unknown = set(m.measured) - {"contrasts", "slice_mm"}
    if unknown or not all(c in CONTRASTS for c in contrasts) or (thickness is not None and not (
            len(thickness) == 2 and all(isinstance(v, (int, float)) and math.isfinite(v) for v in thickness)
            and 0 < thickness[0] <= thickness[1])):
        raise ValueError(f"modality {m.name!r}: measured must be {{'contrasts': some of {list(CONTRASTS)}, "
                         f"'slice_mm': [thinnest, thickest]}}, got {m.measured}")


def _check_symmetric(m: Modality) -> None:
    """A modality declared ``symmetric`` names no structure of one side: its mirror image would be the other one's."""
    from .body_frame import SIDES

    if not isinstance(m.symmetric, bool):
        raise ValueError(f"modality {m.name!r}: symmetric must be true or false, got {m.symmetric!r}")
    sided = [s.name for s in m.structures if s.name in SIDES or SIDE_WORDS & _words(s.name)]
    if m.symmetric and sided:
        raise ValueError(f"modality {m.name!r} is declared symmetric (decoded mirrored left-right), but its "
                         f"structures {', '.join(sided)} are each on one side: a mirror image is the other side's")


def _words(name: str) -> set[str]:
    """A name's words, lower case, split at anything not a letter or digit and where a capital starts one
    (LeftHippocampus); digits stay with their word (vertebrae_L1: 'l1', no side)."""
    return {w.lower() for w in re.findall(r"[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*(?![a-z])|[0-9]+", name)}


def _check_box_atlas(m: Modality) -> None:
    names = {s.name for s in m.structures}
    for entry in m.box_atlas:
        boxes = entry.get("boxes") if isinstance(entry, dict) else None
        if not isinstance(boxes, dict) or not isinstance(entry.get("plane"), str):
            raise ValueError(f"modality {m.name!r}: a box atlas entry needs a plane and boxes, got {entry}")
        for name, box in boxes.items():
            if name not in names:
                raise ValueError(f"modality {m.name!r}: the box atlas names {name!r}, not one of its structures")
            if len(box) != 6 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box) \
                    or not all(box[i] < box[i + 3] for i in range(3)):
                raise ValueError(f"modality {m.name!r}: box of {name!r} in the box atlas must be 6 finite numbers, "
                                 f"low corner below high corner, got {box}")


def _modality_from_dict(data: dict) -> Modality:
    structures = [s if isinstance(s, Structure) else Structure(**s) for s in data["structures"]]
    return Modality(name=data["name"], controller=data["controller"], query_group=data["query_group"],
                    structures=structures, intensity=data.get("intensity"), title=data.get("title", ""),
                    pixel_mm=data.get("pixel_mm"), box_atlas=data.get("box_atlas", []),
                    measured=data.get("measured") or {}, planes=data.get("planes") or [],
                    symmetric=data.get("symmetric", False))


def released_config(controllers: dict[str, str] | None = None, **overrides) -> DeLightSAMConfig:
    """The released network's configuration.

    ``controllers`` maps released modality names to the controller that serves each; by default all six
    share one controller called "released", as one released checkpoint does.
    """
    if controllers is None:
        controllers = {name: RELEASED_QUERY_GROUP for name, _ in RELEASED_MODALITIES}
    modalities = [
        Modality(name, controllers[name], RELEASED_QUERY_GROUP, [Structure(structure, 1, token)])
        for token, (name, structure) in enumerate(RELEASED_MODALITIES)
        if name in controllers
    ]
    settings = dict(query_groups={RELEASED_QUERY_GROUP: RELEASED_QUERY_TOKENS}, modalities=modalities,
                    pixel_mean=IMAGENET_MEAN, pixel_std=RELEASED_STD,
                    description="De-LightSAM, released weights (six 2-D modalities)")
    return DeLightSAMConfig(**{**settings, **overrides})
