"""The registered atlas as a prior of where a new patient's organs are (``delightsam.registration_prior``), on real
scans in more than one storage order: the atlas travels with the checkpoint; on another patient's chest-abdomen CT
(TotalSegmentator's angiography example, unlabelled for these organs, its heart labelled on the same grid) the prior
puts the liver on the patient's right below the lungs and the spleen on the left, the same in either voxel order;
the shipped model, given it, paints no liver or spleen in the heart but at the rim where it lies on the liver (it
painted 318 mL of the heart liver before) and
still finds a liver of a liver's size; a slab with no thorax in view gets no prior and the answer it had."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from delightsam import load_model, save_model
from delightsam.body_frame import body_frame
from delightsam.checkpoint import CheckpointError
from delightsam.config import Structure
from delightsam.geometry import orient
from delightsam.pipeline import Pipeline
from delightsam.reading import read_volume
from delightsam.registration_prior import ATLAS_MM, gate, register
from test_body_frame import _reordered

from helpers import STARTER, make_test_checkpoint

REFERENCE = "cache/extracted/totalsegmentator-2.18.0/tests/reference_files"
ANGIO, HEART = f"{REFERENCE}/aorta_report/example_ct.nii.gz", f"{REFERENCE}/pulmonary_report/models/heart.nii.gz"
NAMES = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "stomach": 5}
STRUCTURES = [Structure(name, label, label - 1) for name, label in NAMES.items()]


@pytest.fixture(scope="module")
def shipped():
    return load_model(STARTER)


def test_the_atlas_travels_with_the_checkpoint_and_a_broken_one_is_named(tmp_path, shipped):
    atlas = shipped.atlases["ct"]
    assert atlas.image.dtype == torch.int16 and atlas.labels.dtype == torch.uint8
    assert set(atlas.labels.unique().tolist()) == {0, *NAMES.values()}
    model = load_model(make_test_checkpoint(tmp_path / "plain.safetensors"))
    assert model.atlases == {}
    model.atlases = {"ct": atlas}
    again = load_model(save_model(model, tmp_path / "with_atlas.safetensors"))
    assert torch.equal(again.atlases["ct"].image, atlas.image) and torch.equal(again.atlases["ct"].labels, atlas.labels)
    tensors = load_file(tmp_path / "with_atlas.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "with_atlas.safetensors"), "pt") as f:
        metadata = f.metadata()
    del tensors["atlas.ct.labels"]
    save_file(tensors, tmp_path / "broken.safetensors", metadata=metadata)
    with pytest.raises(CheckpointError, match="ct atlas needs an image and labels"):
        load_model(tmp_path / "broken.safetensors")


def _prior(shipped, volume):
    oriented = orient(volume)
    frame = body_frame(oriented.data, oriented.spacing, oriented.plane)
    prior, note = register(shipped.atlases["ct"], oriented.data, frame, oriented.plane, NAMES["liver"])
    return oriented, frame, prior, note


def test_the_prior_places_the_organs_of_another_patient_in_either_storage_order(samples, shipped):
    image = read_volume(samples / ANGIO)
    priors = []
    for volume in (image, _reordered(image)):
        oriented, frame, prior, note = _prior(shipped, volume)
        assert prior is not None and "registered" in note, note
        labels = prior.labels  # the axial view at 4 mm: rows to the back, columns to the patient's left, slices up
        midline = np.nanmean(frame.midline) * oriented.spacing[1] / ATLAS_MM
        for name, side in (("liver", -1), ("spleen", 1)):
            columns = np.nonzero(labels == NAMES[name])[1]
            assert len(columns) and side * (columns.mean() - midline) > 20 / ATLAS_MM, name  # its side, 20 mm out
        liver_top = np.nonzero(labels == NAMES["liver"])[2].max() * ATLAS_MM
        assert abs(liver_top - frame.dome * oriented.spacing[2]) < 60, (liver_top, frame.dome)  # at the lung bases
        priors.append(labels)
    np.testing.assert_array_equal(priors[0], priors[1])


def test_the_gate_removes_what_lies_far_from_the_prior_and_fills_what_is_missing(samples, shipped):
    image = read_volume(samples / ANGIO)
    oriented, _, prior, _ = _prior(shipped, image)
    heart = oriented.to_layout(torch.from_numpy(np.asarray(read_volume(samples / HEART)) > 0))
    labels = torch.zeros(oriented.data.shape, dtype=torch.uint8)
    labels[heart] = NAMES["liver"]  # the first stage's mistake on this scan before the prior
    liver = prior.full(prior.labels == NAMES["liver"])
    labels[liver & ~heart] = NAMES["liver"]
    notes = gate(labels, prior, STRUCTURES, fill=True)
    kept = heart & (labels == NAMES["liver"])  # only where the heart lies on the liver's dome, within the gate
    assert kept.sum() < 0.25 * heart.sum() and not (kept & ~prior.full(prior.grown(NAMES["liver"]))).any()
    assert (labels == NAMES["liver"]).sum() >= (liver & ~heart).sum()  # the liver where the prior has it stays
    for name in ("spleen", "stomach"):  # not drawn at all: drawn where the prior puts them
        drawn = labels == NAMES[name]
        assert drawn.any() and not (drawn & ~prior.full(prior.labels == NAMES[name])).any(), name
    assert any("boxed where the registered atlas puts them" in n for n in notes), notes


def test_a_slab_without_its_thorax_gets_no_prior(samples, shipped):
    oriented, frame, prior, note = _prior(shipped, read_volume(samples / "samples" / "ts_ct_dicom"))
    assert frame.dome is None and prior is None and "no thorax in view" in note
    # nor does a chest CT that ends at its lung bases (pyradiomics' lung1): too little abdomen to match
    oriented, frame, prior, note = _prior(shipped, read_volume(samples / "studies" / "radiomics_lung1.nrrd"))
    assert frame.dome is not None and prior is None and "too little of the abdomen" in note


@pytest.mark.slow
def test_the_shipped_model_paints_no_organ_in_the_heart_in_either_storage_order(samples, shipped):
    image = read_volume(samples / ANGIO)
    heart = np.asarray(read_volume(samples / HEART)) > 0
    answers = []
    for volume in (image, _reordered(image)):
        result = Pipeline(["ct"]).segment(shipped, volume, "ct", batch_size=4)
        assert any("registered onto the scan" in n for n in result.notes), result.notes
        answers.append(result.labels if volume is image else _back(result.labels, image))
    labels = answers[0]
    np.testing.assert_array_equal(answers[0], answers[1])
    millilitres = {name: float((labels == label).sum()) * 1.5 ** 3 / 1000 for name, label in NAMES.items()}
    assert millilitres["liver"] > 800 and millilitres["spleen"] > 80, millilitres  # organs of their size
    in_heart = float(np.isin(labels[heart], [NAMES["liver"], NAMES["spleen"]]).sum()) * 1.5 ** 3 / 1000
    assert in_heart < 10  # a rim where the heart lies on the liver's dome (5.5 of the heart's 669 mL)
    # what this stands guard against: the same model without its atlas paints 318 mL of this heart liver


def _back(labels: np.ndarray, image) -> np.ndarray:
    """A label map of ``_reordered(image)`` on ``image``'s own voxel order."""
    return np.transpose(np.flip(labels, axis=2), (1, 0, 2))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_the_prior_reaches_each_voxel_of_a_scan_cut_in_any_plane(plane):
    """A prior is made in the axial view and used in the scan's own plane's layout: each voxel there must read the
    coarse voxel it lies in (flips included), as the axial view's voxel does."""
    from delightsam.body_frame import _view
    from delightsam.geometry import _apply
    from delightsam.registration_prior import Prior, _in_layout, _nearest

    shape, spacing = (50, 37, 23), (0.7, 0.9, 2.5)
    coarse_shape = tuple(len(m) for m in _nearest(shape, spacing))
    maps = _nearest(shape, spacing, coarse_shape)
    coarse = np.random.default_rng(0).integers(0, 5, coarse_shape).astype(np.uint8)
    (moved,), moved_maps = _in_layout([coarse], maps, _view(plane)[1])
    prior = Prior(moved, moved > 0, moved_maps, 1.0)
    expected = _apply(torch.from_numpy(coarse[np.ix_(*maps)]), _view(plane)[1])
    assert torch.equal(prior.full(moved), expected)
    assert torch.equal(prior.full(moved, slice(3, 9)), expected[..., 3:9])
