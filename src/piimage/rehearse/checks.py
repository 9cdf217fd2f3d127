"""The rehearsal's checks, as small functions over a Context: what the boot showed of each node,
a sink for results (`add`), and `call(node, script, timeout)`, the only way a check reaches a
node. Nothing here knows that a node is a virtual machine, so the same checks could run over
SSH against real boards.

Each check declares what it needs. A node check (`node_check`) names the fact its node must
have ("boot passed", "up"); a cluster check (`cluster_check`) names facts of the cluster that
must hold before it ("head booted", "compute nodes idle", …), which the context starts with or
earlier checks establish. CHECKS lists them in the order of the report, and run_checks() runs
each whose prerequisites hold and skips the others: silently (the report already says why: a
node that did not boot has its FAIL boot line) or, where a check says so, with FAIL "not run:
<why the fact does not hold>".
"""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..inventory import Cluster, Node
from ..log import log
from ..profiles import effective
from .report import Check
from .vm import _console_trouble

OUTPUT_TAIL = 4000  # characters of a check's output kept in the report
MUNGE_TTL_S = 300  # munge's default credential lifetime (MUNGE_DEFAULT_TTL)
CLOCK_SLACK_S = 120  # the head's clock may lag its image's build time by this much
MPI_RANKS_PER_NODE = 2  # the srun job: more ranks than nodes, so singletons cannot pass
OOM_JOB_MB = 64  # the containment job asks for this much memory …
OOM_USE_MB = 256  # … and uses this much

MPI_PROGRAM = """\
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
print(f"rank {comm.Get_rank()} of {comm.Get_size()} on {MPI.Get_processor_name()}: sum {total}", flush=True)
"""

# Facts of a node (Context.node_facts)
BOOTED = "booted"  # it reached a system state (emergency mode is one)
UP = "up"  # booted, and nothing has failed it since
BOOT_PASSED = "boot passed"  # the boot check passed: booted, and not in emergency mode
# Facts of the cluster (Context.facts)
HEAD_BOOTED = "head booted"  # the head is BOOTED
IDLE = "compute nodes idle"  # an Idle: sinfo shows at least one compute node idle
SHARED_FILES = "files in the shared directory"  # the head wrote them: their path, less suffix
JOBS = "jobs run"  # the batch jobs the checks ran: job id -> the JobState each must end in
JOBCOMP_LOG = "/var/log/slurm/jobcomp.log"  # slurm.conf JobCompLoc (stages/55-slurm)
EXAMPLES_DIR = "examples"  # stages/80-examples, in the shared directory
SWEEP_TASKS = 8  # sweep.sbatch's --array=0-7
SWEEP_CHECKED = 3  # the tasks below r = 3, which check themselves against ln|2 - r|


class Unreachable(Exception):
    """A diagnostic call (diagnose=True) that the node did not answer."""


class Target(Protocol):
    """What a check knows of a node besides what `call` tells it (vm.NodeState is one)."""

    node: Node
    image: Path  # the image its card was flashed with (its mtime: when it was built)
    console: Path  # the log of its serial console
    boot_s: float | None  # seconds to a system state; None: it never got there
    reboots: int
    failed: str | None  # why it cannot become ready
    last: dict  # what it answered last while the rehearsal waited ("state": is-system-running)

    @property
    def name(self) -> str: ...


class Call(Protocol):
    def __call__(
        self, node: Target, script: str, timeout: float = 300, *, diagnose: bool = False
    ) -> tuple[int, str]:
        """Run `script` with bash on `node` as root: (exit code, output). A node that failed or
        does not answer gives exit code 255 and why. With diagnose=True the node is asked
        even if it failed, and Unreachable is raised when it does not answer."""
        ...


@dataclass(frozen=True)
class Idle:
    """The IDLE fact: the compute nodes idle in sinfo, which the jobs run on."""

    nodes: list[Node]
    left_out: str  # " (node02 is down: left out)", or "" when every compute node is idle


def role_units(node: Node) -> list[str]:
    """The services the node's role runs."""
    f = node.facts  # the node's role facts (profiles.RoleFacts)
    units = [
        ("munge", f.munge),
        ("slurmctld", f.slurmctld),
        ("nfs-server", f.nfs_server),
        ("slurmd", f.slurmd),
        ("mariadb", f.slurmdbd),
        ("slurmdbd", f.slurmdbd),
    ]
    return [u for u, on in units if on]


@dataclass
class Context:
    """What the checks work on, and what they have found."""

    cluster: Cluster
    nodes: list[Target]  # in the order of --nodes
    head: Target
    compute: list[Node]  # the nodes that run jobs
    timeout: float  # the seconds the nodes had to boot
    call: Call
    # the nodes are real boards (piimage verify): boot_s is their uptime, they have no console
    real: bool = False
    results: list[Check] = field(default_factory=list)
    node_facts: dict[str, set[str]] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # facts found not to hold, and why
    scratch: list[str] = field(default_factory=list)  # files on the head, removed at the end

    def __post_init__(self) -> None:
        for st in self.nodes:
            have = self.node_facts.setdefault(st.name, set())
            if st.boot_s is not None:
                have.add(BOOTED)
                if not st.failed:
                    have.add(UP)
        if BOOTED in self.node_facts[self.head.name]:
            self.facts[HEAD_BOOTED] = True

    def add(
        self,
        name: str,
        node: str,
        ok: bool,
        summary: str,
        output: str = "",
        t0: float | None = None,
    ) -> None:
        c = Check(
            name,
            node,
            ok,
            summary,
            output[-OUTPUT_TAIL:],
            round(time.monotonic() - t0, 1) if t0 else 0.0,
        )
        self.results.append(c)
        log.info("%s  %-9s %-12s %s", "PASS" if ok else "FAIL", name, node, summary)

    def up(self) -> list[Target]:
        return [st for st in self.nodes if UP in self.node_facts[st.name]]

    def target(self, hostname: str) -> Target:
        return next(st for st in self.nodes if st.name == hostname)

    def as_user(self, cmd: str) -> str:
        user = self.cluster.cluster_user
        return (
            f"cd {shlex.quote(self.cluster.shared.path)} 2>/dev/null || cd; "
            f"runuser -u {user.name} -- env HOME={user.home} USER={user.name} bash -c {shlex.quote(cmd)}"
        )


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeCheck:
    name: str  # the name it reports under
    run: Callable[[Context, Target], None]
    needs: str | None = None  # the node fact it needs; None: it runs on every node


@dataclass(frozen=True)
class ClusterCheck:
    name: str  # the name it reports under
    run: Callable[[Context], None]
    needs: tuple[str, ...] = ()  # cluster facts, in the order they are looked at
    # a missing fact that skips the check with FAIL "not run: <why>" under these names (on the
    # head); a fact missing that is not listed here skips it silently
    not_run: dict[str, tuple[str, ...]] = field(default_factory=dict)


class Round:
    """Node checks run node by node: all of them on the first node, then on the next."""

    def __init__(self, *checks: NodeCheck) -> None:
        self.checks = checks


def node_check(name: str, needs: str | None = None) -> Callable[[Callable], NodeCheck]:
    return lambda fn: NodeCheck(name, fn, needs)


def cluster_check(
    name: str, *needs: str, not_run: dict[str, tuple[str, ...]] | None = None
) -> Callable[[Callable], ClusterCheck]:
    return lambda fn: ClusterCheck(name, fn, needs, dict(not_run or {}))


def run_checks(ctx: Context, registry: tuple | None = None) -> list[Check]:
    """Every check of `registry` (CHECKS) whose prerequisites hold, in order; the results."""
    for entry in CHECKS if registry is None else registry:
        if isinstance(entry, Round):
            for st in ctx.nodes:
                for check in entry.checks:
                    if check.needs is None or check.needs in ctx.node_facts[st.name]:
                        check.run(ctx, st)
            continue
        missing = [f for f in entry.needs if f not in ctx.facts]
        if not missing:
            entry.run(ctx)
        elif missing[0] in entry.not_run:
            why = ctx.missing.get(missing[0], f"no {missing[0]}")
            for name in entry.not_run[missing[0]]:
                ctx.add(name, ctx.head.name, False, "not run: " + why)
    if ctx.scratch:
        ctx.call(ctx.head, "rm -f " + " ".join(ctx.scratch))
    return ctx.results


# ---------------------------------------------------------------------------------------------
# Per node: booted, name, address, services
# ---------------------------------------------------------------------------------------------
@node_check("boot")
def boot(ctx: Context, st: Target) -> None:
    """The node reached a system state, and not emergency mode (establishes BOOT_PASSED)."""
    state = st.last.get("state", "")
    if st.boot_s is None or state == "maintenance":
        # what the kernel said on the serial console, and (the agent outlives emergency
        # mode) the journal's errors: a Pi's last console is tty1, which systemd writes to
        try:
            _, journal = ctx.call(
                st,
                "systemctl list-jobs --no-pager 2>&1 | tail -n 20; echo '--- journal'; "
                "journalctl -b -p warning --no-pager -o short-monotonic -n 40",
                60,
                diagnose=True,
            )
        except Unreachable:
            journal = "(the node does not answer)"
        ctx.add(
            "boot",
            st.name,
            False,
            st.failed
            or f"did not finish booting in {ctx.timeout:.0f} s "
            f"(system {state or 'not answering'}); see {st.console}",
            _console_trouble(st.console) + "\n--- jobs still queued\n" + journal,
        )
        return
    again = (
        f" ({st.reboots} reboot{'s' if st.reboots != 1 else ''} on the way)" if st.reboots else ""
    )
    ctx.add(
        "boot",
        st.name,
        True,
        f"up {_duration(st.boot_s)}, system {state or 'running'}"
        if ctx.real
        else f"booted in {st.boot_s:.0f} s{again}, system {state or 'running'}",
    )
    ctx.node_facts[st.name].add(BOOT_PASSED)


@node_check("hostname", needs=BOOT_PASSED)
def hostname(ctx: Context, st: Target) -> None:
    rc, name = ctx.call(st, "hostname")
    ctx.add(
        "hostname",
        st.name,
        rc == 0 and name.strip() == st.name,
        f"hostname is {name.strip()!r}"
        + ("" if name.strip() == st.name else f", expected {st.name!r}"),
    )


@node_check("address", needs=BOOT_PASSED)
def address(ctx: Context, st: Target) -> None:
    rc, addrs = ctx.call(st, "ip -4 -o addr show | awk '{print $2, $4}'")
    ip = str(st.node.ip)
    has = [a for a in addrs.split() if "/" in a]
    ctx.add(
        "address",
        st.name,
        any(a.split("/")[0] == ip for a in has),
        f"has {ip}"
        if any(a.split("/")[0] == ip for a in has)
        else f"{st.name} has no address {ip} (has: {', '.join(has) or 'none'})",
        addrs,
    )


@node_check("services", needs=BOOT_PASSED)
def services(ctx: Context, st: Target) -> None:
    bad = []
    for u in role_units(st.node):
        rc, state = ctx.call(st, f"systemctl is-active {u}")
        if state.strip() != "active":
            _, journal = ctx.call(st, f"journalctl -b -u {u} -n 15 --no-pager -o cat")
            bad.append((u, state.strip(), journal))
    ctx.add(
        "services",
        st.name,
        not bad,
        "all up: " + ", ".join(role_units(st.node))
        if not bad
        else "; ".join(f"{u} is {s or 'unknown'}" for u, s, _ in bad),
        "\n".join(f"--- {u}\n{j}" for u, _, j in bad),
    )


# ---------------------------------------------------------------------------------------------
# Per node: what a Raspberry Pi's first boot must leave right (piboot.py plays that boot)
# ---------------------------------------------------------------------------------------------
@node_check("units", needs=UP)
def units(ctx: Context, st: Target) -> None:
    """No failed unit: a degraded node is reported with the errors of its boot."""
    t0 = time.monotonic()
    rc, text = ctx.call(
        st,
        "systemctl list-units --state=failed --plain --no-legend --no-pager | awk '{print $1}'",
    )
    failed = text.split()
    journal = ""
    if failed:
        # each failed unit's own story, then the boot's errors
        _, journal = ctx.call(
            st,
            "".join(
                f"systemctl status --no-pager -l -n 25 {shlex.quote(u)} 2>&1; echo; "
                for u in failed[:4]
            )
            + "journalctl -b -p err --no-pager -o short-monotonic -n 40",
        )
    ctx.add(
        "units",
        st.name,
        rc == 0 and not failed,
        "no failed unit"
        if rc == 0 and not failed
        else "failed units: " + (", ".join(failed) or text.strip()),
        journal,
        t0,
    )


@node_check("enablement", needs=UP)
def enablement(ctx: Context, st: Target) -> None:
    """The role's services are enabled or disabled as its profile says, after a first boot
    that may have applied systemd's presets (systemd.preset(5))."""
    profile = ctx.cluster.roles.get(st.node.role)
    if profile is None:
        return
    profile = effective(profile, st.node.runs_jobs, ctx.cluster.accounting)
    want = {u: "enabled" for u in profile.enable} | {u: "disabled" for u in profile.disable}
    if not want:
        return
    # is-enabled prints the state of any unit it knows (masked, disabled: exit 1) and, for
    # one the image does not have, nothing (systemd 252, bookworm) or "not-found" (257)
    rc, text = ctx.call(
        st,
        "\n".join(
            f"s=$(systemctl is-enabled {u} 2>/dev/null); echo {u}=${{s:-not-installed}}"
            for u in want
        ),
    )
    got = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    # a unit the image does not have cannot start: as good as disabled
    ok_states = {
        "enabled": {"enabled"},
        "disabled": {"disabled", "masked", "not-installed", "not-found"},
    }
    wrong = [
        f"{u} is {got.get(u) or 'unknown'}, wanted {w}"
        for u, w in want.items()
        if got.get(u) not in ok_states[w]
    ]
    ctx.add(
        "enablement",
        st.name,
        rc == 0 and not wrong,
        f"as the {profile.role} profile says: " + ", ".join(f"{u} {w}" for u, w in want.items())
        if not wrong
        else "; ".join(wrong),
        text,
    )


@node_check("root", needs=UP)
def root(ctx: Context, st: Target) -> None:
    """The root filesystem spans the card, as a Pi's first boot makes it (and on the head,
    the shared directory has that room)."""
    shared = shlex.quote(ctx.cluster.shared.path)
    script = (
        'b=$(basename "$(readlink -f "$(findmnt -no SOURCE /)")"); '
        'd=$(basename "$(readlink -f /sys/class/block/$b/..)"); '
        "echo fs=$(findmnt -bno SIZE /); echo start=$(cat /sys/class/block/$b/start); "
        "echo part=$(cat /sys/class/block/$b/size); echo disk=$(cat /sys/block/$d/size)"
    )
    if st is ctx.head:
        script += f"; echo shared=$(findmnt -bno SIZE -T {shared})"
    rc, text = ctx.call(st, script)
    v = {
        k: int(x)
        for k, x in (ln.split("=", 1) for ln in text.splitlines() if "=" in ln)
        if x.strip().isdigit()
    }
    if not {"fs", "start", "part", "disk"} <= set(v):
        ctx.add("root", st.name, False, "cannot read the root filesystem's size", text)
        return
    part, disk, fs = v["part"] * 512, v["disk"] * 512, v["fs"]
    spans = (v["start"] + v["part"]) * 512 >= disk - (4 << 20)
    full = fs >= 0.93 * part
    shared_ok = (
        st is not ctx.head or ctx.cluster.shared.device_uuid or v.get("shared", 0) >= 0.93 * part
    )
    gib = 1 << 30
    summary = (
        f"root filesystem {fs / gib:.1f} GiB on a {disk / gib:.1f} GiB card "
        f"(partition {part / gib:.1f} GiB)"
    )
    if st is ctx.head and not ctx.cluster.shared.device_uuid:
        summary += f"; {ctx.cluster.shared.path} has {v.get('shared', 0) / gib:.1f} GiB"
    if not spans:
        summary = "the root partition does not reach the end of the card: " + summary
    elif not full:
        summary = "the root filesystem was not grown to its partition: " + summary
    ctx.add("root", st.name, bool(spans and full and shared_ok), summary, text)


@node_check("firstboot", needs=UP)
def firstboot(ctx: Context, st: Target) -> None:
    """The card's first power-on was a first boot to systemd, as on a Pi: trixie images mark it
    with machine-id "uninitialized", and the units that only run then (rpi-resize.service,
    systemd's first-boot presets) key on it. Images without rpi-resize.service (bookworm,
    whose first boot is its init= script) have nothing to show here and get no line."""
    rc, text = ctx.call(
        st,
        "if [ -e /usr/lib/systemd/system/rpi-resize.service ]; then "
        "systemctl show -p ConditionResult --value rpi-resize.service; else echo none; fi",
    )
    answer = text.strip()
    if rc == 0 and answer == "none":
        return
    ok = rc == 0 and answer == "yes"
    ctx.add(
        "firstboot",
        st.name,
        ok,
        "first boot: rpi-resize.service ran (ConditionFirstBoot met)"
        if ok
        else "the card's first power-on was not a first boot (ConditionFirstBoot unmet: "
        "/etc/machine-id was not 'uninitialized'), so rpi-resize.service and the other "
        "first-boot units did not run",
        text,
    )


@node_check("login", needs=UP)
def login(ctx: Context, st: Target) -> None:
    """The admin can log in: no first-boot user wizard pending (Raspberry Pi's userconfig),
    logins allowed, and no "SSH may not work" banner from rename-user."""
    rc, text = ctx.call(
        st,
        "echo wizard=$(systemctl is-active userconfig 2>/dev/null); "
        "echo nologin=$(test -e /run/nologin && echo yes || echo no); "
        "echo banner=$(sshd -T 2>/dev/null | awk '$1==\"banner\"{print $2}')",
    )
    v = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)
    bad = []
    if v.get("wizard") in ("active", "activating"):
        bad.append("the first-boot user wizard (userconfig) is pending")
    if v.get("nologin") != "no":
        bad.append("logins are not allowed yet (/run/nologin)")
    if v.get("banner", "none") not in ("none", ""):
        bad.append(f"sshd shows a banner ({v['banner']})")
    ctx.add(
        "login",
        st.name,
        rc == 0 and not bad,
        f"{ctx.cluster.admin.name} can log in: no wizard, no banner"
        if rc == 0 and not bad
        else "; ".join(bad) or text,
        text,
    )


@node_check("memcg", needs=UP)
def memcg(ctx: Context, st: Target) -> None:
    """The memory cgroup controller is on (a Pi kernel turns it off: piboot.BOARDS)."""
    rc, text = ctx.call(st, "cat /sys/fs/cgroup/cgroup.controllers; cat /proc/cmdline")
    controllers = text.splitlines()[0].split() if text.strip() else []
    ctx.add(
        "memcg",
        st.name,
        "memory" in controllers,
        "memory controller available"
        if "memory" in controllers
        else "no memory cgroup controller (Raspberry Pi kernels start with cgroup_disable=memory; "
        "cmdline.txt needs cgroup_enable=memory)",
        text,
    )


# ---------------------------------------------------------------------------------------------
# The cluster, from the head
# ---------------------------------------------------------------------------------------------
@cluster_check("clock", HEAD_BOOTED)
def clock(ctx: Context) -> None:
    """Every node's clock within munge's credential lifetime (300 s) of the head's, though
    every board starts without a real-time clock."""
    head, booted = ctx.head, ctx.up()
    offset = {}
    for st in booted:
        t0 = time.time()
        rc, text = ctx.call(st, "date +%s.%N")
        t1 = time.time()
        try:
            offset[st.name] = float(text.strip()) - (t0 + t1) / 2
        except ValueError:
            ctx.add("clock", st.name, False, "cannot read the clock", text)
    if head.name not in offset:
        return
    behind = -offset[head.name]
    for st in booted:
        if st.name not in offset:
            continue
        if st is head and not st.image.exists():
            # a real head whose image is not on this machine: only its offset to this one
            ctx.add("clock", st.name, True, f"{-behind:+.1f} s from this machine")
            continue
        if st is head:
            # it started at 1970 (no real-time clock, no internet): only the time its card
            # last knew (fake-hwclock, written when the image was built) can have set it
            built = st.image.stat().st_mtime
            head_time = time.time() + offset[head.name]
            ok = head_time >= built - CLOCK_SLACK_S
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(head_time))
            ctx.add(
                "clock",
                st.name,
                ok,
                f"{abs(behind) / 86400:.1f} days {'behind' if behind > 0 else 'ahead of'} "
                "this machine, not before its image was built (no real-time clock, no internet)"
                if ok
                else f"its clock says {when}, before its image was built: nothing restored "
                "the time it last knew (no real-time clock, no internet)",
            )
            continue
        skew = offset[st.name] - offset[head.name]
        why = ""
        if abs(skew) >= MUNGE_TTL_S:
            # what the node's NTP client and the head's server say about it
            _, why = ctx.call(
                st,
                "timedatectl timesync-status --no-pager 2>&1; timedatectl show 2>&1; "
                "journalctl -b -u systemd-timesyncd --no-pager -n 15 2>&1",
                60,
            )
            _, served = ctx.call(
                head, "chronyc -n tracking 2>&1; chronyc -n clients 2>&1 | head -n 8", 60
            )
            why += f"\n--- {head.name}\n{served}"
        ctx.add(
            "clock",
            st.name,
            abs(skew) < MUNGE_TTL_S,
            f"{skew:+.1f} s from {head.name}"
            + (
                ""
                if abs(skew) < MUNGE_TTL_S
                else f": beyond munge's {MUNGE_TTL_S} s, credentials are refused"
            ),
            why,
        )


@cluster_check("munge", HEAD_BOOTED)
def munge(ctx: Context) -> None:
    """A credential made on the head decodes on every other node."""
    head = ctx.head
    rc, cred = ctx.call(head, "munge -n")
    cred = cred.strip()
    for st in ctx.nodes:
        if st is head or BOOTED not in ctx.node_facts[st.name]:
            continue
        t0 = time.monotonic()
        if rc != 0:
            ctx.add("munge", st.name, False, "the head cannot make a munge credential", cred, t0)
            continue
        r, dec = ctx.call(st, f"printf '%s' {shlex.quote(cred)} | unmunge")
        ok = r == 0 and "STATUS:" in dec and "Success" in dec
        ctx.add(
            "munge",
            st.name,
            ok,
            f"decodes {head.name}'s credential"
            if ok
            else f"{st.name} cannot decode a credential from {head.name}: {_unmunge_error(dec)}",
            dec,
            t0,
        )


@cluster_check("sinfo", HEAD_BOOTED)
def sinfo(ctx: Context) -> None:
    """Every compute node idle (establishes IDLE, the nodes the jobs run on)."""
    t0 = time.monotonic()
    rc, sinfo = ctx.call(ctx.head, "timeout 60 sinfo -N -o '%N %T'")
    states = {}
    for line in sinfo.splitlines()[1:]:
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    not_idle = [
        f"{n.hostname} is {states.get(n.hostname, 'missing')}"
        for n in ctx.compute
        if states.get(n.hostname) != "idle"
    ]
    ctx.add(
        "sinfo",
        ctx.head.name,
        rc == 0 and not not_idle,
        "every compute node idle: " + ", ".join(n.hostname for n in ctx.compute)
        if rc == 0 and not not_idle
        else "; ".join(not_idle) or "sinfo failed",
        sinfo,
        t0,
    )
    # jobs run on the compute nodes that are idle; those that are not would only make them
    # queue, and are already named by the sinfo check
    jobs = [n for n in ctx.compute if states.get(n.hostname) == "idle"]
    if jobs:
        ctx.facts[IDLE] = Idle(jobs, f" ({'; '.join(not_idle)}: left out)" if not_idle else "")
    else:
        ctx.missing[IDLE] = "; ".join(not_idle) or "sinfo failed"


# with no compute node idle, neither job is run: both are reported "not run" here
@cluster_check("srun", HEAD_BOOTED, IDLE, not_run={IDLE: ("srun", "mpi", "oom")})
def srun(ctx: Context) -> None:
    """srun across every idle compute node."""
    jobs = ctx.facts[IDLE].nodes
    names = ",".join(n.hostname for n in jobs)
    count = len(jobs)
    t0 = time.monotonic()
    rc, text = ctx.call(
        ctx.head, ctx.as_user(f"timeout 240 srun -I120 -N{count} -w {names} hostname")
    )
    got = sorted(set(text.split()) & {n.hostname for n in jobs})
    ok = rc == 0 and len(got) == count
    if not ok:
        text += _slurm_logs(ctx, jobs)
    ctx.add(
        "srun",
        ctx.head.name,
        ok,
        f"srun -N{count} hostname: {' '.join(got)}{ctx.facts[IDLE].left_out}"
        if ok
        else f"srun -N{count} hostname failed (exit {rc}); answered: {' '.join(got) or 'none'}",
        text,
        t0,
    )


@cluster_check("shared", HEAD_BOOTED)
def shared(ctx: Context) -> None:
    """The shared directory and the cluster user's home in it: written on the head, read on
    each compute node, the home found where that node's passwd says (establishes SHARED_FILES:
    the token read here and the MPI program of the mpi and mpirun checks)."""
    head = ctx.head
    token = f"rehearsal {time.time_ns()}"
    shared = ctx.cluster.shared.path
    user = ctx.cluster.cluster_user
    fname = f"{shared}/.piimage-rehearsal"
    in_home = f"~{user.name}/.piimage-rehearsal-home"  # ~name: the home passwd gives
    rc, text = ctx.call(
        head,
        ctx.as_user(
            f"printf '%s\\n' {shlex.quote(token)} > {fname}-token && "
            f"cp {fname}-token {in_home} && "
            f"printf '%s' {shlex.quote(MPI_PROGRAM)} > {fname}-mpi.py"
        ),
    )
    ctx.scratch += [f"{fname}-token", f"{fname}-mpi.py", f"{user.home}/.piimage-rehearsal-home"]
    ctx.facts[SHARED_FILES] = fname
    for n in ctx.compute:
        st = ctx.target(n.hostname)
        if st is head:
            continue
        t0 = time.monotonic()
        r, seen = ctx.call(st, ctx.as_user(f"timeout 60 cat {fname}-token {in_home}"))
        ok = rc == 0 and r == 0 and seen.split("\n")[:2] == [token, token]
        ctx.add(
            "shared",
            n.hostname,
            ok,
            f"reads {shared} and {user.name}'s home {user.home} written on {head.name}"
            if ok
            else f"{n.hostname} cannot read the files {head.name} wrote in {shared} and in "
            f"{user.name}'s home {user.home}",
            text + seen,
            t0,
        )


# skipped silently when no compute node is idle: the srun check reports it "not run"
@cluster_check("mpi", HEAD_BOOTED, IDLE, SHARED_FILES)
def mpi(ctx: Context) -> None:
    """A plain `srun -N<n> -n<2n>` (no --mpi: slurm.conf's MpiDefault) of an mpi4py job over the
    n idle compute nodes: one world of them all, not singletons that each say "rank 0 of 1"."""
    jobs, fname = ctx.facts[IDLE].nodes, ctx.facts[SHARED_FILES]
    names = ",".join(n.hostname for n in jobs)
    size = MPI_RANKS_PER_NODE * len(jobs)
    t0 = time.monotonic()
    rc, text = ctx.call(
        ctx.head,
        ctx.as_user(
            f"timeout 400 srun -I120 -N{len(jobs)} -n{size} -w {names} python3 {fname}-mpi.py"
        ),
        timeout=480,
    )
    ok, ranks, hosts, want_sum = _mpi_outcome(rc, text, jobs, size)
    if not ok:
        text += _slurm_logs(ctx, jobs)
    ctx.add(
        "mpi",
        ctx.head.name,
        ok,
        f"srun -N{len(jobs)} -n{size}: one mpi4py world of {size} ranks on {' '.join(hosts)}, "
        f"allreduce sum {want_sum}{ctx.facts[IDLE].left_out}"
        if ok
        else f"mpi4py job across {names} failed (exit {rc}, {ranks} of {size} ranks answered"
        " in a world of that size)",
        text,
        t0,
    )


@cluster_check("oom", HEAD_BOOTED, IDLE)
def oom(ctx: Context) -> None:
    """Containment: a job that uses more memory than it asked for is killed by Slurm, out of
    memory, while its node keeps slurmd, munged and sshd and is idle again for the next job."""
    node = ctx.facts[IDLE].nodes[0]
    st = ctx.target(node.hostname)
    t0 = time.monotonic()
    rc, text = ctx.call(
        ctx.head,
        ctx.as_user(
            f"id=$(timeout 300 sbatch --parsable --wait -N1 -w {node.hostname} "
            f"--mem={OOM_JOB_MB}M -o /dev/null "
            f"--wrap 'python3 -c \"b = bytes(1) * ({OOM_USE_MB} << 20)\"'); rc=$?; "
            'echo "job $id exit $rc"; scontrol show job "$id" | grep -o "JobState=[A-Z_]*"; '
            f"for i in $(seq 60); do s=$(sinfo -h -n {node.hostname} -o %T); "
            '[ "$s" = idle ] && break; sleep 2; done; echo "node $s"'
        ),
        timeout=480,
    )
    _, daemons = ctx.call(st, "systemctl is-active slurmd munge ssh")
    states = dict(zip(("slurmd", "munge", "ssh"), daemons.split()))
    # the swap the node has (bookworm's dphys-swapfile makes 512 MB at boot): the job must not
    # have escaped its limit into it (cgroup.conf's ConstrainSwapSpace)
    _, swap = ctx.call(st, "awk '/^SwapTotal:/ {print int($2 / 1024)}' /proc/meminfo")
    swap_mb = swap.strip() or "?"
    killed = "JobState=OUT_OF_MEMORY" in text
    if m := re.search(r"^job (\d+) exit", text, re.MULTILINE):
        ctx.facts.setdefault(JOBS, {})[m.group(1)] = "OUT_OF_MEMORY"
    idle = text.strip().splitlines()[-1:] == ["node idle"]
    up = all(states.get(d) == "active" for d in ("slurmd", "munge", "ssh"))
    ok = rc == 0 and killed and idle and up
    if not ok:
        text += _slurm_logs(ctx, [node])
    ctx.add(
        "oom",
        ctx.head.name,
        ok,
        f"a job using {OOM_USE_MB} MiB with --mem={OOM_JOB_MB}M was killed out of memory on "
        f"{node.hostname} (swap {swap_mb} MiB); slurmd, munge, ssh stayed up and the node is idle"
        if ok
        else f"containment on {node.hostname}: "
        + "; ".join(
            w
            for w, bad in (
                (f"the job over its --mem={OOM_JOB_MB}M was not killed out of memory", not killed),
                ("the node is not idle after it", not idle),
                (
                    "daemons down: "
                    + ", ".join(f"{d} {states.get(d, '?')}" for d in ("slurmd", "munge", "ssh")),
                    not up,
                ),
                (f"the job could not be run (exit {rc})", rc != 0),
            )
            if bad
        ),
        text + daemons + f"SwapTotal {swap_mb} MiB\n",
        t0,
    )


@cluster_check("examples", HEAD_BOOTED, IDLE)
def examples(ctx: Context) -> None:
    """The example jobs in the shared directory, run as their README says: the cluster user
    submits pi.sbatch (one MPI world over the idle compute nodes, one rank per core, which
    checks its own answer) and sweep.sbatch (a job array of SWEEP_TASKS tasks) with sbatch,
    and every compute node sees the same results. Not run when a USB drive is the shared
    directory: the examples are in the image only when the head's own card holds it."""
    if ctx.cluster.shared.device_uuid:
        return
    jobs = ctx.facts[IDLE].nodes
    names = ",".join(n.hostname for n in jobs)
    where = f"{ctx.cluster.shared.path}/{EXAMPLES_DIR}"
    t0 = time.monotonic()
    rc, text = ctx.call(
        ctx.head,
        ctx.as_user(
            f"cd {shlex.quote(where)} || exit 3; "
            f"pi=$(timeout 900 sbatch --parsable --wait -N{len(jobs)} -w {names} pi.sbatch); "
            'r1=$?; echo "pi job $pi exit $r1"; cat "pi-$pi.out"; '
            "sw=$(timeout 900 sbatch --parsable --wait sweep.sbatch); "
            'r2=$?; echo "sweep job $sw exit $r2"; cat results/r-*.txt; '
            'files="pi-$pi.out $(echo results/r-*.txt)"; echo "files $files"; '
            'echo "digest $(cat $files | sha256sum)"; [ "$r1" = 0 ] && [ "$r2" = 0 ]'
        ),
        timeout=1900,
    )
    pi_id = re.search(r"^pi job (\d+) exit", text, re.MULTILINE)
    sweep_id = re.search(r"^sweep job (\d+) exit", text, re.MULTILINE)
    world = re.search(r"^pi = (3\.\d+) from (\d+) ranks on \d+ nodes \(([^)]*)\)$", text, re.M)
    ranks = sum(n.hardware.cpus for n in jobs)  # --ntasks-per-node: one per core
    pi_ok = bool(
        world
        and int(world.group(2)) == ranks
        and sorted(world.group(3).split()) == sorted(n.hostname for n in jobs)
        and re.search(r"^result: OK$", text, re.MULTILINE)
    )
    points = re.findall(r"^r=(\d\.\d+) lyapunov=([-+]\d\.\d+) .*$", text, re.MULTILINE)
    sweep_ok = (
        len(points) == SWEEP_TASKS
        and text.count("check=OK") == SWEEP_CHECKED
        and "check=WRONG" not in text
    )
    listed = re.search(r"^files (.+)$", text, re.MULTILINE)
    digest = re.search(r"^digest (\w+)", text, re.MULTILINE)
    if pi_id:
        ctx.facts.setdefault(JOBS, {})[pi_id.group(1)] = "COMPLETED"
    if sweep_id:
        ctx.facts.setdefault(JOBS, {})[f"array {sweep_id.group(1)}"] = "COMPLETED"
    # each compute node reads the files the head listed, by name (a listing of the folder
    # could come from the node's NFS attribute cache, up to a minute old: nfs(5) acdirmax)
    seen = {}
    for n in jobs:
        if listed and digest:
            cmd = f"cd {shlex.quote(where)} && cat {listed.group(1)} | sha256sum"
            _, out = ctx.call(ctx.target(n.hostname), ctx.as_user(cmd))
            seen[n.hostname] = out.split()[0] if out.split() else ""
    same = (
        bool(digest) and all(d == digest.group(1) for d in seen.values()) and len(seen) == len(jobs)
    )
    ok = rc == 0 and pi_ok and sweep_ok and same
    if not ok:
        text += _slurm_logs(ctx, jobs)
    ctx.add(
        "examples",
        ctx.head.name,
        ok,
        f"sbatch pi.sbatch: pi = {world.group(1)} from {ranks} ranks on {names}; sbatch "
        f"sweep.sbatch: {SWEEP_TASKS} array tasks, {SWEEP_CHECKED} checked against the exact "
        f"answer; the same results on {names}{ctx.facts[IDLE].left_out}"
        if ok and world
        else f"example jobs in {where}: "
        + "; ".join(
            w
            for w, bad in (
                (
                    f"pi.sbatch did not give one checked answer from {ranks} ranks on {names}",
                    not pi_ok,
                ),
                (
                    f"sweep.sbatch did not give {SWEEP_TASKS} results, {SWEEP_CHECKED} checked",
                    not sweep_ok,
                ),
                (
                    "the compute nodes do not see the head's results: "
                    + ", ".join(h for h, d in seen.items() if not digest or d != digest.group(1)),
                    not same,
                ),
                (f"exit {rc}", rc != 0),
            )
            if bad
        ),
        text,
        t0,
    )


@cluster_check("history", HEAD_BOOTED, IDLE, JOBS)
def history(ctx: Context) -> None:
    """The job completion log on the head lists the batch jobs the checks ran, each with the
    state it ended in, and the cluster user can read it."""
    want: dict[str, str] = ctx.facts[JOBS]
    t0 = time.monotonic()
    missing: list[str] = []
    text = ""
    for _ in range(10):  # slurmctld writes a job's line as the job completes
        rc, text = ctx.call(ctx.head, ctx.as_user(f"cat {JOBCOMP_LOG}"))
        missing = [f"{job} {state}" for job, state in want.items() if not _logged(text, job, state)]
        if rc == 0 and not missing:
            break
        time.sleep(3)
    ok = rc == 0 and not missing
    listed = ", ".join(f"{job} {state}" for job, state in want.items())
    summary = (
        f"{JOBCOMP_LOG} lists {listed}"
        if ok
        else f"{JOBCOMP_LOG} "
        + (
            f"unreadable by {ctx.cluster.cluster_user.name} (exit {rc})"
            if rc
            else "lacks " + ", ".join(missing)
        )
    )
    if ctx.cluster.accounting == "slurmdbd":
        db_ok, db_summary, db_text = _sacct_history(ctx, want)
        ok, summary, text = ok and db_ok, f"{db_summary}; {summary}", f"{db_text}\n{text}"
    ctx.add("history", ctx.head.name, ok, summary, text, t0)


def _sacct_history(ctx: Context, want: dict[str, str]) -> tuple[bool, str, str]:
    """sacct, as the cluster user, lists the same jobs with the same states: the records
    slurmctld sent to slurmdbd (accounting: slurmdbd). With -j, sacct does not stop at today."""
    ids = ",".join(job.split()[-1] for job in want)
    cmd = f"sacct -X -n -P -o JobID,State -j {ids}"
    missing: list[str] = []
    rc, text = 1, ""
    for _ in range(10):  # slurmctld sends a finished job to slurmdbd through a queue
        rc, text = ctx.call(ctx.head, ctx.as_user(cmd))
        missing = [
            f"{job} {state}" for job, state in want.items() if not _in_sacct(text, job, state)
        ]
        if rc == 0 and not missing:
            break
        time.sleep(3)
    listed = ", ".join(f"{job} {state}" for job, state in want.items())
    if rc == 0 and not missing:
        return True, f"sacct lists {listed}", text
    why = f"failed (exit {rc})" if rc else "lacks " + ", ".join(missing)
    return False, f"sacct {why}", f"$ {cmd}\n{text}"


def _in_sacct(text: str, job: str, state: str) -> bool:
    """Whether `sacct -X -n -P -o JobID,State` printed `job` ("123", or "array 124": every
    task 124_<n>) in `state` (sacct may add "by <uid>" to CANCELLED: the first word counts)."""
    rows = [ln.split("|") for ln in text.splitlines() if ln.count("|") == 1]
    if job.startswith("array "):
        tasks = [s for j, s in rows if re.fullmatch(rf"{job.split()[1]}_\d+", j)]
        return len(tasks) == SWEEP_TASKS and all(t.split()[0] == state for t in tasks)
    return any(j == job and s.split()[:1] == [state] for j, s in rows)


def _logged(log_text: str, job: str, state: str) -> bool:
    """Whether jobcomp/filetxt's log has `job` ("123", or "array 124" for every task of an
    array job) ending in `state`."""
    if job.startswith("array "):
        tasks = re.findall(
            rf"^JobId=\d+ .*JobState=(\S+) .*ArrayJobId={job.split()[1]} ArrayTaskId=\d+",
            log_text,
            re.MULTILINE,
        )
        return len(tasks) == SWEEP_TASKS and all(t == state for t in tasks)
    return bool(re.search(rf"^JobId={job} .*JobState={state} ", log_text, re.MULTILINE))


# hostkey, ssh and mpirun run, after the jobs, only when a job could run (with no compute node
# idle the report ends with the shared directory)
@cluster_check("hostkey", HEAD_BOOTED, IDLE)
def hostkey(ctx: Context) -> None:
    """Each node's SSH host key is the one every other node's ssh_known_hosts lists (a
    first boot that makes new keys breaks SSH between nodes)."""
    booted = ctx.up()
    served = {}
    for st in booted:
        _, text = ctx.call(
            st,
            # OpenSSH 10 (trixie) prints its "# 127.0.0.1:22 SSH-2.0-…" line on stdout too
            "ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | grep -v '^#' | awk '{print $2, $3}'",
        )
        served[st.name] = text.strip()
    names = " ".join(st.name for st in booted)
    listed: dict[tuple[str, str], set[str]] = {}
    for st in booted:
        _, text = ctx.call(
            st,
            f'for h in {names}; do ssh-keygen -F "$h" -f /etc/ssh/ssh_known_hosts 2>/dev/null '
            "| grep -v '^#' | awk -v h=\"$h\" '{print h, $2, $3}'; done",
        )
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3:
                listed.setdefault((st.name, parts[0]), set()).add(f"{parts[1]} {parts[2]}")
    for st in booted:
        key = served[st.name]
        stale = [
            v.name
            for v in booted
            if v is not st and key not in listed.get((v.name, st.name), set())
        ]
        ok = bool(key) and not stale
        ctx.add(
            "hostkey",
            st.name,
            ok,
            "its host key is the one every node's ssh_known_hosts lists"
            if ok
            else (
                "sshd serves no ed25519 host key"
                if not key
                else f"its host key is not the one ssh_known_hosts lists on {', '.join(stale)}"
            ),
            key,
        )


@cluster_check("ssh", HEAD_BOOTED, IDLE)
def ssh(ctx: Context) -> None:
    """The cluster user reaches every node from the head with SSH, host keys checked
    strictly (what Open MPI's launcher does)."""
    head = ctx.head
    user = ctx.cluster.cluster_user.name
    for st in ctx.up():
        if st is head:
            continue
        t0 = time.monotonic()
        rc, text = ctx.call(
            head,
            ctx.as_user(
                f"timeout 90 ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=60 {st.name} hostname"
            ),
        )
        ok = rc == 0 and text.strip().splitlines()[-1:] == [st.name]
        ctx.add(
            "ssh",
            st.name,
            ok,
            f"{user}@{head.name} logs in with the cluster key, host key checked"
            if ok
            else f"{user}@{head.name} cannot SSH to {st.name} (exit {rc})",
            text,
            t0,
        )


@cluster_check("mpirun", HEAD_BOOTED, IDLE, SHARED_FILES)
def mpirun(ctx: Context) -> None:
    """A plain `mpirun --hostfile` job, Open MPI's SSH launcher outside Slurm, across the
    compute nodes (those of the cluster's hostfile that are up)."""
    jobs, fname = ctx.facts[IDLE].nodes, ctx.facts[SHARED_FILES]
    count = len(jobs)
    pattern = "|".join(n.hostname for n in jobs)
    hostfile = f"{ctx.cluster.shared.path}/hostfile"
    ctx.scratch.append(f"{fname}-hostfile")
    t0 = time.monotonic()
    rc, text = ctx.call(
        ctx.head,
        ctx.as_user(
            f"grep -E '^({pattern})([[:space:]]|$)' {hostfile} > {fname}-hostfile && "
            f"timeout 400 mpirun --hostfile {fname}-hostfile -np {count} --map-by ppr:1:node python3 {fname}-mpi.py"
        ),
        timeout=480,
    )
    ok, ranks, hosts, want_sum = _mpi_outcome(rc, text, jobs, count)
    ctx.add(
        "mpirun",
        ctx.head.name,
        ok,
        f"mpirun --hostfile over {count} ranks on {' '.join(hosts)}: sum {want_sum}{ctx.facts[IDLE].left_out}"
        if ok
        else f"mpirun --hostfile across {pattern.replace('|', ',')} failed (exit {rc}, {ranks} of {count} ranks)",
        text,
        t0,
    )


@cluster_check("hostfile", HEAD_BOOTED)
def default_hostfile(ctx: Context) -> None:
    """A plain `mpirun` on the head, no --hostfile, maps onto the cluster's nodes: the default
    hostfile is the cluster's for the Open MPI of the release (4 on bookworm reads
    openmpi-default-hostfile, 5 on trixie PRRTE's prte-default-hostfile). Mapped only
    (--do-not-launch), so a node that is down does not decide it."""
    want = [n.hostname for n in ctx.cluster.job_nodes]
    t0 = time.monotonic()
    rc, text = ctx.call(
        ctx.head,
        ctx.as_user(
            'case "$(mpirun --version 2>&1 | head -n1)" in *") 4."*) show=--display-map;; '
            '*) show="--display map";; esac; '
            f"timeout 120 mpirun $show --do-not-launch -np {len(want)} --map-by ppr:1:node true"
        ),
        timeout=180,
    )
    mapped = re.findall(r"^\s*Data for node: (\S+)", text, re.MULTILINE)
    ok = bool(want) and mapped == want
    ctx.add(
        "hostfile",
        ctx.head.name,
        ok,
        f"a plain mpirun maps onto {' '.join(mapped)}: the cluster's hostfile"
        if ok
        else f"a plain mpirun (no --hostfile) maps onto {' '.join(mapped) or 'nothing'}, "
        f"not the cluster's {' '.join(want)}",
        text,
        t0,
    )


CHECKS: tuple[Round | ClusterCheck, ...] = (
    Round(boot, hostname, address, services),
    Round(units, enablement, root, firstboot, login, memcg),
    clock,
    munge,
    sinfo,
    srun,
    shared,
    mpi,
    oom,
    examples,
    history,
    hostkey,
    ssh,
    mpirun,
    default_hostfile,
)


def _duration(seconds: float) -> str:
    """An uptime for people: "52 s", "3.4 h", "12 days"."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _mpi_outcome(
    rc: int, text: str, jobs: list[Node], count: int
) -> tuple[bool, int, list[str], int]:
    """What an MPI_PROGRAM run of `count` ranks over the nodes `jobs` printed: (it went right:
    every rank answered, in one world of `count`, on every node of `jobs` and no other; the ranks
    that answered, the hosts they ran on, the sum each rank must have)."""
    ranks = re.findall(r"rank (\d+) of (\d+) on (\S+): sum (\d+)", text)
    want_sum = count * (count + 1) // 2
    hosts = sorted({h for _, _, h, _ in ranks})
    ok = (
        rc == 0
        and len(ranks) == count
        and all(int(s) == want_sum and int(z) == count for _, z, _, s in ranks)
        and hosts == sorted(n.hostname for n in jobs)
    )
    return ok, len(ranks), hosts, want_sum


def _slurm_logs(ctx: Context, nodes: list[Node]) -> str:
    """The end of slurmctld's log on the head and of slurmd's on each of `nodes`: what a failed
    job check reports besides the job's own output, so that a launch failure says why."""
    parts = []
    for name, path in [(ctx.head.name, "slurmctld.log")] + [
        (n.hostname, "slurmd.log") for n in nodes
    ]:
        st = ctx.target(name)
        log_file = f"/var/log/slurm/{path}"
        # its errors in the whole log, both boots of the rehearsal (a daemon's start-up failure
        # is long scrolled off the tail), its last lines, and on a compute node the systemd
        # scope slurmd keeps job steps in (cgroup/v2: a step cannot start once it is gone)
        script = (
            f"grep -E 'error|fatal' {log_file} 2>&1 | tail -n 6; echo '...'; "
            f"tail -n 10 {log_file} 2>&1"
        )
        if path == "slurmd.log":
            script += "; systemctl list-units --all --no-legend --plain '*slurmstepd.scope'"
        _, text = ctx.call(st, script)
        parts.append(f"--- {name} {path}\n{text[-900:]}")
    return "\n" + "\n".join(parts) + "\n"


def _unmunge_error(out: str) -> str:
    """unmunge's own words: "STATUS: Invalid credential (6)", or its error line."""
    for line in out.splitlines():
        if line.startswith("STATUS:"):
            return line.split(":", 1)[1].strip()
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[-1].removeprefix("unmunge: ").removeprefix("Error: ") if lines else "no output"
