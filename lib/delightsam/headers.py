"""A volume's header, read and checked before its voxels: size, data length and geometry.

A file's header says how many voxels it holds and where they lie; its voxels are what costs memory. Every reader
path (an upload, a datastore image, a saved label, a DICOM series from a folder or the PACS) reads the header
first, with the field's libraries and without the pixel data (nibabel; SimpleITK's ``ReadImageInformation``;
pydicom ``stop_before_pixels``), and refuses by name a volume that is too large (a limit on voxels and on declared
bytes, whatever the file's size on the wire: a gzip bomb is refused by its header), one whose data is shorter than
the header says, and geometry no scan can have (spacing not finite and positive, a singular or non-finite
direction, an image that is not 3-D). Imports no model.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MB = 1024 * 1024
# the defaults of the app's --conf max_megavoxels and max_volume_mb: a 512 x 512 x 2,000 whole-body CT passes
MAX_VOXELS = 600_000_000
MAX_BYTES = 4096 * MB


class HeaderError(ValueError):
    """A volume refused by its header. ``kind``: "size" (beyond a limit: the client's request is too large),
    "truncated", "geometry", "dimensions" or "unreadable" (the file itself is wrong)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Header:
    name: str
    shape: tuple[int, ...]  # as stored; a 3-D volume in a 4-D file has a trailing 1
    itemsize: int  # bytes per voxel as stored
    affine: np.ndarray  # voxel -> world (RAS for NIfTI, as MONAI's readers give it; LPS for ITK and DICOM)
    data_bytes: int | None = None  # bytes of voxel data in the file, where the file stores them uncompressed
    read_itemsize: int | None = None  # bytes per voxel as read, where the reader scales them (float64); else itemsize

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)  # exact: numpy's int64 product wraps for a header that declares absurd sizes

    @property
    def bytes_per_voxel_read(self) -> int:
        return self.read_itemsize or self.itemsize

    @property
    def declared_bytes(self) -> int:
        return self.voxels * self.itemsize


@dataclass(frozen=True)
class Limits:
    max_voxels: int = MAX_VOXELS
    max_bytes: int = MAX_BYTES


_DEFAULT = [Limits()]


def use_limits(limits: Limits) -> None:
    """The limits of every reader in this process that is given none (the app's --conf keys, set at its start)."""
    _DEFAULT[0] = limits


def default_limits() -> Limits:
    return _DEFAULT[0]


def is_nifti(path) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


# what parsing a damaged header raises, beside the readers' own errors (``reading.READ_ERRORS``): a bad datatype
# code (nibabel's HeaderDataError), a tag of the wrong multiplicity or type (TypeError, IndexError), absurd sizes
_PARSE_ERRORS = (ValueError, TypeError, IndexError, KeyError, OverflowError, AttributeError, EOFError)


def read_header(path) -> Header:
    """The header of a NIfTI, NRRD or MetaImage file, or of a DICOM series (a folder), without its voxels; a header
    that cannot be parsed is a HeaderError ("unreadable")."""
    path = Path(path)
    if path.is_dir():
        from .reading import dicom_series

        return dicom_header(dicom_series(path).files, path.name)
    return _parsed(path.name, _nifti_header if is_nifti(path) else _itk_header, path)


def _parsed(name: str, read, *args) -> Header:
    from nibabel.spatialimages import HeaderDataError
    from pydicom.errors import InvalidDicomError

    try:
        return read(*args)
    except HeaderError:
        raise
    except (*_PARSE_ERRORS, HeaderDataError, InvalidDicomError) as e:
        raise HeaderError(f"cannot read the header of {name!r}: {type(e).__name__}: {str(e)[:200]}", "unreadable") from e


def _nifti_header(path: Path) -> Header:
    import nibabel as nib

    image = nib.load(str(path))  # the header only: the voxels stay behind a proxy
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    itemsize = header.get_data_dtype().itemsize
    pixdim = _raw_pixdim(path, type(header))[1: 1 + min(len(shape), 3)]
    if not np.all(np.isfinite(pixdim)) or np.any(pixdim == 0):  # negative: old Analyze's flip, read as its size
        raise HeaderError(f"{path.name!r} declares voxel sizes {pixdim.tolist()} (pixdim): a voxel's size must be "
                          f"finite and not zero", "geometry")
    stored = None if path.name.lower().endswith(".gz") else os.path.getsize(path) - int(header["vox_offset"])
    with np.errstate(invalid="ignore"):
        affine = np.asarray(image.affine, dtype=np.float64)
    # such voxels are scaled as they are read (the loaded header's scaling moves to the data proxy): to float64, or to
    # integers where the scaling is whole numbers (``scaled_integers``; bounded here by the stored type's range)
    slope, intercept = getattr(image.dataobj, "slope", 1.0), getattr(image.dataobj, "inter", 0.0)
    read = None
    if slope != 1 or intercept != 0:
        stored_type = header.get_data_dtype()
        as_integers = scaled_integers(stored_type, slope, intercept) if stored_type.kind in "iu" else None
        read = np.dtype(as_integers).itemsize if as_integers is not None else 8  # None: floats
    return Header(path.name, shape, itemsize, affine, stored, read)


def scaled_integers(stored: np.dtype, slope: float, intercept: float, low: int | None = None,
                    high: int | None = None):
    """The integer type that integers stored as ``stored`` and scaled by a whole-number ``slope`` and ``intercept``
    are read as (``reading.IntegerNiftiReader``): the smallest of int16, int32 and int64 that holds the scaled values
    of ``low`` to ``high`` (the stored type's whole range where they are not given), and the slope and intercept
    themselves (the scaling runs in that type); None where the scaling is not whole numbers or no such type holds
    them (such voxels are read as float64)."""
    slope, intercept = float(slope), float(intercept)
    if not (slope.is_integer() and intercept.is_integer()):
        return None
    info = np.iinfo(stored)
    low, high = (info.min if low is None else low), (info.max if high is None else high)
    values = [int(v) * int(slope) + int(intercept) for v in (low, high)] + [int(slope), int(intercept)]
    return next((t for t in (np.int16, np.int32, np.int64)
                 if np.iinfo(t).min <= min(values) and max(values) <= np.iinfo(t).max), None)


def _raw_pixdim(path: Path, kind) -> np.ndarray:
    """pixdim as the file has it (nibabel's loader sets zeros to 1, which would hide them)."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        return np.asarray(kind.from_fileobj(f, check=False)["pixdim"], dtype=np.float64)


def _itk_header(path: Path) -> Header:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    shape, dims = tuple(int(n) for n in reader.GetSize()), reader.GetDimension()
    components = reader.GetNumberOfComponents()
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * dims, reader.GetPixelID())).itemsize
    affine = np.eye(dims + 1)
    affine[:dims, :dims] = np.reshape(reader.GetDirection(), (dims, dims)) @ np.diag(reader.GetSpacing())
    affine[:dims, dims] = reader.GetOrigin()
    shape = shape + ((components,) if components > 1 else ())
    stored = _raw_data_bytes(path)
    return Header(path.name, shape, itemsize, affine, stored)


def _raw_data_bytes(path: Path) -> int | None:
    """The bytes after the header of an NRRD or MetaImage file that holds its voxels uncompressed after its header
    (None: compressed or detached, whose length the file's size does not tell)."""
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    name = path.name.lower()
    if name.endswith(".nrrd") and b"\n\n" in head:  # an NRRD header ends at its first blank line
        text = head.split(b"\n\n", 1)[0]
        fields = _fields(text, b":")
        raw = fields.get(b"encoding") == b"raw" and b"datafile" not in fields
        return os.path.getsize(path) - len(text) - 2 if raw else None
    if name.endswith(".mha") and b"ElementDataFile" in head:  # the header's last line names where the data is
        end = head.index(b"\n", head.index(b"ElementDataFile")) + 1
        fields = _fields(head[:end], b"=")
        local = fields.get(b"elementdatafile") == b"local" and fields.get(b"compresseddata", b"false") == b"false"
        return os.path.getsize(path) - end if local else None
    return None


def _fields(text: bytes, separator: bytes) -> dict[bytes, bytes]:
    """A text header's `key<separator>value` lines, keys and values lower case without spaces."""
    pairs = (line.split(separator, 1) for line in text.splitlines() if separator in line)
    return {k.strip().lower().replace(b" ", b""): v.strip().lower() for k, v in pairs}


def dicom_header(files: list[str], name: str) -> Header:
    """A DICOM series' header from its first and last files (pydicom, without pixel data): rows x columns x
    frames per file x files, the bytes of a frame, and the geometry that the slices' positions give."""
    return _parsed(name, _dicom_header, files, name)


def check_series(files: list[str], name: str, limits: Limits | None = None) -> Header:
    """``check_header`` of a DICOM series' header."""
    return check_header(dicom_header(files, name), limits)


def _dicom_header(files: list[str], name: str) -> Header:
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)  # GDCM reads files without a preamble
    last = pydicom.dcmread(files[-1], stop_before_pixels=True, force=True) if len(files) > 1 else first
    rows, columns = int(first.get("Rows", 0) or 0), int(first.get("Columns", 0) or 0)
    frames = int(first.get("NumberOfFrames", 1) or 1)
    samples = int(first.get("SamplesPerPixel", 1) or 1)
    itemsize = max(int(first.get("BitsAllocated", 16) or 16) // 8, 1) * samples
    spacing = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    cosines = np.asarray([float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]).reshape(2, 3)
    if len(files) > 1:
        step = (np.asarray(last.get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
                - np.asarray(first.get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)) / (len(files) - 1)
    else:
        step = np.cross(cosines[0], cosines[1]) * float(first.get("SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack([cosines[0] * spacing[1], cosines[1] * spacing[0], step])
    affine[:3, 3] = np.asarray(first.get("ImagePositionPatient", [0, 0, 0]), dtype=np.float64)
    shape = (columns, rows, len(files) * frames)
    syntax = str(getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", ""))
    uncompressed = syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2")
    stored = min(os.path.getsize(f) for f in files) * len(files) if uncompressed else None  # the shortest file
    slope, intercept = float(first.get("RescaleSlope", 1) or 1), float(first.get("RescaleIntercept", 0) or 0)
    scaled = not (slope.is_integer() and intercept.is_integer())  # ITK then reads floats
    return Header(name, shape, itemsize, affine, stored, 8 if scaled else None)


def check_header(header: Header, limits: Limits | None = None, three_d: bool = True) -> Header:
    """Refuses, by name and with the limit, a volume too large, shorter than declared, not 3-D (``three_d``) or of
    impossible geometry; returns ``header``. ``limits``: None, this process's (``use_limits``)."""
    limits = limits or default_limits()
    shape = header.shape[:3] if len(header.shape) == 4 and header.shape[-1] == 1 else header.shape
    if three_d and (len(shape) != 3 or min(shape) < 1):
        kind = f"a {len(shape)}-D image" if len(shape) != 3 else "an empty image"
        wanted = "a single-channel 3-D volume" if len(shape) == 4 else "a 3-D volume"
        raise HeaderError(f"expected {wanted}, got {kind} of shape {list(header.shape)} ({header.name!r})",
                          "dimensions")
    if header.voxels > limits.max_voxels:
        raise HeaderError(f"{header.name!r} declares {'x'.join(map(str, header.shape))} = {header.voxels / 1e6:,.0f} "
                          f"million voxels; this server takes at most {limits.max_voxels / 1e6:,.0f} million "
                          f"(--conf max_megavoxels)", "size")
    if header.declared_bytes > limits.max_bytes:
        raise HeaderError(f"{header.name!r} declares {header.declared_bytes / MB:,.0f} MB of voxels; this server takes "
                          f"at most {limits.max_bytes / MB:,.0f} MB (--conf max_volume_mb)", "size")
    if header.data_bytes is not None and header.data_bytes < header.declared_bytes:
        raise HeaderError(f"{header.name!r} is truncated: its header declares {header.declared_bytes:,} bytes of "
                          f"voxels, the file holds {max(header.data_bytes, 0):,}", "truncated")
    dims = len(header.affine) - 1
    check_geometry(header.affine[:dims, :dims], header.name)
    return header


def check_geometry(matrix, name: str) -> None:
    """A volume's voxel-to-world matrix (direction times spacing): every entry finite, every voxel size positive,
    the three axes independent."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if not np.all(np.isfinite(matrix)):
        raise HeaderError(f"{name!r} has a non-finite voxel-to-world matrix {np.round(matrix, 4).tolist()} (NaN or "
                          f"infinite spacing or direction)", "geometry")
    spacing = np.linalg.norm(matrix, axis=0)
    if np.any(spacing <= 1e-6):
        raise HeaderError(f"{name!r} has voxel sizes {np.round(spacing, 6).tolist()} mm (a singular voxel-to-world "
                          f"matrix): a voxel's size must be positive", "geometry")
    direction = matrix / spacing
    if abs(np.linalg.det(direction)) < 1e-3:
        raise HeaderError(f"{name!r} has a singular direction matrix {np.round(direction, 4).tolist()}: its axes "
                          f"are not independent", "geometry")


def check_volume(path, limits: Limits | None = None, three_d: bool = True) -> Header:
    """``check_header(read_header(path))``: the header of a file or DICOM series folder, checked."""
    return check_header(read_header(path), limits, three_d)
