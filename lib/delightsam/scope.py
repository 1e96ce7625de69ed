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
# the words of a series' description that name its contrast, whole words only ("t2_tse_tra" is t2, tse, tra)
_T1 = {"t1", "t1w", "mprage", "mp2rage", "spgr", "bravo", "tfe", "vibe", "fspgr", "t1c", "t1ce", "t1gd"}
_POST = {"post", "gd", "gad", "gado", "contrast", "c", "ce", "t1c", "t1ce", "t1gd", "enhanced"}
_NOT_POST = {"pre", "non", "without", "wo", "native"}
_WORDS = (("FLAIR", {"flair", "tirm", "dark"}), ("SWI", {"swi", "swan", "t2star"}),
          ("DWI", {"dwi", "diffusion", "diff", "adc", "trace", "dti"}), ("PD", {"pd", "pdw", "proton"}),
          ("T2", {"t2", "t2w", "tse", "fse", "haste", "space"}))


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
    """The MR contrast a series' description names, if any: a T1 word makes it T1 ("T1 FLAIR", "T1 SPACE" are T1
    sequences), with a word of contrast agent and none of its absence T1c ("T1 POST GAD", not "T1 PRE GAD" nor
    "W/WO CONTRAST"); else FLAIR, SWI, DWI, PD and T2 by their words ("PD TSE" is PD)."""
    text = re.sub(r"\+\s*c\b", " c ", description.lower()).replace("t2*", " t2star ")
    text = re.sub(r"post\W*fossa", " fossa ", text)  # the posterior fossa, not post-contrast
    words = set(re.split(r"[\W_]+", text)) - {""}
    if words & _T1:
        return "T1c" if words & _POST and not words & _NOT_POST else "T1"
    return next((name for name, named in _WORDS if words & named), None)


def dicom_contrast(header) -> str | None:
    """The contrast a DICOM dataset names: its SeriesDescription's, else its ProtocolName's, else its SequenceName's
    (each read alone: a protocol "BRAIN W/WO CONTRAST" says nothing of one series)."""
    for key in ("SeriesDescription", "ProtocolName", "SequenceName"):
        found = contrast_of(str(header.get(key, "") or ""))
        if found:
            return found
    return None


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
