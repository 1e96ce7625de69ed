"""The app's local datastore (``delightsam_app.datastore``): the index is changed under one lock from what is on
disk, by every write path, monailabel's own included, so that no process writes another's change away; what a
request adds is checked before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from helpers import REPO, subprocess_env

from delightsam_app.datastore import AtomicLocalDatastore

EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd"]


@pytest.fixture
def studies(tmp_path, samples):
    folder = tmp_path / "studies"
    folder.mkdir()
    for name in ("ts_ct_small.nii.gz", "ts_mr_small.nii.gz"):
        shutil.copyfile(samples / "studies" / name, folder / name)
    return folder


def _store(folder, kind=AtomicLocalDatastore):
    return kind(str(folder), extensions=EXTENSIONS, auto_reload=False)


def _index(folder) -> dict:
    return json.loads((folder / "datastore_v2.json").read_text())["objects"]


def _another_process_saves_a_label(folder, samples) -> None:
    """A train, scoring or batch process of the app (a process of its own, with its own copy of the index) saves
    a label of ts_mr_small."""
    code = ("from delightsam_app.datastore import AtomicLocalDatastore\n"
            f"store = AtomicLocalDatastore({str(folder)!r}, extensions={EXTENSIONS!r})\n"
            f"store.save_label('ts_mr_small', {str(samples / 'samples' / 'labels' / 'ts_mr_small.nii.gz')!r}, "
            "'original', {'model': 'delightsam_mr'})\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=subprocess_env())


@pytest.mark.parametrize("change", ["update_image_info", "add_image", "refresh", "remove_label"])
def test_a_change_made_from_a_stale_copy_keeps_what_another_process_wrote(studies, samples, tmp_path, change):
    """This process read the index before the other process saved its label; each of its write paths (monailabel's
    add_image and reconcile included) changes the index on disk, so the other process's label stays."""
    def run(kind):
        folder = tmp_path / kind.__name__
        shutil.copytree(studies, folder)
        store = _store(folder, kind)
        store.save_label("ts_ct_small", str(samples / "samples" / "labels" / "ts_ct_small.nii.gz"), "final", {})
        _another_process_saves_a_label(folder, samples)  # this process's copy of the index is now stale
        if change == "update_image_info":
            store.update_image_info("ts_ct_small", {"modality": "ct"})
        elif change == "add_image":
            extra = tmp_path / "extra.nii.gz"
            shutil.copyfile(samples / "studies" / "ts_ct.nii.gz", extra)
            store.add_image("ts_ct", str(extra), {})
        elif change == "refresh":  # monailabel's reconcile of the folder (its watcher runs it on every new file)
            shutil.copyfile(samples / "studies" / "ts_ct.nii.gz", folder / "ts_ct.nii.gz")
            store.refresh()
        else:
            store.remove_label("ts_ct_small", "final")
        return _index(folder)

    ours = run(AtomicLocalDatastore)
    assert "original" in ours["ts_mr_small"]["labels"], ours["ts_mr_small"]  # the other process's label
    if change == "remove_label":
        assert "final" not in ours["ts_ct_small"]["labels"]
    else:
        assert "final" in ours["ts_ct_small"]["labels"]
    if change in ("update_image_info", "add_image"):  # monailabel's own writes its stale copy over it: the bug
        assert "original" not in run(LocalDatastore)["ts_mr_small"]["labels"]


def test_threads_changing_the_index_lose_nothing(studies):
    store = _store(studies)

    def annotate(client: str):
        for i in range(15):
            store.update_image_info("ts_ct_small", {"client_id": f"{client}-{i}"})

    other = _store(studies)  # a second copy in this process, as monailabel's tasks make one
    threads = [threading.Thread(target=annotate, args=(c,)) for c in ("a", "b")]
    threads.append(threading.Thread(target=lambda: [other.update_image_info("ts_mr_small", {"client_id": f"c-{i}"})
                                                    for i in range(15)]))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    index = _index(studies)
    assert index["ts_ct_small"]["image"]["info"]["client_id"] in ("a-14", "b-14")
    assert index["ts_mr_small"]["image"]["info"]["client_id"] == "c-14"


def test_an_added_image_is_checked_before_it_is_written(studies, tmp_path, samples):
    store = _store(studies)
    upload = tmp_path / "upload.nii.gz"
    shutil.copyfile(samples / "studies" / "ts_ct.nii.gz", upload)
    for image_id in ("..", "../../escaped", "a/b"):
        with pytest.raises(HTTPException) as e:
            store.add_image(image_id, str(upload), {})
        assert e.value.status_code == 422 and "invalid image id" in e.value.detail
    with pytest.raises(HTTPException) as e:  # an id taken from a file name that is a path
        store.add_image("", str(tmp_path / ".."), {})
    assert e.value.status_code in (415, 422)
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(HTTPException) as e:
        store.add_image("notes", str(text), {})
    assert e.value.status_code == 415 and "not a file type this datastore keeps" in e.value.detail
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b" + b"\0" * 100)
    with pytest.raises(HTTPException) as e:
        store.add_image("broken", str(broken), {})
    assert e.value.status_code == 422 and "cannot read it as a volume" in e.value.detail
    with pytest.raises(HTTPException) as e:
        store.add_image("ts_ct", str(upload), {"modality": "ct", "strategy": {"x": {"ts": "junk"}}})
    assert e.value.status_code == 422 and "strategy" in e.value.detail
    assert sorted(p.name for p in studies.iterdir() if p.is_file() and not p.name.startswith(".")) == \
        ["datastore_v2.json", "ts_ct_small.nii.gz", "ts_mr_small.nii.gz"]  # nothing was written
    assert not (tmp_path / "escaped.nii.gz").exists()
    assert store.add_image("", str(upload), {"client_id": "me"}) == "upload"  # the id from the file name
    assert _index(studies)["upload"]["image"]["info"]["client_id"] == "me"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp_path / "upload.nii")
    store.add_image("upload", str(tmp_path / "upload.nii"), {})  # the same id in another format replaces it
    assert (studies / "upload.nii").exists() and not (studies / "upload.nii.gz").exists()
    assert _index(studies)["upload"]["image"]["ext"] == ".nii"
