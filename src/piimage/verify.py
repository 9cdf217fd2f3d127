"""`piimage verify`: the rehearsal's checks against the real boards, over SSH.

The checks are the rehearsal's own (rehearse/checks.py reaches a node only through a `Call`);
here the call is `ssh <admin>@<address> sudo -n bash -s` with the script on stdin, so what is
checked on the cards is exactly what was checked in the rehearsal. What differs:

- a node's host key must be the one piimage made for it (the secrets directory): ssh runs
  with StrictHostKeyChecking against a known-hosts file written from those keys, never the
  user's own ~/.ssh/known_hosts, so a card that was re-imaged by another tool is named;
- the admin logs in with the user's SSH key (ssh's defaults, or --identity) and needs sudo
  without a password, as piimage's images give the admin;
- a node that does not answer is reported (its boot line FAILs with ssh's reason) and the
  others are still checked;
- the memory-hungry job of the rehearsal (`oom`) is left out on a cluster in use, and three
  checks only real boards can answer are added: `hardware` (what slurmd detects, against
  slurm.conf's CPUs and RealMemory), `card` (room left on each card) and `drained` (nodes
  Slurm has set aside, with its reason).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PiimageError, UserError
from .fsutil import write_atomic
from .inventory import Cluster, Node
from .log import log
from .rehearse import checks as ck
from .rehearse.report import Report
from .run import require_tools

CONNECT_TIMEOUT_S = 10  # a board on the LAN answers in well under a second
CARD_MIN_FREE = 1 << 30  # below this much room a card's logs and Slurm state are at risk
CARD_MIN_FREE_FRACTION = 0.05


class VerifyFailed(PiimageError):
    """At least one check failed on the real cluster (the report says which)."""

    exit_code = 1


@dataclass
class SshNode:
    """A real board, as the checks see it (checks.Target)."""

    node: Node
    image: Path  # the image its card was flashed with, when this machine has it
    console: Path  # boards have no serial log here: a path that does not exist
    boot_s: float | None = None  # its uptime; None: it did not answer
    reboots: int = 0
    failed: str | None = None  # why it cannot be checked
    last: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.node.hostname


def host_key_line(cluster: Cluster, node: Node) -> str | None:
    """The known-hosts line for the host key piimage made for `node`, or None when the secrets
    directory has none (never made here: the node was not built from this machine)."""
    pub = cluster.secrets_dir / "hosts" / node.hostname / "ssh_host_ed25519_key.pub"
    try:
        fields = pub.read_text().split()
    except OSError:
        return None
    if len(fields) < 2:
        return None
    return f"{node.hostname},{node.ip} {fields[0]} {fields[1]}"


def ssh_reason(stderr: str) -> str:
    """ssh's own failure, in a line a user can act on."""
    text = stderr.strip()
    low = text.lower()
    if "host key verification failed" in low or "remote host identification has changed" in low:
        return "its SSH host key is not the one piimage made for it (card flashed by another tool?)"
    if "permission denied" in low:
        return "the admin's SSH key was refused"
    if "a password is required" in low or "sudo:" in low:
        return "sudo asks the admin for a password"
    for what in ("timed out", "no route to host", "connection refused", "could not resolve"):
        if what in low:
            return f"it does not answer over SSH ({what})"
    last = text.splitlines()[-1] if text else "no output"
    return f"ssh failed: {last[:200]}"


class Ssh:
    """checks.Call over SSH: one master connection per node (ControlMaster), kept for the run."""

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path | None = None,
        identity: Path | None = None,
        user: str = "",
    ):
        self.cluster = cluster
        self.user = user or cluster.admin.name
        if identity is not None and not identity.is_file():
            raise UserError(f"--identity {identity}: no such file")
        # known hosts and master sockets: in a folder of its own unless given one, removed by close()
        self._own = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="piimage-ssh-"))
        self.known_hosts = self.workdir / "known_hosts"
        lines = [line for n in cluster.nodes if (line := host_key_line(cluster, n))]
        write_atomic(self.known_hosts, "".join(f"{line}\n" for line in lines), mode=0o600)
        self.identity = identity

    def command(self, node: Node, remote: str) -> list[str]:
        opts = [
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            f"ConnectTimeout={CONNECT_TIMEOUT_S}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ControlMaster=auto",
            "-o",
            f"ControlPath={self.workdir}/%C",
            "-o",
            "ControlPersist=120",
            "-o",
            f"HostKeyAlias={node.hostname}",
        ]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return ["ssh", *opts, f"{self.user}@{node.ip}", remote]

    def run(self, node: Node, script: str, timeout: float) -> tuple[int, str]:
        """(exit code, the script's output); 255 and why when ssh itself failed."""
        remote = "sudo -n bash -s 2>&1"
        try:
            p = subprocess.run(
                self.command(node, remote),
                input=script.encode(),
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return 255, f"{node.hostname}: no answer within {timeout:.0f} s"
        out = p.stdout.decode(errors="replace")
        err = p.stderr.decode(errors="replace")
        if p.returncode == 255:
            return 255, f"{node.hostname}: {ssh_reason(err)}"
        if p.returncode == 1 and "sudo:" in err + out[:200] and "password" in err + out[:200]:
            return 255, f"{node.hostname}: {ssh_reason('sudo: a password is required')}"
        return p.returncode, out

    def __call__(
        self, st: ck.Target, script: str, timeout: float = 300, *, diagnose: bool = False
    ) -> tuple[int, str]:
        if st.failed and not diagnose:
            return 255, st.failed
        rc, out = self.run(st.node, script, timeout)
        if diagnose and rc == 255:
            raise ck.Unreachable(out)
        return rc, out

    def close(self) -> None:
        for n in self.cluster.nodes:
            subprocess.run(
                [
                    "ssh",
                    "-o",
                    f"ControlPath={self.workdir}/%C",
                    "-O",
                    "exit",
                    f"{self.user}@{n.ip}",
                ],
                capture_output=True,
                timeout=10,
                check=False,
            )
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)


FIRST_CONTACT = "cat /proc/uptime; systemctl is-system-running; uname -r"


def first_contact(call: Ssh, st: SshNode) -> str:
    """Reach the node once: its uptime (the boot line), system state and kernel; a node that
    does not answer gets `failed` with ssh's reason. Returns its kernel ('' if unknown)."""
    rc, text = call.run(st.node, FIRST_CONTACT, 30)
    if rc == 255:
        st.failed = text
        return ""
    lines = text.splitlines()
    try:
        st.boot_s = float(lines[0].split()[0])
    except (IndexError, ValueError):
        st.failed = f"{st.name}: unexpected answer: {text[:200]}"
        return ""
    st.last = {"state": lines[1].strip() if len(lines) > 1 else ""}
    return lines[2].strip() if len(lines) > 2 else ""


# ---------------------------------------------------------------------------------------------
# What only real boards can answer
# ---------------------------------------------------------------------------------------------
def parse_slurmd_c(text: str) -> dict[str, int]:
    """`slurmd -C`'s first line, "NodeName=x CPUs=4 … RealMemory=3794", as numbers."""
    out = {}
    for word in text.split():
        key, _, value = word.partition("=")
        if value.isdigit():
            out[key] = int(value)
    return out


@ck.node_check("hardware", needs=ck.UP)
def hardware(ctx: ck.Context, st: ck.Target) -> None:
    """What slurmd detects on the board, against slurm.conf: fewer CPUs or less memory than
    configured and Slurm drains the node ("Low RealMemory")."""
    if not st.node.facts.slurmd:
        return
    rc, text = ctx.call(st, "slurmd -C 2>&1 | head -n 1")
    found = parse_slurmd_c(text)
    want = st.node.hardware
    if rc != 0 or "CPUs" not in found or "RealMemory" not in found:
        ctx.add("hardware", st.name, False, "slurmd -C gave no CPUs and RealMemory", text)
        return
    bad = []
    if found["CPUs"] != want.cpus:
        bad.append(f"{found['CPUs']} CPUs, slurm.conf says {want.cpus}")
    if found["RealMemory"] < want.memory_mb:
        bad.append(
            f"RealMemory {found['RealMemory']} MB, below slurm.conf's {want.memory_mb} "
            f"(set hardware.real_memory for {st.name} in cluster.yaml)"
        )
    ctx.add(
        "hardware",
        st.name,
        not bad,
        f"{found['CPUs']} CPUs, {found['RealMemory']} MB (slurm.conf: {want.cpus}, "
        f"{want.memory_mb}; model {want.model})"
        if not bad
        else "; ".join(bad),
        text,
    )


@ck.node_check("card", needs=ck.UP)
def card(ctx: ck.Context, st: ck.Target) -> None:
    """Room left on the card's root filesystem."""
    rc, text = ctx.call(st, "df -B1 --output=size,avail / | tail -n 1")
    try:
        size, avail = (int(x) for x in text.split()[:2])
    except ValueError:
        ctx.add("card", st.name, False, "cannot read the card's free space", text)
        return
    gib = 1 << 30
    ok = avail >= CARD_MIN_FREE and avail >= CARD_MIN_FREE_FRACTION * size
    ctx.add(
        "card",
        st.name,
        ok,
        f"{avail / gib:.1f} GiB free of {size / gib:.1f} GiB"
        + ("" if ok else ": the card is (nearly) full; logs, Slurm state and jobs need room"),
        text,
    )


@ck.cluster_check("drained", ck.HEAD_BOOTED)
def drained(ctx: ck.Context) -> None:
    """Nodes Slurm has drained or marked down, with the reason it gives."""
    rc, text = ctx.call(ctx.head, "timeout 60 sinfo -h -R -o '%n|%T|%E'")
    if rc != 0:
        ctx.add("drained", ctx.head.name, False, "sinfo -R failed", text)
        return
    # only the nodes being checked: one left out of --nodes is not this check's business
    names = {st.name for st in ctx.nodes}
    rows = [
        row
        for row in (ln.split("|", 2) for ln in text.splitlines() if ln.count("|") >= 2)
        if row[0] in names
    ]
    ctx.add(
        "drained",
        ctx.head.name,
        not rows,
        "no node drained or down"
        if not rows
        else "; ".join(f"{n} is {s}: {why}" for n, s, why in rows),
        text,
    )


def registry() -> tuple:
    """The rehearsal's checks less `oom`, with the real-hardware ones."""
    out: list = []
    for entry in ck.CHECKS:
        if entry is ck.oom:
            continue
        out.append(entry)
        if isinstance(entry, ck.Round) and ck.memcg in entry.checks:
            out.append(ck.Round(hardware, card))
    out.insert(out.index(ck.sinfo) + 1, drained)
    return tuple(out)


def verify(
    cluster: Cluster,
    nodes: tuple[Node, ...],
    *,
    out_dir: Path,
    identity: Path | None = None,
    user: str = "",
) -> Report:
    """Run the checks on the real `nodes`; the report (also written to
    <out>/<cluster>/verify/report.json)."""
    require_tools(["ssh"])
    head = next((n for n in nodes if n.facts.slurmctld), None)
    if head is None:
        raise UserError(
            "verify needs the head node among --nodes",
            hint=f"add {cluster.head.hostname if cluster.head else 'the head'} to --nodes",
        )
    missing = [n.hostname for n in nodes if host_key_line(cluster, n) is None]
    if missing:
        raise UserError(
            f"no host key for {', '.join(missing)} in {cluster.secrets_dir}/hosts/",
            hint="verify checks each board's host key against the one its build made; run it "
            "where the images were built (the same secrets_dir)",
        )
    logs = out_dir.absolute() / cluster.name / "verify"
    report = Report(cluster.name, [n.hostname for n in nodes], "", logs=str(logs), kind="verify")
    call = Ssh(cluster, identity=identity, user=user)
    try:
        states = [
            SshNode(
                n,
                out_dir / cluster.name / f"{n.hostname}.img",
                logs / f"{n.hostname}.console.log",
            )
            for n in nodes
        ]
        t0 = time.monotonic()
        for st in states:
            kernel = first_contact(call, st)
            if st.node is head:
                report.kernel = kernel
            log.info(
                "%s: %s",
                st.name,
                st.failed or f"up {st.boot_s:.0f} s, system {st.last.get('state')}",
            )
        report.boot_seconds = {
            st.name: (round(st.boot_s) if st.boot_s is not None else None) for st in states
        }
        ctx = ck.Context(
            cluster,
            states,
            next(st for st in states if st.node is head),
            [n for n in nodes if n.facts.slurmd],
            time.monotonic() - t0,
            call,
            real=True,
        )
        report.checks = ck.run_checks(ctx, registry())
    finally:
        call.close()
    logs.mkdir(parents=True, exist_ok=True)
    write_atomic(logs / "report.json", json.dumps(report.to_json(), indent=2) + "\n")
    return report


def describe_failure(report: Report) -> str:
    failed = ", ".join(f"{c.node} {c.name}" for c in report.checks if not c.ok)
    return f"verify failed: {failed or 'no check ran'}"
