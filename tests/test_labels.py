"""Label identity: a saved label means what its client named, structure by structure; clean-up keeps parts.

Slicer's Submit Label numbers segments by their position in the user's list and sends their names in
label_info; these tests save real reference labels that way (segments in another order than the model's, an
extra one, a missing one) and check what training makes of them."""

from __future__ import annotations

import sys

import nibabel as nib
import numpy as np
import torch

import delightsam
from conftest import APP_DIR
from delightsam.config import Structure
from delightsam.losses import DeLightSAMLoss
from delightsam.training import SliceData, TrainItem
from delightsam.volume import clean_up

sys.path.insert(0, str(APP_DIR))
from delightsam_app import anatomy  # noqa: E402
from delightsam_app.labels import map_label  # noqa: E402

CT = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "stomach": 5}
TS = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3, "stomach": 6}  # TotalSegmentator's ids


def test_names_match_loosely_or_by_code_never_by_position():
    assert anatomy.match("Kidney right", CT) == "kidney_right"
    assert anatomy.match("Right kidney", CT) == "kidney_right"  # SNOMED CT 9846003 either way
    assert anatomy.match("LIVER", CT) == "liver"
    assert anatomy.match("tumour", CT) is None
    assert anatomy.match("Segment_1", CT) is None
    assert anatomy.match("gray matter", {"grey_matter": 2}) == "grey_matter"


def test_slicer_positions_and_names_become_the_models_ids():
    params = {"label_info": [{"name": "stomach", "idx": 1}, {"name": "Liver", "idx": 2}, {"name": "tumour", "idx": 3}]}
    mapping = map_label(params, {0, 1, 2, 3}, CT)
    assert mapping.values == {1: 5, 2: 1} and mapping.known == ["stomach", "liver"]
    assert mapping.unmatched == ["tumour"] and mapping.problem is None
    # two segments that name one structure both count as it
    twice = map_label({"label_info": [{"name": "Right kidney", "idx": 1}, {"name": "kidney_right", "idx": 2}]},
                      {0, 1, 2}, CT)
    assert twice.values == {1: 3, 2: 3} and twice.known == ["kidney_right"]
    # without names, only a label whose values are the model's ids is used, and then for every structure
    assert map_label({}, {0, 1, 5}, CT).known == list(CT)
    assert "not label ids" in map_label({"label_info": [{"name": "liver"}]}, {0, 1, 7}, CT).problem
    # names that are no structure of this modality (an MR label sent to the CT model) train nothing
    brain = map_label({"label_info": [{"name": "brain", "idx": 1}]}, {0, 1}, CT)
    assert brain.known == [] and "none of its segments (brain)" in brain.problem


def _ct_model() -> delightsam.DeLightSAM:
    model = delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=64))
    model.add_modality("ct", list(CT.items()), intensity={"window": [-160, 240]})
    return model


def test_a_slicer_style_save_trains_the_right_structures(tmp_path, samples):
    """The real reference label of a CT saved as Slicer would: positional values 1..3 for stomach, an extra
    segment and the liver; spleen and kidneys missing. Training sees liver and stomach where the reference has
    them, and does not learn that the spleen is absent."""
    reference = nib.load(samples / "samples" / "labels" / "ts_ct_small.nii.gz")
    ts = np.asarray(reference.dataobj).astype(np.int64)
    saved = np.zeros(ts.shape, np.uint8)
    saved[ts == TS["stomach"]], saved[ts == 7], saved[ts == TS["liver"]] = 1, 2, 3  # 7: the pancreas, "extra"
    path = tmp_path / "saved.nii.gz"
    nib.save(nib.Nifti1Image(saved, reference.affine), path)
    params = {"label_info": [{"name": "stomach", "idx": 1}, {"name": "extra", "idx": 2}, {"name": "liver", "idx": 3}]}
    mapping = map_label(params, set(np.unique(saved).tolist()), CT)
    image = str(samples / "studies" / "ts_ct_small.nii.gz")
    item = TrainItem("small", image, str(path), "ct", mapping.values, mapping.known)
    data = SliceData([item], _ct_model())
    exact = TrainItem("small", image, str(samples / "samples" / "labels" / "ts_ct_small.nii.gz"), "ct",
                      {ts_id: CT[name] for name, ts_id in TS.items()})
    truth = SliceData([exact], _ct_model())  # the reference in the model's ids, every structure known
    order = list(CT)
    for name in ("liver", "stomach"):
        got, want = data.masks[0][:, order.index(name)], truth.masks[0][:, order.index(name)]
        assert want.any() and torch.equal(got, want), name
    assert data.known[0].tolist() == [True, False, False, False, True]
    assert truth.masks[0][:, order.index("spleen")].any()  # the spleen is there, and unknown to this label
    # the segmentation and patch losses ignore what the label does not know
    inputs, _, masks, modalities, known = data.batch([(0, 15), (0, 16)])
    model = _ct_model().eval()
    out = model(inputs, modalities)
    loss = DeLightSAMLoss()
    with_unknown = loss(out, masks, None, known)
    spleen_filled = masks.clone()
    spleen_filled[:, order.index("spleen")] = 1.0  # anything in an unknown channel changes nothing
    assert torch.allclose(loss(out, spleen_filled, None, known)["segmentation"], with_unknown["segmentation"])
    assert with_unknown["patch"] == 0
    assert not torch.allclose(loss(out, spleen_filled, None, None)["segmentation"], with_unknown["segmentation"])


def test_clean_up_keeps_a_part_inside_its_whole():
    """White matter enclosed by the brain is a hole of the white matter's whole, not of the white matter:
    clean-up per structure mask keeps it, and removes stray islands of each structure."""
    brain = [Structure("brain", 1, 0, [2, 3]), Structure("grey_matter", 2, 1), Structure("white_matter", 3, 2)]
    labels = torch.zeros(20, 20, 20, dtype=torch.uint8)
    labels[2:18, 2:18, 2:18] = 1
    labels[4:16, 4:16, 4:16] = 2
    labels[7:13, 7:13, 7:13] = 3
    labels[9, 9, 9] = 0  # a hole in the white matter
    labels[0, 0, 0] = 2  # an island of grey matter
    for order in (brain, brain[::-1], [brain[0], brain[2], brain[1]]):  # the answer does not depend on the order
        cleaned = clean_up(labels, order)
        assert (cleaned[7:13, 7:13, 7:13] == 3).all()  # white matter kept, its hole filled as white matter
        assert cleaned[0, 0, 0] == 0 and (cleaned[4:16, 4:16, 4] == 2).all()
        assert int((cleaned == 1).sum()) == int((labels == 1).sum())
