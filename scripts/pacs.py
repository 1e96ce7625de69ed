#!/usr/bin/env python
"""A local PACS for the OHIF viewer: Orthanc with the sample studies over DICOMweb, and the app served on it.

  make pacs      (= python scripts/pacs.py after `make samples`)

1. Installs what is missing from Debian's packages (orthanc, orthanc-dicomweb, orthanc-gdcm, socat; chromium
   for the browser tests) when run as root, else says which command to run.
2. Writes the sample DICOM series under --work: the TotalSegmentator 20-slice CT (its empty Study/Series/SOP
   UIDs filled in deterministically, JPEG 2000 decoded to Explicit VR Little Endian, since Debian's Orthanc
   crashes when it transcodes JPEG 2000 inside an HTTP request) and an MR series written with pydicom from the
   pyradiomics brain MR volume (real pixels, generated headers), one study each.
3. Starts Orthanc as this user's process, in a network namespace of its own that has only loopback (Orthanc
   binds every address and has no option to bind one); socat carries 127.0.0.1:PORT into it through a
   socket file. Uploads the series (again on every start: Orthanc keeps one copy).
4. Starts `monailabel start_server --studies http://127.0.0.1:PORT/dicom-web` with this app, prints the OHIF
   address, and stops everything on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

ROOT = Path(__file__).resolve().parents[1]
ORTHANC = "/usr/sbin/Orthanc"
CONFIG = Path(__file__).with_name("orthanc") / "orthanc.json"
PACKAGES = {"orthanc": ORTHANC, "orthanc-dicomweb": "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
            "orthanc-gdcm": "/usr/share/orthanc/plugins/libOrthancGdcm.so", "socat": "/usr/bin/socat",
            "chromium": "/usr/bin/chromium",
            "dicom3tools": "/usr/bin/dciodvfy"}  # the DICOM IOD validator that the tests run on every SEG


# ---- installs -------------------------------------------------------------------------------------
def ensure_packages(install: bool) -> None:
    missing = [name for name, path in PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if not install or os.geteuid() != 0:
        raise SystemExit(f"missing Debian packages {missing}: run `sudo {' '.join(command)}` (or this command as root)")
    print(f"installing {' '.join(missing)} from Debian's packages", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    if not Path(ORTHANC).exists():
        raise SystemExit("Orthanc is still missing after apt-get install")


# ---- the series -----------------------------------------------------------------------------------
def uid(*parts: str) -> str:
    """A deterministic UID: the same sample gets the same UIDs on every machine."""
    return generate_uid(entropy_srcs=["delightsam-pacs", *parts])


def prepare_ct(source: Path, out: Path) -> dict:
    """The TotalSegmentator CT series with UIDs, uncompressed (pixels identical to the JPEG 2000 decode)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = uid("ct-study"), uid("ct-series")
    for f in sorted(source.iterdir()):
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array.copy()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID = ds.get("PatientID") or "DLS-CT-0001"
        ds.PatientName = str(ds.get("PatientName", "")) or "Sample^CT"
        ds.StudyDescription = ds.get("StudyDescription") or "De-LightSAM sample CT (TotalSegmentator)"
        ds.StudyID = ds.get("StudyID") or "1"
        ds.SeriesNumber = ds.get("SeriesNumber") or 1
        ds.decompress()  # -> Explicit VR Little Endian
        target = out / f"{f.name}.dcm"
        ds.save_as(target, write_like_original=False)
        if not np.array_equal(pydicom.dcmread(target).pixel_array, pixels):
            raise SystemExit(f"{target}: decompressed pixels differ from the source's")
    return {"modality": "CT", "study": study, "series": series, "files": len(list(out.iterdir()))}


def write_mr_series(volume: Path, out: Path, name: str, description: str) -> dict:
    """A DICOM MR series (MR Image Storage, one file per slice) from a volume: its voxels, spacing, origin
    and direction; headers generated."""
    out.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(volume))
    pixels = sitk.GetArrayFromImage(image)  # [z, y, x]
    low, high = float(pixels.min()), float(pixels.max())
    if low < -32768 or high > 32767 or not np.allclose(pixels, np.round(pixels)):
        raise SystemExit(f"{volume}: voxel values do not fit signed 16-bit integers")
    pixels = pixels.astype(np.int16)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)  # columns: index axes in LPS
    spacing = image.GetSpacing()
    study, series, frame = uid(name, "study"), uid(name, "series"), uid(name, "frame")
    for k in range(pixels.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = uid(name, "instance", str(k))
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientSex, ds.PatientBirthDate = "Sample^MR", f"DLS-{name}", "O", ""
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.StudyDescription, ds.SeriesDescription = description, f"{name} (from {volume.name})"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 1, k + 1
        ds.Manufacturer, ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = \
            "De-LightSAM sample", "SE", "NONE", "", "2D"
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ImagePositionPatient = [float(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # row spacing (y), column spacing (x)
        ds.SliceThickness = float(spacing[2])
        ds.SliceLocation = float(np.dot(ds.ImagePositionPatient, np.cross(direction[:, 0], direction[:, 1])))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.WindowCenter, ds.WindowWidth = (low + high) / 2, max(high - low, 1.0)
        ds.PixelData = pixels[k].tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(out / f"MR.{k + 1:04d}.dcm", write_like_original=False)
    return {"modality": "MR", "study": study, "series": series, "files": pixels.shape[0]}


def prepare_series(data: Path, out: Path) -> dict[str, dict]:
    if not (data / "samples" / "ts_ct_dicom").is_dir():
        raise SystemExit(f"no sample data in {data}: run `make samples` first")
    series = {"ct": prepare_ct(data / "samples" / "ts_ct_dicom", out / "ct"),
              "mr": write_mr_series(data / "studies" / "radiomics_brain1.nrrd", out / "mr", "radiomics_brain1",
                                    "De-LightSAM sample MR (pyradiomics brain1)")}
    (out / "series.json").write_text(json.dumps(series, indent=1))
    return series


# ---- Orthanc --------------------------------------------------------------------------------------
def http(method: str, url: str, body: bytes | None = None, content_type: str = "application/json", timeout=30):
    request = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return json.loads(reply.read() or b"null")


def wait_for(url: str, process: subprocess.Popen, what: str, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                tail = log.read_text()[-3000:] if log.exists() else ""
                raise SystemExit(f"{what} did not start (see {log}):\n{tail}")
            time.sleep(0.5)


def start_orthanc(work: Path, port: int, processes: list[subprocess.Popen]) -> str:
    """Orthanc in a loopback-only network namespace, reachable on 127.0.0.1:port through socat. Each process
    joins ``processes`` as soon as it starts, so that a failed start stops it too."""
    storage, sock, log = work / "orthanc-db", work / "orthanc.sock", work / "orthanc.log"
    if any(c in str(sock.resolve()) for c in ",:!\"\'; "):
        raise SystemExit(f"--work {work}: socat addresses cannot carry , : ! quotes ; or spaces; choose another folder")
    storage.mkdir(parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    config = work / "orthanc.json"
    config.write_text(CONFIG.read_text().replace("@STORAGE@", str(storage.resolve())).replace("@PORT@", str(port)))
    with open(log, "w") as out:
        processes.append(subprocess.Popen(orthanc_command(work), stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        processes.append(subprocess.Popen(["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork",
                                           f"UNIX-CONNECT:{sock.resolve()}"],
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/system", processes[-2], "Orthanc", log, timeout=60)
    return url


def orthanc_command(work: Path) -> list[str]:
    """Orthanc and the socat that carries its port out of the namespace: the same command restarts it on the
    same storage (ready.json's ``orthanc_command``; the outer socat stays)."""
    sock, config = (work / "orthanc.sock").resolve(), (work / "orthanc.json").resolve()
    inside = (f"ip link set lo up && socat UNIX-LISTEN:{sock},fork,unlink-early TCP:127.0.0.1:8042 & "
              f"exec {ORTHANC} {shlex.quote(str(config))}")
    return ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", inside]


def upload(orthanc_url: str, folder: Path) -> int:
    stored = 0
    for f in sorted(folder.glob("*.dcm")):
        reply = http("POST", f"{orthanc_url}/instances", f.read_bytes(), "application/dicom")
        stored += reply.get("Status") in ("Success", "AlreadyStored")
    return stored


# ---- the app --------------------------------------------------------------------------------------
def start_app(work: Path, orthanc_url: str, port: int, conf: list[str], processes: list[subprocess.Popen]) -> str:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",  # monailabel runs `python`
           "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "dicomweb-cache"),
           "MONAI_LABEL_SESSION_PATH": str(work / "sessions"),
           "MONAI_LABEL_DICOMWEB_CACHE_EXPIRY": "5",  # labels saved in the viewer count at once
           "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": json.dumps({"Modality": "CT"})}  # the app lists MR too (main.py)
    log = work / "monailabel.log"
    with open(log, "w") as out:
        processes.append(subprocess.Popen([str(bindir / "monailabel"), "start_server", "--app", str(ROOT / "apps" / "delightsam"),
                                "--studies", f"{orthanc_url}/dicom-web", "--conf", "models", "delightsam",
                                "--conf", "model_dir", str(work / "model"), *conf,
                                "--host", "127.0.0.1", "--port", str(port)],
                               stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    url = f"http://127.0.0.1:{port}"
    wait_for(f"{url}/info/", processes[-1], "MONAI Label", log, timeout=240)
    return url


def stop(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in processes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="where `make samples` put the samples")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "pacs", help="Orthanc's storage, logs, caches")
    parser.add_argument("--port", type=int, default=8000, help="the app (and OHIF at /ohif/)")
    parser.add_argument("--orthanc-port", type=int, default=8042)
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument("--install-only", action="store_true", help="install what is missing, then exit")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="extra --conf for the app")
    args = parser.parse_args()
    if args.install_only:  # `make system`: without root, say so; the PACS tests then skip (and fail under CI)
        try:
            ensure_packages(install=True)
        except SystemExit as e:
            print(f"warning: {e}", file=sys.stderr)
        return 0
    ensure_packages(install=not args.no_install)
    args.work.mkdir(parents=True, exist_ok=True)
    series = prepare_series(args.data, args.work / "series")
    processes: list[subprocess.Popen] = []
    stopping = []

    def on_signal(signum, frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also when started in the background, where SIGINT is ignored
    try:
        orthanc_url = start_orthanc(args.work, args.orthanc_port, processes)
        orthanc = processes[0]
        for kind, info in series.items():
            stored = upload(orthanc_url, args.work / "series" / kind)
            print(f"Orthanc holds the {info['modality']} series {info['series']} ({stored} files)", flush=True)
        url = start_app(args.work, orthanc_url, args.port, [a for kv in args.conf for a in ("--conf", *kv)], processes)
        app = processes[-1]
        (args.work / "ready.json").write_text(json.dumps({"app": url, "orthanc": orthanc_url, "series": series,
                                                          "orthanc_pid": orthanc.pid,
                                                          "orthanc_command": orthanc_command(args.work)}))
        print(f"\nOHIF viewer: {url}/ohif/   (MONAI Label mode: {url}/ohif/monai-label?StudyInstanceUIDs="
              f"{series['ct']['study']})\nOrthanc: {orthanc_url}/app/explorer.html   DICOMweb: {orthanc_url}/dicom-web\n"
              f"Logs: {args.work}/orthanc.log, {args.work}/monailabel.log. Ctrl-C stops both.", flush=True)
        warned = False
        while app.poll() is None:  # if Orthanc goes away the app stays up and says so on each request
            if orthanc.poll() is not None and not warned:
                print(f"Orthanc exited (see {args.work}/orthanc.log); the app goes on without its PACS", file=sys.stderr)
                warned = True
            time.sleep(1)
        print(f"MONAI Label exited; see {args.work}/monailabel.log", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping MONAI Label and Orthanc", flush=True)
        return 0
    finally:
        stop(processes[::-1])
        (args.work / "ready.json").unlink(missing_ok=True)
        (args.work / "orthanc.sock").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
