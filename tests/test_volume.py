"""Whole-volume inference in the library (shared by the app and evaluation): grid, axis, overlaps, input checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from helpers import REPO, make_test_checkpoint
from delightsam import load_model
from delightsam.geometry import acquisition_plane, fitted_size, to_grey_levels
from delightsam.training_data import SliceData, TrainItem
from delightsam.label_maps import combine
from delightsam.pipeline import segment_volume
from delightsam.reading import read_label, read_volume


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors"))


@pytest.fixture(scope="module")
def starter():
    return load_model(REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors")


def test_label_map_is_on_the_input_grid_and_finds_the_liver(starter, samples):
    """The shipped model on a real CT, read with its affine: a uint8 label map of the input's shape, the liver
    where the reference has it (a training volume: this checks the path, not accuracy)."""
    image = read_volume(samples / "studies" / "ts_ct_small.nii.gz")
    result = segment_volume(starter, image, "ct")
    assert result.labels.shape == tuple(image.shape) and result.labels.dtype == np.uint8
    assert result.label_names == {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 4, "stomach": 5}
    assert result.plane == "axial" and result.slice_axis == 2
    reference = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_small.nii.gz", image)) == 5
    liver = result.labels == 1
    assert 2 * (liver & reference).sum() / (liver.sum() + reference.sum()) > 0.5


def test_slices_follow_the_acquisition_axis():
    assert acquisition_plane(np.diag([0.57, 0.57, 5.0, 1])) == ("axial", 2)
    assert acquisition_plane(np.diag([5.0, 0.8, 0.8, 1])) == ("sagittal", 0)
    assert acquisition_plane(np.diag([0.8, 5.0, 0.8, 1])) == ("coronal", 1)
    # isotropic: axial, whichever stored axis runs along S-I
    assert acquisition_plane(np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])) == ("axial", 1)
    # near-isotropic, whichever axis is a little wider: a thin-slice CT (the 512x512x600 abdomen's 0.715 x 0.592 x
    # 0.56 mm, which was cut sagittally and lost every organ but the liver) and a 3-D MR of 1 x 1 x 1.2 mm
    assert acquisition_plane(np.diag([0.715, 0.592, 0.56, 1])) == ("axial", 2)
    assert acquisition_plane(np.array([[0, 0, 1.2, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])) == ("axial", 1)
    assert acquisition_plane(np.diag([1.5, 1.0, 1.0, 1])) == ("sagittal", 0)  # from 1.5 times: the cut axis


def test_each_slice_is_segmented_on_its_own(starter, samples):
    # Slicing along the right axis: a volume's slice gives the same labels as that slice alone.
    image = read_volume(samples / "studies" / "ts_ct_small.nii.gz")
    full = segment_volume(starter, image, "ct").labels
    single = segment_volume(starter, image[:, :, 15:16], "ct", affine=image.affine).labels
    assert (full[:, :, 15] == 1).sum() > 100  # the liver is in that slice
    np.testing.assert_array_equal(full[:, :, 15:16], single)


def test_fixed_physical_scale_fits_every_field_of_view():
    assert fitted_size((101, 122), 256) == (212, 256)  # SAM's convention: the longer side fills the input
    # 2 mm per input pixel: a 366 x 303 mm slice (3 mm pixels) and a 500 mm one (0.98 mm pixels) keep their size
    assert fitted_size((101, 122), 256, (3.0, 3.0), 2.0) == (152, 183)
    assert fitted_size((512, 512), 256, (0.9765625, 0.9765625), 2.0) == (250, 250)
    assert fitted_size((512, 512), 256, (1.5, 1.5), 2.0) == (256, 256)  # 768 mm does not fit: shrunk
    assert fitted_size((100, 200), 256, (2.0, 1.0), 2.0) == (100, 100)  # non-square pixels come out square


def _network_inputs(model, image, modality="ct") -> torch.Tensor:
    """What the network is given for each slice of ``image`` by whole-volume inference."""
    seen = []
    handle = model.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    try:
        segment_volume(model, image, modality)
    finally:
        handle.remove()
    return torch.cat(seen)


def test_a_fixed_scale_model_sees_an_organ_at_one_size_in_any_field_of_view_and_trains_on_what_it_sees(tmp_path, samples):
    """With ``pixel_mm``, a real CT (366 x 303 mm) and the same CT in a wider field of view (486 x 423 mm, air
    around it, stored LPS) reach the network with the anatomy at the same place and size in pixels (fitting the
    longer side would shrink it by a third); and training cuts exactly the slices that inference cuts."""
    model = load_model(make_test_checkpoint(tmp_path / "m.safetensors"))
    model.config.modality("ct").pixel_mm = 2.0
    path = samples / "studies" / "ts_ct_small.nii.gz"
    source = nib.load(path)
    wide = np.pad(source.get_fdata(dtype=np.float32), ((20, 20), (20, 20), (0, 0)), constant_values=-1024.0)
    affine = source.affine.copy()
    affine[:3, 3] -= 20 * source.affine[:3, :2].sum(1)
    lps = nib.Nifti1Image(wide, affine).as_reoriented(np.array([[0, -1], [1, -1], [2, 1]]))
    nib.save(lps, tmp_path / "wide_lps.nii.gz")
    inputs = _network_inputs(model, read_volume(path))
    wide_inputs = _network_inputs(model, read_volume(tmp_path / "wide_lps.nii.gz"))
    assert inputs.shape == wide_inputs.shape == (30, 3, 256, 256)
    slice_area = inputs[:, 0] != 0
    assert slice_area[:, 151, :183].any() and not slice_area[:, 152:].any() and not slice_area[:, :, 183:].any()
    assert (wide_inputs[:, 0] != 0)[:, 211].any() and not (wide_inputs[:, 0] != 0)[:, 212:].any()  # 423 mm at 2 mm
    # 20 voxels of 3 mm = 30 input pixels of margin; the same picture inside it (off the interpolated rim)
    inner = (slice(None), slice(None), slice(2, 148), slice(2, 180))
    difference = (inputs[inner] - wide_inputs[..., 30:, 30:][inner]).abs()
    assert difference.mean() < 0.02 * inputs[inner].abs().mean()
    data = SliceData([TrainItem("ts_ct_small", str(path), str(samples / "samples" / "labels" / "ts_ct_small.nii.gz"), "ct")],
                     model)
    trained_on = data.batch([(0, z) for z in range(30)])[0]
    torch.testing.assert_close(trained_on, inputs, atol=0.02, rtol=0)  # grey levels kept as float16


def test_overlapping_structures_resolve_deterministically():
    probabilities = torch.tensor([[0.9, 0.6, 0.2, 0.7], [0.8, 0.6, 0.3, 0.7], [0.1, 0.1, 0.4, 0.95]])
    assert combine(probabilities, [1, 2, 5]).tolist() == [1, 1, 0, 5]  # ties go to the first structure


def test_ct_window_and_mr_percentiles():
    ct = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    assert to_grey_levels(ct, {"window": [-160, 240]}).tolist() == [0.0, 0.0, 127.5, 255.0, 255.0]
    mr = torch.arange(1000.0)
    grey = to_grey_levels(mr, {"percentiles": [1, 99]})
    assert grey[5] == 0 and grey[-5] == 255 and 0 < grey[500] < 255


def test_bad_volumes_are_refused_with_reasons(model):
    with pytest.raises(ValueError, match="expected a 3-D volume, got a 2-D image"):
        segment_volume(model, np.zeros((32, 32)), "ct")
    with pytest.raises(ValueError, match="no finite voxel"):
        segment_volume(model, np.full((8, 8, 2), np.nan), "ct")
    with pytest.raises(KeyError, match="unknown modality 'xray'"):
        segment_volume(model, np.zeros((8, 8, 2)), "xray")
    volume = np.zeros((16, 16, 2), np.float32)
    volume[0, 0, 0] = np.nan
    assert segment_volume(model, volume, "ct").non_finite_voxels == 1


