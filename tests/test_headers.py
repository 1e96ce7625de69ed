"""Volumes that lie (issue #30): every reader path reads the header before the voxels and refuses, by name, a volume
too large for the server, shorter than its header says, or of geometry no scan has; inferences hold a memory
estimate within a budget, so that two large requests queue instead of exhausting memory together.

The lying files are those of scripts/benchmark_memory.py (which sends the full-size ones to a server with the
app's defaults); here smaller ones and a server with smaller limits, so that the tests take seconds."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from benchmark_memory import edited, gzip_bomb, liar, nan_pixdim, singular, truncated, zero_pixdim
from delightsam.headers import HeaderError, Limits, check_volume, dicom_header
from delightsam.reading import READ_ERRORS, dicom_series, read_volume
from delightsam_app.gate import MemoryBudget, OverBudget
from helpers import make_test_checkpoint, monailabel_server, studies_folder

SMALL_LIMITS = Limits(max_voxels=64_000_000)  # the tests' server: --conf max_megavoxels 64


def _lies(samples: Path, tmp: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, the kind of refusal, words its message says)"""
    small = samples / "studies" / "ts_ct_small.nii.gz"
    return {"gzip bomb": (gzip_bomb(tmp / "bomb.nii.gz", 512, 256), "size", "67 million voxels"),
            "4096^3 header": (liar(tmp / "liar.nii.gz"), "size", "68,719 million voxels"),
            "pixdim 0": (edited(small, tmp / "pixdim0.nii.gz", zero_pixdim), "geometry", "voxel sizes [0.0, 0.0, 0.0]"),
            "pixdim NaN": (edited(small, tmp / "nan.nii.gz", nan_pixdim), "geometry", "voxel sizes [nan, nan, nan]"),
            "singular sform": (edited(small, tmp / "singular.nii.gz", singular), "geometry", "singular"),
            "truncated": (truncated(small, tmp / "truncated.nii"), "truncated", "is truncated")}


@pytest.fixture(scope="module")
def lies(samples, tmp_path_factory):
    return _lies(samples, tmp_path_factory.mktemp("lies"))


@pytest.mark.parametrize("name", ["gzip bomb", "4096^3 header", "pixdim 0", "pixdim NaN", "singular sform",
                                  "truncated"])
def test_a_lying_volume_is_refused_by_its_header_and_never_read(lies, name, monkeypatch):
    path, kind, words = lies[name]

    def no_voxels(*args, **kwargs):
        raise AssertionError("the voxels were read before the header was checked")

    monkeypatch.setattr("delightsam.reading.LoadImage", no_voxels)
    with pytest.raises(HeaderError) as refused:
        read_volume(path, limits=SMALL_LIMITS)
    assert refused.value.kind == kind and words in str(refused.value), str(refused.value)
    assert path.name in str(refused.value)


def test_headers_that_cannot_be_parsed_or_overflow_are_refused_by_name(samples, tmp_path):
    image = nib.load(samples / "studies" / "ts_ct_small.nii.gz")
    bad_type = tmp_path / "datatype.nii"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine), bad_type)
    data = bytearray(bad_type.read_bytes())
    data[70:72] = np.int16(999).tobytes()  # datatype: no such code
    bad_type.write_bytes(bytes(data))
    with pytest.raises(HeaderError, match="cannot read the header of 'datatype.nii'") as refused:
        check_volume(bad_type)
    assert refused.value.kind == "unreadable"
    huge = tmp_path / "huge.nii"  # NIfTI-2: sizes whose product wraps in 64-bit integers
    header = nib.Nifti2Header()
    header.set_data_shape((2 ** 21, 2 ** 21, 2 ** 22))
    header.set_data_dtype(np.int16)
    huge.write_bytes(header.binaryblock + bytes(4))
    with pytest.raises(HeaderError, match="million voxels"):
        check_volume(huge)


def test_scaled_voxels_are_estimated_as_read_and_a_singleton_fourth_axis_passes(samples, tmp_path):
    image = nib.load(samples / "studies" / "ts_ct_small.nii.gz")
    plain = np.asarray(image.dataobj).astype(np.int16)
    scaled = tmp_path / "scaled.nii.gz"
    out = nib.Nifti1Image(plain, image.affine)
    out.header.set_slope_inter(1.0, -1024.0)
    nib.save(out, scaled)
    # read as int16 (its values are -2048..), estimated from the header as int32 (what int16 scaled so can reach)
    assert check_volume(scaled).bytes_per_voxel_read == 4 and read_volume(scaled, dtype=None).element_size() == 2
    out.header.set_slope_inter(0.5, -1024.0)  # a fractional scale: floats
    nib.save(out, scaled)
    assert check_volume(scaled).bytes_per_voxel_read == read_volume(scaled, dtype=None).element_size() == 8
    single = tmp_path / "single.nii.gz"
    nib.save(nib.Nifti1Image(plain[..., None], image.affine), single)
    assert check_volume(single).bytes_per_voxel_read == 2 and check_volume(single).voxels == plain.size


def test_truncated_nrrd_and_metaimage_files_are_refused_and_compressed_ones_fail_by_name(samples, tmp_path):
    image = sitk.ReadImage(str(samples / "studies" / "ts_ct_small.nii.gz"))
    for suffix in (".nrrd", ".mha"):
        path = tmp_path / f"cut{suffix}"
        sitk.WriteImage(image, str(path))
        assert check_volume(path).voxels == 122 * 101 * 30  # whole: passes
        path.write_bytes(path.read_bytes()[:-1000])
        with pytest.raises(HeaderError, match="is truncated"):
            check_volume(path)
    cut = tmp_path / "cut.nii.gz"  # compressed: its length is known only by reading, which then fails by name
    shutil.copyfile(samples / "studies" / "ts_ct_small.nii.gz", cut)
    cut.write_bytes(cut.read_bytes()[:-5000])
    with pytest.raises(READ_ERRORS, match="end-of-stream|ended|truncated"):
        read_volume(cut)


def test_a_dicom_series_header_matches_the_volume_and_impossible_slice_positions_are_refused(samples, tmp_path):
    series = dicom_series(samples / "samples" / "ts_ct_dicom")
    header = dicom_header(series.files, "ts_ct_dicom")
    volume = read_volume(samples / "samples" / "ts_ct_dicom", dtype=None)
    assert header.shape == tuple(volume.shape) and header.voxels == volume.numel()
    with pytest.raises(HeaderError, match="million voxels"):
        read_volume(samples / "samples" / "ts_ct_dicom", limits=Limits(max_voxels=header.voxels - 1))
    stacked = tmp_path / "stacked"  # every slice at the first slice's position: no slice spacing
    stacked.mkdir()
    position = pydicom.dcmread(series.files[0]).ImagePositionPatient
    for k, f in enumerate(series.files):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = position
        ds.save_as(stacked / f"{k:03d}.dcm")
    with pytest.raises(HeaderError, match="voxel sizes"):
        read_volume(stacked)
    bare = tmp_path / "bare"  # files without the 128-byte preamble and "DICM", as older archives hold them
    bare.mkdir()
    for k, f in enumerate(series.files):
        ds = pydicom.dcmread(f)
        ds.preamble = None
        ds.save_as(bare / f"{k:03d}.dcm", write_like_original=True)
    assert (bare / "000.dcm").read_bytes()[128:132] != b"DICM"
    assert dicom_header(sorted(str(p) for p in bare.iterdir()), "bare").shape[:2] == header.shape[:2]


def test_real_volumes_in_either_storage_order_pass_their_header_check(samples, tmp_path):
    stored = samples / "studies" / "ts_ct_small.nii.gz"
    image = nib.load(stored)
    lps = tmp_path / "lps.nii.gz"  # the same voxels stored in the opposite order along x and y
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(image.shape[:2]) - 1
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1, ::-1], image.affine @ flip), lps)
    for path in (stored, lps):
        header = check_volume(path)
        assert header.voxels == 122 * 101 * 30 and header.itemsize == 2
    a, b = read_volume(stored), read_volume(lps)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[::-1, ::-1])


# ---- the memory budget ------------------------------------------------------------------------------------
def test_the_budget_queues_what_does_not_fit_and_refuses_what_never_can(tmp_path):
    budget = MemoryBudget(tmp_path, 100, poll_s=0.05)
    with pytest.raises(OverBudget, match="needs about 101 MB.*budget is 100 MB"):
        budget.check(101)
    first_holds, second_ran = threading.Event(), threading.Event()
    release = threading.Event()

    def first():
        with budget(60):
            first_holds.set()
            release.wait(60)

    def second():
        with budget(60):
            second_ran.set()

    a = threading.Thread(target=first)
    a.start()
    assert first_holds.wait(60)
    b = threading.Thread(target=second)
    b.start()
    with budget._released:  # wait on state: the second is waiting for memory
        assert budget._released.wait_for(lambda: budget.waiting == 1, 60)
    assert not second_ran.is_set() and budget.held_mb() == 60
    release.set()
    assert second_ran.wait(60)
    a.join(60), b.join(60)
    assert budget.held_mb() == 0 and budget.waiting == 0


def test_a_dead_processs_holding_is_dropped(tmp_path):
    budget = MemoryBudget(tmp_path, 100)
    (tmp_path / "memory.json").write_text(json.dumps({"999999999-dead": 90.0}))
    assert budget.held_mb() == 0
    with budget(90):
        assert budget.held_mb() == 90


# ---- through a real server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory, samples):
    from delightsam.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("limits")
    studies = studies_folder(tmp, samples, ["ts_ct_small.nii.gz"])
    checkpoint = make_test_checkpoint(tmp / "models" / "delightsam.safetensors")
    small = check_volume(studies / "ts_ct_small.nii.gz")
    one = Pipeline().memory_mb("ct", small.voxels, small.bytes_per_voxel_read)  # ts_ct_small, one stage
    conf = ["--conf", "checkpoint", str(checkpoint), "--conf", "model_dir", str(tmp / "model"),
            "--conf", "max_megavoxels", "64", "--conf", "infer_workers", "2", "--conf", "infer_queue", "4",
            "--conf", "memory_budget_mb", str(round(1.5 * one))]  # one ts_ct_small at a time fits, two do not
    with monailabel_server(tmp, studies, conf) as url:
        yield {"url": url, "tmp": tmp, "budget_mb": round(1.5 * one)}


def _infer(url, session=None, image=None, params=None):
    query = {"output": "image", **({"session_id": session} if session else {}), **({"image": image} if image else {})}
    return requests.post(f"{url}/infer/delightsam_ct", params=query, timeout=600,
                         data={"params": json.dumps({"refine": False, "result_extension": ".nii.gz", **(params or {})})})


def _session(url, path: Path) -> str:
    with open(path, "rb") as f:  # as 3D Slicer uploads a volume
        reply = requests.put(f"{url}/session/", files={"files": (path.name, f)}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["session_id"]


@pytest.mark.server
def test_each_lying_upload_is_a_4xx_that_names_it_and_the_server_goes_on(server, lies):
    for name, (path, kind, words) in lies.items():
        reply = _infer(server["url"], session=_session(server["url"], path))
        assert reply.status_code == (413 if kind == "size" else 422), (name, reply.status_code, reply.text[:300])
        detail = reply.json()["detail"]
        assert words in detail and path.name in detail, (name, detail)
        if kind == "size":
            assert "--conf max_megavoxels" in detail
        assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


@pytest.mark.server
def test_a_saved_label_with_a_lying_header_is_refused_and_nothing_is_saved(server, samples, tmp_path):
    label = edited(samples / "samples" / "labels" / "ts_ct_small.nii.gz", tmp_path / "label.nii.gz", nan_pixdim)
    with open(label, "rb") as f:
        reply = requests.put(f"{server['url']}/datastore/label", params={"image": "ts_ct_small", "tag": "final"},
                             files={"label": (label.name, f)}, timeout=60)
    assert reply.status_code == 422 and "voxel sizes [nan, nan, nan]" in reply.json()["detail"], reply.text[:300]
    labels = requests.get(f"{server['url']}/datastore/?output=all", timeout=30).json()["objects"]["ts_ct_small"]["labels"]
    assert "final" not in labels


@pytest.mark.server
def test_two_requests_that_do_not_fit_together_queue_for_memory_and_both_are_right(server):
    url, replies = server["url"], {}
    alone = _infer(url, image="ts_ct_small", params={"batch_size": 1})  # the same batches as the two below
    assert alone.status_code == 200, alone.text[:300]

    def user(k):
        replies[k] = _infer(url, image="ts_ct_small", params={"batch_size": 1})

    threads = [threading.Thread(target=user, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    queued = False
    while any(t.is_alive() for t in threads) and not queued:  # two workers, memory for one: one waits
        busy = requests.get(f"{url}/info/", timeout=30).json()["inference"]
        queued = busy["waiting_for_memory"] == 1 and busy["memory_held_mb"] > 0
        assert busy["memory_held_mb"] <= server["budget_mb"]
    for t in threads:
        t.join(600)
    assert queued, "the second request never waited for memory"
    expected = _labels(alone.content, server["tmp"] / "alone.nii.gz")
    assert expected.any()  # not two empty maps compared
    for k in (0, 1):
        assert replies[k].status_code == 200, replies[k].text[:300]
        np.testing.assert_array_equal(_labels(replies[k].content, server["tmp"] / f"user{k}.nii.gz"), expected)


@pytest.mark.server
def test_a_volume_within_the_limits_but_beyond_the_budget_is_a_503_with_the_estimate(server, tmp_path):
    from delightsam.pipeline import Pipeline

    depth = 8  # 512 x 512 x depth zeros, found large enough for the budget below
    while Pipeline().memory_mb("ct", 512 * 512 * depth, 2) <= server["budget_mb"]:
        depth += 8
    assert 512 * 512 * depth <= 64_000_000, "the budget is too large for this test"
    reply = _infer(server["url"], session=_session(server["url"], gzip_bomb(tmp_path / "wide.nii.gz", 512, depth)))
    assert reply.status_code == 503, reply.text[:300]
    assert "--conf memory_budget_mb" in reply.json()["detail"] and "needs about" in reply.json()["detail"]


def _labels(content: bytes, path: Path) -> np.ndarray:
    path.write_bytes(content)
    return np.asarray(nib.load(path).dataobj)
