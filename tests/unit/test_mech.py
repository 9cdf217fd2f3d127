"""run()'s accepted exit codes, private key files, the partition table reader: no root."""

import stat

import pytest

from piimage import disk, keys
from piimage.errors import CommandError
from piimage.run import run


def test_run_accepts_listed_exit_codes():
    assert run(["sh", "-c", "exit 1"], ok=(0, 1)).returncode == 1
    with pytest.raises(CommandError, match=r"three failed \(exit 3\)"):
        run(["sh", "-c", "echo why; exit 3"], what="three", ok=(0, 1))
    assert run(["sh", "-c", "exit 3"], check=False).returncode == 3


def test_munge_key_is_private_and_kept(tmp_path):
    first = keys.munge_key(tmp_path / "s")
    path = tmp_path / "s" / "munge.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(first) == keys.MUNGE_KEY_BYTES and keys.munge_key(tmp_path / "s") == first
    assert [p.name for p in path.parent.iterdir()] == ["munge.key"]  # no temporary left


def test_parse_sfdisk_json():
    text = """warning first\n{"partitiontable": {"label": "dos", "sectorsize": 512, "partitions": [
      {"node": "img1", "start": 16384, "size": 1048576, "type": "c"},
      {"node": "img2", "start": 1064960, "size": 4194304, "type": "83"}]}}"""
    p1, p2 = disk.parse_sfdisk_json(text)
    assert (p1.number, p1.start, p1.type) == (1, 16384 * 512, "c")
    assert (p2.number, p2.start, p2.size) == (2, 1064960 * 512, 4194304 * 512)


def test_apt_mirrors_cover_every_archive_of_the_real_image():
    from piimage.emulate import with_mirrors

    # bookworm: one-line sources.list and raspi.list (pi-gen stage0/00-configure-apt/files)
    bookworm = (
        "deb http://deb.debian.org/debian bookworm main contrib non-free non-free-firmware\n"
        "deb http://deb.debian.org/debian-security/ bookworm-security main contrib\n"
        "deb http://deb.debian.org/debian bookworm-updates main contrib\n"
        "deb http://archive.raspberrypi.com/debian/ bookworm main\n"
    )
    mirrors = {
        "mirror": "http://m.lan/debian/",
        "security_mirror": "http://m.lan/security",
        "raspberrypi_mirror": "http://m.lan/raspi",
    }
    assert with_mirrors(bookworm, mirrors).splitlines() == [
        "deb http://m.lan/debian bookworm main contrib non-free non-free-firmware",
        "deb http://m.lan/security/ bookworm-security main contrib",
        "deb http://m.lan/debian bookworm-updates main contrib",
        "deb http://m.lan/raspi/ bookworm main",
    ]
    # trixie: deb822 debian.sources; only the archives that have a mirror change
    trixie = (
        "Types: deb\nURIs: http://deb.debian.org/debian/\nSuites: trixie trixie-updates\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security/\nSuites: trixie-security\n"
    )
    out = with_mirrors(trixie, {"mirror": "https://m.lan/debian"})
    assert "URIs: https://m.lan/debian/\n" in out
    assert "URIs: http://deb.debian.org/debian-security/\n" in out
    assert with_mirrors(trixie, {}) == trixie


def test_emulated_programs_run_on_a_pis_cpu(monkeypatch):
    """Every chroot command gets QEMU_CPU: the Pi's cores, not QEMU's default `max` (whose
    emulated pointer authentication no Pi has), the same CPU the rehearsal's VMs have."""
    from piimage import emulate, piboot

    seen = []
    monkeypatch.setattr(emulate, "run", lambda argv, **kw: seen.append(argv))
    c = emulate.Chroot("/nonexistent.img")
    c.run(["true"], what="t")
    (argv,) = seen
    assert argv[:2] == ["env", "-i"] and f"QEMU_CPU={piboot.CPU}" in argv
    assert piboot.CPU == "cortex-a72"


def test_half_written_outputs_of_killed_builds_are_removed(tmp_path):
    """A SIGKILLed build leaves `.<image>.partial-<pid>` in out/: the next build (holding the
    folder's lock) removes those whose process is gone, and nothing else."""
    import os

    from piimage.build import _clean_stale_outputs

    dead = tmp_path / ".node01.img.partial-999999999"
    live = tmp_path / f".node02.img.partial-{os.getpid()}"
    keep = [tmp_path / "node01.img", tmp_path / ".hidden", live]
    for p in [dead, *keep]:
        p.write_bytes(b"x")
    _clean_stale_outputs(tmp_path)
    assert not dead.exists() and all(p.exists() for p in keep)


def test_a_disk_that_fills_up_is_told_as_such(tmp_path):
    import errno

    from piimage.errors import CommandError
    from piimage.fsutil import filled_up, out_of_space

    assert out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert not out_of_space(OSError(errno.EIO, "Input/output error"))
    tool = CommandError(
        "qemu-img convert failed", 1, "error while writing: No space left on device"
    )
    assert out_of_space(tool) and not out_of_space(CommandError("x failed", 1, "other"))
    e = filled_up(tmp_path, 3 << 30, "writing node01.img")
    assert e.message.startswith(f"{tmp_path}: the disk filled up while writing node01.img")
    assert "it needs about 3.0 GiB" in e.message and "is free now" in e.message and e.hint
