"""Fine-tuning of the second stage (``refiner_training``): the refiner's queries and heads learn a site's labels
from boxes made as inference makes them, the foundation's own tensors stay as they were, and the adaptation travels
in the checkpoint to the served pipeline. On the shipped model and real CT labels (TotalSegmentator's sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import delightsam
from delightsam.checkpoint import CheckpointError
from delightsam.foundation import foundation_model
from delightsam.geometry import model_input
from delightsam.normalization import get_normalization
from delightsam.pipeline import Pipeline
from delightsam.refiner_training import RefinerTrainer, RefinerTraining, carries_adaptation
from delightsam.sp_generator import boxes_from_masks
from delightsam.training import TrainConfig, train
from delightsam.training_data import SliceData, TrainItem

REPO = Path(__file__).resolve().parents[1]
STARTER = REPO / "models" / "delightsam_ct_mr" / "models" / "model.safetensors"
TS_TO_OURS = {5: 1, 1: 2, 2: 3, 3: 4, 6: 5}  # TotalSegmentator's ids -> the shipped model's (liver ... stomach)
NAMES = ["liver", "spleen", "kidney_right", "kidney_left", "stomach"]


@pytest.fixture(scope="module")
def ct_items(samples) -> dict[str, TrainItem]:
    labels = samples / "samples" / "labels"
    return {"small": TrainItem("ts_ct_small", str(samples / "studies" / "ts_ct_small.nii.gz"),
                               str(labels / "ts_ct_small.nii.gz"), "ct", TS_TO_OURS),
            "dicom": TrainItem("ts_ct_dicom", str(samples / "samples" / "ts_ct_dicom"),
                               str(labels / "ts_ct_dicom.nii.gz"), "ct", TS_TO_OURS)}


def _boxed_dice(refiner, data: SliceData, picks, size: int = 96) -> np.ndarray:
    """Per structure, the refiner's Dice on the picked slices given each structure's tight box from the label."""
    inputs, grey, masks, mods, known = data.batch(picks)
    small = torch.nn.functional.interpolate(grey[:, :1], (size, size), mode="bilinear", antialias=True)
    truth = torch.nn.functional.interpolate(masks, (size, size), mode="nearest-exact") > 0.5
    fitted = [tuple(max(1, round(n * size / grey.shape[-1])) for n in data.fitted[v]) for v, _ in picks]
    x = torch.cat([model_input(small[i: i + 1], f, get_normalization(refiner)) for i, f in enumerate(fitted)])
    with torch.no_grad():
        predicted = refiner(x, mods, boxes_from_masks(truth)).mask_logits > 0
    inter = (predicted & truth).flatten(2).sum(-1).sum(0).double()
    return (2 * inter / (predicted.flatten(2).sum(-1).sum(0) + truth.flatten(2).sum(-1).sum(0)).clamp(min=1)).numpy()


@pytest.mark.slow
def test_the_refiner_learns_the_structure_it_decoded_worst_and_keeps_the_foundation(ct_items, tmp_path):
    """Forty steps on one real CT's labels (the slices it is then probed on: learning, not generalisation, which the
    annotation loop's report measures): the structure the frozen foundation decodes worst from a tight box gains, so
    does the mean, none falls; only the modality's queries and its head changed, and the adaptation survives a save
    and load into the refiner the served pipeline builds."""
    model = delightsam.load_model(STARTER)
    data = SliceData([ct_items["small"]], model)
    refiner = foundation_model(model, img_size=96)
    trainer = RefinerTrainer(refiner, foundation_model(model, img_size=96, adapted=False), ["ct"],
                             RefinerTraining(size=96), seed=0)
    initial = {k: v.clone() for k, v in refiner.state_dict().items()}
    probe = data.fg_index[::3]
    before = _boxed_dice(refiner, data, probe)
    for step in range(40):
        picks = data.sample(0, step, 4, 0, 1.0)
        inputs, grey, masks, mods, known = data.batch(picks, data.augmented(0, step, 4, 0, 0.5))
        with torch.no_grad():
            coarse = model(inputs, mods).mask_logits
        assert trainer.step(grey, masks, coarse, [data.fitted[v] for v, _ in picks], mods, known) is not None
    after = _boxed_dice(refiner, data, probe)
    worst = int(np.argmin(before))  # the right kidney, 0.747 from a tight box before (measured)
    assert after[worst] > before[worst] + 0.01 and after.mean() > before.mean() + 0.01, (NAMES[worst], before, after)
    assert (after > before - 0.01).all(), (before, after)  # and none is forgotten

    adapted = trainer.state()
    assert set(adapted) == {"decoder.query_groups.ct"} | {k for k in refiner.state_dict() if k.startswith("decoder.group_heads.ct.")}
    assert all(not torch.equal(initial[k], v) for k, v in adapted.items() if k in initial)
    changed = [k for k, v in refiner.state_dict().items() if k not in adapted and not torch.equal(v, initial[k])]
    assert not changed, changed[:3]  # the foundation's encoder, transformer, box embedding, upscaling: as loaded
    foundation = foundation_model(model, img_size=96, adapted=False).state_dict()
    for key in ("decoder.query_groups.ct", "decoder.group_heads.ct.layers.0.weight"):  # where adaptation started
        reference = foundation[key.replace("group_heads.ct", "hypernetwork")] if "heads" in key else foundation[key]
        assert torch.equal(initial[key], reference)

    model.refiner_state = adapted
    delightsam.save_model(model, tmp_path / "adapted.safetensors")
    loaded = delightsam.load_model(tmp_path / "adapted.safetensors")
    assert carries_adaptation(loaded, "ct") and not carries_adaptation(loaded, "mr")
    served = Pipeline(["ct"]).refiner(loaded)
    assert all(torch.equal(served.state_dict()[k], v) for k, v in adapted.items())
    assert np.allclose(_boxed_dice(served, data, probe), after)  # it answers as the refiner that was trained
    assert not carries_adaptation(delightsam.load_model(STARTER), "ct")  # the shipped model carries none


def test_a_refiner_tensor_of_the_wrong_shape_is_refused_at_load(tmp_path):
    model = delightsam.load_model(STARTER)
    model.refiner_state = {"decoder.query_groups.ct": torch.zeros(3, 256)}  # the CT model has five structures
    delightsam.save_model(model, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="refiner.*query_groups.ct"):
        delightsam.load_model(tmp_path / "bad.safetensors")


@pytest.mark.slow
def test_training_the_served_pipeline_validates_and_publishes_it(ct_items, tmp_path):
    """The train loop with the app's pipeline: the refiner trains beside the first stage and the published model
    carries it (published always: nothing to validate on), the pipeline serves that adaptation, and validation runs
    two stages."""
    model = delightsam.load_model(STARTER)
    published = []
    config = TrainConfig(epochs=1, steps_per_epoch=4, batch_size=2, teacher=None, tracking="none",
                         pipeline=Pipeline(["ct"]))
    stats = train(model, [ct_items["small"]], [], config, tmp_path / "run",
                  publish=lambda m, metrics: published.append(dict(m.refiner_state)) or "published")
    assert stats["pipeline"]["refined"] == ["ct"] and stats["pipeline"]["refiner_trained"] == ["ct"]
    assert "refiner_segmentation" in stats["loss"] and "refiner_distill" in stats["loss"]
    assert carries_adaptation(model, "ct") and stats["published"] == ["published"]
    assert set(published[0]) == set(model.refiner_state)  # the model was published with its refiner
    served = Pipeline(["ct"]).refiner(model)
    assert all(torch.equal(served.state_dict()[k], v.to(served.state_dict()[k].dtype)) for k, v in model.refiner_state.items())
    frozen = TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, teacher=None, tracking="none",
                         pipeline=Pipeline(["ct"]), train_refiner=False)
    plain = delightsam.load_model(STARTER)
    stats = train(plain, [ct_items["small"]], [ct_items["dicom"]], frozen, tmp_path / "frozen")
    assert stats["before"]["dice"]["ct/liver"] > 0.9  # two stages on the development series, not the first alone
    assert stats["pipeline"]["refiner_trained"] == [] and not carries_adaptation(plain, "ct")
