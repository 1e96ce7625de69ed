"""Faithfulness to the released De-LightSAM: key mapping, parameter count, and the numerical fixture
made with the authors' own code (../shared/reference)."""

from __future__ import annotations

import json

import pytest
import torch

import delightsam
from delightsam.checkpoint import released_to_project

RELEASED_PARAMETERS = 12_789_587
# Released tensors that never reach the outputs: TinyViT's ImageNet head (norm_head, head) and SAM's
# point/box/mask prompt embeddings. The converter checks they are the only ones it drops.
UNUSED_PARAMETERS = 321_640 + 6_220


def test_every_released_key_is_mapped_or_known_unused(reference_dir, reference_state):
    keys = json.loads((reference_dir / "state_dict_keys.json").read_text())
    assert set(keys) == set(reference_state) and len(keys) == 504
    mapped, unused = released_to_project(reference_state)
    assert len(mapped) + len(unused) == 504
    assert all(k.startswith(("SemiTViT.norm_head.", "SemiTViT.head.", "prompt_encoder.")) for k in unused)
    model = delightsam.DeLightSAM(delightsam.released_config())
    assert set(mapped) == set(model.state_dict())  # strict: nothing missing, nothing left over


def test_parameter_count_of_reference_configuration(reference_dir, reference_state):
    model = delightsam.load_model(reference_dir / "reference_random_state_dict.pth")
    used = sum(p.numel() for p in model.parameters())
    _, unused = released_to_project(reference_state)
    dropped = sum(reference_state[k].numel() for k in unused)
    assert sum(v.numel() for k, v in reference_state.items() if "running_" not in k and "num_batches" not in k
               and "positional_encoding" not in k) == RELEASED_PARAMETERS
    assert dropped == UNUSED_PARAMETERS
    assert used + dropped == RELEASED_PARAMETERS
    assert used == 12_461_727


@pytest.fixture(scope="module")
def reference_run(reference_dir, reference_input):
    """One forward pass over a batch of three copies of the fixture image, one per decoded modality:
    this also runs the mixed-modality path of the encoder and decoder."""
    model = delightsam.load_model(reference_dir / "reference_random_state_dict.pth")
    x = delightsam.get_normalization(model)(reference_input).unsqueeze(0)
    with torch.no_grad():
        return model(x.expand(3, -1, -1, -1), ["dermoscopy", "fundus", "colonoscopy"])


def test_normalisation_reproduces_released_quirk(reference_input):
    model = delightsam.DeLightSAM(delightsam.released_config(img_size=256))
    before = reference_input.clone()
    x = delightsam.get_normalization(model)(reference_input)
    assert torch.equal(reference_input, before)  # the input is not normalised in place
    mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
    torch.testing.assert_close(x, reference_input / mean - 1, atol=1e-6, rtol=0)
    assert delightsam.get_normalization(model)(reference_input.unsqueeze(0)).shape == (1, 3, 1024, 1024)


def test_image_embeddings_match_reference(reference_run, reference_outputs):
    expected = reference_outputs["image_embeddings"]
    for i in range(3):
        torch.testing.assert_close(reference_run.image_embeddings[i : i + 1], expected, atol=1e-4, rtol=0)


def test_patch_logits_match_reference(reference_run, reference_outputs):
    expected = reference_outputs["patch_logits"]
    assert expected.abs().max() > 5  # the fixture's patch logits reach about +-10
    for i in range(3):
        torch.testing.assert_close(reference_run.patch_logits[i : i + 1], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("index,channel", [(0, 0), (1, 3), (2, 5)])
def test_mask_logits_match_reference(reference_run, reference_outputs, index, channel):
    expected = reference_outputs[f"mask_logits_modality{channel}_every4th_pixel"]
    got = reference_run.mask_logits[index : index + 1, :, ::4, ::4]
    assert got.shape == expected.shape == (1, 1, 256, 256)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_decoding_channels_differ(reference_outputs):
    # Guards the test above: the three channels are distinct, so a wrong channel choice fails it.
    a, b = reference_outputs["mask_logits_modality0_every4th_pixel"], reference_outputs["mask_logits_modality3_every4th_pixel"]
    assert (a - b).abs().max() > 1e-2
