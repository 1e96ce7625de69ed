"""Reading volumes and label maps: NIfTI, NRRD and DICOM series, as MONAI's readers give them (MetaTensor [X, Y, Z]
with its RAS affine), a file's grid from its header alone, and a label map onto its image's grid.

What the app, the datastore and the label checks need, apart from inference: this module imports no model.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import ITKReader, NibabelReader
from monai.transforms import LoadImage

from .geometry import spacing_of
from .headers import Limits, check_series, check_volume, is_nifti, scaled_integers


def image_reader(path):
    """nibabel for NIfTI (ITK's NIfTI reader turns NaN into 0, hiding corrupt volumes; ``IntegerNiftiReader``), ITK
    for the rest (NRRD, DICOM series folders)."""
    return IntegerNiftiReader() if is_nifti(path) else "ITKReader"


class IntegerNiftiReader(NibabelReader):
    """MONAI's NibabelReader, except that a NIfTI of integers whose scaling is whole numbers (a CT stored as int16
    with an intercept of -1024, say) is read as integers of the same values: nibabel gives any scaled volume as
    float64, eight bytes a voxel, and a 512x512x133 CT took 2 s to read that way instead of 0.6 s."""

    def _get_array_data(self, img, filename):
        proxy = img.dataobj
        slope, inter = float(getattr(proxy, "slope", np.nan)), float(getattr(proxy, "inter", np.nan))
        stored = np.dtype(getattr(proxy, "dtype", np.float64))
        if self.to_gpu or stored.kind not in "iu" or not (slope.is_integer() and inter.is_integer()):
            return super()._get_array_data(img, filename)
        raw = proxy.get_unscaled()
        if slope == 1 and inter == 0:
            return raw
        dtype = scaled_integers(stored, slope, inter, *((int(raw.min()), int(raw.max())) if raw.size else (0, 0)))
        if dtype is None:  # beyond int64: as nibabel gives it
            return super()._get_array_data(img, filename)
        scaled = raw.astype(dtype)
        scaled *= dtype(slope)
        scaled += dtype(inter)
        return scaled


@dataclass
class DicomSeries:
    folder: str
    name: str  # the series identifier as MONAI's ITKReader names it (its ``series_name``)
    files: list[str] = field(repr=False)  # (hundreds of paths: not in every log line that shows a request)


def dicom_series(folder) -> DicomSeries:
    """The DICOM series in ``folder`` or below it (a zipped series unpacks into a folder of its own) with the
    most files. Several series of that size, or none, is an error that says so."""
    import itk

    found = []
    for root, _, files in sorted(os.walk(folder)):
        if not any(_looks_like_dicom(Path(root) / f) for f in files[:20]):
            continue  # a folder of something else: ITK would only warn
        names = itk.GDCMSeriesFileNames.New()
        names.SetUseSeriesDetails(True)  # exactly as MONAI's ITKReader, so that its series_name matches
        names.AddSeriesRestriction("0008|0021")
        names.SetDirectory(root)
        found += [DicomSeries(root, uid, [str(f) for f in names.GetFileNames(uid)]) for uid in names.GetSeriesUIDs()]
    found = sorted((s for s in found if s.files), key=lambda s: -len(s.files))
    if not found:
        raise ValueError(f"no DICOM series in {Path(folder).name!r} or the folders inside it")
    if len(found) > 1 and len(found[1].files) == len(found[0].files):
        tied = [f"{Path(s.folder).relative_to(folder)}: {s.name.split('.')[-1][:12]}" for s in found
                if len(s.files) == len(found[0].files)]
        raise ValueError(f"{Path(folder).name!r} holds {len(tied)} DICOM series of {len(found[0].files)} files each "
                         f"({'; '.join(tied)}): send one series at a time")
    return found[0]


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM" or path.suffix.lower() == ".dcm"
    except OSError:
        return False


# what reading an image or label can raise for a bad file (ITK: RuntimeError; a label off the image's grid:
# ValueError; nibabel's header reader: ImageFileError; a cut gzip stream: EOFError or zlib.error)
READ_ERRORS = (ValueError, RuntimeError, OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError)


def read_error(error: BaseException) -> str:
    """A reader's error as one line for a message: its first, at most 300 characters (MONAI appends every
    reader's traceback)."""
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__


def read_volume(path, dtype=np.float32, limits: Limits | None = None):
    """A volume as MONAI reads it for the app: MetaTensor [X, Y, Z] with its (RAS) affine. A folder is read as
    the largest DICOM series in it or below it. ``dtype``: None keeps the file's own type. Its header is read and
    checked first (``headers``: within ``limits``, None: the process's; as long as it says; of possible geometry)."""
    if Path(path).is_dir():
        series = dicom_series(path)
        check_series(series.files, Path(path).name, limits)
        image = LoadImage(image_only=True, reader=ITKReader(series_name=series.name), dtype=dtype)(series.folder)
    else:
        check_volume(path, limits)
        image = LoadImage(image_only=True, reader=image_reader(path), dtype=dtype)(str(path))
    if image.dim() == 4 and 1 in (image.shape[0], image.shape[-1]):  # one 3-D volume in a 4-D file
        image = image[0] if image.shape[0] == 1 else image[..., 0]
    return image


@dataclass(frozen=True)
class Grid:
    """A volume's voxel grid: its shape [X, Y, Z] and RAS affine, as ``read_volume`` would give them."""

    shape: tuple[int, ...]
    affine: np.ndarray


def read_grid(path) -> Grid:
    """A volume file's grid from its header alone (``headers``: checked; for ITK's files with MONAI's LPS-to-RAS
    affine), without reading its voxels; a DICOM series folder is read whole."""
    if Path(path).is_dir():
        image = read_volume(path, dtype=None)
        return Grid(tuple(image.shape), np.asarray(image.affine, dtype=np.float64))
    header = check_volume(path, three_d=False)
    shape, affine, dims = header.shape, header.affine, len(header.affine) - 1
    if not is_nifti(path):  # nibabel's affine is RAS already; ITK's is LPS
        affine = np.diag([-1.0, -1.0] + [1.0] * (dims - 1)) @ affine
    if len(shape) == 4 and shape[-1] == 1:  # one 3-D volume in a 4-D file, as read_volume takes it
        shape = shape[:3]
        if dims == 4:
            affine = np.delete(np.delete(affine, 3, axis=0), 3, axis=1)
    return Grid(shape, affine)


def read_label(path, image, dtype=np.float32):
    """A label map read onto ``image``'s voxel grid (a volume, or a ``Grid``): a label stored in another axis order
    or direction (a NIfTI label of a DICOM series, say) is flipped and permuted by the two affines; any other
    difference of grid is an error that names both. ``dtype``: None keeps the file's own type."""
    import nibabel.orientations as orientations

    label = read_volume(path, dtype=dtype)
    if tuple(label.shape) == tuple(image.shape) and np.allclose(label.affine, image.affine, atol=1e-3):
        return label
    have = orientations.io_orientation(np.asarray(label.affine))
    want = orientations.io_orientation(np.asarray(image.affine))
    transform = orientations.ornt_transform(have, want)
    data = orientations.apply_orientation(np.asarray(label.as_subclass(torch.Tensor)), transform)
    affine = np.asarray(label.affine) @ orientations.inv_ornt_aff(transform, label.shape)
    spacing = max(spacing_of(image))
    if data.shape != tuple(image.shape) or not np.allclose(affine, np.asarray(image.affine), atol=1e-2 * spacing):
        raise ValueError(f"label {Path(path).name} is not on the image's grid: shape {list(label.shape)} and affine "
                         f"{np.round(np.asarray(label.affine), 3).tolist()} vs the image's {list(image.shape)} and "
                         f"{np.round(np.asarray(image.affine), 3).tolist()}")
    return torch.from_numpy(np.ascontiguousarray(data))
