"""The one atomic file replacement (``delightsam.files``): all of the new file or all of the old one."""

from __future__ import annotations

import os
import stat

import pytest

from delightsam.files import atomic_path, write_text


def test_a_file_is_replaced_whole_and_readable_by_others(tmp_path):
    target = tmp_path / "sub" / "split.json"
    write_text(target, "old")
    write_text(target, "new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~_umask()
    assert [p.name for p in target.parent.iterdir()] == ["split.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "model.safetensors"
    write_text(target, "the served model")
    with pytest.raises(OSError, match="No space left"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of a new mod")
            raise OSError(28, "No space left on device")  # what a full disk raises mid-write
    assert target.read_text() == "the served model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_new_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "state.pt"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 1000)
        assert not target.exists()  # a reader meanwhile sees nothing (or the old file)
    assert target.stat().st_size == 1000


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_the_umask_is_read_once_and_never_set_while_writing(tmp_path, monkeypatch):
    """Reading the umask means setting it; done while other threads create files, that would let them create
    world-writable ones. It is read once, at import, and a write never touches it."""
    from delightsam import files

    assert files.UMASK == _umask()

    def no_umask(mask):
        raise AssertionError("os.umask called while writing")

    monkeypatch.setattr(os, "umask", no_umask)
    target = write_text(tmp_path / "index.json", "{}")
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 & ~files.UMASK
