"""Orchestration: decide everything first (inventory, stages, rendered files, tools), then
fetch the base image, stamp every node in one libguestfs launch, and publish the outputs.

    base image ──► node overlays (qcow2 on the cached base) ──► stamped in one appliance ──► out/<cluster>/
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import fetch, secrets, settings
from .errors import UserError
from .image import GuestSession, _import_guestfs
from .inventory import Cluster, Node
from .log import log
from .output import publish_image, update_manifest
from .run import require_tools, run
from .stages import NodePlan, Stage, discover, plan_node
from .stamp import Admin, node_disk_id, stamp


def data_dir() -> Path:
    """Where `stages/` and `node-profiles/` live: $PIIMAGE_DATA_DIR, else the source checkout."""
    env = os.environ.get("PIIMAGE_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2])
    for c in candidates:
        if (c / "stages").is_dir():
            return c
    raise UserError("cannot find piimage's stages/ directory", hint="set PIIMAGE_DATA_DIR to the piimage checkout")


@dataclass(frozen=True)
class BuildPlan:
    cluster: Cluster
    base_spec: fetch.BaseSpec
    stages: tuple[Stage, ...]
    nodes: tuple[NodePlan, ...]
    out_dir: Path
    keep_workspace: bool = False
    # facts for the manifest, filled while planning
    info: dict[str, Any] = field(default_factory=dict)


def node_context(cluster: Cluster, node: Node, host_keys: dict[str, str]) -> dict[str, Any]:
    ctx = cluster.to_context()
    nctx = dict(next(n for n in ctx["nodes"] if n["hostname"] == node.hostname))
    nctx["nm_uuid"] = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.hostname}.{cluster.name}.piimage"))
    nctx["disk_id"] = node_disk_id(cluster.name, node.hostname)
    ctx["node"] = nctx
    ctx["role"] = node.role
    ctx["host_keys"] = host_keys
    admin = dict(ctx["admin"])
    admin.setdefault("group", admin["name"])
    ctx["admin"] = admin
    return ctx


def plan(cluster: Cluster, nodes: tuple[Node, ...], *, out_dir: Path, base: str | None = None,
         keep_workspace: bool = False) -> BuildPlan:
    """Everything that can be decided without touching an image: a typo costs milliseconds."""
    require_tools(["qemu-img"])
    _import_guestfs()
    if base:
        spec = fetch.parse_base_spec(base, None, relative_to=Path.cwd())
    else:
        spec = fetch.parse_base_spec(cluster.base, cluster.base_sha256, relative_to=cluster.base_dir)
    stage_list = discover([data_dir() / "stages", *cluster.stages])
    secrets.ensure_secrets_dir(cluster.secrets_dir)
    host_keys = {n.hostname: secrets.node_host_key(cluster.secrets_dir, n.hostname) for n in cluster.nodes}
    plans = []
    for node in nodes:
        ctx = node_context(cluster, node, {h: k.public for h, k in host_keys.items()})
        node_secrets = {"ssh_host_ed25519_key": host_keys[node.hostname].private}
        plans.append(plan_node(stage_list, ctx, hostname=node.hostname, role=node.role, secrets=node_secrets))
    return BuildPlan(cluster, spec, tuple(stage_list), tuple(plans), out_dir, keep_workspace)


def _clean_stale_workspaces(root: Path) -> None:
    """Workspaces of builds that were killed outright (SIGKILL, power loss)."""
    if not root.is_dir():
        return
    for d in root.iterdir():
        pid = d.name.split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


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
        overlays = []
        for p in bp.nodes:
            ov = ws / f"{p.hostname}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base.path), "-F", "raw", str(ov)],
                what=f"qemu-img create for {p.hostname}")
            overlays.append(ov)
        admin = Admin(bp.cluster.admin.name, bp.cluster.admin.password_hash)
        written: dict[str, list] = {}
        with GuestSession(overlays) as session:
            for disk, p in zip(session.disks(), bp.nodes):
                log.info("stamping %s (%s)", p.hostname, p.role)
                written[p.hostname] = stamp(disk, p, cluster_name=bp.cluster.name, admin=admin)
        manifest_nodes = {}
        for ov, p in zip(overlays, bp.nodes):
            final = out / f"{p.hostname}.img"
            digest = publish_image(ov, final)
            published.append(final)
            ov.unlink()
            manifest_nodes[p.hostname] = {
                "role": p.role,
                "image": final.name,
                "sha256": digest,
                "size": final.stat().st_size,
                "disk_id": node_disk_id(bp.cluster.name, p.hostname),
                "files": [
                    {"path": w.path, "sha256": w.sha256, "mode": f"{w.mode:04o}", "owner": w.owner, "stage": w.stage}
                    for w in written[p.hostname]
                ],
            }
            log.info("wrote %s", final)
        update_manifest(
            out / "manifest.json",
            {"name": bp.cluster.name},
            {"name": base.name, "source": base.source, "sha256": base.sha256, "release_date": base.release_date},
            manifest_nodes,
        )
    log.info("built %d image%s in %.0f s", len(published), "s" if len(published) != 1 else "", time.monotonic() - t0)
    return published
