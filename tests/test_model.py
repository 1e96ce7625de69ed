"""Behaviour beyond the released code: mixed-modality batches, several structures per modality,
new modalities that leave the old ones alone, input sizes other than 1024, clear input errors."""

from __future__ import annotations

import pytest
import torch

from helpers import random_images, small_model
from delightsam import DeLightSAM, DeLightSAMConfig, released_config


@pytest.fixture(scope="module")
def multi_model() -> DeLightSAM:
    """Released modalities plus CT with three structures and MR with two, each with its own controller."""
    model = small_model(256)
    model.add_modality("ct", ["liver", "spleen", ("kidney", 5)])
    model.add_modality("mr", ["brain", "ventricles"], copy_controller_from="released")
    # Perturb the new controllers so that every modality is really different.
    with torch.no_grad():
        for name in ("ct", "mr"):
            for p in model.encoder.controllers[name].parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_mixed_batch_gives_each_sample_its_solo_result(multi_model):
    images = random_images(4, 256)
    modalities = ["ct", "fundus", "mr", "ct"]
    with torch.no_grad():
        batch = multi_model(images, modalities)
        for i, name in enumerate(modalities):
            solo = multi_model(images[i : i + 1], name)
            n = len(solo.structures[0])
            torch.testing.assert_close(batch.mask_logits[i : i + 1, :n], solo.mask_logits, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(batch.image_embeddings[i : i + 1], solo.image_embeddings, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batch.patch_logits[i : i + 1], solo.patch_logits, atol=1e-4, rtol=1e-4)
            assert torch.isneginf(batch.mask_logits[i, n:]).all()  # padding beyond the sample's structures
    assert [[s.name for s in ss] for ss in batch.structures] == [
        ["liver", "spleen", "kidney"], ["retinal vessel"], ["brain", "ventricles"], ["liver", "spleen", "kidney"]]
    assert batch.structures[0][2].label == 5


def test_modalities_really_differ(multi_model):
    # Guards the test above: with one image, different modalities give different embeddings and masks.
    image = random_images(1, 256)
    with torch.no_grad():
        ct, mr = multi_model(image, "ct"), multi_model(image, "mr")
    assert (ct.image_embeddings - mr.image_embeddings).abs().max() > 1e-3
    assert ct.mask_logits.shape[1] == 3 and mr.mask_logits.shape[1] == 2


def test_structures_of_one_modality_are_independent_masks(multi_model):
    with torch.no_grad():
        out = multi_model(random_images(1, 256), "ct")
    liver, spleen = out.mask_logits[0, 0], out.mask_logits[0, 1]
    assert (liver - spleen).abs().max() > 1e-3
    assert torch.isfinite(out.mask_logits).all()


def test_adding_a_modality_leaves_existing_outputs_unchanged():
    model = small_model(256, seed=3)
    images = random_images(2, 256, seed=4)
    with torch.no_grad():
        before = model(images, ["fundus", "xray"])
        params_before = sum(p.numel() for p in model.parameters())
        model.add_modality("ct", ["liver", "spleen"])
        after = model(images, ["fundus", "xray"])
    assert torch.equal(before.mask_logits, after.mask_logits)
    assert torch.equal(before.image_embeddings, after.image_embeddings)
    # The trunk is shared: the new modality adds its controller and its two queries only.
    added = sum(p.numel() for p in model.parameters()) - params_before
    assert added == 3_144_202 + 2 * 256


def test_modalities_can_share_a_controller_and_keep_their_own_queries():
    model = DeLightSAM(DeLightSAMConfig(img_size=256))
    model.add_modality("ct", ["liver", "spleen"], controller="radiology")
    params = sum(p.numel() for p in model.parameters())
    model.add_modality("mr", [("brain", 1, [2]), ("grey_matter", 2)], controller="radiology")
    assert model.config.controller_names == ["radiology"]
    assert sum(p.numel() for p in model.parameters()) - params == 2 * 256  # its two queries, no controller
    assert model.config.modality("mr").structures[0].target_labels == [1, 2]
    with torch.no_grad():
        out = model(random_images(2, 256), ["ct", "mr"])
    assert [[s.name for s in st] for st in out.structures] == [["liver", "spleen"], ["brain", "grey_matter"]]


@pytest.mark.parametrize("size", [256, 512])
def test_input_size_is_configuration(size):
    model = small_model(size)
    assert model.config.embedding_size == size // 16 and model.config.patch_grid == size // 32
    with torch.no_grad():
        out = model(random_images(1, size), "dermoscopy")
    assert out.image_embeddings.shape == (1, 256, size // 16, size // 16)
    assert out.patch_logits.shape == (1, 1, size // 32, size // 32)
    assert out.low_res_logits.shape == (1, 1, size // 4, size // 4)
    assert out.mask_logits.shape == (1, 1, size, size)


def test_released_stage_resolutions_at_1024():
    assert released_config().stage_resolutions == (256, 128, 64, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        released_config(img_size=500)


def test_bad_inputs_get_clear_errors():
    model = small_model(256)
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        model(torch.zeros(1, 3, 512, 512), "fundus")
    with pytest.raises(ValueError, match=r"\[B, 3, 256, 256\]"):
        model(torch.zeros(3, 256, 256), "fundus")
    with pytest.raises(KeyError, match="unknown modality 'ct'.*dermoscopy"):
        model(torch.zeros(1, 3, 256, 256), "ct")
    with pytest.raises(ValueError, match="2 modalities given for a batch of 1"):
        model(torch.zeros(1, 3, 256, 256), ["fundus", "xray"])
    with pytest.raises(ValueError, match="exists already"):
        model.add_modality("fundus", ["vessel"])
