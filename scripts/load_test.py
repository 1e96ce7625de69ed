"""Load test of the app on loopback: several clients infer at once while a training runs and publishes.

    python scripts/load_test.py                       # 4 clients x 10 inferences (the issue's figure)
    python scripts/load_test.py --clients 2 --requests 3 --quick-train   # the small run the tests use

A real server (`scripts/serve.py`) with the shipped model; a final label is saved for `ts_ct_small` and a
training started (it publishes a new version mid-run). Each client infers the sample volumes in turn (CT and MR
models); a poller asks `/info` every 0.1 s throughout. Afterwards every answer is checked against a single-user
run of the same model version (the version each answer names, chosen with `model_filename`): the label maps
must be identical voxel for voxel. Prints and writes (--output) the figures: answers by status, identical
labels, /info latency (p50, p95, max), inference latency, versions seen, and the server's peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
from requests_toolbelt.multipart import decoder

from serve import peak_rss_mb, running_server

ROOT = Path(__file__).resolve().parents[1]
WORK = [("delightsam_ct", "ts_ct_small"), ("delightsam_mr", "ts_mr_small"), ("delightsam_ct", "ts_ct")]
OUTPUT = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def infer(url: str, model: str, image: str, params: dict | None = None) -> tuple[int, dict, str | None, float]:
    """(status, result params, sha256 of the label voxels or None, seconds)."""
    began = time.perf_counter()
    reply = requests.post(f"{url}/infer/{model}", params={"image": image, "output": "all"},
                          data={"params": json.dumps({**OUTPUT, **(params or {})})}, timeout=900)
    seconds = time.perf_counter() - began
    if reply.status_code != 200:
        return reply.status_code, {"detail": reply.text[:300]}, None, seconds
    result, digest = {}, None
    for part in decoder.MultipartDecoder(reply.content, reply.headers["content-type"]).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        elif 'name="image"' in disposition:
            digest = label_digest(part.content)
    return 200, result, digest, seconds


def label_digest(nrrd: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as f:
        f.write(nrrd)
        f.flush()
        array = sitk.GetArrayFromImage(sitk.ReadImage(f.name))
    return hashlib.sha256(array.tobytes() + str(array.shape).encode()).hexdigest()


def save_final_label(url: str, data: Path, work: Path) -> None:
    """The reference label of ts_ct_small (in the model's ids) as a user would submit it from Slicer (segment
    names in label_info)."""
    from train_starter import prepare_labels

    label = prepare_labels(data, work)["ts_ct_small"]
    names = requests.get(f"{url}/info/", timeout=30).json()["models"]["delightsam_ct"]["labels"]
    values = sorted(set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label)))).astype(int).tolist()) - {0})
    by_id = {v: k for k, v in names.items()}
    info = {"label_info": [{"name": by_id[v], "idx": int(v)} for v in values if v in by_id]}
    reply = requests.put(f"{url}/datastore/label", params={"image": "ts_ct_small", "tag": "final"},
                         files={"label": ("ts_ct_small.nii.gz", label.read_bytes())},
                         data={"params": json.dumps(info)}, timeout=60)
    reply.raise_for_status()
    # the image's modality, as a user sets it (inference would record it too, but training starts first here)
    requests.put(f"{url}/datastore/image/info", params={"image": "ts_ct_small"},
                 data={"info": json.dumps({"modality": "ct"})}, timeout=60).raise_for_status()


def run(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="delightsam-load-"))
    studies = tmp / "studies"
    studies.mkdir()
    for _, name in WORK:
        shutil.copyfile(args.data / "studies" / f"{name}.nii.gz", studies / f"{name}.nii.gz")
    conf = ["--conf", "model_dir", str(tmp / "model"), "--conf", "infer_workers", "1",
            "--conf", "infer_queue", str(args.clients * 2)]
    answers, info_seconds, done = [], [], threading.Event()
    with running_server(tmp, studies, conf) as (url, proc):
        save_final_label(url, args.data, tmp)
        train = {"max_epochs": 1, "steps_per_epoch": 2 if args.quick_train else 20, "train_batch_size": 2,
                 "teacher": "none", "tracking": "none", "name": "load_test"}
        requests.post(f"{url}/train/delightsam", json=train, timeout=60).raise_for_status()

        def client(k: int) -> None:
            for i in range(args.requests):
                model, image = WORK[(k + i) % len(WORK)]
                status, result, digest, seconds = infer(url, model, image)
                answers.append({"client": k, "model": model, "image": image, "status": status, "seconds": seconds,
                                "version": result.get("model_version"), "digest": digest,
                                "detail": result.get("detail")})

        def poll_info() -> None:
            while not done.is_set():
                began = time.perf_counter()
                requests.get(f"{url}/info/", timeout=60).raise_for_status()
                info_seconds.append(time.perf_counter() - began)
                done.wait(0.1)

        poller = threading.Thread(target=poll_info)
        poller.start()
        clients = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        began = time.perf_counter()
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        wall = time.perf_counter() - began
        training = wait_training(url)
        done.set()
        poller.join()
        peak = peak_rss_mb(proc.pid)
        mismatches = check_against_single_user(url, answers)
    shutil.rmtree(tmp, ignore_errors=True)
    ok = [a for a in answers if a["status"] == 200]
    inference = sorted(a["seconds"] for a in ok)
    return {
        "clients": args.clients, "requests_per_client": args.requests, "wall_s": wall,
        "answers": len(answers), "by_status": {str(s): sum(a["status"] == s for a in answers)
                                               for s in sorted({a["status"] for a in answers})},
        "lost": args.clients * args.requests - len(answers),
        "identical_to_single_user": sum(1 for a in ok if a not in mismatches), "mismatches": mismatches,
        "versions": sorted({a["version"] for a in ok}), "training": training,
        "info_requests": len(info_seconds), "info_p50_s": _quantile(info_seconds, 0.5),
        "info_p95_s": _quantile(info_seconds, 0.95), "info_max_s": max(info_seconds, default=0.0),
        "inference_p50_s": _quantile(inference, 0.5), "inference_p95_s": _quantile(inference, 0.95),
        "server_peak_rss_mb": peak,
        "errors": [a for a in answers if a["status"] != 200],
    }


def wait_training(url: str, seconds: float = 1800) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        status = requests.get(f"{url}/train/", timeout=60).json()
        if status.get("status") in ("DONE", "ERROR", "STOPPED"):
            stats = requests.get(f"{url}/info/", timeout=60).json().get("train_stats", {}).get("delightsam", {})
            return {"status": status["status"], "published": stats.get("published", []),
                    "details": status.get("details", [])[-5:] if status["status"] != "DONE" else []}
        time.sleep(1)
    return {"status": "still running"}


def check_against_single_user(url: str, answers: list[dict]) -> list[dict]:
    """The answers whose labels differ from one user's request for the same image, model and model version."""
    reference, mismatches = {}, []
    for a in (a for a in answers if a["status"] == 200):
        key = (a["model"], a["image"], a["version"])
        if key not in reference:
            filename = f"{a['version']}.safetensors" if a["version"].startswith("delightsam-") else "model.safetensors"
            status, result, digest, _ = infer(url, a["model"], a["image"], {"model_filename": filename})
            assert status == 200 and result["model_version"] == a["version"], (status, result)
            reference[key] = digest
        if a["digest"] != reference[key]:
            mismatches.append(a)
    return mismatches


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10, help="inferences per client")
    parser.add_argument("--quick-train", action="store_true", help="a two-step training (publishes sooner)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "load_test.json")
    args = parser.parse_args()
    figures = run(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=1))
    print(json.dumps({k: v for k, v in figures.items() if k not in ("mismatches", "errors")}, indent=1))
    print(f"wrote {args.output}")
    return 0 if not figures["lost"] and not figures["mismatches"] and not figures["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
