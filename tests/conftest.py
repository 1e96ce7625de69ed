"""Fixtures: the reference fixture in ../shared/reference and the real sample volumes. What tests share otherwise
is in helpers.py (importable: pyproject.toml puts tests/, the app and scripts/ on pytest's path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from helpers import DATA, REFERENCE, REPO


def pytest_runtest_setup(item):
    """The test being set up and run (its fixtures included, module-scoped ones too), for ``helpers.require_marker``:
    a test starts a server or the PACS only under its marker."""
    helpers._current = item


def pytest_runtest_teardown(item):
    helpers._current = None


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


@pytest.fixture(scope="session")
def samples() -> Path:
    """The real sample volumes (fetched from PyPI source distributions once, then cached in data/)."""
    needed = (DATA / "studies" / "ts_ct_small.nii.gz", DATA / "samples" / "ts_ct_dicom", DATA / "samples" / "labels" / "ts_ct.nii.gz",
              *(DATA / "samples" / d / f"{head}.nii.gz" for head in ("robex_t1", "itk_t1", "trio_head")
                for d in ("", "labels")))
    if not all(p.exists() for p in needed):
        subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_samples.py")], check=True)
    return DATA
