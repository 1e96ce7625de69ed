"""DICOM SEG: label maps of DICOM series written as SEG objects with highdicom, and the segments of SEGs read
back in the model's label ids.

Segment numbers run 1..N (the IOD requires it; viewers map segments by number), in the order of the model's
label ids; each segment carries its structure's name, SNOMED CT code and GenericAnatomyColors colour, so a SEG
is mapped to and from the model's ids by name and code, never by number.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from . import anatomy

logger = logging.getLogger(__name__)

ANATOMICAL_STRUCTURE_CODE = Code("123037004", "SCT", "Anatomical Structure")
ANATOMICAL_STRUCTURE = {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Anatomical Structure"}


def segment_info(name: str, label: int) -> dict:
    """monailabel's (dcmqi's) description of a segment holding the voxels of value ``label``."""
    code, meaning = anatomy.snomed(name) or anatomy.FALLBACK_CODE
    return {"name": name, "color": list(anatomy.colour(name)), "segmentAttribute": {
        "labelID": label, "SegmentLabel": name, "SegmentDescription": name,
        "SegmentAlgorithmType": "AUTOMATIC", "SegmentAlgorithmName": "De-LightSAM",
        "SegmentedPropertyCategoryCodeSequence": ANATOMICAL_STRUCTURE,
        "SegmentedPropertyTypeCodeSequence": {"CodeValue": code, "CodingSchemeDesignator": "SCT", "CodeMeaning": meaning},
        "recommendedDisplayRGBValue": list(anatomy.colour(name)),
    }}


def source_images(files) -> list[pydicom.Dataset]:
    """The series' image instances (objects without a position in space, such as a DICOMDIR, are left out), their
    SOP Class and Instance UIDs taken from the file meta where the data set's own are empty (as in anonymised
    files); a series without Study or Series Instance UIDs cannot be referenced."""
    sources = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if "ImagePositionPatient" not in ds or "Rows" not in ds:
            continue
        meta = getattr(ds, "file_meta", pydicom.Dataset())
        ds.SOPClassUID = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID", "")
        ds.SOPInstanceUID = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID", "")
        if not (ds.SOPClassUID and ds.SOPInstanceUID):
            raise ValueError(f"{Path(f).name} has no SOP Class or Instance UID, so a DICOM SEG cannot reference it")
        sources.append(ds)
    if not sources:
        raise ValueError("the series holds no image with a position in space")
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID") if not sources[0].get(k)]
    if missing:
        raise ValueError(f"the series has no {' and '.join(missing)}, so a DICOM SEG cannot reference it; "
                         f"ask for a NIfTI or NRRD label instead")
    return sources


def _frame(labels: np.ndarray, affine: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The label map's slice under one source image, as [rows, columns]. ``labels`` is on the series' grid as
    MONAI's ITK reader gives it ([columns, rows, slices], RAS affine)."""
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    i, j, k = np.rint(np.linalg.inv(affine) @ [-x, -y, z, 1.0])[:3].astype(int)  # LPS -> RAS -> voxel
    if i or j or not 0 <= k < labels.shape[2] or labels.shape[:2] != (int(ds.Columns), int(ds.Rows)):
        raise ValueError(f"the label map ({list(labels.shape)}) is not on the series' grid (image "
                         f"{ds.SOPInstanceUID}, {ds.Rows}x{ds.Columns}, falls on voxel {[int(i), int(j), int(k)]})")
    return labels[:, :, k].T


def _lab(rgb):
    """sRGB (0..255) -> the CIELab colour DICOM records (Pillow's colour management does the conversion)."""
    import highdicom as hd
    from PIL import Image, ImageCms

    lab = ImageCms.applyTransform(Image.new("RGB", (1, 1), tuple(int(c) for c in rgb)), ImageCms.buildTransform(
        ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")).getpixel((0, 0))
    return hd.color.CIELabColor(lab[0] * 100 / 255, lab[1] - 128, lab[2] - 128)


def write_dicom_seg(files: list[str], labels: np.ndarray, affine, present: dict[str, int], version: str = "") -> str:
    """A DICOM SEG file that references the series' instances (``files``), one segment per structure in
    ``present`` (structure name -> its label id in ``labels``), numbered 1..N in the order of the ids."""
    import highdicom as hd

    sources = source_images(files)
    ordered = sorted(present.items(), key=lambda kv: kv[1])
    algorithm = hd.AlgorithmIdentificationSequence(name="De-LightSAM", version=version or "unknown",
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, (name, _) in enumerate(ordered, start=1):
        code, meaning = anatomy.snomed(name) or anatomy.FALLBACK_CODE
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=ANATOMICAL_STRUCTURE_CODE,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        description.RecommendedDisplayCIELabValue = list(_lab(anatomy.colour(name)).value)
        descriptions.append(description)
    affine = np.asarray(affine, dtype=np.float64)
    frames = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), np.uint8)
    for f, ds in enumerate(sources):
        frame = _frame(labels, affine, ds)
        for number, (_, label) in enumerate(ordered, start=1):
            frames[f][frame == label] = number
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=300,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="De-LightSAM for MONAI Label",
        manufacturer_model_name="De-LightSAM", software_versions=version or "unknown", device_serial_number="none",
        content_label="DELIGHTSAM", content_description="De-LightSAM auto-segmentation", omit_empty_frames=False)
    out = tempfile.NamedTemporaryFile(suffix=".dcm", delete=False).name
    seg.save_as(out)
    return out


def seg_segments(seg: pydicom.Dataset, structures: dict[str, int]) -> tuple[dict[int, int], list[str]]:
    """(segment number -> model label id, names of segments that are no structure of the model), matching each
    segment to a structure by its label or its SNOMED CT code."""
    numbers, unknown = {}, []
    for segment in seg.SegmentSequence:
        type_code = segment.SegmentedPropertyTypeCodeSequence[0].CodeValue \
            if "SegmentedPropertyTypeCodeSequence" in segment else None
        name = anatomy.match(str(segment.SegmentLabel), structures, type_code)
        if name is None:
            unknown.append(str(segment.SegmentLabel))
        else:
            numbers[int(segment.SegmentNumber)] = structures[name]
    return numbers, unknown


def read_seg_label(seg_dir: str, names_to_ids: dict[str, int], image_path: str,
                   out_path: str) -> tuple[str | None, list[str], list[str]]:
    """A DICOM SEG series folder -> (a label map in the model's ids on the image's grid, the structures its
    segments name, the names of segments that are no structure of the model). The SEG numbers its segments 1,
    2, ... in its own order and may hold only the slices that have some; segments are matched to structures by
    name or SNOMED CT code. None when no segment is a structure of the model."""
    import pydicom_seg
    import SimpleITK as sitk

    files = sorted(os.path.join(seg_dir, f) for f in os.listdir(seg_dir))
    seg = pydicom.dcmread(files[0])
    image = pydicom_seg.MultiClassReader().read(seg).image
    numbers = sitk.GetArrayFromImage(image)
    labels = np.zeros(numbers.shape, np.uint8)
    to_ids, unknown = seg_segments(seg, names_to_ids)
    for number, label in to_ids.items():
        labels[numbers == number] = label
    if unknown:
        logger.warning(f"{seg_dir}: segments {unknown} are no structure of this model; left out of training")
    known = [name for name, label in names_to_ids.items() if label in to_ids.values()]
    if not known:
        logger.warning(f"{seg_dir}: no segment names a structure of this model; not used for training")
        return None, [], unknown
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    out = sitk.Resample(out, sitk.ReadImage(image_path), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(out, out_path, True)
    return out_path, known, unknown
