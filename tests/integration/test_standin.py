"""scripts/standin-image: the published stand-ins, read back the way a consumer of the real
Raspberry Pi OS Lite image reads it (checksums, os_list, partition table, both filesystems).

Costly only once per machine and script version (the builds); afterwards the stand-ins come from
the cache and these tests take seconds plus one decompression per suite.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
SECTOR = 512
MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}

# What differs between the two releases, as on Raspberry Pi's own images.
EXPECT = {
    "bookworm": {
        "name": "Raspberry Pi OS (Legacy, 64-bit) Lite",
        "init_format": "systemd",
        "first_boot": "init=/usr/lib/raspberrypi-sys-mods/firstboot",
        "bootfs_extra": [],
    },
    "trixie": {
        "name": "Raspberry Pi OS Lite (64-bit)",
        "init_format": "cloudinit-rpi",
        "first_boot": "resize",
        "bootfs_extra": ["user-data", "meta-data", "network-config"],
    },
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(4 << 20):
            h.update(buf)
    return h.hexdigest()


def sh(*cmd: str, env: dict | None = None) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def suite(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def published(standin, suite):
    return standin(suite)


@pytest.fixture(scope="module")
def raw(standin_raw, suite) -> Path:
    return standin_raw(suite)


@pytest.fixture(scope="module")
def table(raw) -> dict:
    return json.loads(sh("sfdisk", "-J", str(raw)))["partitiontable"]


def debugfs(raw: Path, offset: int, request: str) -> str:
    return sh("debugfs", "-R", request, f"{raw}?offset={offset}")


def test_published_files_and_checksums(published, suite):
    basename = f"raspios-standin-{suite}-arm64-lite.img.xz"
    assert published.image_xz.name == basename and published.image_xz.is_file()
    line = published.sha256_file.read_text()
    m = re.fullmatch(r"([0-9a-f]{64})  (\S+)\n", line)
    assert m, f"not sha256sum format: {line!r}"
    assert m.group(2) == basename
    assert m.group(1) == sha256(published.image_xz) == published.item["image_download_sha256"]
    assert published.item["image_download_size"] == published.image_xz.stat().st_size


def test_os_list_entry(published, suite):
    doc = json.loads(published.os_list.read_text())
    other = [c for c in doc["os_list"] if c.get("name") == "Raspberry Pi OS (other)"]
    assert len(other) == 1
    items = {i["name"]: i for i in other[0]["subitems"]}
    item = items[EXPECT[suite]["name"]]
    assert item == published.item
    base = published.os_list_url.removesuffix("os_list.json")
    assert item["url"] == published.url == base + published.image_xz.name
    assert item["init_format"] == EXPECT[suite]["init_format"]
    assert {"pi4-64bit", "pi5-64bit"} <= set(item["devices"])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", item["release_date"])
    for key in ("description", "extract_size", "extract_sha256", "image_download_sha256"):
        assert item[key], key


def test_served_over_http(published):
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    with direct.open(published.os_list_url) as r:
        assert json.load(r) == json.loads(published.os_list.read_text())
    req = urllib.request.Request(published.url, headers={"Range": "bytes=0-5"})
    with direct.open(req) as r:
        assert r.status == 206
        assert r.read() == b"\xfd7zXZ\x00"  # the xz magic


def test_raw_image_matches_os_list(raw, published):
    # standin_raw compared the digest while decompressing; the size is left.
    assert raw.stat().st_size == published.item["extract_size"]


def test_partition_table(raw, table):
    assert table["label"] == "dos"
    assert re.fullmatch(r"0x[0-9a-f]{8}", table["id"])
    p1, p2 = table["partitions"]  # exactly two
    assert (p1["start"] * SECTOR, p1["size"] * SECTOR, p1["type"]) == (8 * MiB, 512 * MiB, "c")
    assert p2["type"] == "83"
    assert p2["start"] == p1["start"] + p1["size"]
    assert (p2["start"] + p2["size"]) * SECTOR == raw.stat().st_size


def test_filesystems_are_clean_and_labelled(raw, table, tmp_path):
    p1, p2 = table["partitions"]
    root_off = p2["start"] * SECTOR
    out = sh("e2fsck", "-fn", f"{raw}?offset={root_off}")
    used, total = map(int, re.search(r"(\d+)/(\d+) blocks", out).groups())
    assert 0.15 <= 1 - used / total <= 0.30, f"rootfs free space {1 - used / total:.0%}"
    assert "rootfs" in sh("e2label", f"{raw}?offset={root_off}")

    boot = tmp_path / "p1.vfat"
    with open(raw, "rb") as fi, open(boot, "wb") as fo:
        fi.seek(p1["start"] * SECTOR)
        fo.write(fi.read(p1["size"] * SECTOR))
    sh("fsck.vfat", "-n", str(boot))
    assert "bootfs" in sh("mlabel", "-s", "-i", str(boot), "::", env=MTOOLS_ENV).lower()


def test_bootfs_files(raw, table, suite):
    p1 = table["partitions"][0]
    disk_id = table["id"].removeprefix("0x")
    img = f"{raw}@@{p1['start'] * SECTOR}"
    cmdline = sh("mtype", "-i", img, "::/cmdline.txt", env=MTOOLS_ENV)
    assert cmdline.count("\n") == 1 and cmdline.endswith("\n"), "cmdline.txt must be one line"
    words = cmdline.split()
    assert f"root=PARTUUID={disk_id}-02" in words
    assert EXPECT[suite]["first_boot"] in words
    assert "[all]" in sh("mtype", "-i", img, "::/config.txt", env=MTOOLS_ENV).splitlines()
    listing = sh("mdir", "-b", "-i", img, "::/", env=MTOOLS_ENV).split()
    for name in ["config.txt", "cmdline.txt", *EXPECT[suite]["bootfs_extra"]]:
        assert f"::/{name}" in listing


def test_rootfs_files(raw, table, suite):
    p2 = table["partitions"][1]
    disk_id = table["id"].removeprefix("0x")
    off = p2["start"] * SECTOR

    def cat(path: str) -> str:
        return debugfs(raw, off, f"cat {path}")

    fstab = cat("/etc/fstab")
    assert re.search(rf"^PARTUUID={disk_id}-01\s+/boot/firmware\s+vfat\s", fstab, re.MULTILINE)
    assert re.search(
        rf"^PARTUUID={disk_id}-02\s+/\s+ext4\s+defaults,noatime\s", fstab, re.MULTILINE
    )
    assert "127.0.1.1\traspberrypi" in cat("/etc/hosts").splitlines()
    assert cat("/etc/hostname").strip() == "raspberrypi"
    passwd = {line.split(":")[0]: line.split(":") for line in cat("/etc/passwd").splitlines()}
    assert passwd["pi"][2:4] == ["1000", "1000"] and passwd["pi"][5] == "/home/pi"
    sudo = next(g for g in cat("/etc/group").splitlines() if g.startswith("sudo:"))
    assert "pi" in sudo.split(":")[3].split(",")
    assert "NOPASSWD" in cat("/etc/sudoers.d/010_pi-nopasswd")
    assert cat("/etc/machine-id") == ""
    assert "User:  1000   Group:  1000" in debugfs(raw, off, "stat /home/pi")
    assert "Type: directory" in debugfs(raw, off, "stat /boot/firmware")
    lists = debugfs(raw, off, "ls -p /var/lib/apt/lists")
    names = {line.split("/")[5] for line in lists.splitlines() if line.startswith("/")}
    assert names <= {".", "..", "lock", "partial"}, f"apt lists left in the image: {names}"
    for pkg in ("network-manager", "openssh-server", "nfs-common", "sudo"):
        assert f"Package: {pkg}\n" in cat("/var/lib/dpkg/status")
    if suite == "trixie":
        assert "Package: cloud-init\n" in cat("/var/lib/dpkg/status")


def test_cache_hit_is_fast_and_merges_os_list(standin_bookworm, run_standin, tmp_path):
    # A directory already listing another image (as a trixie run leaves it): publishing
    # bookworm must keep that entry and replace only its own.
    basename = standin_bookworm.image_xz.name
    other = {"name": "Raspberry Pi OS Lite (64-bit)", "url": "http://x/trixie.img.xz"}
    stale = {"name": "Raspberry Pi OS (Legacy, 64-bit) Lite", "url": "http://x/old.img.xz"}
    (tmp_path / "os_list.json").write_text(
        json.dumps({"os_list": [{"name": "Raspberry Pi OS (other)", "subitems": [stale, other]}]})
    )
    t0 = time.monotonic()
    proc = run_standin("bookworm", tmp_path, "http://example.invalid/images")
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"cache hit took {elapsed:.0f} s"
    assert proc.stdout.split() == [
        str(tmp_path / basename),
        str(tmp_path / f"{basename}.sha256"),
        str(tmp_path / "os_list.json"),
    ]
    assert sha256(tmp_path / basename) == standin_bookworm.item["image_download_sha256"]
    doc = json.loads((tmp_path / "os_list.json").read_text())
    (cat,) = doc["os_list"]
    names = [i["name"] for i in cat["subitems"]]
    assert names == ["Raspberry Pi OS Lite (64-bit)", "Raspberry Pi OS (Legacy, 64-bit) Lite"]
    assert cat["subitems"][0] == other
    mine = cat["subitems"][1]
    assert mine["url"] == f"http://example.invalid/images/{basename}"
    assert mine["extract_sha256"] == standin_bookworm.item["extract_sha256"]
