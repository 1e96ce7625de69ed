"""Whole-volume inference in the library (shared by the app and evaluation): grid, axis, overlaps, input checks."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import make_test_checkpoint
from delightsam import load_model
from delightsam.volume import combine, segment_volume, slice_axis, to_grey_levels


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(make_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "m.safetensors"))


def test_label_map_is_on_the_input_grid(model, samples):
    image = nib.load(samples / "studies" / "ts_ct_small.nii.gz")
    result = segment_volume(model, image.get_fdata(), "ct", image.header.get_zooms())
    assert result.labels.shape == image.shape and result.labels.dtype == np.uint8
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}
    assert result.label_names == {"liver": 1, "spleen": 2, "kidney": 3}


def test_slices_follow_the_acquisition_axis():
    assert slice_axis((0.57, 0.57, 5.0)) == 2
    assert slice_axis((5.0, 0.8, 0.8)) == 0
    assert slice_axis((1.0, 1.0, 1.0)) == 2


def test_each_slice_is_segmented_on_its_own(model):
    # Slicing along the right axis: a volume's slice gives the same labels as that slice alone.
    volume = np.random.default_rng(0).normal(0, 200, (40, 48, 6)).astype(np.float32)
    full = segment_volume(model, volume, "ct", (1, 1, 3)).labels
    single = segment_volume(model, volume[:, :, 2:3], "ct", (1, 1, 3)).labels
    np.testing.assert_array_equal(full[:, :, 2:3], single)


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
