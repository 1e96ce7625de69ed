"""Hostile requests against a real `monailabel start_server` process on loopback: each is refused with a 4xx
that says why, nothing lands outside the app's folders, and the server goes on answering. Also several users:
`/info` answers while an inference runs, and an inference beyond the queue gets 503 with Retry-After."""

from __future__ import annotations

import io
import json
import os
import select
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from helpers import REPO, make_test_checkpoint, monailabel_server, studies_folder, tar_bytes

pytestmark = pytest.mark.server

TOKEN = f"escaped-{uuid.uuid4().hex[:8]}"  # in every name a hostile request tries to write


@pytest.fixture(scope="module")
def server(tmp_path_factory, samples):
    tmp = tmp_path_factory.mktemp("hostile")
    studies = studies_folder(tmp, samples, ["ts_ct_small.nii.gz", "ts_ct.nii.gz"])
    checkpoint = make_test_checkpoint(tmp / "models" / "delightsam.safetensors")
    conf = ["--conf", "checkpoint", str(checkpoint), "--conf", "model_dir", str(tmp / "model"),
            "--conf", "max_upload_mb", "1", "--conf", "max_request_mb", "2",
            "--conf", "infer_workers", "1", "--conf", "infer_queue", "0"]
    with monailabel_server(tmp, studies, conf) as url:
        yield {"url": url, "tmp": tmp, "studies": studies}


def _refused(reply, status: int, words: str) -> None:
    assert reply.status_code == status, (reply.status_code, reply.text[:500])
    assert words in reply.json()["detail"], reply.json()


def _infer(url, image="ts_ct_small", params=None, **files):
    """An inference of the first stage only (these tests are about the edge, not the random model's boxes)."""
    return requests.post(f"{url}/infer/delightsam_ct", params={"image": image, "output": "json"},
                         data={"params": json.dumps({"refine": False, **(params or {})})}, files=files or None,
                         timeout=300)


def _session(url, name: str, data: bytes):
    return requests.put(f"{url}/session/", params={"uncompress": "true"}, files={"files": (name, data)}, timeout=60)


@pytest.mark.parametrize("name", [f"../../{TOKEN}", f"/tmp/{TOKEN}", f"a/../../{TOKEN}"])
def test_a_training_run_name_cannot_be_a_path(server, name):
    reply = requests.post(f"{server['url']}/train/delightsam", json={"name": name, "resume": False}, timeout=30)
    _refused(reply, 422, "option 'name'")


@pytest.mark.parametrize("image", ["/etc/hostname", f"../../{TOKEN}", "studies/../ts_ct_small"])
def test_an_image_cannot_be_a_server_path(server, image):
    _refused(_infer(server["url"], image=image), 422, "server paths are refused")


@pytest.mark.parametrize("image", ["/etc/hostname", "/", str(REPO / "data"), "ts_ct", "data"])
def test_params_cannot_name_another_image_than_the_checked_one(server, image):
    """monailabel merges `params` into the request after the route checked `image`: a params image would replace
    the checked id (a server path, another datastore image, a folder the server would walk)."""
    _refused(_infer(server["url"], params={"image": image}), 422, "cannot set 'image'")
    for key, value in (("session", {"image": "/etc/hostname"}), ("model", "delightsam_mr"),
                       ("save_label", True), ("label_tag", "final")):
        _refused(_infer(server["url"], params={key: value}), 422, f"cannot set {key!r}")


@pytest.mark.parametrize("image", ["data", "apps", "README.md", "scripts", "tests"])
def test_an_id_that_names_something_in_the_servers_folder_is_only_a_datastore_id(server, image):
    """The server runs in the repository (as under `make run`): these ids pass the id pattern and exist relative to
    its working folder; they are looked up in the datastore only, never walked or read."""
    reply = _infer(server["url"], image=image, params={"result_extension": ".dcm"})
    _refused(reply, 404, f"no image {image!r} in the datastore")


@pytest.mark.parametrize("params, words", [
    ({"refine": "maybe"}, "option 'refine'"),
    ({"device": "foo"}, "option 'device'"),
    ({"device": "cuda"}, "CUDA device"),
    ({"result_extension": f"/../../{TOKEN}.nii.gz"}, "option 'result_extension'"),
    ({"logging": 7}, "option 'logging'"),
    ({"timeout": 1e9}, "unknown option 'timeout'"),
    ({"result_write_to_file": False}, "unknown option 'result_write_to_file'"),
])
def test_a_bad_option_is_a_422_that_names_it(server, params, words):
    _refused(_infer(server["url"], params=params), 422, words)


def test_jobs_in_the_background_check_their_options_before_they_start(server):
    url = server["url"]
    _refused(requests.post(f"{url}/train/delightsam", json={"max_epochs": "lots"}, timeout=30), 422, "option 'max_epochs'")
    _refused(requests.post(f"{url}/train/delightsam", params={"run_sync": "true"}, json={}, timeout=30), 422,
             "run_sync is not available")
    _refused(requests.post(f"{url}/train/", json={"delightsam": {"lr": "fast"}}, timeout=30), 422, "option 'lr'")
    _refused(requests.post(f"{url}/train/other", json={}, timeout=30), 404, "no model named 'other'")
    _refused(requests.post(f"{url}/batch/infer/delightsam_ct", json={"label_tag": "final"}, timeout=30), 422,
             "never `final`")
    _refused(requests.post(f"{url}/batch/infer/delightsam_xray", json={}, timeout=30), 404, "no model named")
    _refused(requests.post(f"{url}/scoring/nosuch", json={}, timeout=30), 404, "no method named 'nosuch'")
    _refused(requests.post(f"{url}/scoring/uncertainty", json={"x": 1}, timeout=30), 422, "unknown option 'x'")
    _refused(requests.post(f"{url}/activelearning/uncertain", json={"strategy": "random"}, timeout=30), 422,
             "cannot set 'strategy'")
    _refused(requests.post(f"{url}/activelearning/uncertain", json={"labels": 3, "x": 1}, timeout=30), 422,
             "unknown option 'x'")
    reply = requests.put(f"{url}/datastore/image/info", params={"image": "ts_ct_small"},
                         data={"info": json.dumps({"modality": "xray"})}, timeout=30)
    _refused(reply, 422, "option 'modality'")
    reply = requests.put(f"{url}/datastore/image/info", params={"image": "ts_ct_small"},
                         data={"info": json.dumps({"strategy": {"random": {"ts": "junk"}}})}, timeout=30)
    _refused(reply, 422, "cannot set 'strategy'")


def _save_label(url, data: bytes, params: dict, name="label.nii.gz", image="ts_ct_small"):
    return requests.put(f"{url}/datastore/label", params={"image": image, "tag": "final"},
                        files={"label": (name, data)}, data={"params": json.dumps(params)}, timeout=60)


@pytest.fixture(scope="module")
def liver_label(server, samples, tmp_path_factory):
    """The reference liver of ts_ct_small as value 1 (as Slicer saves a one-segment label)."""
    import nibabel as nib
    import numpy as np

    reference = nib.load(samples / "samples" / "labels" / "ts_ct_small.nii.gz")
    liver = (np.asarray(reference.dataobj) == 5).astype(np.uint8)
    path = tmp_path_factory.mktemp("labels") / "liver.nii.gz"
    nib.save(nib.Nifti1Image(liver, reference.affine), path)
    return path.read_bytes()


@pytest.mark.parametrize("idx", [-1, 0, 256, 2_000_000_000])
def test_label_indices_beyond_uint8_are_refused_and_nothing_is_saved(server, liver_label, idx):
    reply = _save_label(server["url"], liver_label, {"label_info": [{"name": "liver", "idx": idx}]})
    _refused(reply, 422, "option 'label_info.0.idx'")
    assert not (server["studies"] / "labels" / "final" / "ts_ct_small.nii.gz").exists()


def test_a_label_must_be_a_volume_on_its_images_grid(server, liver_label, samples):
    url, final = server["url"], server["studies"] / "labels" / "final"
    _refused(_save_label(url, os.urandom(4096), {}), 422, "cannot read it")
    other_grid = (samples / "samples" / "labels" / "ts_ct.nii.gz").read_bytes()  # ts_ct's label, 112 slices
    _refused(_save_label(url, other_grid, {"label_info": [{"name": "liver", "idx": 5}]}), 422, "not on the image's grid")
    _refused(_save_label(url, liver_label, {"label_info": [{"name": "spleen", "idx": 2}]}), 422,
             "values [1] are not named")
    _refused(_save_label(url, liver_label, {"label_info": [{"name": "liver", "idx": 1}]}, name=f"../{TOKEN}.txt"), 415,
             "not a file type")
    assert not (final / "ts_ct_small.nii.gz").exists()
    reply = requests.put(f"{url}/datastore/image/info", params={"image": "ts_ct_small"},
                         data={"info": json.dumps({"modality": "CT"})}, timeout=30)  # its structures: the CT model's
    assert reply.status_code == 200, reply.text
    reply = _save_label(url, liver_label, {"label_info": [{"name": "Liver", "idx": 1}, {"name": "spleen", "idx": 2}]})
    assert reply.status_code == 200, reply.text
    assert "annotates liver for training" in reply.json()["notes"][-1]  # the empty spleen segment is not counted
    assert (final / "ts_ct_small.nii.gz").read_bytes() == liver_label
    requests.delete(f"{url}/datastore/label", params={"id": "ts_ct_small", "tag": "final"}, timeout=30).raise_for_status()


@pytest.mark.parametrize("name", ["..", f"../../{TOKEN}.nii.gz", f"/tmp/{TOKEN}.nii.gz"])
def test_an_uploaded_image_named_by_a_path_is_refused(server, name):
    """PUT /datastore/image without an image id takes the id from the upload's file name."""
    reply = requests.put(f"{server['url']}/datastore/image", files={"file": (name, os.urandom(2048))},
                         data={"params": "{}"}, timeout=60)
    assert reply.status_code in (415, 422), reply.text
    assert requests.get(f"{server['url']}/datastore/", params={"output": "all"}, timeout=30).json()["objects"].keys() \
        == {"ts_ct_small", "ts_ct"}


def test_a_dicom_seg_of_any_folder_on_the_server_is_refused(server):
    _refused(_infer(server["url"], image=str(REPO / "data"), params={"result_extension": ".dcm"}), 422,
             "server paths are refused")


def test_label_tags_and_image_ids_cannot_be_paths(server):
    label = (server["studies"] / "ts_ct_small.nii.gz").read_bytes()
    reply = requests.put(f"{server['url']}/datastore/label", params={"image": "ts_ct_small", "tag": f"../../{TOKEN}"},
                         files={"label": ("l.nii.gz", label)}, data={"params": "{}"}, timeout=60)
    _refused(reply, 422, "invalid label tag")
    reply = requests.put(f"{server['url']}/datastore/image", params={"image": f"../{TOKEN}"},
                         files={"file": ("x.nii.gz", label)}, data={"params": "{}"}, timeout=60)
    _refused(reply, 422, "invalid image id")
    reply = requests.put(f"{server['url']}/datastore/image", files={"file": ("..", label)}, data={"params": "{}"},
                         timeout=60)
    _refused(reply, 422, "invalid image id")


def test_tar_slip_and_absolute_members_are_refused(server):
    for member in (f"../../{TOKEN}.txt", f"/tmp/{TOKEN}.txt"):
        _refused(_session(server["url"], "series.tar.gz", tar_bytes({"ok.dcm": b"x", member: b"escaped"})), 422,
                 "outside the upload's folder")


def test_symlink_members_are_refused(server):
    reply = _session(server["url"], "series.tar.gz", tar_bytes({"ok.dcm": b"x"}, links={TOKEN: "/etc/passwd"}))
    _refused(reply, 422, f"holds a link '{TOKEN}'")


def test_a_zip_bomb_is_refused(server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{TOKEN}.bin", b"\0" * (96 * 2**20))
    _refused(_session(server["url"], "bomb.zip", buffer.getvalue()), 413, "unpacks to more than")


def test_oversized_uploads_are_refused(server):
    big = os.urandom(int(1.5 * 2**20))
    _refused(_infer(server["url"], image="", file=("big.nii.gz", big)), 413, "at most 1 MB per file")
    _refused(_session(server["url"], "big.tar.gz", big), 413, "at most 1 MB per file")


def test_a_request_body_past_the_limit_is_refused_as_it_arrives(server):
    """max_request_mb (2 here): a declared 10 GB body is refused before a byte of it is sent (nothing is
    spooled), and a body that streams past the limit with no declared length is refused once past it."""
    head = b"PUT /session/?uncompress=true HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    with _connect(server) as s:
        s.sendall(head + b"Content-Length: 10737418240\r\n\r\n")
        assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
    with _connect(server) as s:
        part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="x.tar.gz"\r\n\r\n'
        s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n" % (len(part), part))
        sent = 0
        try:
            while sent < 32 * 2**20 and not select.select([s], [], [], 0)[0]:  # until the server answers
                chunk = os.urandom(64 * 1024)
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):  # it answered and closed while this was still sending
            pass
        assert b" 413 " in s.recv(4096).split(b"\r\n")[0]
    assert 2 * 2**20 <= sent < 32 * 2**20, sent  # refused once past the limit, long before the whole body
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200


def _connect(server):
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(server["url"])
    return socket.create_connection((address.hostname, address.port), timeout=60)


def test_a_detached_header_is_refused(server):
    header = b"NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: /etc/shadow\n\n"
    _refused(_infer(server["url"], image="", file=("x.nhdr", header)), 422, "detached header")
    _refused(_session(server["url"], "series.tar.gz", tar_bytes({"x.nhdr": header})), 422, "detached header")


def test_an_absurd_batch_size_is_refused(server):
    _refused(_infer(server["url"], params={"batch_size": 100000}), 422,
             "option 'batch_size': must be a whole number from 1 to 32")
    _refused(_infer(server["url"], params={"batch_size": "many"}), 422, "option 'batch_size'")


def test_info_answers_while_an_inference_runs_and_the_queue_is_bounded(server):
    url, outcome = server["url"], {}

    def long_inference():  # a 112-slice CT one slice at a time: seconds
        outcome["reply"] = _infer(url, image="ts_ct", params={"batch_size": 1})

    worker = threading.Thread(target=long_inference)
    worker.start()
    seen_busy = False
    while worker.is_alive() and not seen_busy:
        busy = requests.get(f"{url}/info/", timeout=30).json()["inference"]
        seen_busy = busy["running_or_queued"] == 1
    assert seen_busy, "the inference ended before /info saw it running"  # /info answered during the inference
    refused = _infer(url)  # one worker, no queue: a second inference is told to come back
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "the server is busy" in refused.json()["detail"]
    worker.join(600)
    assert outcome["reply"].status_code == 200, outcome["reply"].text[:300]
    assert _infer(url).status_code == 200  # free again


def test_nothing_was_written_outside_and_the_server_still_answers(server):
    """Listed: the file system's root, the temp folder, the repository and this test's folders."""
    roots = [Path("/"), Path(tempfile.gettempdir()), REPO, server["tmp"], server["tmp"].parent]
    found = [p for root in roots for p in root.iterdir() if TOKEN in p.name]
    found += [p for p in server["tmp"].rglob("*") if TOKEN in p.name]
    assert not found, found
    assert requests.get(f"{server['url']}/info/", timeout=30).status_code == 200
    assert _infer(server["url"]).status_code == 200
