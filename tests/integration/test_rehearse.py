"""`piimage rehearse` for real: head + two compute nodes built from the trixie stand-in boot
under qemu-system-aarch64 on a private virtual network, and SLURM, munge, NFS and an mpi4py job
are checked on them. A third compute node built with another cluster's munge key boots with them
and must be caught."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from clihelp import CLUSTER_YAML, piimage, pubkey

from piimage.fsutil import sha256_file as _sha

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def leftovers() -> list[str]:
    """QEMU machines, overlays or hub ports a rehearsal could leave behind."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("qemu-system-aarch64") and "piimage-rehearse-" in cmd:
            found.append(f"process {pid}: {cmd[:120]}")
    found += [f"run dir {p}" for p in Path("/var/tmp").glob("piimage-rehearse-*")]
    return found


# The test cluster plus node03, whose image is built in another folder: its own secrets, so
# another munge key. All four boot together once, and every check below reads that one run:
# a second boot for the broken case would cost minutes (TCG, two host cores).
CLUSTER4_YAML = CLUSTER_YAML + "  - {{hostname: node03, role: compute, ip: 10.0.0.13}}\n"
GOOD = ("head", "node01", "node02")


@pytest.fixture(scope="module")
def cluster(env, standin_trixie, tmp_path_factory):
    """head, node01, node02 (and node03) built from the trixie stand-in (role layers shared with
    test_build)."""
    cwd = tmp_path_factory.mktemp("rehearse")
    (cwd / "cluster.yaml").write_text(CLUSTER4_YAML.format(key=pubkey(env), node02_ip="10.0.0.12"))
    piimage(["build", "--all", "--compress", "none"], env, cwd)
    return cwd


@pytest.fixture(scope="module")
def rehearsal(cluster, env, tmp_path_factory):
    """One rehearsal of head, node01, node02 as built and node03 with a foreign munge key."""
    other = tmp_path_factory.mktemp("other")
    (other / "cluster.yaml").write_text((cluster / "cluster.yaml").read_text())
    piimage(["build", "--hostname", "node03", "--compress", "none"], env, other)
    good, bad = cluster / "out" / "testcluster", other / "out" / "testcluster"
    assert (good / "node03.img").is_file()  # the good node03 exists but is not used
    mixed = tmp_path_factory.mktemp("mixed") / "testcluster"
    mixed.mkdir()
    for h in GOOD:
        os.link(good / f"{h}.img", mixed / f"{h}.img")
    os.link(bad / "node03.img", mixed / "node03.img")
    images = {h: mixed / f"{h}.img" for h in (*GOOD, "node03")}
    before = {h: _sha(p) for h, p in images.items()}
    proc = piimage(["rehearse", "-i", str(cluster / "cluster.yaml"), "--out", str(mixed.parent), "--json"],
                   env, cluster, check_rc=None)
    after = {h: _sha(p) for h, p in images.items()}
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
    assert report is not None, f"no report:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    print("\nrehearsal figures:", json.dumps({"boot_seconds": report["boot_seconds"],
                                              "ready_seconds": report["ready_seconds"],
                                              "checks": {f"{c['name']} {c['node']}": c["seconds"]
                                                         for c in report["checks"]}}))
    return proc, report, mixed, before, after


def test_rehearsal_of_a_working_cluster(rehearsal):
    proc, report, mixed, before, after = rehearsal
    assert report["nodes"] == ["head", "node01", "node02", "node03"]
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    # every check of the three good nodes passes: the only failures are node03's (next test)
    failed = {k for k, c in checks.items() if not c["ok"]}
    assert failed == {("munge", "node03"), ("sinfo", "head")}, \
        f"{failed}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    # every node booted and the cluster became ready; the figures go into the issue note
    assert all(isinstance(report["boot_seconds"][h], float) for h in (*GOOD, "node03"))
    for node in GOOD:
        for name in ("boot", "hostname", "address", "services"):
            assert checks[(name, node)]["ok"], checks[(name, node)]
    for node in ("node01", "node02"):
        assert checks[("munge", node)]["ok"] and checks[("shared", node)]["ok"]
    for name in ("srun", "mpi"):
        assert checks[(name, "head")]["ok"], checks[(name, "head")]
    # sinfo: node01 and node02 idle, only node03 is not
    assert re.fullmatch(r"node03 is \S+", checks[("sinfo", "head")]["summary"]), checks[("sinfo", "head")]
    assert re.search(r"^node01\s+idle$", checks[("sinfo", "head")]["output"], re.MULTILINE)
    assert re.search(r"^node02\s+idle$", checks[("sinfo", "head")]["output"], re.MULTILINE)
    assert {"node01", "node02"} <= set(checks[("srun", "head")]["output"].split())
    mpi = checks[("mpi", "head")]["output"]
    ranks = re.findall(r"rank (\d) of 2 on (node0[12]): sum 3", mpi)
    assert sorted(r for r, _ in ranks) == ["0", "1"] and {h for _, h in ranks} == {"node01", "node02"}, mpi
    # the consoles and the report are kept; the flashable images are untouched
    logs = mixed / "rehearsal"
    for h in (*GOOD, "node03"):
        assert "Linux version" in (logs / f"{h}.console.log").read_text(errors="replace")
    assert json.loads((logs / "report.json").read_text()) == report
    assert after == before
    assert leftovers() == []


def test_rehearsal_catches_a_foreign_munge_key(rehearsal):
    """node03 built in another folder (its own secrets: another munge key) next to the good head."""
    proc, report, _, _, _ = rehearsal
    assert proc.returncode == 1, f"rehearse should fail:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert report["ok"] is False
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    # the report names the node and the check that caught it, in unmunge's own words
    munge = checks[("munge", "node03")]
    assert not munge["ok"]
    assert re.fullmatch(r"node03 cannot decode a credential from head: .*Invalid credential.*", munge["summary"]), munge
    assert "rehearsal failed:" in proc.stderr and "node03 munge" in proc.stderr
    assert not checks[("sinfo", "head")]["ok"] and "node03" in checks[("sinfo", "head")]["summary"]
    assert checks[("boot", "head")]["ok"] and checks[("boot", "node03")]["ok"]
    # the jobs ran on the good nodes and say which node they left out
    assert "node03 is" in checks[("srun", "head")]["summary"] and "left out" in checks[("srun", "head")]["summary"]


def test_rehearse_refuses_missing_images(cluster, env, tmp_path):
    proc = piimage(["rehearse", "-i", str(cluster / "cluster.yaml"), "--out", str(tmp_path)], env, cluster,
                   check_rc=2)
    assert "no built image for head, node01, node02" in proc.stderr and "piimage build --all" in proc.stderr
    proc = piimage(["rehearse", "--nodes", "node01,node07"], env, cluster, check_rc=2)
    assert "'node07' is not a node of cluster testcluster" in proc.stderr
    assert subprocess.run(["pgrep", "-f", "piimage-rehearse-"], check=False, capture_output=True).returncode == 1


def test_interrupted_rehearsal_leaves_nothing(cluster, env):
    """Ctrl-C while the machines boot: exit 130, no QEMU, no overlay, images untouched."""
    import signal
    import sys
    import time

    head = cluster / "out" / "testcluster" / "head.img"
    before = _sha(head)
    proc = subprocess.Popen([sys.executable, "-m", "piimage.cli", "rehearse", "--nodes", "head,node01"],
                            env=env, cwd=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "node01: booting" in line or not line:
            break
    assert "node01: booting" in seen, seen
    time.sleep(10)  # the machines are running now
    assert any("piimage-rehearse-" in p for p in leftovers())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert leftovers() == []
    assert _sha(head) == before
