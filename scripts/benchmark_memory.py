#!/usr/bin/env python
"""Memory by volume size, and volumes that lie, through /infer of a real server (the shipped model, app defaults):

- ``size``: the abdomen ts_ct resampled to 512x512xN (``--slices``): seconds, the server's peak resident memory
  during the request above its resting memory, bytes per voxel, and the app's estimate (``Pipeline.memory_mb``);
- ``lies``: the volumes of issue #30, each uploaded as a session the way 3D Slicer uploads a volume and sent to the
  CT task: a gzip bomb (1024^3 int16 zeros), a header declaring 4096^3 voxels with almost no data, zero and NaN
  pixdim, an all-zero sform without qform, and a truncated file: status, message, seconds, peak memory, and
  whether /info answers after it;
- ``raised``: the gzip bomb again, to a server whose limits admit it (``--conf max_megavoxels 1100``, and a budget
  of 20,480 MB: the estimate of a volume that size, which might hold organs everywhere): status, seconds, peak
  memory against the estimate;
- ``two``: two users sending a 512x512xN CT (``--two-slices``, default 1000) at once, the server with two inference
  workers: each one's status, seconds and Dice against the reference, and the server's peak memory;
- ``mr``: a 1 mm head with skull (Colin 27) and the same head resampled to 0.7 mm, sent to the MR task, which sees a
  volume with no axis 2.5 times the next in three planes (``multiplanar``): the same figures as ``size``, against the
  estimate with the planes' term.

The peak is VmHWM, reset before each request (``/proc/PID/clear_refs``). Prints tables, writes JSON.

    python scripts/benchmark_memory.py [--parts size lies raised two mr] [--slices 100 300] [--conf KEY VALUE ...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import SimpleITK as sitk

from benchmark_app import make_large_ct
from benchmark_extent import CHECKPOINT, reference_label
from serve import running_server

ROOT = Path(__file__).resolve().parents[1]
MB = 2 ** 20


def server_pid(proc) -> int:
    """The python process under monailabel's launcher script (or the launcher itself)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return int(children[0]) if children else proc.pid


def rss_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def infer(url: str, params: dict, files=None, session: str | None = None, image: str | None = None,
          model: str = "delightsam_ct"):
    query = {"output": "image"}
    if session:
        query["session_id"] = session
    if image:
        query["image"] = image
    began = time.perf_counter()
    reply = requests.post(f"{url}/infer/{model}", params=query, data={"params": json.dumps(params)},
                          files=files, timeout=3600)
    return reply, time.perf_counter() - began


# ---- volumes that lie ----------------------------------------------------------------------------------
def gzip_bomb(path: Path, side: int = 1024, depth: int | None = None) -> Path:
    """A valid NIfTI of side x side x depth (default: side) int16 zeros, written as a stream (a few MB on disk)."""
    header = nib.Nifti1Header()
    header.set_data_shape((side, side, depth or side))
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    zeros = bytes(side * side * 2)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header.binaryblock + b"\0" * 4)
        for _ in range(depth or side):
            f.write(zeros)
    return path


def liar(path: Path) -> Path:
    """A header declaring 4096^3 int16 voxels with almost no data behind it."""
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 4096))
    header.set_data_dtype(np.int16)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + bytes(4096))
    return path


def edited(source: Path, path: Path, edit) -> Path:
    """A real CT with its header edited by ``edit(header)``."""
    image = nib.load(source)
    out = nib.Nifti1Image(np.asarray(image.dataobj), None, image.header)
    edit(out.header)  # after the image is made: nibabel would mend the header it is given
    nib.save(out, path)
    return path


def zero_pixdim(header) -> None:
    header["pixdim"][1:4] = 0


def nan_pixdim(header) -> None:
    header["pixdim"][1:4] = np.nan


def singular(header) -> None:
    header.set_sform(np.zeros((4, 4)), code=1)
    header.set_qform(None, code=0)


def truncated(source: Path, path: Path) -> Path:
    """An uncompressed NIfTI cut in the middle of its voxels."""
    image = nib.load(source)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def lying_volumes(data: Path, tmp: Path) -> list[tuple[str, Path]]:
    small = data / "studies" / "ts_ct_small.nii.gz"
    return [("gzip bomb: 1024^3 int16 zeros", gzip_bomb(tmp / "bomb.nii.gz")),
            ("header 4096^3, almost no data", liar(tmp / "liar.nii.gz")),
            ("pixdim 0", edited(small, tmp / "pixdim0.nii.gz", zero_pixdim)),
            ("pixdim NaN", edited(small, tmp / "pixdim_nan.nii.gz", nan_pixdim)),
            ("all-zero sform, no qform", edited(small, tmp / "singular.nii.gz", singular)),
            ("truncated .nii", truncated(small, tmp / "truncated.nii"))]


def lies_rows(url: str, pid: int, data: Path, tmp: Path) -> list[dict]:
    rows = []
    for name, path in lying_volumes(data, tmp):
        reset_peak(pid)
        rest = rss_mb(pid, "VmRSS")
        with open(path, "rb") as f:  # uploaded as a session, as Slicer uploads a volume
            session = requests.put(f"{url}/session/", files={"files": (path.name, f)}, timeout=600)
        if session.status_code != 200:
            reply, seconds = session, 0.0
        else:
            reply, seconds = infer(url, {}, session=session.json()["session_id"])
        detail = reply.json().get("detail", "") if reply.headers.get("content-type", "").startswith("application/json") \
            else f"{len(reply.content)} bytes of label"
        rows.append({"volume": name, "wire_mb": path.stat().st_size / MB, "status": reply.status_code,
                     "detail": str(detail)[:160], "seconds": seconds, "peak_mb": rss_mb(pid, "VmHWM"),
                     "above_rest_mb": rss_mb(pid, "VmHWM") - rest,
                     "info_after": requests.get(f"{url}/info/", timeout=60).status_code})
        print(f"| {name} | {rows[-1]['wire_mb']:.1f} | {reply.status_code} | {rows[-1]['detail']} | {seconds:.1f} | "
              f"{rows[-1]['peak_mb']:.0f} | {rows[-1]['info_after']} |", flush=True)
    return rows


# ---- memory by size, and two users ---------------------------------------------------------------------
def estimate_mb(voxels: int, itemsize: int = 2, modality: str = "ct", fused_structures: int = 0) -> float | None:
    try:
        from delightsam.pipeline import Pipeline
    except ImportError:
        return None
    pipeline = Pipeline(["ct"])
    return pipeline.memory_mb(modality, voxels, itemsize, fused_structures) if hasattr(pipeline, "memory_mb") else None


def size_rows(url: str, pid: int, studies: Path, slices: list[int]) -> list[dict]:
    return [size_row(url, pid, f"abdomen_ct_512x512x{n}", f"512x512x{n}", 512 * 512 * n, estimate_mb(512 * 512 * n))
            for n in slices]


def size_row(url: str, pid: int, name: str, size: str, voxels: int, estimate: float | None,
             model: str = "delightsam_ct") -> dict:
    """One volume of the datastore sent warm: seconds, resting and peak memory, against ``estimate``."""
    infer(url, {}, image=name, model=model)  # the model (and the refiner) are loaded and warm
    reset_peak(pid)
    rest = rss_mb(pid, "VmRSS")
    reply, seconds = infer(url, {}, image=name, model=model)
    reply.raise_for_status()
    above = rss_mb(pid, "VmHWM") - rest
    row = {"size": size, "seconds": seconds, "rest_mb": rest, "peak_mb": rss_mb(pid, "VmHWM"), "above_rest_mb": above,
           "bytes_per_voxel": above * MB / voxels, "estimate_mb": estimate}
    shown = f"{estimate:.0f}" if estimate else "-"
    print(f"| {size} | {seconds:.1f} | {rest:.0f} | {row['peak_mb']:.0f} | {above:.0f} | {row['bytes_per_voxel']:.1f} | "
          f"{shown} |", flush=True)
    return row


def mr_heads(data: Path, studies: Path) -> list[tuple[str, int, int]]:
    """Colin 27 (1 mm) and the same head resampled to 0.7 mm (linear) in the datastore: (name, voxels, itemsize)."""
    from scipy import ndimage

    head = nib.load(data / "samples" / "colin27_t1.nii.gz")
    fine = ndimage.zoom(np.asarray(head.dataobj, dtype=np.float32), 1 / 0.7, order=1)
    nib.save(nib.Nifti1Image(fine, head.affine @ np.diag([0.7, 0.7, 0.7, 1.0])), studies / "colin27_0.7mm.nii.gz")
    shutil.copy(data / "samples" / "colin27_t1.nii.gz", studies / "colin27_1mm.nii.gz")
    headers = {name: nib.load(studies / f"{name}.nii.gz").header for name in ("colin27_1mm", "colin27_0.7mm")}
    return [(name, int(np.prod(h.get_data_shape())), h.get_data_dtype().itemsize) for name, h in headers.items()]


def mr_rows(url: str, pid: int, heads: list[tuple[str, int, int]]) -> list[dict]:
    structures = len(requests.get(f"{url}/info/", timeout=60).json()["models"]["delightsam_mr"]["labels"])
    return [size_row(url, pid, name, name, voxels, estimate_mb(voxels, itemsize, "mr", structures), "delightsam_mr")
            for name, voxels, itemsize in heads]


def dice(label: np.ndarray, reference: np.ndarray, ids) -> dict:
    return {i: round(2 * float(((label == i) & (reference == i)).sum()) / max(float((label == i).sum() + (reference == i).sum()), 1), 4)
            for i in ids}


def two_users(url: str, pid: int, studies: Path, reference: Path, n: int, tmp: Path) -> dict:
    name = f"abdomen_ct_512x512x{n}"
    reset_peak(pid)
    outcome = {}

    def user(k: int) -> None:
        reply, seconds = infer(url, {"result_extension": ".nii.gz"}, image=name)
        outcome[k] = (reply, seconds)

    threads = [threading.Thread(target=user, args=(k,)) for k in (0, 1)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    waited = 0
    while any(t.is_alive() for t in threads):
        waited = max(waited, requests.get(f"{url}/info/", timeout=60).json()["inference"].get("waiting_for_memory", 0))
        time.sleep(1)
    wall = time.perf_counter() - began
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(reference)))
    users = []
    for k in (0, 1):
        reply, seconds = outcome[k]
        row = {"status": reply.status_code, "seconds": seconds}
        if reply.status_code == 200:
            out = tmp / f"user{k}.nii.gz"
            out.write_bytes(reply.content)
            label = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
            row["dice"] = dice(label, truth, (1, 2, 5))  # liver, spleen, stomach
        else:
            row["detail"] = reply.text[:200]
        users.append(row)
    result = {"size": f"512x512x{n}", "wall_s": wall, "peak_mb": rss_mb(pid, "VmHWM"), "users": users,
              "one_waited_for_memory": bool(waited), "estimate_mb": estimate_mb(512 * 512 * n)}
    print(json.dumps(result, indent=1), flush=True)
    return result


def raised_bomb(url: str, pid: int, tmp: Path) -> dict:
    """The gzip bomb to a server whose limits admit it: answered, within its estimate?"""
    path = gzip_bomb(tmp / "bomb_raised.nii.gz")
    infer(url, {}, image="abdomen_ct_512x512x100")  # the model loaded, as on a server in use
    reset_peak(pid)
    rest = rss_mb(pid, "VmRSS")
    with open(path, "rb") as f:
        session = requests.put(f"{url}/session/", files={"files": (path.name, f)}, timeout=600).json()["session_id"]
    reply, seconds = infer(url, {"result_extension": ".nii.gz"}, session=session)
    found = None
    if reply.status_code == 200:
        out = tmp / "bomb_label.nii.gz"
        out.write_bytes(reply.content)
        label = nib.load(out)
        found = {"shape": list(label.shape), "labelled_voxels": int(np.count_nonzero(np.asarray(label.dataobj)))}
    result = {"status": reply.status_code, "seconds": seconds, "rest_mb": rest, "peak_mb": rss_mb(pid, "VmHWM"),
              "above_rest_mb": rss_mb(pid, "VmHWM") - rest, "estimate_mb": estimate_mb(1024 ** 3), "label": found,
              "detail": reply.text[:200] if reply.status_code != 200 else None}
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--parts", nargs="+", choices=("size", "lies", "raised", "two", "mr"),
                        default=["size", "lies", "raised", "two"])
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 300])
    parser.add_argument("--two-slices", type=int, default=1000)
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="more server --conf (the server runs with infer_workers 2)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "memory.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="delightsam-memory-"))
    studies = tmp / "studies"
    studies.mkdir()
    sizes = sorted(set(args.slices if "size" in args.parts else []) | ({args.two_slices} if "two" in args.parts else set())
                   | ({100} if "raised" in args.parts else set()))
    for n in sizes:
        make_large_ct(args.data, studies, n, "ts_ct")
    heads = mr_heads(args.data, studies) if "mr" in args.parts else []
    conf = ["--conf", "checkpoint", str(CHECKPOINT), "--conf", "infer_workers", "2",
            *(x for key, value in args.conf for x in ("--conf", key, value))]
    results = {"conf": conf}
    with running_server(tmp, studies, conf) as (url, proc):
        pid = server_pid(proc)
        if "size" in args.parts:
            print("\n| volume | warm s | resting MB | peak MB | above rest MB | bytes/voxel | estimate MB |\n|---|---|---|---|---|---|---|")
            results["size"] = size_rows(url, pid, studies, args.slices)
        if "lies" in args.parts:
            print("\n| volume | on the wire MB | status | message | s | server peak MB | /info after |\n|---|---|---|---|---|---|---|")
            results["lies"] = lies_rows(url, pid, args.data, tmp)
        if "two" in args.parts:
            image = next(studies.glob(f"*512x512x{args.two_slices}.nrrd"))
            reference = reference_label(args.data, image, tmp / "reference.nrrd")
            infer(url, {}, image=image.name.removesuffix(".nrrd"))  # warm (one user)
            results["two"] = two_users(url, pid, studies, reference, args.two_slices, tmp)
        if "mr" in args.parts:
            print("\n| MR head | warm s | resting MB | peak MB | above rest MB | bytes/voxel | estimate MB |\n|---|---|---|---|---|---|---|")
            results["mr"] = mr_rows(url, pid, heads)
    if "raised" in args.parts:
        raised = conf + ["--conf", "max_megavoxels", "1100", "--conf", "memory_budget_mb", "20480"]
        (tmp / "raised").mkdir()
        with running_server(tmp / "raised", studies, raised) as (url, proc):
            results["raised"] = raised_bomb(url, server_pid(proc), tmp)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
