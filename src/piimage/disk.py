"""Disk image files: copy-on-write overlays, the partition table (read with sfdisk, never hard-coded offsets), a loop
device on one partition (by byte offset: this kernel cannot see loop partitions), and growing
or shrinking partition 2 with its ext4 filesystem. Nothing here mounts or runs arm64 code."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError, CommandError
from .log import log
from .run import run

ALIGN = 4 << 20  # a shrunk root filesystem ends on a 4 MiB boundary


@dataclass(frozen=True)
class Partition:
    number: int
    start: int  # bytes
    size: int  # bytes
    type: str


def overlay(backing: Path, path: Path, *, size: int | None = None, what: str) -> None:
    """A qcow2 file at `path` that reads as the raw image `backing` and takes every write
    itself (the backing file is never written); `size` (bytes) makes the disk larger."""
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(path)]
    run([*cmd, *([str(size)] if size else [])], what=what)


def partitions(image: Path) -> list[Partition]:
    """The partition table of an image file, from sfdisk."""
    out = run(
        ["sfdisk", "-J", str(image)], what=f"reading the partition table of {image.name}"
    ).stdout
    return parse_sfdisk_json(out)


def parse_sfdisk_json(text: str) -> list[Partition]:
    doc = json.loads(text[text.index("{") :])
    table = doc["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    parts = []
    for i, p in enumerate(table.get("partitions", []), 1):
        m = re.search(r"(\d+)$", p.get("node", ""))
        parts.append(
            Partition(
                int(m.group(1)) if m else i,
                int(p["start"]) * sector,
                int(p["size"]) * sector,
                str(p.get("type", "")),
            )
        )
    return parts


def root_partition(image: Path) -> Partition:
    for p in partitions(image):
        if p.number == 2:
            return p
    raise BuildError(f"{image}: no partition 2 (the root filesystem on Raspberry Pi OS)")


# ---------------------------------------------------------------------------------------------
# Loop devices
# ---------------------------------------------------------------------------------------------
def attach(image: Path, part: Partition) -> str:
    """A loop device on one partition of the image; `detach()` it."""
    return run(
        [
            "losetup",
            "--find",
            "--show",
            "--offset",
            str(part.start),
            "--sizelimit",
            str(part.size),
            str(image),
        ],
        what="losetup",
    ).stdout.strip()


def detach(dev: str) -> None:
    # udev or a just-finished fsck may still hold the device for a moment
    for _ in range(10):
        if run(["losetup", "-d", dev], check=False).returncode == 0:
            return
        time.sleep(0.5)
    log.warning("could not detach %s", dev)


@contextmanager
def loop_device(image: Path, part: Partition) -> Iterator[str]:
    dev = attach(image, part)
    try:
        yield dev
    finally:
        detach(dev)


def fsck(dev: str, *, what: str, repair: str = "-y") -> None:
    """e2fsck -f: exit 1 (errors corrected) is fine, anything above fails."""
    run(["e2fsck", "-f", repair, dev], what=what, ok=(0, 1))


# ---------------------------------------------------------------------------------------------
# Growing and shrinking the root
# ---------------------------------------------------------------------------------------------
def grow_image(image: Path, extra_bytes: int) -> None:
    """Grow the file, partition 2 to the end of the disk, and its ext4 filesystem."""
    t0 = time.monotonic()
    with open(image, "r+b") as f:
        f.truncate(os.path.getsize(image) + extra_bytes)
    # growpart exits 1 both for "nothing to do" (NOCHANGE) and for a failure
    r = run(["growpart", str(image), "2"], what="growpart of partition 2", ok=(0, 1))
    if r.returncode == 1 and "NOCHANGE" not in r.stdout:
        raise CommandError("growpart of partition 2 failed", r.returncode, r.stdout[-2000:])
    part = root_partition(image)
    with loop_device(image, part) as dev:
        fsck(dev, what="e2fsck of the root filesystem before resizing")
        run(["resize2fs", dev], what="resize2fs")
    log.info(
        "root filesystem grown by %d MiB in %.0f s", extra_bytes // (1 << 20), time.monotonic() - t0
    )


def shrink_image(image: Path, free_bytes: int) -> None:
    """Shrink the root filesystem to what it uses plus `free_bytes`, partition 2 and the file
    with it: a smaller image is faster to checksum, compress and flash, and Raspberry Pi OS
    grows the root to the whole card on first boot anyway."""
    part = root_partition(image)
    with loop_device(image, part) as dev:
        fsck(dev, what="e2fsck of the root filesystem before shrinking")
        est = re.search(
            r"minimum size of the filesystem:\s*(\d+)",
            run(["resize2fs", "-P", dev], what="resize2fs -P").stdout,
        )
        head = run(["dumpe2fs", "-h", dev], what="dumpe2fs").stdout
        fields = {
            k: re.search(rf"^{k}:\s*(\d+)", head, re.MULTILINE)
            for k in ("Block size", "Block count", "Free blocks")
        }
        if not est or not all(fields.values()):
            raise BuildError(f"{image}: cannot tell the root filesystem's minimum size")
        bs = int(fields["Block size"].group(1))
        used = (int(fields["Block count"].group(1)) - int(fields["Free blocks"].group(1))) * bs
        # resize2fs -P is conservative (metadata reserve): never ask for less than it allows
        target = -(-max(int(est.group(1)) * bs, used + free_bytes) // ALIGN) * ALIGN
        if target >= part.size:
            return
        run(["resize2fs", dev, f"{target // 1024}K"], what="resize2fs (shrink)")
    sectors = target // 512
    run(
        ["sfdisk", "--no-reread", "--no-tell-kernel", "-N", "2", str(image)],
        what="sfdisk (shrink partition 2)",
        input=f"{part.start // 512},{sectors}\n".encode(),
    )
    with open(image, "r+b") as f:
        f.truncate(part.start + target)
    log.info("root filesystem shrunk to %d MiB (%d MiB free)", target >> 20, free_bytes >> 20)
