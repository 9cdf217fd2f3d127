"""Which nodes a command is about: `--hostname` (checked against `--role`), `--all` (filtered by
`--role`), or a list of names (`rehearse --nodes`). One function for every command."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .defaults import DEFAULT_SOURCE_LABEL
from .model import Cluster, Node


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _label(cluster: Cluster) -> str:
    return _display(cluster.source) if cluster.source else f"the {DEFAULT_SOURCE_LABEL}"


def select_nodes(
    cluster: Cluster,
    *,
    hostname: str | None = None,
    role: str | None = None,
    all_nodes: bool = False,
    names: Sequence[str] | None = None,
) -> tuple[Node, ...]:
    """The nodes a command is about: `--hostname` (checked against `--role`), `--all`
    (filtered by `--role`), or `names` (`--nodes a,b`: each once, in the order given)."""
    if names is not None:
        return _named(cluster, names)
    where = _label(cluster)
    names = ", ".join(n.hostname for n in cluster.nodes)
    if hostname and all_nodes:
        raise UserError("give either --hostname or --all, not both")
    if all_nodes:
        if role is None:
            return cluster.nodes
        nodes = cluster.nodes_with_role(role)
        if not nodes:
            present = ", ".join(sorted({n.role for n in cluster.nodes}))
            raise UserError(
                f"--role {role}: no {role} node in {where}", hint=f"roles there: {present}"
            )
        return nodes
    if not hostname:
        also = f"--all --role {role}" if role else "--all"
        raise UserError(
            f"which node? give --hostname NAME, or {also}", hint=f"nodes in {where}: {names}"
        )
    try:
        node = cluster.node(hostname)
    except KeyError:
        near = difflib.get_close_matches(hostname, [n.hostname for n in cluster.nodes], n=1)
        raise UserError(
            f"--hostname {hostname}: no such node in {where}"
            + (f" (did you mean '{near[0]}'?)" if near else ""),
            hint=f"nodes in {where}: {names}",
        ) from None
    if role is not None and role != node.role:
        raise UserError(
            f"--role {role}: {node.hostname} is a {node.role} node in {where}, not {role}",
            hint=f"drop --role, or change {node.hostname}'s role in the inventory",
        )
    return (node,)


def _named(cluster: Cluster, names: Sequence[str]) -> tuple[Node, ...]:
    chosen = []
    for name in names:
        try:
            chosen.append(cluster.node(name))
        except KeyError:
            known = ", ".join(n.hostname for n in cluster.nodes)
            raise UserError(
                f"--nodes: {name!r} is not a node of cluster {cluster.name} (nodes: {known})"
            ) from None
    return tuple(dict.fromkeys(chosen))
