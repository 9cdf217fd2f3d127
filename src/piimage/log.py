"""Logging to stderr (results go to stdout) and progress bars for long work."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("piimage")

_quiet = False
_bars = True  # redrawn progress bars; off while parallel jobs would interleave them


def setup(verbosity: int) -> None:
    """verbosity: -1 quiet (warnings only, no progress bars), 0 normal, 1+ debug."""
    global _quiet
    _quiet = verbosity < 0
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(message)s" if verbosity <= 0 else "%(asctime)s %(name)s: %(message)s")
    )
    root = logging.getLogger("piimage")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def human_size(n: float) -> str:
    """Bytes as people read them: "512 B", "3.2 MiB", "1.1 GiB"."""
    for u in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or u == "GiB":
            return f"{n:.0f} {u}" if u == "B" else f"{n:.1f} {u}"
        n /= 1024
    return f"{n:.1f} GiB"


class Progress:
    """A byte/step progress bar on stderr; silent when quiet or stderr is not a terminal
    (then it logs a line at start and at the end, so CI logs still show the work)."""

    def __init__(self, label: str, total: int | None, unit: str = "B"):
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0
        self._tty = sys.stderr.isatty() and not _quiet and _bars
        self._last_pct = -1
        self._t0 = time.monotonic()

    def _fmt(self, n: int) -> str:
        return human_size(n) if self.unit == "B" else f"{n} {self.unit}"

    def update(self, n: int) -> None:
        self.done += n
        if not self._tty:
            return
        if self.total:
            pct = min(100, int(self.done * 100 / self.total))
            if pct == self._last_pct:
                return
            self._last_pct = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(
                f"\r{self.label}: [{bar:<25}] {pct:3d}% {self._fmt(self.done)}{self._rate()}"
            )
        else:
            sys.stderr.write(f"\r{self.label}: {self._fmt(self.done)}")
        sys.stderr.flush()

    def _rate(self) -> str:
        """ ", 41.2 MiB/s, 0:12 left" for bytes with a total, once there is a rate to tell."""
        elapsed = time.monotonic() - self._t0
        if self.unit != "B" or not self.total or elapsed < 1 or not self.done:
            return ""
        rate = self.done / elapsed
        left = max(0, self.total - self.done) / rate
        return f", {human_size(rate)}/s, {int(left // 60)}:{int(left % 60):02d} left  "

    def close(self) -> None:
        if self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


@contextmanager
def lines_only() -> Iterator[None]:
    """Progress as log lines instead of redrawn bars (for work running in parallel)."""
    global _bars
    old, _bars = _bars, False
    try:
        yield
    finally:
        _bars = old


@contextmanager
def progress(label: str, total: int | None, unit: str = "B") -> Iterator[Progress]:
    p = Progress(label, total, unit)
    if not p._tty:
        log.info("%s …", label)
    try:
        yield p
    finally:
        p.close()
