"""Which node a card or an image is: the identity the build writes into every image
(stamp.IDENTITY, JSON), read back by `piimage inspect` from an image, a compressed image or a
flashed card, read-only; with an inventory, what differs from what a build would now write.

The identity is what the build knew (cluster, node, role, base, piimage's version, when);
the versions of the key packages are read from the card's own dpkg status, so a card that was
upgraded after flashing says what it runs now, not what it was built with.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, settings
from .errors import BuildError, UserError
from .fsutil import ensure_space
from .image import GuestSession
from .layers import installed_packages
from .log import log
from .stamp import IDENTITY

FORMAT = 1
# the packages a cluster owner asks about first, in this order (those the card has)
KEY_PACKAGES = (
    "slurmctld",
    "slurmd",
    "slurmdbd",
    "slurm-client",
    "munge",
    "openmpi-bin",
    "python3-mpi4py",
    "nfs-kernel-server",
    "nfs-common",
    "chrony",
)
DECOMPRESSORS = {".xz": ["xz", "-dc"], ".zst": ["zstd", "-dcq"], ".gz": ["gzip", "-dc"]}
MAX_DIFF_LINES = 40  # of one file's diff, in the text report


def key_packages(installed: dict[str, str]) -> dict[str, str]:
    return {p: installed[p] for p in KEY_PACKAGES if p in installed}


def record(
    *,
    cluster: str,
    node: str,
    role: str,
    base: dict,
    layer: str,
    layer_info: dict,
    now: float | None = None,
) -> bytes:
    """The identity a build writes into one node's image."""
    installed = layer_info.get("installed") or {}
    doc = {
        "format": FORMAT,
        "cluster": cluster,
        "node": node,
        "role": role,
        "piimage": __version__,
        "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "base": base,
        "release": layer_info.get("release"),
        "role_layer": layer,
        "packages": key_packages(installed),
    }
    return (json.dumps(doc, indent=2) + "\n").encode()


@dataclass
class Drift:
    """One planned file that the card does not hold as a build would now write it."""

    path: str
    problem: str  # "missing", "differs", "mode"
    diff: list[str] = field(default_factory=list)  # unified diff lines (text files)


@dataclass
class Inspected:
    target: str
    identity: dict
    packages: dict[str, str]  # key packages, from the card's dpkg status
    os_release: str | None
    drift: list[Drift] | None = None  # None: no inventory given
    drift_skipped: int = 0  # planned files that hold keys or secrets: not compared

    def to_json(self) -> dict:
        out = {
            "target": self.target,
            "identity": self.identity,
            "packages": self.packages,
            "os_release": self.os_release,
        }
        if self.drift is not None:
            out["drift"] = [d.__dict__ for d in self.drift]
            out["drift_not_compared"] = self.drift_skipped
        return out


def _kind(target: Path) -> str:
    try:
        st = target.stat()
    except FileNotFoundError:
        raise UserError(f"{target}: no such file or device") from None
    except OSError as e:
        raise UserError(f"{target}: {e.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        return "device"
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{target}: not an image file or a block device")
    if target.suffix in DECOMPRESSORS:
        return "compressed"
    return "raw"


@contextmanager
def _readable(targets: Sequence[Path]) -> Iterator[list[Path]]:
    """The drives to open: raw images and devices as they are, compressed images unpacked
    to a temporary file in the cache (removed after)."""
    with ExitStack() as stack:
        drives = []
        for t in targets:
            if _kind(t) != "compressed":
                drives.append(t)
                continue
            tool = DECOMPRESSORS[t.suffix]
            if shutil.which(tool[0]) is None:
                raise UserError(f"{t}: unpacking it needs {tool[0]}, which is not installed")
            work = settings.cache_dir() / "work"
            work.mkdir(parents=True, exist_ok=True)
            # an image is at most ~8 times its xz here (Raspberry Pi OS Lite: ~5x)
            ensure_space(work, t.stat().st_size * 8, f"unpacking {t.name}")
            d = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-inspect-", dir=work))
            stack.callback(shutil.rmtree, d, ignore_errors=True)
            raw = d / t.stem
            log.info("unpacking %s …", t.name)
            with open(t, "rb") as src, open(raw, "wb") as dst:
                r = subprocess.run(tool, stdin=src, stdout=dst, stderr=subprocess.PIPE)
            if r.returncode != 0:
                raise BuildError(
                    f"{t}: {tool[0]} could not unpack it: "
                    f"{r.stderr.decode(errors='replace').strip()[-300:]}"
                )
            drives.append(raw)
        yield drives


def inspect(targets: Sequence[Path], planned: dict[str, list] | None = None) -> list[Inspected]:
    """Read each target's identity and key packages (one appliance for all, read-only); with
    `planned` (hostname -> (files, not_compared)), compare the node's planned files."""
    results = []
    with _readable(targets) as drives, GuestSession(drives, readonly=True) as session:
        for target, disk in zip(targets, session.disks()):
            disk.mount(readonly=True)
            try:
                raw = disk.read_if_exists(IDENTITY)
                if raw is None:
                    raise UserError(
                        f"{target}: holds no {IDENTITY}: not an image that piimage built "
                        "(or one built before piimage 0.1 wrote it)"
                    )
                try:
                    identity = json.loads(raw)
                    node = identity["node"]
                except (ValueError, KeyError, TypeError):
                    raise BuildError(f"{target}: {IDENTITY} is damaged") from None
                status = disk.read_if_exists("/var/lib/dpkg/status") or b""
                packages = key_packages(installed_packages(status.decode("utf-8", "replace")))
                osr = _pretty_name(disk.read_if_exists("/etc/os-release"))
                item = Inspected(str(target), identity, packages, osr)
                if planned is not None:
                    if node not in planned:
                        raise UserError(
                            f"{target}: is node '{node}', which the inventory does not have"
                        )
                    files, skipped = planned[node]
                    item.drift = _drift(disk, files)
                    item.drift_skipped = skipped
                results.append(item)
            finally:
                disk.umount()
    return results


def _pretty_name(text: bytes | None) -> str | None:
    for ln in (text or b"").decode("utf-8", "replace").splitlines():
        if ln.startswith("PRETTY_NAME="):
            return ln.split("=", 1)[1].strip().strip('"')
    return None


def _drift(disk, files) -> list[Drift]:
    out = []
    for f in files:
        have = disk.read_if_exists(f.path)
        if have is None:
            out.append(Drift(f.path, "missing"))
            continue
        if have != f.data:
            diff = list(
                difflib.unified_diff(
                    have.decode("utf-8", "replace").splitlines(),
                    f.data.decode("utf-8", "replace").splitlines(),
                    "on the card",
                    "from the inventory",
                    lineterm="",
                    n=0,
                )
            )
            out.append(Drift(f.path, "differs", diff))
            continue
        mode = disk.stat(f.path)["st_mode"] & 0o7777 if not disk.on_boot(f.path) else f.mode
        if mode != f.mode:
            out.append(
                Drift(f.path, "mode", [f"mode {mode:04o}, the inventory gives {f.mode:04o}"])
            )
    return out


def comparable(a_files, b_files) -> tuple[list, int]:
    """The planned files to compare with a card: those two plans with different stand-in keys
    agree on (keys and secrets are not known here and never read); and how many were left out."""
    b = {f.path: f for f in b_files}
    keep = [f for f in a_files if not f.secret and f.path in b and b[f.path].data == f.data]
    return keep, len(a_files) - len(keep)


def text_report(item: Inspected) -> list[str]:
    i = item.identity
    lines = [f"{item.target}: node {i.get('node')} of cluster {i.get('cluster')} ({i.get('role')})"]
    lines.append(f"  built     {i.get('built')} by piimage {i.get('piimage')}")
    base = i.get("base") or {}
    sha = str(base.get("sha256") or "")
    lines.append(
        f"  base      {base.get('name')}"
        + (f", released {base['release_date']}" if base.get("release_date") else "")
        + (f", sha256 {sha[:16]}…" if sha else "")
    )
    lines.append(f"  system    {item.os_release or '?'} (Debian {i.get('release') or '?'})")
    lines.append(f"  layer     {i.get('role_layer')}")
    if item.packages:
        width = max(len(p) for p in item.packages)
        for n, (p, v) in enumerate(item.packages.items()):
            lines.append(f"  {'packages' if n == 0 else '':<9} {p:<{width}} {v}")
    else:
        lines.append("  packages  none of Slurm, munge, Open MPI, mpi4py")
    if item.drift is not None:
        if not item.drift:
            lines.append(
                "  drift     none: every file a build would write now is the same on it"
                + (
                    f" ({item.drift_skipped} that hold keys not compared)"
                    if item.drift_skipped
                    else ""
                )
            )
        else:
            n = len(item.drift)
            lines.append(
                f"  drift     {n} {'file differs' if n == 1 else 'files differ'} "
                "from what a build would write now:"
            )
            for d in item.drift:
                lines.append(f"    {d.path}: {d.problem}")
                shown = [ln for ln in d.diff if not ln.startswith(("---", "+++", "@@"))]
                for ln in shown[:MAX_DIFF_LINES]:
                    lines.append(f"      {ln}")
                if len(shown) > MAX_DIFF_LINES:
                    lines.append(f"      … {len(shown) - MAX_DIFF_LINES} more lines")
    return lines
