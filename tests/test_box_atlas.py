"""The box atlas: where a modality's structures lie relative to each other, learned from training labels, and the
context prompts it gives a structure that the prompt-free first stage found in the wrong place."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

import delightsam
from helpers import make_test_checkpoint
from delightsam.box_atlas import atlas_entry, context_boxes
from delightsam.box_atlas import update_box_atlas
from delightsam.training_data import SliceData, TrainItem

ATLAS = [{"id": "a", "plane": "axial", "boxes": {"liver": [0, 0, 0, 100, 100, 50], "stomach": [20, 60, 10, 50, 90, 40],
                                                 "kidney": [60, 10, 0, 90, 40, 20]}}]
EXTENT = np.array([200.0, 200.0, 100.0])


def _box(*corners):
    return np.array(corners[:3], float), np.array(corners[3:], float)


def test_the_largest_structure_anchors_and_a_misplaced_one_is_boxed_where_the_atlas_puts_it():
    # the liver found 1.5 times the atlas's size and shifted: the atlas's frame maps onto it, axis by axis
    found = {"liver": _box(10, 20, 0, 160, 170, 75), "stomach": _box(100, 10, 0, 120, 30, 20),
             "kidney": _box(102, 36, 0, 140, 78, 30), "gallbladder": _box(1, 1, 1, 5, 5, 5)}
    moved, trusted = context_boxes(found, ATLAS, "axial", EXTENT)
    assert trusted == ["liver", "kidney"]  # the kidney agrees with where the atlas puts it (IoU >= 0.25)
    assert list(moved) == ["stomach"]  # gallbladder: not in the atlas, keeps its own box
    np.testing.assert_allclose(moved["stomach"][0], [40, 110, 15])
    np.testing.assert_allclose(moved["stomach"][1], [85, 155, 60])


def test_no_context_for_another_plane_and_none_where_the_atlas_box_leaves_the_volume():
    found = {"liver": _box(10, 20, 0, 160, 170, 75), "stomach": _box(100, 10, 0, 120, 30, 20)}
    assert context_boxes(found, ATLAS, "sagittal", EXTENT) == ({}, [])
    far = {"liver": _box(150, 150, 0, 300, 300, 75), "stomach": _box(100, 10, 0, 120, 30, 20)}
    moved, _ = context_boxes(far, ATLAS, "axial", np.array([160.0, 160.0, 100.0]))
    assert moved == {"stomach": None}  # the atlas puts it beyond the volume's edge: no prompt at all


def test_a_checkpoint_keeps_its_atlas_and_a_bad_atlas_is_refused_by_name(tmp_path):
    model = delightsam.load_model(make_test_checkpoint(tmp_path / "m.safetensors"))
    spec = model.config.modality("ct")
    name = spec.structures[0].name
    spec.box_atlas = [{"id": "v1", "plane": "axial", "boxes": {name: [0, 0, 0, 10, 10, 4]}}]
    delightsam.save_model(model, tmp_path / "a.safetensors")
    assert delightsam.load_model(tmp_path / "a.safetensors").config.modality("ct").box_atlas == spec.box_atlas
    for boxes, message in (({"pancreas": [0, 0, 0, 1, 1, 1]}, "names 'pancreas', not one of its structures"),
                           ({name: [0, 0, 0, 10, 10]}, "must be 6 finite numbers"),
                           ({name: [5, 0, 0, 1, 10, 4]}, "low corner below high corner"),
                           ({name: [0, 0, 0, float("nan"), 10, 4]}, "must be 6 finite numbers")):
        spec.box_atlas = [{"plane": "axial", "boxes": boxes}]
        with pytest.raises(ValueError, match=message):
            model.config.replace()


def test_training_volumes_join_the_atlas_in_mm_whatever_their_storage_order(tmp_path, samples):
    """A real CT and its label stored RAS and LPS give the same atlas entry (boxes in mm in the plane's layout);
    a volume trained on again replaces its own entry, others are kept."""
    model = delightsam.load_model(make_test_checkpoint(tmp_path / "m.safetensors"))
    image, label = samples / "studies" / "ts_ct_small.nii.gz", samples / "samples" / "labels" / "ts_ct_small.nii.gz"
    lps = np.array([[0, -1], [1, -1], [2, 1]])
    for source, target in ((image, "ct_lps.nii.gz"), (label, "label_lps.nii.gz")):
        nib.save(nib.load(source).as_reoriented(lps), tmp_path / target)
    data = SliceData([TrainItem("ras", str(image), str(label), "ct"),
                      TrainItem("lps", str(tmp_path / "ct_lps.nii.gz"), str(tmp_path / "label_lps.nii.gz"), "ct")], model)
    ras, lps_entry = data.atlas["ct"]
    assert ras["boxes"] and ras["boxes"] == lps_entry["boxes"] and ras["plane"] == "axial"
    liver = model.config.modality("ct").structures[0].name
    low, high = np.array(ras["boxes"][liver][:3]), np.array(ras["boxes"][liver][3:])
    assert np.all(high - low > 30) and high[2] == 90.0  # mm: 30 slices of 3 mm
    model.config.modality("ct").box_atlas = [{"id": "ras", "plane": "axial", "boxes": {}}, {"id": "old", "plane": "axial", "boxes": {}}]
    update_box_atlas(model, {"ct": [ras]})
    assert [e["id"] for e in model.config.modality("ct").box_atlas] == ["old", "ras"]
    assert model.config.modality("ct").box_atlas[1]["boxes"] == ras["boxes"]


def test_an_entry_leaves_out_what_the_volume_lacks():
    mask = np.zeros((4, 5, 3), bool)
    mask[1:3, 2:5, 1] = True
    entry = atlas_entry({"a": mask, "b": np.zeros_like(mask)}, (2.0, 1.0, 3.0), "axial")
    assert entry == {"plane": "axial", "boxes": {"a": [2.0, 2.0, 3.0, 6.0, 5.0, 6.0]}}


def test_the_atlas_command_adds_labelled_volumes_without_training(tmp_path, samples, capsys):
    from delightsam.cli import main

    source = make_test_checkpoint(tmp_path / "m.safetensors")
    image, label = samples / "studies" / "ts_ct_small.nii.gz", samples / "samples" / "labels" / "ts_ct_small.nii.gz"
    out = tmp_path / "with_atlas.safetensors"
    assert main(["atlas", str(source), "--case", f"ct:{image}:{label}", "-o", str(out)]) == 0
    model, before = delightsam.load_model(out), delightsam.load_model(source)
    assert [e["id"] for e in model.config.modality("ct").box_atlas] == ["ts_ct_small"]
    assert all(np.array_equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    assert main(["atlas", str(source), "--case", f"ct:{image}", "-o", str(out)]) == 2
    assert main(["atlas", str(source), "--case", f"xray:{image}:{label}", "-o", str(out)]) == 2
    assert main(["atlas", str(source), "--case", f"ct:{image}:{tmp_path / 'missing.nii.gz'}", "-o", str(out)]) == 2
    errors = capsys.readouterr().err
    assert "--case wants MODALITY:IMAGE:LABEL" in errors and "xray" in errors and "missing.nii.gz" in errors


def test_context_prompts_write_the_atlas_box_in_voxels_and_leave_out_one_beyond_the_volume(tmp_path):
    """On a volume of 2 x 1 x 3 mm voxels (rows, columns, slices): a misplaced spleen gets the atlas's box as inclusive voxel indices
    (x = column, y = row) on the slices it spans; a kidney the atlas puts beyond the volume gets no box."""
    import torch

    from delightsam.geometry import orient
    from delightsam.refinement import context_prompts, slice_boxes

    model = delightsam.load_model(make_test_checkpoint(tmp_path / "m.safetensors"))
    spec = model.config.modality("ct")  # liver, spleen, kidney
    spec.box_atlas = [{"plane": "axial", "boxes": {"liver": [0, 0, 0, 40, 40, 30], "spleen": [10, 20, 6, 20, 30, 15],
                                                   "kidney": [0, 0, 0, 10, 10, 30]}}]
    # stored RAS x, y, z at 1, 2, 3 mm: the axial layout's rows run along y (2 mm), its columns along x (1 mm)
    oriented = orient(np.zeros((40, 40, 10), np.float32), spacing=(1.0, 2.0, 3.0))
    assert oriented.spacing == (2.0, 1.0, 3.0) and tuple(oriented.data.shape) == (40, 40, 10)
    liver, spleen = torch.zeros(40, 40, 10, dtype=torch.bool), torch.zeros(40, 40, 10, dtype=torch.bool)
    liver[:20, :40, :10] = True  # 40 x 40 x 30 mm from the origin: the atlas's frame as it is
    spleen[0:2, 35:40, 0:2] = True  # far from where the atlas puts it
    boxes = slice_boxes([liver, spleen, None], "slice", 10)
    note, boxed = context_prompts(boxes, [liver, spleen, None], spec, oriented)
    assert "relative to liver: spleen" in note and boxed == [1]
    # spleen 10-20 mm of rows (2 mm): rows 5-9; 20-30 mm of columns (1 mm): columns 20-29; 6-15 mm of slices: 2-4
    assert torch.isnan(boxes[:2, 1]).all() and torch.isnan(boxes[5:, 1]).all()
    assert boxes[2:5, 1].tolist() == [[20.0, 5.0, 29.0, 9.0]] * 3
    kidney = torch.zeros(40, 40, 10, dtype=torch.bool)
    kidney[30:40, 0:5, 0:3] = True
    spec.box_atlas[0]["boxes"]["kidney"] = [90, 90, 0, 100, 100, 30]  # beyond the liver's frame and the volume
    boxes = slice_boxes([liver, None, kidney], "3d", 10)
    note, boxed = context_prompts(boxes, [liver, None, kidney], spec, oriented)
    assert torch.isnan(boxes[:, 2]).all() and "kidney: the atlas puts it outside this volume" in note and boxed == []
