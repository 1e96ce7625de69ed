"""DICOM SEG output for DICOM series input, with monailabel's own converter (pydicom-seg path; the dcmqi
path needs a binary that monailabel downloads at run time)."""

from __future__ import annotations

from pathlib import Path

from monailabel.datastore.utils.convert import nifti_to_dicom_seg

# SNOMED CT codes (SegmentedPropertyTypeCodeSequence) come from pydicom's DICOM code dictionary; these are
# the ones it lacks, and the spellings of this project's structure names that it does not use.
EXTRA_SNOMED = {"right kidney": ("9846003", "Right kidney"), "left kidney": ("18639004", "Left kidney")}
ALIASES = {"kidney right": "right kidney", "kidney left": "left kidney", "grey matter": "gray matter"}


def snomed(name: str) -> tuple[str, str] | None:
    """(code, meaning) of a structure name such as "liver", "kidney_right" or "grey_matter"; None if unknown."""
    from pydicom.sr.codedict import codes

    key = name.lower().replace("_", " ").strip()
    key = ALIASES.get(key, key)
    if key in EXTRA_SNOMED:
        return EXTRA_SNOMED[key]
    try:
        code = getattr(codes.SCT, "".join(word.capitalize() for word in key.split()))
    except AttributeError:
        return None
    return code.value, code.meaning


ANATOMICAL_STRUCTURE = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"}


def segment_info(name: str, label: int) -> dict:
    code, meaning = snomed(name) or ("91723000", "Anatomical structure")
    return {"name": name, "segmentAttribute": {
        "labelID": label, "SegmentLabel": name, "SegmentDescription": name,
        "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": "De-LightSAM",
        "SegmentedPropertyCategoryCodeSequence": ANATOMICAL_STRUCTURE,
        "SegmentedPropertyTypeCodeSequence": {"CodeValue": code, "CodingSchemeDesignator": "SCT", "CodeMeaning": meaning},
    }}


def write_dicom_seg(series_dir: Path, label_file: str, present: dict[str, int]) -> str:
    """A DICOM SEG that references the series' instances, one segment per structure present in the label.
    ``present``: structure name -> label id, for the ids that occur in the label map."""
    # monailabel pairs label_info with the label's ids in ascending order, by position
    info = [segment_info(name, label) for name, label in sorted(present.items(), key=lambda kv: kv[1])]
    return nifti_to_dicom_seg(str(series_dir), label_file, info, use_itk=False)
