"""The node stamp: everything that makes one image a particular node, written through
libguestfs with no emulation — disk identifier, accounts, and the rendered files of the
node-scope stages."""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass

from .errors import BuildError
from .image import Disk
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
        raise BuildError(f"{where} does not refer to the disk's PARTUUID {old}-0N; is this a Raspberry Pi OS image?")
    return pattern.sub(lambda m: f"PARTUUID={new}-0{m.group(1)}", text)


def set_identity(disk: Disk, disk_id: str) -> None:
    """New disk identifier, and the PARTUUIDs in cmdline.txt and fstab that refer to it."""
    old = disk.disk_id()
    cmdline_path = "/boot/firmware/cmdline.txt"
    cmdline = disk.read_text(cmdline_path)
    if cmdline.rstrip("\n").count("\n"):
        raise BuildError(f"{disk.path}: cmdline.txt has more than one line; the firmware reads only the first")
    fstab = disk.read_text("/etc/fstab")
    new_cmdline = replace_partuuids(cmdline, old, disk_id, "cmdline.txt")
    new_fstab = replace_partuuids(fstab, old, disk_id, "/etc/fstab")
    disk.write(cmdline_path, new_cmdline.encode())
    disk.write("/etc/fstab", new_fstab.encode(), mode=0o644)
    disk.set_disk_id(disk_id)
    log.debug("%s: disk identifier %s -> %s", disk.path.name, old, disk_id)


def _rewrite_accounts(text: str, old: str, new: str, *, name_field: bool = True, members_field: int | None = None,
                      home_field: int | None = None, hash_field: int | None = None, password_hash: str | None = None) -> str:
    out = []
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            if name_field and parts[0] == old:
                parts[0] = new
                if home_field is not None:
                    parts[home_field] = f"/home/{new}"
                if hash_field is not None and password_hash:
                    parts[hash_field] = password_hash
            if members_field is not None and len(parts) > members_field and parts[members_field]:
                parts[members_field] = ",".join(new if m == old else m for m in parts[members_field].split(","))
        out.append(":".join(parts))
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def set_admin(disk: Disk, admin: Admin) -> None:
    """Make Raspberry Pi OS's first user (UID 1000) the admin user, offline, so no first-boot
    rename prompt appears: rename it in passwd/shadow/group/gshadow, move its home, set the
    password hash if one is given (else the account stays locked for passwords)."""
    users = disk.passwd()
    first = next((u for u in users.values() if u.uid == FIRST_USER_UID), None)
    if first is None:
        raise BuildError(f"{disk.path}: the image has no user with UID {FIRST_USER_UID} to turn into '{admin.name}'")
    if admin.name in users and users[admin.name].uid != FIRST_USER_UID:
        raise BuildError(f"{disk.path}: user '{admin.name}' already exists with UID {users[admin.name].uid}")
    old = first.name
    files = {
        "/etc/passwd": dict(home_field=5),
        "/etc/shadow": dict(hash_field=1, password_hash=admin.password_hash),
        "/etc/group": dict(members_field=3),
        "/etc/gshadow": dict(members_field=3),
        "/etc/subuid": {},
        "/etc/subgid": {},
    }
    for path, kw in files.items():
        if not disk.exists(path):
            continue
        st = disk.stat(path)
        text = disk.read_text(path)
        new = _rewrite_accounts(text, old, admin.name, **kw)
        if new != text:
            disk.write(path, new.encode(), mode=st["st_mode"] & 0o7777, owner="root",
                       group="shadow" if path in ("/etc/shadow", "/etc/gshadow") and "shadow" in disk.groups() else "root")
    disk.forget_accounts()
    old_home, new_home = first.home, f"/home/{admin.name}"
    if old_home != new_home:
        if disk.exists(old_home) and not disk.exists(new_home):
            disk.rename(old_home, new_home)
        elif not disk.exists(new_home):
            disk.mkdir_p(new_home)
            disk.chmod_chown(new_home, 0o755, admin.name, disk_group_of(disk, admin.name))
    log.debug("%s: user %s (UID %d) is now %s", disk.path.name, old, FIRST_USER_UID, admin.name)


def disk_group_of(disk: Disk, user: str) -> str:
    gid = disk.passwd()[user].gid
    return next((name for name, g in disk.groups().items() if g == gid), user)


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


def enable_unit(disk: Disk, unit: str) -> None:
    """What `systemctl enable` does, offline: the .wants/.requires symlinks and aliases
    from the unit's [Install] section."""
    template = re.sub(r"@[^.]+\.", "@.", unit) if "@" in unit else unit
    path = disk.unit_path(template)
    if path is None:
        raise BuildError(f"{disk.path}: cannot enable {unit}: no unit file {template} in the image")
    wanted, required, alias = _install_targets(disk.read_text(path))
    if not (wanted or required or alias):
        raise BuildError(f"{disk.path}: {unit} has no [Install] section; it cannot be enabled")
    for target in wanted:
        disk.symlink(path, f"/etc/systemd/system/{target}.wants/{unit}")
    for target in required:
        disk.symlink(path, f"/etc/systemd/system/{target}.requires/{unit}")
    for a in alias:
        disk.symlink(path, f"/etc/systemd/system/{a}")


def mask_unit(disk: Disk, unit: str) -> None:
    disk.symlink("/dev/null", f"/etc/systemd/system/{unit}")


def disable_unit(disk: Disk, unit: str) -> None:
    """What `systemctl disable` does, offline: remove its .wants/.requires links and aliases."""
    base = "/etc/systemd/system"
    for d in disk.g.ls(base):
        if d.endswith((".wants", ".requires")) and disk.g.is_dir(f"{base}/{d}"):
            disk.remove_glob(f"{base}/{d}/{unit}")
    path = disk.unit_path(unit)
    if path is not None and not path.startswith(base + "/"):
        for a in _install_targets(disk.read_text(path))[2]:
            disk.remove_glob(f"{base}/{a}")


def ensure_user(disk: Disk, user: RenderedUser) -> None:
    """A local account with a fixed UID (= GID), created offline like useradd would, so the
    same user has the same UID on every node."""
    users, groups = disk.passwd(), disk.groups()
    if user.name in users:
        if users[user.name].uid != user.uid:
            raise BuildError(f"{disk.path}: user '{user.name}' exists with UID {users[user.name].uid}, not {user.uid}")
    else:
        taken = next((u.name for u in users.values() if u.uid == user.uid), None)
        if taken:
            raise BuildError(f"{disk.path}: UID {user.uid} for '{user.name}' is already used by '{taken}' in the image")
        gtaken = next((n for n, g in groups.items() if g == user.uid and n != user.name), None)
        if gtaken:
            raise BuildError(f"{disk.path}: GID {user.uid} for '{user.name}' is already used by group '{gtaken}'")
        days = 19000  # last password change: a fixed day keeps images reproducible
        _append_line(disk, "/etc/passwd", f"{user.name}:x:{user.uid}:{user.uid}::{user.home}:{user.shell}")
        _append_line(disk, "/etc/shadow", f"{user.name}:!:{days}:0:99999:7:::", secret_file=True)
        if user.name not in groups:
            _append_line(disk, "/etc/group", f"{user.name}:x:{user.uid}:")
            _append_line(disk, "/etc/gshadow", f"{user.name}:!::", secret_file=True)
    if user.groups:
        text = disk.read_text("/etc/group")
        out = []
        for line in text.splitlines():
            parts = line.split(":")
            if len(parts) == 4 and parts[0] in user.groups:
                members = [m for m in parts[3].split(",") if m]
                if user.name not in members:
                    parts[3] = ",".join(members + [user.name])
            out.append(":".join(parts))
        disk.write("/etc/group", ("\n".join(out) + "\n").encode())
    disk.forget_accounts()
    if not disk.exists(user.home):
        disk.mkdir_p(user.home)
        disk.chmod_chown(user.home, 0o700, user.name, user.name)


def _append_line(disk: Disk, path: str, line: str, *, secret_file: bool = False) -> None:
    if not disk.exists(path):
        if secret_file:
            return  # no shadow file in this image: nothing to add to
        raise BuildError(f"{disk.path}: {path} is missing in the image")
    st = disk.stat(path)
    text = disk.read_text(path)
    if text and not text.endswith("\n"):
        text += "\n"
    group = "shadow" if secret_file and "shadow" in disk.groups() else "root"
    disk.write(path, (text + line + "\n").encode(), mode=st["st_mode"] & 0o7777, owner="root", group=group)


def ensure_lines(disk: Disk, append: RenderedAppend) -> None:
    """Make sure each line is in the file (under `section` when given, e.g. config.txt's [all])."""
    if not disk.exists(append.path):
        raise BuildError(f"{disk.path}: cannot add lines to {append.path}: it does not exist in the image")
    text = disk.read_text(append.path)
    present = {ln.strip() for ln in text.splitlines()}
    missing = [ln for ln in append.lines if ln.strip() not in present]
    if not missing:
        return
    if text and not text.endswith("\n"):
        text += "\n"
    if append.section:
        headers = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[")]
        if not headers or headers[-1] != append.section:
            text += f"\n{append.section}\n"
    text += "".join(ln + "\n" for ln in missing)
    st = disk.stat(append.path) if not disk.on_boot(append.path) else None
    if st is None:
        disk.write(append.path, text.encode())
    else:
        uid = st["st_uid"]
        owner = next((u.name for u in disk.passwd().values() if u.uid == uid), "root")
        disk.write(append.path, text.encode(), mode=st["st_mode"] & 0o7777, owner=owner, group=owner if owner in disk.groups() else "root")


def apply_plan(disk: Disk, plan: NodePlan) -> list[WrittenFile]:
    """Write the plan's files (after its removals), links and unit states."""
    for pattern in plan.remove:
        for gone in disk.remove_glob(pattern):
            log.debug("%s: removed %s", disk.path.name, gone)
    for u in plan.users:
        ensure_user(disk, u)
    for d in plan.dirs:
        disk.mkdir_p(d.path)
        if not disk.on_boot(d.path):
            disk.chmod_chown(d.path, d.mode, d.owner, d.group)
    written = []
    for f in plan.files:
        disk.write(f.path, f.data, mode=f.mode, owner=f.owner, group=f.group)
        written.append(WrittenFile(f.path, hashlib.sha256(f.data).hexdigest(), f.mode, f.owner, f.stage))
        if not f.secret:
            log.debug("%s: wrote %s (%o %s)", disk.path.name, f.path, f.mode, f.owner)
    for a in plan.append:
        ensure_lines(disk, a)
    for lk in plan.links:
        disk.symlink(lk.target, lk.path)
    for unit in plan.disable:
        disable_unit(disk, unit)
    for unit in plan.enable:
        enable_unit(disk, unit)
    for unit in plan.mask:
        mask_unit(disk, unit)
    return written


def ensure_dir_modes(disk: Disk, plan: NodePlan) -> None:
    """Parents of files owned by a user (e.g. ~/.ssh) belong to that user; ~/.ssh is 0700."""
    for f in plan.files:
        if f.owner == "root" or disk.on_boot(f.path):
            continue
        parent = posixpath.dirname(f.path)
        if posixpath.basename(parent) == ".ssh":
            disk.chmod_chown(parent, 0o700, f.owner, f.group)


def stamp(disk: Disk, plan: NodePlan, *, cluster_name: str, admin: Admin) -> list[WrittenFile]:
    disk.check_layout()
    disk.mount()
    try:
        set_identity(disk, node_disk_id(cluster_name, plan.hostname))
        set_admin(disk, admin)
        written = apply_plan(disk, plan)
        ensure_dir_modes(disk, plan)
    finally:
        disk.umount()
    return written
