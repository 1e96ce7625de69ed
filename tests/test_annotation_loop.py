"""The annotation loop as a Slicer user lives it, against real `monailabel start_server` processes with the
shipped starter model, on slabs of the held-out CT (never trained on; one slab stored in another voxel order):
Next Sample by the model's own doubt, the model's labels scored against what the user submits, training that
publishes a version that does better on the next image; batch pre-segmentation on this CPU-only machine."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from helpers import REPO, monailabel_server

from annotation_loop import QUICK_TRAIN, Annotator, make_volumes

from delightsam.config import Structure
from delightsam.ledger import Ledger
from delightsam.uncertainty import DoubtMeter
from delightsam.reading import read_volume

STARTER = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"
STRUCTURES = {"Stomach": 5, "Liver": 1, "Spleen": 2}  # the annotators' names -> the model's ids
SCORING = {"MONAI_LABEL_AUTO_UPDATE_SCORING": "true"}  # monailabel's scoring at start and after each step, as served


def test_doubt_is_zero_when_sure_and_one_bit_at_even_odds():
    meter = DoubtMeter(["sure", "unsure", "absent"])
    p = torch.zeros(2, 3, 8, 8)
    p[:, 0, :4] = 1.0  # half the slice certainly in, half certainly out
    p[:, 1] = 0.5
    meter.add(p)
    summary = meter.summary()["structures"]
    assert summary["sure"]["entropy"] < 1e-5 and summary["sure"]["soft_dice_gap"] < 1e-5
    assert abs(summary["unsure"]["entropy"] - 1.0) < 1e-6 and summary["unsure"]["voxels"] == 0
    assert summary["absent"] == {"entropy": 0.0, "soft_dice_gap": 0.0, "voxels": 0}


def test_a_saved_label_is_scored_on_the_prediction_grid_whatever_its_voxel_order(tmp_path, samples):
    volumes = make_volumes(samples, tmp_path, 2)
    ledger = Ledger(tmp_path / "loop")
    plain, reordered = volumes  # the second is stored slice axis first, flipped
    image = nib.load(reordered.image)
    label = np.asarray(nib.load(reordered.label).dataobj)
    ours = np.zeros(label.shape, np.uint8)
    for name, value in ((i["name"], i["idx"]) for i in reordered.label_info):
        ours[label == value] = STRUCTURES[name]
    canonical = nib.as_closest_canonical(nib.Nifti1Image(ours, image.affine))  # the model's label, stored RAS
    structures = [Structure(n.lower(), i, 0) for n, i in STRUCTURES.items()]
    ledger.record_prediction(reordered.image_id, "v1", "ct", structures, np.asarray(canonical.dataobj),
                             canonical.affine, None, "test")
    names = {i["idx"]: i["name"].lower() for i in reordered.label_info}  # Slicer's positional values -> names
    entry = ledger.record_agreement(reordered.image_id, str(reordered.label), names, ["liver", "spleen", "stomach"], "ct")
    assert entry["versions"]["v1"]["mean_dice"] == pytest.approx(1.0)  # the same label, in two voxel orders
    shifted = np.roll(np.asarray(canonical.dataobj), 8, axis=0)  # a wrong one scores below
    ledger.record_prediction(reordered.image_id, "v2", "ct", structures, shifted, canonical.affine, None, "test")
    entry = ledger.record_agreement(reordered.image_id, str(reordered.label), names, ["liver", "spleen", "stomach"], "ct")
    assert entry["versions"]["v2"]["mean_dice"] < 0.95
    assert list(ledger.summary()) == ["v1", "v2"]


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, samples):
    """The whole loop over two slabs, through monailabel's client, with a short training."""
    tmp = tmp_path_factory.mktemp("loop")
    volumes = make_volumes(samples, tmp, 2)
    conf = ["--conf", "checkpoint", str(STARTER), "--conf", "model_dir", str(tmp / "model"), "--conf", "modality", "ct"]
    with monailabel_server(tmp, tmp / "studies", conf, env=SCORING) as url:
        annotator = Annotator(url, volumes, QUICK_TRAIN)
        starter_version = annotator.version()
        first = annotator.next_sample()
        scores = Ledger(tmp / "model" / "loop").doubt(starter_version)
        colleague = Annotator(url, volumes, QUICK_TRAIN, client_id="annotator-2").client.next_sample("uncertain", {})
        annotator.segment_and_correct(first)
        annotator.train_and_publish()
        second = annotator.next_sample()
        annotator.segment_and_correct(second)
        info = requests.get(f"{url}/info/", timeout=60).json()
        card = requests.get(f"{url}/model_card", timeout=60)
        yield {"tmp": tmp, "annotator": annotator, "starter": starter_version, "scores": scores, "first": first,
               "second": second, "volumes": volumes, "info": info, "card": card, "colleague": colleague}


@pytest.mark.server
@pytest.mark.slow
def test_next_sample_hands_out_the_image_the_model_is_least_sure_of(loop_run):
    scores, handed = loop_run["scores"], loop_run["annotator"].handed
    assert set(scores) == {v.image_id for v in loop_run["volumes"]}  # the starter scored every unlabelled image
    assert handed[0]["image"] == max(scores, key=lambda i: scores[i]["score"])
    assert handed[0]["uncertainty"] == pytest.approx(scores[handed[0]["image"]]["score"])
    assert loop_run["colleague"]["id"] != handed[0]["image"]  # another annotator is not given the same volume
    assert handed[1]["image"] != handed[0]["image"]  # the labelled one is not handed out again
    assert handed[1]["model_version"] != loop_run["starter"] and handed[1]["uncertainty"] is not None  # scored anew
    assert not (loop_run["tmp"] / "model" / "loop" / "predictions" / handed[0]["image"] /
                f"{handed[1]['model_version']}.json").exists()  # a labelled image is not scored again


@pytest.mark.server
@pytest.mark.slow
def test_the_new_version_is_served_and_does_better_on_the_next_image(loop_run):
    new = loop_run["annotator"].trained[0]["to"]
    model = loop_run["info"]["models"]["delightsam_ct"]
    assert model["model_version"] == new and model["training"]["train_volumes"] == 1
    agreement = json.loads((loop_run["tmp"] / "model" / "loop" / "agreement" / f"{loop_run['second'].image_id}.json").read_text())
    before, after = agreement["versions"][loop_run["starter"]], agreement["versions"][new]
    print({"before": before["mean_dice"], "after": after["mean_dice"]})
    assert after["mean_dice"] > before["mean_dice"] + 0.05, (before, after)
    assert after["structures"]["liver"]["dice"] > 0.8  # real organs found, not an empty map scored as agreement
    assert after["structures"]["liver"]["hd95_mm"] is not None


@pytest.mark.server
@pytest.mark.slow
def test_clients_see_versions_scores_and_the_model_card(loop_run):
    info = loop_run["info"]
    assert list(info["strategies"])[0] == "uncertain" and {"random", "first", "last"} <= set(info["strategies"])
    assert "uncertainty" in info["scoring"]
    stats = info["train_stats"]["delightsam"]
    assert stats["total_time"] and stats["epoch"] == stats["total_epochs"] == QUICK_TRAIN["max_epochs"]
    assert set(stats["user_scores"]) == {loop_run["starter"], loop_run["annotator"].trained[0]["to"]}
    model = info["models"]["delightsam_ct"]
    assert model["user_scores"]["images"] == 1 and model["model_card"] == "/model_card"
    assert loop_run["card"].status_code == 200 and "De-LightSAM" in loop_run["card"].text


@pytest.mark.server
@pytest.mark.slow
def test_delightsam_report_tabulates_and_plots_each_version(loop_run, tmp_path):
    reply = subprocess.run([sys.executable, "-m", "delightsam.cli", "report", "--model-dir", str(loop_run["tmp"] / "model"),
                            "--output", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert reply.returncode == 0, reply.stderr
    assert loop_run["starter"] in reply.stdout and loop_run["annotator"].trained[0]["to"] in reply.stdout
    from PIL import Image

    assert Image.open(tmp_path / "dice_by_version.png").size[0] > 300
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary[loop_run["starter"]]["images"] == 2


# a datastore of the samples' kinds (an abdomen CT, a chest CT, an MR head and an MR abdomen), not all of them: the
# batch runs each image through the model on 2 cores, and one of a kind tells no less than two
SAMPLE_MR = ["radiomics_brain1", "ts_mr_small"]
SAMPLE_CT = ["ts_ct_small", "radiomics_lung1"]


@pytest.mark.server
@pytest.mark.slow
def test_batch_inference_pre_segments_the_sample_datastore_on_the_cpu(tmp_path, samples):
    """Every sample volume, and the held-out slabs (one in another voxel order), get an `original` label from a
    CPU-only server's batch inference; a modality is never assumed: the MRs are recorded as MR (as a user sets
    them), the CTs are unknown until the request declares them."""
    volumes = make_volumes(samples, tmp_path, 2)
    for f in (samples / "studies").iterdir():
        if f.name.split(".")[0] in SAMPLE_CT + SAMPLE_MR:
            (tmp_path / "studies" / f.name).write_bytes(f.read_bytes())
    conf = ["--conf", "checkpoint", str(STARTER), "--conf", "model_dir", str(tmp_path / "model")]
    with monailabel_server(tmp_path, tmp_path / "studies", conf) as url:
        for image in SAMPLE_MR:
            set_info = requests.put(f"{url}/datastore/image/info", params={"image": image},
                                    data={"info": json.dumps({"modality": "mr"})}, timeout=60)
            assert set_info.status_code == 200, set_info.text
        undeclared = _batch(url, "delightsam_ct", {})  # no image's CT-ness is known: nothing is assumed
        assert "0/0 done" in undeclared and "skipping ts_ct_dicom_part1: its modality is unknown" in undeclared
        declared = _batch(url, "delightsam_ct", {"modality": "ct"})  # "the images of unknown modality are CT"
        assert "4/4 done" in declared and "skipping radiomics_brain1: it is MR" in declared
        assert "2/2 done" in _batch(url, "delightsam_mr", {})
        for image in SAMPLE_CT + SAMPLE_MR:  # the viewers open each as a starting point
            reply = _original_label(url, image)
            assert reply.status_code == 200, (image, reply.text)
            path = tmp_path / f"{image}_original.nii.gz"
            path.write_bytes(reply.content)
            source = next((tmp_path / "studies").glob(f"{image}.*"))
            assert nib.load(path).shape[:3] == read_volume(source).shape[:3], image
        for volume in volumes:
            reply = _original_label(url, volume.image_id)  # the server sees the batch process's labels
            assert reply.status_code == 200, reply.text
            path = tmp_path / f"{volume.image_id}_original.nii.gz"
            path.write_bytes(reply.content)
            saved, reference = nib.load(path), nib.load(volume.label)
            assert saved.shape == reference.shape and np.allclose(saved.affine, reference.affine, atol=1e-3)
            liver = np.asarray(saved.dataobj) == 1
            truth = np.asarray(reference.dataobj) == 2  # the annotators' "Liver"
            assert 2 * (liver & truth).sum() / (liver.sum() + truth.sum()) > 0.8, volume.image_id
        brain = np.asarray(nib.load(tmp_path / "radiomics_brain1_original.nii.gz").dataobj)
        assert (brain > 0).mean() > 0.05  # the MR model drew the brain


def _original_label(url: str, image_id: str, wait: float = 30):
    """The `original` label as a viewer fetches it, once the server's file watcher has seen it."""
    deadline = time.time() + wait
    while True:
        reply = requests.get(f"{url}/datastore/label", params={"label": image_id, "tag": "original"}, timeout=60)
        if reply.status_code != 404 or time.time() > deadline:
            return reply
        time.sleep(0.5)


def _batch(url: str, model: str, params: dict) -> str:
    """Runs /batch/infer as a client does (in the background), waits on its status, returns its log lines."""
    reply = requests.post(f"{url}/batch/infer/{model}", params={"images": "unlabeled"}, json=params, timeout=60)
    assert reply.status_code == 200, reply.text
    deadline = time.time() + 600
    while True:  # the state of this task (the status answers the latest one, an earlier one until this starts)
        status = requests.get(f"{url}/batch/infer", timeout=30).json()
        if status.get("id") == reply.json()["id"] and status.get("status") in ("DONE", "ERROR"):
            break
        assert time.time() < deadline, status
        time.sleep(1)
    assert status["status"] == "DONE", status
    return "\n".join(status.get("details", []))
