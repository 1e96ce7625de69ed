"""The app's trust boundary: what a request may name and what an upload may hold.

A request names images by datastore id (a file's stem, a session id, a DICOM SeriesInstanceUID), runs and
label tags by short names; none of them may be a path. A server path as `image` is refused unless the server
was started with `--conf allow_server_paths true` (a single-user workstation that wants it). Uploaded archives
are unpacked here, member by member: no absolute names, no `..`, no links or devices, and caps on the total
unpacked size and the unpacked-to-packed ratio (zip bombs). Detached image headers (NRRD `data file:`,
MetaImage `ElementDataFile` other than LOCAL) are refused in uploads: they name data elsewhere on the server.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fastapi import HTTPException
from monailabel.utils.sessions import Sessions

# a datastore image id, a session id (uuid), a SeriesInstanceUID: one path component, no "..", no separators
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
# a training run's name, a label tag
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
HEADER_SUFFIXES = (".nhdr", ".nrrd", ".mhd", ".mha")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
MB = 1024 * 1024


def is_id(value) -> bool:
    """Whether ``value`` is a datastore id (one path component, no ".."), not a path."""
    return isinstance(value, str) and bool(ID.fullmatch(value)) and ".." not in value


def check_id(value: str, what: str = "image id") -> str:
    if not is_id(value):
        raise HTTPException(422, f"invalid {what} {str(value)[:80]!r}: expected a datastore id (letters, digits, "
                                 f"'.', '_', '-'; no path), not a path or a name with '..'")
    return value


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise HTTPException(422, f"invalid {what} {str(value)[:80]!r}: use 1 to 64 letters, digits, '.', '_' or '-' "
                                 f"(starting with a letter or digit; no path)")
    return value


def check_image_reference(value: str, allow_server_paths: bool) -> str:
    """An `image` request parameter: a datastore id, or (only if the server allows it) an existing server path."""
    if not value or is_id(value):
        return value
    if not allow_server_paths:
        raise HTTPException(422, f"invalid image {value[:80]!r}: name an image of the datastore by its id, or upload "
                                 f"the file; server paths are refused (start the server with --conf "
                                 f"allow_server_paths true to allow them)")
    if not Path(value).is_absolute() or not Path(value).exists():
        raise HTTPException(404, f"no image {value[:80]!r}: a server path must be absolute and exist")
    return value


def no_image() -> HTTPException:
    """An inference request that names no image."""
    return HTTPException(422, "name an image (image=ID), upload one (file) or give a session_id")


def unreadable(name: str, error: BaseException) -> HTTPException:
    """A file that no reader can read as a volume (``delightsam.reading.READ_ERRORS``)."""
    from delightsam.reading import read_error

    return HTTPException(422, f"cannot read {name!r} as a medical image volume (NIfTI, NRRD or a DICOM series): "
                              f"{read_error(error)}")


# how running out of memory shows: Python's MemoryError; torch's CPU allocator and CUDA (RuntimeError subclasses),
# ITK's allocation failures (wrapped by MONAI's LoadImage in the RuntimeError of a reader that failed)
OUT_OF_MEMORY_WORDS = ("can't allocate memory", "bad_alloc", "failed to allocate", "out of memory", "memoryerror")


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and any(w in str(error).lower() for w in OUT_OF_MEMORY_WORDS))


def out_of_memory(what: str, estimate_mb: float | None = None, budget_mb: float | None = None) -> HTTPException:
    """A request within the limits that did not fit in memory: the operator's problem (503), with the estimate the
    app admitted it by and the budget, where they are known."""
    known = (f" (estimated {estimate_mb:,.0f} MB, within the inference memory budget of {budget_mb:,.0f} MB)"
             if estimate_mb and budget_mb else "")
    return HTTPException(503, f"{what} did not fit in this server's memory{known}: retry when fewer inferences run, "
                              f"or set --conf memory_budget_mb to what the machine can hold")


@dataclass(frozen=True)
class UploadLimits:
    max_file_bytes: int
    max_unpacked_bytes: int
    max_ratio: float

    @classmethod
    def from_settings(cls, settings) -> "UploadLimits":
        return cls(int(settings.max_upload_mb * MB), int(settings.max_unpacked_mb * MB), settings.max_unpack_ratio)


def check_upload_size(size: int, name: str, limits: UploadLimits) -> None:
    if size > limits.max_file_bytes:
        raise HTTPException(413, f"upload {name!r} is {size / MB:.1f} MB; this server takes at most "
                                 f"{limits.max_file_bytes / MB:.0f} MB per file (--conf max_upload_mb)")


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def unpack(archive: Path, into: Path, limits: UploadLimits) -> Path:
    """Unpacks a zip or tar archive into the folder ``into`` (created), refusing unsafe members and bombs.
    Regular files and folders only; sizes are counted as the bytes are written, not as the headers claim."""
    check_upload_size(archive.stat().st_size, archive.name, limits)
    budget = min(limits.max_unpacked_bytes, int(max(archive.stat().st_size, 1) * limits.max_ratio))
    into.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        for name, kind, source in _members(archive):
            target = _safe_target(into, name)
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            if kind != "file":
                raise HTTPException(422, f"archive {archive.name!r} holds {kind} {name!r}; only regular files and "
                                         f"folders are unpacked")
            target.parent.mkdir(parents=True, exist_ok=True)
            with source() as stream, open(target, "wb") as out:
                while chunk := stream.read(MB):
                    written += len(chunk)
                    if written > budget:
                        raise HTTPException(413, f"archive {archive.name!r} unpacks to more than {budget / MB:.0f} MB "
                                                 f"(at most {limits.max_unpacked_bytes / MB:.0f} MB, and "
                                                 f"{limits.max_ratio:.0f} times its own size)")
                    out.write(chunk)
            check_detached_header(target)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        shutil.rmtree(into, ignore_errors=True)
        raise HTTPException(422, f"cannot unpack {archive.name!r}: {e}") from e
    except HTTPException:
        shutil.rmtree(into, ignore_errors=True)
        raise
    return into


def _members(archive: Path):
    """(name, kind, opener) of each member: kind is file, dir, or what else it is (a link, a device...)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                mode = info.external_attr >> 16
                kind = ("dir" if info.is_dir() else "symbolic link" if stat.S_ISLNK(mode)  # zip -y stores links so
                        else "file" if stat.S_IFMT(mode) in (0, stat.S_IFREG) else "special file")
                yield info.filename, kind, (lambda i=info: z.open(i))
        return
    with tarfile.open(archive) as t:
        for member in t:
            kind = ("file" if member.isreg() else "dir" if member.isdir() else
                    "a link" if member.issym() or member.islnk() else "a device or special file")
            yield member.name, kind, (lambda m=member: t.extractfile(m))


def _safe_target(root: Path, name: str) -> Path:
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or re.match(r"^[A-Za-z]:", name) or not parts.parts:
        raise HTTPException(422, f"archive member {name[:120]!r} would be written outside the upload's folder "
                                 f"(absolute or with '..'); refused")
    return root.joinpath(*parts.parts)


def check_detached_header(path: Path) -> None:
    """NRRD and MetaImage headers may name their data in another file (anywhere on the server): refused."""
    if path.name.lower().endswith(HEADER_SUFFIXES):
        with open(path, "rb") as f:
            check_header_bytes(f.read(64 * 1024), path.name)


def check_header_bytes(head: bytes, name: str) -> None:
    """``check_detached_header`` on the first bytes of a file called ``name`` (an upload not yet on disk)."""
    if not name.lower().endswith(HEADER_SUFFIXES):
        return
    text = head.split(b"\n\n", 1)[0].decode("latin-1").lower()  # an NRRD header ends at its first blank line
    for line in text.splitlines():
        separator = "=" if "=" in line and (":" not in line or line.index("=") < line.index(":")) else ":"
        key, _, value = line.partition(separator)
        key, value = key.strip(), value.strip()
        if key in ("data file", "datafile") or (key == "elementdatafile" and value != "local"):
            raise HTTPException(422, f"{name!r} is a detached header (its data is in {value[:80]!r}); upload "
                                     f"a single-file NRRD, MetaImage, NIfTI or a DICOM series instead")


class GuardedSessions(Sessions):
    """monailabel's sessions, with uploads checked and archives unpacked by ``unpack`` (not by
    ``shutil.unpack_archive``, which follows no rule about where members go or how big they get)."""

    def __init__(self, store_path: str, expiry: int, limits: UploadLimits) -> None:
        super().__init__(store_path, expiry)
        self.limits = limits

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        source = Path(data_file)
        try:
            files = [p for p in source.rglob("*") if p.is_file()] if source.is_dir() else [source]
            for f in files:
                check_upload_size(f.stat().st_size, f.name, self.limits)
            if uncompress and source.is_file():
                if not is_archive(source) and not zipfile.is_zipfile(source) and not tarfile.is_tarfile(source):
                    raise HTTPException(422, f"uncompress=true, but {source.name!r} is not a zip or tar archive")
                data_file = str(unpack(source, source.with_name(source.name + ".unpacked"), self.limits))
            else:
                for f in files:
                    check_detached_header(f)
        except HTTPException:
            _remove_upload(source)
            raise
        return super().add_session(data_file, expiry, uncompress=False, session_id=session_id)


def _remove_upload(source: Path) -> None:
    """monailabel's session endpoint removes its upload folder only on success: do it on refusal."""
    import tempfile

    folder = source if source.is_dir() else source.parent
    if Path(tempfile.gettempdir()) in folder.parents:
        shutil.rmtree(folder, ignore_errors=True)
