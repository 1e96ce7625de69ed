"""Label identity: a saved label means what its client named, structure by structure; clean-up keeps parts.

Slicer's Submit Label numbers segments by their position in the user's list and sends their names in
label_info; these tests save real reference labels that way (segments in another order than the model's, an
extra one, a missing one) and check what training makes of them."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from fastapi import HTTPException

import delightsam
from delightsam.config import Structure
from delightsam.losses import DeLightSAMLoss
from delightsam.training_data import SliceData, TrainItem
from delightsam.label_maps import clean_up

from delightsam_app import anatomy
from delightsam_app.labels import check_saved_label, map_label

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
    # without names, only a label whose values are the model's ids is used, and then for the structures it holds
    # (a liver-only label does not say that the other organs are absent)
    assert map_label({}, {0, 1, 5}, CT).known == ["liver", "stomach"]
    assert map_label({}, {0, 1}, CT).known == ["liver"]
    # a named segment with no voxels is a structure the user did not draw (Slicer lists every segment)
    empty = map_label({"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]}, {0, 1}, CT)
    assert empty.values == {1: 1, 2: 2} and empty.known == ["liver"]
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


def _saved(tmp_path, name: str, data: np.ndarray, affine: np.ndarray) -> str:
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return str(path)


def test_a_label_is_read_against_its_image_before_it_is_saved(tmp_path, samples):
    """The check a label passes at save time (``check_saved_label``), on the real CT and its reference label: in
    another storage order it passes with the same values; on another grid, with values nobody named, with NaN,
    fractions or values beyond uint8, or as random bytes it is refused by name."""
    image = str(samples / "studies" / "ts_ct_small.nii.gz")
    reference = nib.load(samples / "samples" / "labels" / "ts_ct_small.nii.gz")
    raw = np.asarray(reference.dataobj).astype(np.uint8)
    ts = np.where(np.isin(raw, list(TS.values())), raw, 0).astype(np.uint8)  # the five organs of the CT model
    named = {"label_info": [{"name": n, "idx": i} for n, i in TS.items()]}
    info, notes = check_saved_label(_saved(tmp_path, "ref.nii.gz", ts, reference.affine), image, named, CT)
    assert set(info["values"]) >= set(TS.values()) - {0} and "annotates liver" in notes[-1]
    from nibabel import orientations  # stored S-P-L instead of R-A-S: axes permuted and reversed

    transform = orientations.ornt_transform(orientations.io_orientation(reference.affine),
                                            orientations.axcodes2ornt(("S", "P", "L")))
    turned_affine = reference.affine @ orientations.inv_ornt_aff(transform, ts.shape)
    turned_data = np.ascontiguousarray(orientations.apply_orientation(ts, transform))
    turned, _ = check_saved_label(_saved(tmp_path, "turned.nii.gz", turned_data, turned_affine), image, named, CT)
    assert turned["values"] == info["values"]

    def refused(data, affine=reference.affine, params=named, structures=CT, name="bad.nii.gz"):
        path = _saved(tmp_path, name, data, affine) if data is not None else name
        with pytest.raises(HTTPException) as e:
            check_saved_label(path, image, params, structures)
        assert e.value.status_code == 422 and e.value.detail.startswith("the label was not saved")
        return e.value.detail

    shifted = reference.affine.copy()
    shifted[:3, 3] += 25.0
    assert "not on the image's grid" in refused(ts, shifted)
    assert "not on the image's grid" in refused(ts[:, :, :20])
    assert "not named in label_info" in refused(ts, params={"label_info": [{"name": "liver", "idx": 5}]})
    assert "not label ids of the model" in refused(ts, params={})  # TotalSegmentator's ids, unnamed
    nan = ts.astype(np.float32)
    nan[0, 0, 0] = np.nan
    assert "NaN" in refused(nan)
    assert "not whole numbers" in refused(ts.astype(np.float32) + 0.5)
    assert "0 (background) to 255" in refused(ts.astype(np.int32) * 300)
    assert "0 (background) to 255" in refused(ts.astype(np.int16) - 1)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "cannot read it" in refused(None, name=str(junk))
    with pytest.raises(HTTPException) as e:
        check_saved_label(str(junk), image, {"label_info": [{"name": "liver", "idx": 2_000_000_000}]}, CT)
    assert "option 'label_info.0.idx'" in e.value.detail


def test_an_empty_named_segment_is_not_counted_and_relabel_sizes_nothing_by_a_value(tmp_path, samples):
    from delightsam.label_maps import relabel

    image = str(samples / "studies" / "ts_ct_small.nii.gz")
    reference = nib.load(samples / "samples" / "labels" / "ts_ct_small.nii.gz")
    liver = (np.asarray(reference.dataobj) == TS["liver"]).astype(np.uint8)
    params = {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 2}]}  # spleen: drawn nowhere
    info, notes = check_saved_label(_saved(tmp_path, "liver.nii.gz", liver, reference.affine), image, params, CT)
    assert info["values"] == [1] and "spleen (2)" in notes[0] and "annotates liver for training" in notes[-1]
    huge = torch.tensor([[0, 1], [2_000_000_000, 7]])
    assert relabel(huge, {1: 5, 2_000_000_000: 2}).tolist() == [[0, 5], [2, 0]]  # no table of 2e9 entries
