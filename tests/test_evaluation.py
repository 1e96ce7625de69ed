"""Evaluation: label grids, metrics, structures made of parts, the report and the `delightsam evaluate` command."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import delightsam
from delightsam.cli import main as cli
from delightsam.config import Structure
from delightsam.evaluation import score
from delightsam.training import TrainConfig, train
from delightsam.training_data import SliceData, TrainItem
from delightsam.label_maps import combine, part_indices, structure_mask
from delightsam.reading import read_label, read_volume

BRAIN = [Structure("brain", 1, 0, [2, 3]), Structure("grey_matter", 2, 1), Structure("white_matter", 3, 2)]


def _nifti(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_a_label_stored_flipped_is_read_onto_the_image_grid(tmp_path):
    """The TotalSegmentator label of the DICOM CT is stored with y reversed; read as is, it would not lie
    on the organ (this once made a validation score wrong)."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 5, 4)).astype(np.float32)
    label = (rng.random((6, 5, 4)) > 0.5).astype(np.uint8)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    flipped = affine.copy()
    flipped[1, 1], flipped[1, 3] = -2.0, 2.0 * 4  # y runs the other way, from the other end
    img = read_volume(_nifti(tmp_path / "image.nii.gz", image, affine))
    on_grid = read_label(_nifti(tmp_path / "label.nii.gz", label[:, ::-1].copy(), flipped), img)
    np.testing.assert_array_equal(np.asarray(on_grid), label)
    shifted = affine.copy()
    shifted[0, 3] = 10.0
    with pytest.raises(ValueError, match="not on the image's grid"):
        read_label(_nifti(tmp_path / "shifted.nii.gz", label, shifted), img)


def test_the_sample_dicom_label_lies_on_the_liver(samples):
    image = read_volume(samples / "samples" / "ts_ct_dicom")
    label = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz", image))
    hu = np.asarray(image)
    assert 40 < hu[label == 5].mean() < 200  # liver tissue (contrast CT), not fat or air


def test_score_dice_hd95_and_absent_structures():
    reference = np.zeros((20, 20, 5), np.uint8)
    reference[5:15, 5:15] = 1
    predicted = np.zeros_like(reference)
    predicted[5:15, 7:17] = 1
    predicted[0:2, 0:2] = 3  # structure 3 is not in the reference
    structures = [Structure("a", 1, 0), Structure("b", 2, 1), Structure("c", 3, 2)]
    s = score(predicted, reference, structures, (1.0, 1.0, 2.0))
    assert s["a"]["dice"] == pytest.approx(0.8)  # 2 * 400 / (500 + 500)
    assert s["a"]["hd95_mm"] == pytest.approx(2.0)
    assert s["b"]["dice"] is None and s["b"]["hd95_mm"] is None  # absent and not predicted: not scored
    assert s["c"]["dice"] == 0.0 and s["c"]["reference_voxels"] == 0 and s["c"]["predicted_voxels"] == 20


def test_a_structure_is_its_label_and_its_parts():
    labels = torch.tensor([0, 1, 2, 3, 2])
    assert structure_mask(labels, BRAIN[0]).tolist() == [False, True, True, True, True]
    assert structure_mask(labels.numpy(), BRAIN[1]).tolist() == [False, False, True, False, True]
    # grey matter above the threshold is drawn over the brain that holds it, even when less probable
    probabilities = torch.tensor([[0.99, 0.99, 0.2], [0.6, 0.1, 0.1], [0.1, 0.7, 0.1]])
    assert combine(probabilities, [1, 2, 3], parts=part_indices(BRAIN)).tolist() == [2, 3, 0]
    assert combine(probabilities, [1, 2, 3]).tolist() == [1, 1, 0]  # without parts the brain would win
    with pytest.raises(ValueError, match="parts"):
        delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=256)).add_modality(
            "mr", [("brain", 1, [7]), ("grey_matter", 2)])


def test_training_targets_of_a_whole_include_its_parts(tmp_path):
    label = np.zeros((8, 8, 3), np.uint8)
    label[2:6, 2:6] = 1
    label[3:5, 3:5] = 2
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    affine = np.eye(4)
    item = TrainItem("x", str(_nifti(tmp_path / "i.nii.gz", image, affine)),
                     str(_nifti(tmp_path / "l.nii.gz", label, affine)), "mr")
    model = delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=64))
    model.add_modality("mr", [("brain", 1, [2]), ("grey_matter", 2)])
    data = SliceData([item], model)
    brain, grey = data.masks[0][:, 0], data.masks[0][:, 1]
    assert int(brain.sum()) == 4 * int(grey.sum()) > 0  # the 4x4 brain square holds the 2x2 grey square
    assert bool((brain | ~grey).all())


def test_training_stops_at_its_cpu_budget(tmp_path, samples):
    model = delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=64))
    model.add_modality("ct", [("liver", 5)], intensity={"window": [-160, 240]})
    item = TrainItem("small", str(samples / "studies" / "ts_ct_small.nii.gz"),
                     str(samples / "samples" / "labels" / "ts_ct_small.nii.gz"), "ct")
    config = TrainConfig(epochs=1000, steps_per_epoch=5, batch_size=2, trainable="all", teacher=None,
                         tracking="none", max_cpu_seconds=3.0)
    stats = train(model, [item], [], config, tmp_path / "run")
    assert "CPU budget" in stats["stopped"]
    assert 1 <= stats["steps"] < 5000 and stats["cpu_seconds"] >= 3.0
    again = train(model, [item], [], config, tmp_path / "run", log=lambda m: None)
    assert again["steps"] >= 1  # a budget-stopped run is finished, not resumed at its last epoch


def _tiny_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    model = delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=64, version=f"tiny{seed}"))
    model.add_modality("ct", [("liver", 1), ("spleen", 2)], intensity={"window": [-160, 240]})
    # a biased liver query: the random model predicts "liver" somewhere, so the report has numbers
    with torch.no_grad():
        model.decoder.query_groups["ct"][0] += 1.0
    return delightsam.save_model(model.eval(), path)


def test_evaluate_command_writes_a_report_with_figures(tmp_path, samples):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copytree(samples / "samples" / "ts_ct_dicom", images / "ts_ct_dicom")
    raw = nib.load(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz")
    ours = np.where(np.asarray(raw.dataobj) == 5, 1, np.where(np.asarray(raw.dataobj) == 1, 2, 0)).astype(np.uint8)
    nib.save(nib.Nifti1Image(ours, raw.affine), labels / "ts_ct_dicom.nii.gz")
    a, b = _tiny_checkpoint(tmp_path / "a.safetensors", 0), _tiny_checkpoint(tmp_path / "b.safetensors", 1)
    out = tmp_path / "report"
    assert cli(["evaluate", "--checkpoint", str(a), "--checkpoint", str(b), "--data", f"ct:{images}:{labels}",
                "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["sets"]["evaluation"][0]
    assert entry["case"] == "ts_ct_dicom" and set(entry["methods"]) == {"a", "b"}
    liver = entry["methods"]["a"]["structures"]["liver"]
    assert liver["reference_voxels"] == int((ours == 1).sum())
    text = (out / "report.md").read_text()
    assert "| a |" in text and "| b |" in text and "liver" in text and "spleen" in text
    figure = out / entry["figure"]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000
    # bad input names the problem
    assert cli(["evaluate", "--checkpoint", str(a), "--data", f"xray:{images}:{labels}", "--output", str(out)]) == 2
    assert cli(["evaluate", "--checkpoint", str(a), "--data", f"ct:{images}:{tmp_path}", "--output", str(out)]) == 2


def test_the_verdict_says_where_the_model_under_test_loses(tmp_path, samples):
    """A random model first, the shipped (trained) starter second: the report says, with both Dice figures, that
    the random one loses on the liver; in the other order, that the starter is at least as good everywhere."""
    from helpers import REPO

    starter = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copytree(samples / "samples" / "ts_ct_dicom", images / "ts_ct_dicom")
    raw = nib.load(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz")
    liver = (np.asarray(raw.dataobj) == 5).astype(np.uint8)  # the liver alone, as id 1 in both models
    nib.save(nib.Nifti1Image(liver, raw.affine), labels / "ts_ct_dicom.nii.gz")
    tiny = _tiny_checkpoint(tmp_path / "random.safetensors", 0)
    for order, out in (([tiny, starter], tmp_path / "first"), ([starter, tiny], tmp_path / "second")):
        args = [a for c in order for a in ("--checkpoint", str(c))]
        assert cli(["evaluate", *args, "--data", f"ct:{images}:{labels}", "--output", str(out), "--no-progress"]) == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())
    names = first["methods"]
    dice = {m: first["sets"]["evaluation"][0]["methods"][m]["structures"]["liver"]["dice"] for m in names}
    assert dice[names[1]] > 0.5 > dice[names[0]], dice
    text = (tmp_path / "first" / "report.md").read_text()
    assert (f"- {names[0]} **loses** to {names[1]} on: liver ({dice[names[0]]:.3f} vs {dice[names[1]]:.3f})") in text
    second = (tmp_path / "second" / "report.md").read_text()
    assert f"- {names[1]} is at least as good as {names[0]} on every scored structure." in second
    assert "loses" not in second


def test_a_method_for_some_modalities_is_left_out_of_the_others_tables(tmp_path, samples):
    """The foundation rows run on CT organs only: a method restricted to CT is scored on the CT and absent from
    the MR table (not a row of zeros), while an unrestricted one is in both."""
    from delightsam.evaluation import Case, DeLightSAMMethod, evaluate

    model = delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=64, version="tiny"))
    model.add_modality("ct", [("liver", 1)], intensity={"window": [-160, 240]})
    model.add_modality("mr", [("brain", 1)], intensity={"percentiles": [0.5, 99.5]})
    model.eval()
    cases = {}
    for modality, name, ts_class in (("ct", "ts_ct_small", 5), ("mr", "ts_mr_small", 5)):
        raw = nib.load(samples / "samples" / "labels" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image((np.asarray(raw.dataobj) == ts_class).astype(np.uint8), raw.affine), tmp_path / f"{name}.nii.gz")
        cases[modality] = [Case(name, str(samples / "studies" / f"{name}.nii.gz"), str(tmp_path / f"{name}.nii.gz"), modality)]
    methods = [DeLightSAMMethod("everywhere", model), DeLightSAMMethod("ct only", model, modalities=("ct",))]
    results = evaluate(methods, cases, tmp_path / "report", progress=False)
    assert set(results["sets"]["ct"][0]["methods"]) == {"everywhere", "ct only"}
    assert set(results["sets"]["mr"][0]["methods"]) == {"everywhere"}
    text = (tmp_path / "report" / "report.md").read_text()
    ct_table, mr_table = text.split("\n## mr\n")
    assert "| ct only |" in ct_table and "| everywhere |" in ct_table
    assert "| ct only |" not in mr_table and "| everywhere |" in mr_table
