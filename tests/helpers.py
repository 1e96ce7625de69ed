"""What the tests share: the repository's places, small random models and checkpoints, real servers (a
`monailabel start_server` process), sample studies, archives and the DICOM validator.

The test tiers (markers registered in pyproject.toml): ``server`` starts real monailabel server processes, ``pacs``
starts Orthanc (and Chromium), ``slow`` trains or segments real volumes for minutes. ``make test-fast`` runs the
rest; the README's test command runs all. A test that starts a server without its marker fails here, so the fast
tier stays fast by construction.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

import delightsam
from delightsam import DeLightSAM, released_config

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "apps" / "delightsam"
SCRIPTS = REPO / "scripts"
TESTS = REPO / "tests"
DATA = REPO / "data"
SHARED = Path(os.environ.get("DELIGHTSAM_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
STARTER = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"  # the shipped model

# the test being run (set by conftest): what ``require_marker`` reads
_current: pytest.Item | None = None


def require_marker(name: str, what: str) -> None:
    """Fails the current test if it lacks the marker of what it is about to start (its tier)."""
    if _current is not None and _current.get_closest_marker(name) is None:
        pytest.fail(f"{_current.nodeid} starts {what}: mark it @pytest.mark.{name} (tests/helpers.py)")


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a Python subprocess of a test: the app, the scripts and the tests importable, as pytest
    makes them for itself (pyproject.toml's pythonpath)."""
    paths = [str(APP_DIR), str(SCRIPTS), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


# ---- models ----------------------------------------------------------------------------------------------
def small_model(img_size: int = 256, seed: int = 0) -> DeLightSAM:
    """A random released-architecture model at a small input size (fast on a CPU)."""
    torch.manual_seed(seed)
    return DeLightSAM(released_config(img_size=img_size)).eval()


def random_images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_test_checkpoint(path: Path, seed: int = 0, version: str = "test", mr_measured: dict | None = None,
                         mr_planes: list[str] | None = None) -> Path:
    """A small random CT+MR checkpoint (input 256) in the project format. Its labels are meaningless; it exercises
    every path the app has (answers that depend on the model are tested with the shipped one). ``mr_measured``: what
    its MR model says it was measured on (``delightsam.scope``); ``mr_planes``: the planes a thin MR volume is seen in
    (``delightsam.multiplanar``)."""
    torch.manual_seed(seed)
    model = DeLightSAM(delightsam.DeLightSAMConfig(img_size=256, version=version))
    model.add_modality("ct", [("liver", 1), ("spleen", 2), ("kidney", 3)], intensity={"window": [-160, 240]})
    model.add_modality("mr", [("brain", 4)], intensity={"percentiles": [0.5, 99.5]})
    model.config.modality("mr").measured = dict(mr_measured or {})
    model.config.modality("mr").planes = list(mr_planes or [])
    model.config.modality("mr").symmetric = True  # a brain is its own mirror image (a thick series is mirrored too)
    return delightsam.save_model(model.eval(), path)


# ---- servers ---------------------------------------------------------------------------------------------
def free_port() -> int:
    from serve import free_port as port

    return port()


@contextlib.contextmanager
def monailabel_server(tmp: Path, studies: Path | str, conf: list[str], timeout: float = 240, env: dict | None = None):
    """A real `monailabel start_server` process with this app on a free loopback port (``scripts/serve.py``);
    yields its URL and stops it afterwards. ``conf``: extra command-line arguments (``--conf KEY VALUE`` pairs)."""
    with running_server(tmp, studies, conf, timeout, env) as (url, _):
        yield url


@contextlib.contextmanager
def running_server(tmp: Path, studies: Path | str, conf: list[str], timeout: float = 240, env: dict | None = None):
    """``monailabel_server`` that also yields the server's process: (url, process). monailabel scores every image of
    the datastore for Next Sample in a process of its own at start (and after each Next Sample and training): that
    is off here (``MONAI_LABEL_AUTO_UPDATE_SCORING``) unless ``env`` turns it on, as the annotation loop's tests do,
    so that it does not share the cores with what a test measures."""
    from serve import ServerFailed
    from serve import running_server as serve

    require_marker("server", "a monailabel server")
    env = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "false", **(env or {})}
    try:
        with serve(tmp, studies, conf, timeout, env) as (url, process):
            yield url, process
    except ServerFailed as e:
        pytest.fail(str(e))


# ---- files -----------------------------------------------------------------------------------------------
def studies_folder(tmp: Path, samples: Path, names: list[str]) -> Path:
    """``tmp/studies`` holding copies of these sample volumes (a datastore of the app's own)."""
    studies = tmp / "studies"
    studies.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(samples / "studies" / name, studies / name)
    return studies


def tar_bytes(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz with these regular files (any names, even hostile ones) and symbolic links (name -> target)."""
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
    if not shutil.which("dciodvfy"):
        if os.environ.get("CI"):
            pytest.fail("dciodvfy is missing (apt-get install dicom3tools; `make system` installs it)")
        pytest.skip("no dciodvfy: `make system` installs dicom3tools")
    found = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (found.stdout + found.stderr).splitlines() if line.startswith("Error")]
