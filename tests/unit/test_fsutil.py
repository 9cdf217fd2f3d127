"""fsutil's judgement of a full disk: what is put down to it and what is not."""

from __future__ import annotations

import errno
import shutil
from collections import namedtuple

import pytest

from piimage.errors import BuildError, CommandError
from piimage.fsutil import DiskFull, blame_a_full_disk

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10 << 30, 0, free))


def test_a_failure_on_a_full_disk_is_the_disks(monkeypatch, tmp_path):
    # apt in a loop-mounted image: "Read-only file system", never ENOSPC
    _free(monkeypatch, 1 << 20)
    with pytest.raises(DiskFull) as e, blame_a_full_disk(tmp_path, 3 << 30, "building a layer"):
        raise CommandError("apt-get update failed (exit 100)", returncode=100, output_tail="")
    assert f"{tmp_path}: the disk filled up while building a layer" in e.value.message
    assert "3.0 GiB" in e.value.message and "0.0 GiB is free now" in e.value.message
    assert e.value.detail == "apt-get update failed (exit 100)"


def test_enospc_is_the_disks_whatever_is_free(monkeypatch, tmp_path):
    _free(monkeypatch, 5 << 30)  # freed again since (the half-written file went)
    with pytest.raises(DiskFull), blame_a_full_disk(tmp_path, 1, "writing"):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_other_failures_with_room_left_are_their_own(monkeypatch, tmp_path):
    _free(monkeypatch, 5 << 30)
    err = BuildError("a stage script failed")
    with pytest.raises(BuildError) as e, blame_a_full_disk(tmp_path, 1, "writing"):
        raise err
    assert e.value is err
    with pytest.raises(KeyError), blame_a_full_disk(tmp_path, 1, "writing"):
        raise KeyError("not ours to judge")
