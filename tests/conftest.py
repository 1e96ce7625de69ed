"""Shared fixtures: the reference fixture in ../shared/reference and small random models."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import delightsam
from delightsam import DeLightSAM, released_config

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DELIGHTSAM_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
sys.path.insert(0, str(REPO / "scripts"))  # serve.py (the server launcher), pacs.py


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


# ---- the MONAI Label app -------------------------------------------------------------------------
APP_DIR = REPO / "apps" / "delightsam"
DATA = REPO / "data"


def make_test_checkpoint(path: Path, seed: int = 0, version: str = "test") -> Path:
    """A small random CT+MR checkpoint (input 256) in the project format, until the starter model lands.
    Its labels are meaningless; it exercises every path the app has."""
    torch.manual_seed(seed)
    model = DeLightSAM(delightsam.DeLightSAMConfig(img_size=256, version=version))
    model.add_modality("ct", [("liver", 1), ("spleen", 2), ("kidney", 3)], intensity={"window": [-160, 240]})
    model.add_modality("mr", [("brain", 4)], intensity={"percentiles": [0.5, 99.5]})
    return delightsam.save_model(model.eval(), path)


@pytest.fixture(scope="session")
def samples() -> Path:
    """The real sample volumes (fetched from PyPI source distributions once, then cached in data/)."""
    import subprocess
    import sys

    needed = (DATA / "studies" / "ts_ct_small.nii.gz", DATA / "samples" / "ts_ct_dicom", DATA / "samples" / "labels" / "ts_ct.nii.gz")
    if not all(p.exists() for p in needed):
        subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_samples.py")], check=True)
    return DATA


def _free_port() -> int:
    from serve import free_port

    return free_port()


@contextlib.contextmanager
def monailabel_server(tmp: Path, studies: Path | str, conf: list[str], timeout: float = 240, env: dict | None = None):
    """A real `monailabel start_server` process with this app on a free loopback port (``scripts/serve.py``);
    yields its URL and stops it afterwards. ``conf``: extra command-line arguments (``--conf KEY VALUE`` pairs)."""
    from serve import ServerFailed, running_server

    try:
        with running_server(tmp, studies, conf, timeout, env) as (url, _):
            yield url
    except ServerFailed as e:
        pytest.fail(str(e))


def studies_folder(tmp: Path, samples: Path, names: list[str]) -> Path:
    """``tmp/studies`` holding copies of these sample volumes (a datastore of the app's own)."""
    import shutil

    studies = tmp / "studies"
    studies.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(samples / "studies" / name, studies / name)
    return studies


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz with these regular files (any names, even hostile ones) and symbolic links (name -> target)."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return buffer.getvalue()


def dciodvfy_errors(path) -> list[str]:
    """The errors that dciodvfy (the DICOM IOD validator of Debian's dicom3tools) finds in a DICOM file."""
    import shutil
    import subprocess

    if not shutil.which("dciodvfy"):
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing (apt-get install dicom3tools; `make system` installs it)")
        pytest.skip("no dciodvfy: `make system` installs dicom3tools")
    found = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (found.stdout + found.stderr).splitlines() if line.startswith("Error")]
