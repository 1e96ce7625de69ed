"""The body's frame of a CT (``delightsam.body_frame``) on real scans, in more than one storage order: it keeps
every voxel of the reference organs of the labelled scans (the training scan, whole, and the development series),
rules out the abdomen above a chest CT's domes, puts a spleen drawn on the patient's right out of bounds, and gives
the same answer whatever the file's voxel order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from delightsam.body_frame import ABDOMINAL, absent, body_frame, drop_specks, keep_structures
from delightsam.config import Structure
from delightsam.geometry import orient
from delightsam.reading import read_label, read_volume

TS = {"liver": (5, 1), "spleen": (1, 2), "kidney_right": (2, 3), "kidney_left": (3, 4), "stomach": (6, 5)}
STRUCTURES = [Structure(name, label, label - 1) for name, (_, label) in TS.items()]


def _reference(samples, image_name: str, label_name: str):
    image = read_volume(samples / image_name)
    reference = np.asarray(read_label(samples / "samples" / "labels" / label_name, image)).round().astype(np.int64)
    ours = np.zeros(reference.shape, np.uint8)
    for ts, label in TS.values():
        ours[reference == ts] = label
    return image, ours


def _kept(image, labels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    oriented = orient(image)
    layout = oriented.to_layout(torch.from_numpy(labels)).clone()
    notes = keep_structures(layout, body_frame(oriented.data, oriented.spacing, oriented.plane), oriented.plane,
                            STRUCTURES)
    return oriented.to_input(layout.numpy()), notes


def _reordered(image):
    """The same volume stored in another voxel order: axes permuted and one flipped (its affine to match)."""
    from monai.data import MetaTensor

    data = np.asarray(image.as_subclass(torch.Tensor))
    affine = np.asarray(image.affine, dtype=np.float64)
    moved = np.flip(np.transpose(data, (1, 0, 2)), axis=2)
    swap = np.eye(4)[[1, 0, 2, 3]]
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = data.shape[2] - 1
    return MetaTensor(torch.from_numpy(moved.copy()), affine=torch.from_numpy(affine @ swap @ flip))


@pytest.mark.parametrize("image_name,label_name", [("studies/ts_ct.nii.gz", "ts_ct.nii.gz"),
                                                   ("samples/ts_ct_dicom", "ts_ct_dicom.nii.gz")])
def test_the_reference_organs_are_all_inside_the_frame(samples, image_name, label_name):
    image, reference = _reference(samples, image_name, label_name)
    kept, notes = _kept(image, reference)
    np.testing.assert_array_equal(kept, reference)
    assert not any("rules a structure out" in n for n in notes), notes
    # a spleen drawn mirrored onto the patient's right is ruled out (the side rule can fail)
    oriented = orient(image)
    layout = oriented.to_layout(torch.from_numpy(reference)).numpy()
    mirrored = np.where(layout == 2, 0, layout)
    mirrored[np.flip(layout == 2, axis=1)] = 2
    mirrored = oriented.to_input(mirrored)
    kept, notes = _kept(image, mirrored)
    assert (kept == 2).sum() < 0.1 * (mirrored == 2).sum(), notes


def test_a_chest_ct_keeps_the_abdomen_below_its_domes_in_either_storage_order(samples):
    image = read_volume(samples / "studies" / "radiomics_lung1.nrrd")  # neck and chest, another patient
    for volume in (image, _reordered(image)):
        oriented = orient(volume)
        frame = body_frame(oriented.data, oriented.spacing, oriented.plane)
        assert oriented.plane == "axial"
        allowed = np.flatnonzero(frame.abdomen)
        assert len(allowed) and allowed.max() * oriented.spacing[2] <= 80, frame.notes  # the scan's lowest 60 mm
        assert any("thorax" in n for n in frame.notes)
        depth = oriented.data.shape[2]
        assert frame.slices(STRUCTURES, oriented.plane, depth) == allowed.tolist()
        # a structure not of the abdomen is looked for on every slice
        assert len(frame.slices(STRUCTURES + [Structure("lung", 9, 8)], oriented.plane, depth)) == depth
        # organs drawn over the whole scan keep only what lies in the body on those slices
        everywhere = torch.ones(oriented.data.shape, dtype=torch.uint8)
        keep_structures(everywhere, frame, oriented.plane, STRUCTURES[:1])
        assert not everywhere[..., allowed.max() + 1:].any() and everywhere[..., : allowed.max() + 1].any()
        assert not everywhere[0, 0].any()  # the corner of the field of view is air, outside the body


def test_a_ct_cut_in_another_plane_keeps_its_organs_and_every_slice(samples):
    # the training CT with its columns 5 mm apart: the spacing that stands out makes its slices sagittal (as a thick
    # sagittal reconstruction is cut)
    image, reference = _reference(samples, "studies/ts_ct.nii.gz", "ts_ct.nii.gz")
    from monai.data import MetaTensor

    affine = np.asarray(image.affine, dtype=np.float64) @ np.diag([5.0 / 3.0, 1.0, 1.0, 1.0])
    sagittal = MetaTensor(image.as_subclass(torch.Tensor), affine=torch.from_numpy(affine))
    oriented = orient(sagittal)
    assert oriented.plane == "sagittal"
    frame = body_frame(oriented.data, oriented.spacing, oriented.plane)
    assert frame.slices(STRUCTURES, oriented.plane, oriented.data.shape[2]) == list(range(oriented.data.shape[2]))
    kept, _ = _kept(sagittal, reference)
    np.testing.assert_array_equal(kept, reference)


def test_a_scan_without_hounsfield_units_is_not_ruled_out(samples):
    # the development CT stored with +1024 and no rescaling (as some converters write unsigned CT): no air anywhere,
    # so the frame cannot tell body from air nor bone from tissue, and rules nothing out rather than everything
    image, reference = _reference(samples, "samples/ts_ct_dicom", "ts_ct_dicom.nii.gz")
    shifted = image.clone()
    shifted += 1024
    kept, notes = _kept(shifted, reference)
    np.testing.assert_array_equal(kept, reference)
    assert any("may not be Hounsfield units" in n for n in notes), notes


def test_absent_names_the_structures_with_no_voxel():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1, 1, 1] = 3
    assert absent(labels, STRUCTURES) == ["liver", "spleen", "kidney_left", "stomach"]
    assert set(TS) <= ABDOMINAL


def test_a_speck_is_not_an_organ(samples):
    image = read_volume(samples / "studies" / "ts_ct.nii.gz")  # 336 mm along the body, 3 mm voxels
    oriented = orient(image)
    frame = body_frame(oriented.data, oriented.spacing, oriented.plane)
    labels = torch.zeros(oriented.data.shape, dtype=torch.uint8)
    labels[:10, :10, :5] = 1  # 500 voxels of 27 mm^3: 13.5 mL of "liver"
    labels[10:13, 10:13, :10] = 3  # 90 voxels: 2.4 mL of kidney
    labels[0, 29, 29] = 9  # a structure not of the abdomen keeps its speck
    notes = drop_specks(labels, frame, STRUCTURES + [Structure("lung", 9, 8)])
    assert int((labels == 1).sum()) == 500 and not (labels == 3).any() and int((labels == 9).sum()) == 1
    assert notes == ["left out as specks under 10.0 mL: kidney_right (2.4 mL)"]
    # one slice of it (3 mm along the body) may cut an organ to a sliver: held to 3/100 of the least volume
    thin = body_frame(oriented.data[..., 60:61], oriented.spacing, oriented.plane)
    sliver = torch.zeros((*oriented.data.shape[:2], 1), dtype=torch.uint8)
    sliver[10:14, 10:14] = 3  # 0.43 mL
    assert drop_specks(sliver, thin, STRUCTURES) == [] and int((sliver == 3).sum()) == 16


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_each_labelled_voxel_is_looked_up_where_the_axial_view_has_it(plane):
    """The frame's rules are looked up, for each labelled voxel of a plane's layout, in the axial view
    (``_axial_index``): flips and permutation as ``geometry._apply`` makes that view, slab by slab."""
    from delightsam.body_frame import _axial_index, _view
    from delightsam.geometry import _apply
    from delightsam.label_maps import labelled_voxels

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (7, 9, 11), generator=generator, dtype=torch.uint8)
    labels[torch.rand(labels.shape, generator=generator) < 0.6] = 0
    forward = _view(plane)[0]
    axial, seen = _apply(labels, forward), 0
    for index, values in labelled_voxels(labels, slices=4):
        rows, columns, slices = _axial_index(index, labels.shape, forward)
        assert torch.equal(axial[rows, columns, slices], values) and values.all()
        seen += len(values)
    assert seen == int((labels > 0).sum()) > 0
