"""DICOM SEG output for DICOM series input, with monailabel's own converter (pydicom-seg path; the dcmqi
path needs a binary that monailabel downloads at run time)."""

from __future__ import annotations

from pathlib import Path

from monailabel.datastore.utils.convert import nifti_to_dicom_seg

# SNOMED CT codes of structures this project segments (SegmentedPropertyTypeCodeSequence).
SNOMED = {
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "kidney": ("64033007", "Kidney"),
    "left kidney": ("18639004", "Left kidney"), "right kidney": ("9846003", "Right kidney"),
    "stomach": ("69695003", "Stomach"), "pancreas": ("15776009", "Pancreas"), "brain": ("12738006", "Brain"),
    "grey matter": ("389080004", "Gray matter"), "gray matter": ("389080004", "Gray matter"),
    "white matter": ("389083002", "White matter"), "lung": ("39607008", "Lung"),
}
ANATOMICAL_STRUCTURE = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"}


def segment_info(name: str, label: int) -> dict:
    code, meaning = SNOMED.get(name.lower(), ("91723000", "Anatomical structure"))
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
