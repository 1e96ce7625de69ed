"""Distillation fine-tuning: teachers, the embedding cache, the split, what trains, real learning, resume,
and two-process data parallelism (gloo)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import delightsam
from helpers import REPO, make_test_checkpoint, subprocess_env
from delightsam.checkpoint import project_to_released_name
from delightsam.embedding_cache import EmbeddingCache
from delightsam.teachers import TeacherError, init_trunk_from, load_teacher
from delightsam.training import TrainConfig, select_trainable, train
from delightsam.training_data import TrainItem
from delightsam.versions import update_split

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def liver(tmp_path_factory, samples) -> dict:
    """Liver labels (TotalSegmentator id 5) of two real CTs as this model's label 1."""
    tmp = tmp_path_factory.mktemp("liver")
    out = {}
    for name in ("ts_ct_small", "ts_ct_dicom"):
        ref = nib.load(samples / "samples" / "labels" / f"{name}.nii.gz")
        path = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(ref.dataobj) == 5).astype(np.uint8), ref.affine), path)
        out[name] = path
    out["small_image"] = samples / "studies" / "ts_ct_small.nii.gz"
    out["dicom_image"] = samples / "samples" / "ts_ct_dicom"
    return out


def _liver_model(seed: int = 0) -> delightsam.DeLightSAM:
    torch.manual_seed(seed)
    model = delightsam.DeLightSAM(delightsam.DeLightSAMConfig(img_size=256))
    model.add_modality("ct", ["liver"], intensity={"window": [-160, 240]})
    return model


# ---- teachers -------------------------------------------------------------------------------------
def test_lite_medsam_teacher_offline_on_the_student_grid():
    teacher = load_teacher("lite_medsam")
    grey = torch.rand(2, 3, 256, 256) * 255
    embedding = teacher(grey, 16)
    assert embedding.shape == (2, 256, 16, 16) and torch.isfinite(embedding).all()
    assert teacher.input_size == 256 and teacher.id.startswith("lite_medsam@256")


def test_sam_vit_b_teacher_from_a_checkpoint_file(tmp_path):
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    teacher = load_teacher("sam_vit_b", models_dir=tmp_path)  # found under its official file name
    embedding = teacher(torch.rand(1, 3, 256, 256) * 255, 16)  # 1024 grid 64 -> student grid 16
    assert embedding.shape == (1, 256, 16, 16)


def test_mobile_sam_teacher_and_trunk_initialisation(tmp_path):
    # A MobileSAM-format file made from a random TinyViT trunk (released key names under image_encoder.).
    source = _liver_model(seed=5)
    trunk = {k: v for k, v in source.state_dict().items()
             if k.startswith("encoder.") and not k.startswith("encoder.controllers.")}
    state = {"image_encoder." + project_to_released_name(k).removeprefix("SemiTViT."): v for k, v in trunk.items()}
    torch.save(state, tmp_path / "mobile_sam.pt")
    teacher = load_teacher("mobile_sam", models_dir=tmp_path)
    assert teacher(torch.rand(1, 3, 256, 256) * 255, 16).shape == (1, 256, 16, 16)
    student = _liver_model(seed=6)
    loaded, skipped = init_trunk_from(student, "mobile_sam", tmp_path / "mobile_sam.pt")
    assert skipped == [] and len(loaded) == len(trunk)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in trunk.items())


def test_trunk_from_lite_medsam_skips_only_its_different_patch_embedding():
    loaded, skipped = init_trunk_from(_liver_model(), "lite_medsam")
    assert skipped == ["encoder.patch_embed.0.conv.weight", "encoder.patch_embed.2.conv.weight"]
    assert len(loaded) > 250


@pytest.mark.parametrize("name", ["sam_vit_h", "sam_vit_l", "mobile_sam"])
def test_missing_teacher_file_says_where_to_put_it(tmp_path, name):
    with pytest.raises(TeacherError, match=f"not found at {tmp_path}.*put it there"):
        load_teacher(name, models_dir=tmp_path)


# ---- the embedding cache ---------------------------------------------------------------------------
class _CountingTeacher(torch.nn.Module):
    id = "counting@256:1"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, grey, grid):
        self.calls += grey.shape[0]
        return grey[:, :1, :grid, :grid].expand(-1, 256, -1, -1) / 255


def test_embedding_cache_reuses_and_survives_bad_entries(tmp_path):
    teacher, grey = _CountingTeacher(), torch.rand(3, 3, 32, 32) * 255
    first = EmbeddingCache(tmp_path).embed(teacher, grey, 16)
    again = EmbeddingCache(tmp_path).embed(teacher, grey, 16)  # a later run
    assert teacher.calls == 3
    torch.testing.assert_close(first, again, atol=1e-3, rtol=1e-3)  # stored as float16
    cache = EmbeddingCache(tmp_path)
    # a killed writer leaves at most a temporary file; a damaged entry is recomputed
    key = cache.key(teacher.id, 16, grey[0])
    (cache._path(key).parent / f".{key}.123.tmp").write_bytes(b"partial")
    cache._path(key).write_bytes(b"garbage")
    cache.embed(teacher, grey, 16)
    assert teacher.calls == 4 and cache.hits == 2 and cache.misses == 1
    assert cache.key(teacher.id, 8, grey[0]) != key  # the grid is part of the key


def test_the_cache_is_capped_and_evicts_the_least_recently_used(tmp_path):
    teacher, grey = _CountingTeacher(), torch.rand(6, 3, 32, 32) * 255
    entry = 256 * 16 * 16 * 2 + 128  # one float16 embedding and its .npy header
    cache = EmbeddingCache(tmp_path, max_bytes=4 * entry)
    cache.embed(teacher, grey[:3], 16)
    os.utime(cache._path(cache.key(teacher.id, 16, grey[0])), (1, 1))  # the oldest, and not read since
    cache.embed(teacher, grey[1:2], 16)  # read: recently used
    cache.embed(teacher, grey[3:6], 16)  # past the cap
    assert cache.evicted >= 1
    size = sum(p.stat().st_size for p in tmp_path.rglob("*.npy"))
    assert size <= 4 * entry
    assert cache.get(cache.key(teacher.id, 16, grey[0])) is None  # the least recently used went first
    assert cache.get(cache.key(teacher.id, 16, grey[5])) is not None  # the newest stays


def test_two_runs_can_share_the_cache(tmp_path):
    script = ("import torch; from test_training import _CountingTeacher;"
              "from delightsam.embedding_cache import EmbeddingCache;"
              "g = torch.arange(20 * 3 * 32 * 32, dtype=torch.float32).view(20, 3, 32, 32) % 255;"
              f"[EmbeddingCache({str(tmp_path)!r}).embed(_CountingTeacher(), g, 16) for _ in range(3)]")
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=subprocess_env()) for _ in range(2)]
    assert all(r.wait(timeout=120) == 0 for r in runs)
    entries = list(tmp_path.rglob("*.npy"))
    assert len(entries) == 20 and not list(tmp_path.rglob("*.tmp"))
    assert all(np.load(e).shape == (256, 16, 16) for e in entries)


# ---- the split and what trains ---------------------------------------------------------------------
def test_split_is_kept_and_extended_not_reshuffled(tmp_path):
    path = tmp_path / "split.json"
    first = update_split(path, ["a", "b"])
    assert sorted(first.values()) == ["train", "val"]
    ids = [f"case{i:03d}" for i in range(50)]
    grown = update_split(path, ["a", "b", *ids])
    assert all(grown[k] == v for k, v in first.items())
    assert 3 <= sum(v == "val" for v in grown.values()) <= 20
    assert update_split(path, list(grown)) == grown == json.loads(path.read_text())


def test_teaching_a_new_modality_leaves_the_old_ones_unchanged(tmp_path, liver):
    model = delightsam.load_model(make_test_checkpoint(tmp_path / "m.safetensors"))
    model.add_modality("ct_contrast", ["liver"], copy_controller_from="ct", intensity={"window": [-100, 300]})
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        before = model(images, ["ct", "mr"]).mask_logits.clone()
        new_before = model(images[:1], "ct_contrast").mask_logits.clone()
    item = TrainItem("small", str(liver["small_image"]), str(liver["ts_ct_small"]), "ct_contrast")
    config = TrainConfig(epochs=1, steps_per_epoch=3, batch_size=2, lr=1e-3, trainable="modality", teacher=None,
                         tracking="none")
    train(model, [item], [], config, tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(model(images, ["ct", "mr"]).mask_logits, before)
        assert (model(images[:1], "ct_contrast").mask_logits - new_before).abs().max() > 1e-3
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(("encoder.controllers.ct_contrast.", "decoder.query_groups.ct_contrast",
                                         "decoder.group_heads.ct_contrast.")) for n in trained)


@pytest.mark.parametrize("mode", ["controllers", "modality"])
def test_a_released_modality_gets_its_own_parts_before_training(mode):
    # The six released modalities share one controller and one query group: training one must not move the others.
    model = delightsam.DeLightSAM(delightsam.released_config(img_size=256)).eval()
    images = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        before = model(images, ["xray", "dermoscopy"]).mask_logits.clone()
        fundus = model(images[:1], "fundus").mask_logits.clone()
    params = select_trainable(model, ["fundus"], mode)
    spec = model.config.modality("fundus")
    assert spec.controller == "fundus" and model.config.modality("xray").controller == "released"
    with torch.no_grad():
        for p in params:
            p.add_(0.05)
        # unchanged up to float noise (kernel choices may differ once parameters stop requiring gradients)
        torch.testing.assert_close(model(images, ["xray", "dermoscopy"]).mask_logits, before, atol=1e-5, rtol=0)
        assert (model(images[:1], "fundus").mask_logits - fundus).abs().max() > 1e-2


# ---- real learning, resume ---------------------------------------------------------------------------
@pytest.mark.slow
def test_training_on_real_liver_labels_raises_validation_dice(tmp_path, liver):
    """A few minutes on the CPU: LiteMedSAM teacher and trunk, one real CT's liver to train on, another CT
    (the DICOM series) to validate on."""
    model = _liver_model()
    init_trunk_from(model, "lite_medsam")
    train_items = [TrainItem("small", str(liver["small_image"]), str(liver["ts_ct_small"]), "ct")]
    val_items = [TrainItem("dicom", str(liver["dicom_image"]), str(liver["ts_ct_dicom"]), "ct")]
    published = []
    config = TrainConfig(epochs=2, steps_per_epoch=25, batch_size=4, lr=2e-4, trainable="all",
                         cache_dir=str(tmp_path / "cache"), tracking="tensorboard")
    stats = train(model, train_items, val_items, config, tmp_path / "run",
                  publish=lambda m, metrics: published.append(metrics) or "published")
    before = stats["before"]["mean_dice"]
    assert stats["best_metric"] >= before + 0.2, stats
    assert published and published[-1]["mean_dice"] == stats["best_metric"]
    assert stats["cache"]["misses"] <= 30 < stats["cache"]["hits"]  # 30 slices: each embedded once
    assert [e["id"] for e in model.config.modality("ct").box_atlas] == ["small"]  # what it trained on joins the atlas
    assert set(model.config.modality("ct").box_atlas[0]["boxes"]) == {"liver"}
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    # resume: a longer run picks up after epoch 2, with the trained weights, instead of starting over
    config.epochs = 3
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _liver_model(seed=9)
    logs = []
    resumed = train(fresh, train_items, val_items, config, tmp_path / "run", log=logs.append)
    assert resumed["epoch"] == 3 and resumed["before"] == stats["before"]
    assert any("resumed" in line and "epoch 2" in line for line in logs)
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())  # it went on training
    # a finished run is not resumed: the next request starts over from the model it is given
    again = []
    train(_liver_model(seed=9), train_items, val_items, dataclasses.replace(config, epochs=1, steps_per_epoch=1),
          tmp_path / "run", log=again.append)
    assert any("not resuming" in line for line in again)


@pytest.mark.slow
def test_two_processes_with_gloo_step_like_one(tmp_path, liver):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    os.symlink(liver["small_image"], images / "small.nii.gz")
    os.symlink(liver["ts_ct_small"], labels / "small.nii.gz")
    start = make_test_checkpoint(tmp_path / "start.safetensors")
    common = ["train", "--checkpoint", str(start), "--images", str(images), "--labels", str(labels), "--modality",
              "ct", "--epochs", "1", "--steps", "3", "--lr", "1e-4", "--teacher", "none", "--val-fraction", "0",
              "--tracking", "none"]
    single = subprocess.run([str(BIN / "delightsam"), *common, "--batch-size", "4", "--output", str(tmp_path / "one"),
                             "--publish", str(tmp_path / "one.safetensors")], capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-2000:]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(port), "-m", "delightsam.cli",
                          *common, "--batch-size", "2", "--output", str(tmp_path / "two"),
                          "--publish", str(tmp_path / "two.safetensors")], capture_output=True, text=True,
                         start_new_session=True, timeout=300)  # torchrun signals its whole process group
    assert two.returncode == 0, two.stderr[-2000:]
    a = delightsam.load_model(start).state_dict()
    one = delightsam.load_model(tmp_path / "one.safetensors").state_dict()
    both = delightsam.load_model(tmp_path / "two.safetensors").state_dict()
    change = sum(((one[k] - a[k]) ** 2).sum() for k in a if a[k].is_floating_point()).sqrt()
    diff = sum(((one[k] - both[k]) ** 2).sum() for k in a if a[k].is_floating_point()).sqrt()
    assert change > 1e-2 and diff / change < 1e-3


@pytest.fixture
def full_disk(tmp_path):
    """A real 2 MB file system (tmpfs), smaller than any checkpoint: what a full disk is to a publish."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs to fill: {done.stderr.decode()}")
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_during_a_publish_leaves_the_served_model_and_says_so(tmp_path, liver, full_disk):
    from delightsam.versions import publish_version

    served = make_test_checkpoint(tmp_path / "published.safetensors", version="served")
    before = served.read_bytes()
    item = TrainItem("small", str(liver["small_image"]), str(liver["ts_ct_small"]), "ct")
    config = TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, teacher=None, tracking="none")
    logs = []
    stats = train(_liver_model(), [item], [], config, tmp_path / "run", log=logs.append,
                  publish=lambda m, metrics: publish_version(m, metrics, full_disk / "versions", served=served))
    assert stats["published"] == [] and stats["phase"] == "finished"
    assert any("not published, the served model is unchanged" in e and "No space left" in e for e in stats["errors"])
    assert json.loads((tmp_path / "run" / "train_stats.json").read_text())["errors"] == stats["errors"]
    assert served.read_bytes() == before  # untouched
    assert not [p for p in full_disk.rglob("*") if p.is_file()]  # no half-written version left behind
