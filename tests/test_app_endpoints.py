"""The MONAI Label app through its REST API (FastAPI's TestClient over monailabel's own server app)."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from requests_toolbelt.multipart import decoder

from delightsam.precision import resolve

from helpers import APP_DIR, dciodvfy_errors, make_test_checkpoint, studies_folder

NRRD_UINT8 = {"result_extension": ".nrrd", "result_dtype": "uint8"}
MEASURED = {"contrasts": ["T1"], "slice_mm": [1.0, 5.0]}  # what the test checkpoint's MR model says it was measured on
PLANES = ["axial", "coronal", "sagittal"]  # the planes it sees a thin MR volume in


def _client(studies, conf, tmp):
    """A TestClient for the app with this studies folder and --conf; monailabel reads its settings globally."""
    from fastapi.testclient import TestClient
    from monailabel.config import settings

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
    studies = studies_folder(tmp, samples, ["ts_ct_small.nii.gz", "ts_mr_small.nii.gz"])
    models = tmp / "models"
    checkpoint = make_test_checkpoint(models / "delightsam.safetensors", seed=0, version="v1", mr_measured=MEASURED,
                                      mr_planes=PLANES)
    make_test_checkpoint(models / "delightsam-v2.safetensors", seed=1, version="v2")
    # a single-user workstation that names DICOM series folders by server path (off by default: test_hostile)
    client = _client(studies, {"checkpoint": str(checkpoint), "allow_server_paths": "true"}, tmp)
    return {"client": client, "tmp": tmp, "studies": studies, "checkpoint": checkpoint, "samples": samples}


# The first stage only unless a test asks for more: these tests are about the route, its options and its files,
# and the random test model's boxes make the second stage slow without making it any truer. The served two-stage
# pipeline is tested below (test_ct_runs_the_second_stage_...) and, with the shipped model, in test_app_voxels.
FIRST_STAGE = {"refine": False}


def _infer(client, params=None, model="delightsam_ct", **query):
    query.setdefault("output", "json")
    url = f"/infer/{model}?" + "&".join(f"{k}={v}" for k, v in query.items())
    return client.post(url, data={"params": json.dumps({**FIRST_STAGE, **(params or {})})})


def test_info_lists_a_model_per_modality_with_its_own_labels(env):
    info = env["client"].get("/info/").json()
    assert set(info["models"]) == {"delightsam_ct", "delightsam_mr"}
    ct, mr = info["models"]["delightsam_ct"], info["models"]["delightsam_mr"]
    assert ct["type"] == mr["type"] == "segmentation" and ct["dimension"] == 3
    assert ct["labels"] == {"liver": 1, "spleen": 2, "kidney": 3} and mr["labels"] == {"brain": 4}
    for model in (ct, mr):  # no id means two structures within a model
        assert len(set(model["labels"].values())) == len(model["labels"])
        assert set(model["label_colors"]) == set(model["labels"])
    assert ct["label_colors"]["liver"] == [221, 130, 101]  # 3D Slicer's GenericAnatomyColors
    assert "modality" not in ct["config"]
    assert ct["config"]["model_filename"] == ["delightsam.safetensors", "delightsam-v2.safetensors"]
    assert "v1" in ct["description"] and "NOT AVAILABLE" not in ct["description"]
    assert list(info["trainers"]) == ["delightsam"]


def test_infer_returns_a_label_on_the_input_grid(env):
    reply = env["client"].post("/infer/delightsam_ct?image=ts_ct_small",
                               data={"params": json.dumps({**FIRST_STAGE, **NRRD_UINT8})})
    assert reply.status_code == 200, reply.text
    parts = decoder.MultipartDecoder(reply.content, reply.headers["content-type"]).parts
    by_name = {p.headers[b"Content-Disposition"].decode().split('name="')[1].split('"')[0]: p for p in parts}
    params = json.loads(by_name["params"].content)
    assert params["modality"] == "ct" and params["plane"] == "axial"
    assert params["label_names"] == {"liver": 1, "spleen": 2, "kidney": 3}
    assert params["label_colors"]["spleen"] == [157, 108, 162]
    # the datastore records the modality the image was segmented as (training reads it)
    info = env["client"].get("/datastore/image/info", params={"image": "ts_ct_small"}).json()
    assert info["modality"] == "ct"
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


def test_the_model_is_the_modality_and_a_dicom_tag_must_agree(env):
    reply = _infer(env["client"], model="delightsam_mr", image="ts_mr_small")
    assert reply.json()["modality"] == "mr" and reply.json()["label_names"] == {"brain": 4}
    # A DICOM series (server-side path, as after a session upload of a zipped series): tag CT.
    series = env["samples"] / "samples" / "ts_ct_dicom"
    reply = _infer(env["client"], NRRD_UINT8, image=str(series))
    assert reply.status_code == 200, reply.text
    assert reply.json()["modality"] == "ct"
    reply = _infer(env["client"], NRRD_UINT8, model="delightsam_mr", image=str(series))
    assert reply.status_code == 422
    assert "is CT by its DICOM Modality tag" in reply.json()["detail"] and "use delightsam_ct" in reply.json()["detail"]


def test_an_mr_outside_what_was_measured_still_gets_a_mask_that_says_so(env, tmp_path):
    """The MR model records what it was measured on (T1, 1-5 mm); /info says it. A FLAIR (named by the request or
    by its DICOM series description) or a 7 mm series still gets its mask, and the result says it is outside that;
    a NIfTI whose contrast nobody named says the contrast is unknown. A contrast for CT is refused before any voxel is
    read; an MR checkpoint that records nothing still takes one (``scope`` says so, nothing is flagged). The 3 mm
    isotropic MR is seen in the three planes the checkpoint names, the 7 mm series in its own plane alone. /info says
    which modality is declared symmetric (its thick series decoded mirrored too)."""
    client = env["client"]
    mr = client.get("/info/").json()["models"]["delightsam_mr"]
    assert mr["measured"] == MEASURED and mr["config"]["contrast"][0] == "auto" and "FLAIR" in mr["config"]["contrast"]
    assert mr["planes"] == PLANES and "seen in axial, coronal, sagittal slices" in mr["pipeline"]
    ct = client.get("/info/").json()["models"]["delightsam_ct"]
    assert "contrast" not in ct["config"]
    assert mr["symmetric"] is True and ct["symmetric"] is False  # a brain is its own mirror image; a left kidney is not
    t1 = _infer(client, {"contrast": "T1"}, model="delightsam_mr", image="ts_mr_small").json()  # 3 mm slices
    assert t1["scope"] == {"contrast": "T1", "contrast_from": "request", "slice_mm": 3.0, "within_measured": True}
    assert not any("measured on" in n for n in t1["notes"])
    assert t1["planes"] == PLANES and any("seen in axial, coronal, sagittal slices" in n for n in t1["notes"])
    flair = _infer(client, {"contrast": "FLAIR"}, model="delightsam_mr", image="ts_mr_small").json()
    assert flair["scope"]["within_measured"] is False and flair["label_names"] == {"brain": 4}
    assert any("outside what this model was measured on (MR T1, slices 1-5 mm): its contrast is FLAIR" in n
               for n in flair["notes"])
    unknown = _infer(client, model="delightsam_mr", image="ts_mr_small").json()  # a NIfTI: no series description
    assert unknown["scope"]["contrast_from"] == "unknown" and unknown["scope"]["within_measured"] is None
    assert any("contrast is not known" in n for n in unknown["notes"])
    # a 7 mm DICOM series described as a T2 FLAIR (the DICOM sample's pixels, its header rewritten)
    import pydicom

    folder = tmp_path / "flair"
    folder.mkdir()
    for k, f in enumerate(sorted((env["samples"] / "samples" / "ts_ct_dicom").iterdir())):
        ds = pydicom.dcmread(f)
        ds.Modality, ds.SeriesDescription, ds.SliceThickness = "MR", "AX T2 FLAIR", 7.0
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], 7.0 * k]
        ds.save_as(folder / f"{k:03d}.dcm")
    series_reply = _infer(client, {"contrast": "auto"}, model="delightsam_mr", image=str(folder)).json()
    assert series_reply["scope"] == {"contrast": "FLAIR", "contrast_from": "DICOM series description", "slice_mm": 7.0,
                                     "within_measured": False}
    assert series_reply["planes"] == [] and series_reply["plane"] == "axial"
    assert any("its axial slices decoded as they are and mirrored left-right" in n for n in series_reply["notes"])
    assert any("its contrast is FLAIR (from the DICOM series description) and its slices are 7 mm apart" in n
               for n in series_reply["notes"])
    refused = _infer(client, {"contrast": "T2"}, image="ts_ct_small")
    assert refused.status_code == 422 and "contrast 'T2' is an MR's" in refused.json()["detail"]
    assert _infer(client, {"contrast": "T3"}, model="delightsam_mr", image="ts_mr_small").status_code == 422
    v2 = _infer(client, {"contrast": "T2", "model_filename": "delightsam-v2.safetensors"}, model="delightsam_mr",
                image="ts_mr_small").json()  # a checkpoint that records nothing measured
    assert v2["scope"]["contrast"] == "T2" and v2["scope"]["within_measured"] is None
    assert not any("measured on" in n for n in v2["notes"])


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


def test_a_4d_file_holding_one_3d_volume_is_accepted(env):
    """A NIfTI of shape [X, Y, Z, 1] (as some tools write a 3-D volume) is segmented; its label has its grid."""
    image = nib.load(env["studies"] / "ts_ct_small.nii.gz")
    path = env["tmp"] / "singleton.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., None], image.affine), path)
    reply = env["client"].post("/infer/delightsam_ct?output=image",
                               data={"params": json.dumps({**FIRST_STAGE, "result_extension": ".nii.gz"})},
                               files={"file": (path.name, open(path, "rb"), "application/octet-stream")})
    assert reply.status_code == 200, reply.text
    out = env["tmp"] / "singleton_label.nii.gz"
    out.write_bytes(reply.content)
    assert nib.load(out).shape == image.shape  # a 3-D label on the volume's grid
    np.testing.assert_allclose(nib.load(out).affine, image.affine, atol=1e-4)
    three_d = _infer(env["client"], {"result_extension": ".nii.gz"}, image="ts_ct_small", output="image")
    (env["tmp"] / "three_d.nii.gz").write_bytes(three_d.content)
    expected = np.asarray(nib.load(env["tmp"] / "three_d.nii.gz").dataobj)
    assert expected.any()  # the comparison is not of two empty maps
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)


def _upload(client, path, name):
    return client.post("/infer/delightsam_ct?output=json", data={"params": json.dumps(FIRST_STAGE)},
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
    reply = _infer(client, model="delightsam_xray", image="ts_ct_small")
    assert reply.status_code == 404 and "no model named 'delightsam_xray'" in reply.json()["detail"]
    assert "delightsam_ct, delightsam_mr" in reply.json()["detail"]
    reply = client.post("/infer/segmentation_spleen?image=ts_ct_small&output=json", data={"params": "{}"})
    assert reply.status_code == 404 and "no model named 'segmentation_spleen'" in reply.json()["detail"]
    reply = _infer(client, image="no_such_image")
    assert reply.status_code == 404 and "no image 'no_such_image'" in reply.json()["detail"]
    reply = _infer(client, {"model_filename": "old.safetensors"}, image="ts_ct_small")  # an option's value
    assert reply.status_code == 422 and "delightsam-v2.safetensors" in reply.json()["detail"]
    assert "option 'model_filename'" in reply.json()["detail"]
    assert _infer(client, image="ts_ct_small").status_code == 200


def test_ct_runs_the_second_stage_by_default_and_a_request_can_turn_it_off(env):
    """CT is segmented in two stages unless a request says refine=false: the model's coarse masks become box
    prompts for the foundation (LiteMedSAM); the label is on the input grid and the result says what was done (the
    random test model's boxes: the path, not accuracy). MR brain tissue is never refined by default."""
    models = env["client"].get("/info/").json()["models"]
    info = models["delightsam_ct"]["config"]
    assert info["refine"] is True and info["prompts"] == ["slice", "3d"]
    assert models["delightsam_mr"]["config"]["refine"] is False
    image = nib.load(env["studies"] / "ts_ct_small.nii.gz")  # six slices of it: the foundation is slow on a CPU
    path = env["tmp"] / "six_slices.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., 12:18], image.affine), path)

    def infer(**params):
        reply = env["client"].post("/infer/delightsam_ct?output=all", files={"file": (path.name, open(path, "rb"))},
                                   data={"params": json.dumps({**params, **NRRD_UINT8})})
        assert reply.status_code == 200, reply.text
        parts = decoder.MultipartDecoder(reply.content, reply.headers["content-type"]).parts
        return json.loads(next(p.content for p in parts if b"params" in p.headers[b"Content-Disposition"]))

    params = infer()  # the defaults: refine, prompts per slice, bfloat16 products where the CPU has them
    assert params["refined"] is True and params["prompts"] == "slice"
    assert params["precision"] == models["delightsam_ct"]["precision"] == resolve("auto")
    assert ("matrix products in bfloat16" in " ".join(params["notes"])) == (params["precision"] == "bfloat16")
    note = next(note for note in params["notes"] if note.startswith("refined "))
    assert "boxes per slice" in note
    # the app's refine_size (96): the foundation sees a whole slice at 96 pixels, a part of it at most that
    assert int(re.search(r"at input (\d+)\)", note).group(1)) <= 96
    one_stage = infer(refine=False)
    assert one_stage["refined"] is False and one_stage["prompts"] is None
    assert not any(note.startswith("refined ") for note in one_stage["notes"])
    bad = _infer(env["client"], {"refine": True, "prompts": "lasso"}, image="ts_ct_small")
    assert bad.status_code == 422 and "option 'prompts': Input should be 'slice' or '3d'" in bad.json()["detail"]


def test_model_filename_picks_another_version(env):
    reply = _infer(env["client"], {"model_filename": "delightsam-v2.safetensors"}, image="ts_ct_small")
    assert reply.status_code == 200 and reply.json()["model_version"] == "v2"
    assert _infer(env["client"], image="ts_ct_small").json()["model_version"] == "v1"


def test_a_published_checkpoint_is_hot_reloaded(env):
    checkpoint = env["checkpoint"]
    assert _infer(env["client"], image="ts_ct_small").json()["model_version"] == "v1"
    backup = checkpoint.read_bytes()
    try:
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
        model = client.get("/info/").json()["models"]["delightsam"]  # no checkpoint: one model that says why
        assert "NOT AVAILABLE" in model["description"] and "missing.safetensors" in model["description"]
        reply = _infer(client, model="delightsam", image="ts_ct_small")
        assert reply.status_code == 503 and "not available" in reply.json()["detail"]
    finally:
        _client(env["studies"], {"checkpoint": str(env["checkpoint"]), "allow_server_paths": "true"},
                env["tmp"])  # restore for other tests


@pytest.fixture(scope="module")
def series_with_uids(env):
    """The sample CT series with the Study and Series Instance UIDs its anonymisation removed (as `make pacs`
    uploads it)."""
    from pacs import prepare_ct

    out = env["tmp"] / "ct_series"
    prepare_ct(env["samples"] / "samples" / "ts_ct_dicom", out)
    return out


def test_dicom_seg_output_is_a_valid_seg_of_the_source_series(env, series_with_uids):
    import highdicom as hd
    import pydicom

    series = series_with_uids
    reply = _infer(env["client"], {"result_extension": ".dcm"}, image=str(series), output="image")
    assert reply.status_code == 200, reply.text
    seg_path = env["tmp"] / "seg.dcm"
    seg_path.write_bytes(reply.content)
    assert dciodvfy_errors(seg_path) == []
    seg = pydicom.dcmread(seg_path)
    sources = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(series.iterdir())}
    first = next(iter(sources.values()))
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {d.SOPInstanceUID for d in sources.values()} and "" not in referenced
    # segments numbered 1..N in the order of the model's ids, each with its name and SNOMED CT code
    codes = {"liver": "10200004", "spleen": "78961009", "kidney": "64033007"}
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    names = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert numbers == list(range(1, len(numbers) + 1)) and names
    assert names == sorted(names, key=lambda n: {"liver": 1, "spleen": 2, "kidney": 3}[n])
    assert all(codes[str(s.SegmentLabel)] == s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence)
    # voxel for voxel the same as the NRRD label of the same request, segment numbers mapped back to ids by name
    nrrd = _infer(env["client"], NRRD_UINT8, image=str(series), output="image")
    path = env["tmp"] / "series_label.nrrd"
    path.write_bytes(nrrd.content)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # [slices, rows, columns]
    ids = {"liver": 1, "spleen": 2, "kidney": 3}
    by_position = sorted(sources.values(), key=lambda d: float(d.ImagePositionPatient[2]))
    pixels = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in by_position], combine_segments=True)
    decoded = np.zeros_like(pixels)
    for number, name in zip(numbers, names):
        decoded[pixels == number] = ids[name]
    np.testing.assert_array_equal(decoded, expected)


def test_dicom_seg_of_a_series_without_uids_is_refused(env):
    series = env["samples"] / "samples" / "ts_ct_dicom"  # anonymised: empty Study and Series Instance UIDs
    reply = _infer(env["client"], {"result_extension": ".dcm"}, image=str(series), output="image")
    assert reply.status_code == 422 and "no StudyInstanceUID and SeriesInstanceUID" in reply.json()["detail"]


def test_dicom_seg_needs_a_dicom_input(env):
    reply = _infer(env["client"], {"result_extension": ".dcm"}, image="ts_ct_small", output="image")
    assert reply.status_code == 422 and "needs a DICOM series" in reply.json()["detail"]


def test_whole_slide_inference_is_refused_with_where_to_go(env):
    """monailabel's whole-slide image routes would run a volume model's task on the raw request (untyped, past the
    work gate): this server has no such models, and says which it has (a 404, never a 500)."""
    for route in ("/infer/wsi/delightsam_ct", "/infer/wsi_v2/delightsam_ct", "/infer/wsi_v2/s"):
        reply = env["client"].post(f"{route}?image=ts_ct_small", json={}) if "v2" not in route else \
            env["client"].post(f"{route}?image=ts_ct_small", data={})
        assert reply.status_code == 404, (route, reply.text)
        assert "no whole-slide image models" in reply.json()["detail"] and "delightsam_ct" in reply.json()["detail"]
