"""Fault injection on a real server: SIGKILL in the middle of saving a label and in the middle of publishing a
trained model. After a restart the datastore and the served model are each the old or the new one, never torn,
and the server works."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests

import delightsam
from helpers import make_test_checkpoint, running_server, studies_folder

pytestmark = pytest.mark.server

QUICK = {"max_epochs": 1, "steps_per_epoch": 2, "train_batch_size": 2, "teacher": "none", "tracking": "none",
         "name": "quick"}


@pytest.fixture
def setup(tmp_path, samples):
    studies = studies_folder(tmp_path, samples, ["ts_ct_small.nii.gz"])
    checkpoint = make_test_checkpoint(tmp_path / "models" / "delightsam.safetensors", version="configured")
    conf = ["--conf", "checkpoint", str(checkpoint), "--conf", "model_dir", str(tmp_path / "model"),
            "--conf", "modality", "ct"]
    return {"tmp": tmp_path, "studies": studies, "conf": conf, "label": samples / "samples" / "labels" / "ts_ct_small.nii.gz"}


def _kill_tree(pid: int) -> None:
    parent = psutil.Process(pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _kill_when(folder: Path, pattern: str, pid: int, timeout: float = 300) -> bool:
    """SIGKILLs the server (and its training subprocess) as soon as a file matching ``pattern`` appears in
    ``folder``: the moment a write is under way. False if none appeared."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if folder.is_dir() and any(folder.glob(pattern)):
            _kill_tree(pid)
            return True
    return False


def _save(url: str, data: bytes, params: dict | None = None) -> int | None:
    """The status of saving ``data`` as the final label of ts_ct_small; None if the server died under it."""
    try:
        reply = requests.put(f"{url}/datastore/label", params={"image": "ts_ct_small", "tag": "final"},
                             files={"label": ("ts_ct_small.nii.gz", data)}, data={"params": json.dumps(params or {})},
                             timeout=300)
    except requests.ConnectionError:
        return None
    assert reply.status_code == 200, reply.text[:300]
    return reply.status_code


def _own_label(url: str) -> bytes:
    """The model's own label of the image (its label ids), to be saved as the final label that trains."""
    reply = requests.post(f"{url}/infer/delightsam_ct", params={"image": "ts_ct_small", "output": "image"},
                          data={"params": json.dumps({"result_extension": ".nii.gz"})}, timeout=300)
    reply.raise_for_status()
    return reply.content


def _liver(source: Path, folder: Path, padding_mb: int = 0) -> bytes:
    """The reference liver of the image as value 1, as a NIfTI file's bytes; ``padding_mb`` of random bytes in a
    header extension make a valid label large enough that its save can be killed in the middle."""
    reference = nib.load(source)
    image = nib.Nifti1Image((np.asarray(reference.dataobj) == 5).astype(np.uint8), reference.affine)
    if padding_mb:
        image.header.extensions.append(nib.nifti1.Nifti1Extension(6, os.urandom(padding_mb * 2**20)))
    path = folder / f"liver_{padding_mb}.nii.gz"
    nib.save(image, path)
    return path.read_bytes()


LIVER = {"label_info": [{"name": "liver", "idx": 1}]}


def test_killed_while_saving_a_label_the_label_is_old_or_new(setup):
    old = _liver(setup["label"], setup["tmp"])
    new = _liver(setup["label"], setup["tmp"], padding_mb=96)  # large, so that the save takes long to be killed in
    final = setup["studies"] / "labels" / "final"
    with running_server(setup["tmp"], setup["studies"], setup["conf"]) as (url, proc):
        _save(url, old, LIVER)
        assert (final / "ts_ct_small.nii.gz").read_bytes() == old
        saver = threading.Thread(target=_save, args=(url, new, LIVER))
        saver.start()
        assert _kill_when(final, ".ts_ct_small.nii.gz.*.tmp", proc.pid), "the save was never seen under way"
        saver.join(60)
    assert (final / "ts_ct_small.nii.gz").read_bytes() in (old, new)  # whole, one or the other
    index = json.loads((setup["studies"] / "datastore_v2.json").read_text())  # a whole index
    assert "final" in index["objects"]["ts_ct_small"]["labels"]
    with running_server(setup["tmp"], setup["studies"], setup["conf"]) as (url, _):
        listed = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=60).json()
        assert "final" in listed["objects"]["ts_ct_small"]["labels"]
        assert requests.get(f"{url}/datastore/label", params={"label": "ts_ct_small", "tag": "final"},
                            timeout=60).content in (old, new)
        reply = requests.post(f"{url}/infer/delightsam_ct", params={"image": "ts_ct_small", "output": "json"},
                              data={"params": "{}"}, timeout=300)
        assert reply.status_code == 200


@pytest.mark.slow
def test_killed_while_publishing_the_served_model_is_old_or_new(setup):
    model_dir = setup["tmp"] / "model"
    with running_server(setup["tmp"], setup["studies"], setup["conf"]) as (url, proc):
        _save(url, _own_label(url))
        requests.post(f"{url}/train/delightsam", json=QUICK, timeout=60).raise_for_status()
        # the version is written first, then the served copy: kill during either
        assert _kill_when(model_dir / "versions", ".delightsam-*.tmp", proc.pid), "the publish was never seen"
    published = model_dir / "published.safetensors"
    assert not published.exists()  # killed before the served copy was begun: the configured model serves
    versions = list((model_dir / "versions").glob("delightsam-*.safetensors"))
    assert versions == []  # the version being written never became a file of that name
    with running_server(setup["tmp"], setup["studies"], setup["conf"]) as (url, proc):
        reply = requests.post(f"{url}/infer/delightsam_ct", params={"image": "ts_ct_small", "output": "json"},
                              data={"params": "{}"}, timeout=300)
        assert reply.status_code == 200 and reply.json()["model_version"] == "configured"
        # a second run publishes while a kill lands on the served copy's write
        requests.post(f"{url}/train/delightsam", json={**QUICK, "name": "again"}, timeout=60).raise_for_status()
        assert _kill_when(model_dir, ".published.safetensors.*.tmp", proc.pid), "the served copy was never seen"
    # the kill lands on the served copy's write, or just after its rename: the old model or the new one, whole
    served = delightsam.load_model(published).config.version if published.exists() else "configured"
    assert served == "configured" or served.startswith("delightsam-"), served
    with running_server(setup["tmp"], setup["studies"], setup["conf"]) as (url, _):
        reply = requests.post(f"{url}/infer/delightsam_ct", params={"image": "ts_ct_small", "output": "json"},
                              data={"params": "{}"}, timeout=300)
        assert reply.status_code == 200
        assert reply.json()["model_version"] == served  # what the file holds is what is served
