"""The MONAI Label app through its REST API (FastAPI's TestClient over monailabel's own server app)."""

from __future__ import annotations

import io
import json
import shutil
import sys
import time

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from requests_toolbelt.multipart import decoder

from conftest import APP_DIR, make_test_checkpoint

NRRD_UINT8 = {"result_extension": ".nrrd", "result_dtype": "uint8"}


def _client(studies, conf, tmp):
    """A TestClient for the app with this studies folder and --conf; monailabel reads its settings globally."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

    if str(APP_DIR) not in sys.path:
        sys.path.insert(0, str(APP_DIR))  # start_server puts the app on PYTHONPATH
    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(studies)
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_APP_CONF = {"models": "delightsam", "model_dir": str(tmp / "model"), **conf}
    settings.MONAI_LABEL_SESSION_PATH = str(tmp / "sessions")
    from monailabel.app import app
    from monailabel.interfaces.utils.app import clear_cache

    clear_cache()
    return TestClient(app)


@pytest.fixture(scope="module")
def env(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("app")
    studies = tmp / "studies"
    studies.mkdir()
    for name in ("ts_ct_small.nii.gz", "ts_mr_small.nii.gz"):
        shutil.copyfile(samples / "studies" / name, studies / name)
    models = tmp / "models"
    checkpoint = make_test_checkpoint(models / "delightsam.safetensors", seed=0, version="v1")
    make_test_checkpoint(models / "delightsam-v2.safetensors", seed=1, version="v2")
    client = _client(studies, {"checkpoint": str(checkpoint)}, tmp)
    return {"client": client, "tmp": tmp, "studies": studies, "checkpoint": checkpoint, "samples": samples}


def _infer(client, params=None, **query):
    query.setdefault("output", "json")
    url = "/infer/delightsam?" + "&".join(f"{k}={v}" for k, v in query.items())
    return client.post(url, data={"params": json.dumps(params or {})})


def test_info_lists_the_model_its_labels_and_options(env):
    info = env["client"].get("/info/").json()
    model = info["models"]["delightsam"]
    assert model["type"] == "segmentation" and model["dimension"] == 3
    assert model["labels"] == {"liver": 1, "spleen": 2, "kidney": 3, "brain": 4}
    assert model["config"]["modality"] == ["auto", "ct", "mr"]
    assert model["config"]["model_filename"] == ["delightsam.safetensors", "delightsam-v2.safetensors"]
    assert "v1" in model["description"] and "NOT AVAILABLE" not in model["description"]


def test_infer_returns_a_label_on_the_input_grid(env):
    reply = env["client"].post("/infer/delightsam?image=ts_ct_small", data={"params": json.dumps(NRRD_UINT8)})
    assert reply.status_code == 200, reply.text
    parts = decoder.MultipartDecoder(reply.content, reply.headers["content-type"]).parts
    by_name = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p for p in parts}
    params = json.loads(by_name["params"].content)
    assert params["modality"] == "ct" and params["modality_source"] == "app default"
    assert params["label_names"] == {"liver": 1, "spleen": 2, "kidney": 3}
    label_file = env["tmp"] / "label.nrrd"
    label_file.write_bytes(by_name["image"].content)
    label = sitk.ReadImage(str(label_file))
    image = sitk.ReadImage(str(env["studies"] / "ts_ct_small.nii.gz"))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection(), atol=1e-6)
    assert label.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1, 2, 3}


def test_modality_from_request_and_from_dicom_tag(env):
    reply = _infer(env["client"], {"modality": "mr"}, image="ts_mr_small")
    assert reply.json()["modality"] == "mr" and reply.json()["modality_source"] == "request"
    assert reply.json()["label_names"] == {"brain": 4}
    # A DICOM series (server-side path, as after a session upload of a zipped series): tag CT.
    series = env["samples"] / "samples" / "ts_ct_dicom"
    reply = _infer(env["client"], NRRD_UINT8, image=str(series))
    assert reply.status_code == 200, reply.text
    assert reply.json()["modality"] == "ct" and reply.json()["modality_source"] == "DICOM Modality tag"


def test_nifti_output_and_cleanup(env):
    reply = _infer(env["client"], {"result_extension": ".nii.gz", "cleanup": True}, image="ts_ct_small", output="image")
    assert reply.status_code == 200
    path = env["tmp"] / "label.nii.gz"
    path.write_bytes(reply.content)
    cleaned = np.asarray(nib.load(path).dataobj)
    assert cleaned.shape == nib.load(env["studies"] / "ts_ct_small.nii.gz").shape
    raw = _infer(env["client"], {"result_extension": ".nii.gz", "cleanup": "false"}, image="ts_ct_small", output="image")
    path.write_bytes(raw.content)
    raw = np.asarray(nib.load(path).dataobj)
    # clean-up keeps one connected component per structure (the random test model leaves many)
    from scipy import ndimage

    for label_id in np.unique(cleaned[cleaned > 0]):
        assert ndimage.label(cleaned == label_id, structure=np.ones((3, 3, 3)))[1] == 1
    assert max(ndimage.label(raw == i)[1] for i in np.unique(raw[raw > 0])) > 1


def _upload(client, path, name):
    return client.post("/infer/delightsam?output=json", data={"params": "{}"},
                       files={"file": (name, open(path, "rb"), "application/octet-stream")})


@pytest.mark.parametrize("kind,pattern", [
    ("not_an_image", "cannot read .* as a medical image volume"),
    ("image_2d", "expected a 3-D volume, got a 2-D image"),
    ("volume_4d", "expected a single-channel 3-D volume, got a 4-D image"),
    ("all_nan", "no finite voxel"),
])
def test_bad_uploads_get_clear_errors_and_the_server_goes_on(env, kind, pattern):
    path = env["tmp"] / f"{kind}.nii.gz"
    if kind == "not_an_image":
        path.write_bytes(b"this is a text file, not a volume")
    else:
        data = {"image_2d": np.zeros((64, 64), np.float32), "volume_4d": np.zeros((32, 32, 8, 3), np.float32),
                "all_nan": np.full((32, 32, 8), np.nan, np.float32)}[kind]
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    reply = _upload(env["client"], path, path.name)
    assert reply.status_code == 422
    import re

    assert re.search(pattern, reply.json()["detail"]), reply.json()
    assert _infer(env["client"], image="ts_ct_small").status_code == 200  # the next good request works


def test_unknown_modality_model_image_and_checkpoint(env):
    client = env["client"]
    reply = _infer(client, {"modality": "xray"}, image="ts_ct_small")
    assert reply.status_code == 422 and "modality 'xray'" in reply.json()["detail"] and "ct, mr" in reply.json()["detail"]
    reply = client.post("/infer/segmentation_spleen?image=ts_ct_small&output=json", data={"params": "{}"})
    assert reply.status_code == 404 and "no model named 'segmentation_spleen'" in reply.json()["detail"]
    reply = _infer(client, image="no_such_image")
    assert reply.status_code == 404 and "no image 'no_such_image'" in reply.json()["detail"]
    reply = _infer(client, {"model_filename": "old.safetensors"}, image="ts_ct_small")
    assert reply.status_code == 404 and "delightsam-v2.safetensors" in reply.json()["detail"]
    assert _infer(client, image="ts_ct_small").status_code == 200


def test_model_filename_picks_another_version(env):
    reply = _infer(env["client"], {"model_filename": "delightsam-v2.safetensors"}, image="ts_ct_small")
    assert reply.status_code == 200 and reply.json()["model_version"] == "v2"
    assert _infer(env["client"], image="ts_ct_small").json()["model_version"] == "v1"


def test_a_published_checkpoint_is_hot_reloaded(env):
    checkpoint = env["checkpoint"]
    assert _infer(env["client"], image="ts_ct_small").json()["model_version"] == "v1"
    backup = checkpoint.read_bytes()
    try:
        time.sleep(0.01)
        make_test_checkpoint(checkpoint, seed=2, version="v3")  # written aside, then renamed over the old one
        assert _infer(env["client"], image="ts_ct_small").json()["model_version"] == "v3"
        # A corrupt replacement does not take the server down: the loaded model keeps serving.
        checkpoint.write_bytes(backup[: len(backup) // 2])
        reply = _infer(env["client"], image="ts_ct_small")
        assert reply.status_code == 200 and reply.json()["model_version"] == "v3"
    finally:
        checkpoint.write_bytes(backup)


def test_without_a_checkpoint_the_server_starts_and_says_why(env):
    tmp = env["tmp"] / "nockpt"
    tmp.mkdir()
    client = _client(env["studies"], {"checkpoint": str(tmp / "missing.safetensors")}, tmp)
    try:
        model = client.get("/info/").json()["models"]["delightsam"]
        assert "NOT AVAILABLE" in model["description"] and "missing.safetensors" in model["description"]
        reply = _infer(client, image="ts_ct_small")
        assert reply.status_code == 503 and "not available" in reply.json()["detail"]
    finally:
        _client(env["studies"], {"checkpoint": str(env["checkpoint"])}, env["tmp"])  # restore for other tests


def test_dicom_seg_output_references_the_source_series(env):
    import pydicom
    import pydicom_seg

    series = env["samples"] / "samples" / "ts_ct_dicom"
    reply = _infer(env["client"], {"result_extension": ".dcm"}, image=str(series), output="image")
    assert reply.status_code == 200, reply.text
    seg = pydicom.dcmread(io.BytesIO(reply.content))
    source = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True)
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    names = {s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence}
    assert names and set(names) <= {"liver", "spleen", "kidney"}
    codes = {"liver": "10200004", "spleen": "78961009", "kidney": "64033007"}
    assert all(codes[n] == c for n, c in names.items())
    # voxel for voxel the same as the NRRD label of the same request
    nrrd = _infer(env["client"], NRRD_UINT8, image=str(series), output="image")
    path = env["tmp"] / "series_label.nrrd"
    path.write_bytes(nrrd.content)
    expected = sitk.ReadImage(str(path))
    decoded = pydicom_seg.MultiClassReader().read(seg).image
    assert decoded.GetSize() == expected.GetSize()
    np.testing.assert_allclose(decoded.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(decoded), sitk.GetArrayFromImage(expected))


def test_dicom_seg_needs_a_dicom_input(env):
    reply = _infer(env["client"], {"result_extension": ".dcm"}, image="ts_ct_small", output="image")
    assert reply.status_code == 422 and "needs a DICOM series" in reply.json()["detail"]
