"""`piimage apply`: the running cluster's cluster-wide files brought to what cluster.yaml says
now, over SSH, so a grown or changed cluster needs only its new cards flashed.

What a build would write into each node's image is rendered (build.plan, with the cluster's
real keys); of that, only the files that list the cluster (CLUSTER_WIDE: names, host keys,
Slurm's node list, the MPI hostfiles, the exports, the time settings) are compared with what
each running node has, shown as a diff, and written where they differ. A node's identity
(hostname, address, its host key, munge key) is never touched, so nothing here needs a
re-flash and nothing can lock a node out.

Each file is written beside its target and renamed over it (a failure leaves the old file and
no temporary one); then only the services whose files changed are told: exportfs for the
exports, chrony or timesyncd for the time settings, Slurm last and cluster-wide — `scontrol
reconfigure` where the head's Slurm adds and removes nodes that way (23.11 and later), else
slurmctld stopped, every slurmd restarted, slurmctld started (the 22.05 way, Slurm's FAQ "add
nodes"). A node that cluster.yaml no longer lists is drained first; one still running jobs
stops the apply before anything is written.
"""

from __future__ import annotations

import base64
import difflib
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from . import build
from .actions import RenderedFile
from .errors import PiimageError
from .inventory import Cluster, Node
from .verify import Ssh, host_key_line

SLURM_CONF = "/etc/slurm/slurm.conf"
CLUSTER_WIDE = (
    "/etc/hosts",
    "/etc/ssh/ssh_known_hosts",
    SLURM_CONF,
    "/etc/exports.d/piimage.exports",
    "/etc/openmpi/openmpi-default-hostfile",
    "/etc/openmpi/prte-default-hostfile",
    "/etc/chrony/conf.d/piimage.conf",
    "/etc/systemd/timesyncd.conf.d/piimage.conf",
)
# what a changed file asks of its node (Slurm's is cluster-wide: slurm_steps)
RELOADS = {
    "/etc/exports.d/piimage.exports": "exportfs -ra",
    "/etc/chrony/conf.d/piimage.conf": "systemctl try-restart chrony.service",
    "/etc/systemd/timesyncd.conf.d/piimage.conf": "systemctl try-restart systemd-timesyncd.service",
}
RECONFIGURE_ADDS_NODES = (23, 11)  # Slurm's FAQ: from 23.11 on, scontrol reconfigure does
TEMP_SUFFIX = ".piimage-apply"


class ApplyFailed(PiimageError):
    """Some node could not be brought up to date (the report says which)."""

    exit_code = 1


def cluster_paths(cluster: Cluster) -> set[str]:
    return {*CLUSTER_WIDE, f"{cluster.shared.path.rstrip('/')}/hostfile"}


def wanted(cluster: Cluster) -> dict[str, list[RenderedFile]]:
    """By hostname: the cluster-wide files a build from cluster.yaml would write now."""
    bp = build.plan(cluster, cluster.nodes, keys=build.cluster_keys(cluster), out_dir=Path("out"))
    paths = cluster_paths(cluster)
    return {p.hostname: [f for f in p.stamp.files if f.path in paths] for p in bp.nodes}


# ---------------------------------------------------------------------------------------------
# The scripts a node runs (as root, over SSH): paths are under $root, '' on a real node
# ---------------------------------------------------------------------------------------------
MARK = "=== piimage-apply "


def read_script(paths: list[str], root: str = "") -> str:
    lines = [f"root={shlex.quote(root)}"]
    for p in paths:
        q = shlex.quote(p)
        lines.append(
            f'if [ -f "$root"{q} ]; then echo "{MARK}{p}"; base64 -w0 < "$root"{q}; echo; '
            f'else echo "{MARK}{p} missing"; fi'
        )
    return "\n".join(lines) + "\n"


def parse_read(text: str) -> dict[str, bytes | None]:
    """What read_script printed: path -> its bytes, None when the node has no such file."""
    found: dict[str, bytes | None] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(MARK):
            continue
        rest = line[len(MARK) :]
        if rest.endswith(" missing"):
            found[rest.removesuffix(" missing")] = None
        else:
            body = lines[i + 1] if i + 1 < len(lines) else ""
            found[rest] = base64.b64decode(body)
    return found


def write_script(files: list[RenderedFile], root: str = "") -> str:
    """Every file written to a temporary name beside its target, then renamed over it; on any
    failure the temporary files are removed and the targets are as they were (those already
    renamed stay new: each file is whole, old or new)."""
    lines = [
        "set -eu",
        f"root={shlex.quote(root)}",
        "made=()",
        "trap 'rm -f \"${made[@]}\"' EXIT",
    ]
    for f in files:
        q = shlex.quote(f.path)
        data = base64.b64encode(f.data).decode()
        lines += [
            f'mkdir -p "$(dirname "$root"{q})"',
            f't=$(mktemp "$root"{q}{TEMP_SUFFIX}.XXXXXX); made+=("$t")',
            f'printf %s {data} | base64 -d > "$t"',
            f'chown {shlex.quote(f.owner)}:{shlex.quote(f.group)} "$t" 2>/dev/null '
            '|| [ -n "$root" ]',
            f'chmod {f.mode:04o} "$t"',
            f'mv -f "$t" "$root"{q}',
        ]
    lines.append("made=()")
    return "\n".join(lines) + "\n"


def slurm_version(text: str) -> tuple[int, int] | None:
    """`scontrol --version` ("slurm 24.11.5", "slurm-wlm 22.05.8") as (major, minor)."""
    m = re.search(r"(\d+)\.(\d+)\.\d+", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def configured_nodes(slurm_conf: bytes | None) -> set[str]:
    """The NodeName= entries of a slurm.conf (not DEFAULT)."""
    if not slurm_conf:
        return set()
    names = re.findall(r"^\s*NodeName=(\S+)", slurm_conf.decode(errors="replace"), re.M)
    return {n for n in names if n.upper() != "DEFAULT"}


# ---------------------------------------------------------------------------------------------
# The apply
# ---------------------------------------------------------------------------------------------
@dataclass
class NodeResult:
    node: str
    changed: list[str] = field(default_factory=list)  # paths that differ (or would)
    did: list[str] = field(default_factory=list)  # what was done, for the report
    error: str | None = None


@dataclass
class Outcome:
    results: dict[str, NodeResult]
    diff: str
    removed: list[str]  # nodes cluster.yaml no longer lists that Slurm still knows

    @property
    def ok(self) -> bool:
        return all(r.error is None for r in self.results.values())

    @property
    def changes(self) -> int:
        return sum(len(r.changed) for r in self.results.values())

    def text(self) -> str:
        lines = []
        for r in self.results.values():
            if r.error:
                lines.append(f"  {r.node:<12} FAILED: {r.error}")
            elif r.did:
                lines.append(f"  {r.node:<12} {'; '.join(r.did)}")
            elif r.changed:
                lines.append(f"  {r.node:<12} would change {', '.join(r.changed)}")
            else:
                lines.append(f"  {r.node:<12} up to date")
        return "\n".join(lines)


def _diff(node: str, path: str, old: bytes | None, new: bytes) -> str:
    a = [] if old is None else old.decode(errors="replace").splitlines(keepends=True)
    b = new.decode(errors="replace").splitlines(keepends=True)
    return "".join(
        difflib.unified_diff(
            a,
            b,
            f"{node}:{path} (running)" if old is not None else "/dev/null",
            f"{node}:{path} (cluster.yaml)",
        )
    )


class Apply:
    def __init__(
        self,
        cluster: Cluster,
        nodes: tuple[Node, ...],
        ssh: Ssh,
        *,
        root: str = "",
    ):
        self.cluster = cluster
        self.nodes = nodes
        self.ssh = ssh
        self.root = root  # a test seam: each node's files under root.format(host=…)
        self.head = cluster.head
        # nodes whose host key the secrets directory lacked before this apply: not reachable
        self.unbuilt = {n.hostname for n in nodes if host_key_line(cluster, n) is None}

    def _root(self, node: Node) -> str:
        return self.root.format(host=node.hostname)

    def _call(self, node: Node, script: str, timeout: float = 120) -> tuple[int, str]:
        return self.ssh.run(node, script, timeout)

    def compare(self) -> Outcome:
        want = wanted(self.cluster)
        results: dict[str, NodeResult] = {}
        diffs: list[str] = []
        self.pending: dict[str, list[RenderedFile]] = {}
        head_conf: bytes | None = None
        for n in self.nodes:
            r = results[n.hostname] = NodeResult(n.hostname)
            if n.hostname in self.unbuilt:
                r.error = (
                    "never built here (no host key in the secrets directory): "
                    f"piimage build --hostname {n.hostname}, flash and boot it, then apply again"
                )
                continue
            files = want.get(n.hostname, [])
            rc, out = self._call(n, read_script([f.path for f in files], self._root(n)))
            if rc != 0:
                r.error = out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"
                continue
            have = parse_read(out)
            if self.head is not None and n.hostname == self.head.hostname:
                head_conf = have.get(SLURM_CONF)
            todo = [f for f in files if have.get(f.path) != f.data]
            for f in todo:
                diffs.append(_diff(n.hostname, f.path, have.get(f.path), f.data))
            r.changed = [f.path for f in todo]
            self.pending[n.hostname] = todo
        names = {n.hostname for n in self.cluster.nodes}
        removed = sorted(configured_nodes(head_conf) - names)
        return Outcome(results, "".join(diffs), removed)

    def run(self, outcome: Outcome) -> Outcome:
        """Write what compare() found different, then tell the services."""
        head = self.head
        slurm_changed = any(SLURM_CONF in r.changed for r in outcome.results.values())
        if outcome.removed and head is not None:
            if not self._drain(outcome, head):
                return outcome
        for n in self.nodes:
            r = outcome.results[n.hostname]
            todo = self.pending.get(n.hostname, [])
            if r.error or not todo:
                continue
            rc, out = self._call(n, write_script(todo, self._root(n)))
            if rc != 0:
                r.error = "writing failed: " + (out.strip().splitlines() or [f"exit {rc}"])[-1]
                continue
            r.did.append("updated " + ", ".join(f.path for f in todo))
            reloads = [RELOADS[f.path] for f in todo if f.path in RELOADS]
            for cmd in reloads:
                rc, out = self._call(n, cmd)
                r.did.append(cmd if rc == 0 else f"{cmd} FAILED")
                if rc != 0:
                    r.error = f"{cmd}: {out.strip()[-300:]}"
        if slurm_changed and head is not None:
            self._slurm(outcome, head)
        return outcome

    def _drain(self, outcome: Outcome, head: Node) -> bool:
        r = outcome.results[head.hostname]
        for name in outcome.removed:
            q = shlex.quote(name)
            rc, out = self._call(
                head,
                f"scontrol update NodeName={q} State=DRAIN Reason='removed from cluster.yaml' "
                f"2>&1; squeue -h -w {q} -o %i 2>/dev/null | wc -l",
            )
            jobs = out.strip().splitlines()[-1] if out.strip() else "0"
            r.did.append(f"drained {name}")
            if jobs.isdigit() and int(jobs) > 0:
                r.error = (
                    f"{name} (no longer in cluster.yaml) still runs {jobs} job(s): it is drained; "
                    "apply again once they are done (nothing was written)"
                )
                return False
        return True

    def _slurm(self, outcome: Outcome, head: Node) -> None:
        r = outcome.results[head.hostname]
        rc, out = self._call(head, "scontrol --version")
        version = slurm_version(out)
        if version is not None and version >= RECONFIGURE_ADDS_NODES:
            rc, out = self._call(head, "scontrol reconfigure 2>&1")
            r.did.append("scontrol reconfigure" + ("" if rc == 0 else " FAILED"))
            if rc != 0:
                r.error = f"scontrol reconfigure: {out.strip()[-300:]}"
            return
        # 22.05: the controller stopped while every slurmd restarts with the new node list
        self._call(head, "systemctl stop slurmctld.service")
        for n in self.nodes:
            nr = outcome.results[n.hostname]
            if nr.error is None and n.facts.slurmd:
                rc, out = self._call(n, "systemctl restart slurmd.service")
                nr.did.append("slurmd restarted" if rc == 0 else "slurmd restart FAILED")
                if rc != 0:
                    nr.error = f"slurmd restart: {out.strip()[-300:]}"
        rc, out = self._call(head, "systemctl start slurmctld.service")
        r.did.append("slurmctld restarted" + ("" if rc == 0 else " FAILED"))
        if rc != 0:
            r.error = f"slurmctld start: {out.strip()[-300:]}"


def apply(
    cluster: Cluster,
    nodes: tuple[Node, ...],
    *,
    dry_run: bool = False,
    identity: Path | None = None,
    user: str = "",
    echo=print,
) -> Outcome:
    """Compare, show the diff, and (unless dry_run) write and reload; the outcome per node."""
    ssh = Ssh(cluster, identity=identity, user=user)
    try:
        job = Apply(cluster, nodes, ssh)
        outcome = job.compare()
        if outcome.diff:
            echo(outcome.diff.rstrip("\n"))
        if outcome.removed:
            echo(f"no longer in cluster.yaml, drained first: {', '.join(outcome.removed)}")
        if not dry_run and (outcome.changes or outcome.removed):
            job.run(outcome)
        return outcome
    finally:
        ssh.close()
