"""Read built images back, independently of piimage's own image.py: one read-only
libguestfs appliance for several images, root at / and the FAT at /boot/firmware."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import guestfs

os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


class ImageView:
    def __init__(self, g, device: str, path: Path):
        self.g, self.device, self.path = g, device, path

    def _part(self, n: int) -> str:
        return f"{self.device}{n}"

    @contextmanager
    def mounted(self):
        self.g.umount_all()
        self.g.mount_ro(self._part(2), "/")
        self.g.mount_ro(self._part(1), "/boot/firmware")
        try:
            yield self
        finally:
            self.g.umount_all()

    def read(self, p: str) -> bytes:
        return self.g.read_file(p)

    def text(self, p: str) -> str:
        return self.read(p).decode()

    def exists(self, p: str) -> bool:
        return self.g.exists(p)

    def lexists(self, p: str) -> bool:
        parent, name = os.path.split(p)
        return self.g.is_dir(parent) and name in self.g.ls(parent)

    def stat(self, p: str) -> dict:
        return self.g.lstatns(p)

    def mode(self, p: str) -> int:
        return self.stat(p)["st_mode"] & 0o7777

    def owner(self, p: str) -> tuple[int, int]:
        st = self.stat(p)
        return st["st_uid"], st["st_gid"]

    def readlink(self, p: str) -> str:
        return self.g.readlink(p)

    def ls(self, p: str) -> list[str]:
        return self.g.ls(p) if self.g.is_dir(p) else []

    def uid_of(self, user: str) -> int:
        for line in self.text("/etc/passwd").splitlines():
            f = line.split(":")
            if f[0] == user:
                return int(f[2])
        raise KeyError(user)

    def gid_of(self, group: str) -> int:
        for line in self.text("/etc/group").splitlines():
            f = line.split(":")
            if f[0] == group:
                return int(f[2])
        raise KeyError(group)

    def dpkg_installed(self) -> set[str]:
        out, pkg = set(), None
        for line in self.text("/var/lib/dpkg/status").splitlines():
            if line.startswith("Package: "):
                pkg = line.split(": ", 1)[1]
            elif line.startswith("Status: ") and line.endswith(" installed") and pkg:
                out.add(pkg)
        return out

    def disk_id(self) -> str:
        return f"{int.from_bytes(self.g.pread_device(self.device, 4, 440), 'little'):08x}"


@contextmanager
def open_images(paths: list[Path]) -> Iterator[list[ImageView]]:
    g = guestfs.GuestFS(python_return_dict=True)
    try:
        for p in paths:
            g.add_drive_opts(str(p), format="raw", readonly=True)
        g.launch()
        yield [ImageView(g, dev, p) for dev, p in zip(g.list_devices(), paths)]
    finally:
        g.close()


def partitions(image: Path) -> list[dict]:
    doc = json.loads(
        subprocess.run(
            ["sfdisk", "-J", str(image)], check=True, capture_output=True, text=True
        ).stdout
    )
    return doc["partitiontable"]["partitions"]


def fsck_partitions(image: Path) -> dict[str, subprocess.CompletedProcess]:
    """e2fsck -fn on the root and fsck.vfat -n on the boot partition, on extracted copies
    (this kernel cannot see loop partitions)."""
    results = {}
    parts = partitions(image)
    with tempfile.TemporaryDirectory() as td:
        for n, tool in ((1, ["fsck.vfat", "-n"]), (2, ["e2fsck", "-fn"])):
            p = parts[n - 1]
            out = Path(td) / f"p{n}"
            subprocess.run(
                [
                    "dd",
                    f"if={image}",
                    f"of={out}",
                    "bs=4M",
                    "iflag=skip_bytes,count_bytes",
                    f"skip={p['start'] * 512}",
                    f"count={p['size'] * 512}",
                    "conv=sparse",
                    "status=none",
                ],
                check=True,
            )
            results[tool[0]] = subprocess.run([*tool, str(out)], capture_output=True, text=True)
            out.unlink()
    return results
