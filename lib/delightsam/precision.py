"""The number format of the networks' matrix products at inference: float32, or bfloat16 where the CPU computes it
natively.

CPUs with AMX or AVX-512 BF16 (Intel Xeon since Sapphire Rapids and Cooper Lake, AMD Zen 4 and later) multiply
bfloat16 matrices at about twice float32's rate; elsewhere bfloat16 is emulated and slower, so ``auto`` (the
default) uses it only there. The products run under ``torch.autocast`` (convolutions, linear layers and attention in
bfloat16, their results accumulated in float32 by oneDNN; the networks' outputs are taken back to float32), as
OpenVINO and ONNX Runtime do by default on such CPUs. The model card measures both on the same volumes.
"""

from __future__ import annotations

import contextlib
import functools
import platform

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


@functools.cache  # asked on every batch (``products_in``); a CPU's instructions do not change
def native_bfloat16() -> bool:
    """Whether this machine's CPU multiplies bfloat16 matrices natively (x86 AMX or AVX-512 BF16)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def resolve(precision: str, device: torch.device | str = "cpu") -> str:
    """``precision`` ("auto", "float32" or "bfloat16") as what runs on ``device``: "auto" is bfloat16 on a CPU that
    computes it natively, float32 elsewhere (a GPU keeps float32: its speed is not this setting's concern)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return "bfloat16" if torch.device(device).type == "cpu" and native_bfloat16() else "float32"


def products_in(precision: str, device: torch.device | str = "cpu"):
    """A context in which the networks' products run in ``precision`` (as ``resolve`` takes it on ``device``)."""
    if resolve(precision, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
