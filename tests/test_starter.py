"""The starter model: the shipped MONAI bundle, what the app serves by default, MONAI's bundle runner, and a
shortened run of the recipe that made it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from monailabel.client import MONAILabelClient

import delightsam
from helpers import REPO, monailabel_server
from delightsam.reading import read_label, read_volume

BUNDLE = REPO / "models" / "delightsam_ct_mr"
CHECKPOINT = BUNDLE / "models" / "model.safetensors"
# what the model card promises: modality -> {structure: label id}
CARD = {"ct": {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "stomach": 5},
        "mr": {"brain": 1, "grey_matter": 2, "white_matter": 3}}


@pytest.fixture(scope="module")
def starter():
    return delightsam.load_model(CHECKPOINT)


def test_the_bundle_holds_a_small_checkpoint_with_the_card_s_structures(starter):
    # 31.6 MB since 0.4.0 gave MR a controller of its own; 33.3 MB since 0.4.4 carries the CT atlas (1.8 MB at 4 mm)
    assert CHECKPOINT.stat().st_size <= 34_000_000
    served = {m.name: {s.name: s.label for s in m.structures} for m in starter.config.modalities}
    assert served == CARD
    assert starter.config.img_size == 256
    card = (BUNDLE / "docs" / "README.md").read_text()
    for modality, structures in CARD.items():
        for name, label in structures.items():
            assert re.search(rf"\|\s*{modality}\s*\|\s*{label}\s*\|\s*{name}\s*\|", card), (modality, name)
    assert "not for diagnosis" in card.lower()
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    for name, label in CARD["ct"].items():
        assert f"{label} {name}" in metadata["label_classes"]
    report = (BUNDLE / "docs" / "evaluation" / "report.md").read_text()
    assert "development" in report and "U-Net" in report and "LiteMedSAM" in report and "distilled only" in report


def test_monai_bundle_runner_segments_a_volume(tmp_path, samples):
    """MONAI's own tool runs the bundle (configs/inference.json), not only this app."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    shutil.copyfile(samples / "studies" / "ts_ct_small.nii.gz", data / "ts_ct_small.nii.gz")
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
                    "--bundle_root", str(BUNDLE), "--dataset_dir", str(data), "--output_dir", str(out)],
                   check=True, capture_output=True, timeout=600)
    image = read_volume(data / "ts_ct_small.nii.gz")
    predicted = read_volume(out / "ts_ct_small_seg.nii.gz")
    assert predicted.shape == image.shape
    np.testing.assert_allclose(np.asarray(predicted.affine), np.asarray(image.affine), atol=1e-4)
    reference = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_small.nii.gz", image))
    liver_p, liver_r = np.asarray(predicted) == 1, reference == 5  # TotalSegmentator's liver id is 5
    dice = 2 * (liver_p & liver_r).sum() / (liver_p.sum() + liver_r.sum())
    assert dice > 0.5, dice  # a training volume: this checks that the shipped weights work, not accuracy


@pytest.mark.server
def test_the_run_command_serves_the_starter_model(tmp_path, samples):
    """`make run` passes no checkpoint: the app serves the bundle's, and segments a sample CT and MR volume
    into the structures of the model card."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for name in ("ts_ct.nii.gz", "mni152_t1.nii.gz"):
        shutil.copyfile(samples / "studies" / name, studies / name)
    with monailabel_server(tmp_path, studies, ["--conf", "model_dir", str(tmp_path / "model")]) as url:
        client = MONAILabelClient(url, tmpdir=str(tmp_path))  # not /tmp: the server deletes its result file of the same name there
        models = client.info()["models"]
        assert set(models) == {"delightsam_ct", "delightsam_mr"}
        assert models["delightsam_ct"]["description"].startswith("CT abdomen")
        assert models["delightsam_mr"]["description"].startswith("MR brain")
        for image, modality in (("ts_ct", "ct"), ("mni152_t1", "mr")):
            assert models[f"delightsam_{modality}"]["labels"] == CARD[modality]
            label_file, params = client.infer(f"delightsam_{modality}", image, {"result_extension": ".nii.gz"})
            labels = np.asarray(read_volume(label_file))
            counts = {name: int((labels == label).sum()) for name, label in CARD[modality].items()}
            assert all(n > 100 for n in counts.values()), (modality, counts)


@pytest.mark.slow
def test_the_recipe_runs_end_to_end_in_short(tmp_path, samples):
    """scripts/train_starter.py --quick: every step of the recipe with tiny budgets (the full run is hours)."""
    work, bundle = tmp_path / "work", tmp_path / "bundle"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "train_starter.py"), "--quick", "--work", str(work),
                          "--bundle", str(bundle)], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rebuilt = delightsam.load_model(bundle / "models" / "model.safetensors")
    assert {m.name: {s.name: s.label for s in m.structures} for m in rebuilt.config.modalities} == CARD
    assert [e["id"] for e in rebuilt.config.modality("ct").box_atlas] == ["ts_ct_small"]  # what it trained on
    assert (bundle / "models" / "model.safetensors").stat().st_size <= 30_000_000
    training = json.loads((work / "training.json").read_text())
    assert training["distill"]["steps"] >= 1 and training["segment"]["steps"] >= 1 and training["unet"]["steps"] >= 1
    # the U-Net had the same CPU time as both De-LightSAM stages (within one step of either)
    budget = training["distill"]["cpu_seconds"] + training["segment"]["cpu_seconds"]
    assert training["unet"]["cpu_seconds"] >= budget
    report = json.loads((bundle / "docs" / "evaluation" / "report.json").read_text())
    # prompt-free, two-stage (3-D boxes; the app's refine, with and without the box atlas; boxes per slice),
    # distilled, U-Net, LiteMedSAM
    assert len(report["methods"]) == 8
    assert report["context"]["split"]["evaluation"] == ["ts_ct_dicom"]
    assert not set(report["context"]["split"]["evaluation"]) & set(report["context"]["split"]["train"])
    assert (bundle / "docs" / "evaluation" / "figures" / "development_ts_ct_dicom.png").is_file()
