"""The typed request options (``delightsam_app.options``): every option a request can carry is parsed once,
after monailabel's merge; an unknown or ill-typed one is a 422 that names it. And the compatibility module that
holds every use of a private monailabel / FastAPI name: its probes pass on the pinned versions and a missing
feature stops the app by name."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from delightsam_app import compat, options
from delightsam_app.options import (BatchOptions, ImageInfoUpdate, InferOptions, LoopInferOptions,
                                    NextSampleOptions, SavedLabelInfo, TrainOptions, parse)

CONTEXT = {"max_batch_size": 8, "model_files": ["model.safetensors", "delightsam-v2.safetensors"]}


def _refused(kind, values, *words, context=CONTEXT) -> str:
    with pytest.raises(HTTPException) as e:
        parse(kind, values, "delightsam_ct", context)
    assert e.value.status_code == 422
    for word in words:
        assert word in e.value.detail, e.value.detail
    return e.value.detail


def test_what_slicer_and_ohif_send_parses_with_choices_as_values():
    slicer = {"model": "delightsam_ct", "image": "ts_ct_small", "refine": True, "prompts": "slice", "cleanup": False,
              "batch_size": 4, "model_filename": "model.safetensors", "result_extension": ".nrrd",
              "result_dtype": "uint8", "client_id": "user-xyz"}
    assert parse(InferOptions, slicer, "x", CONTEXT).batch_size == 4
    # OHIF sends an unchanged option as /info lists it (its choices) and adds its own keys
    ohif = {"model": "delightsam_ct", "image": "1.2.3", "prompts": ["3d", "slice"], "refine": "false",
            "model_filename": ["delightsam-v2.safetensors"], "result_compress": False, "restore_label_idx": False}
    parsed = parse(InferOptions, ohif, "x", CONTEXT)
    assert (parsed.prompts, parsed.refine, parsed.model_filename) == ("3d", False, "delightsam-v2.safetensors")


@pytest.mark.parametrize("values, words", [
    ({"refine": "maybe"}, ["option 'refine'", "'maybe'"]),
    ({"batch_size": 9}, ["option 'batch_size'", "from 1 to 8"]),
    ({"batch_size": "many"}, ["option 'batch_size'"]),
    ({"device": "foo"}, ["option 'device'", "cpu, cuda or cuda:N"]),
    ({"device": "cuda:3"}, ["option 'device'", "CUDA device"]),
    ({"result_extension": "/../../x.nii.gz"}, ["option 'result_extension'"]),
    ({"result_dtype": "object"}, ["option 'result_dtype'"]),
    ({"logging": "LOUD"}, ["option 'logging'"]),
    ({"model_filename": "../../etc/passwd"}, ["option 'model_filename'", "delightsam-v2.safetensors"]),
    ({"timeout": 1e9}, ["unknown option 'timeout'", "known: batch_size"]),
    ({"save_label": True, "label_tag": "final"}, ["unknown option 'save_label'", "unknown option 'label_tag'"]),
    ({"result_write_to_file": False}, ["unknown option 'result_write_to_file'"]),
])
def test_a_bad_inference_option_is_named(values, words):
    _refused(InferOptions, {"model": "delightsam_ct", "image": "ts_ct_small", **values}, *words)


def test_the_loop_may_save_labels_but_never_as_final():
    parsed = parse(LoopInferOptions, {"model": "m", "image": "i", "save_label": True, "loop_source": "batch"}, "x")
    assert parsed.save_label and parsed.label_tag == "original"
    _refused(LoopInferOptions, {"model": "m", "image": "i", "save_label": True, "label_tag": "final"}, "never `final`")
    _refused(LoopInferOptions, {"model": "m", "image": "i", "label_tag": "../x"}, "no path")


def test_params_cannot_set_what_the_server_sets():
    for key in ("image", "model", "session", "save_label", "label_tag", "loop_source"):
        with pytest.raises(HTTPException) as e:
            options.refuse_internal(LoopInferOptions, {key: "x", "refine": True}, "the request's params")
        assert e.value.status_code == 422 and f"cannot set {key!r}" in e.value.detail
    options.refuse_internal(LoopInferOptions, {"refine": True, "client_id": "me"}, "params")  # client options pass
    schema = options.client_infer_schema()
    assert {"refine", "prompts", "batch_size", "result_extension"} <= set(schema["properties"])
    assert not {"image", "model", "session", "save_label"} & set(schema["properties"])


def test_training_options_are_typed_and_are_the_tasks_config():
    config = TrainOptions.config()
    assert config["trainable"] == ["modality", "controllers", "all"] and config["teacher"][:2] == ["lite_medsam", "none"]
    assert config["tracking"] == ["tensorboard", "mlflow", "none"] and config["max_epochs"] == 5
    # POST /train/ merges a trainer's own dict into its request and the whole params again
    parsed = parse(TrainOptions, {"model": "delightsam", "delightsam": {"max_epochs": 2}, "max_epochs": 2}, "x")
    assert parsed.max_epochs == 2 and parsed.teacher == "lite_medsam"
    _refused(TrainOptions, {"model": "delightsam", "name": "../../escaped"}, "option 'name'", "no path")
    _refused(TrainOptions, {"model": "delightsam", "lr": -1}, "option 'lr'")
    _refused(TrainOptions, {"model": "delightsam", "teacher": "gpt"}, "option 'teacher'")
    _refused(TrainOptions, {"model": "delightsam", "max_epochs": 1e12}, "option 'max_epochs'")


def test_batch_takes_monailabels_default_body_and_never_writes_final_labels():
    default = {"device": "cuda", "multi_gpu": True, "gpus": "all", "logging": "WARNING", "save_label": True,
               "label_tag": "original", "max_workers": 1, "max_batch_size": 0}  # monailabel's route default
    assert parse(BatchOptions, {"model": "delightsam_ct", "images": "unlabeled", **default}, "x").label_tag == "original"
    _refused(BatchOptions, {"model": "delightsam_ct", "label_tag": "final"}, "never `final`")
    _refused(BatchOptions, {"model": "delightsam_ct", "max_batch_size": -1}, "option 'max_batch_size'")
    _refused(NextSampleOptions, {"strategy": "uncertain", "label_tag": "/tmp"}, "option 'label_tag'")


@pytest.mark.parametrize("idx", [-1, 0, 256, 2_000_000_000, "2e9", 1.5])
def test_label_indices_out_of_uint8_are_refused(idx):
    _refused(SavedLabelInfo, {"label_info": [{"name": "liver", "idx": idx}]}, "option 'label_info.0.idx'")


def test_label_info_names_each_value_once_and_image_info_is_typed():
    _refused(SavedLabelInfo, {"label_info": [{"name": "liver", "idx": 1}, {"name": "spleen", "idx": 1}]},
             "value 1 is named twice")
    context = {"modalities": ["ct", "mr"]}
    assert parse(ImageInfoUpdate, {"modality": "CT"}, "x", context).modality == "ct"
    _refused(ImageInfoUpdate, {"modality": "xray"}, "segments ct, mr", context=context)
    _refused(ImageInfoUpdate, {"strategy": {"uncertain": {"ts": "yesterday"}}}, "option 'strategy.uncertain.ts'")


def test_every_private_name_the_app_uses_is_there_in_the_pinned_versions():
    missing, differ = compat.problems()
    assert missing == [] and differ == []
    assert len(compat.REGISTRY) >= 10
    compat.check()  # the app's start


def test_a_missing_feature_stops_the_app_by_name(monkeypatch):
    monkeypatch.setattr(compat, "REGISTRY", [*compat.REGISTRY, compat.Private(
        "fastapi", compat.FASTAPI, "APIRoute.some_feature_a_new_release_dropped", lambda: False)])
    with pytest.raises(RuntimeError, match="fastapi .* has no APIRoute.some_feature_a_new_release_dropped"):
        compat.check()


def test_a_missing_optional_feature_is_a_warning_at_start(monkeypatch, caplog):
    """What only adds to the app (OHIF's error toast with the server's message) does not stop it when it is gone."""
    monkeypatch.setattr(compat, "REGISTRY", [*compat.REGISTRY, compat.Private(
        "monailabel", compat.MONAILABEL, "the bundled OHIF's toast", lambda: False, required=False)])
    missing, differ = compat.problems()
    assert missing == [] and any("the bundled OHIF's toast" in d and "runs without" in d for d in differ)
    compat.check()
    assert "the bundled OHIF's toast" in caplog.text
