"""Checkpoint files: the project's format, the released format, the converter, and bad files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import delightsam
from helpers import random_images, small_model
from delightsam import CheckpointError, load_model, save_model


@pytest.fixture()
def project_file(tmp_path) -> Path:
    model = small_model(256)
    model.add_modality("ct", ["liver", "spleen"])
    model.config.version = "test-1"
    return save_model(model, tmp_path / "model.safetensors")


def test_project_checkpoint_round_trip(project_file):
    model = load_model(project_file)
    again = small_model(256)
    again.add_modality("ct", ["liver", "spleen"])
    loaded, fresh = model.state_dict(), again.state_dict()
    assert loaded.keys() == fresh.keys()
    assert all(torch.equal(loaded[k], fresh[k]) for k in fresh)
    c = model.config
    assert c.version == "test-1" and c.img_size == 256 and not model.training
    assert [s.name for s in c.modality("ct").structures] == ["liver", "spleen"]
    with safe_open(str(project_file), "pt") as f:
        assert f.metadata()["format"] == "delightsam"


def test_half_precision_storage(tmp_path, project_file):
    model = load_model(project_file)
    half = load_model(save_model(model, tmp_path / "half.safetensors", half=True))
    assert (tmp_path / "half.safetensors").stat().st_size < 0.55 * project_file.stat().st_size
    assert all(p.dtype == torch.float32 for p in half.parameters())
    images = random_images(1, 256)
    with torch.no_grad():
        a, b = model(images, "ct").mask_logits, half(images, "ct").mask_logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_input_size_can_be_overridden_at_load(project_file):
    assert load_model(project_file, img_size=512).config.img_size == 512


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_model(tmp_path / "nope.safetensors")


def test_empty_file(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        load_model(tmp_path / "empty.pth")


def test_truncated_project_checkpoint(tmp_path, project_file):
    data = project_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors"):
        load_model(tmp_path / "cut.safetensors")


def test_truncated_released_checkpoint(tmp_path, reference_dir):
    data = (reference_dir / "reference_random_state_dict.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAYLOAD_MARK']}",))


def test_random_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    mark = tmp_path / "code-ran"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    path = tmp_path / "evil.pth"
    torch.save({"SemiTViT.x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_model(path)
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="could run code|not a readable"):
        load_model(plain)
    assert not mark.exists()


def test_checkpoint_with_a_missing_key_names_it(tmp_path, reference_state):
    state = dict(reference_state)
    del state["SemiTViT.layers.2.blocks.3.attn.qkv.weight"]
    del state["SemiTViT.layers.1.blocks.0.med_dah.fc1.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing 2 tensor\(s\).*SemiTViT.layers.1.blocks.0.med_dah.fc1.bias"
                                              r".*SemiTViT.layers.2.blocks.3.attn.qkv.weight"):
        load_model(tmp_path / "partial.pth")


def test_checkpoint_with_an_unknown_key(tmp_path, reference_state):
    torch.save({**reference_state, "SemiTViT.extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match="not part of the released.*SemiTViT.extra.weight"):
        load_model(tmp_path / "extra.pth")


def test_foreign_checkpoint(tmp_path):
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(2)}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="neither a De-LightSAM project checkpoint nor a released"):
        load_model(tmp_path / "sam.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict of tensors"):
        load_model(tmp_path / "list.pth")


def test_wrong_shape(tmp_path, reference_state):
    state = dict(reference_state)
    state["mask_query.weight"] = torch.zeros(6, 256)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape.*query_groups.released \[6, 256\]"):
        load_model(tmp_path / "shape.pth")


def _released_variant(reference_state, seed: int) -> dict[str, torch.Tensor]:
    """The reference weights with another modality controller, as another released checkpoint would be."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=g)) if ("med" in k) else v
            for k, v in reference_state.items()}


def test_convert_merges_released_checkpoints(tmp_path, reference_state):
    torch.save(_released_variant(reference_state, 1), tmp_path / "ESP_isic_best.pth")
    torch.save(_released_variant(reference_state, 2), tmp_path / "ESP_lung_best.pth")
    out = tmp_path / "merged.safetensors"
    cli = [sys.executable, "-m", "delightsam.cli"]
    run = subprocess.run(cli + ["convert", str(tmp_path / "ESP_isic_best.pth"), str(tmp_path / "ESP_lung_best.pth"),
                                "-o", str(out), "--img-size", "256"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    merged = load_model(out)
    assert merged.config.modality_names == ["dermoscopy", "xray"]
    assert merged.config.controller_names == ["dermoscopy", "xray"]
    # The trunk is stored once: two controllers cost one controller's parameters more than one file.
    single = load_model(tmp_path / "ESP_isic_best.pth", img_size=256)
    extra = sum(p.numel() for p in merged.parameters()) - sum(p.numel() for p in single.parameters())
    assert extra == 3_144_202
    images = random_images(2, 256)
    with torch.no_grad():
        both = merged(images, ["dermoscopy", "xray"]).mask_logits
        for i, (name, modality) in enumerate([("ESP_isic_best.pth", "dermoscopy"), ("ESP_lung_best.pth", "xray")]):
            alone = load_model(tmp_path / name, img_size=256)(images[i : i + 1], modality).mask_logits
            torch.testing.assert_close(both[i : i + 1], alone, atol=1e-4, rtol=1e-4)
    info = subprocess.run(cli + ["info", str(out)], capture_output=True, text=True)
    assert info.returncode == 0 and "modality xray: controller xray" in info.stdout


def test_convert_refuses_checkpoints_with_different_trunks(tmp_path, reference_state):
    torch.save(reference_state, tmp_path / "a.pth")
    other = dict(reference_state)
    other["mask_decoder.output_upscaling.0.bias"] = other["mask_decoder.output_upscaling.0.bias"] + 1
    torch.save(other, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="differ outside their modality controllers"):
        delightsam.load_released([tmp_path / "a.pth", tmp_path / "b.pth"], ["fundus", "xray"])


def test_convert_cli_reports_bad_input(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    run = subprocess.run([sys.executable, "-m", "delightsam.cli", "convert", f"{tmp_path / 'junk.pth'}:fundus",
                          "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert run.returncode == 2
    assert "error" in run.stderr and "junk.pth" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_init_makes_an_untrained_checkpoint_with_modalities(tmp_path):
    out = tmp_path / "new.safetensors"
    run = subprocess.run([sys.executable, "-m", "delightsam.cli", "init", "-o", str(out), "--modality",
                          "ct:liver,spleen=5", "--modality", "mr:brain=7", "--img-size", "256"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    model = load_model(out)
    ct = model.config.modality("ct")
    assert [(s.name, s.label) for s in ct.structures] == [("liver", 1), ("spleen", 5)]
    assert ct.intensity == {"window": [-160.0, 240.0]}
    assert model.config.modality("mr").intensity == {"percentiles": [0.5, 99.5]}
    bad = subprocess.run([sys.executable, "-m", "delightsam.cli", "init", "-o", str(tmp_path / "x.safetensors"),
                          "--modality", "ct"], capture_output=True, text=True)
    assert bad.returncode == 2 and "NAME:STRUCTURE" in bad.stderr
