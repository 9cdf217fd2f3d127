"""Waiting for the cluster: every node polled through its agent until every compute node is
idle in sinfo and every node has finished booting, or every node has settled (ready or
failed), or the time is up. What each node reached is logged as it happens."""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING

from ..log import log
from .agent import AgentTimeout
from .checks import role_units
from .vm import NodeState

if TYPE_CHECKING:
    from .rehearsal import Rehearsal


def _probe(r: Rehearsal, st: NodeState) -> dict[str, str]:
    """What the node has reached, asking only for what is still missing: every process a
    probe starts is emulated, and the probes run all through the boots they wait for (a full
    probe was ~25 processes a node every few seconds). Until the node has booted, only its
    system state; then its role units in one systemctl call, its address and shared mount
    until they are there, and the head's sinfo until every compute node is idle."""
    shared = shlex.quote(r.cluster.shared.path)
    state = (
        "s=$(systemctl is-system-running 2>/dev/null); echo state=$s; case $s in "
        "degraded|maintenance) echo failed=$(systemctl list-units --state=failed --plain "
        "--no-legend 2>/dev/null | awk '{print $1}' | tr '\\n' ' ');; esac"
    )
    script = [state]
    units = _units_left(st) if st.boot_s is not None else []
    if st.boot_s is not None:
        script.append("echo hostname=$HOSTNAME")
        if units:
            script.append(
                f"echo units=$(systemctl is-active {' '.join(units)} 2>/dev/null | tr '\\n' ' ')"
            )
        if "address" not in st.done:
            script.append(
                "echo addr=$(ip -4 -o addr show 2>/dev/null | awk '{print $4}' | tr '\\n' ' ')"
            )
        if st.node is not r.head and "mount" not in st.done:
            script.append(
                f"timeout 20 ls {shared} >/dev/null 2>&1; "
                f"echo mount=$(findmnt -n -o FSTYPE {shared} | tr '\\n' ' ')"
            )
        if st.node is r.head:
            script.append(
                "echo sinfo=$(timeout 20 sinfo -h -N -o '%N:%T' 2>/dev/null | tr '\\n' ' ')"
            )
    _, out = st.agent.call("\n".join(script), timeout=120)
    probe = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    probe |= {f"unit.{u}": v for u, v in zip(units, probe.get("units", "").split())}
    return probe


def _units_left(st: NodeState) -> list[str]:
    """The node's role units not yet seen up or failed."""
    return [u for u in role_units(st.node) if u not in st.done and u + "-failed" not in st.done]


def _complete(r: Rehearsal, st: NodeState) -> bool:
    """Nothing more to wait for on this node (the head: its sinfo is asked all along)."""
    if st.node is r.head or st.failed or st.boot_s is None:
        return False
    return not _units_left(st) and {"address", "mount"} <= st.done


def _milestone(r: Rehearsal, st: NodeState, key: str, text: str) -> None:
    if key not in st.done:
        st.done.add(key)
        log.info("%s: %s (%.0f s)", st.name, text, r.elapsed())


def _take(r: Rehearsal, st: NodeState, probe: dict[str, str]) -> None:
    """What a probe shows of the node: its boot, emergency mode, its name, address, role
    units and mount, each logged once as it is reached."""
    st.last = probe
    if st.boot_s is None and probe.get("state") not in ("", "initializing", "starting", None):
        st.boot_s = time.monotonic() - st.started
        _milestone(r, st, "booted", f"booted, system {probe.get('state')}")
    if probe.get("state") == "maintenance" and not st.failed:
        # emergency or rescue mode: nothing more will start on this node
        st.failed = f"in emergency mode; {_failed_units_text(probe)}"
        log.info("%s: %s", st.name, st.failed)
    if "hostname" in probe and probe["hostname"] != st.name and "hostname" not in st.done:
        st.done.add("hostname")
        log.info("%s: reports hostname %r", st.name, probe.get("hostname"))
    if str(st.node.ip) in probe.get("addr", "").replace("/", " ").split():
        _milestone(r, st, "address", f"has address {st.node.ip}")
    for u in role_units(st.node):
        state = probe.get(f"unit.{u}", "")  # asked only while not yet up or failed
        if state == "active":
            _milestone(r, st, u, f"{u} up")
        elif state == "failed":
            _milestone(r, st, u + "-failed", f"{u} FAILED")
    if "nfs" in probe.get("mount", ""):
        _milestone(r, st, "mount", f"{r.cluster.shared.path} mounted")


def wait_ready(r: Rehearsal) -> float | None:
    """Poll every node until the cluster is ready (every compute node idle in sinfo), every
    node is settled (ready or failed), or the time is up. Returns seconds to ready."""
    deadline = r.t0 + r.timeout
    settled_at: float | None = None
    ready_at: float | None = None
    grace = 90  # once every service is up or failed: how long sinfo may take to agree
    while time.monotonic() < deadline:
        for st in r.states.values():
            if not r.alive(st) or _complete(r, st):
                continue
            try:
                probe = _probe(r, st)
            except AgentTimeout:
                continue
            _take(r, st, probe)
        head = r.states[r.head.hostname]
        idle = _idle_nodes(head.last.get("sinfo", ""))
        for n in r.compute:
            if n.hostname in idle:
                _milestone(r, head, f"idle-{n.hostname}", f"sinfo: {n.hostname} idle")
        if all(n.hostname in idle for n in r.compute):
            # ready; the checks start once every node has also finished booting (a
            # node's last boot jobs can end after the cluster answers)
            ready_at = ready_at if ready_at is not None else r.elapsed()
            if all(st.boot_s is not None or st.failed for st in r.states.values()):
                return ready_at
        if settled_at is None and all(_settled(r, st) for st in r.states.values()):
            settled_at = time.monotonic()
        if settled_at is not None and time.monotonic() - settled_at > grace:
            log.info(
                "services settled %d s ago and the cluster is not ready: checking what fails",
                grace,
            )
            return None
        time.sleep(3)
    log.info("timed out after %.0f s waiting for the cluster", r.timeout)
    return ready_at


def _settled(r: Rehearsal, st: NodeState) -> bool:
    if st.failed or st.boot_s is None:
        return st.failed is not None
    units_done = all(u in st.done or u + "-failed" in st.done for u in role_units(st.node))
    mount_done = st.node is r.head or "mount" in st.done
    return units_done and (mount_done or time.monotonic() - st.started - st.boot_s > 60)


def _idle_nodes(sinfo: str) -> set[str]:
    return {p.split(":")[0] for p in sinfo.split() if p.endswith(":idle")}


def _failed_units_text(probe: dict[str, str]) -> str:
    units = probe.get("failed", "").split()
    return "failed units: " + ", ".join(units) if units else "no failed unit listed"


def wait_node(r: Rehearsal, st: NodeState, timeout: float) -> bool:
    """One node powered on into a running cluster (rehearse --join): polled until it has
    booted and its role units and mount are up (True), it failed, or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not r.alive(st):
            return False
        try:
            probe = _probe(r, st)
        except AgentTimeout:
            time.sleep(3)
            continue
        _take(r, st, probe)
        if st.failed:
            return False
        if _complete(r, st):
            return True
        time.sleep(3)
    return False
