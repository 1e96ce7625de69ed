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

from conftest import REPO, make_test_checkpoint, monailabel_server, studies_folder, tar_bytes

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
    return requests.post(f"{url}/infer/delightsam_ct", params={"image": image, "output": "json"},
                         data={"params": json.dumps(params or {})}, files=files or None, timeout=300)


def _session(url, name: str, data: bytes):
    return requests.put(f"{url}/session/", params={"uncompress": "true"}, files={"files": (name, data)}, timeout=60)


@pytest.mark.parametrize("name", [f"../../{TOKEN}", f"/tmp/{TOKEN}", f"a/../../{TOKEN}"])
def test_a_training_run_name_cannot_be_a_path(server, name):
    reply = requests.post(f"{server['url']}/train/delightsam", json={"name": name, "resume": False}, timeout=30)
    _refused(reply, 422, "invalid training run name")


@pytest.mark.parametrize("image", ["/etc/hostname", f"../../{TOKEN}", "studies/../ts_ct_small"])
def test_an_image_cannot_be_a_server_path(server, image):
    _refused(_infer(server["url"], image=image), 422, "server paths are refused")


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
    _refused(_infer(server["url"], params={"batch_size": 100000}), 422, "batch_size must be a whole number from 1 to 32")
    _refused(_infer(server["url"], params={"batch_size": "many"}), 422, "batch_size must be")


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
