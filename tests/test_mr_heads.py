"""MR heads as they arrive: thick slices made from a thin head, the whole brain as one closed object, and what the
MR model was measured on (contrasts, slice thicknesses) said of every request."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import REPO
from delightsam.config import Structure, released_config
from delightsam.label_maps import close_wholes, structure_mask
from delightsam.scope import contrast_of, dicom_contrast, scope
from delightsam.thick_slices import held_out_conditions, thick_slices

BRAIN = [Structure("brain", 1, 0, [2, 3]), Structure("grey_matter", 2, 1), Structure("white_matter", 3, 2)]
MEASURED = {"contrasts": ["T1"], "slice_mm": [1.0, 5.0]}


def _lps_volume(shape=(20, 24, 30), spacing=(1.0, 1.0, 1.0)) -> nib.Nifti1Image:
    """A volume stored LPS (DICOM's order) whose voxel value is its world S coordinate in mm."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [10.0, 20.0, -7.0]
    z = np.arange(shape[2]) * spacing[2] - 7.0
    return nib.Nifti1Image(np.broadcast_to(z, shape).astype(np.float32).copy(), affine)


def test_thick_axial_slices_are_slab_means_at_the_right_place():
    thin = _lps_volume()
    thick = thick_slices(thin, "axial", 5.0)
    assert thick.shape == (20, 24, 6) and nib.aff2axcodes(thick.affine) == ("R", "A", "S")
    assert np.allclose(thick.header.get_zooms(), (1, 1, 5))
    # each slice holds the mean S of its slab, and its centre lies at that S in the world
    centres = (thick.affine @ np.array([[0, 0, k, 1] for k in range(6)]).T)[2]
    values = np.asarray(thick.dataobj)[0, 0]
    assert np.allclose(values, centres, atol=1e-4), (values, centres)
    assert np.allclose(values, [-5, 0, 5, 10, 15, 20])
    # slabs of an even or a fractional number of thin voxels: each slab's exact mean (the thin voxels cut into
    # tenths of a millimetre, averaged), its centre where the affine puts it
    for spacing, mm in ((1.0, 2.0), (1.0, 4.0), (2.0, 5.0)):
        thin = _lps_volume(spacing=(1.0, 1.0, spacing))
        thick = thick_slices(thin, "axial", mm)
        tenths = np.repeat(np.asarray(thin.dataobj)[0, 0], int(spacing * 10))
        expected = tenths[: thick.shape[2] * int(mm * 10)].reshape(-1, int(mm * 10)).mean(1)
        assert np.allclose(np.asarray(thick.dataobj)[0, 0], expected, atol=1e-4), (spacing, mm)
        centres = (thick.affine @ np.array([[0, 0, k, 1] for k in range(thick.shape[2])]).T)[2]
        first = thin.affine[2, 3] - spacing / 2  # the thin volume's first edge, in mm
        assert np.allclose(centres, first + (np.arange(thick.shape[2]) + 0.5) * mm), (spacing, mm)
        assert np.isclose(thick.header.get_zooms()[2], mm) and thick.get_data_dtype() == np.float32


def test_thick_slices_of_a_label_take_the_label_covering_most_of_the_slab():
    data = np.zeros((4, 4, 10), np.uint8)
    data[..., 0:3] = 1  # 3 of the first 5 slices
    data[..., 5:7] = 2  # 2 of the next 5
    label = thick_slices(nib.Nifti1Image(data, np.eye(4)), "axial", 5.0, label=True)
    assert np.asarray(label.dataobj)[0, 0].tolist() == [1, 0] and label.get_data_dtype() == np.uint8
    coronal = thick_slices(nib.Nifti1Image(data, np.eye(4)), "coronal", 2.0, label=True)
    assert coronal.shape == (4, 2, 10)
    with pytest.raises(ValueError, match="not thicker"):
        thick_slices(nib.Nifti1Image(data, np.eye(4)), "axial", 1.0)
    with pytest.raises(ValueError, match="plane must be"):
        thick_slices(nib.Nifti1Image(data, np.eye(4)), "oblique", 5.0)


def test_the_whole_brain_is_closed_as_one_object_with_its_parts_kept():
    labels = torch.zeros(30, 30, 12, dtype=torch.uint8)
    labels[5:25, 5:25, 2:10] = 2  # grey matter
    labels[10:20, 10:20, 2:10] = 3  # white matter
    labels[13:17, 13:17, 4:8] = 0  # a hole inside (a lesion the network left out)
    labels[8:11, 8:11, 0:2] = 1  # part of the brain touching it from below: kept
    labels[27:29, 27:29, 5] = 2  # a speck of scalp, apart
    notes = close_wholes(labels, BRAIN, 0.001)
    assert labels[27:29, 27:29, 5].eq(0).all()  # the speck removed
    assert labels[13:17, 13:17, 4:8].eq(1).all()  # the hole is brain
    assert labels[10:13, 10:20, 2:10].eq(3).all() and labels[5:8, 5:25, 2:10].eq(2).all()  # parts kept
    assert labels[8:11, 8:11, 0:2].eq(1).all()
    assert notes == ["brain closed as one object: 0.0 mL outside its largest part removed, 0.1 mL of holes filled"]
    # a slice's hole that opens to the outside in 3-D (through the top) is still closed on its slice
    cup = torch.zeros(20, 20, 6, dtype=torch.uint8)
    cup[2:18, 2:18, 0:6] = 2
    cup[6:14, 6:14, 2:6] = 0
    close_wholes(cup, BRAIN, 0.001)
    assert cup[6:14, 6:14, 2:6].eq(1).all()
    assert structure_mask(cup, BRAIN[0]).sum() == 16 * 16 * 6


def test_contrasts_are_read_from_what_a_series_is_called():
    assert contrast_of("Ax T1 MPRAGE") == "T1" and contrast_of("sag T1 FLAIR") == "T1"
    assert contrast_of("AX T2 FLAIR") == "FLAIR" and contrast_of("t2_tse_tra") == "T2"
    assert contrast_of("T1 POST GAD") == "T1c" and contrast_of("DWI b1000") == "DWI"
    assert contrast_of("localizer") is None and contrast_of("BRAIN W/WO CONTRAST") is None
    # what a series is called in practice: no T1 without contrast agent flagged as T1c, no posterior fossa either
    expected = {"T1 PRE-CONTRAST": "T1", "AX T1 PRE GAD": "T1", "T1 without contrast": "T1", "T1 non-contrast": "T1",
                "SAG T1 POST FOSSA": "T1", "T1 SPACE": "T1", "T1 3D sequence": "T1", "t1_flair_sag": "T1",
                "AX T1 + C": "T1c", "t1_mprage_sag_post_gd": "T1c", "t2_tirm_tra_dark-fluid": "FLAIR",
                "PD TSE": "PD", "pd_tse_tra": "PD", "ep2d_diff_mddw_trace": "DWI", "T2*": "SWI"}
    assert {d: contrast_of(d) for d in expected} == expected
    import pydicom

    header = pydicom.Dataset()
    header.SeriesDescription, header.ProtocolName = "AX", "t2_flair_dark-fluid"
    assert dicom_contrast(header) == "FLAIR"
    header.SeriesDescription, header.ProtocolName = "AX T1", "BRAIN W/WO CONTRAST"  # each field alone
    assert dicom_contrast(header) == "T1"
    assert dicom_contrast(pydicom.Dataset()) is None


def test_a_volume_outside_what_was_measured_is_said_so():
    inside = scope(MEASURED, "mr", (0.9, 0.9, 5.0), "T1")
    assert inside.within is True and inside.note == ""
    flair = scope(MEASURED, "mr", (1, 1, 1), "FLAIR", "DICOM series description")
    assert flair.within is False and "its contrast is FLAIR (from the DICOM series description)" in flair.note
    assert "MR T1, slices 1-5 mm" in flair.note
    thick = scope(MEASURED, "mr", (1, 1, 7.5), "T1")
    assert thick.within is False and "7.5 mm apart" in thick.note
    assert scope(MEASURED, "mr", (1, 1, 5.5), "T1").within is True  # within 10% of the thickest measured
    unknown = scope(MEASURED, "mr", (1, 1, 1))
    assert unknown.within is None and "contrast is not known" in unknown.note
    assert scope({}, "ct", (1, 1, 3)).within is None and scope({}, "ct", (1, 1, 3)).note == ""
    with pytest.raises(ValueError, match="contrast must be one of"):
        scope(MEASURED, "mr", (1, 1, 1), "T7")


def test_a_checkpoint_records_what_it_was_measured_on_and_refuses_nonsense():
    config = released_config()
    name = config.modalities[0].name
    measured = config.replace(modalities=[{**m.__dict__, "structures": [s.__dict__ for s in m.structures],
                                            "measured": MEASURED} for m in config.modalities])
    assert measured.modality(name).measured == MEASURED
    assert type(measured).from_dict(measured.to_dict()).modality(name).measured == MEASURED
    for bad in ({"contrasts": ["T7"]}, {"slice_mm": [5, 1]}, {"slice_mm": [1]}, {"thickness": 3}):
        with pytest.raises(ValueError, match="measured must be"):
            config.replace(modalities=[{**m.__dict__, "structures": [s.__dict__ for s in m.structures],
                                        "measured": bad} for m in config.modalities])


# The shipped MR model's whole brain on the heads with skull it was never trained on, as stored, in another storage
# order, and as 5 mm axial slices made from them (``thick_slices``) in two storage orders: pinned a little under the
# model card's figures (0.4.9, float32). ROBEX's and ITK's are development heads (settings were chosen looking at
# them); the TRIO_Y_NDC template is held out (first scored with 0.4.9; nothing chosen on it).
AT_LEAST = {("robex_t1", "stored"): 0.90, ("robex_t1", "5 mm"): 0.895,  # 0.912 (three planes), 0.905 (mirrored)
            ("itk_t1", "stored"): 0.92, ("itk_t1", "5 mm"): 0.91,  # 0.935, 0.922 (three planes)
            ("trio_head", "stored"): 0.915, ("trio_head", "5 mm"): 0.87}  # 0.928 (three planes), 0.886 (mirrored)


@pytest.fixture(scope="module")
def starter():
    from delightsam import load_model

    return load_model(REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("head", ["robex_t1", "itk_t1", "trio_head"])
def test_the_mr_brain_is_found_in_held_out_heads_as_stored_and_as_thick_slices(starter, samples, tmp_path, head):
    """ROBEX's reference T1 (1.5 mm, stored LAS), ITK's example T1 (2x2x3 mm coronal slices) and the TRIO_Y_NDC
    template (1 mm; never looked at before 0.4.9's figures): the whole brain (brain with grey and white matter)
    against each head's brain mask, as stored and reordered (the same voxels), and as 5 mm axial slices in RAS and in
    S-L-P order (the same voxels again); one closed object each time. ROBEX's 1.5 mm head, TRIO's 1 mm head, ITK's
    2x2x3 mm head and its 2x3x5 mm axial series are seen in three planes (``multiplanar``), and find more of the brain
    than in their acquisition plane alone; ROBEX's and TRIO's 5 mm axial slices of small pixels in their own plane, as
    they are and mirrored left-right (``multiplanar.mirrors``), which finds more of the brain than their slices
    decoded once."""
    from delightsam.pipeline import segment_volume
    from delightsam.reading import read_label, read_volume
    from scipy import ndimage

    image, label = (nib.load(samples / "samples" / p / f"{head}.nii.gz") for p in ("", "labels"))
    pairs = held_out_conditions(image, label)
    conditions = {"stored": [pairs["stored"], pairs["pir"]], "5 mm": [pairs["5mm_ras"], pairs["5mm_slp"]]}
    brain = starter.config.modality("mr").structures[0]
    for condition, orders in conditions.items():
        masks = []
        for k, (img, lab) in enumerate(orders):
            paths = tmp_path / f"{condition[0]}{k}.nii.gz", tmp_path / f"{condition[0]}{k}_label.nii.gz"
            nib.save(img, paths[0])
            nib.save(lab, paths[1])
            volume = read_volume(paths[0])
            reference = np.asarray(read_label(paths[1], volume)) > 0
            result = segment_volume(starter, volume, "mr")
            mask = structure_mask(result.labels, brain)
            dice = 2 * (mask & reference).sum() / (mask.sum() + reference.sum())
            assert dice >= AT_LEAST[head, condition], (head, condition, k, dice)
            three = any("seen in axial, coronal, sagittal slices" in n for n in result.notes)
            assert three == (head == "itk_t1" or condition == "stored"), result.notes
            assert any("mirrored left-right" in n for n in result.notes) == (not three), result.notes
            if k == 0:  # three planes, or the mirror images, against the acquisition plane's slices decoded once
                alone = structure_mask(_in_one_plane(starter, volume), brain)
                assert dice > 2 * (alone & reference).sum() / (alone.sum() + reference.sum()) + 0.002
            assert ndimage.label(mask, np.ones((3, 3, 3)))[1] == 1  # one object
            masks.append(nib.as_closest_canonical(nib.Nifti1Image(mask.astype(np.uint8), img.affine)).get_fdata() > 0)
        assert np.array_equal(*masks), (head, condition)  # the storage order changes nothing


def _in_one_plane(model, volume) -> np.ndarray:
    """``model``'s MR labels of ``volume`` in its acquisition plane alone, each slice decoded once (the MR modality's
    planes set aside: not mirrored either)."""
    from delightsam.pipeline import segment_volume

    spec = model.config.modality("mr")
    planes, spec.planes = spec.planes, []
    try:
        return segment_volume(model, volume, "mr").labels
    finally:
        spec.planes = planes


def test_a_painted_lesion_stays_inside_the_brain_and_stays_brain():
    from delightsam.augmentation import augment_slice, lesion

    grey, brain = torch.full((1, 64, 64), 100.0), torch.zeros(64, 64)
    brain[16:48, 16:48] = 1
    painted = [lesion(grey, brain, torch.Generator().manual_seed(s), chance=1.0) for s in range(10)]
    assert all((p != grey).any() for p in painted)  # a lesion each time
    assert all(((p != grey)[0] <= (brain > 0)).all() for p in painted)  # never outside the brain
    masks = torch.stack([brain, torch.zeros(64, 64)])
    for seed in range(5):  # the labels are those of the slice augmented without it (the lesion is brain)
        with_whole, masks_whole = augment_slice(grey, masks, seed, "mr", whole=0)
        without, masks_without = augment_slice(grey, masks, seed, "mr", whole=None)
        assert torch.equal(masks_whole, masks_without)



def test_mr_augmentation_darkens_a_slice_as_a_coil_falls_off_and_ct_augmentation_does_not():
    """A head coil's fall-off: an MR slice far from its centre (the cerebellum, the vertex) is a third to a half
    darker than the volume's grey levels say, and MR training shows such slices; CT's Hounsfield units do not fall
    off, and its augmentation keeps a slice's middle within a fifth of its level."""
    from delightsam.augmentation import augment_slice

    grey, masks = torch.full((1, 64, 64), 128.0), torch.zeros((1, 64, 64))
    middle = {modality: [float(augment_slice(grey, masks, seed, modality)[0][0, 24:40, 24:40].mean())
                         for seed in range(100)] for modality in ("ct", "mr")}
    assert sum(level < 90 for level in middle["mr"]) >= 5  # darkened by a third or more
    assert min(middle["ct"]) > 100
