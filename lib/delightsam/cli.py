"""The ``delightsam`` command: convert released checkpoints, describe a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_model, load_released, save_model
from .config import RELEASED_MODALITIES


def _split_spec(spec: str) -> tuple[str, str | None]:
    """'ESP_isic_best.pth:dermoscopy' -> (path, modality); a bare path -> (path, None)."""
    path, sep, modality = spec.rpartition(":")
    if sep and modality in {name for name, _ in RELEASED_MODALITIES}:
        return path, modality
    return spec, None


def convert(args: argparse.Namespace) -> int:
    specs = [_split_spec(s) for s in args.checkpoints]
    paths = [p for p, _ in specs]
    given = [m for _, m in specs]
    if any(given) and not all(given):
        raise CheckpointError("give a modality for every checkpoint or for none (PATH:MODALITY)")
    modalities = given if all(given) else None
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = load_released(paths, modalities, **overrides)
    model.config.version = args.version
    save_model(model, args.output, half=args.half)
    print(f"wrote {args.output}: modalities {', '.join(model.config.modality_names)}; "
          f"controllers {', '.join(model.config.controller_names)}")
    return 0


def _modality_spec(spec: str) -> tuple[str, list[tuple[str, int]]]:
    """'ct:liver=1,spleen=2' or 'ct:liver,spleen' -> ('ct', [('liver', 1), ('spleen', 2)])."""
    name, sep, structures = spec.partition(":")
    if not sep or not name or not structures:
        raise ValueError(f"--modality wants NAME:STRUCTURE[=ID],..., got {spec!r}")
    pairs = []
    for i, item in enumerate(structures.split(",")):
        label, eq, number = item.partition("=")
        pairs.append((label.strip(), int(number) if eq else i + 1))
    return name.strip().lower(), pairs


def init(args: argparse.Namespace) -> int:
    """An untrained model with the given modalities and structures: the starting point of training."""
    from .config import DeLightSAMConfig
    from .model import DeLightSAM
    from .geometry import DEFAULT_INTENSITY

    torch.manual_seed(args.seed)
    model = DeLightSAM(DeLightSAMConfig(img_size=args.img_size, version=args.version,
                                        description="untrained De-LightSAM (delightsam init)"))
    for spec in args.modality:
        name, pairs = _modality_spec(spec)
        model.add_modality(name, pairs, intensity=DEFAULT_INTENSITY.get(name))
    save_model(model, args.output, half=args.half)
    print(f"wrote {args.output}: untrained, input {args.img_size}, modalities {', '.join(model.config.modality_names)}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    """Training outside the server over a folder of volumes and a folder of label maps with the same names;
    the code path of the app's train task. Under torchrun, every process trains on its share of each batch."""
    import os

    import torch.distributed as dist

    from .teachers import init_trunk_from
    from .losses import LossWeights
    from .training import TrainConfig, train
    from .training_data import TrainItem
    from .versions import publish_version, update_split

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    images = sorted(p for p in Path(args.images).iterdir() if not p.name.startswith("."))
    items = []
    for image in images:
        label = Path(args.labels) / image.name
        if not label.exists():
            raise ValueError(f"no label for {image.name} in {args.labels} (labels need the image's file name)")
        items.append(TrainItem(_image_stem(image), str(image), str(label), args.modality))
    if not items:
        raise ValueError(f"no images in {args.images}")
    output = Path(args.output)
    split = update_split(output / "split.json", [i.id for i in items], args.val_fraction)
    model = load_model(args.checkpoint)
    if args.init_trunk:
        loaded, skipped = init_trunk_from(model, args.init_trunk)
        print(f"trunk from {args.init_trunk}: {len(loaded)} tensors loaded, {len(skipped)} kept ({', '.join(skipped)})")
    config = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size, lr=args.lr,
                         trainable=args.trainable, teacher=None if args.teacher == "none" else args.teacher,
                         cache_dir=args.cache_dir, seed=args.seed, tracking=args.tracking,
                         loss=LossWeights(args.distill_weight, args.segmentation_weight, args.patch_weight))
    stats = train(model, [i for i in items if split[i.id] == "train"], [i for i in items if split[i.id] == "val"],
                  config, output, publish=lambda m, metrics: publish_version(m, metrics, output / "versions", args.publish),
                  log=print)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"done: best validation Dice {stats.get('best_metric', 0):.4f} (before {stats['before']['mean_dice']:.4f}), "
              f"{stats['slices_per_second']:.2f} slices/s; published {stats['published'][-1] if stats['published'] else 'nothing'}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _image_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        name = name.removesuffix(suffix)
    return name


def evaluation_cases(spec: str):
    """'ct:IMAGES:LABELS' -> cases: every volume (or DICOM series folder) in IMAGES with the label map of the
    same name (or NAME.nii.gz for a series folder) in LABELS."""
    from .evaluation import Case

    modality, sep, rest = spec.partition(":")
    images, sep2, labels = rest.partition(":")
    if not (sep and sep2 and modality and images and labels):
        raise ValueError(f"--data wants MODALITY:IMAGES_DIR:LABELS_DIR, got {spec!r}")
    cases = []
    for image in sorted(p for p in Path(images).iterdir() if not p.name.startswith(".")):
        candidates = [Path(labels) / image.name, Path(labels) / f"{_image_stem(image)}.nii.gz"]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            raise ValueError(f"no label for {image} in {labels} (looked for {', '.join(c.name for c in candidates)})")
        cases.append(Case(_image_stem(image), str(image), str(label), modality.lower()))
    if not cases:
        raise ValueError(f"no volumes in {images}")
    return cases


def evaluate_command(args: argparse.Namespace) -> int:
    """Dice / HD95 per structure and volume, times and overlay figures for one or more checkpoints, and
    optionally the peers, on folders of labelled volumes: the report's markdown, JSON and PNGs in --output."""
    from .evaluation import DeLightSAMMethod, GuidedMethod, UNetMethod, evaluate

    methods = []
    for c in args.checkpoint:
        name, model = Path(c).stem if Path(c).stem != "model" else str(c), load_model(c)
        methods.append(DeLightSAMMethod(name, model, args.batch_size))
        if args.refine:
            from .foundation import foundation_model

            for prompts in args.prompts:
                methods.append(DeLightSAMMethod(f"{name} + foundation, automatic {'3-D boxes' if prompts == '3d' else 'boxes per slice'}",
                                                model, args.batch_size, foundation_model(model), prompts))
    config = methods[0].config
    if args.unet:
        from .baselines import load_unet

        net, meta = load_unet(args.unet)
        methods.append(UNetMethod(f"U-Net ({Path(args.unet).name})", net, meta, config))
    if args.lite_medsam_box:
        from .baselines import LiteMedSAMBoxNetwork

        methods.append(GuidedMethod("LiteMedSAM + box from the reference (prompted)", config,
                                    lambda spec: LiteMedSAMBoxNetwork(spec.structures)))
    cases = [c for spec in args.data for c in evaluation_cases(spec)]
    for case in cases:
        config.modality(case.modality)  # an unknown modality fails before hours of work, naming what there is
    results = evaluate(methods, {"evaluation": cases}, args.output,
                       context={"recipe": "delightsam " + " ".join(sys.argv[1:])}, progress=not args.no_progress)
    print(f"wrote {Path(args.output) / 'report.md'} ({len(cases)} volumes, {len(methods)} methods)")
    return 0 if results else 1


def atlas_command(args: argparse.Namespace) -> int:
    """Adds labelled volumes to a checkpoint's box atlas (what the second stage's context prompts use; the train
    task adds the volumes it trains on), without training; writes the checkpoint to --output."""
    from .box_atlas import update_box_atlas
    from .training_data import TrainItem, atlas_entries

    model = load_model(args.checkpoint)
    items = []
    for spec in args.case:
        modality, sep, rest = spec.partition(":")
        image, sep2, label = rest.partition(":")
        if not (sep and sep2 and modality and image and label):
            raise ValueError(f"--case wants MODALITY:IMAGE:LABEL, got {spec!r}")
        model.config.modality(modality.lower())  # an unknown modality is refused by name
        items.append(TrainItem(_image_stem(Path(image)), image, label, modality.lower()))
    entries = atlas_entries(items, model)
    update_box_atlas(model, entries)
    if args.version:
        model.config.version = args.version
    save_model(model, args.output, half=args.half)
    for name, added in entries.items():
        for e in added:
            print(f"{name} {e['id']} ({e['plane']}): {', '.join(e['boxes']) or 'no structure'}")
    print(f"wrote {args.output}")
    return 0


def info(args: argparse.Namespace) -> int:
    model = load_model(args.checkpoint)
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    controllers = {n: sum(p.numel() for p in ctl.parameters()) for n, ctl in model.encoder.controllers.items()}
    print(f"{args.checkpoint}: De-LightSAM {c.description or ''} version {c.version}")
    print(f"  input {c.img_size}x{c.img_size}, embedding {c.embedding_size}x{c.embedding_size}, "
          f"patch grid {c.patch_grid}x{c.patch_grid}; normalisation (x - {list(c.pixel_mean)}) / {list(c.pixel_std)}")
    print(f"  parameters: {total:,} (controllers: {', '.join(f'{n} {k:,}' for n, k in controllers.items())})")
    for m in c.modalities:
        structures = ", ".join(f"{s.label}={s.name}" for s in m.structures)
        print(f"  modality {m.name}: controller {m.controller}, queries {m.query_group}; labels {structures}")
        if m.box_atlas:
            print(f"    box atlas: {len(m.box_atlas)} volume(s) ({', '.join(str(e.get('id', '?')) for e in m.box_atlas)})")
    return 0


def report(args: argparse.Namespace) -> int:
    """The annotation loop's answer to "is the model getting better for us?": each version's Dice against the
    labels users saved, from the app's record (``<model_dir>/loop``)."""
    from .ledger import Ledger, report_markdown, report_plot

    folder = Path(args.model_dir) / "loop"
    if not folder.is_dir():
        raise ValueError(f"{args.model_dir} has no annotation-loop record (loop/): is it the app's model_dir "
                         f"(--conf model_dir; default apps/delightsam/model)?")
    ledger = Ledger(folder)
    text = report_markdown(ledger)
    print(text)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(text)
        (out / "report.json").write_text(json.dumps(ledger.summary(), indent=1))
        plot = report_plot(ledger, out / "dice_by_version.png")
        print(f"wrote {out / 'report.md'}, {out / 'report.json'}" + (f" and {plot}" if plot else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="delightsam", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="released per-modality checkpoint(s) -> one project checkpoint")
    p.add_argument("checkpoints", nargs="+", metavar="PATH[:MODALITY]",
                   help="released checkpoint(s); MODALITY is one of "
                        + ", ".join(n for n, _ in RELEASED_MODALITIES)
                        + " (guessed from names such as ESP_isic_best.pth when several files are given)")
    p.add_argument("-o", "--output", required=True, help="the project checkpoint to write (.safetensors)")
    p.add_argument("--img-size", type=int, help="input size to record (default 1024, as released)")
    p.add_argument("--half", action="store_true", help="store weights in float16 (half the file size)")
    p.add_argument("--version", default="released", help="model version string to record")
    p.set_defaults(func=convert)
    p = sub.add_parser("init", help="a new, untrained project checkpoint (random weights) to train from")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--modality", action="append", required=True, metavar="NAME:STRUCTURE[=ID],...",
                   help="e.g. ct:liver=1,spleen=2 (repeatable)")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--half", action="store_true")
    p.add_argument("--version", default="untrained")
    p.set_defaults(func=init)
    p = sub.add_parser("train", help="distillation fine-tuning on a folder of volumes and labels (torchrun-ready)")
    p.add_argument("--checkpoint", required=True, help="the project checkpoint to start from")
    p.add_argument("--images", required=True, help="folder of volumes (NIfTI, NRRD)")
    p.add_argument("--labels", required=True, help="folder of label maps with the images' file names")
    p.add_argument("--modality", required=True)
    p.add_argument("--output", required=True, help="run folder: split, state, statistics, versions")
    p.add_argument("--publish", help="also write each published model here (the served checkpoint)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps", type=int, default=25, help="steps per epoch")
    p.add_argument("--batch-size", type=int, default=4, help="slices per step and process")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--trainable", default="modality", choices=["controllers", "modality", "all"])
    p.add_argument("--teacher", default="lite_medsam")
    p.add_argument("--init-trunk", choices=["lite_medsam", "mobile_sam"])
    p.add_argument("--cache-dir", help="teacher-embedding cache folder (shared by runs)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking", default="tensorboard", choices=["tensorboard", "mlflow", "none"])
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--segmentation-weight", type=float, default=1.0)
    p.add_argument("--patch-weight", type=float, default=1.0)
    p.set_defaults(func=train_command)
    p = sub.add_parser("evaluate", help="Dice, HD95, times and overlays on labelled volumes, beside peers")
    p.add_argument("--checkpoint", action="append", required=True, help="a checkpoint to evaluate (repeatable)")
    p.add_argument("--data", action="append", required=True, metavar="MODALITY:IMAGES_DIR:LABELS_DIR",
                   help="volumes and their label maps in the model's label ids (repeatable)")
    p.add_argument("--output", required=True, help="report folder (report.md, report.json, figures/)")
    p.add_argument("--unet", help="also a U-Net baseline file (scripts/train_starter.py makes one)")
    p.add_argument("--lite-medsam-box", action="store_true",
                   help="also LiteMedSAM with a box per slice from the reference label (prompted)")
    p.add_argument("--refine", action="store_true",
                   help="also each checkpoint in two stages: its coarse masks as box prompts for all of LiteMedSAM")
    p.add_argument("--prompts", nargs="+", default=["3d"], choices=["3d", "slice"],
                   help="the automatic prompts of --refine: one 3-D box per structure, or a box per slice")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=evaluate_command)
    p = sub.add_parser("report", help="each model version's Dice against the labels users saved (the app's record)")
    p.add_argument("--model-dir", default="apps/delightsam/model", help="the app's model_dir")
    p.add_argument("--output", help="also write report.md, report.json and dice_by_version.png here")
    p.set_defaults(func=report)
    p = sub.add_parser("atlas", help="add labelled volumes to a checkpoint's box atlas (context prompts), no training")
    p.add_argument("checkpoint")
    p.add_argument("--case", action="append", required=True, metavar="MODALITY:IMAGE:LABEL",
                   help="a volume and its label map in the model's label ids (repeatable)")
    p.add_argument("-o", "--output", required=True, help="the checkpoint to write")
    p.add_argument("--version", help="model version string to record (default: unchanged)")
    p.add_argument("--half", action="store_true", help="store weights in float16 (as the shipped model is)")
    p.set_defaults(func=atlas_command)
    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"delightsam {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
