"""The node stamp: everything that makes one image a particular node, written through
libguestfs with no emulation — disk identifier, accounts, and the rendered files of the
node-scope stages."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .accounts import home_dir
from .actions import NodePlan, RenderedUser, Writes, WrittenFile, write_all
from .errors import BuildError
from .image import Disk, PasswdEntry, parse_group, parse_passwd
from .log import log

FIRST_USER_UID = 1000


@dataclass(frozen=True)
class Admin:
    name: str
    password_hash: str | None


def node_disk_id(cluster_name: str, hostname: str) -> str:
    """A per-node MBR disk identifier, stable across rebuilds so a rebuilt card keeps its
    PARTUUIDs, and different for every node so no two nodes share an identity."""
    h = hashlib.sha256(f"piimage:{cluster_name}:{hostname}".encode()).digest()
    value = int.from_bytes(h[:4], "little") or 1
    return f"{value:08x}"


def replace_partuuids(text: str, old: str, new: str, where: str) -> str:
    pattern = re.compile(rf"PARTUUID={re.escape(old)}-0(\d)", re.IGNORECASE)
    if not pattern.search(text):
        raise BuildError(
            f"{where} does not refer to the disk's PARTUUID {old}-0N; is this a Raspberry Pi OS image?"
        )
    return pattern.sub(lambda m: f"PARTUUID={new}-0{m.group(1)}", text)


def _rewrite_accounts(
    text: str,
    old: str,
    new: str,
    *,
    name_field: bool = True,
    members_field: int | None = None,
    home_field: int | None = None,
    hash_field: int | None = None,
    password_hash: str | None = None,
) -> str:
    out = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            if name_field and parts[0] == old:
                parts[0] = new
                if home_field is not None:
                    parts[home_field] = home_dir(new)
                if hash_field is not None and password_hash:
                    parts[hash_field] = password_hash
            if members_field is not None and len(parts) > members_field and parts[members_field]:
                parts[members_field] = ",".join(
                    new if m == old else m for m in parts[members_field].split(",")
                )
        out.append(":".join(parts))
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


ACCOUNT_FILES = {
    # path: (default mode, group)
    "/etc/passwd": (0o644, "root"),
    "/etc/shadow": (0o640, "shadow"),
    "/etc/group": (0o644, "root"),
    "/etc/gshadow": (0o640, "shadow"),
    "/etc/subuid": (0o644, "root"),
    "/etc/subgid": (0o644, "root"),
}


class Accounts:
    """The image's account files, changed in memory and written back in one go."""

    def __init__(self, texts: dict[str, str]):
        self.texts = dict(texts)
        self.changed: set[str] = set()
        self.home_moves: list[tuple[str, str]] = []
        self.new_homes: list[tuple[str, int]] = []

    def _set(self, path: str, text: str) -> None:
        if text != self.texts.get(path):
            self.texts[path] = text
            self.changed.add(path)

    def users(self) -> dict[str, PasswdEntry]:
        return parse_passwd(self.texts["/etc/passwd"])

    def groups(self) -> dict[str, int]:
        return parse_group(self.texts["/etc/group"])

    def uid(self, name: str, where: Path) -> int:
        u = self.users()
        if name not in u:
            raise BuildError(f"{where}: user '{name}' does not exist in the image's /etc/passwd")
        return u[name].uid

    def gid(self, name: str, where: Path) -> int:
        g = self.groups()
        if name not in g:
            raise BuildError(f"{where}: group '{name}' does not exist in the image's /etc/group")
        return g[name]

    def rename_first_user(self, admin: Admin, where: Path) -> None:
        """Raspberry Pi OS's first user (UID 1000) becomes the admin user, offline, so no
        first-boot rename prompt appears; the password hash is set if given, else the account
        stays locked for passwords."""
        users = self.users()
        first = next((u for u in users.values() if u.uid == FIRST_USER_UID), None)
        if first is None:
            raise BuildError(
                f"{where}: the image has no user with UID {FIRST_USER_UID} to turn into '{admin.name}'"
            )
        if admin.name in users and users[admin.name].uid != FIRST_USER_UID:
            raise BuildError(
                f"{where}: user '{admin.name}' already exists with UID {users[admin.name].uid}"
            )
        kw = {
            "/etc/passwd": dict(home_field=5),
            "/etc/shadow": dict(hash_field=1, password_hash=admin.password_hash),
            "/etc/group": dict(members_field=3),
            "/etc/gshadow": dict(members_field=3),
        }
        for path in ACCOUNT_FILES:
            if path in self.texts:
                self._set(
                    path,
                    _rewrite_accounts(self.texts[path], first.name, admin.name, **kw.get(path, {})),
                )
        if first.home != home_dir(admin.name):
            self.home_moves.append((first.home, home_dir(admin.name)))

    def ensure_user(self, user: RenderedUser, where: Path) -> None:
        """A local account with a fixed UID (= GID), as useradd would make it, so the same
        user has the same UID on every node."""
        users, groups = self.users(), self.groups()
        if user.name in users:
            if users[user.name].uid != user.uid:
                raise BuildError(
                    f"{where}: user '{user.name}' exists with UID {users[user.name].uid}, not {user.uid}"
                )
        else:
            taken = next((u.name for u in users.values() if u.uid == user.uid), None)
            if taken:
                raise BuildError(
                    f"{where}: UID {user.uid} for '{user.name}' is already used by '{taken}' in the image"
                )
            gtaken = next((n for n, g in groups.items() if g == user.uid and n != user.name), None)
            if gtaken:
                raise BuildError(
                    f"{where}: GID {user.uid} for '{user.name}' is already used by group '{gtaken}'"
                )
            days = 19000  # last password change: a fixed day keeps images reproducible
            self._append(
                "/etc/passwd", f"{user.name}:x:{user.uid}:{user.uid}::{user.home}:{user.shell}"
            )
            self._append("/etc/shadow", f"{user.name}:!:{days}:0:99999:7:::")
            if user.name not in groups:
                self._append("/etc/group", f"{user.name}:x:{user.uid}:")
                self._append("/etc/gshadow", f"{user.name}:!::")
            self.new_homes.append((user.home, user.uid))
        if user.groups:
            out = []
            for line in self.texts["/etc/group"].splitlines():
                parts = line.split(":")
                if len(parts) == 4 and parts[0] in user.groups:
                    members = [m for m in parts[3].split(",") if m]
                    if user.name not in members:
                        parts[3] = ",".join(members + [user.name])
                out.append(":".join(parts))
            self._set("/etc/group", "\n".join(out) + "\n")

    def _append(self, path: str, line: str) -> None:
        if path not in self.texts:
            return  # e.g. no gshadow in this image: nothing to add to
        text = self.texts[path]
        if text and not text.endswith("\n"):
            text += "\n"
        self._set(path, text + line + "\n")


class TarBuilder:
    """Everything a stamp writes into the root filesystem, as one tar (one libguestfs call)."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.GNU_FORMAT)
        self.entries: dict[str, tuple[str, object]] = {}  # path -> (kind, payload), last one wins

    def _info(self, path: str, kind: bytes, mode: int, uid: int, gid: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(path.lstrip("/"))
        ti.type = kind
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""  # numeric ownership only: the image's ids, not the appliance's
        ti.mtime = 0
        return ti

    def dir(self, path: str, mode: int, uid: int, gid: int) -> None:
        self.entries[path] = ("d", (mode, uid, gid))

    def file(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> None:
        self.entries[path] = ("f", (data, mode, uid, gid))

    def symlink(self, path: str, target: str) -> None:
        self.entries[path] = ("l", target)

    def finish(self) -> bytes:
        # directories first (parents before children), then files, then links
        order = {"d": 0, "f": 1, "l": 2}
        for path, (kind, payload) in sorted(
            self.entries.items(), key=lambda kv: (order[kv[1][0]], kv[0])
        ):
            if kind == "d":
                mode, uid, gid = payload  # type: ignore[misc]
                self.tar.addfile(self._info(path, tarfile.DIRTYPE, mode, uid, gid))
            elif kind == "f":
                data, mode, uid, gid = payload  # type: ignore[misc]
                ti = self._info(path, tarfile.REGTYPE, mode, uid, gid)
                ti.size = len(data)
                self.tar.addfile(ti, io.BytesIO(data))
            else:
                ti = self._info(path, tarfile.SYMTYPE, 0o777, 0, 0)
                ti.linkname = str(payload)
                self.tar.addfile(ti)
        self.tar.close()
        return self.buf.getvalue()


# What the card says of itself (`piimage inspect`): cluster, node, role, base, build, versions.
IDENTITY = "/etc/piimage/image.json"


def stamp(
    disk: Disk,
    plan: NodePlan,
    *,
    cluster_name: str,
    admin: Admin,
    check_layout: bool = True,
    identity: bytes | None = None,
) -> list[WrittenFile]:
    """Write one node's identity and rendered files into its disk. Reads first, then changes
    in memory, then one tar for the root filesystem and a few writes for the FAT — libguestfs
    calls are slow on a TCG-only host, so they are kept few. `identity` (JSON) goes to
    IDENTITY."""
    if check_layout:
        disk.check_layout()
    disk.mount()
    try:
        return _stamp_mounted(disk, plan, cluster_name=cluster_name, admin=admin, identity=identity)
    finally:
        disk.umount()


def _stamp_mounted(
    disk: Disk, plan: NodePlan, *, cluster_name: str, admin: Admin, identity: bytes | None = None
) -> list[WrittenFile]:
    where = disk.path

    # identity: a new disk identifier; cmdline.txt (one line, FAT) and fstab follow it
    old_id, new_id = disk.disk_id(), node_disk_id(cluster_name, plan.hostname)
    cmdline = disk.read_text(CMDLINE)
    if cmdline.rstrip("\n").count("\n"):
        raise BuildError(
            f"{where}: cmdline.txt has more than one line; the firmware reads only the first"
        )
    new_cmdline = with_kernel_words(replace_partuuids(cmdline, old_id, new_id, "cmdline.txt"))
    fstab = replace_partuuids(disk.read_text("/etc/fstab"), old_id, new_id, "/etc/fstab")

    # accounts, in memory: the first user becomes the admin, then the stages' users
    acc = Accounts(
        {
            p: t.decode("utf-8", "replace")
            for p in ACCOUNT_FILES
            if (t := disk.read_if_exists(p)) is not None
        }
    )
    acc.rename_first_user(admin, where)
    w = Writes(disk, TarBuilder(), acc, plan)
    tar = w.tar

    # the early actions (users, removals, disabled units), then the admin's home moved
    # (before anything is unpacked into it)
    write_all(w, early=True)
    for old, new in acc.home_moves:
        if disk.exists(old) and not disk.exists(new):
            disk.rename(old, new)
        elif not disk.exists(new):
            uid = acc.uid(admin.name, where)
            tar.dir(new, 0o755, uid, acc.users()[admin.name].gid)
    for home, uid in acc.new_homes:
        tar.dir(home, 0o700, uid, uid)

    tar.file("/etc/fstab", fstab.encode(), 0o644, 0, 0)
    machine_id = first_boot_machine_id(disk.read_if_exists("/etc/machine-id"))
    if machine_id is not None:
        tar.file("/etc/machine-id", machine_id, 0o444, 0, 0)
    if disk.exists(FAKE_HWCLOCK):
        # A board without a real-time clock starts from the time its card last knew; for a
        # card that is not yet booted that is when it was built (fake-hwclock only moves the
        # clock forward, so a stale file from the base or the role layer would set it back).
        tar.file(FAKE_HWCLOCK_DATA, fake_hwclock_data(time.time()), 0o644, 0, 0)
    if identity is not None:
        tar.dir(IDENTITY.rsplit("/", 1)[0], 0o755, 0, 0)
        tar.file(IDENTITY, identity, 0o644, 0, 0)
    for path in sorted(acc.changed):
        mode, group = ACCOUNT_FILES[path]
        tar.file(
            path, acc.texts[path].encode(), mode, 0, acc.gid(group, where) if group != "root" else 0
        )

    # every other action (dirs, files, appended lines, links, units), over cmdline.txt's
    # new line: a stage's own cmdline.txt or lines appended to it come after it
    w.boot_writes[CMDLINE] = new_cmdline.encode()
    write_all(w, early=False)

    disk.tar_in(tar.finish())
    for path, data in w.boot_writes.items():
        disk.write_boot(path, data)
    disk.set_disk_id(new_id)
    log.debug("%s: disk identifier %s -> %s", where.name, old_id, new_id)
    return w.written


CMDLINE = "/boot/firmware/cmdline.txt"
FAKE_HWCLOCK = "/usr/sbin/fake-hwclock"
FAKE_HWCLOCK_DATA = "/etc/fake-hwclock.data"


def fake_hwclock_data(now: float) -> bytes:
    """fake-hwclock's saved time: UTC, as `date -u '+%Y-%m-%d %H:%M:%S'` (fake-hwclock(8))."""
    return time.strftime("%Y-%m-%d %H:%M:%S\n", time.gmtime(now)).encode()


# Words piimage puts at the end of cmdline.txt, after Raspberry Pi OS's own (its first boot
# strips those it added: bookworm's init=…/firstboot and quiet, trixie's resize). Raspberry Pi
# kernels start with the memory cgroup controller off (`cgroup_disable=memory` in the
# device-tree bootargs, which the firmware puts before cmdline.txt); Slurm's cgroup plugins
# need it, and a later cgroup_enable=memory turns it back on.
CMDLINE_WORDS = ("cgroup_enable=memory",)
_MACHINE_ID = re.compile(rb"^[0-9a-f]{32}\n?$")


def with_kernel_words(cmdline: str) -> str:
    """cmdline.txt's one line with CMDLINE_WORDS at its end (each once)."""
    line = cmdline.split("\n", 1)[0].rstrip()
    words = line.split()
    for w in CMDLINE_WORDS:
        if w not in words:
            line += " " + w
    return line + "\n"


def first_boot_machine_id(current: bytes | None) -> bytes | None:
    """What /etc/machine-id must hold for the card's first boot, or None to keep the base's
    own: Raspberry Pi OS ships it empty (bookworm) or `uninitialized` (trixie, which makes
    systemd treat the boot as a first boot: ConditionFirstBoot units such as rpi-resize, the
    preset pass). Only a real ID (which every node would share) is replaced, by
    `uninitialized`, systemd's own word for "not yet" (machine-id(5))."""
    if current is not None and _MACHINE_ID.match(current):
        return b"uninitialized\n"
    return None
