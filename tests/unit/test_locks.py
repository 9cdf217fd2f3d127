"""The advisory lock that keeps two piimage processes from building the same role layer twice,
and what builds killed outright leave behind (chroot mounts, loop devices on temporary layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from piimage import emulate, layers
from piimage.fsutil import Cancelled, exclusive, fingerprint


def _holder(lock: Path, seconds: float) -> subprocess.Popen:
    """Another process that takes the lock, says so on stdout, and keeps it for `seconds`."""
    code = textwrap.dedent(
        f"""
        import fcntl, sys, time
        f = open({str(lock)!r}, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep({seconds})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_exclusive_waits_for_another_process(tmp_path):
    lock = tmp_path / "x.lock"
    proc = _holder(lock, 1.0)
    waits = []
    t0 = time.monotonic()
    with exclusive(lock, on_wait=lambda: waits.append(1), poll=0.05):
        waited = time.monotonic() - t0
    proc.wait()
    assert waits == [1] and waited >= 0.5


def test_exclusive_does_not_wait_when_free(tmp_path):
    waits = []
    with exclusive(tmp_path / "sub" / "x.lock", on_wait=lambda: waits.append(1)):
        pass
    assert waits == []
    # and it is free again afterwards, for this process and others
    with exclusive(tmp_path / "sub" / "x.lock", on_wait=lambda: waits.append(1)):
        pass
    assert waits == []


def test_exclusive_gives_up_when_cancelled(tmp_path):
    lock = tmp_path / "x.lock"
    proc = _holder(lock, 30)
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    try:
        with pytest.raises(Cancelled), exclusive(lock, cancelled=stop.is_set, poll=0.05):
            pytest.fail("the lock was taken while another process held it")
    finally:
        proc.kill()
        proc.wait()


def test_a_layer_built_meanwhile_by_another_process_is_used(tmp_path, monkeypatch):
    """The second piimage waits on the lock and then takes the first one's layer."""
    monkeypatch.setattr(layers, "layer_dir", lambda: tmp_path)
    inputs = layers.LayerInputs("compute", "0" * 64, ("slurmd",), 512, ())
    final = layers.layer_path(inputs)
    lock = final.with_name(f".{final.stem}.lock")
    proc = _holder(lock, 1.0)

    def built_by_the_other():
        time.sleep(0.3)
        final.write_bytes(b"layer")
        final.with_suffix(".json").write_text(json.dumps({"image": fingerprint(final)}))

    threading.Thread(target=built_by_the_other).start()

    def must_not_build(*a, **k):
        raise AssertionError("built a layer the other process was building")

    monkeypatch.setattr(layers, "_build_locked", must_not_build)
    assert layers.ensure_layer(None, inputs, []) == final
    proc.wait()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_a_killed_builds_chroot_mounts_are_found_deepest_first():
    dead, live = _dead_pid(), os.getpid()
    mounts = "".join(
        f"{src} {mp} {fs} rw 0 0\n"
        for src, mp, fs in (
            ("/dev/loop3", f"/tmp/piimage-root-{dead}-ab12", "ext4"),
            ("proc", f"/tmp/piimage-root-{dead}-ab12/proc", "proc"),
            ("udev", f"/tmp/piimage-root-{dead}-ab12/dev/pts", "devpts"),
            ("/dev/loop4", f"/tmp/piimage-root-{live}-cd34", "ext4"),  # a live build's
            ("/dev/vda", "/", "ext4"),
        )
    )
    assert emulate.stale_mounts(mounts) == [
        f"/tmp/piimage-root-{dead}-ab12/dev/pts",
        f"/tmp/piimage-root-{dead}-ab12/proc",
        f"/tmp/piimage-root-{dead}-ab12",
    ]


def test_loop_devices_on_another_builds_temporary_layer_are_found(tmp_path):
    final = tmp_path / "compute-0123456789abcdef.img"
    other, ours = _dead_pid(), os.getpid()
    listed = "\n".join(
        (
            f"/dev/loop1 {tmp_path}/.{final.name}.partial-{other} (deleted)",
            f"/dev/loop2 {tmp_path}/.{final.name}.partial-{ours}",  # this build's own
            f"/dev/loop3 {tmp_path}/.head-0123456789abcdef.img.partial-{other}",  # another layer
            f"/dev/loop4 /cache/layers/.{final.name}.partial-{other}",  # another folder
            f"/dev/loop5 {final}",  # the finished layer
        )
    )
    assert emulate.stale_loops(listed, final) == ["/dev/loop1"]


@pytest.mark.parametrize("harm", ["cut short", "changed", "description lost"])
def test_a_damaged_cached_layer_is_said_and_built_again(tmp_path, monkeypatch, caplog, harm):
    monkeypatch.setattr(layers, "layer_dir", lambda: tmp_path)
    inputs = layers.LayerInputs("compute", "0" * 64, ("slurmd",), 512, ())
    final = layers.layer_path(inputs)
    final.write_bytes(b"a layer of some bytes")
    final.with_suffix(".json").write_text(json.dumps({"image": fingerprint(final)}))
    assert layers.ensure_layer(None, inputs, []) == final  # whole: used as it is
    if harm == "cut short":
        final.write_bytes(b"a layer")
    elif harm == "changed":
        final.write_bytes(b"a layer of other bytes")  # the same size, a new mtime and digest
    else:
        final.with_suffix(".json").unlink()
    built = []
    monkeypatch.setattr(layers, "_build_locked", lambda *a, **k: built.append(a[3]) or a[3])
    assert layers.ensure_layer(None, inputs, []) == final
    assert built == [final] and not final.exists()  # removed, then (here: not) built anew
    assert f"the cached {final.name}" in caplog.text and "building it again" in caplog.text


def test_a_damaged_cached_base_is_made_again(tmp_path, caplog):
    from piimage import fetch

    raw = tmp_path / ("ab" * 32) / "image.img"
    raw.parent.mkdir()
    raw.write_bytes(b"raw image")
    fetch._write_info(raw, {"name": "base"}, None)
    assert fetch._cached_raw(raw, "base")
    with open(raw, "r+b") as f:
        f.write(b"RAW")  # same size, changed in place
    assert not fetch._cached_raw(raw, "base") and not raw.exists()
    assert "was changed after it was made" in caplog.text
