"""Atomic file writes and digests: nothing half-written is ever visible under its final name."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import BuildError, PiimageError

CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path, progress=None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress.update(len(chunk))
    return h.hexdigest()


def fingerprint(path: Path, sha256: str | None = None) -> dict:
    """What a cache entry was when it was made: size, modification time, SHA-256 (given when
    the maker already computed it while writing)."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or sha256_file(path)}


def damage(path: Path, made: dict | None) -> str | None:
    """How a cache entry differs from its fingerprint (None: it does not). A changed size is
    seen at once; a changed modification time costs one SHA-256 of the file, which decides.
    An entry without a fingerprint counts as damaged: nothing says what it should be."""
    if not made or not {"size", "mtime_ns", "sha256"} <= set(made):
        return "has no record of what it should be"
    st = path.stat()
    if st.st_size != made["size"]:
        return f"is {st.st_size} bytes, not the {made['size']} it was made with"
    if st.st_mtime_ns != made["mtime_ns"] and sha256_file(path) != made["sha256"]:
        return "was changed after it was made (its SHA-256 differs)"
    return None


def allocated(path: Path) -> int:
    """The bytes a (sparse) file really takes on its disk."""
    return path.stat().st_blocks * 512


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def ensure_space(folder: Path, needed: int, what: str) -> None:
    """Refuse, before any of it is written, work that needs more room than `folder`'s
    filesystem has free (a full disk half-way would leave the work undone and the disk full)."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise BuildError(
            f"{folder}: not enough free space for {what}: it needs about {_gib(needed)}, "
            f"{_gib(free)} is free",
            hint="free some space there, or point piimage elsewhere (--out for images, "
            "$PIIMAGE_CACHE for downloads and layers)",
        )


def out_of_space(e: BaseException) -> bool:
    """`e` says the disk filled up: ENOSPC from Python, or a tool's "No space left on device"."""
    import errno

    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    text = f"{getattr(e, 'message', '')}\n{getattr(e, 'detail', '') or ''}"
    return "No space left on device" in text


FULL_MARGIN = 16 << 20  # less free than this after a failure: the disk is what failed


class DiskFull(BuildError):
    """The disk under the work filled up while it ran (filled_up's error)."""


def full_now(folder: Path) -> bool:
    """`folder`'s filesystem has (next to) no room left."""
    try:
        return shutil.disk_usage(folder).free < FULL_MARGIN
    except OSError:
        return False


@contextmanager
def blame_a_full_disk(folder: Path, needed: int, what: str) -> Iterator[None]:
    """Work writing into `folder`, whose failure while the disk there is full is the full
    disk's (filled_up). Work inside a loop-mounted image never sees ENOSPC when the disk under
    the image fills up: the kernel reports write errors and the filesystem in the image turns
    read-only, so whatever then fails (apt, a script) is put down to the disk by looking at
    it, before the half-written file is removed (so enter this inside atomic_path)."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, PiimageError) as e:
        if not (out_of_space(e) or full_now(folder)):
            raise
        said = e.message if isinstance(e, PiimageError) else str(e)
        raise filled_up(folder, needed, what, said) from None


def filled_up(folder: Path, needed: int, what: str, detail: str | None = None) -> BuildError:
    """The error for a disk that filled up in the middle of `what` (ensure_space's message
    for work that found the room gone while it ran); `detail`: what the work itself said."""
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    return DiskFull(
        f"{folder}: the disk filled up while {what}: it needs about {_gib(needed)}, "
        f"{_gib(free)} is free now; what was half-written is removed",
        hint="free some space there, or point piimage elsewhere (--out for images, "
        "$PIIMAGE_CACHE for downloads and layers)",
        detail=detail,
    )


def temp_name(final: Path) -> Path:
    """A hidden sibling name for building `final` in place before an os.replace."""
    return final.with_name(f".{final.name}.partial-{os.getpid()}")


def temp_pid(name: str) -> int | None:
    """The pid in a temp_name() file name; None for any other name."""
    _, sep, pid = name.rpartition(".partial-")
    return int(pid) if name.startswith(".") and sep and pid.isdigit() else None


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it to `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_atomic(final: Path, data: bytes | str, mode: int = 0o644) -> None:
    if isinstance(data, str):
        data = data.encode()
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Cancelled(Exception):
    """A wait for a lock given up because the work it waited for is being stopped."""


@contextmanager
def exclusive(
    lock_file: Path,
    *,
    on_wait: Callable[[], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    poll: float = 0.5,
) -> Iterator[None]:
    """Hold an advisory lock (flock) on `lock_file` for the block, so that a second process
    making the same thing waits for the first and then finds it made, instead of doing the
    work twice. `on_wait` is called once if another holder makes us wait; `cancelled` is
    polled while waiting (Cancelled is raised when it says so). The lock goes with the
    process, so a killed holder never leaves it taken."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        waited = False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and on_wait is not None:
                    on_wait()
                waited = True
                if cancelled is not None and cancelled():
                    raise Cancelled(f"gave up waiting for {lock_file}") from None
                time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
