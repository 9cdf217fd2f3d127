"""The libguestfs door: the only module that imports guestfs.

One appliance launch costs 12–17 s on a TCG-only host, so a `GuestSession` holds many
drives (one per node overlay) and `Disk` objects work on one of them at a time by mounting
its root partition at / and its FAT boot partition at /boot/firmware.
"""

from __future__ import annotations

import atexit
import fnmatch
import os
import posixpath
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, MissingToolError
from .log import log
from .settings import guestfs_env

BOOT_MOUNT = "/boot/firmware"
PREAD_MAX = 1 << 20  # below the protocol's 2 MiB message limit


def _import_guestfs():
    try:
        import guestfs  # type: ignore[import-not-found]
    except ImportError:
        raise MissingToolError(
            "the libguestfs Python binding (module 'guestfs') cannot be imported",
            hint="install python3-guestfs and libguestfs-tools, and run piimage from a venv made from "
            "/usr/bin/python3 with --system-site-packages (./scripts/piimage does this for you)",
        ) from None
    return guestfs


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str
    shell: str


def parse_passwd(text: str) -> dict[str, PasswdEntry]:
    out = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[0] and not line.startswith("#"):
            out[parts[0]] = PasswdEntry(parts[0], int(parts[2]), int(parts[3]), parts[5], parts[6])
    return out


def parse_group(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) >= 3 and parts[0]:
            out[parts[0]] = int(parts[2])
    return out


# GuestSessions open in this process: the last one to close removes the scratch folder
_sessions = [0]
_sessions_lock = threading.Lock()


def scratch_dir() -> Path:
    """This process's folder for libguestfs's temporary files: the cache's work/<pid>-guestfs
    (a workspace by its name: removed by the next build once this process is gone)."""
    from .settings import cache_dir

    d = cache_dir() / "work" / f"{os.getpid()}-guestfs"
    d.mkdir(parents=True, exist_ok=True)
    if d not in _registered:
        # and at exit whatever happened: an interrupt can land between any two statements of
        # a session's closing (stop 23's CI: SIGINT during the launch left it behind)
        _registered.add(d)
        atexit.register(shutil.rmtree, d, True)
    return d


_registered: set[Path] = set()


class GuestSession:
    """One libguestfs appliance holding `drives` (qcow2 overlays or raw files)."""

    def __init__(self, drives: list[Path], *, readonly: bool = False):
        self.drives = list(drives)
        self.readonly = readonly
        self.g = None
        self.partitions: list[str] = []

    def __enter__(self) -> GuestSession:
        guestfs = _import_guestfs()
        for k, v in guestfs_env().items():
            os.environ.setdefault(k, v)
        g = guestfs.GuestFS(python_return_dict=True)
        self.g = g
        try:
            # libguestfs's temporary directory (libguestfsXXXXXX: overlays, appliance files)
            # in one of ours named by our pid, which a later build removes if we were killed
            # outright (build._clean_stale_workspaces); in $TMPDIR it would stay for good
            self.scratch = scratch_dir()
            with _sessions_lock:
                _sessions[0] += 1
            g.set_tmpdir(str(self.scratch))
            # The appliance's qemu runs in its own process group: a Ctrl-C reaches us, and we
            # close the handle (which kills qemu) in __exit__.
            g.set_pgroup(True)
            for d in self.drives:
                fmt = "qcow2" if str(d).endswith(".qcow2") else "raw"
                # writeback (not unsafe): a guest sync flushes to the file, so a finished
                # overlay can be read by qemu-img while the appliance works on the others
                g.add_drive_opts(str(d), format=fmt, readonly=self.readonly, cachemode="writeback")
            log.info(
                "starting the libguestfs appliance (%d disk%s) …",
                len(self.drives),
                "s" if len(self.drives) != 1 else "",
            )
            g.launch()
            self.partitions = list(g.list_partitions())
        except RuntimeError as e:
            self._close()
            raise BuildError(
                f"libguestfs could not start: {e}",
                hint="run with -v for details; "
                "LIBGUESTFS_DEBUG=1 LIBGUESTFS_TRACE=1 show the appliance log",
            ) from None
        except BaseException:
            self._close()
            raise
        return self

    def _close(self) -> None:
        g, self.g = self.g, None
        if g is None:
            return
        try:
            g.close()  # kills the appliance if it is still running
        except Exception:  # noqa: BLE001 - closing must never mask the real error
            pass
        finally:
            scratch = getattr(self, "scratch", None)
            if scratch is not None:
                with _sessions_lock:
                    _sessions[0] -= 1
                    last = _sessions[0] == 0
                if last:  # no other session of this process uses it
                    shutil.rmtree(scratch, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        g = self.g
        try:
            if g is not None and exc_type is None:
                try:
                    g.umount_all()
                    g.shutdown()  # flushes and checks the appliance exited cleanly
                except RuntimeError as e:
                    raise BuildError(f"libguestfs failed while finishing: {e}") from None
        finally:
            # also when a Ctrl-C or SIGTERM lands during the shutdown
            self._close()

    def disks(self) -> list[Disk]:
        assert self.g is not None
        devices = self.g.list_devices()
        return [Disk(self, dev, path) for dev, path in zip(devices, self.drives)]


class Disk:
    """One drive of a session: partition table, disk identifier, and file operations while mounted."""

    def __init__(self, session: GuestSession, device: str, path: Path):
        self.s = session
        self.device = device
        self.path = path

    @property
    def g(self):
        assert self.s.g is not None
        return self.s.g

    # -- partitions and identity -------------------------------------------------------------
    def partition(self, n: int) -> str:
        # /dev/sdX<n>: the appliance names MBR partitions by number (read once per launch)
        parts = [p for p in self.s.partitions if p.startswith(self.device)]
        name = f"{self.device}{n}"
        if name not in parts:
            raise BuildError(f"{self.path}: no partition {n} (found {', '.join(parts) or 'none'})")
        return name

    def check_layout(self) -> None:
        """Raspberry Pi OS layout: MBR, p1 FAT (boot), p2 ext4 (root)."""
        ptype = self.g.part_get_parttype(self.device)
        if ptype != "msdos":
            raise BuildError(
                f"{self.path}: partition table is {ptype}, expected MBR (msdos) as on Raspberry Pi OS"
            )
        p1, p2 = self.partition(1), self.partition(2)
        t1, t2 = self.g.vfs_type(p1), self.g.vfs_type(p2)
        if t1 != "vfat" or t2 != "ext4":
            raise BuildError(
                f"{self.path}: expected a FAT boot partition and an ext4 root, found {t1 or 'nothing'} and {t2 or 'nothing'}"
            )

    def disk_id(self) -> str:
        raw = self.g.pread_device(self.device, 4, 440)
        return f"{int.from_bytes(raw, 'little'):08x}"

    def set_disk_id(self, disk_id: str) -> None:
        self.g.pwrite_device(self.device, int(disk_id, 16).to_bytes(4, "little"), 440)

    # -- mounting -------------------------------------------------------------------------------
    def mount(self, *, readonly: bool = False) -> None:
        """The root filesystem on /, the FAT on /boot/firmware. Read-only (a card or an image
        that is only read): nothing is written, not even the replay of a used card's ext4
        journal (noload)."""
        self.g.umount_all()
        if readonly:
            self.g.mount_options("ro,noload", self.partition(2), "/")
            self.g.mount_ro(self.partition(1), BOOT_MOUNT)
            return
        self.g.mount(self.partition(2), "/")
        if not self.g.is_dir(BOOT_MOUNT):
            self.g.mkdir_p(BOOT_MOUNT)
        self.g.mount(self.partition(1), BOOT_MOUNT)

    def umount(self) -> None:
        # unmount first (the filesystems write back everything), then sync: the flush reaches
        # the drive file, so the overlay is complete on the host from here on
        self.g.umount_all()
        self.g.sync()

    # -- files ----------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return self.g.exists(path)

    def _lexists(self, path: str) -> bool:
        parent = posixpath.dirname(path) or "/"
        return self.g.is_dir(parent) and posixpath.basename(path) in self.g.ls(parent)

    def read(self, path: str) -> bytes:
        # filesize + pread: a few ms a file, where read_file/cat cost ~100 ms on a TCG host
        size = self.g.filesize(path)
        chunks, off = [], 0
        while off < size:
            chunk = self.g.pread(path, min(PREAD_MAX, size - off), off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        return b"".join(chunks)

    def read_text(self, path: str) -> str:
        return self.read(path).decode("utf-8", "replace")

    def on_boot(self, path: str) -> bool:
        return path == BOOT_MOUNT or path.startswith(BOOT_MOUNT + "/")

    def read_if_exists(self, path: str) -> bytes | None:
        return self.read(path) if self.g.is_file(path) else None

    def tar_in(self, data: bytes) -> None:
        """Unpack a tar into / in one call: owners are numeric (the tar carries no names, so
        the appliance's own /etc/passwd plays no part), modes as given."""
        with tempfile.NamedTemporaryFile(prefix="piimage-stamp-", suffix=".tar") as f:
            f.write(data)
            f.flush()
            self.g.tar_in(f.name, "/")

    def write_boot(self, path: str, data: bytes) -> None:
        """A file on the FAT boot partition (no owners or modes there). Files on the root
        filesystem go through tar_in, with their owners and modes."""
        if not self.on_boot(path):
            raise ValueError(f"{path} is not on the boot partition")
        self.g.write(path, data)

    def remove_glob(self, pattern: str) -> list[str]:
        parent, pat = posixpath.split(pattern)
        if not self.g.is_dir(parent):
            return []
        gone = []
        for name in self.g.ls(parent):
            if fnmatch.fnmatch(name, pat):
                full = posixpath.join(parent, name)
                # rm_f is a plain unlink in the appliance; rm_rf starts a process (slow under TCG)
                if self.g.is_dir(full, followsymlinks=False):
                    self.g.rm_rf(full)
                else:
                    self.g.rm_f(full)
                gone.append(full)
        return gone

    def rename(self, src: str, dst: str) -> None:
        self.g.rename(src, dst)

    def stat(self, path: str) -> dict:
        return self.g.lstatns(path)

    def unit_path(self, unit: str) -> str | None:
        for d in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"):
            p = f"{d}/{unit}"
            if self._lexists(p) and not (
                self.g.is_symlink(p) and self.g.readlink(p) == "/dev/null"
            ):
                return p
        return None
