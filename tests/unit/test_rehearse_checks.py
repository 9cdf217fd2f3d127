"""The rehearsal's checks and their prerequisites, over fake nodes: a check reaches a node only
through the context's `call`, so a table of answers stands in for the cluster."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from types import SimpleNamespace as NS

from piimage.inventory import Hardware, Node
from piimage.profiles import RoleFacts
from piimage.rehearse import CHECKS, Context, Unreachable, run_checks
from piimage.rehearse.checks import (
    BOOT_PASSED,
    HEAD_BOOTED,
    IDLE,
    ClusterCheck,
    NodeCheck,
    Round,
    cluster_check,
    node_check,
)


@dataclass
class FakeNode:
    """What a check may know of a node (checks.Target); no agent, no VM."""

    node: Node
    image: Path
    console: Path
    boot_s: float | None = 40.0
    reboots: int = 0
    failed: str | None = None
    last: dict = field(default_factory=lambda: {"state": "running"})

    @property
    def name(self) -> str:
        return self.node.hostname


def _node(name: str, ip: str, head: bool = False) -> Node:
    packages = ("slurmctld", "munge", "nfs-kernel-server") if head else ("slurmd", "munge")
    role = "head" if head else "compute"
    return Node(
        name,
        role,
        IPv4Address(ip),
        Hardware("pi4-2gb", 4, 1800),
        not head,
        facts=RoleFacts.of(packages),
    )


class FakeCluster:
    """Answers each script as a healthy cluster would, except what `sinfo` says."""

    def __init__(self, tmp_path: Path, sinfo: dict[str, str]):
        self.sinfo = sinfo
        self.calls: list[tuple[str, str]] = []
        self.token = ""  # what the shared check wrote
        self.first_boot = "none"  # no rpi-resize.service: an image like bookworm's
        self.oom_job = "job 7 exit 0\nJobState=OUT_OF_MEMORY\nnode idle"  # the containment job
        self.home_seen: str | None = None  # what a compute node reads in the home (None: token)
        self.hostfile_map = ["node01", "node02"]  # what a plain mpirun maps onto
        self.daemons = "active\nactive\nactive"  # slurmd, munge, ssh on its node afterwards
        self.digest = "d1"  # of the example jobs' results, on the head
        self.seen_digest = {"node01": "d1", "node02": "d1"}  # … and as a compute node reads them
        self.examples = (
            "pi job 8 exit 0\n"
            "pi = 3.141592653590 from 8 ranks on 2 nodes (node01 node02)\n"
            "2000000 intervals in 3.10 s; error 3.1e-13\nresult: OK\nsweep job 9 exit 0\n"
            + "".join(
                f"r={2.5 + 0.2 * i:.3f} lyapunov=-0.10000 settles"
                + (" check=OK (expected -0.10000)\n" if i < 3 else "\n")
                for i in range(8)
            )
            + "files pi-8.out results/r-2.500.txt results/r-2.700.txt\n"
            + "digest d1 -\n"
        )
        self.jobcomp = (
            "JobId=7 UserId=mpi(1500) GroupId=mpi(1500) Name=wrap JobState=OUT_OF_MEMORY "
            "Partition=cluster TimeLimit=UNLIMITED EligibleTime=x DerivedExitCode=0:0\n"
            "JobId=8 UserId=mpi(1500) GroupId=mpi(1500) Name=pi-mpi JobState=COMPLETED "
            "Partition=cluster EligibleTime=x DerivedExitCode=0:0\n"
            + "".join(
                f"JobId={9 + i} UserId=mpi(1500) GroupId=mpi(1500) Name=sweep JobState=COMPLETED "
                f"Partition=cluster EligibleTime=x ArrayJobId=9 ArrayTaskId={i} ExitCode=0:0\n"
                for i in range(8)
            )
        )
        # sacct -X -n -P -o JobID,State (accounting: slurmdbd): the same jobs
        self.sacct = "7|OUT_OF_MEMORY\n8|COMPLETED\n" + "".join(
            f"9_{i}|COMPLETED\n" for i in range(8)
        )
        nodes = [
            _node("head", "10.0.0.1", head=True),
            _node("node01", "10.0.0.11"),
            _node("node02", "10.0.0.12"),
        ]
        self.targets = []
        for n in nodes:
            (tmp_path / f"{n.hostname}.img").write_bytes(b"")
            (tmp_path / f"{n.hostname}.console.log").write_text("[ TIME ] Timed out waiting\n")
            self.targets.append(
                FakeNode(n, tmp_path / f"{n.hostname}.img", tmp_path / f"{n.hostname}.console.log")
            )
        self.cluster = NS(
            name="lab",
            roles={},
            shared=NS(path="/srv/shared", device_uuid=None),
            cluster_user=NS(name="mpi", home="/srv/shared/home/mpi"),
            admin=NS(name="admin"),
            accounting="jobcomp",
            job_nodes=tuple(nodes[1:]),  # the cluster's hostfile lists these
        )

    def context(self) -> Context:
        head = self.targets[0]
        compute = [t.node for t in self.targets[1:]]
        return Context(self.cluster, self.targets, head, compute, 600, self.call)

    def call(self, st, script: str, timeout: float = 300, *, diagnose: bool = False):
        self.calls.append((st.name, script))
        if "-token && " in script:
            self.token = re.search(r"rehearsal \d+", script).group(0)
        if st.failed and not diagnose:
            return 255, st.failed
        if st.boot_s is None:
            if diagnose:
                raise Unreachable("no answer")
            return 255, f"{st.name}: no answer"
        idle = [n for n, s in self.sinfo.items() if s == "idle"]
        # an MPI world of -n ranks (srun: MpiDefault) or one per node (mpirun), spread over idle
        m = re.search(r"srun \S+ -N\d+ -n(\d+)", script)
        size = int(m.group(1)) if m else len(idle)
        ranks = "".join(
            f"rank {i} of {size} on {idle[i % len(idle)]}: sum {size * (size + 1) // 2}\n"
            for i in range(size)
        )
        answers = [
            (r"^hostname$", st.name),
            (r"^ip -4", f"eth0 {st.node.ip}/24"),
            (r"^systemctl is-active slurmd munge ssh$", self.daemons),
            (r"^systemctl is-active", "active"),
            (r"^systemctl list-units", ""),
            (
                r"^b=\$\(basename",
                "fs=15000000000\nstart=8192\npart=30000000\ndisk=30008192\nshared=15000000000",
            ),
            (r"^echo wizard", "wizard=inactive\nnologin=no\nbanner=none"),
            (r"ConditionResult --value rpi-resize", self.first_boot),
            (r"^cat /sys/fs/cgroup", "cpu memory\n"),
            (r"^date \+%s", f"{time.time():.3f}"),
            (r"^munge -n", "MUNGE:cred:"),
            (r"unmunge", "STATUS: Success (0)"),
            (
                r"sinfo -N",
                "NODELIST STATE\n" + "".join(f"{n} {s}\n" for n, s in self.sinfo.items()),
            ),
            (r"srun -I120 -N\d+ -w \S+ hostname", "\n".join(idle)),
            (r"-token && ", ""),
            (
                r"cat \S+-token ~mpi/\.piimage-rehearsal-home",
                f"{self.token}\n{self.token if self.home_seen is None else self.home_seen}\n",
            ),
            (r"mpi\.py", ranks),
            (r"pi\.sbatch", self.examples),
            (r"\| sha256sum'?$", f"{self.seen_digest.get(st.name, '')}  -"),
            (r"^cd \S+ 2>/dev/null .*cat /var/log/slurm/jobcomp\.log", self.jobcomp),
            (r"sbatch --parsable --wait", self.oom_job),
            (r"sacct -X -n -P -o JobID,State -j 7,8,9'?$", self.sacct),
            (r"^awk '/\^SwapTotal:/", "511"),
            (
                r"--do-not-launch",
                "".join(f" Data for node: {n}\tNum slots: 4\n" for n in self.hostfile_map),
            ),
            (r"^ssh-keyscan", f"ssh-ed25519 KEY-{st.name}"),
            (
                r"ssh-keygen -F",
                "\n".join(f"{h} ssh-ed25519 KEY-{h}" for h in ("head", "node01", "node02")),
            ),
            (r"ssh -o BatchMode.* (\S+) hostname", None),
            (r"^rm -f", ""),
            (r"^grep -E 'error\|fatal' /var/log/slurm/(\S+)", None),  # its name: the log it read
        ]
        for pattern, out in answers:
            m = re.search(pattern, script)
            if m:
                return 0, (m.group(1) if out is None else out)
        raise AssertionError(f"unexpected script on {st.name}: {script}")


def _names(results) -> list[str]:
    return [f"{c.name} {c.node}" for c in results]


def test_every_check_runs_in_report_order_when_all_is_well(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    results = run_checks(fake.context())
    assert all(c.ok for c in results), [(c.name, c.node, c.summary) for c in results if not c.ok]
    per_node = ["boot", "hostname", "address", "services"]
    first_boot = ["units", "enablement", "root", "login", "memcg"]
    # enablement has nothing to say without profiles: it adds no result
    first_boot.remove("enablement")
    assert _names(results) == (
        [f"{c} {n}" for n in ("head", "node01", "node02") for c in per_node]
        + [f"{c} {n}" for n in ("head", "node01", "node02") for c in first_boot]
        + ["clock head", "clock node01", "clock node02", "munge node01", "munge node02"]
        + ["sinfo head", "srun head", "shared node01", "shared node02", "mpi head", "oom head"]
        + ["examples head", "history head"]
        + ["hostkey head", "hostkey node01", "hostkey node02", "ssh node01", "ssh node02"]
        + ["mpirun head", "hostfile head"]
    )
    # what the checks left in the shared directory goes, in one command, at the end
    assert fake.calls[-1] == (
        "head",
        "rm -f /srv/shared/.piimage-rehearsal-token /srv/shared/.piimage-rehearsal-mpi.py "
        "/srv/shared/home/mpi/.piimage-rehearsal-home /srv/shared/.piimage-rehearsal-hostfile",
    )


def test_no_idle_node_reports_both_jobs_not_run_where_srun_stands(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "down*", "node02": "drain"})
    results = run_checks(fake.context())
    names = _names(results)
    i = names.index("sinfo head")
    assert names[i:] == [
        "sinfo head",
        "srun head",
        "mpi head",
        "oom head",
        "shared node01",
        "shared node02",
        "hostfile head",  # only mapped, so it needs no idle node
    ]
    for c in results[i + 1 : i + 4]:
        assert not c.ok and c.summary == "not run: node01 is down*; node02 is drain"
    # hostkey, ssh and mpirun need an idle compute node: skipped without a word
    assert fake.calls[-1][1].startswith("rm -f ") and "hostfile" not in fake.calls[-1][1]


def test_one_idle_node_runs_the_jobs_there_and_says_who_was_left_out(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "down"})
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    assert not results["sinfo", "head"].ok
    assert results["srun", "head"].summary == "srun -N1 hostname: node01 (node02 is down: left out)"
    assert results["mpi", "head"].summary.endswith("allreduce sum 3 (node02 is down: left out)")


def test_a_head_that_did_not_boot_stops_the_checks_after_each_node_own(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.targets[0].boot_s = None
    fake.targets[0].last = {}
    results = run_checks(fake.context())
    boot = results[0]
    assert (boot.name, boot.node, boot.ok) == ("boot", "head", False)
    assert boot.summary.startswith("did not finish booting in 600 s (system not answering); see ")
    assert "(the node does not answer)" in boot.output and "Timed out waiting" in boot.output
    assert {c.name for c in results} == {
        "boot",
        "hostname",
        "address",
        "services",
        "units",
        "root",
        "login",
        "memcg",
    }
    assert [name for name, _ in fake.calls].count("head") == 1  # only the boot's diagnosis


def test_failed_node_is_asked_only_through_call(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "down"})
    st = fake.targets[2]
    st.failed = "QEMU exited (code 1); see node02.console.log"
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    # booted, then lost: its own checks fail with why, the first-boot checks skip it
    assert results["boot", "node02"].ok
    assert results["hostname", "node02"].summary == f"hostname is {st.failed!r}, expected 'node02'"
    assert ("units", "node02") not in results and ("hostkey", "node02") not in results
    assert results["munge", "node02"].summary.startswith("node02 cannot decode a credential")


def test_registry_skips_by_prerequisite():
    seen = []

    @node_check("a")
    def a(ctx, st):
        seen.append(f"a {st.name}")
        if st.name == "n1":
            ctx.node_facts[st.name].add(BOOT_PASSED)

    @node_check("b", needs=BOOT_PASSED)
    def b(ctx, st):
        seen.append(f"b {st.name}")

    @cluster_check("c", HEAD_BOOTED, IDLE, not_run={IDLE: ("c", "d")})
    def c(ctx):
        seen.append("c")

    @cluster_check("e", IDLE)
    def e(ctx):
        seen.append("e")

    assert isinstance(a, NodeCheck) and isinstance(c, ClusterCheck)
    n1, n2 = (FakeNode(_node(n, "10.0.0.9"), Path("/i"), Path("/c")) for n in ("n1", "n2"))
    ctx = Context(NS(), [n1, n2], n1, [], 60, call=None)
    ctx.missing[IDLE] = "n2 is down"
    results = run_checks(ctx, (Round(a, b), c, e))
    assert seen == ["a n1", "b n1", "a n2"]
    assert [(r.name, r.node, r.ok, r.summary) for r in results] == [
        ("c", "n1", False, "not run: n2 is down"),
        ("d", "n1", False, "not run: n2 is down"),
    ]
    # a need missing that the check does not report is a silent skip
    n1.boot_s = None
    ctx = Context(NS(), [n1, n2], n1, [], 60, call=None)
    assert run_checks(ctx, (c, e)) == []


def test_registry_names_the_checks_of_the_report_in_order():
    names = []
    for entry in CHECKS:
        names += [c.name for c in entry.checks] if isinstance(entry, Round) else [entry.name]
    assert names == [
        "boot",
        "hostname",
        "address",
        "services",
        "units",
        "enablement",
        "root",
        "firstboot",
        "login",
        "memcg",
        "clock",
        "munge",
        "sinfo",
        "srun",
        "shared",
        "mpi",
        "oom",
        "examples",
        "history",
        "hostkey",
        "ssh",
        "mpirun",
        "hostfile",
    ]


def test_first_boot_is_checked_where_the_image_has_first_boot_units(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.first_boot = "yes"
    results = run_checks(fake.context())
    assert [c.node for c in results if c.name == "firstboot"] == ["head", "node01", "node02"]
    assert all(c.ok for c in results)
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.first_boot = "no"  # an empty machine-id: systemd saw no first boot
    bad = [c for c in run_checks(fake.context()) if c.name == "firstboot"]
    assert bad and not any(c.ok for c in bad)
    assert "was not a first boot" in bad[0].summary and "uninitialized" in bad[0].summary


def test_a_plain_mpirun_must_map_onto_the_clusters_hostfile(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    good = {(c.name, c.node): c for c in run_checks(fake.context())}["hostfile", "head"]
    assert good.ok and good.summary.startswith("a plain mpirun maps onto node01 node02"), good
    script = next(s for _, s in fake.calls if "--do-not-launch" in s)
    assert "--hostfile" not in script and "-np 2" in script
    fake.hostfile_map = ["localhost"]  # the package's own default hostfile: one slot, here
    bad = {(c.name, c.node): c for c in run_checks(fake.context())}["hostfile", "head"]
    assert not bad.ok
    assert bad.summary == (
        "a plain mpirun (no --hostfile) maps onto localhost, not the cluster's node01 node02"
    )


def test_containment_that_does_not_hold_is_named(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    good = {(c.name, c.node): c for c in run_checks(fake.context())}["oom", "head"]
    assert good.ok and "(swap 511 MiB)" in good.summary, good.summary
    fake.oom_job = "job 7 exit 0\nJobState=COMPLETED\nnode idle"  # the job was not limited
    fake.daemons = "inactive\nactive\nactive"
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    oom = results["oom", "head"]
    assert not oom.ok
    assert oom.summary == (
        "containment on node01: the job over its --mem=64M was not killed out of memory; "
        "daemons down: slurmd inactive, munge active, ssh active"
    )
    assert "JobState=COMPLETED" in oom.output
    # a failed job check ends with the logs that say why: slurmctld's and its nodes' slurmd's
    assert oom.output.index("--- head slurmctld.log\nslurmctld.log") < oom.output.index(
        "--- node01 slurmd.log\nslurmd.log"
    )
    assert "--- node02" not in oom.output


def test_a_home_that_is_not_the_heads_is_named(tmp_path):
    """A compute node whose cluster user's home is its own card's, not the head's over NFS."""
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.home_seen = "cat: /srv/shared/home/mpi/.piimage-rehearsal-home: No such file"
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    bad = results["shared", "node01"]
    assert not bad.ok and bad.summary == (
        "node01 cannot read the files head wrote in /srv/shared and in mpi's home "
        "/srv/shared/home/mpi"
    )
    assert "No such file" in bad.output
    # the head wrote the token into the home passwd gives, as the cluster user
    write = next(s for n, s in fake.calls if n == "head" and "-token && " in s)
    assert "cp /srv/shared/.piimage-rehearsal-token ~mpi/.piimage-rehearsal-home" in write
    assert "runuser -u mpi" in write


def test_example_jobs_and_their_history_are_checked(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    ex = results["examples", "head"]
    assert ex.ok and ex.summary == (
        "sbatch pi.sbatch: pi = 3.141592653590 from 8 ranks on node01,node02; sbatch "
        "sweep.sbatch: 8 array tasks, 3 checked against the exact answer; the same results on "
        "node01,node02"
    )
    # submitted by the cluster user, from the examples folder, on the idle nodes
    script = next(s for h, s in fake.calls if "pi.sbatch" in s)
    assert "runuser -u mpi" in script and "cd /srv/shared/examples" in script
    assert "-N2 -w node01,node02 pi.sbatch" in script
    # each node reads the files the head listed, by name
    reads = [s for h, s in fake.calls if h != "head" and "sha256sum" in s]
    assert len(reads) == 2 and all("cat pi-8.out results/r-2.500.txt results/" in s for s in reads)
    hist = results["history", "head"]
    assert hist.ok and hist.summary == (
        "/var/log/slurm/jobcomp.log lists 7 OUT_OF_MEMORY, 8 COMPLETED, array 9 COMPLETED"
    )


def test_example_jobs_that_go_wrong_are_named(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the history check's wait for the log
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.examples = fake.examples.replace(
        "check=OK (expected -0.10000)\nr=2.900", "check=WRONG\nr=2.900"
    )
    fake.seen_digest["node02"] = "stale"
    fake.jobcomp = fake.jobcomp.replace("JobState=OUT_OF_MEMORY", "JobState=COMPLETED")
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    ex = results["examples", "head"]
    assert not ex.ok and ex.summary == (
        "example jobs in /srv/shared/examples: sweep.sbatch did not give 8 results, 3 checked; "
        "the compute nodes do not see the head's results: node02"
    )
    hist = results["history", "head"]
    assert not hist.ok
    assert hist.summary == "/var/log/slurm/jobcomp.log lacks 7 OUT_OF_MEMORY"


def test_sacct_lists_the_jobs_with_accounting_slurmdbd(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the wait for slurmdbd's records
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.cluster.accounting = "slurmdbd"
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    hist = results["history", "head"]
    assert hist.ok and hist.summary == (
        "sacct lists 7 OUT_OF_MEMORY, 8 COMPLETED, array 9 COMPLETED; "
        "/var/log/slurm/jobcomp.log lists 7 OUT_OF_MEMORY, 8 COMPLETED, array 9 COMPLETED"
    )
    query = next(s for h, s in fake.calls if "sacct" in s)
    assert "runuser -u mpi" in query  # what a user sees, not root
    # a task missing (slurmdbd down while it ended) or a state that differs is named
    fake.sacct = "7|CANCELLED by 0\n8|COMPLETED\n" + "".join(f"9_{i}|COMPLETED\n" for i in range(7))
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    hist = results["history", "head"]
    assert not hist.ok
    assert hist.summary.startswith("sacct lacks 7 OUT_OF_MEMORY, array 9 COMPLETED; ")
    assert "$ sacct -X -n -P -o JobID,State -j 7,8,9" in hist.output


def test_examples_are_not_run_when_a_drive_is_the_shared_directory(tmp_path):
    fake = FakeCluster(tmp_path, {"node01": "idle", "node02": "idle"})
    fake.cluster.shared.device_uuid = "0b6c2a4e-1f2d-4c3b-9a8e-7d6f5e4c3b2a"
    results = {(c.name, c.node): c for c in run_checks(fake.context())}
    assert ("examples", "head") not in results
    assert results["history", "head"].summary == "/var/log/slurm/jobcomp.log lists 7 OUT_OF_MEMORY"
