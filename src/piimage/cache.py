"""What the caches hold, and pruning them: `piimage cache` lists the entries (role layers, base
images, rehearsal kernels, apt's package archive) with their size on disk and when a build
last used them; `piimage cache --prune` removes role layers and base images that no build has
used for a while, oldest first, or until the caches fit a size. An entry that a build is
making or using at that moment (its lock is held) is left alone and said so.

When an entry was last used: role layers and base images record it when a build takes them
from the cache (the mtime of their description, layer .json or base info.json; `touch_used`),
so a layer made long ago and used every day is not taken for an old one.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .fsutil import Cancelled, allocated, exclusive
from .log import log

DAY = 86400
RECENT = 3600  # seconds: an unlocked entry used this recently is never pruned


@dataclass(frozen=True)
class Entry:
    kind: str  # "role layer", "base image", "rehearsal kernel", "apt archive"
    name: str
    paths: tuple[Path, ...]  # what removing it removes
    size: int  # bytes allocated on disk
    used: float  # when a build last used it (epoch seconds)
    lock: Path | None  # held while a build makes or uses it
    prunable: bool  # --prune may remove it


def touch_used(description: Path) -> None:
    """Record that a build used the entry that `description` describes (now)."""
    try:
        description.touch(exist_ok=True)
    except OSError:
        pass  # a read-only cache still works; only pruning loses the date


def _size(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(allocated(p) for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return allocated(path) if path.is_file() else 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def entries() -> list[Entry]:
    """Every entry of the caches: role layers, base images, rehearsal kernels, apt's archive."""
    out: list[Entry] = []
    layers = settings.layer_cache_dir()
    for img in sorted(layers.glob("*.img")) if layers.is_dir() else []:
        desc = img.with_suffix(".json")
        out.append(
            Entry(
                "role layer",
                img.stem,
                (img, desc),
                _size(img) + _size(desc),
                _mtime(desc) or _mtime(img),
                img.with_name(f".{img.stem}.lock"),
                True,
            )
        )
    images = settings.cache_dir() / "images"
    for d in sorted(images.iterdir()) if images.is_dir() else []:
        if d.is_dir():
            info = d / "info.json"
            out.append(
                Entry(
                    "base image",
                    d.name[:16],
                    (d,),
                    _size(d),
                    _mtime(info) or _mtime(d),
                    None,
                    True,
                )
            )
    rehearse = settings.cache_dir() / "rehearse"
    for d in sorted(rehearse.glob("kernel-*")) if rehearse.is_dir() else []:
        out.append(Entry("rehearsal kernel", d.name, (d,), _size(d), _mtime(d), None, False))
    apt = settings.apt_cache_dir()
    if apt.is_dir():
        out.append(Entry("apt archive", str(apt), (apt,), _size(apt), _mtime(apt), None, False))
    return out


def to_prune(
    found: list[Entry], *, older_than_days: float | None, max_bytes: int | None, now: float
) -> list[Entry]:
    """The prunable entries to remove: those unused for `older_than_days`, then, oldest use
    first, as many more as it takes for everything to fit in `max_bytes`."""
    # a base image has no lock: one used in the last hour may be in a build's hands right now
    prunable = sorted(
        (e for e in found if e.prunable and (e.lock or now - e.used > RECENT)),
        key=lambda e: e.used,
    )
    chosen = []
    if older_than_days is not None:
        chosen = [e for e in prunable if now - e.used > older_than_days * DAY]
    if max_bytes is not None:
        total = sum(e.size for e in found) - sum(e.size for e in chosen)
        for e in prunable:
            if total <= max_bytes:
                break
            if e not in chosen:
                chosen.append(e)
                total -= e.size
    return chosen


def prune(chosen: list[Entry], *, dry_run: bool) -> list[Entry]:
    """Remove the chosen entries, all of each, holding its lock while doing so; one whose lock
    a build holds is left, and said so. Returns those removed (or, dry, that would be)."""
    removed = []
    for e in chosen:
        try:
            # give up at once rather than wait: a held lock means a build has it in hand
            with exclusive(e.lock, cancelled=lambda: True) if e.lock else nullcontext():
                if not dry_run:
                    # the image first: a description without its image is nothing, an image
                    # without its description would be taken for a damaged one and rebuilt
                    for p in e.paths:
                        if p.is_dir() and not p.is_symlink():
                            shutil.rmtree(p)
                        else:
                            p.unlink(missing_ok=True)
        except Cancelled:
            log.warning("%s %s: a build is using it; left", e.kind, e.name)
            continue
        removed.append(e)
    return removed


def age(seconds: float) -> str:
    if seconds < 3600:
        return f"{max(seconds, 0) / 60:.0f} min ago"
    if seconds < DAY:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / DAY:.0f} days ago"


def parse_size(text: str) -> int:
    """ "20G", "500M", "1.5T", or bytes: the number of bytes (ValueError when it is none)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    factor = 1
    if t and t[-1] in "KMGT":
        factor = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    value = float(t)
    if value < 0:
        raise ValueError(text)
    return int(value * factor)
