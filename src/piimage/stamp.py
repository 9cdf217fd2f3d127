"""The node stamp: everything that makes one image a particular node, written through
libguestfs with no emulation — disk identifier, accounts, and the rendered files of the
node-scope stages."""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .accounts import home_dir
from .errors import BuildError
from .image import Disk, PasswdEntry, parse_group, parse_passwd
from .log import log
from .stages import NodePlan, RenderedAppend, RenderedUser

FIRST_USER_UID = 1000


@dataclass(frozen=True)
class Admin:
    name: str
    password_hash: str | None


@dataclass(frozen=True)
class WrittenFile:
    path: str
    sha256: str
    mode: int
    owner: str
    stage: str


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


def _install_targets(unit_text: str) -> tuple[list[str], list[str], list[str]]:
    wanted, required, alias = [], [], []
    section = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
            continue
        if section != "[Install]" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        bucket = {"WantedBy": wanted, "RequiredBy": required, "Alias": alias}.get(key.strip())
        if bucket is not None:
            bucket.extend(value.split())
    return wanted, required, alias


UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")


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


def _append_lines(text: str, append: RenderedAppend) -> str:
    present = {ln.strip() for ln in text.splitlines()}
    missing = [ln for ln in append.lines if ln.strip() not in present]
    if not missing:
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    if append.section:
        headers = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[")]
        if not headers or headers[-1] != append.section:
            text += f"\n{append.section}\n"
    return text + "".join(ln + "\n" for ln in missing)


def stamp(
    disk: Disk, plan: NodePlan, *, cluster_name: str, admin: Admin, check_layout: bool = True
) -> list[WrittenFile]:
    """Write one node's identity and rendered files into its disk. Reads first, then changes
    in memory, then one tar for the root filesystem and a few writes for the FAT — libguestfs
    calls are slow on a TCG-only host, so they are kept few."""
    if check_layout:
        disk.check_layout()
    disk.mount()
    try:
        return _stamp_mounted(disk, plan, cluster_name=cluster_name, admin=admin)
    finally:
        disk.umount()


def _stamp_mounted(
    disk: Disk, plan: NodePlan, *, cluster_name: str, admin: Admin
) -> list[WrittenFile]:
    where = disk.path
    tar = TarBuilder()
    written: list[WrittenFile] = []

    # identity: a new disk identifier; cmdline.txt (one line, FAT) and fstab follow it
    old_id, new_id = disk.disk_id(), node_disk_id(cluster_name, plan.hostname)
    cmdline = disk.read_text(CMDLINE)
    if cmdline.rstrip("\n").count("\n"):
        raise BuildError(
            f"{where}: cmdline.txt has more than one line; the firmware reads only the first"
        )
    new_cmdline = with_kernel_words(replace_partuuids(cmdline, old_id, new_id, "cmdline.txt"))
    fstab = replace_partuuids(disk.read_text("/etc/fstab"), old_id, new_id, "/etc/fstab")

    # accounts, in memory
    acc = Accounts(
        {
            p: t.decode("utf-8", "replace")
            for p in ACCOUNT_FILES
            if (t := disk.read_if_exists(p)) is not None
        }
    )
    acc.rename_first_user(admin, where)
    for u in plan.users:
        acc.ensure_user(u, where)

    def ids(owner: str, group: str) -> tuple[int, int]:
        return acc.uid(owner, where), acc.gid(group, where)

    # removals, disabled units, the admin's home moved (before anything is unpacked into it)
    for pattern in plan.remove:
        for gone in disk.remove_glob(pattern):
            log.debug("%s: removed %s", where.name, gone)
    for unit in plan.disable:
        for d in disk.g.ls("/etc/systemd/system"):
            if d.endswith((".wants", ".requires")):
                disk.remove_glob(f"/etc/systemd/system/{d}/{unit}")
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
    for path in sorted(acc.changed):
        mode, group = ACCOUNT_FILES[path]
        tar.file(
            path, acc.texts[path].encode(), mode, 0, acc.gid(group, where) if group != "root" else 0
        )

    for d in plan.dirs:
        if not disk.on_boot(d.path):
            tar.dir(d.path, d.mode, *ids(d.owner, d.group))
    boot_writes: dict[str, bytes] = {CMDLINE: new_cmdline.encode()}
    plan_files = {f.path: f for f in plan.files}
    for f in plan.files:
        if disk.on_boot(f.path):
            boot_writes[f.path] = f.data
        else:
            tar.file(f.path, f.data, f.mode, *ids(f.owner, f.group))
            parent = posixpath.dirname(f.path)
            if f.owner != "root" and posixpath.basename(parent) == ".ssh":
                tar.dir(parent, 0o700, *ids(f.owner, f.group))  # ~/.ssh belongs to its user, 0700
        written.append(
            WrittenFile(f.path, hashlib.sha256(f.data).hexdigest(), f.mode, f.owner, f.stage)
        )
        if not f.secret:
            log.debug("%s: %s (%o %s)", where.name, f.path, f.mode, f.owner)
    for a in plan.append:
        if disk.on_boot(a.path):
            current = boot_writes.get(a.path)
            text = current.decode() if current is not None else disk.read_text(a.path)
            boot_writes[a.path] = _append_lines(text, a).encode()
        else:
            if not disk.exists(a.path):
                raise BuildError(
                    f"{where}: cannot add lines to {a.path}: it does not exist in the image"
                )
            st = disk.stat(a.path)
            tar.file(
                a.path,
                _append_lines(disk.read_text(a.path), a).encode(),
                st["st_mode"] & 0o7777,
                st["st_uid"],
                st["st_gid"],
            )
    for lk in plan.links:
        tar.symlink(lk.path, lk.target)
    for unit in plan.enable:
        _enable(disk, tar, unit, plan_files)
    for unit in plan.mask:
        tar.symlink(f"/etc/systemd/system/{unit}", "/dev/null")

    disk.tar_in(tar.finish())
    for path, data in boot_writes.items():
        disk.write_boot(path, data)
    disk.set_disk_id(new_id)
    log.debug("%s: disk identifier %s -> %s", where.name, old_id, new_id)
    return written


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


def _enable(disk: Disk, tar: TarBuilder, unit: str, plan_files: dict) -> None:
    """What `systemctl enable` does, offline: links from the unit's [Install] section."""
    template = re.sub(r"@[^.]+\.", "@.", unit) if "@" in unit else unit
    path, text = None, None
    for d in UNIT_DIRS:
        p = f"{d}/{template}"
        if p in plan_files:
            path, text = p, plan_files[p].data.decode()
            break
    if path is None:
        path = disk.unit_path(template)
        if path is None:
            raise BuildError(
                f"{disk.path}: cannot enable {unit}: no unit file {template} in the image"
            )
        text = disk.read_text(path)
    wanted, required, alias = _install_targets(text)
    if not (wanted or required or alias):
        raise BuildError(f"{disk.path}: {unit} has no [Install] section; it cannot be enabled")
    for target in wanted:
        tar.symlink(f"/etc/systemd/system/{target}.wants/{unit}", path)
    for target in required:
        tar.symlink(f"/etc/systemd/system/{target}.requires/{unit}", path)
    for a in alias:
        tar.symlink(f"/etc/systemd/system/{a}", path)
