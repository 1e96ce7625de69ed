"""An image's modality, known or asked for, never guessed from its pixels; and the names of the app's tasks, one per
modality of the served model (`delightsam_ct`, `delightsam_mr`).

Where a modality comes from, in order: what an inference recorded in the datastore's image info (or a user set
there), the series' DICOM Modality tag (a file's, a series folder's, or the PACS's search answer), what the request
or the server's `--conf modality` declares. Everything that needs one (the infer tasks' check, training, Next Sample's
scoring, batch inference, the saved-label check) asks here.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

PREFIX = "delightsam"  # the tasks' names: delightsam_<modality>; `--conf models delightsam` serves them all
IMAGE_MODALITIES = {"CT", "MR"}  # the DICOM Modality values of image series the models may serve


def task_name(modality: str) -> str:
    return f"{PREFIX}_{modality}"


def task_modality(name: str) -> str:
    """The modality an infer task's name segments (``task_name`` undone)."""
    return name.removeprefix(f"{PREFIX}_")


def dicom_modality(path) -> str | None:
    """The Modality tag of a DICOM file, or of the first file of a series folder, or of the series folder
    beside a NIfTI made from it (how a DICOMweb datastore caches series); None for other files."""
    return header_modality(dicom_header(path))


def header_modality(header: pydicom.Dataset | None) -> str | None:
    """The Modality tag of a header read by ``dicom_header``; None for no header or an empty tag."""
    return str(header.Modality) or None if header is not None else None


def dicom_header(path) -> pydicom.Dataset | None:
    """The header (no pixels) of a DICOM file, of the first readable image file (one with a Modality) of a series
    folder, or of the series folder beside a NIfTI made from it; None for other files."""
    if not path:
        return None
    path = Path(str(path))
    source = path.with_name(path.name.removesuffix(".nii.gz"))
    if path.name.endswith(".nii.gz") and source.is_dir():
        path = source
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files[:5]:
        try:
            header = pydicom.dcmread(f, stop_before_pixels=True)
        except Exception:  # not DICOM (a NIfTI, an NRRD, a stray file in the folder)
            continue
        if "Modality" in header:  # not a DICOMDIR or another file without one
            return header
    return None


def image_modality(datastore, image_id: str, served, default: str | None) -> tuple[str | None, str]:
    """(the image's modality, or None and why it is unknown or not served): recorded in its image info by an
    inference, else its DICOM Modality tag, else ``default`` (the server's --conf modality, or what the request
    declared). Never guessed from the pixels. ``served``: the ``ServedModel`` (the modalities it serves)."""
    info = datastore.get_image_info(image_id) or {}
    modality = info.get("modality") or info.get("Modality")  # ours, or a downloaded DICOMweb series' tag
    if not modality and hasattr(datastore, "series_modality"):  # a PACS series: its tag, without downloading it
        modality = datastore.series_modality(image_id)
    elif not modality:
        modality = dicom_modality(datastore.get_image_uri(image_id))
    modality = modality or default
    if not modality:
        return None, (f"its modality is unknown: run one of this server's auto-segmentation models on it (which "
                      f"records the modality), or set it with PUT /datastore/image/info?image={image_id} and form "
                      f"field info={{\"modality\": \"ct\"}} (or \"mr\"), or start the server with --conf modality NAME")
    modality = str(modality).lower()
    if modality not in served.modalities():
        return None, f"its modality {modality} is not served by this model ({', '.join(served.modalities())})"
    return modality, ""


def dicom_modalities(served) -> list[str]:
    """The DICOM Modality values of the series the served model segments (what a PACS datastore lists)."""
    served.refresh()
    return sorted({n.upper() for n in served.modalities()} & IMAGE_MODALITIES) or ["CT"]
