"""`piimage flash`: a node's image onto an SD card, safely, and read back.

Safety first: the target must be a whole, removable, writable disk that holds no mounted
filesystem (partitions a desktop auto-mounted under /media or /run/media are unmounted
first), is not the disk this system runs from, is big enough for the image and not bigger
than any card (`MAX_CARD`, unless allowed). Each refusal is one line that says why.

The write follows the image's .bmap (bmaptool's block map: only the mapped ranges, each with
its SHA-256), checking the image against the map as it reads it; then the device's buffer
cache is dropped and every range is read back from the card and checked. A card whose write
or check did not finish has its first MiB (the partition table) zeroed, so it cannot boot
half-written and pass for a good one; it is never reported as done.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import mmap
import os
import queue
import stat
import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BuildError, UserError
from .log import human_size, log, progress
from .run import require_tools, run

MAX_CARD = 256 << 30  # bytes: larger than any SD card a Pi cluster uses
AUTOMOUNT = ("/media/", "/run/media/")  # where desktops mount a card that is put in
CHUNK = 4 << 20
HEAD_BYTES = 1 << 20  # zeroed on a card that is not known good (its partition table)
BLKFLSBUF = 0x1261  # linux/fs.h: flush the device's buffer cache
LSBLK_COLUMNS = "NAME,PATH,TYPE,SIZE,RM,HOTPLUG,RO,MODEL,TRAN,MOUNTPOINTS,FSTYPE,LABEL"


@dataclass
class BlockDevice:
    path: str
    type: str  # "disk", "part", "loop", …
    size: int
    removable: bool  # RM or HOTPLUG: a card reader's disk
    readonly: bool
    model: str
    transport: str
    mounts: list[str]  # this device's own mount points
    children: list[BlockDevice] = field(default_factory=list)
    fstype: str = ""
    label: str = ""
    parent: str | None = None

    def all_mounts(self) -> list[str]:
        return [*self.mounts, *(m for c in self.children for m in c.all_mounts())]

    def describe(self) -> str:
        what = " ".join(x for x in (self.model, self.transport and f"({self.transport})") if x)
        parts = ", ".join(
            f"{Path(c.path).name} {c.fstype or '?'}{' ' + c.label if c.label else ''}"
            f" {human_size(c.size)}"
            for c in self.children
        )
        return f"{self.path}: {what or 'no model name'}, {human_size(self.size)}" + (
            f"; partitions: {parts}" if parts else "; no partitions"
        )


def _device(d: dict, parent: str | None = None) -> BlockDevice:
    dev = BlockDevice(
        path=d.get("path") or f"/dev/{d['name']}",
        type=d.get("type") or "",
        size=int(d.get("size") or 0),
        removable=bool(d.get("rm")) or bool(d.get("hotplug")),
        readonly=bool(d.get("ro")),
        model=(d.get("model") or "").strip(),
        transport=d.get("tran") or "",
        mounts=[m for m in (d.get("mountpoints") or []) if m],
        fstype=d.get("fstype") or "",
        label=d.get("label") or "",
        parent=parent,
    )
    dev.children = [_device(c, dev.path) for c in d.get("children") or []]
    return dev


def parse_lsblk(doc: dict) -> dict[str, BlockDevice]:
    """Every device of `lsblk -J` by path, partitions included (with their parent)."""
    out: dict[str, BlockDevice] = {}

    def walk(devs: Iterable[BlockDevice]) -> None:
        for d in devs:
            out.setdefault(d.path, d)
            walk(d.children)

    walk(_device(d) for d in doc.get("blockdevices") or [])
    return out


def lsblk() -> dict[str, BlockDevice]:
    require_tools(["lsblk"])
    r = run(["lsblk", "-J", "-b", "-o", LSBLK_COLUMNS], what="lsblk")
    try:
        return parse_lsblk(json.loads(r.stdout))
    except (ValueError, KeyError, TypeError) as e:
        raise BuildError(f"lsblk printed what piimage cannot read: {e}") from None


def system_disks(devices: dict[str, BlockDevice]) -> set[str]:
    """The whole disks under this system's own filesystems (/, /boot, /usr, /var, swap)."""
    own = {"/", "/boot", "/boot/efi", "/boot/firmware", "/usr", "/var", "[SWAP]"}
    out = set()
    for d in devices.values():
        if d.parent is None and own & set(d.all_mounts()):
            out.add(d.path)
    return out


def block_device(path: str) -> str | None:
    """The block device `path` names (symlinks resolved), None if it is something else."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise UserError(f"{path}: no such device") from None
    return real if stat.S_ISBLK(st.st_mode) else None


def check_target(
    path: str,
    image_size: int,
    devices: dict[str, BlockDevice],
    *,
    allow_large: bool = False,
    allow_fixed: bool = False,
) -> tuple[BlockDevice, list[str]]:
    """The device to write, and the auto-mounted mount points to unmount first; or a
    UserError that says in one line why not."""
    real = block_device(path)
    if real is None:
        raise UserError(
            f"{path}: not a block device (give the card's disk, /dev/sdX or /dev/mmcblkN)"
        )
    dev = devices.get(real) or devices.get(path)
    if dev is None:
        raise UserError(f"{path}: lsblk does not list it")
    if dev.type == "part" or dev.parent is not None:
        raise UserError(
            f"{path}: is a partition of {dev.parent}: give the whole card, {dev.parent}"
        )
    if dev.type not in ("disk", "loop"):
        raise UserError(f"{path}: is a {dev.type or 'device'} device, not a disk")
    if dev.path in system_disks(devices):
        raise UserError(f"{path}: holds this system's own filesystems; never written")
    if dev.readonly:
        raise UserError(f"{path}: is read-only (an SD card's lock switch?)")
    if not dev.removable and not allow_fixed:
        raise UserError(
            f"{path}: is not a removable disk (a card reader's disk is); "
            "--allow-fixed if you are sure"
        )
    if dev.size < image_size:
        raise UserError(
            f"{path}: is too small: {human_size(dev.size)}, the image needs "
            f"{human_size(image_size)}"
        )
    if dev.size > MAX_CARD and not allow_large:
        raise UserError(
            f"{path}: is {human_size(dev.size)}, larger than any SD card "
            f"({human_size(MAX_CARD)}); --allow-large if it really is the card"
        )
    mounts = dev.all_mounts()
    foreign = [m for m in mounts if not m.startswith(AUTOMOUNT)]
    if foreign:
        raise UserError(f"{path}: has a filesystem mounted at {foreign[0]}; unmount it first")
    return dev, mounts


@dataclass(frozen=True)
class BlockMap:
    block_size: int
    image_size: int
    ranges: tuple[tuple[int, int, str | None], ...]  # first block, last block, sha256
    checksum: str  # "sha256", or "" when the map has none per range

    @property
    def mapped_bytes(self) -> int:
        return sum(
            min((last + 1) * self.block_size, self.image_size) - first * self.block_size
            for first, last, _ in self.ranges
        )


def read_bmap(path: Path) -> BlockMap:
    try:
        root = ET.parse(path).getroot()
        bs = int(root.findtext("BlockSize") or 0)
        size = int(root.findtext("ImageSize") or 0)
        kind = (root.findtext("ChecksumType") or "").strip().lower()
        ranges = []
        for r in root.iter("Range"):
            first, _, last = (r.text or "").strip().partition("-")
            ranges.append((int(first), int(last or first), r.get("chksum")))
    except (ET.ParseError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a block map piimage can read: {e}") from None
    if bs <= 0 or size <= 0 or not ranges:
        raise UserError(f"{path}: not a block map piimage can read (no block size or ranges)")
    return BlockMap(bs, size, tuple(ranges), kind if kind == "sha256" else "")


def unmount(mounts: list[str]) -> None:
    for m in sorted(mounts, key=len, reverse=True):
        log.info("unmounting %s (mounted when the card was put in)", m)
        run(["umount", m], what=f"umount {m}")


def _ranges(bmap: BlockMap) -> Iterable[tuple[int, int, str | None]]:
    for first, last, digest in bmap.ranges:
        start = first * bmap.block_size
        end = min((last + 1) * bmap.block_size, bmap.image_size)
        yield start, end, digest


QUEUE_CHUNKS = 8  # chunks read ahead of the writer: 32 MiB in memory at most
DIRECT_ALIGN = 4096  # O_DIRECT wants offsets and lengths in whole logical blocks (512 or 4096)


def _read_ahead(
    image: Path, bmap: BlockMap, free: queue.Queue, full: queue.Queue, stop: threading.Event
) -> None:
    """The reader of the write: every mapped chunk of the image in order, read into a buffer
    taken from `free` and hashed per range as it is read, put on `full` as ("data", offset,
    buffer, length); each range is closed by ("range", start, end, sha256 of what was read,
    the map's sha256), the whole by ("end",), an error by ("error", exception). Reading and
    hashing (preadv and hashlib release the GIL) go on here while the writer waits for the
    card, so they cost the write no time."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                full.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def take():
        while not stop.is_set():
            try:
                return free.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    try:
        with open(image, "rb", buffering=0) as src:
            for start, end, digest in _ranges(bmap):
                h = hashlib.sha256()
                off = start
                while off < end:
                    buf = take()
                    if buf is None:
                        return
                    view = memoryview(buf)[: min(CHUNK, end - off)]
                    n = os.preadv(src.fileno(), [view], off)
                    if not n:
                        raise BuildError(f"the image ends at {off}, before its block map does")
                    h.update(view[:n])
                    if not put(("data", off, buf, n)):
                        return
                    off += n
                if not put(("range", start, end, h.hexdigest(), digest)):
                    return
        put(("end",))
    except BaseException as e:  # handed to the writer, which raises it
        put(("error", e))


def _open_direct(device: str) -> int | None:
    """The card opened a second time for direct I/O (None where that is not possible: a
    plain file on tmpfs, a device that refuses it). Measured on loop devices with direct
    I/O (scripts/bench --flash): buffered writes let the whole image pile up in the page
    cache and reach the card only at the final fsync, 3.3-3.9 s for 1.1 GiB, where direct
    4 MiB writes took 1.3-2.1 s; and nothing of the write is left in the cache that the
    read-back could take for the card's."""
    try:
        return os.open(device, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return None


def _write_mapped(
    image: Path, bmap: BlockMap, device: str, fd: int, on_bytes, cancelled: Callable[[], bool]
) -> None:
    """Every mapped range of `image` onto the card (`fd`, opened on `device`), checked
    against the map as it is read; the reading and hashing run in a thread of their own,
    ahead of the writes, into page-aligned buffers (mmap) that the writes take as they are,
    with direct I/O where the card and the piece allow it."""
    free: queue.Queue = queue.Queue()
    for _ in range(QUEUE_CHUNKS):
        free.put(mmap.mmap(-1, CHUNK))
    full: queue.Queue = queue.Queue(maxsize=QUEUE_CHUNKS)
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_ahead, args=(image, bmap, free, full, stop), name="flash-read", daemon=True
    )
    direct = _open_direct(device)
    reader.start()
    try:
        while True:
            item = full.get()
            kind = item[0]
            if kind == "data":
                _, off, buf, n = item
                view = memoryview(buf)[:n]
                aligned = off % DIRECT_ALIGN == 0 and n % DIRECT_ALIGN == 0
                if direct is not None and aligned:
                    try:
                        _pwrite_all(direct, view, off)
                    except OSError as e:
                        if e.errno != errno.EINVAL:
                            raise
                        os.close(direct)  # the card wants other alignment: buffered from here
                        direct = None
                        _pwrite_all(fd, view, off)
                else:
                    _pwrite_all(fd, view, off)
                free.put(buf)
                on_bytes(n)
            elif kind == "range":
                _, start, end, got, digest = item
                if digest and bmap.checksum and got != digest:
                    raise BuildError(
                        f"{image}: bytes {start}-{end} do not match its .bmap: the image or "
                        "the map is damaged (rebuild it)"
                    )
                if cancelled():
                    raise KeyboardInterrupt
            elif kind == "error":
                raise item[1]
            else:
                return
    finally:
        stop.set()
        reader.join()
        if direct is not None:
            os.close(direct)


def _pwrite_all(fd: int, view: memoryview, off: int) -> None:
    while view:
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def _read_range(fd: int, start: int, end: int, on_bytes) -> str:
    h = hashlib.sha256()
    off = start
    while off < end:
        data = os.pread(fd, min(CHUNK, end - off), off)
        if not data:
            raise BuildError(f"the card ends at {off}, before the image does")
        h.update(data)
        off += len(data)
        on_bytes(len(data))
    return h.hexdigest()


def _drop_cache(fd: int) -> None:
    """Make the next reads come from the card, not from what the kernel kept of the write."""
    os.fsync(fd)
    try:
        fcntl.ioctl(fd, BLKFLSBUF)
    except OSError:
        pass
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _zero_head(device: str) -> None:
    """A card that is not known good must not boot: its partition table goes."""
    try:
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(HEAD_BYTES), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # a card that was pulled out: nothing to do


def write_and_verify(
    image: Path, bmap: BlockMap, device: str, *, cancelled: Callable[[], bool] = lambda: False
) -> dict:
    """Write the mapped ranges of `image` to `device`, then read them back from the card.
    Returns figures (bytes, seconds of each step). On any failure or interrupt the card's
    head is zeroed and the exception goes on."""
    import time

    total = bmap.mapped_bytes
    done = False
    try:
        fd = os.open(device, os.O_RDWR | os.O_EXCL)  # EBUSY while anything has it mounted
    except OSError as e:
        raise BuildError(f"{device}: cannot open it for writing: {e.strerror}") from None
    try:
        t0 = time.monotonic()
        with progress(f"writing {image.name} to {device}", total) as p:
            _write_mapped(image, bmap, device, fd, p.update, cancelled)
            _drop_cache(fd)
        t1 = time.monotonic()
        with open(image, "rb") as src, progress(f"reading {device} back", total) as p:
            for start, end, digest in _ranges(bmap):
                want = digest if (digest and bmap.checksum) else _hash_image(src, start, end)
                if _read_range(fd, start, end, p.update) != want:
                    raise BuildError(
                        f"{device}: bytes {start}-{end} read back differ from the image: the "
                        "card is faulty or was pulled; use another card"
                    )
        t2 = time.monotonic()
        done = True
        return {"bytes": total, "write_s": t1 - t0, "verify_s": t2 - t1}
    except OSError as e:
        raise BuildError(
            f"{device}: {e.strerror} while writing: the card was pulled out or is faulty"
        ) from None
    finally:
        os.close(fd)
        if not done:
            _zero_head(device)


def _hash_image(src, start: int, end: int) -> str:
    h = hashlib.sha256()
    src.seek(start)
    left = end - start
    while left:
        data = src.read(min(CHUNK, left))
        if not data:
            break
        h.update(data)
        left -= len(data)
    return h.hexdigest()


def new_removable_disk(before: set[str], devices: dict[str, BlockDevice]) -> BlockDevice | None:
    """A whole removable disk that was not there `before` (a card just put in a reader)."""
    for d in devices.values():
        if d.parent is None and d.removable and d.size > 0 and d.path not in before:
            return d
    return None


def card_paths(devices: dict[str, BlockDevice]) -> set[str]:
    return {d.path for d in devices.values() if d.parent is None and d.removable and d.size > 0}


def settle() -> None:
    """Let udev finish with a disk that just appeared or was written (partitions re-read)."""
    subprocess.run(["udevadm", "settle", "--timeout=10"], capture_output=True, check=False)


def wait_for_card(
    before: set[str],
    list_devices: Callable[[], dict[str, BlockDevice]],
    *,
    sleep: Callable[[float], None],
    poll_s: float = 1.0,
) -> BlockDevice:
    """Poll until a removable disk that is not in `before` appears (Ctrl-C stops)."""
    while True:
        found = new_removable_disk(before, list_devices())
        if found is not None:
            return found
        sleep(poll_s)


def wait_for_removal(
    path: str,
    list_devices: Callable[[], dict[str, BlockDevice]],
    *,
    sleep: Callable[[float], None],
    poll_s: float = 1.0,
) -> None:
    """Poll until the card at `path` is out (its disk gone, or a reader's disk of size 0)."""
    while path in card_paths(list_devices()):
        sleep(poll_s)
