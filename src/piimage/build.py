"""Orchestration: decide everything first (inventory, stages, rendered files, tools), then
fetch the base image, stamp every node in one libguestfs launch, and publish the outputs.

    base image ──► node overlays (qcow2 on the cached base) ──► stamped in one appliance ──► out/<cluster>/
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from . import fetch, identify, lock, render, settings
from .disk import overlay as cow_overlay
from .errors import BuildError, UserError
from .fsutil import allocated, ensure_space, exclusive, filled_up, out_of_space, temp_pid
from .image import GuestSession, _import_guestfs
from .inventory import Cluster, Node
from .keys import KeyPair, cluster_ssh_key, munge_key, node_host_key
from .layers import ensure_layers, layer_info
from .layers import inputs_for as layer_inputs
from .log import lines_only, log
from .output import (
    COMPRESSORS,
    compress,
    publish_image,
    sidecar,
    update_manifest,
    write_bmap,
    write_imager_repo,
    write_sha256sums,
)
from .profiles import Profile, effective
from .run import require_tools, terminate_all
from .settings import data_dir
from .stages import NodePlan, Stage, discover, plan_node
from .stamp import Admin, node_disk_id, stamp


@dataclass(frozen=True)
class ClusterKeys:
    """The cluster's keys (made once into the secrets directory, then reused): read by
    preflight(), only rendered by plan()."""

    hosts: Mapping[str, KeyPair]  # by hostname, for every node of the cluster
    cluster_ssh: KeyPair
    munge: bytes = field(repr=False)


@dataclass(frozen=True)
class PlannedNode:
    """One node of a build: who it is, the profile it is built with, what its stamp writes."""

    node: Node
    profile: Profile  # the effective profile (profiles.effective): its layer's packages
    stamp: NodePlan

    @property
    def hostname(self) -> str:
        return self.node.hostname


@dataclass(frozen=True)
class BuildPlan:
    cluster: Cluster
    base_spec: fetch.BaseSpec
    stages: tuple[Stage, ...]
    nodes: tuple[PlannedNode, ...]
    out_dir: Path
    keep_workspace: bool = False
    compress: str = "none"
    url_base: str | None = None
    update_base: bool = False  # --update-base: resolve the base anew, not the locked one
    base_from_inventory: bool = True  # False with --base: the lock is neither used nor written

    @property
    def profiles(self) -> dict[str, Profile]:
        """By hostname: the effective profile (profiles.effective): the role's, plus slurmd where
        runs_jobs asks and slurmdbd where accounting does."""
        return {p.hostname: p.profile for p in self.nodes}


def preflight(cluster: Cluster, *, compress: str = "none") -> ClusterKeys:
    """What must hold, or be made, before a plan: the host tools, libguestfs, the cluster's
    keys (generated on first use into the secrets directory). plan() itself touches nothing."""
    tools = ["qemu-img", "cp", "bmaptool"]
    if compress != "none":
        tools.append(COMPRESSORS[compress][1][0])
    require_tools(tools)
    _import_guestfs()
    return cluster_keys(cluster)


def cluster_keys(cluster: Cluster) -> ClusterKeys:
    d = cluster.secrets_dir
    return ClusterKeys(
        hosts={n.hostname: node_host_key(d, n.hostname) for n in cluster.nodes},
        cluster_ssh=cluster_ssh_key(d, cluster.name),
        munge=munge_key(d),
    )


def stand_in_keys(cluster: Cluster, variant: int = 0) -> ClusterKeys:
    """Keys of the right shape that are nobody's, for planning without the secrets directory
    (`piimage check` renders every node's plan with them; nothing is generated or read).
    Another `variant` gives other keys: what differs between two such plans holds keys."""
    body = "AB"[variant % 2] * 43
    pub = f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{body}"
    pair = KeyPair(f"not a key {variant}\n".encode(), pub)
    return ClusterKeys(
        hosts={n.hostname: pair for n in cluster.nodes},
        cluster_ssh=pair,
        munge=bytes([variant]) * 32,
    )


def plan(
    cluster: Cluster,
    nodes: tuple[Node, ...],
    *,
    keys: ClusterKeys,
    out_dir: Path,
    base: str | None = None,
    keep_workspace: bool = False,
    compress: str = "none",
    url_base: str | None = None,
    update_base: bool = False,
) -> BuildPlan:
    """Everything that can be decided without touching an image: a typo costs milliseconds.
    Pure: reads the stages and nothing else, writes nothing, needs no host tool."""
    if base:
        spec = fetch.parse_base_spec(base, None, relative_to=Path.cwd())
    else:
        spec = fetch.parse_base_spec(
            cluster.base, cluster.base_sha256, relative_to=cluster.base_dir
        )
    roles = cluster.roles
    for n in nodes:
        if n.role not in roles:
            raise UserError(
                f"no node profile for role '{n.role}' (known: {', '.join(sorted(roles))})"
            )
    stage_list = discover([data_dir() / "stages", *cluster.stages])
    shared = render.cluster_context(cluster)
    host_public = {h: k.public for h, k in keys.hosts.items()}
    planned = []
    for node in nodes:
        profile = effective(roles[node.role], node.runs_jobs, cluster.accounting)
        ctx = render.node_context(
            cluster,
            node,
            packages=profile.packages,
            shared=shared,
            disk_id=node_disk_id(cluster.name, node.hostname),
            host_keys=host_public,
            cluster_ssh_public=keys.cluster_ssh.public,
        )
        node_secrets = {
            "ssh_host_ed25519_key": keys.hosts[node.hostname].private,
            "cluster_ssh_key": keys.cluster_ssh.private,
            "munge.key": keys.munge,
        }
        p = plan_node(stage_list, ctx, hostname=node.hostname, role=node.role, secrets=node_secrets)
        p = p.with_items(
            enable=tuple(dict.fromkeys([*p.enable, *profile.enable])),
            disable=tuple(dict.fromkeys([*p.disable, *profile.disable])),
        )
        planned.append(PlannedNode(node, profile, p))
    return BuildPlan(
        cluster,
        spec,
        tuple(stage_list),
        tuple(planned),
        out_dir,
        keep_workspace,
        compress,
        url_base,
        update_base,
        base_from_inventory=not base,
    )


def _clean_stale_outputs(out: Path) -> None:
    """Half-written files in the output folder (fsutil.temp_name: `.<name>.partial-<pid>`)
    of builds that were killed outright; called holding the folder's build lock."""
    for f in out.iterdir() if out.is_dir() else ():
        pid = temp_pid(f.name)
        if pid is not None and not Path(f"/proc/{pid}").exists():
            log.warning("removing %s from %s, left by a build that was killed", f.name, out)
            with contextlib.suppress(OSError):
                f.unlink()


def _clean_stale_workspaces(root: Path) -> None:
    """Workspaces of builds that were killed outright (SIGKILL, power loss)."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


@dataclass(frozen=True)
class _NodeJob:
    """One node while it is built: its plan, the role layer under it, its overlay."""

    planned: PlannedNode
    layer: Path
    overlay: Path


class Publisher:
    """Converts, checksums, compresses and maps node images — one job per core — while the
    appliance goes on stamping the next nodes. On a failure or Ctrl-C the other jobs are
    stopped and every job removes its half-written file."""

    def __init__(self, bp: BuildPlan, out: Path, published: list[Path]):
        self.bp, self.out, self.published = bp, out, published
        self.abort = threading.Event()
        self.workers = max(1, min(len(bp.nodes), os.cpu_count() or 1))
        self.futures: dict = {}

    def __enter__(self) -> Publisher:
        self._stack = ExitStack()
        if self.workers > 1:
            self._stack.enter_context(lines_only())
        self.pool = self._stack.enter_context(ThreadPoolExecutor(self.workers))
        return self

    def submit(self, job: _NodeJob, written: list) -> None:
        self.futures[self.pool.submit(self._job, job, written)] = job.planned.hostname

    def _job(self, job: _NodeJob, written: list) -> tuple[list[Path], dict]:
        p = job.planned.stamp
        final = self.out / f"{p.hostname}.img"
        _remove_stale_derivatives(final)
        files: list[Path] = []
        try:
            digest = publish_image(job.overlay, final, self.abort)
            files.append(final)
            if self.abort.is_set():
                raise BuildError("stopped")
            packed = compress(final, self.bp.compress)
            if packed is not None:
                files.append(packed)
            if self.abort.is_set():
                raise BuildError("stopped")
            files.append(write_bmap(final))
        except BaseException as e:
            # a stopped build publishes nothing: not even an image that was complete when the
            # interrupt came, since the manifest and SHA256SUMS will not name it
            _unlink_all(files)
            if out_of_space(e):
                need = allocated(job.layer) + allocated(job.overlay)
                if self.bp.compress != "none":
                    need = int(need * 1.6)
                raise filled_up(self.out, need, f"writing {final.name}") from None
            raise
        log.info("wrote %s", final)
        info = layer_info(job.layer)
        return files, {
            "role": p.role,
            "image": final.name,
            "sha256": digest,
            "size": final.stat().st_size,
            # the card's identifier as flashed: Raspberry Pi OS's first boot replaces it with a
            # random one (bookworm's firstboot, trixie's initramfs), and PARTUUIDs follow
            "disk_id": node_disk_id(self.bp.cluster.name, p.hostname),
            "disk_id_after_first_boot": "random (set by Raspberry Pi OS on the card's first boot)",
            "role_layer": job.layer.name,
            "release": info.get("release"),
            # every installed package and its version, as the role layer holds them
            "packages": info.get("installed") or {},
            "release_date": time.strftime("%Y-%m-%d"),
            "files": [
                {
                    "path": w.path,
                    "sha256": w.sha256,
                    "mode": f"{w.mode:04o}",
                    "owner": w.owner,
                    "stage": w.stage,
                }
                for w in written
            ],
        }

    def results(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for fut, host in self.futures.items():
            files, entry = fut.result()
            self.published.extend(files)
            out[host] = entry
        return out

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort.set()
            terminate_all()
            for fut in self.futures:
                fut.cancel()
            wait(list(self.futures))  # every job has removed its temporary file
            for fut in self.futures:  # and the ones that had finished take back their files
                if not fut.cancelled() and fut.exception() is None:
                    _unlink_all(fut.result()[0])
        self._stack.close()


def _node_record(job: _NodeJob) -> dict:
    """A node as its layer makes it: role, Debian release, Slurm release (lock.py)."""
    info = layer_info(job.layer)
    return {
        "role": job.planned.stamp.role,
        "release": info.get("release"),
        "slurm": lock.slurm_release(info.get("installed") or {}),
    }


def _unlink_all(files: list[Path]) -> None:
    """Remove published files and their .sha256 sidecars."""
    for f in files:
        f.unlink(missing_ok=True)
        sidecar(f).unlink(missing_ok=True)


def _remove_stale_derivatives(image: Path) -> None:
    """A new .img makes the previous build's .img.xz/.zst/.gz and their sidecars wrong."""
    for suffix in (".xz", ".zst", ".gz"):
        for p in (
            image.with_name(image.name + suffix),
            sidecar(image.with_name(image.name + suffix)),
        ):
            p.unlink(missing_ok=True)


def execute(bp: BuildPlan) -> list[Path]:
    """Build the plan: one build at a time for an output folder and for a cluster's lock file
    (another piimage on them is waited for, so neither loses what the other writes into
    manifest.json, SHA256SUMS or piimage.lock); role layers are shared and locked each."""
    lockfile = lock.lock_path(bp.cluster.source)
    out = bp.out_dir / bp.cluster.name
    with ExitStack() as held:
        for what in sorted({str(out.absolute()), *([str(lockfile)] if lockfile else [])}):
            key = hashlib.sha256(what.encode()).hexdigest()[:16]
            held.enter_context(
                exclusive(
                    settings.cache_dir() / "locks" / f"{key}.lock",
                    on_wait=lambda w=what: log.info(
                        "another piimage is building into %s; waiting for it to finish", w
                    ),
                )
            )
        return _execute(bp, lockfile, out)


def _execute(bp: BuildPlan, lockfile: Path | None, out: Path) -> list[Path]:
    t0 = time.monotonic()
    locked = lock.read(lockfile) if lockfile else None
    spec = bp.base_spec
    if bp.base_from_inventory:
        spec = lock.locked_spec(locked, spec, update=bp.update_base)
    base = fetch.fetch_base(spec)
    log.info("base image: %s (sha256 %s…)", base.name, base.sha256[:12])
    out.mkdir(parents=True, exist_ok=True)
    _clean_stale_outputs(out)
    work_root = settings.cache_dir() / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    _clean_stale_workspaces(work_root)
    published: list[Path] = []
    with ExitStack() as stack:
        ws = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=work_root))
        if bp.keep_workspace:
            log.info("workspace kept at %s", ws)
        else:
            stack.callback(shutil.rmtree, ws, ignore_errors=True)
        inputs = {
            pn.hostname: layer_inputs(pn.profile, list(bp.stages), base.sha256) for pn in bp.nodes
        }
        # nodes with the same profile share one layer; different layers are built side by side
        by_key = ensure_layers(
            base,
            {i.key(): i for i in inputs.values()},
            list(bp.stages),
            apt_proxy=bp.cluster.apt.proxy,
            apt_mirrors=bp.cluster.apt.mirrors(),
        )
        jobs = [
            _NodeJob(pn, by_key[inputs[pn.hostname].key()], ws / f"{pn.hostname}.qcow2")
            for pn in bp.nodes
        ]
        # what each node will hold (its layer's release and Slurm), checked against the nodes
        # this build leaves as they are before any image is written
        building = {job.planned.hostname: _node_record(job) for job in jobs}
        head = bp.cluster.head
        lock.check_mixed(
            locked,
            building,
            head.hostname if head else None,
            {n.hostname for n in bp.cluster.nodes},
        )
        # the images take about what their layers take (the stamp adds little), and a
        # compressed copy about half that again
        room = sum(allocated(job.layer) for job in jobs) * (1.6 if bp.compress != "none" else 1.05)
        ensure_space(out, int(room), f"{len(jobs)} node image{'s' if len(jobs) != 1 else ''}")
        for job in jobs:
            cow_overlay(job.layer, job.overlay, what=f"qemu-img create for {job.planned.hostname}")
        admin = Admin(bp.cluster.admin.name, bp.cluster.admin.password_hash)
        base_record = {
            "name": base.name,
            "source": fetch.public_url(base.source),
            "sha256": base.sha256,
            "release_date": base.release_date,
        }
        with Publisher(bp, out, published) as publisher:
            with GuestSession([job.overlay for job in jobs]) as session:
                checked: set[Path] = set()  # overlays of one layer share its partition layout
                for disk, job in zip(session.disks(), jobs):  # one disk per overlay, in order
                    p = job.planned.stamp
                    log.info("stamping %s (%s)", p.hostname, p.role)
                    written = stamp(
                        disk,
                        p,
                        cluster_name=bp.cluster.name,
                        admin=admin,
                        check_layout=job.layer not in checked,
                        identity=identify.record(
                            cluster=bp.cluster.name,
                            node=p.hostname,
                            role=p.role,
                            base=base_record,
                            layer=job.layer.name,
                            layer_info=layer_info(job.layer),
                        ),
                    )
                    checked.add(job.layer)
                    # stamp() ends with a sync, which reaches the overlay file: it can be
                    # converted while the appliance stamps the next node
                    publisher.submit(job, written)
            manifest_nodes = publisher.results()
        manifest = update_manifest(
            out / "manifest.json", {"name": bp.cluster.name}, base_record, manifest_nodes
        )
        write_imager_repo(out, bp.cluster.name, manifest["nodes"], bp.url_base)
        write_sha256sums(out)
        if lockfile and bp.base_from_inventory and lock.lockable(bp.base_spec):
            lock.write(
                lockfile,
                locked,
                bp.base_spec.value,
                base,
                building,
                {n.hostname for n in bp.cluster.nodes},
            )
            log.info("locked the base and the nodes' releases in %s", lockfile)
    log.info(
        "built %d node image%s in %.0f s",
        len(bp.nodes),
        "s" if len(bp.nodes) != 1 else "",
        time.monotonic() - t0,
    )
    return published
