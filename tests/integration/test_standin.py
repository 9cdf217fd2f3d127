"""scripts/standin-image: the published stand-ins, read back the way a consumer of the real
Raspberry Pi OS Lite image reads it (checksums, os_list, partition table, both filesystems), and
the first-boot state each release ships with (../shared/REAL-PIOS.md §1: host-key regeneration,
rename-user's wizard and banner, eth0 links, apt sources, machine-id, rpi-resize or the init=
firstboot, cloud-init). What those pieces do at boot is proven by the rehearsal; here every piece
must be present, enabled and written as Raspberry Pi's is, so a stand-in that lacks one fails.

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
import yaml

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
        "cmdline_tail": ["rootwait", "quiet", "init=/usr/lib/raspberrypi-sys-mods/firstboot"],
        "bootfs_extra": [],
        "machine_id": "",
        "packages": ["fake-hwclock", "nfs-common", "dphys-swapfile"],
        "not_packages": ["cloud-init"],
    },
    "trixie": {
        "name": "Raspberry Pi OS Lite (64-bit)",
        "init_format": "cloudinit-rpi",
        "first_boot": "resize",
        "cmdline_tail": ["rootwait", "resize"],
        "bootfs_extra": ["user-data", "meta-data", "network-config"],
        "machine_id": "uninitialized\n",
        "packages": ["cloud-init"],
        "not_packages": ["fake-hwclock", "nfs-common", "dphys-swapfile"],
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


class RootFs:
    """The stand-in's ext4 read with debugfs (no appliance, no mount)."""

    def __init__(self, raw: Path, offset: int):
        self.raw, self.offset = raw, offset

    def _debugfs(self, request: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["debugfs", "-R", request, f"{self.raw}?offset={self.offset}"],
            check=True,
            capture_output=True,
            text=True,
        )

    def stat(self, path: str) -> str | None:
        """debugfs's stat of path (a symlink itself, not its target), None if absent."""
        proc = self._debugfs(f"stat {path}")
        return None if "File not found" in proc.stderr or not proc.stdout else proc.stdout

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def type(self, path: str) -> str:
        st = self.stat(path)
        assert st is not None, f"{path} is not in the image"
        return re.search(r"Type: (\S+)", st).group(1)

    def mode(self, path: str) -> int:
        return int(re.search(r"Mode:\s+(\d+)", self.stat(path)).group(1), 8)

    def owner(self, path: str) -> tuple[int, int]:
        m = re.search(r"User:\s+(\d+)\s+Group:\s+(\d+)", self.stat(path))
        return int(m.group(1)), int(m.group(2))

    def cat(self, path: str) -> str:
        assert self.type(path) == "regular", f"{path} is not a regular file"
        return self._debugfs(f"cat {path}").stdout

    def readlink(self, path: str) -> str:
        st = self.stat(path)
        assert st is not None and self.type(path) == "symlink", f"{path} is not a symlink"
        m = re.search(r'Fast link dest: "(.*)"', st)
        return m.group(1) if m else self._debugfs(f"cat {path}").stdout  # long targets

    def unit(self, name: str) -> str:
        """A unit file shipped the way a package ships it (/usr/lib/systemd/system)."""
        return self.cat(f"/usr/lib/systemd/system/{name}")

    def enabled_in(self, target: str, name: str) -> bool:
        """True when name is enabled into target ("multi-user": `systemctl enable`'s symlink in
        /etc/systemd/system/multi-user.target.wants)."""
        unit = f"/usr/lib/systemd/system/{target}.target"
        assert self.exists(unit), unit  # a wrong target name must not pass as "not enabled"
        link = f"/etc/systemd/system/{target}.target.wants/{name}"
        if not self.exists(link):
            return False
        dest = self.readlink(link)
        template = re.sub(r"@[^.]+\.", "@.", name)  # getty@tty1.service -> getty@.service
        assert dest in (
            f"/usr/lib/systemd/system/{name}",
            f"/lib/systemd/system/{name}",
            f"/usr/lib/systemd/system/{template}",
            f"/lib/systemd/system/{template}",
        ), f"{link} -> {dest}"
        return True


def unit_lines(text: str) -> list[str]:
    """A unit file's settings, without comments and blank lines."""
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith(("#", ";"))]


@pytest.fixture(scope="module")
def rootfs(raw, table) -> RootFs:
    return RootFs(raw, table["partitions"][1]["start"] * SECTOR)


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
    # The tail after rootwait is the release's first-boot hook, nothing else.
    tail = EXPECT[suite]["cmdline_tail"]
    assert words[-len(tail) :] == tail, words
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
    assert cat("/etc/machine-id") == EXPECT[suite]["machine_id"]
    assert "User:  1000   Group:  1000" in debugfs(raw, off, "stat /home/pi")
    assert "Type: directory" in debugfs(raw, off, "stat /boot/firmware")
    lists = debugfs(raw, off, "ls -p /var/lib/apt/lists")
    names = {line.split("/")[5] for line in lists.splitlines() if line.startswith("/")}
    assert names <= {".", "..", "lock", "partial"}, f"apt lists left in the image: {names}"
    status = cat("/var/lib/dpkg/status")
    for pkg in ("network-manager", "openssh-server", "sudo", *EXPECT[suite]["packages"]):
        assert f"Package: {pkg}\n" in status, pkg
    for pkg in EXPECT[suite]["not_packages"]:  # per-suite lists, as pi-gen's
        assert f"Package: {pkg}\n" not in status, pkg


# --------------------------------------------------------------------------------------------
# First-boot state, as each release ships it (REAL-PIOS.md §1).

REGENERATE = "/usr/lib/raspberrypi-sys-mods/regenerate_ssh_host_keys"
FIRSTBOOT = "/usr/lib/raspberrypi-sys-mods/firstboot"


def test_ssh_host_keys_are_regenerated_as_on_raspberry_pi(rootfs):
    # No keys shipped; the unit and its script as raspberrypi-sys-mods' (§1.3 step 5, §1.4 step 6).
    keys = debugfs(rootfs.raw, rootfs.offset, "ls /etc/ssh").split()
    assert not [k for k in keys if k.startswith("ssh_host_")], keys
    unit = unit_lines(rootfs.unit("regenerate_ssh_host_keys.service"))
    conditions = [ln for ln in unit if ln.startswith(("Condition", "Assert"))]
    assert conditions == ["ConditionFileIsExecutable=/usr/bin/ssh-keygen"]
    assert "Before=ssh.service" in unit
    assert "Type=oneshot" in unit and f"ExecStart={REGENERATE}" in unit
    assert rootfs.enabled_in("multi-user", "regenerate_ssh_host_keys.service")
    script = rootfs.cat(REGENERATE)
    assert rootfs.mode(REGENERATE) == 0o755
    assert "/etc/ssh/ssh_host_*_key*" in script and "rm -f" in script
    assert "ssh-keygen -A" in script
    assert re.search(r"systemctl .*disable regenerate_ssh_host_keys", script)
    assert not rootfs.enabled_in("multi-user", "ssh.service")  # off until Imager or bootfs `ssh`
    assert rootfs.enabled_in("multi-user", "sshswitch.service")


def test_rename_user_state_at_export(rootfs):
    # What `rename-user -f -s` leaves (§1.1): the banner, getty@tty1 off, the wizard armed.
    conf = rootfs.cat("/etc/ssh/sshd_config.d/rename_user.conf")
    assert conf.split("\n")[0] == "Banner /usr/share/userconf-pi/sshd_banner"
    banner = rootfs.cat("/usr/share/userconf-pi/sshd_banner")
    assert "SSH may not work until a valid user has been set up" in banner
    assert not rootfs.enabled_in("getty", "getty@tty1.service")
    assert rootfs.enabled_in("multi-user", "userconfig.service")
    unit = unit_lines(rootfs.unit("userconfig.service"))
    for line in (
        "After=systemd-user-sessions.service",
        "Type=oneshot",
        "StandardInput=tty",
        "TTYPath=/dev/tty8",
        "ExecStart=/usr/lib/userconf-pi/userconf-service",
    ):
        assert line in unit, line
    assert not [ln for ln in unit if ln.startswith("Condition")]
    assert not [ln for ln in unit if ln.startswith("RemainAfterExit")]
    # The wizard waits for an answer that never comes: its start job never ends.
    wizard = rootfs.cat("/usr/lib/userconf-pi/userconf-service")
    assert rootfs.mode("/usr/lib/userconf-pi/userconf-service") == 0o755
    assert "sleep infinity" in wizard
    cancel = rootfs.cat("/usr/bin/cancel-rename")
    for step in (
        "rm -f /etc/ssh/sshd_config.d/rename_user.conf",
        "disable userconfig",
        "enable getty@tty1",
    ):
        assert step in cancel, step


def test_interface_names_stay_eth0(rootfs):
    # raspi-config do_net_names 1 (§1.1 "Interface names").
    for link in ("99-default.link", "73-usb-net-by-mac.link"):
        assert rootfs.readlink(f"/etc/systemd/network/{link}") == "/dev/null", link


def test_apt_sources(rootfs, suite):
    # §1.2: Debian's main archive, -updates and the security archive (Raspberry Pi's own
    # archive is not reachable from here, so the stand-in does not list it yet).
    extra = debugfs(rootfs.raw, rootfs.offset, "ls /etc/apt/sources.list.d").split()
    if suite == "bookworm":
        lines = [
            ln
            for ln in rootfs.cat("/etc/apt/sources.list").splitlines()
            if ln and not ln.startswith("#")
        ]
        comps = "main contrib non-free non-free-firmware"
        assert lines == [
            f"deb http://deb.debian.org/debian bookworm {comps}",
            f"deb http://deb.debian.org/debian-security/ bookworm-security {comps}",
            f"deb http://deb.debian.org/debian bookworm-updates {comps}",
        ]
        assert [n for n in extra if n.endswith((".list", ".sources"))] == []
    else:
        assert rootfs.cat("/etc/apt/sources.list") == ""
        assert [n for n in extra if n.endswith((".list", ".sources"))] == ["debian.sources"]
        text = rootfs.cat("/etc/apt/sources.list.d/debian.sources")
        stanzas = [
            dict(ln.split(": ", 1) for ln in block.splitlines())
            for block in text.strip().split("\n\n")
        ]
        keyring = "/usr/share/keyrings/debian-archive-keyring.pgp"
        common = {
            "Types": "deb",
            "Components": "main contrib non-free non-free-firmware",
            "Signed-By": keyring,
        }
        assert stanzas == [
            {**common, "URIs": "http://deb.debian.org/debian/", "Suites": "trixie trixie-updates"},
            {
                **common,
                "URIs": "http://deb.debian.org/debian-security/",
                "Suites": "trixie-security",
            },
        ]
        assert rootfs.exists(keyring)


def test_first_boot_machinery(rootfs, suite):
    """bookworm: the init= firstboot script and SysV resize2fs_once (§1.3 steps 3, 5);
    trixie: rpi-resize.service on a first boot that `uninitialized` signals (§1.4 steps 4-5)."""
    if suite == "bookworm":
        assert rootfs.mode(FIRSTBOOT) == 0o755
        script = rootfs.cat(FIRSTBOOT)
        assert script.startswith("#!/bin/sh\n")
        # Strips itself (and quiet unless splash), regenerates keys by calling the script
        # directly, writes a new disk id into the MBR, rewrites PARTUUIDs, reboots.
        assert "s| init=/usr/lib/raspberrypi-sys-mods/firstboot||" in script
        assert "grep -q splash" in script and "s/ quiet//g" in script
        assert REGENERATE in script
        assert "seek=440" in script and "/etc/fstab" in script and "cmdline.txt" in script
        assert "reboot -f" in script
        assert "resize2fs" not in script and "resizepart" not in script  # the initramfs's part
        assert rootfs.mode("/etc/init.d/resize2fs_once") == 0o755
        once = rootfs.cat("/etc/init.d/resize2fs_once")
        assert "Default-Start:     3" in once and "resize2fs" in once
        rc3 = debugfs(rootfs.raw, rootfs.offset, "ls /etc/rc3.d").split()
        assert [n for n in rc3 if re.fullmatch(r"S\d\dresize2fs_once", n)], rc3
        assert not rootfs.exists("/usr/lib/systemd/system/rpi-resize.service")
    else:
        assert not rootfs.exists(FIRSTBOOT)
        unit = unit_lines(rootfs.unit("rpi-resize.service"))
        assert "ConditionFirstBoot=yes" in unit
        wants = {w for ln in unit if ln.startswith("Wants=") for w in ln[6:].split()}
        assert {"first-boot-complete.target", "systemd-growfs-root.service"} <= wants
        for w in wants:
            assert rootfs.exists(f"/usr/lib/systemd/system/{w}"), w
        assert "ExecStart=/usr/bin/true" in unit
        assert [
            ln for ln in unit if re.match(r"ExecStart(Post)?=.*systemctl .*disable rpi-resize", ln)
        ]
        assert rootfs.enabled_in("multi-user", "rpi-resize.service")


def test_services_and_clock(rootfs, suite):
    # bookworm: journal in RAM, NFS client units off, fake-hwclock with a saved time (§1.3 6-7),
    # dphys-swapfile;
    # trixie: timesyncd's clock file owned by systemd-timesync, saved every 5 min (§1.4 step 8).
    if suite == "bookworm":
        journald = rootfs.cat("/etc/systemd/journald.conf").splitlines()
        assert "Storage=volatile" in journald
        assert not rootfs.enabled_in("multi-user", "rpcbind.service")
        data = rootfs.cat("/etc/fake-hwclock.data").strip()
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", data), data
        # a 512 MB swap file, made on the card at boot (pi-gen's 02-swap.diff)
        assert "CONF_SWAPSIZE=512" in rootfs.cat("/etc/dphys-swapfile").splitlines()
        assert rootfs.enabled_in("multi-user", "dphys-swapfile.service")
        assert not rootfs.exists("/var/swap")
    else:
        clock = "/var/lib/systemd/timesync/clock"
        uid = next(
            ln.split(":")[2]
            for ln in rootfs.cat("/etc/passwd").splitlines()
            if ln.startswith("systemd-timesync:")
        )
        assert rootfs.owner(clock)[0] == int(uid) and rootfs.type(clock) == "regular"
        conf = rootfs.cat("/usr/lib/systemd/timesyncd.conf.d/40-rpi-sync.conf").split()
        assert conf == ["[Time]", "SaveIntervalSec=5m"]
        assert not rootfs.exists("/etc/fake-hwclock.data")
        # rpi-swap, not dphys-swapfile: its generator over Debian's zram-generator, whose own
        # default zram0 its vendor drop-in turns off; /var/swap is made on the card at boot
        assert rootfs.mode("/usr/lib/systemd/system-generators/rpi-swap-generator") == 0o755
        assert rootfs.mode("/usr/lib/systemd/system-generators/zram-generator") == 0o755
        ctrl = "/usr/lib/systemd/zram-generator.conf.d/20-rpi-swap-zram0-ctrl.conf"
        assert rootfs.cat(ctrl).split() == ["[zram0]", "host-memory-limit=0", "fs-type=none"]
        for unit in ("rpi-resize-swap-file.service", "rpi-setup-loop@.service"):
            assert rootfs.exists(f"/usr/lib/systemd/system/{unit}"), unit
        assert not rootfs.exists("/etc/dphys-swapfile") and not rootfs.exists("/var/swap")


def test_cloud_init_as_raspberry_pi_configures_it(rootfs, raw, table, suite):
    # §1.4 step 7: NoCloud seeded from bootfs, no key work by cloud-init, pi as default user.
    if suite == "bookworm":
        assert not rootfs.exists("/etc/cloud")  # §1.3 step 8: no cloud-init
        return
    cfg = yaml.safe_load(rootfs.cat("/etc/cloud/cloud.cfg.d/99_raspberry-pi.cfg"))
    assert cfg["datasource_list"] == ["NoCloud", "None"]
    assert cfg["datasource"]["NoCloud"]["seedfrom"] == "file:///boot/firmware/"
    assert cfg["ssh_deletekeys"] is False and cfg["ssh_genkeytypes"] == []
    assert cfg["system_info"]["default_user"]["name"] == "pi"
    # the raspberry-pi-os variant's module list: the root grows on a first boot only
    base = yaml.safe_load(rootfs.cat("/etc/cloud/cloud.cfg"))
    names = [m if isinstance(m, str) else m[0] for m in base["cloud_init_modules"]]
    assert "write_files" in names or "write-files" in names, names
    assert not {"growpart", "resizefs"} & set(names), names
    # The seed the datasource reads is on bootfs.
    p1 = table["partitions"][0]
    img = f"{raw}@@{p1['start'] * SECTOR}"
    meta = yaml.safe_load(sh("mtype", "-i", img, "::/meta-data", env=MTOOLS_ENV))
    assert meta == {"dsmode": "local", "instance_id": "rpios-image"}
    assert sh("mtype", "-i", img, "::/user-data", env=MTOOLS_ENV).startswith("#cloud-config\n")


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
