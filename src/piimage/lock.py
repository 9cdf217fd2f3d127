"""piimage.lock, beside cluster.yaml: the base image a cluster's builds use and what each node's
last build holds, so that a node built months later runs the Slurm its cluster runs.

The first build writes it. Later builds use the locked image (its URL and SHA-256, from the
download cache when it is there) for as long as cluster.yaml names the same `base:`; changing
`base:` or `piimage build --update-base` takes the newest one and locks that. A build whose
nodes would run Slurm releases that cannot work together, counting the nodes it does not
rebuild as the lock says they are, is refused before any image is written.

Only bases that can change under the same name are locked: an Imager name, or a URL without
`base_sha256` (a local file, or a base with its digest given, is already exact).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError
from .fetch import BaseImage, BaseSpec
from .fsutil import write_atomic
from .log import log

LOCK_NAME = "piimage.lock"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

# Slurm's compatibility window (doc/html/upgrades.shtml of 24.11.5, SLURM-FACTS.md section 10):
# each release and the older ones whose daemons and state it still talks to. The controller must
# be the newest: a slurmd newer than its slurmctld is refused upstream too.
SLURM_TALKS_TO = {
    "22.05": ("21.08", "20.11"),
    "23.02": ("22.05", "21.08"),
    "23.11": ("23.02", "22.05"),
    "24.05": ("23.11", "23.02"),
    "24.11": ("24.05", "23.11", "23.02"),
    "25.05": ("24.11", "24.05", "23.11"),
    "25.11": ("25.05", "24.11", "24.05"),
}
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client")  # any of them gives the version


@dataclass
class Lock:
    path: Path
    base: dict  # asked, name, url, sha256, release_date
    nodes: dict[str, dict] = field(default_factory=dict)  # host -> role, release, slurm, built


def lock_path(cluster_source: Path | None) -> Path | None:
    """Where a cluster's lock lives: beside its cluster.yaml (none for the built-in example)."""
    return cluster_source.parent / LOCK_NAME if cluster_source is not None else None


def lockable(spec: BaseSpec) -> bool:
    return spec.kind == "imager" or (spec.kind == "url" and spec.sha256 is None)


def read(path: Path) -> Lock | None:
    """The lock at `path`, or None when there is none. A damaged lock is an error naming the
    file and the key (delete it to start again from the newest base)."""
    if not path.exists():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(
            f"{path}: cannot read the lock: {str(e).splitlines()[0]}",
            hint=f"remove {path.name} to lock the newest base again",
        ) from None

    def bad(key: str, why: str) -> UserError:
        return UserError(
            f"{path}: {key}: {why}", hint=f"remove {path.name} to lock the newest base again"
        )

    if not isinstance(doc, dict) or not isinstance(doc.get("base"), dict):
        raise bad("base", "missing (expected a mapping with asked, url and sha256)")
    base = doc["base"]
    for key in ("asked", "url", "sha256"):
        if not isinstance(base.get(key), str) or not base[key]:
            raise bad(f"base.{key}", "missing or not text")
    if not SHA256_RE.match(base["sha256"]):
        raise bad("base.sha256", f"'{base['sha256']}' is not 64 lowercase hexadecimal digits")
    nodes = doc.get("nodes") or {}
    if not isinstance(nodes, dict) or not all(isinstance(v, dict) for v in nodes.values()):
        raise bad("nodes", "expected a mapping of host names to mappings")
    return Lock(path, base, {str(k): v for k, v in nodes.items()})


def locked_spec(lock: Lock | None, spec: BaseSpec, *, update: bool) -> BaseSpec:
    """The base this build uses: the locked image while cluster.yaml asks for the same base
    (and --update-base was not given), else `spec` as it resolves today."""
    if lock is None or not lockable(spec):
        return spec
    if update:
        log.info("--update-base: resolving %s anew (the lock had %s)", spec.value, lock.base["url"])
        return spec
    if lock.base["asked"] != spec.value:
        log.info(
            "base: cluster.yaml now asks for %s (the lock had %s): taking it",
            spec.value,
            lock.base["asked"],
        )
        return spec
    log.info(
        "base: %s as locked in %s (--update-base takes the newest)",
        lock.base["url"],
        lock.path.name,
    )
    return BaseSpec(
        "url",
        lock.base["url"],
        lock.base["sha256"],
        name=lock.base.get("name"),
        release_date=lock.base.get("release_date"),
    )


def slurm_release(installed: dict[str, str]) -> str | None:
    """ "24.11" from the version of a Slurm package ("24.11.5-4" and the like)."""
    for pkg in SLURM_PACKAGES:
        m = re.match(r"^(?:\d+:)?(\d+\.\d+)\.", installed.get(pkg, ""))
        if m:
            return m.group(1)
    return None


def talk(controller: str, node: str) -> bool:
    """Whether a slurmd of release `node` works with a slurmctld of release `controller`."""
    return node == controller or node in SLURM_TALKS_TO.get(controller, ())


def check_mixed(
    lock: Lock | None,
    building: dict[str, dict],
    head: str | None,
    hosts: set[str],
) -> None:
    """Refuse a build after which the cluster's nodes (`hosts`: the inventory's) would run
    Slurm releases that cannot work together: the nodes of this build as `building` says
    (host -> {"slurm": release, ...}), the others as the lock says their last build was."""
    after = {h: e for h, e in (lock.nodes.items() if lock else ()) if h in hosts}
    after.update(building)
    releases = {h: e.get("slurm") for h, e in after.items() if e.get("slurm")}
    if len(set(releases.values())) <= 1:
        return
    ctl = releases.get(head) if head else None
    if ctl is None:  # no controller known: every pair must at least be one release
        wrong = sorted(releases)
        why = "they must run one Slurm release, or each node one the controller still talks to"
    else:
        wrong = sorted(h for h, r in releases.items() if h != head and not talk(ctl, r))
        why = f"the controller {head} runs Slurm {ctl}, which talks to {', '.join([ctl, *SLURM_TALKS_TO.get(ctl, ())])} only"
        if not wrong:
            return
    kept = [h for h in wrong if h not in building]
    parts = [f"{h}: Slurm {releases[h]}" + (" (as last built)" if h in kept else "") for h in wrong]
    raise UserError(
        "these nodes would run Slurm releases that cannot work together: "
        + "; ".join(parts)
        + f" ({why})",
        hint="rebuild every node from one base (piimage build --all), or build from the locked "
        "base (drop --update-base, or put the locked base: back in cluster.yaml)",
    )


def write(
    path: Path,
    lock: Lock | None,
    asked: str,
    base: BaseImage,
    building: dict[str, dict],
    hosts: set[str],
) -> None:
    """Record this build's base and nodes; the nodes it did not build keep their entries
    (those no longer in the inventory are dropped)."""
    nodes = {h: e for h, e in (lock.nodes.items() if lock else ()) if h in hosts}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for h, e in building.items():
        nodes[h] = {**e, "built": stamp}
    doc = {
        "base": {
            "asked": asked,
            "name": base.name,
            "url": base.source,
            "sha256": base.sha256,
            "release_date": base.release_date,
        },
        "nodes": dict(sorted(nodes.items())),
    }
    text = (
        "# Written by piimage build: the base image this cluster's builds use, and what each\n"
        "# node's last build holds. Keep it beside cluster.yaml (commit both); builds use this\n"
        "# base until cluster.yaml's base: changes or `piimage build --update-base` is given.\n"
        + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    )
    write_atomic(path, text)
