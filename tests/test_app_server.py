"""Integration: a real `monailabel start_server` process on a loopback port, driven the way the 3D Slicer
plugin drives it, with monailabel's own client."""

from __future__ import annotations

import json
import time
import urllib.request
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from safetensors import safe_open

import delightsam
from helpers import STARTER, make_test_checkpoint, monailabel_server, studies_folder

pytestmark = pytest.mark.server

SLICER_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8"}  # what the Slicer plugin asks for


@pytest.fixture(scope="module")
def server(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("server")
    studies = studies_folder(tmp, samples, ["ts_ct_small.nii.gz", "radiomics_brain1.nrrd", "ts_ct.nii.gz"])
    checkpoint = make_test_checkpoint(tmp / "models" / "delightsam.safetensors")
    model = delightsam.load_model(checkpoint)
    model.atlases = delightsam.load_model(STARTER).atlases  # the shipped CT atlas: a published model must keep it
    delightsam.save_model(model, checkpoint)
    with monailabel_server(tmp, studies, ["--conf", "checkpoint", str(checkpoint),
                                          "--conf", "model_dir", str(tmp / "model")]) as url:
        yield {"url": url, "tmp": tmp, "studies": studies, "samples": samples, "checkpoint": checkpoint}


def _same_grid(label_path, image_path):
    label = sitk.ReadImage(str(label_path))
    if Path(image_path).is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(image_path)))
        image = reader.Execute()
    else:
        image = sitk.ReadImage(str(image_path))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    assert label.GetPixelID() == sitk.sitkUInt8
    return sitk.GetArrayFromImage(label)


def test_slicer_flow_session_infer_and_save_final(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    info = client.info()
    assert set(info["models"]) == {"delightsam_ct", "delightsam_mr"}  # one model per modality, as Slicer lists them
    assert info["models"]["delightsam_ct"]["labels"] == {"liver": 1, "spleen": 2, "kidney": 3}
    assert info["models"]["delightsam_mr"]["labels"] == {"brain": 4}

    # A volume that is not in the datastore goes up as a session, as Slicer does with a local volume.
    local = server["samples"] / "studies" / "radiomics_brain1.nrrd"
    session_id = client.create_session(str(local))["session_id"]
    label_file, params = client.infer("delightsam_mr", "", SLICER_PARAMS, session_id=session_id)
    assert params["modality"] == "mr" and params["label_names"] == {"brain": 4}
    _same_grid(label_file, local)

    # A datastore image: auto-segment, then save the (reviewed) label back as final.
    label_file, params = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)
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
        client.infer("delightsam_dermoscopy", "ts_ct_small", SLICER_PARAMS)
    assert "Status: 404" in error.value.msg and "delightsam_ct, delightsam_mr" in error.value.msg
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("vista3d", "ts_ct_small", SLICER_PARAMS)
    assert "Status: 404" in error.value.msg and "no model named" in error.value.msg
    junk = server["tmp"] / "junk.nrrd"
    junk.write_bytes(b"NRRD0004\nthis header is broken")
    session_id = client.create_session(str(junk))["session_id"]
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("delightsam_ct", "", SLICER_PARAMS, session_id=session_id)
    assert "Status: 422" in error.value.msg and "cannot read" in error.value.msg
    label_file, params = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)
    assert Path(label_file).stat().st_size > 0 and params["modality"] == "ct"


def _session_of_zip(url: str, members: dict[str, Path], path: Path) -> dict:
    """A zip of DICOM files (archive name -> file) uploaded as Slicer uploads a zipped series."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, source in members.items():
            archive.write(source, name)
    reply = requests.put(f"{url}/session/", params={"uncompress": "true"},
                         files={"files": (path.name, path.read_bytes())}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_zipped_series_in_a_folder_is_found(server):
    """The usual zip holds a folder with the series in it; a zip of two series of one size is refused by name."""
    series = server["samples"] / "samples" / "ts_ct_dicom"
    files = sorted(series.iterdir())
    session = _session_of_zip(server["url"], {f"CT_abdomen/{f.name}": f for f in files}, server["tmp"] / "series.zip")
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    label_file, params = client.infer("delightsam_ct", "", SLICER_PARAMS, session_id=session["session_id"])
    assert params["modality"] == "ct"
    _same_grid(label_file, series)
    with pytest.raises(MONAILabelClientException) as error:  # the DICOM tag says CT
        client.infer("delightsam_mr", "", SLICER_PARAMS, session_id=session["session_id"])
    assert "Status: 422" in error.value.msg and "is CT by its DICOM Modality tag" in error.value.msg
    halves = {f"a/{f.name}": f for f in files[:10]} | {f"b/{f.name}": f for f in files[10:]}
    two = _session_of_zip(server["url"], halves, server["tmp"] / "two.zip")  # one series in two folders
    with pytest.raises(MONAILabelClientException) as error:
        client.infer("delightsam_ct", "", SLICER_PARAMS, session_id=two["session_id"])
    assert "Status: 422" in error.value.msg and "holds 2 DICOM series of 10 files each" in error.value.msg


def _wait_training(client, seconds=400, until=("DONE", "ERROR", "STOPPED")):
    """Polls the train task's full status (a task is SUBMITTED before it is RUNNING) until it reaches ``until``."""
    deadline = time.time() + seconds
    while True:
        status = client.train_status()
        if status.get("status") in until:
            return status
        assert time.time() < deadline, f"training stayed {status.get('status')}"
        time.sleep(1)


def _wait_stats(client, predicate, seconds=300):
    """Polls /info until the train task's statistics satisfy ``predicate``."""
    deadline = time.time() + seconds
    while not predicate(stats := client.info()["train_stats"]["delightsam"]):
        assert time.time() < deadline, stats
        time.sleep(0.5)
    return stats


def _ensure_final_label(client, server):
    if not list((server["studies"] / "labels" / "final").glob("ts_ct_small.*")):
        label_file, params = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)
        client.save_label("ts_ct_small", label_file, tag="final")


QUICK = {"max_epochs": 1, "steps_per_epoch": 2, "train_batch_size": 2, "teacher": "none", "tracking": "none"}


def test_train_publishes_and_infer_serves_the_new_model(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    _ensure_final_label(client, server)
    before = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)[1]["model_version"]
    client.train_start("delightsam", QUICK)
    status = _wait_training(client)
    assert status["status"] == "DONE", status
    result = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)[1]
    after = result["model_version"]
    assert after != before and after.startswith("delightsam-") and after.endswith("-e1")
    info = client.info()
    # the served pipeline learned: the published model carries the CT refiner's queries and head, and serves them
    with safe_open(str(server["tmp"] / "model" / "published.safetensors"), "pt") as f:
        assert {"refiner.decoder.query_groups.ct", "atlas.ct.image", "atlas.ct.labels"} <= set(f.keys())
    assert info["models"]["delightsam_ct"]["refiner_adapted"] and "adapted" in result["pipeline"], result["pipeline"]
    assert not info["models"]["delightsam_mr"]["refiner_adapted"]  # MR is served in one stage
    assert info["train_stats"]["delightsam"]["pipeline"]["refiner_trained"] == ["ct"]
    assert info["models"]["delightsam_ct"]["config"]["model_filename"][0] == "published.safetensors"
    assert f"{after}.safetensors" in info["models"]["delightsam_mr"]["config"]["model_filename"]
    assert info["train_stats"]["delightsam"]["epoch"] == 1
    # the configured model can still be chosen
    old = client.infer("delightsam_ct", "ts_ct_small", {**SLICER_PARAMS, "model_filename": "delightsam.safetensors"})[1]
    assert old["model_version"] == before
    versions = list((server["tmp"] / "model" / "versions").glob("delightsam-*"))
    assert {p.suffix for p in versions} == {".safetensors", ".json"}  # each version with its metrics


def _outputs(path: Path) -> dict[str, torch.Tensor]:
    model = delightsam.load_model(path)
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {m: model(images, m).mask_logits for m in ("ct", "mr")}


def test_training_knows_each_images_modality_and_reads_labels_by_name(server):
    """An MR saved on a local datastore trains the MR model and never the CT one; an image of unknown modality
    is refused with a message that says how to set it; a Slicer-style CT label (segments numbered by their
    place in the user's list, an extra one, one missing) trains the structures it names."""
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    url, tmp = server["url"], server["tmp"]
    requests.delete(f"{url}/datastore/label", params={"id": "ts_ct_small", "tag": "final"}, timeout=30)
    # the MR: segmented as MR (which records its modality), its brain saved as Slicer's first segment
    label_file, params = client.infer("delightsam_mr", "radiomics_brain1", {"result_extension": ".nii.gz"})
    assert requests.get(f"{url}/datastore/image/info", params={"image": "radiomics_brain1"}).json()["modality"] == "mr"
    label = nib.load(label_file)
    brain = tmp / "brain_final.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(label.dataobj) > 0).astype(np.uint8), label.affine), brain)
    client.save_label("radiomics_brain1", str(brain), tag="final", params={"label_info": [{"name": "Brain", "idx": 1}]})
    # a CT nobody segmented with this server: its modality is nowhere
    ct_label = tmp / "ts_ct_final.nii.gz"
    ct_image = nib.load(server["studies"] / "ts_ct.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(ct_image.shape, np.uint8), ct_image.affine), ct_label)
    client.save_label("ts_ct", str(ct_label), tag="final")
    served = tmp / "model" / "published.safetensors"
    start = served if served.exists() else server["checkpoint"]
    before = _outputs(start)
    client.train_start("delightsam", {**QUICK, "name": "mr_only", "trainable": "modality", "val_split": 0})
    assert _wait_training(client)["status"] == "DONE"
    stats = client.info()["train_stats"]["delightsam"]
    assert stats["data"]["trained"] == {"radiomics_brain1": {"modality": "mr", "structures": ["brain"]}}
    assert "ts_ct" in stats["data"]["refused"] and "modality is unknown" in stats["data"]["refused"]["ts_ct"]
    assert "PUT /datastore/image/info" in stats["data"]["refused"]["ts_ct"]
    after = _outputs(served)
    assert torch.equal(after["ct"], before["ct"])  # the CT model did not move
    assert (after["mr"] - before["mr"]).abs().max() > 1e-4  # the MR model did
    # a Slicer-style save of the CT: segment 1 the spleen, 2 something else, 3 the liver; kidney not sent
    reference = nib.load(server["samples"] / "samples" / "labels" / "ts_ct_small.nii.gz")
    ts = np.asarray(reference.dataobj)
    slicer = np.zeros(ts.shape, np.uint8)
    slicer[ts == 1], slicer[ts == 7], slicer[ts == 5] = 1, 2, 3  # TotalSegmentator: spleen 1, pancreas 7, liver 5
    saved = tmp / "slicer_ct.nii.gz"
    nib.save(nib.Nifti1Image(slicer, reference.affine), saved)
    client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)  # as a user does before correcting: records CT
    client.save_label("ts_ct_small", str(saved), tag="final", params={"label_info": [
        {"name": "spleen", "idx": 1}, {"name": "pancreas", "idx": 2}, {"name": "Liver", "idx": 3}]})
    client.train_start("delightsam", {**QUICK, "name": "slicer_ct", "val_split": 0})
    assert _wait_training(client)["status"] == "DONE"
    data = client.info()["train_stats"]["delightsam"]["data"]
    assert data["trained"]["ts_ct_small"] == {"modality": "ct", "structures": ["spleen", "liver"]}
    assert data["unmatched_segments"] == {"ts_ct_small": ["pancreas"]}


def test_killing_training_keeps_the_model_and_the_labels(server):
    client = MONAILabelClient(server["url"], tmpdir=str(server["tmp"]))
    _ensure_final_label(client, server)
    label = next((server["studies"] / "labels" / "final").glob("ts_ct_small.*"))
    label_bytes = label.read_bytes()
    served = server["tmp"] / "model" / "published.safetensors"
    version = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)[1]["model_version"]
    # an epoch that cannot end before the stop, so nothing may be published
    client.train_start("delightsam", {"name": "long_run", "max_epochs": 2, "steps_per_epoch": 100000,
                                      "train_batch_size": 2, "teacher": "none", "tracking": "none"})
    _wait_training(client, 120, until=("RUNNING",))
    # mid-way: the subprocess has loaded the data and is stepping (it says so in its statistics)
    _wait_stats(client, lambda s: s.get("phase") == "training" and s["config"]["steps_per_epoch"] == 100000)
    assert client.train_status(check_if_running=True)
    client.train_stop()
    _wait_training(client, 60, until=("DONE", "ERROR", "STOPPED"))
    assert label.read_bytes() == label_bytes  # the saved label is untouched
    if served.exists():
        delightsam.load_model(served)  # whole, loadable
    label_file, params = client.infer("delightsam_ct", "ts_ct_small", SLICER_PARAMS)
    assert params["model_version"] == version  # nothing half-trained was published
