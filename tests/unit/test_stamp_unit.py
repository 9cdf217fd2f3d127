"""The node stamp without libguestfs: its pure helpers, and every stage action written through
a fake disk (the libguestfs side is covered by the integration tests)."""

import fnmatch
import io
import tarfile
from pathlib import Path

import pytest

from piimage.actions import install_targets
from piimage.errors import BuildError
from piimage.stages import discover, plan_node
from piimage.stamp import Admin, _rewrite_accounts, _stamp_mounted, node_disk_id, replace_partuuids


def test_disk_id_is_stable_and_distinct():
    a, b = node_disk_id("c", "node01"), node_disk_id("c", "node02")
    assert a == node_disk_id("c", "node01")
    assert a != b and len(a) == 8 and int(a, 16) != 0


def test_replace_partuuids_keeps_single_line():
    cmd = "console=serial0,115200 root=PARTUUID=abcdef01-02 rootfstype=ext4 rootwait resize\n"
    out = replace_partuuids(cmd, "abcdef01", "12345678", "cmdline.txt")
    assert out == cmd.replace("abcdef01", "12345678")
    assert out.count("\n") == 1


def test_replace_partuuids_refuses_foreign_ids():
    with pytest.raises(BuildError, match="PARTUUID"):
        replace_partuuids("root=/dev/mmcblk0p2\n", "abcdef01", "12345678", "cmdline.txt")


def test_rewrite_accounts():
    passwd = "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000:,,,:/home/pi:/bin/bash\n"
    out = _rewrite_accounts(passwd, "pi", "admin", home_field=5)
    assert "admin:x:1000:1000:,,,:/home/admin:/bin/bash\n" in out
    group = "sudo:x:27:pi\npi:x:1000:\nadm:x:4:syslog,pi\n"
    out = _rewrite_accounts(group, "pi", "admin", members_field=3)
    assert out == "sudo:x:27:admin\nadmin:x:1000:\nadm:x:4:syslog,admin\n"
    shadow = "pi:*:19000:0:99999:7:::\n"
    assert (
        _rewrite_accounts(shadow, "pi", "admin", hash_field=1, password_hash="$6$s$h")
        == "admin:$6$s$h:19000:0:99999:7:::\n"
    )
    assert (
        _rewrite_accounts(shadow, "pi", "admin", hash_field=1, password_hash=None)
        == "admin:*:19000:0:99999:7:::\n"
    )


def test_install_section():
    unit = "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\nAlias=sshd.service\n"
    assert install_targets(unit) == (["multi-user.target"], [], ["sshd.service"])


def test_cmdline_gets_the_memory_cgroup_back_at_its_end():
    from piimage.stamp import with_kernel_words

    trixie = "console=serial0,115200 console=tty1 root=PARTUUID=abcd1234-02 rootfstype=ext4 fsck.repair=yes rootwait resize\n"
    out = with_kernel_words(trixie)
    assert out == trixie.rstrip("\n") + " cgroup_enable=memory\n"
    assert with_kernel_words(out) == out  # once
    assert with_kernel_words("a b").count("\n") == 1


def test_machine_id_keeps_the_first_boot_state_and_never_a_real_id():
    from piimage.stamp import first_boot_machine_id

    assert first_boot_machine_id(b"") is None  # bookworm: empty, kept
    assert first_boot_machine_id(b"uninitialized\n") is None  # trixie: first boot, kept
    assert first_boot_machine_id(None) is None
    assert first_boot_machine_id(b"0123456789abcdef0123456789abcdef\n") == b"uninitialized\n"


def test_fake_hwclock_data_is_utc_in_its_own_format():
    from piimage.stamp import fake_hwclock_data

    assert fake_hwclock_data(0) == b"1970-01-01 00:00:00\n"
    assert fake_hwclock_data(1796140800) == b"2026-12-01 16:00:00\n"


class FakeDisk:
    """The file side of image.Disk over a dict, for the stamp without libguestfs: the root and
    boot filesystems as {path: bytes} (directories implied), the tar the stamp hands over kept
    for the test to read."""

    path = Path("/images/n1.img")

    def __init__(self, files: dict[str, bytes], links: dict[str, str] | None = None):
        self.files, self.links = dict(files), dict(links or {})
        self.ident, self.tars, self.boot = "abcdef01", [], {}
        outer = self

        class G:
            def ls(self, d):
                names = {
                    p[len(d) + 1 :].split("/")[0] for p in outer._all() if p.startswith(d + "/")
                }
                return sorted(names)

        self.g = G()

    def _all(self):
        return {**self.files, **self.links}

    def disk_id(self):
        return self.ident

    def set_disk_id(self, new):
        self.ident = new

    def read_text(self, p):
        return self.files[p].decode()

    def read_if_exists(self, p):
        return self.files.get(p)

    def exists(self, p):
        return p in self.files or any(q.startswith(p + "/") for q in self._all())

    def on_boot(self, p):
        return p.startswith("/boot/firmware/")

    def remove_glob(self, pattern):
        gone = [p for p in self._all() if fnmatch.fnmatch(p, pattern)]
        for p in gone:
            self.files.pop(p, None)
            self.links.pop(p, None)
        return gone

    def rename(self, a, b):
        for p in [p for p in self._all() if p == a or p.startswith(a + "/")]:
            self.files[b + p[len(a) :]] = self.files.pop(p)

    def stat(self, p):
        return {"st_mode": 0o100644, "st_uid": 0, "st_gid": 0}

    def unit_path(self, unit):
        p = f"/usr/lib/systemd/system/{unit}"
        return p if p in self.files else None

    def tar_in(self, data):
        self.tars.append(data)

    def write_boot(self, p, data):
        self.boot[p] = data


PASSWD = "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000:,,,:/home/pi:/bin/bash\n"
GROUP = "root:x:0:\nshadow:x:42:\npi:x:1000:\nusers:x:100:\n"
STAGE = """\
scope: node
roles: [all]
users: [{name: mpiuser, uid: "1500", groups: [users]}]
remove: [/etc/ssh/ssh_host_*]
disable: [old.service]
dirs: [{path: /clusterfs, owner: mpiuser, mode: "0750"}]
files:
  - {path: /etc/hostname, template: hostname.j2}
  - {path: /home/mpiuser/.ssh/authorized_keys, template: hostname.j2, owner: mpiuser, mode: "0600"}
  - {path: /boot/firmware/extra.txt, template: hostname.j2}
append: [{path: /boot/firmware/config.txt, section: "[all]", lines: [dtoverlay=rpi-poe]}]
links: [{path: /etc/localtime, target: /usr/share/zoneinfo/Etc/UTC}]
enable: [new.service]
mask: [userconfig.service]
"""


def test_stamp_writes_every_action_through_its_class(tmp_path):
    """Every stage action reaches the image by its own `write`, in ACTIONS order, and the
    stamp's own identity writes (disk id, cmdline.txt, fstab, accounts) stay around them."""
    d = tmp_path / "10-all"
    (d / "files").mkdir(parents=True)
    (d / "files" / "hostname.j2").write_text("{{ node.hostname }}\n")
    (d / "stage.yaml").write_text(STAGE)
    plan = plan_node(
        discover([tmp_path]),
        {"node": {"hostname": "n1"}},
        hostname="n1",
        role="compute",
        secrets={},
    )
    disk = FakeDisk(
        {
            "/etc/passwd": PASSWD.encode(),
            "/etc/group": GROUP.encode(),
            "/etc/fstab": b"PARTUUID=abcdef01-02 / ext4 defaults 0 1\n",
            "/etc/machine-id": b"",
            "/etc/ssh/ssh_host_ed25519_key": b"old",
            "/home/pi/.bashrc": b"",
            "/usr/lib/systemd/system/new.service": b"[Install]\nWantedBy=multi-user.target\n",
            "/boot/firmware/cmdline.txt": b"console=tty1 root=PARTUUID=abcdef01-02 rootwait\n",
            "/boot/firmware/config.txt": b"[all]\narm_64bit=1\n",
        },
        links={"/etc/systemd/system/multi-user.target.wants/old.service": "/x"},
    )
    written = _stamp_mounted(disk, plan, cluster_name="c", admin=Admin("alice", None))

    (tar_bytes,) = disk.tars
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as t:
        members = {"/" + m.name: m for m in t.getmembers()}
        data = {p: t.extractfile(m).read() for p, m in members.items() if m.isfile()}
    new_id = node_disk_id("c", "n1")
    assert disk.ident == new_id
    assert f"PARTUUID={new_id}-02" in disk.boot["/boot/firmware/cmdline.txt"].decode()
    assert disk.boot["/boot/firmware/cmdline.txt"].decode().endswith("cgroup_enable=memory\n")
    assert data["/etc/fstab"].decode().startswith(f"PARTUUID={new_id}-02")
    # users (early): in passwd, with a 0700 home; the admin replaced pi and has pi's home
    assert "mpiuser:x:1500:1500::/home/mpiuser:/bin/bash" in data["/etc/passwd"].decode()
    assert "alice:x:1000" in data["/etc/passwd"].decode()
    assert "users:x:100:mpiuser" in data["/etc/group"].decode()
    assert members["/home/mpiuser"].mode == 0o700 and "/home/alice/.bashrc" in disk.files
    # remove and disable (early): gone before the tar is unpacked
    assert "/etc/ssh/ssh_host_ed25519_key" not in disk.files
    assert not [p for p in disk.links if p.endswith("old.service")]
    # dirs, files (owners by the image's ids, ~/.ssh made 0700), boot files, appended lines
    assert (members["/clusterfs"].mode, members["/clusterfs"].uid) == (0o750, 1500)
    assert data["/etc/hostname"] == b"n1\n"
    key = members["/home/mpiuser/.ssh/authorized_keys"]
    assert (key.mode, key.uid, members["/home/mpiuser/.ssh"].mode) == (0o600, 1500, 0o700)
    assert disk.boot["/boot/firmware/extra.txt"] == b"n1\n"
    assert disk.boot["/boot/firmware/config.txt"] == b"[all]\narm_64bit=1\ndtoverlay=rpi-poe\n"
    # links, enable (from the unit's [Install]), mask
    assert members["/etc/localtime"].linkname == "/usr/share/zoneinfo/Etc/UTC"
    wants = members["/etc/systemd/system/multi-user.target.wants/new.service"]
    assert wants.linkname == "/usr/lib/systemd/system/new.service"
    assert members["/etc/systemd/system/userconfig.service"].linkname == "/dev/null"
    # the manifest's record: every file the stages wrote
    assert [w.path for w in written] == [
        "/etc/hostname",
        "/home/mpiuser/.ssh/authorized_keys",
        "/boot/firmware/extra.txt",
    ]
