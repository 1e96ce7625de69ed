"""Shared fixtures: the reference fixture in ../shared/reference and small random models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

import delightsam
from delightsam import DeLightSAM, released_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DELIGHTSAM_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE / "reference_random_state_dict.pth").is_file():
        if os.environ.get("CI"):
            pytest.fail(f"the reference fixture is missing from {REFERENCE}")
        pytest.skip(f"no reference fixture at {REFERENCE} (set DELIGHTSAM_SHARED)")
    return REFERENCE


@pytest.fixture(scope="session")
def reference_state(reference_dir) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "reference_random_state_dict.pth", weights_only=True)


@pytest.fixture(scope="session")
def reference_outputs(reference_dir) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / "reference_outputs.pt", weights_only=True)


@pytest.fixture(scope="session")
def reference_input(reference_dir) -> torch.Tensor:
    """The fixture image as the released code feeds it: 0..255 float, channels first."""
    image = np.load(reference_dir / "input_image_uint8.npy")
    return torch.from_numpy(image).float().permute(2, 0, 1)


def small_model(img_size: int = 256, seed: int = 0) -> DeLightSAM:
    """A random released-architecture model at a small input size (fast on a CPU)."""
    torch.manual_seed(seed)
    return DeLightSAM(released_config(img_size=img_size)).eval()


def random_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
