"""The ``delightsam`` command: convert released checkpoints, describe a checkpoint."""

from __future__ import annotations

import argparse
import sys

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
