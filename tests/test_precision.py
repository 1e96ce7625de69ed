"""The networks' products in bfloat16 where the CPU computes it natively (``delightsam.precision``): chosen by name
and refused when misspelt; the shipped model's answers in bfloat16 are float32's to within what the model card
reports, on the development CT in two storage orders and on the MR template; and what the speed-ups that keep the
answer exact leave exact (the foundation's silent experts skipped, integer NIfTI read as integers)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from delightsam import load_model
from delightsam.dc_encoder import _silent
from delightsam.foundation import _quiet_additions
from delightsam.headers import check_volume
from delightsam.pipeline import Pipeline
from delightsam.reading import read_label, read_volume
from test_body_frame import _reordered
from test_registration_prior import _back

from helpers import APP_DIR, STARTER, random_images, small_model

# the development DICOM CT's reference ids (TotalSegmentator's) -> ours, and the model card's Dice in float32
CT_IDS, CT_CARD = {5: 1, 1: 2, 6: 5}, {1: 0.963, 2: 0.928, 5: 0.841}


@pytest.fixture(scope="module")
def shipped():
    return load_model(STARTER)


def test_auto_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    import delightsam.precision as precision

    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
    assert precision.resolve("auto") == "float32"
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    assert precision.resolve("auto") == "bfloat16" and precision.resolve("auto", "cuda") == "float32"
    assert precision.resolve("float32") == "float32" and precision.resolve("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'fp16'"):
        precision.resolve("fp16")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    for name, dtype in (("bfloat16", torch.bfloat16), ("auto", torch.bfloat16), ("float32", torch.float32)):
        with precision.products_in(name):
            assert torch.mm(a, b).dtype == dtype, name  # the products really run so


def test_the_app_takes_a_precision_by_name_and_refuses_a_misspelt_one(tmp_path):
    from delightsam_app.settings import AppSettings

    assert AppSettings.from_conf({"model_dir": str(tmp_path)}, APP_DIR).pipeline.precision == "auto"
    assert AppSettings.from_conf({"model_dir": str(tmp_path), "precision": "Float32"}, APP_DIR).pipeline.precision == "float32"
    with pytest.raises(ValueError, match="precision must be one of auto, float32, bfloat16, got 'half'"):
        AppSettings.from_conf({"model_dir": str(tmp_path), "precision": "half"}, APP_DIR)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_bfloat16_gives_float32s_organs_on_a_real_ct_in_two_storage_orders(samples, shipped):
    image = read_volume(samples / "samples" / "ts_ct_dicom")
    reference = np.asarray(read_label(samples / "samples" / "labels" / "ts_ct_dicom.nii.gz", image)).round()
    single = Pipeline(["ct"], precision="float32").segment(shipped, image, "ct", batch_size=4)
    assert not any("bfloat16" in note for note in single.notes)
    halves = []
    for volume in (image, _reordered(image)):
        result = Pipeline(["ct"], precision="bfloat16").segment(shipped, volume, "ct", batch_size=4)
        assert any("matrix products in bfloat16" in note for note in result.notes), result.notes
        halves.append(result.labels if volume is image else _back(result.labels, image))
    np.testing.assert_array_equal(halves[0], halves[1])
    assert (halves[0] != single.labels).any()  # bfloat16 ran: not float32's labels to the voxel
    for ts, ours in CT_IDS.items():
        truth, mine, exact = reference == ts, halves[0] == ours, single.labels == ours
        assert _dice(mine, exact) > 0.97, ours  # the same organ as float32 draws
        assert _dice(mine, truth) > CT_CARD[ours] - 0.01, ours  # and as good against the reference


@pytest.mark.slow
def test_bfloat16_gives_float32s_brain_tissue_on_the_mr_template(samples, shipped):
    whole = read_volume(samples / "studies" / "mni152_t1.nii.gz")
    reference = np.asarray(read_label(samples / "samples" / "labels" / "mni152_t1.nii.gz", whole)).astype(np.uint8)
    image, reference = whole[..., 60:124], reference[..., 60:124]  # 64 axial slices through the ventricles: CI's time
    answers = {p: Pipeline(precision=p).segment(shipped, image, "mr", batch_size=4).labels for p in ("float32", "bfloat16")}
    for s in shipped.config.modality("mr").structures:
        if s.name == "brain":
            continue  # the whole brain's id marks only what is neither grey nor white matter
        exact, half, truth = (np.asarray(a) == s.label for a in (answers["float32"], answers["bfloat16"], reference))
        assert truth.sum() > 0 and _dice(half, exact) > 0.97, s.name
        assert _dice(half, truth) > _dice(exact, truth) - 0.005, s.name


def test_the_foundations_silent_experts_are_skipped_only_when_nothing_learns(monkeypatch):
    """A refiner's controllers are the foundation's additions made silent (their experts output zero): at inference
    they are not run, and the embeddings are exactly those with them; in training they run, so that gradients reach
    them."""
    import delightsam.dc_encoder as dc_encoder

    model = small_model(img_size=64)
    _quiet_additions(model)
    images, controllers = random_images(2, 64), [model.config.modalities[0].controller] * 2
    experts = [block.expert for ctl in model.encoder.controllers.values() for stage in ctl.stages for block in stage]
    assert experts and all(_silent(e) for e in experts)
    calls = []
    for expert in experts:
        expert.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        skipped = model.encoder(images, controllers)
        assert not calls
        with monkeypatch.context() as m:
            m.setattr(dc_encoder, "_silent", lambda mlp: False)
            computed = model.encoder(images, controllers)
    used = [block.expert for stage in model.encoder.controllers[controllers[0]].stages for block in stage]
    assert len(calls) == len(used) and torch.equal(skipped, computed)
    model.encoder(images, controllers).square().mean().backward()  # gradients on: every expert runs
    assert len(calls) == 2 * len(used) and all(e.fc2.weight.grad.abs().sum() > 0 for e in used)  # training moves them


def test_an_integer_nifti_with_an_intercept_is_read_as_integers_of_the_same_values(tmp_path):
    """A CT stored as int16 with scl_inter -1024 (as the held-out chest-abdomen CT is): its values as nibabel scales
    them, as integers; a fractional slope is left to nibabel (floats)."""
    stored = np.arange(-1024, 4072, 2, dtype=np.int16)[:2040].reshape(10, 12, 17)
    image = nib.Nifti1Image(stored, np.diag([0.7, 0.7, 2.5, 1.0]))
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(1, -1024)
    nib.save(image, tmp_path / "ct.nii.gz")
    read = read_volume(tmp_path / "ct.nii.gz", dtype=None)
    scaled = np.asanyarray(nib.load(tmp_path / "ct.nii.gz").dataobj)
    assert read.dtype == torch.int16 and scaled.dtype == np.float64
    np.testing.assert_array_equal(read.numpy(), scaled)
    image.header.set_slope_inter(0.5, 0)
    nib.save(image, tmp_path / "half.nii.gz")
    half = read_volume(tmp_path / "half.nii.gz", dtype=None)
    assert half.dtype.is_floating_point
    np.testing.assert_array_equal(half.numpy(), np.asanyarray(nib.load(tmp_path / "half.nii.gz").dataobj))
    # a slope beyond the values' type: scaled in a type that holds it; int64 data with an intercept: its header bounds
    # nothing below int64 (estimated as floats, no error), its values are read in the type that holds them
    steep = nib.Nifti1Image((stored > 0).astype(np.int16), image.affine)
    steep.header.set_slope_inter(40000, -20000)
    nib.save(steep, tmp_path / "steep.nii.gz")
    big = nib.Nifti1Image(stored.astype(np.int64), image.affine, dtype=np.int64)
    big.header.set_slope_inter(1, -1024)
    nib.save(big, tmp_path / "big.nii.gz")
    for name, dtype, estimate in (("steep", torch.int32, 4), ("big", torch.int16, 8)):
        path = tmp_path / f"{name}.nii.gz"
        read = read_volume(path, dtype=None)
        assert read.dtype == dtype and check_volume(path).bytes_per_voxel_read == estimate, name
        np.testing.assert_array_equal(read.numpy(), np.asanyarray(nib.load(path).dataobj))
