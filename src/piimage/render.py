"""The Jinja2 environment: StrictUndefined, so a missing template variable is an error,
and the plain context every template and `when:` expression sees (cluster, network, node,
nodes, head, compute_nodes, role, …) — built here only, from the model's own properties
(`cluster.head`, `cluster.job_nodes`, `admin.home`, `node.facts`)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from .errors import UserError

if TYPE_CHECKING:
    from .inventory import Cluster, Hardware, Node

PARTITION = "cluster"  # the SLURM partition every job node is in
# Memory a head that also runs jobs keeps back from them (slurm.conf MemSpecLimit), for
# slurmctld, the NFS server and chrony.
HEAD_MEM_SPEC_MB = 512
# the cluster user's home as the card of a head with a shared USB drive holds it (home_files)
HOME_SEED = "/var/lib/piimage/cluster-home"


def cluster_context(cluster: Cluster) -> dict[str, Any]:
    """What every node's templates share: plain data (str, int, bool, lists, dicts) and no
    secrets — the admin's password hash is only `has_password`."""
    net = cluster.network
    nodes = [_node_data(n, cluster) for n in cluster.nodes]
    by_name = {n["hostname"]: n for n in nodes}
    head = cluster.head
    return {
        "cluster": {
            "name": cluster.name,
            "timezone": cluster.timezone,
            "accounting": cluster.accounting,
        },
        "network": {
            "subnet": str(net.subnet),
            "prefixlen": net.prefixlen,
            "netmask": str(net.subnet.netmask),
            "gateway": str(net.gateway),
            "dns": [str(d) for d in net.dns],
            "interface": net.interface,
        },
        "admin": {
            "name": cluster.admin.name,
            "home": cluster.admin.home,
            "group": cluster.admin.name,
            "ssh_authorized_keys": list(cluster.admin.ssh_authorized_keys),
            "has_password": cluster.admin.password_hash is not None,
        },
        "hardware": _hardware_data(cluster.hardware),
        "nodes": nodes,
        "head": by_name[head.hostname] if head else None,
        "compute_nodes": [by_name[n.hostname] for n in cluster.job_nodes],
        "slurm": {"def_mem_per_cpu": def_mem_per_cpu(cluster.job_nodes)},
        "apt": {"mirror": cluster.apt.mirror, "proxy": cluster.apt.proxy},
        "shared": {
            "path": cluster.shared.path,
            "device_uuid": cluster.shared.device_uuid,
            "unit": systemd_path_unit(cluster.shared.path),
        },
        "cluster_user": {
            "name": cluster.cluster_user.name,
            "uid": cluster.cluster_user.uid,
            "home": cluster.cluster_user.home,
        },
    }


def node_context(
    cluster: Cluster,
    node: Node,
    *,
    packages: tuple[str, ...] | list[str],
    disk_id: str,
    host_keys: Mapping[str, str],
    cluster_ssh_public: str,
    shared: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One node's whole context: the cluster's (`shared`, if given, is `cluster_context`'s
    result, so a build of many nodes makes it once), `node` with this node's role facts
    (`node.slurmctld`, `node.nfs_client` …: what `when:` expressions ask), its packages,
    and the public keys. Secret bytes are never in it; stages name them (`secret:`)."""
    ctx = dict(shared if shared is not None else cluster_context(cluster))
    this = dict(next(n for n in ctx["nodes"] if n["hostname"] == node.hostname))
    this["nm_uuid"] = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node.hostname}.{cluster.name}.piimage"))
    this["disk_id"] = disk_id
    this.update(node.facts.as_dict())
    # keeps the head's time (timesyncd pointed at it, munge after the first sync): not a time
    # server itself, in a cluster that has a head other than this node
    head = cluster.head
    this["follows_head"] = (
        head is not None and head.hostname != node.hostname and not node.facts.time_server
    )
    this["home_files"] = home_files(cluster, node)
    ctx.update(
        node=this,
        role=node.role,
        packages=list(packages),
        partition=PARTITION,
        host_keys=dict(host_keys),
        cluster_ssh_public=cluster_ssh_public,
    )
    return ctx


def home_files(cluster: Cluster, node: Node) -> str | None:
    """Where this node's card holds the cluster user's home (SSH keys): the home itself, on a
    node where the shared directory is the card's own; HOME_SEED on a head whose USB drive is
    mounted over it at boot (a unit copies it onto the drive); None on a node that sees the
    head's home over NFS."""
    head = cluster.head
    if node.facts.nfs_client and head is not None and head.hostname != node.hostname:
        return None
    if node.facts.nfs_server and cluster.shared.device_uuid:
        return HOME_SEED
    return cluster.cluster_user.home


def _hardware_data(h: Hardware) -> dict[str, Any]:
    return {"model": h.model, "cpus": h.cpus, "memory_mb": h.memory_mb, "poe_hat": h.poe_hat}


def _node_data(n: Node, cluster: Cluster) -> dict[str, Any]:
    hw = _hardware_data(n.hardware)
    return {
        "hostname": n.hostname,
        "role": n.role,
        "ip": str(n.ip),
        "cidr": f"{n.ip}/{cluster.network.prefixlen}",
        "runs_jobs": n.runs_jobs,
        "model": hw["model"],
        "cpus": hw["cpus"],
        "memory_mb": hw["memory_mb"],
        # memory kept from jobs: on a head that runs them, for its own services
        "mem_spec_mb": mem_spec_mb(n),
        "hardware": hw,
    }


def mem_spec_mb(n: Node) -> int:
    return HEAD_MEM_SPEC_MB if n.facts.slurmd and n.facts.slurmctld else 0


def def_mem_per_cpu(job_nodes: tuple[Node, ...]) -> int:
    """slurm.conf DefMemPerCPU (MiB): what a job that does not say --mem gets per core. With
    memory a consumable resource (CR_Core_Memory), a job without it would otherwise take a
    whole node's memory and keep every other job off that node. The smallest share of any job
    node, so a default job fits on every node."""
    shares = [(n.hardware.memory_mb - mem_spec_mb(n)) // n.hardware.cpus for n in job_nodes]
    return max(1, min(shares)) if shares else 1


def systemd_path_unit(path: str) -> str:
    """systemd-escape --path: /clusterfs -> clusterfs, /srv/my-data -> srv-my\\x2ddata."""

    def esc(i: int, c: str) -> str:
        plain = (c.isalnum() or c in "_.:") and not (i == 0 and c == ".")
        return c if plain else f"\\x{ord(c):02x}"

    parts = (p for p in path.strip("/").split("/") if p)
    return "-".join("".join(esc(i, c) for i, c in enumerate(part)) for part in parts) or "-"


def environment(search_path: list[Path] | None = None) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(p) for p in (search_path or [])]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )
    return env


def render_string(
    env: jinja2.Environment, text: str, context: Mapping[str, Any], where: str
) -> str:
    """Render an inline template (a path, a `when:` expression) with a located error."""
    try:
        return env.from_string(text).render(context)
    except jinja2.TemplateError as e:
        raise UserError(f"{where}: cannot render {text!r}: {e}") from e


def evaluate(env: jinja2.Environment, expr: str, context: Mapping[str, Any], where: str) -> bool:
    try:
        return bool(env.compile_expression(expr, undefined_to_none=False)(**context))
    except jinja2.TemplateError as e:
        raise UserError(f"{where}: cannot evaluate {expr!r}: {e}") from e


def render_file(template: Path, context: Mapping[str, Any], where: str) -> str:
    env = environment([template.parent])
    try:
        return env.get_template(template.name).render(context)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{template}:{e.lineno}: template error: {e.message}") from e
    except jinja2.UndefinedError as e:
        raise UserError(f"{template}: {where}: {e.message}") from e
    except jinja2.TemplateError as e:
        raise UserError(f"{template}: {where}: {e}") from e
