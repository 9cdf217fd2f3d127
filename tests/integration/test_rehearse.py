"""`piimage rehearse` for real, on both releases: head + two compute nodes built from the
stand-in boot under qemu-system-aarch64 the way a Raspberry Pi boots a card (piboot.py), on a
private virtual network, and first boot, SLURM, munge, NFS, SSH and MPI are checked on them. A
third compute node with another cluster's munge key and piimage's old first-boot behaviour boots
with them and must be caught."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from clihelp import CLUSTER_YAML, piimage, pubkey, start_piimage
from phases import record

from piimage.fsutil import sha256_file as _sha

pytestmark = [pytest.mark.integration, pytest.mark.slow]


_RUN_DIRS_BEFORE = {str(p) for p in Path("/var/tmp").glob("piimage-rehearse-*")}


def leftovers(scope: Path) -> list[str]:
    """QEMU machines or overlays a rehearsal of the images under `scope` could leave behind.
    Only this test's: another rehearsal on the machine (a second session, a user's) is not
    ours, so processes count when their command line names `scope` (the console log is
    there) and run directories when they appeared since this module was imported and are
    still there."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if (
            cmd.startswith("qemu-system-aarch64")
            and "piimage-rehearse-" in cmd
            and str(scope) in cmd
        ):
            found.append(f"process {pid}: {cmd[:120]}")
    found += [
        f"run dir {p}"
        for p in Path("/var/tmp").glob("piimage-rehearse-*")
        if str(p) not in _RUN_DIRS_BEFORE and _ours(p, scope)
    ]
    return found


def _ours(run_dir: Path, scope: Path) -> bool:
    """A run directory of a rehearsal of images under `scope`: its `images` file says which
    images it boots (the other test lane's rehearsal names its own). Without the file (just
    made, or being removed), by whether QEMU of another rehearsal uses it."""
    try:
        images = (run_dir / "images").read_text().strip()
    except OSError:
        return run_dir.exists() and not _in_use_elsewhere(run_dir, scope)
    return Path(images).is_relative_to(scope.absolute())


def _in_use_elsewhere(run_dir: Path, scope: Path) -> bool:
    """A run directory that a QEMU process of another rehearsal (not under `scope`) uses."""
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(run_dir) in cmd and str(scope) not in cmd:
                return True
    return False


# The test cluster plus node03, whose image is built in another folder: the same secrets but
# another munge key, and a stage of that folder's own that gives node03 piimage's behaviour from
# before the faithful first boot (issue 10's two high bugs): on trixie an empty machine-id (no
# first boot to systemd, so rpi-resize.service and the other first-boot units never run; the
# root grows all the same, as on a Pi: rpi-resize stays enabled, and its Wants= pulls
# systemd-growfs-root.service in on every boot whatever its ConditionFirstBoot says, since
# systemd.unit(5) conditions do not conditionalize dependencies), on bookworm its SSH host key
# at the default path (which
# Raspberry Pi OS's first boot replaces). All four boot together once per release, and every
# check below reads that one run: a second boot for the broken cases would cost minutes.
CLUSTER4_YAML = CLUSTER_YAML + "  - {{hostname: node03, role: compute, ip: 10.0.0.13}}\n"
GOOD = ("head", "node01", "node02")
BASES = {"trixie": "raspios-lite-arm64", "bookworm": "raspios-lite-arm64-legacy"}
OLD_BEHAVIOUR = {
    "trixie": """description: piimage before issue 10 - an empty machine-id (no first boot)
scope: node
roles: [all]
files:
  - {path: /etc/machine-id, template: empty.j2, mode: "0444"}
""",
    "bookworm": """description: piimage before issue 10 - the host key where the first boot replaces it
scope: node
roles: [all]
files:
  - {path: /etc/ssh/ssh_host_ed25519_key, secret: ssh_host_ed25519_key, mode: "0600"}
  - {path: /etc/ssh/sshd_config.d/50-piimage.conf, template: sshd.conf.j2}
""",
}
OLD_SSHD = "PermitRootLogin no\nHostKey /etc/ssh/ssh_host_ed25519_key\n"
# what node03 must fail, besides munge (and the head's sinfo, which names it as not idle)
BUG_CHECKS = {
    "trixie": {("firstboot", "node03")},
    "bookworm": {("hostkey", "node03"), ("ssh", "node03")},
}


# job history: the trixie cluster keeps the default completion log, the bookworm one has
# slurmdbd and MariaDB on its head (sacct), so CI rehearses each
ACCOUNTING = {"trixie": "jobcomp", "bookworm": "slurmdbd"}


def _cluster_yaml(env, suite: str) -> str:
    text = CLUSTER4_YAML.format(key=pubkey(env), node02_ip="10.0.0.12").replace(
        "base: raspios-lite-arm64\n", f"base: {BASES[suite]}\n"
    )
    return text + ("accounting: slurmdbd\n" if ACCOUNTING[suite] == "slurmdbd" else "")


@pytest.fixture(scope="module")
def cluster(env, standin_trixie, tmp_path_factory):
    """The trixie cluster (head, node01, node02, node03), built once (role layers shared with
    test_build): the rehearsal below and the input and interrupt tests use it."""
    return _build(env, tmp_path_factory, "trixie")


def _build(env, tmp_path_factory, suite: str) -> Path:
    cwd = tmp_path_factory.mktemp(f"rehearse-{suite}")
    (cwd / "cluster.yaml").write_text(_cluster_yaml(env, suite))
    piimage(["build", "--all", "--compress", "none"], env, cwd)
    return cwd


@pytest.fixture(scope="module", params=list(BASES))
def rehearsal(request, env, tmp_path_factory):
    """One rehearsal per release of head, node01, node02 as built and node03 as described
    above. The bookworm one needs only the bookworm stand-in, so on a cold machine it runs
    while the trixie stand-in is still being built (conftest's test order)."""
    suite = request.param
    request.getfixturevalue(f"standin_{suite}")
    good_dir = (
        request.getfixturevalue("cluster")
        if suite == "trixie"
        else _build(env, tmp_path_factory, suite)
    )
    other = tmp_path_factory.mktemp(f"other-{suite}")
    stage = other / "old-stages" / "90-old-behaviour"
    (stage / "files").mkdir(parents=True)
    (stage / "stage.yaml").write_text(OLD_BEHAVIOUR[suite])
    (stage / "files" / "empty.j2").write_text("")
    (stage / "files" / "sshd.conf.j2").write_text(OLD_SSHD)
    (other / "cluster.yaml").write_text(
        (good_dir / "cluster.yaml").read_text() + "stages: [old-stages]\n"
    )
    shutil.copytree(good_dir / ".piimage", other / ".piimage")
    munge = other / ".piimage" / "secrets" / "munge.key"
    munge.write_bytes(os.urandom(1024))  # the one secret that differs
    piimage(["build", "--hostname", "node03", "--compress", "none"], env, other)
    good, bad = good_dir / "out" / "testcluster", other / "out" / "testcluster"
    mixed = tmp_path_factory.mktemp(f"mixed-{suite}") / "testcluster"
    mixed.mkdir()
    for h in GOOD:
        os.link(good / f"{h}.img", mixed / f"{h}.img")
    os.link(bad / "node03.img", mixed / "node03.img")
    images = {h: mixed / f"{h}.img" for h in (*GOOD, "node03")}
    before = {h: _sha(p) for h, p in images.items()}
    # One cluster booting on the machine at a time: the two lanes' four-VM clusters booting
    # side by side on two cores made the boots take ~950 s and D-Bus calls inside the guests
    # time out (nm-online: "timeout creating NMClient object"), a load no Pi sees. Once this
    # one runs its checks (jobs, mostly waiting: a rehearsal alone kept the two cores ~65 %
    # busy), the other lane's cluster may boot. --timeout: the wait for the cluster, raised
    # from 1200 s for a host that is busy with the other lane's builds; a passing run ends
    # when every node has settled, so it costs nothing then.
    # On the release in VERIFIED the cluster is held after its checks, and `piimage verify`
    # runs against it over SSH from the rehearsal's laptop namespace before it is ended.
    verified: dict = {}

    def on_line(line: str) -> None:
        if "running the checks" in line:
            release()
        if "holding the cluster" in line:
            _verify_held(good_dir, mixed, env, verified)

    with one_boot_at_a_time() as release:
        proc = _rehearse(good_dir, mixed, env, on_line=on_line, hold=suite in VERIFIED)
    after = {h: _sha(p) for h, p in images.items()}
    return (*_outcome(suite, proc, mixed, before, after), verified)


# Day two runs against one release's held rehearsal (the code is the same on both; a second
# run would cost the other lane minutes of jobs): the cluster grows by node04, built alone from
# the edited inventory and booted beside the running nodes, `apply` brings the others up to
# date, and `verify` checks all five over SSH from the laptop namespace. In CI: the trixie lane
# ended at 45 min against the bookworm lane's 58 (run of 2026-12-06), and day two took 1819 s
# in its first side run beside a CI run. PIIMAGE_TEST_DAY_TWO=0 leaves it out.
VERIFIED = () if os.environ.get("PIIMAGE_TEST_DAY_TWO") == "0" else ("trixie",)
NODE04 = "  - {hostname: node04, role: compute, ip: 10.0.0.14}\n"


def _verify_held(good_dir: Path, mixed: Path, env, verified: dict) -> None:
    """Grow the held cluster and check it as a user would from a laptop on its switch (the
    admin's key, host keys from the secrets), then end the rehearsal."""
    import signal
    import sys

    info = json.loads((mixed / "rehearsal" / "laptop.json").read_text())
    laptop = ["ip", "netns", "exec", info["netns"], sys.executable, "-m", "piimage.cli"]
    key = ["--identity", str(Path(env["HOME"]) / ".ssh" / "id_ed25519")]
    t0 = time.monotonic()
    try:
        verified["netns"] = info["netns"]
        (run_dir,) = Path("/var/tmp").glob(f"piimage-rehearse-{info['pid']}-*")
        verified["overlays"] = {p.name: _inode(p) for p in run_dir.glob("*.qcow2")}
        # the owner adds node04 to cluster.yaml (in a copy: other tests read good_dir's) and
        # builds only its image, with the cluster's secrets
        grown = good_dir.parent / f"{good_dir.name}-grown"
        grown.mkdir()
        shutil.copytree(good_dir / ".piimage", grown / ".piimage")
        (grown / "cluster.yaml").write_text((good_dir / "cluster.yaml").read_text() + NODE04)
        inv = ["-i", str(grown / "cluster.yaml")]
        verified["build"] = piimage(
            ["build", "--hostname", "node04", "--compress", "none"], env, grown, check_rc=None
        )
        os.link(grown / "out" / "testcluster" / "node04.img", mixed / "node04.img")
        # its card powered on beside the running cluster (one boot on the machine at a time,
        # as for whole clusters), then the README's day-two commands
        with one_boot_at_a_time():
            verified["join"] = piimage(
                ["rehearse", "--join", "node04", *inv, "--out", str(mixed.parent)]
                + ["--timeout", "2400"],
                env,
                grown,
                check_rc=None,
            )
        for name, args in (
            ("dry-run", ["apply", "--dry-run", *inv, *key]),
            ("apply", ["apply", *inv, *key]),
            ("dry-run after", ["apply", "--dry-run", *inv, *key]),
            ("verify", ["verify", "--json", *inv, "--out", str(mixed.parent), *key]),
        ):
            t1 = time.monotonic()
            verified[name] = subprocess.run(
                laptop + args, env=env, cwd=grown, capture_output=True, text=True, timeout=1800
            )
            record(f"piimage {name} over SSH (held trixie rehearsal)", time.monotonic() - t1, t1)
        verified["report.json"] = (mixed / "verify" / "report.json").read_text()
        # munge stopped on node04 (drained first, so that no job is sent to a node that cannot
        # take it): verify fails and names the node and the check
        ssh = ["ip", "netns", "exec", info["netns"], "ssh", "-i", key[1], "-o", "BatchMode=yes"]
        ssh += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        for name, host, command in (
            (
                "drain node04",
                "10.0.0.10",
                "scontrol update nodename=node04 state=drain reason=test",
            ),
            ("stop munge", "10.0.0.14", "systemctl stop munge"),
        ):
            verified[name] = subprocess.run(
                [*ssh, f"alice@{host}", f"sudo -n {command}"],
                capture_output=True,
                text=True,
                timeout=120,
            )
        t1 = time.monotonic()
        verified["verify, munge stopped"] = subprocess.run(
            laptop
            + ["verify", "--json", *inv, "--nodes", "head,node04", "--out", str(mixed.parent)]
            + key,
            env=env,
            cwd=grown,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        record("piimage verify, munge stopped on node04", time.monotonic() - t1, t1)
        verified["overlays after"] = {p.name: _inode(p) for p in run_dir.glob("*.qcow2")}
        record(
            "day two on the held trixie rehearsal: grow, apply, verify", time.monotonic() - t0, t0
        )
    finally:
        os.kill(info["pid"], signal.SIGTERM)


def _inode(p: Path) -> int:
    """Which file an overlay is (a running VM writes to it, so its times change; a recreated
    one would be another inode)."""
    return p.stat().st_ino


@contextmanager
def one_boot_at_a_time():
    """An flock shared by every pytest worker on the machine, held from power-on until the
    rehearsal starts its checks (the `release` it yields, or the end of the block); the wait
    goes into the phases."""
    with open(Path(tempfile.gettempdir()) / "piimage-tests-rehearsal.lock", "a") as f:
        t0 = time.monotonic()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.monotonic() - t0
        if waited > 1:
            record("waiting for the other lane's cluster to boot", waited, t0)
        held = [True]

        def release() -> None:
            if held[0]:
                held[0] = False
                fcntl.flock(f, fcntl.LOCK_UN)

        try:
            yield release
        finally:
            release()


def _rehearse(
    good_dir: Path, mixed: Path, env, on_line=None, hold: bool = False
) -> subprocess.CompletedProcess:
    return piimage(
        [
            "rehearse",
            "-i",
            str(good_dir / "cluster.yaml"),
            "--out",
            str(mixed.parent),
            "--json",
            "--timeout",
            "2400",
            *(["--hold"] if hold else []),
        ],
        env,
        good_dir,
        check_rc=None,
        on_line=on_line,
    )


def _outcome(suite: str, proc, mixed: Path, before: dict, after: dict):
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
    assert report is not None, f"no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    print(
        f"\nrehearsal figures ({suite}):",
        json.dumps(
            {
                "boot_seconds": report["boot_seconds"],
                "ready_seconds": report["ready_seconds"],
                "checks": {f"{c['name']} {c['node']}": c["seconds"] for c in report["checks"]},
            }
        ),
    )
    # the rehearsal's own split in the phase table: the wait for the cluster and the checks
    if report.get("ready_seconds") is not None:
        record(f"rehearse {suite}: boots until the cluster was ready", report["ready_seconds"])
    timed_checks = [c for c in report["checks"] if c.get("seconds")]
    record(f"rehearse {suite}: all checks", sum(c["seconds"] for c in timed_checks))
    for c in sorted(timed_checks, key=lambda c: -c["seconds"])[:3]:
        record(f"rehearse {suite}: check {c['name']} {c['node'] or ''}".rstrip(), c["seconds"])
    return suite, proc, report, mixed, before, after


def test_rehearsal_of_a_working_cluster(rehearsal):
    suite, proc, report, mixed, before, after, _ = rehearsal
    assert report["nodes"] == ["head", "node01", "node02", "node03"]
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    # every check of the three good nodes passes: the only failures are node03's (next tests)
    failed = {k for k, c in checks.items() if not c["ok"]}
    assert failed == {("munge", "node03"), ("sinfo", "head")} | BUG_CHECKS[suite], (
        "\n".join(
            f"{c['name']} {c['node']}: {c['summary']}\n{c['output'][-1500:]}"
            for k, c in checks.items()
            if k in failed
        )
        + f"\n{proc.stderr[-4000:]}"
    )
    # every node booted as a Pi boots the card: its own cmdline.txt after the device tree's
    # bootargs (the memory cgroup off, then back on from cmdline.txt), a reboot on bookworm's
    # first boot, and came back; the figures go into the issue note
    assert all(isinstance(report["boot_seconds"][h], float) for h in (*GOOD, "node03"))
    for h in (*GOOD, "node03"):
        lines = report["boot_cmdlines"][h]
        assert all(
            "cgroup_disable=memory" in ln.split() and ln.split()[-1] == "cgroup_enable=memory"
            for ln in lines
        ), lines
        assert all("net.ifnames=0" not in ln and "root=PARTUUID=" in ln for ln in lines), lines
        if suite == "bookworm":
            assert len(lines) == 2 and "init=/usr/lib/raspberrypi-sys-mods/firstboot" in lines[0], (
                lines
            )
            # the first boot gave the card a new disk identifier, and cmdline.txt followed it
            ids = [re.search(r"root=PARTUUID=([0-9a-f]{8})-02", ln).group(1) for ln in lines]
            assert "firstboot" not in lines[1] and ids[0] != ids[1], lines
        else:
            assert len(lines) == 1 and " resize" in lines[0], lines
    for node in GOOD:
        for name in (
            "boot",
            "hostname",
            "address",
            "services",
            "units",
            "enablement",
            "root",
            "login",
            "memcg",
            "clock",
            "hostkey",
            *(("firstboot",) if suite == "trixie" else ()),
        ):
            assert checks[(name, node)]["ok"], checks[(name, node)]
    for node in ("node01", "node02"):
        for name in ("munge", "shared", "ssh"):
            assert checks[(name, node)]["ok"], checks[(name, node)]
    for name in ("srun", "mpi", "oom", "examples", "history", "mpirun", "hostfile"):
        assert checks[(name, "head")]["ok"], checks[(name, "head")]
    # a plain mpirun with no --hostfile maps onto every node of the cluster's hostfile (Open
    # MPI 4's or PRRTE's default hostfile, by release)
    assert checks[("hostfile", "head")]["summary"].startswith(
        "a plain mpirun maps onto node01 node02 node03"
    ), checks[("hostfile", "head")]
    # the example jobs ran on both good compute nodes, one rank per core, and the completion
    # log lists them and the out-of-memory job with their states
    assert re.match(
        r"sbatch pi\.sbatch: pi = 3\.14159265\d+ from 8 ranks on node01,node02; ",
        checks[("examples", "head")]["summary"],
    ), checks[("examples", "head")]
    jobs = r"\d+ OUT_OF_MEMORY, \d+ COMPLETED, array \d+ COMPLETED"
    assert re.fullmatch(
        (rf"sacct lists {jobs}; " if ACCOUNTING[suite] == "slurmdbd" else "")
        + rf"/var/log/slurm/jobcomp\.log lists {jobs}",
        checks[("history", "head")]["summary"],
    ), checks[("history", "head")]
    if ACCOUNTING[suite] == "slurmdbd":  # its database and daemon are up on the head
        assert "mariadb" in checks[("services", "head")]["summary"], checks[("services", "head")]
        assert "slurmdbd" in checks[("services", "head")]["summary"]
    # the nodes have Raspberry Pi OS's swap, and the job over its memory was killed all the
    # same: bookworm's 512 MB swap file (dphys-swapfile), trixie's rpi-swap zram device of the
    # board's RAM (pi4-2gb: MemTotal ~1853 MiB; at most 2048)
    swap = re.search(r"\(swap (\d+) MiB\)", checks[("oom", "head")]["summary"])
    assert swap, checks[("oom", "head")]
    low, high = (400, 512) if suite == "bookworm" else (1700, 2048)
    assert low <= int(swap.group(1)) <= high, checks[("oom", "head")]
    # the root filesystem spans the 8 GB card, and the head's shared directory has that room
    assert re.match(
        r"root filesystem [67]\.\d GiB on a 8\.0 GiB card", checks[("root", "node01")]["summary"]
    )
    assert "/clusterfs has" in checks[("root", "head")]["summary"]
    # sinfo: node01 and node02 idle, only node03 is not
    assert re.fullmatch(r"node03 is \S+", checks[("sinfo", "head")]["summary"]), checks[
        ("sinfo", "head")
    ]
    assert re.search(r"^node01\s+idle$", checks[("sinfo", "head")]["output"], re.MULTILINE)
    assert re.search(r"^node02\s+idle$", checks[("sinfo", "head")]["output"], re.MULTILINE)
    assert {"node01", "node02"} <= set(checks[("srun", "head")]["output"].split())
    # a plain `srun -N2 -n4` (MpiDefault=pmix): one world of 4 ranks over both nodes (Slurm
    # may place them 3 + 1, as it did on bookworm); mpirun: one rank per node
    for name, size in (("mpi", 4), ("mpirun", 2)):
        out = checks[(name, "head")]["output"]
        ranks = re.findall(
            rf"rank (\d) of {size} on (node0[12]): sum {size * (size + 1) // 2}", out
        )
        assert sorted(r for r, _ in ranks) == [str(i) for i in range(size)], out
        assert {h for _, h in ranks} == {"node01", "node02"}, out
    # the consoles and the report are kept; the flashable images are untouched
    logs = mixed / "rehearsal"
    for h in (*GOOD, "node03"):
        assert "Linux version" in (logs / f"{h}.console.log").read_text(errors="replace")
    assert json.loads((logs / "report.json").read_text()) == report
    assert after == before
    assert leftovers(mixed) == []


def test_rehearsal_catches_a_foreign_munge_key(rehearsal):
    """node03's munge key is another cluster's: the report names the node and the check."""
    _, proc, report, _, _, _, _ = rehearsal
    assert proc.returncode == 1, (
        f"rehearse should fail:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert report["ok"] is False
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    munge = checks[("munge", "node03")]
    assert not munge["ok"]
    assert re.fullmatch(
        r"node03 cannot decode a credential from head: .*Invalid credential.*", munge["summary"]
    ), munge
    assert "rehearsal failed:" in proc.stderr and "node03 munge" in proc.stderr
    assert not checks[("sinfo", "head")]["ok"] and "node03" in checks[("sinfo", "head")]["summary"]
    assert checks[("boot", "head")]["ok"] and checks[("boot", "node03")]["ok"]
    # the jobs ran on the good nodes and say which node they left out
    assert (
        "node03 is" in checks[("srun", "head")]["summary"]
        and "left out" in checks[("srun", "head")]["summary"]
    )


def test_rehearsal_catches_the_old_first_boot_bug(rehearsal):
    """node03 built as piimage built images before the faithful first boot fails exactly the
    check for its release's bug, named with the node."""
    suite, _, report, _, _, _, _ = rehearsal
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    if suite == "trixie":
        first = checks[("firstboot", "node03")]
        assert not first["ok"] and "was not a first boot" in first["summary"], first
    else:
        key = checks[("hostkey", "node03")]
        assert (
            not key["ok"]
            and "not the one ssh_known_hosts lists on head, node01, node02" in key["summary"]
        ), key
        ssh = checks[("ssh", "node03")]
        assert not ssh["ok"] and "cannot SSH to node03" in ssh["summary"], ssh


def test_day_two_grow_the_held_cluster_apply_and_verify_over_ssh(rehearsal):
    """Issue 12's day two on the held trixie rehearsal, from its laptop namespace: node04 added
    to cluster.yaml and built alone joins the running cluster; `apply --dry-run` shows what
    the running nodes lack, `apply` writes it (and reconfigures Slurm), after which a dry run
    shows nothing; `verify` over SSH then finds node04 idle in Slurm, running jobs and MPI with
    the old nodes, and every good node passing — and names node03's foreign munge key, as the
    rehearsal did. No running node's card was re-flashed (overlays kept) or rebuilt."""
    suite, _, rehearsed, mixed, before, after, verified = rehearsal
    if suite not in VERIFIED:
        pytest.skip(
            "day two runs on the held trixie rehearsal only (the same code on both releases)"
            + (", and not with PIIMAGE_TEST_DAY_TWO=0" if suite == "trixie" else "")
        )

    def out(name: str) -> str:
        p = verified[name]
        return f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"

    assert verified["build"].returncode == 0, out("build")
    assert verified["join"].returncode == 0, out("join")
    assert "node04 booted in" in verified["join"].stdout, out("join")
    dry = verified["dry-run"]
    assert dry.returncode == 0 and "nothing was written" in dry.stdout, out("dry-run")
    for node in ("head", "node01", "node02"):
        assert f"+++ {node}:/etc/hosts (cluster.yaml)" in dry.stdout, out("dry-run")
        assert f"+++ {node}:/etc/slurm/slurm.conf (cluster.yaml)" in dry.stdout, out("dry-run")
    assert re.search(r"^\+NodeName=node04 ", dry.stdout, re.M), out("dry-run")
    assert "node04       up to date" in dry.stdout, out("dry-run")
    assert verified["apply"].returncode == 0, out("apply")
    assert "scontrol reconfigure" in verified["apply"].stdout, out("apply")
    again = verified["dry-run after"]
    assert again.returncode == 0 and "the cluster is up to date" in again.stdout, out(
        "dry-run after"
    )

    proc = verified["verify"]
    assert proc.stdout.strip().startswith("{"), out("verify")
    report = json.loads(proc.stdout)
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    assert proc.returncode == 1 and report["kind"] == "verify", out("verify")
    assert "verify failed:" in proc.stderr and "node03 munge" in proc.stderr, out("verify")
    assert report["nodes"] == ["head", "node01", "node02", "node03", "node04"]
    assert all(isinstance(report["boot_seconds"][h], int) for h in report["nodes"])
    munge = checks[("munge", "node03")]
    assert not munge["ok"] and "Invalid credential" in munge["summary"], munge
    # node03's failures are the rehearsal's; nothing else fails but Slurm's own view of it
    failed = {k for k, c in checks.items() if not c["ok"]}
    node03 = {(c["name"], c["node"]) for c in rehearsed["checks"] if not c["ok"]}
    assert failed - {("drained", "head")} == node03, "\n".join(
        f"{c['name']} {c['node']}: {c['summary']}\n{c['output'][-1000:]}"
        for k, c in checks.items()
        if k in failed
    )
    if ("drained", "head") in failed:
        assert "node03" in checks[("drained", "head")]["summary"]
        assert "node04" not in checks[("drained", "head")]["summary"]
    assert ("oom", "head") not in checks
    # node04 is idle in Slurm and runs jobs and MPI with the old nodes; its host key is the
    # one everybody's ssh_known_hosts lists (apply gave it to the old ones)
    assert re.search(r"^node04\s+idle$", checks[("sinfo", "head")]["output"], re.M)
    assert "node04" in checks[("srun", "head")]["output"].split(), checks[("srun", "head")]
    for name in ("srun", "mpi", "examples", "history", "mpirun", "hostfile"):
        assert checks[(name, "head")]["ok"], checks[(name, "head")]
    assert "node04" in checks[("mpirun", "head")]["output"], checks[("mpirun", "head")]
    for node in ("node01", "node02", "node04"):
        for name in ("hardware", "card", "hostkey", "ssh", "munge", "shared"):
            assert checks[(name, node)]["ok"], checks[(name, node)]
    assert checks[("boot", "node04")]["summary"].startswith("up "), checks[("boot", "node04")]
    assert json.loads(verified["report.json"]) == report
    # with munge stopped on node04, verify fails and says where and what
    for name in ("drain node04", "stop munge"):
        assert verified[name].returncode == 0, out(name)
    stopped = verified["verify, munge stopped"]
    assert stopped.returncode == 1, out("verify, munge stopped")
    assert "node04 munge" in stopped.stderr, out("verify, munge stopped")
    stopped_checks = {(c["name"], c["node"]): c for c in json.loads(stopped.stdout)["checks"]}
    assert not stopped_checks[("munge", "node04")]["ok"], stopped_checks[("munge", "node04")]
    # nothing of the running nodes was rebuilt or re-flashed
    assert after == before
    kept = {n: v for n, v in verified["overlays after"].items() if n in verified["overlays"]}
    assert kept == verified["overlays"] and "node04.qcow2" in verified["overlays after"]
    # the laptop's side is gone with the rehearsal
    assert not (mixed / "rehearsal" / "laptop.json").exists()
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert verified["netns"] not in netns


def test_rehearse_refuses_missing_images(cluster, env, tmp_path):
    proc = piimage(
        ["rehearse", "-i", str(cluster / "cluster.yaml"), "--out", str(tmp_path)],
        env,
        cluster,
        check_rc=2,
    )
    assert (
        "no built image for head, node01, node02" in proc.stderr
        and "piimage build --all" in proc.stderr
    )
    proc = piimage(["rehearse", "--nodes", "node01,node07"], env, cluster, check_rc=2)
    assert "'node07' is not a node of cluster testcluster" in proc.stderr
    assert leftovers(cluster) == [] and leftovers(tmp_path) == []


def test_interrupted_rehearsal_leaves_nothing(cluster, env):
    """Stopped while the machines boot, three times: SIGKILL to piimage alone (the OOM
    killer's way: its VMs die with it, its run directory stays), then SIGTERM (`docker
    stop`; this run first removes what the killed one left), then Ctrl-C. TERM and INT exit
    130 and leave no QEMU, no overlay; the images are never touched."""
    import signal
    import time

    head = cluster / "out" / "testcluster" / "head.img"
    before = _sha(head)
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
        proc = start_piimage(["rehearse", "--nodes", "head,node01"], env, cluster, ctrl_c=True)
        deadline = time.monotonic() + 600
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen += line
            if "node01: booting" in line or not line:
                break
        assert "node01: booting" in seen, seen
        time.sleep(10)  # the machines are running now
        assert any(p.startswith("process ") for p in leftovers(cluster)), seen
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        err = seen + err
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, err
            time.sleep(2)  # the kernel ends the VMs (their parent-death signal)
            left = leftovers(cluster)
            assert not any(p.startswith("process ") for p in left), left
            stale = [p for p in left if p.startswith("run dir ")]
            assert stale, left  # what the next run is to find and remove
            continue
        assert proc.returncode == 130, err
        assert "interrupted" in err
        if sig == signal.SIGTERM:  # it removed the killed one's (or another rehearsal did)
            assert not any(Path(p.split(" ", 2)[2]).exists() for p in stale), (stale, err)
        assert leftovers(cluster) == []
    assert _sha(head) == before
