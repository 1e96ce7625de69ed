"""The ``delightsam`` command: convert released checkpoints, describe a checkpoint."""

from __future__ import annotations

import argparse
import sys

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
    from .volume import DEFAULT_INTENSITY

    torch.manual_seed(args.seed)
    model = DeLightSAM(DeLightSAMConfig(img_size=args.img_size, version=args.version,
                                        description="untrained De-LightSAM (delightsam init)"))
    for spec in args.modality:
        name, pairs = _modality_spec(spec)
        model.add_modality(name, pairs, intensity=DEFAULT_INTENSITY.get(name))
    save_model(model, args.output, half=args.half)
    print(f"wrote {args.output}: untrained, input {args.img_size}, modalities {', '.join(model.config.modality_names)}")
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
