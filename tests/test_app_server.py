"""Integration: a real `monailabel start_server` process on a loopback port, driven the way the 3D Slicer
plugin drives it, with monailabel's own client."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException

import delightsam
from conftest import make_test_checkpoint, monailabel_server

SLICER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # what the Slicer plugin asks for


@pytest.fixture(scope="module")
def server(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("server")
    studies = tmp / "studies"
    studies.mkdir()
    shutil.copyfile(samples / "studies" / "ts_ct_small.nii.gz", studies / "ts_ct_small.nii.gz")
    checkpoint = make_test_checkpoint(tmp / "models" / "delightsam.safetensors")
    with monailabel_server(tmp, studies, ["--conf", "checkpoint", str(checkpoint),
                                          "--conf", "model_dir", str(tmp / "model")]) as url:
        yield {"url": url, "tmp": tmp, "studies": studies, "samples": samples}


def _same_grid(label_path, image_path):
    label, image = sitk.ReadImage(str(label_path)), sitk.ReadImage(str(image_path))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    assert label.GetPixelID() == sitk.sitkUInt8
    return sitk.GetArrayFromImage(label)


def test_slicer_flow_session_infer_and_save_final(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    info = client.info()
    assert info["models"]["delightsam"]["type"] == "segmentation"

    # A volume that is not in the datastore goes up as a session, as Slicer does with a local volume.
    local = server["samples"] / "studies" / "radiomics_brain1.nrrd"
    session_id = client.create_session(str(local))["session_id"]
    label_file, params = client.infer("delightsam", "", {**SLICER_PARAMS, "modality": "mr"}, session_id=session_id)
    assert params["modality"] == "mr" and params["label_names"] == {"brain": 4}
    _same_grid(label_file, local)

    # A datastore image: auto-segment, then save the (reviewed) label back as final.
    label_file, params = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)
    voxels = _same_grid(label_file, server["studies"] / "ts_ct_small.nii.gz")
    client.save_label("ts_ct_small", label_file, tag="final",
                      params={"label_info": [{"name": n, "idx": i} for n, i in params["label_names"].items()]})
    stats = json.load(urllib.request.urlopen(f"{server['url']}/datastore/?output=stats"))
    assert stats["completed"] == 1 and stats["label_tags"] == {"final": 1}
    saved = next((server["studies"] / "labels" / "final").glob("ts_ct_small.*"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(saved))), voxels)


def test_errors_reach_the_client_and_the_server_goes_on(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("delightsam", "ts_ct_small", {**SLICER_PARAMS, "modality": "dermoscopy"})
    assert "Status: 422" in error.value.msg and "not served by this model" in error.value.msg
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("vista3d", "ts_ct_small", SLICER_PARAMS)
    assert "Status: 404" in error.value.msg and "no model named" in error.value.msg
    junk = server["tmp"] / "junk.nrrd"
    junk.write_bytes(b"NRRD0004\nthis header is broken")
    session_id = client.create_session(str(junk))["session_id"]
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("delightsam", "", SLICER_PARAMS, session_id=session_id)
    assert "Status: 422" in error.value.msg and "cannot read" in error.value.msg
    label_file, params = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)
    assert Path(label_file).stat().st_size > 0 and params["modality"] == "ct"


def _wait_training(client, seconds=400, until=("DONE", "ERROR", "STOPPED")):
    """Polls the train task's full status (a task is SUBMITTED before it is RUNNING) until it reaches ``until``."""
    deadline = time.time() + seconds
    while True:
        status = client.train_status()
        if status.get("status") in until:
            return status
        assert time.time() < deadline, f"training stayed {status.get('status')}"
        time.sleep(1)


def _ensure_final_label(client, server):
    if not (server["studies"] / "labels" / "final").is_dir():
        label_file, params = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)
        client.save_label("ts_ct_small", label_file, tag="final")


def test_train_publishes_and_infer_serves_the_new_model(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    _ensure_final_label(client, server)
    before = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)[1]["model_version"]
    client.train_start("delightsam", {"max_epochs": 1, "steps_per_epoch": 2, "train_batch_size": 2,
                                      "teacher": "none", "tracking": "none"})
    status = _wait_training(client)
    assert status["status"] == "DONE", status
    after = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)[1]["model_version"]
    assert after != before and after.startswith("delightsam-") and after.endswith("-e1")
    assert client.info()["models"]["delightsam"]["config"]["model_filename"][0] == "published.safetensors"
    info = client.info()
    assert f"{after}.safetensors" in info["models"]["delightsam"]["config"]["model_filename"]
    assert info["train_stats"]["delightsam"]["epoch"] == 1
    # the configured model can still be chosen
    old = client.infer("delightsam", "ts_ct_small", {**SLICER_PARAMS, "model_filename": "delightsam.safetensors"})[1]
    assert old["model_version"] == before
    versions = list((server["tmp"] / "model" / "versions").glob("delightsam-*"))
    assert {p.suffix for p in versions} == {".safetensors", ".json"}  # each version with its metrics


def test_killing_training_keeps_the_model_and_the_labels(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    _ensure_final_label(client, server)
    label = next((server["studies"] / "labels" / "final").glob("ts_ct_small.*"))
    label_bytes = label.read_bytes()
    served = server["tmp"] / "model" / "published.safetensors"
    version = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)[1]["model_version"]
    # an epoch that cannot end before the stop, so nothing may be published
    client.train_start("delightsam", {"name": "long_run", "max_epochs": 2, "steps_per_epoch": 100000,
                                      "train_batch_size": 2, "teacher": "none", "tracking": "none"})
    _wait_training(client, 120, until=("RUNNING",))
    time.sleep(15)  # mid-way: the subprocess has loaded the data and is stepping
    assert client.train_status(check_if_running=True)
    client.train_stop()
    _wait_training(client, 60, until=("DONE", "ERROR", "STOPPED"))
    assert label.read_bytes() == label_bytes  # the saved label is untouched
    if served.exists():
        delightsam.load_model(served)  # whole, loadable
    label_file, params = client.infer("delightsam", "ts_ct_small", SLICER_PARAMS)
    assert params["model_version"] == version  # nothing half-trained was published
