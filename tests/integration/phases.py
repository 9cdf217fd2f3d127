"""Wall time of the suite's expensive phases, printed at the end of a run (see conftest.py's
`pytest_terminal_summary`), so every change shows what it costs: stand-in images, role layers,
rehearsals, the Docker builder. CI stops at 90 minutes and the budget is 45 (HACKING.md)."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
# (name, seconds, start): start is seconds since this process began (None: not known), so the
# table also reads as a timeline of the two lanes
PHASES: list[tuple[str, float, float | None]] = []
STARTED = time.monotonic()


def record(name: str, seconds: float, start: float | None = None) -> None:
    """A phase of `seconds`; `start` is its time.monotonic() at the beginning, if known."""
    with _lock:
        PHASES.append((name, seconds, None if start is None else start - STARTED))


@contextmanager
def timed(name: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        record(name, time.monotonic() - t0, t0)


# The disk: the least free space seen on the filesystems the suite writes to (its temporary
# folders, the kept caches), sampled after each integration test: one CI run filled its disk
# in the bookworm rehearsal (mkfs.ext4 of the modules disk: "No space left on device"), and a
# figure in every run says how close the next one comes.
# path -> (free bytes at the start, least free bytes, the test after which it was least)
DISK: dict[str, tuple[int, int, str]] = {}


def sample_disk(after: str, paths) -> None:
    import os
    import shutil

    with _lock:
        seen = set()
        for p in paths:
            try:
                dev, free = os.stat(p).st_dev, shutil.disk_usage(p).free
            except OSError:
                continue
            if dev in seen:  # another of the paths is on the same filesystem
                continue
            seen.add(dev)
            key = str(p)
            start, least, when = DISK.get(key, (free, free, "the start"))
            if free < least:
                least, when = free, after
            DISK[key] = (start, least, when)


def disk_lines() -> list[str]:
    with _lock:
        rows = sorted(DISK.items())
    return [
        f"{path}: {start / 2**30:.1f} GiB free at the start, least {least / 2**30:.1f} GiB "
        f"(after {when}), so this run used at most {(start - least) / 2**30:.1f} GiB there"
        for path, (start, least, when) in rows
    ]


_LAYER_BUILT = re.compile(r"role layer (\S+): built in (\d+) s")


def record_piimage(args: list[str], stderr: str, seconds: float, start: float) -> None:
    """A piimage run of a test that began at time.monotonic() `start`: the role layers it
    built (from its log), and the run itself when it is one of the expensive commands."""
    what = " ".join(args)
    for m in _LAYER_BUILT.finditer(stderr):
        record(f"role layer {m.group(1)} (in: piimage {what})", float(m.group(2)))
    if args and args[0] in ("build", "rehearse"):
        record(f"piimage {what}", seconds, start)


def export() -> list[tuple[str, float, float | None]]:
    """This process's phases and its wall time, for a pytest-xdist worker to hand over."""
    with _lock:
        rows = list(PHASES)
    return [*rows, ("wall time of this worker", time.monotonic() - STARTED, 0.0)]


def export_disk() -> dict[str, list]:
    with _lock:
        return {k: list(v) for k, v in DISK.items()}


def merge(rows, worker: str, disk=None) -> None:
    """A worker's phases (from export()), each name marked with the worker (a worker starts
    within a second or two of the controller, so its start times are kept as they are), and
    its disk samples (export_disk(); both workers see the same filesystems, so the least free
    of the two is the run's)."""
    with _lock:
        for name, secs, start in rows:
            PHASES.append((f"[{worker}] {name}", float(secs), start))
        for path, (start, least, when) in (disk or {}).items():
            s0, l0, w0 = DISK.get(path, (start, least, when))
            if least <= l0:
                l0, w0 = least, f"[{worker}] {when}"
            DISK[path] = (max(s0, start), l0, w0)


def summary() -> list[str]:
    """Lines for the end of the run, longest first, each with the time it began ("at"), and
    the session's wall time."""
    with _lock:
        rows = sorted(PHASES, key=lambda r: -r[1])
    lines = [
        f"{secs:8.0f} s  {'' if start is None else f'at {start:5.0f} s  '}{name}"
        for name, secs, start in rows
    ]
    lines.append(f"{time.monotonic() - STARTED:8.0f} s  wall time of the pytest session")
    return lines
