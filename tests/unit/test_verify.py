"""piimage verify: the rehearsal's checks over SSH. The checks get a fake cluster (the table of
answers of test_rehearse_checks); the SSH transport gets a fake `ssh` on PATH that runs the
remote command on this machine, or fails as ssh fails."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import pytest
from click.testing import CliRunner
from test_rehearse_checks import FakeCluster, _names

from piimage import verify as vf
from piimage.cli import main
from piimage.rehearse import checks as ck
from piimage.rehearse import run_checks
from piimage.rehearse.report import Report


class RealBoards(FakeCluster):
    """FakeCluster, plus the answers of the checks only real boards get."""

    slurmd_c = "NodeName={name} CPUs=4 Boards=1 SocketsPerBoard=1 CoresPerSocket=4 RealMemory=1850"
    df = "31000000000 20000000000"
    drained = ""

    def call(self, st, script, timeout=300, *, diagnose=False):
        if not st.failed and st.boot_s is not None:
            if script.startswith("slurmd -C"):
                return 0, self.slurmd_c.format(name=st.name)
            if script.startswith("df -B1"):
                return 0, self.df
            if "sinfo -h -R" in script:
                return 0, self.drained
        return super().call(st, script, timeout, diagnose=diagnose)

    def context(self):
        ctx = super().context()
        ctx.real = True
        return ctx


def test_the_registry_is_the_rehearsals_less_oom_with_the_real_board_checks():
    def names(registry):
        return [c.name for e in registry for c in (e.checks if isinstance(e, ck.Round) else (e,))]

    flat, rehearsal = names(vf.registry()), names(ck.CHECKS)
    new = {"hardware", "card", "drained"}
    assert "oom" not in flat and new <= set(flat)
    assert [n for n in flat if n not in new] == [n for n in rehearsal if n != "oom"]
    assert flat.index("drained") == flat.index("sinfo") + 1


def test_a_healthy_cluster_passes_with_uptimes_in_the_boot_lines(tmp_path):
    fc = RealBoards(tmp_path, {"node01": "idle", "node02": "idle"})
    for t in fc.targets:
        t.boot_s = 3 * 86400
    results = run_checks(fc.context(), vf.registry())
    bad = [f"{c.name} {c.node}: {c.summary}" for c in results if not c.ok]
    assert bad == []
    boot = next(c for c in results if c.name == "boot" and c.node == "head")
    assert boot.summary == "up 3 days, system running"
    names = _names(results)
    assert "hardware node01" in names and "hardware head" not in names  # the head runs no jobs
    assert "card head" in names and "drained head" in names and "oom head" not in names
    hw = next(c for c in results if c.name == "hardware" and c.node == "node01")
    assert hw.summary.startswith("4 CPUs, 1850 MB (slurm.conf: 4, 1800")


def test_a_node_that_does_not_answer_is_named_and_the_others_are_checked(tmp_path):
    fc = RealBoards(tmp_path, {"node01": "idle", "node02": "down*"})
    dead = fc.targets[2]
    dead.boot_s = None
    dead.failed = "node02: it does not answer over SSH (timed out)"
    results = run_checks(fc.context(), vf.registry())
    boot = next(c for c in results if c.name == "boot" and c.node == "node02")
    assert not boot.ok and boot.summary == dead.failed
    assert "(the node does not answer)" in boot.output
    ok = {f"{c.name} {c.node}" for c in results if c.ok}
    assert {"boot node01", "hostname node01", "srun head", "munge node01"} <= ok
    # of node02's own checks only the shared directory's is tried (it reads through the head)
    others = [(c.name, c.ok) for c in results if c.node == "node02" and c.name != "boot"]
    assert others == [("shared", False)]


def test_less_memory_than_slurm_conf_says_fails_hardware_with_the_fix(tmp_path):
    fc = RealBoards(tmp_path, {"node01": "idle", "node02": "idle"})
    fc.slurmd_c = "NodeName={name} CPUs=4 RealMemory=1700"
    results = run_checks(fc.context(), vf.registry())
    hw = next(c for c in results if c.name == "hardware" and c.node == "node01")
    assert not hw.ok
    assert "RealMemory 1700 MB, below slurm.conf's 1800" in hw.summary
    assert "hardware.real_memory for node01" in hw.summary


def test_a_full_card_and_a_drained_node_fail_with_the_reason(tmp_path):
    fc = RealBoards(tmp_path, {"node01": "idle", "node02": "idle"})
    fc.df = "31000000000 500000000"
    fc.drained = "node02|drained|Low RealMemory\nnode09|down|Not responding\n"  # 09: not ours
    results = run_checks(fc.context(), vf.registry())
    cards = [c for c in results if c.name == "card"]
    assert cards and not any(c.ok for c in cards)
    assert "0.5 GiB free of 28.9 GiB" in cards[0].summary
    dr = next(c for c in results if c.name == "drained")
    assert not dr.ok and dr.summary == "node02 is drained: Low RealMemory"


@pytest.mark.parametrize(
    ("stderr", "want"),
    [
        ("Host key verification failed.", "not the one piimage made"),
        ("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@", "not the one piimage made"),
        ("admin@10.0.0.11: Permission denied (publickey).", "SSH key was refused"),
        ("ssh: connect to host 10.0.0.11 port 22: Connection timed out", "(timed out)"),
        ("ssh: connect to host 10.0.0.11 port 22: No route to host", "(no route to host)"),
        ("ssh: connect to host 10.0.0.11 port 22: Connection refused", "(connection refused)"),
        ("kex_exchange_identification: read: reset", "ssh failed: kex_exchange"),
    ],
)
def test_ssh_failures_are_one_line_a_user_can_act_on(stderr, want):
    reason = vf.ssh_reason(stderr)
    assert want in reason and "\n" not in reason


# ---------------------------------------------------------------------------------------------
# The transport, with a fake ssh
# ---------------------------------------------------------------------------------------------
FAKE_SSH = """#!{python}
import os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(repr(args) + "\\n")
if "-O" in args:
    sys.exit(0)
dest, remote = args[-2], args[-1]
host = dest.split("@")[-1]
if host == "10.0.0.12":
    sys.stderr.write("ssh: connect to host 10.0.0.12 port 22: Connection timed out\\n")
    sys.exit(255)
if host == "10.0.0.13":
    sys.stderr.write("Host key verification failed.\\n")
    sys.exit(255)
if host == "10.0.0.14":
    print("sudo: a password is required")
    sys.exit(1)
# the remote command on this machine, without sudo (the tests may not have it)
sys.exit(subprocess.run(["bash", "-c", remote.replace("sudo -n ", "")]).returncode)
"""


def _cluster(tmp_path: Path, hosts: dict[str, str]) -> NS:
    from ipaddress import IPv4Address

    nodes = []
    for i, (name, ip) in enumerate(hosts.items()):
        d = tmp_path / "secrets" / "hosts" / name
        d.mkdir(parents=True)
        (d / "ssh_host_ed25519_key.pub").write_text(f"ssh-ed25519 AAAAKEY{i} root@{name}\n")
        nodes.append(NS(hostname=name, ip=IPv4Address(ip)))
    return NS(secrets_dir=tmp_path / "secrets", nodes=nodes, admin=NS(name="admin"))


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ssh = bindir / "ssh"
    ssh.write_text(FAKE_SSH.format(python=sys.executable))
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    log = tmp_path / "ssh.log"
    monkeypatch.setenv("FAKE_SSH_LOG", str(log))
    return log


def test_known_hosts_come_from_the_secrets_never_the_users_own(tmp_path, fake_ssh):
    cluster = _cluster(tmp_path, {"head": "10.0.0.10", "node01": "10.0.0.11"})
    work = tmp_path / "w"
    work.mkdir()
    ssh = vf.Ssh(cluster, work)
    assert ssh.known_hosts.read_text() == (
        "head,10.0.0.10 ssh-ed25519 AAAAKEY0\nnode01,10.0.0.11 ssh-ed25519 AAAAKEY1\n"
    )
    assert stat.S_IMODE(ssh.known_hosts.stat().st_mode) == 0o600
    cmd = ssh.command(cluster.nodes[1], "true")
    joined = " ".join(cmd)
    assert "StrictHostKeyChecking=yes" in joined and "BatchMode=yes" in joined
    assert f"UserKnownHostsFile={ssh.known_hosts}" in joined
    assert "GlobalKnownHostsFile=/dev/null" in joined and "HostKeyAlias=node01" in joined
    assert cmd[-2:] == ["admin@10.0.0.11", "true"]
    ident = tmp_path / "id"
    ident.write_text("a private key\n")
    assert ["-i", str(ident)] == vf.Ssh(cluster, work, identity=ident).command(
        cluster.nodes[0], "x"
    )[-6:-4]


def test_a_missing_host_key_is_none():
    assert vf.host_key_line(NS(secrets_dir=Path("/nonexistent")), NS(hostname="x")) is None


def test_the_script_goes_over_stdin_and_failures_become_255_with_a_reason(tmp_path, fake_ssh):
    cluster = _cluster(
        tmp_path,
        {"a": "10.0.0.11", "down": "10.0.0.12", "reimaged": "10.0.0.13", "nosudo": "10.0.0.14"},
    )
    work = tmp_path / "w"
    work.mkdir()
    ssh = vf.Ssh(cluster, work)
    a, down, reimaged, nosudo = cluster.nodes
    assert ssh.run(a, "echo out; echo err >&2; exit 3", 30) == (3, "out\nerr\n")
    rc, out = ssh.run(down, "true", 30)
    assert rc == 255 and out == "down: it does not answer over SSH (timed out)"
    rc, out = ssh.run(reimaged, "true", 30)
    assert rc == 255 and "reimaged: its SSH host key is not the one piimage made" in out
    rc, out = ssh.run(nosudo, "true", 30)
    assert rc == 255 and out == "nosudo: sudo asks the admin for a password"
    st = vf.SshNode(down, tmp_path / "x.img", tmp_path / "x.log")
    with pytest.raises(ck.Unreachable):
        ssh(st, "true", diagnose=True)
    ssh.close()
    assert fake_ssh.read_text().count("'-O', 'exit'") == 4


def test_first_contact_reads_uptime_state_and_kernel(tmp_path, fake_ssh):
    cluster = _cluster(tmp_path, {"a": "10.0.0.11", "down": "10.0.0.12"})
    work = tmp_path / "w"
    work.mkdir()
    ssh = vf.Ssh(cluster, work)
    up = vf.SshNode(cluster.nodes[0], tmp_path / "a.img", tmp_path / "a.log")
    kernel = vf.first_contact(ssh, up)
    assert up.failed is None and up.boot_s > 0 and kernel == os.uname().release
    assert up.last["state"]  # whatever this machine's systemd says (or "offline")
    down = vf.SshNode(cluster.nodes[1], tmp_path / "d.img", tmp_path / "d.log")
    assert vf.first_contact(ssh, down) == "" and down.boot_s is None
    assert down.failed == "down: it does not answer over SSH (timed out)"
    assert ssh(down, "hostname") == (255, down.failed)  # not asked again


def test_the_report_says_verify_and_uptime():
    r = Report("lab", ["head", "node01"], "6.12.25", kind="verify", logs="/x")
    r.boot_seconds = {"head": 3600, "node01": None}
    text = r.text()
    assert text.startswith("verify of lab: head, node01 (kernel 6.12.25)")
    assert "head         up 3600 s" in text and "node01       does not answer" in text
    assert "cluster ready" not in text and "verify FAILED" in text


def test_verify_without_the_builds_host_keys_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    r = CliRunner().invoke(main, ["init", "--dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["verify"])
    assert r.exit_code == 2, r.output
    assert "no host key for head, node01" in r.output and "secrets_dir" in r.output
