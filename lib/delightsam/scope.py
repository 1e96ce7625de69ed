"""What a modality's model was measured on (its MR contrasts, its slice thicknesses), and whether a request's volume is
within that: a FLAIR or a 10 mm series still gets a mask, and the result says it is outside what was measured.

A checkpoint's modality carries ``measured`` (``config.Modality``): {"contrasts": [...], "slice_mm": [thinnest,
thickest]}, written by whoever measured it (``scripts/train_mr_heads.py`` for MR). An MR's contrast is what the
request says (its ``contrast`` option), else what its DICOM series' description names, else unknown: never guessed
from the pixels."""

from __future__ import annotations

import re
from dataclasses import dataclass

# the MR contrasts a request may name; "T1c": a T1 after a gadolinium contrast agent
CONTRASTS = ("T1", "T1c", "T2", "FLAIR", "PD", "DWI", "SWI", "other")
# words of a series' description or protocol that name its contrast, the most specific first (a "T1 FLAIR" is a T1,
# a "T2 FLAIR" a FLAIR; "MPRAGE", "SPGR", "BRAVO", "TFE" are T1 sequences)
_WORDS = (("T1c", r"(t1.*(gd|gad|contrast|post|\+c|ce\b))|((gd|gad|post).*t1)|mprage.*(gd|post)"),
          ("T1", r"t1\W*flair"),
          ("FLAIR", r"t2.*flair|flair(?!.*t1)|\bdark.?fluid"),
          ("T1", r"t1|mprage|mp-rage|spgr|bravo|\btfe\b|\bvibe\b"),
          ("T2", r"t2(?!\*)|\btse\b|\bhaste\b|\bspace\b"),
          ("SWI", r"swi|t2\*|\bswan\b"),
          ("DWI", r"dwi|diffusion|\badc\b|\btrace\b"),
          ("PD", r"\bpd\b|proton"))


@dataclass(frozen=True)
class Scope:
    """A volume against what its modality's model was measured on."""

    contrast: str | None  # the MR contrast, or None where not known (or not MR)
    contrast_from: str  # "request", "DICOM series description", or "unknown"
    slice_mm: float  # the volume's thickest spacing: its slices' spacing where it was cut thick
    within: bool | None  # None: the modality records nothing measured, or the contrast is unknown
    note: str  # "" when within

    def as_dict(self) -> dict:
        return {"contrast": self.contrast, "contrast_from": self.contrast_from, "slice_mm": round(self.slice_mm, 2),
                "within_measured": self.within}


def contrast_of(description: str) -> str | None:
    """The MR contrast a DICOM series' description (SeriesDescription, ProtocolName, SequenceName) names, if any."""
    text = description.lower()
    return next((name for name, pattern in _WORDS if re.search(pattern, text)), None)


def dicom_contrast(header) -> str | None:
    """The contrast a DICOM dataset's descriptions name (``contrast_of``), or None."""
    words = " ".join(str(header.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName"))
    return contrast_of(words) if words.strip() else None


def scope(measured: dict | None, modality: str, spacing, contrast: str | None = None, source: str = "request") -> Scope:
    """Where a volume of ``spacing`` (mm) and ``contrast`` (from ``source``) stands against ``measured``."""
    thickest = float(max(spacing))
    if contrast is not None and contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    measured = measured or {}
    contrasts, (thin, thick) = measured.get("contrasts"), measured.get("slice_mm") or (None, None)
    outside = []
    if contrasts and contrast is not None and contrast not in contrasts:
        outside.append(f"its contrast is {contrast} (from the {source})")
    if thick is not None and thickest > thick * 1.1:  # 10%: a 5.5 mm series is a 5 mm one
        outside.append(f"its slices are {thickest:g} mm apart")
    what = _measured_words(modality, contrasts, thin, thick)
    if outside:
        return Scope(contrast, source if contrast else "unknown", thickest, False,
                     f"outside what this model was measured on ({what}): {' and '.join(outside)}; the mask is "
                     "unmeasured there, check it")
    if contrasts and contrast is None:
        return Scope(None, "unknown", thickest, None,
                     f"the MR contrast is not known (no `contrast` option, no DICOM series description naming one): "
                     f"this model was measured on {what}")
    return Scope(contrast, source if contrast else "unknown", thickest, True if measured else None, "")


def _measured_words(modality: str, contrasts, thin, thick) -> str:
    kinds = f"{modality.upper()} " + "/".join(contrasts) if contrasts else modality.upper()
    return kinds + (f", slices {thin:g}-{thick:g} mm" if thick is not None else "")
