"""The app's trust boundary on real archives and headers: what is unpacked, what is refused, and why."""

from __future__ import annotations

import os
import sys
import threading
import zipfile
from pathlib import Path

import pytest
from fastapi import HTTPException

from helpers import APP_DIR, subprocess_env, tar_bytes

from delightsam_app import guard
from delightsam_app.edge import Admission

LIMITS = guard.UploadLimits(max_file_bytes=5 * 2**20, max_unpacked_bytes=20 * 2**20, max_ratio=50)


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    path.write_bytes(tar_bytes(members, links))
    return path


def _refused(call, status: int, words: str) -> str:
    with pytest.raises(HTTPException) as e:
        call()
    assert e.value.status_code == status and words in e.value.detail, e.value.detail
    return e.value.detail


def test_a_series_archive_unpacks_into_its_folder(tmp_path):
    archive = _tar(tmp_path / "series.tar.gz", {"series/1.dcm": b"a" * 100, "series/2.dcm": b"b" * 100})
    out = guard.unpack(archive, tmp_path / "out", LIMITS)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.dcm")) == ["series/1.dcm", "series/2.dcm"]
    assert (out / "series" / "2.dcm").read_bytes() == b"b" * 100


@pytest.mark.parametrize("name", ["../../slip.txt", "/tmp/absolute_slip.txt", "series/../../slip.txt", "C:/slip.txt"])
def test_members_that_leave_the_folder_are_refused_and_nothing_is_written(tmp_path, name):
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    archive = _tar(work / "evil.tar.gz", {"ok.txt": b"fine", name: b"escaped"})
    _refused(lambda: guard.unpack(archive, work / "out", LIMITS), 422, "outside the upload's folder")
    assert not (work / "out").exists()  # the partial unpack is removed
    assert not any(p.name.endswith("slip.txt") for p in tmp_path.rglob("*"))
    assert not Path("/tmp/absolute_slip.txt").exists()


def test_links_in_tar_and_zip_are_refused(tmp_path):
    archive = _tar(tmp_path / "link.tar.gz", {"a.txt": b"x"}, links={"passwd": "/etc/passwd"})
    _refused(lambda: guard.unpack(archive, tmp_path / "t", LIMITS), 422, "holds a link 'passwd'")
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as f:
        info = zipfile.ZipInfo("passwd")
        info.external_attr = (0o120777 << 16)  # a symbolic link, as zip -y stores one
        f.writestr(info, "/etc/passwd")
    _refused(lambda: guard.unpack(z, tmp_path / "z", LIMITS), 422, "holds symbolic link 'passwd'")
    assert not (tmp_path / "t").exists() and not (tmp_path / "z").exists()


def test_a_zip_bomb_is_stopped_while_it_is_written(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as f:
        f.writestr("zeros.bin", b"\0" * (64 * 2**20))  # 64 MB of zeros: a few tens of kB packed
    assert bomb.stat().st_size < 2**20
    detail = _refused(lambda: guard.unpack(bomb, tmp_path / "out", LIMITS), 413, "unpacks to more than")
    assert "50 times its own size" in detail
    assert not (tmp_path / "out").exists()


def test_an_oversized_archive_and_a_corrupt_one(tmp_path):
    big = tmp_path / "big.tar"
    big.write_bytes(os.urandom(6 * 2**20))
    _refused(lambda: guard.unpack(big, tmp_path / "out", LIMITS), 413, "at most 5 MB per file")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"\x1f\x8b\x08" + os.urandom(500))
    _refused(lambda: guard.unpack(broken, tmp_path / "out2", LIMITS), 422, "cannot unpack 'broken.tar.gz'")


@pytest.mark.parametrize("name, header", [
    ("a.nhdr", "NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/shadow\n\n"),
    ("b.nrrd", "NRRD0005\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndatafile: ../../secret.raw\n\n"),
    ("c.mhd", "ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = C:/x.raw\n"),
])
def test_detached_headers_are_refused(tmp_path, name, header):
    path = tmp_path / name
    path.write_text(header)
    _refused(lambda: guard.check_detached_header(path), 422, "detached header")


def test_attached_headers_pass(tmp_path):
    (tmp_path / "d.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 1\nsizes: 2\nencoding: raw\n\n\0\0\0\0")
    (tmp_path / "e.mha").write_text("ObjectType = Image\nElementDataFile = LOCAL\n")
    guard.check_detached_header(tmp_path / "d.nrrd")
    guard.check_detached_header(tmp_path / "e.mha")


@pytest.mark.parametrize("value", ["../../x", "/etc/passwd", "a/b", "..", "x\\y", "", " space", "a" * 300])
def test_ids_and_names_that_could_be_paths_are_refused(value):
    if value:
        _refused(lambda: guard.check_id(value), 422, "invalid image id")
    _refused(lambda: guard.check_name(value, "training run name"), 422, "invalid training run name")


def test_real_ids_pass():
    for value in ("ts_ct_small", "1.2.840.113619.2.55.3.2831164355.1", "4f0c2a1e-8b1d-11ef-9e1c-0242ac120002"):
        assert guard.check_id(value) == value
    assert guard.check_name("train_01", "run") == "train_01"
    _refused(lambda: guard.check_image_reference("/etc/hostname", False), 422, "server paths are refused")
    assert guard.check_image_reference("/etc/hostname", True) == "/etc/hostname"
    _refused(lambda: guard.check_image_reference("relative/x.nii", True), 404, "must be absolute and exist")


def test_admission_runs_one_queues_one_and_refuses_the_third():
    gate = Admission(workers=1, queue=1)
    running, release, results = threading.Event(), threading.Event(), []

    def first():
        with gate():
            running.set()
            release.wait(10)

    def second():
        with gate():
            results.append("second ran")

    threads = [threading.Thread(target=first)]
    threads[0].start()
    assert running.wait(10)
    threads.append(threading.Thread(target=second))
    threads[1].start()
    while gate.in_flight < 2:  # the second is queued behind the first
        threading.Event().wait(0.01)
    with pytest.raises(HTTPException) as e:
        with gate():
            pass
    assert e.value.status_code == 503 and int(e.value.headers["Retry-After"]) >= 1
    assert "1 at once and 1 waiting" in e.value.detail
    release.set()
    for t in threads:
        t.join(10)
    assert results == ["second ran"] and gate.in_flight == 0


@pytest.mark.parametrize("argv, warns", [
    (["monailabel", "start_server", "--host", "127.0.0.1"], False),
    (["monailabel", "start_server", "-i", "::1"], False),
    (["monailabel", "start_server", "--host=localhost"], False),
    (["monailabel", "start_server", "--host", "0.0.0.0"], True),
    (["monailabel", "start_server"], True),  # monailabel's own default is 0.0.0.0
    (["monailabel", "start_server", "--host", "192.168.1.20"], True),
])
def test_the_app_warns_when_it_listens_beyond_loopback_without_auth(argv, warns, caplog):
    from main import warn_if_exposed

    assert warn_if_exposed(argv) is warns
    assert ("authentication is off" in caplog.text) is warns


def test_a_published_model_is_served_only_with_the_checkpoint_it_came_from(tmp_path, caplog):
    from helpers import make_test_checkpoint
    from delightsam import load_model
    from delightsam.versions import publish_version
    from delightsam_app.served import ServedModel
    from delightsam_app.settings import AppSettings

    a = make_test_checkpoint(tmp_path / "a.safetensors", seed=0, version="a")
    b = make_test_checkpoint(tmp_path / "b.safetensors", seed=1, version="b")
    model_dir = tmp_path / "model"
    publish_version(load_model(a), {"epoch": 1}, model_dir / "versions", served=model_dir / "published.safetensors",
                    base=str(a))
    for configured, served_name in ((a, "published.safetensors"), (b, "b.safetensors")):
        settings = AppSettings.from_conf({"checkpoint": str(configured), "model_dir": str(model_dir)}, APP_DIR)
        served = ServedModel(settings, model_dir)
        assert served.served_checkpoint().name == served_name
        version = served.network("cpu").config.version
        assert version.startswith("delightsam-") if served_name == "published.safetensors" else version == "b"
    assert f"was trained from another one ({a})" in caplog.text


@pytest.mark.parametrize("value", ["100", "32", "2048"])
def test_a_refine_size_the_foundation_cannot_take_is_refused_by_name(tmp_path, value):
    from delightsam_app.settings import AppSettings

    assert AppSettings.from_conf({"model_dir": str(tmp_path)}, APP_DIR).pipeline.size == 96
    with pytest.raises(ValueError, match=f"refine_size must be a multiple of 32 from 64 to 1024, got {value}"):
        AppSettings.from_conf({"model_dir": str(tmp_path), "refine_size": value}, APP_DIR)


def test_refine_by_default_is_chosen_per_modality(tmp_path):
    from delightsam_app.settings import AppSettings

    def refines(value):
        settings = AppSettings.from_conf({"model_dir": str(tmp_path), "refine": value}, APP_DIR)
        return settings.pipeline.refines("ct"), settings.pipeline.refines("mr")

    assert refines("false") == refines("none") == (False, False)
    assert refines("true") == refines("all") == (True, True)
    assert refines("ct") == refines("CT, ") == (True, False)  # CT organs in two stages, MR brain tissue never


def test_the_ohif_toast_patch_still_applies_to_the_bundled_viewer():
    """The app appends the server's message to OHIF's "Failed to Run Segmentation" toast by patching the
    minified script of monailabel's bundled OHIF: an upgrade that changes that script must fail here, loudly."""
    from delightsam_app import compat, ohif

    found = ohif.patched_panel()
    assert found is not None, (f"no script of {compat.ohif_scripts()} holds {ohif.TOAST!r}: the OHIF bundled with this "
                               f"monailabel changed; update delightsam_app/ohif.py")
    name, script = found
    assert ohif.WITH_DETAIL in script and ohif.TOAST not in script and name.endswith(".js")


def test_the_pacs_datastore_is_monailabels_with_its_interface_overridden():
    from monailabel.datastore.dicom import DICOMWebDatastore

    from delightsam_app.pacs import PacsDatastore

    assert issubclass(PacsDatastore, DICOMWebDatastore)
    for method in ("list_images", "get_labeled_images", "save_label"):  # the Datastore interface's own methods
        assert method in PacsDatastore.__dict__ and hasattr(DICOMWebDatastore, method)


def test_a_refiner_is_kept_only_beside_the_model_being_served(tmp_path):
    """The served pipeline builds a model's refiner once and keeps it only as long as the model: a request still
    running on a model that a hot reload replaced keeps that model's refiner, and once the request ends, nothing holds
    the old model."""
    import gc
    import weakref

    from helpers import make_test_checkpoint
    from delightsam_app.served import ServedModel
    from delightsam_app.settings import AppSettings

    checkpoint = make_test_checkpoint(tmp_path / "served.safetensors", seed=0, version="old")
    served = ServedModel(AppSettings.from_conf({"checkpoint": str(checkpoint), "model_dir": str(tmp_path / "m")},
                                               APP_DIR), tmp_path / "m")
    old = served.network("cpu")
    assert served.pipeline.refiner(old) is served.pipeline.refiner(old)  # built once for the served model
    make_test_checkpoint(checkpoint, seed=1, version="new")  # training publishes; the next request reloads
    new = served.network("cpu")
    assert new.config.version == "new" and new is not old
    late = served.pipeline.refiner(old)  # the request that began on the old model finishes its second stage
    assert late is not served.pipeline.refiner(new) and served.pipeline.refiner(new) is served.pipeline.refiner(new)
    gone = weakref.ref(old)
    del old, late
    gc.collect()
    assert gone() is None  # no refiner, cache or reference keeps the replaced model


def test_the_pipeline_keeps_a_refiner_until_what_it_was_built_from_changes(tmp_path):
    """One refiner per model, built by the served pipeline: the same one for every request, and a new one when the
    input size, the model's adaptation (training replaces it each epoch) or its configuration changes."""
    import torch

    import delightsam
    from delightsam.pipeline import Pipeline
    from helpers import make_test_checkpoint

    model = delightsam.load_model(make_test_checkpoint(tmp_path / "model.safetensors"))
    first = Pipeline(["ct"]).refiner(model)
    assert Pipeline(["ct"]).refiner(model) is first and first.config.img_size == 96
    larger = Pipeline(["ct"], size=128).refiner(model)
    assert larger is not first and larger.config.img_size == 128
    queries = torch.zeros_like(first.state_dict()["decoder.query_groups.ct"])
    model.refiner_state = {"decoder.query_groups.ct": queries}
    adapted = Pipeline(["ct"]).refiner(model)
    assert adapted is not first and torch.equal(adapted.state_dict()["decoder.query_groups.ct"], queries)
    assert Pipeline(["ct"]).refiner(model) is adapted
    model.add_modality("pet", [("lesion", 9)])
    assert "pet" in Pipeline(["ct"]).refiner(model).config.modality_names


def test_the_work_gate_is_shared_by_processes(tmp_path):
    """The batch and scoring processes take the same slots as the server's inferences: a slot another process
    holds is not free here until it lets go."""
    import subprocess

    from filelock import Timeout

    from delightsam_app.gate import WorkGate

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\n"
                               "from delightsam_app.gate import WorkGate\n"
                               f"with WorkGate({str(tmp_path)!r}, 1)():\n"
                               "    print('held', flush=True); sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "held"
        gate = WorkGate(tmp_path, 1)
        with pytest.raises(Timeout):
            gate.slots[0].acquire(timeout=0)
        assert gate._free() is None
    finally:
        holder.stdin.close()  # lets go
        holder.wait(30)
    with gate():  # free once the other process let go
        assert gate._free() is gate.slots[0]  # re-entrant in this thread
        gate.slots[0].release()
