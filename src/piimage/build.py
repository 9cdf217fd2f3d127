"""Orchestration: decide everything first (inventory, stages, rendered files, tools), then
fetch the base image, stamp every node in one libguestfs launch, and publish the outputs.

    base image ──► node overlays (qcow2 on the cached base) ──► stamped in one appliance ──► out/<cluster>/
"""

from __future__ import annotations

import os
import shutil
import threading
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import fetch, keys, settings
from .errors import BuildError, UserError
from .image import GuestSession, _import_guestfs
from .inventory import Cluster, Node
from .log import lines_only, log
from .output import (COMPRESSORS, compress, publish_image, update_manifest, write_bmap, write_imager_repo,
                     write_sha256sums)
from .run import require_tools, run, terminate_all
from .layers import ensure_layer
from .layers import inputs_for as layer_inputs
from .profiles import Profile, load_profiles
from .stages import NodePlan, Stage, discover, plan_node
from .stamp import Admin, node_disk_id, stamp


def data_dir() -> Path:
    """Where `stages/` and `node-profiles/` live: $PIIMAGE_DATA_DIR, else the source checkout."""
    env = os.environ.get("PIIMAGE_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2])
    for c in candidates:
        if (c / "stages").is_dir() and (c / "node-profiles").is_dir():
            return c
    raise UserError("cannot find piimage's stages/ and node-profiles/", hint="set PIIMAGE_DATA_DIR to the piimage checkout")


def profile_dirs(cluster: Cluster) -> list[Path]:
    """Ours, then a `node-profiles/` folder beside the user's cluster.yaml (their own roles)."""
    dirs = [data_dir() / "node-profiles"]
    if cluster.source is not None:
        dirs.append(cluster.source.parent / "node-profiles")
    return dirs


@dataclass(frozen=True)
class BuildPlan:
    cluster: Cluster
    base_spec: fetch.BaseSpec
    stages: tuple[Stage, ...]
    profiles: dict[str, Profile]  # by hostname: the role's profile, plus slurmd where runs_jobs asks
    nodes: tuple[NodePlan, ...]
    out_dir: Path
    keep_workspace: bool = False
    compress: str = "none"
    url_base: str | None = None


def _systemd_path_unit(path: str) -> str:
    """systemd-escape --path: /clusterfs -> clusterfs, /srv/my-data -> srv-my\\x2ddata."""
    parts = [p for p in path.strip("/").split("/") if p]
    out = []
    for part in parts:
        esc = "".join(c if (c.isalnum() or c in "_.:") and not (i == 0 and c == ".") else f"\\x{ord(c):02x}"
                      for i, c in enumerate(part))
        out.append(esc)
    return "-".join(out) or "-"


def node_context(cluster: Cluster, node: Node, profile: Profile, host_keys: dict[str, str],
                 cluster_ssh_public: str) -> dict[str, Any]:
    """The plain data every template sees (STYLE.md: data in, data out)."""
    net = cluster.network

    def hw(n: Node) -> dict[str, Any]:
        h = getattr(n, "hardware", None) or cluster.hardware
        return {"model": h.model, "cpus": h.cpus, "memory_mb": h.memory_mb}

    def nd(n: Node) -> dict[str, Any]:
        return {"hostname": n.hostname, "role": n.role, "ip": str(n.ip), **hw(n)}

    nodes = [nd(n) for n in cluster.nodes]
    head = next((x for x in nodes if x["role"] == "head"), None)
    this = dict(next(x for x in nodes if x["hostname"] == node.hostname))
    this["nm_uuid"] = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.hostname}.{cluster.name}.piimage"))
    this["disk_id"] = node_disk_id(cluster.name, node.hostname)
    cu = cluster.cluster_user
    return {
        "cluster": {"name": cluster.name, "timezone": cluster.timezone},
        "network": {
            "subnet": str(net.subnet),
            "prefixlen": net.subnet.prefixlen,
            "gateway": str(net.gateway),
            "dns": [str(d) for d in net.dns],
            "interface": net.interface,
        },
        "admin": {
            "name": cluster.admin.name,
            "home": f"/home/{cluster.admin.name}",
            "group": cluster.admin.name,
            "ssh_authorized_keys": list(cluster.admin.ssh_authorized_keys),
        },
        "hardware": {"model": cluster.hardware.model, "cpus": cluster.hardware.cpus,
                     "memory_mb": cluster.hardware.memory_mb, "poe_hat": cluster.hardware.poe_hat},
        "nodes": nodes,
        "node": this,
        "head": head,
        "compute_nodes": [x for x, n in zip(nodes, cluster.nodes) if n.runs_jobs],
        "partition": "cluster",
        "role": node.role,
        "packages": list(profile.packages),
        "shared": {"path": cluster.shared.path, "device_uuid": cluster.shared.device_uuid,
                   "unit": _systemd_path_unit(cluster.shared.path)},
        "cluster_user": {"name": cu.name, "uid": cu.uid, "home": f"/home/{cu.name}"},
        "host_keys": host_keys,
        "cluster_ssh_public": cluster_ssh_public,
    }


def plan(cluster: Cluster, nodes: tuple[Node, ...], *, out_dir: Path, base: str | None = None,
         keep_workspace: bool = False, compress: str = "none", url_base: str | None = None) -> BuildPlan:
    """Everything that can be decided without touching an image: a typo costs milliseconds."""
    tools = ["qemu-img", "cp", "bmaptool"]
    if compress != "none":
        tools.append(COMPRESSORS[compress][1][0])
    require_tools(tools)
    _import_guestfs()
    if base:
        spec = fetch.parse_base_spec(base, None, relative_to=Path.cwd())
    else:
        spec = fetch.parse_base_spec(cluster.base, cluster.base_sha256, relative_to=cluster.base_dir)
    profiles = load_profiles(profile_dirs(cluster))
    for n in nodes:
        if n.role not in profiles:
            raise UserError(f"no node profile for role '{n.role}' (known: {', '.join(sorted(profiles))})")
    stage_list = discover([data_dir() / "stages", *cluster.stages])
    node_profiles = {n.hostname: _profile_for(n, profiles[n.role]) for n in nodes}
    host_keys = {n.hostname: keys.node_host_key(cluster.secrets_dir, n.hostname) for n in cluster.nodes}
    cluster_key = keys.cluster_ssh_key(cluster.secrets_dir, cluster.name)
    munge = keys.munge_key(cluster.secrets_dir)
    plans = []
    for node in nodes:
        profile = node_profiles[node.hostname]
        ctx = node_context(cluster, node, profile, {h: k.public for h, k in host_keys.items()}, cluster_key.public)
        node_secrets = {
            "ssh_host_ed25519_key": host_keys[node.hostname].private,
            "cluster_ssh_key": cluster_key.private,
            "munge.key": munge,
        }
        p = plan_node(stage_list, ctx, hostname=node.hostname, role=node.role, secrets=node_secrets)
        p = replace(p, enable=tuple(dict.fromkeys([*p.enable, *profile.enable])),
                    disable=tuple(dict.fromkeys([*p.disable, *profile.disable])))
        plans.append(p)
    return BuildPlan(cluster, spec, tuple(stage_list), node_profiles, tuple(plans), out_dir, keep_workspace, compress,
                     url_base)


def _profile_for(node: Node, profile: Profile) -> Profile:
    """A node of another role that runs jobs (a head with runs_jobs: true) also gets slurmd;
    a compute node's profile is taken as written."""
    if not node.runs_jobs or node.role == "compute" or "slurmd" in profile.packages:
        return profile
    return replace(profile, packages=(*profile.packages, "slurmd"),
                   enable=tuple(dict.fromkeys([*profile.enable, "slurmd.service"])),
                   disable=tuple(u for u in profile.disable if u != "slurmd.service"))


def _clean_stale_workspaces(root: Path) -> None:
    """Workspaces of builds that were killed outright (SIGKILL, power loss)."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


class Publisher:
    """Converts, checksums, compresses and maps node images — one job per core — while the
    appliance goes on stamping the next nodes. On a failure or Ctrl-C the other jobs are
    stopped and every job removes its half-written file."""

    def __init__(self, bp: BuildPlan, out: Path, layers: dict[str, Path], published: list[Path]):
        self.bp, self.out, self.layers, self.published = bp, out, layers, published
        self.abort = threading.Event()
        self.workers = max(1, min(len(bp.nodes), os.cpu_count() or 1))
        self.futures: dict = {}

    def __enter__(self) -> "Publisher":
        self._stack = ExitStack()
        if self.workers > 1:
            self._stack.enter_context(lines_only())
        self.pool = self._stack.enter_context(ThreadPoolExecutor(self.workers))
        return self

    def submit(self, overlay: Path, p: NodePlan, written: list) -> None:
        self.futures[self.pool.submit(self._job, overlay, p, written)] = p.hostname

    def _job(self, ov: Path, p: NodePlan, written: list) -> tuple[list[Path], dict]:
        final = self.out / f"{p.hostname}.img"
        _remove_stale_derivatives(final)
        digest = publish_image(ov, final, self.abort)
        files = [final]
        if self.abort.is_set():
            raise BuildError("stopped")
        packed = compress(final, self.bp.compress)
        if packed is not None:
            files.append(packed)
        files.append(write_bmap(final))
        log.info("wrote %s", final)
        return files, {
            "role": p.role,
            "image": final.name,
            "sha256": digest,
            "size": final.stat().st_size,
            "disk_id": node_disk_id(self.bp.cluster.name, p.hostname),
            "role_layer": self.layers[p.hostname].name,
            "release_date": time.strftime("%Y-%m-%d"),
            "files": [
                {"path": w.path, "sha256": w.sha256, "mode": f"{w.mode:04o}", "owner": w.owner, "stage": w.stage}
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
        self._stack.close()


def _remove_stale_derivatives(image: Path) -> None:
    """A new .img makes the previous build's .img.xz/.zst/.gz and their sidecars wrong."""
    for suffix in (".xz", ".zst", ".gz"):
        for p in (image.with_name(image.name + suffix), image.with_name(image.name + suffix + ".sha256")):
            p.unlink(missing_ok=True)


def execute(bp: BuildPlan) -> list[Path]:
    t0 = time.monotonic()
    base = fetch.fetch_base(bp.base_spec)
    log.info("base image: %s (sha256 %s…)", base.name, base.sha256[:12])
    out = bp.out_dir / bp.cluster.name
    out.mkdir(parents=True, exist_ok=True)
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
        layers: dict[str, Path] = {}  # by hostname; nodes with the same profile share one layer
        by_key: dict[str, Path] = {}
        for p in bp.nodes:
            inputs = layer_inputs(bp.profiles[p.hostname], list(bp.stages), base.sha256)
            if inputs.key() not in by_key:
                by_key[inputs.key()] = ensure_layer(base, inputs, list(bp.stages), apt_proxy=bp.cluster.apt.proxy,
                                                    apt_mirror=bp.cluster.apt.mirror)
            layers[p.hostname] = by_key[inputs.key()]
        overlays = []
        for p in bp.nodes:
            ov = ws / f"{p.hostname}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(layers[p.hostname]), "-F", "raw", str(ov)],
                what=f"qemu-img create for {p.hostname}")
            overlays.append(ov)
        admin = Admin(bp.cluster.admin.name, bp.cluster.admin.password_hash)
        with Publisher(bp, out, layers, published) as publisher:
            with GuestSession(overlays) as session:
                checked: set[Path] = set()  # overlays of one layer share its partition layout
                for disk, p, ov in zip(session.disks(), bp.nodes, overlays):
                    log.info("stamping %s (%s)", p.hostname, p.role)
                    written = stamp(disk, p, cluster_name=bp.cluster.name, admin=admin,
                                    check_layout=layers[p.hostname] not in checked)
                    checked.add(layers[p.hostname])
                    # stamp() ends with a sync, which reaches the overlay file: it can be
                    # converted while the appliance stamps the next node
                    publisher.submit(ov, p, written)
            manifest_nodes = publisher.results()
        manifest = update_manifest(
            out / "manifest.json",
            {"name": bp.cluster.name},
            {"name": base.name, "source": base.source, "sha256": base.sha256, "release_date": base.release_date},
            manifest_nodes,
        )
        write_imager_repo(out, bp.cluster.name, manifest["nodes"], bp.url_base)
        write_sha256sums(out)
    log.info("built %d node image%s in %.0f s", len(bp.nodes), "s" if len(bp.nodes) != 1 else "", time.monotonic() - t0)
    return published
