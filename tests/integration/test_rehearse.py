"""`piimage rehearse` for real: head + two compute nodes built from the trixie stand-in boot
under qemu-system-aarch64 on a private virtual network, and SLURM, munge, NFS and an mpi4py job
are checked on them. Then a compute node built with another cluster's munge key must be caught."""

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
        if str(p) not in _RUN_DIRS_BEFORE and not _in_use_elsewhere(p, scope)
    ]
    return found


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


@pytest.fixture(scope="module")
def cluster(env, standin_trixie, tmp_path_factory):
    """head, node01, node02 built from the trixie stand-in (role layers shared with test_build)."""
    cwd = tmp_path_factory.mktemp("rehearse")
    (cwd / "cluster.yaml").write_text(CLUSTER_YAML.format(key=pubkey(env), node02_ip="10.0.0.12"))
    piimage(["build", "--all", "--compress", "none"], env, cwd)
    return cwd


def test_rehearsal_of_a_working_cluster(cluster, env):
    out = cluster / "out" / "testcluster"
    images = {h: out / f"{h}.img" for h in ("head", "node01", "node02")}
    before = {h: _sha(p) for h, p in images.items()}
    proc = piimage(["rehearse", "--json"], env, cluster, check_rc=None)
    assert proc.returncode == 0, f"rehearse failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["nodes"] == ["head", "node01", "node02"]
    # every node booted and the cluster became ready; the figures go into the issue note
    assert all(isinstance(report["boot_seconds"][h], float) for h in images)
    assert report["ready_seconds"] > 0
    print(
        "\nrehearsal figures:",
        json.dumps(
            {
                "boot_seconds": report["boot_seconds"],
                "ready_seconds": report["ready_seconds"],
                "checks": {f"{c['name']} {c['node']}": c["seconds"] for c in report["checks"]},
            }
        ),
    )
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    for node in images:
        for name in ("boot", "hostname", "address", "services"):
            assert checks[(name, node)]["ok"], checks[(name, node)]
    for node in ("node01", "node02"):
        assert checks[("munge", node)]["ok"] and checks[("shared", node)]["ok"]
    for name in ("sinfo", "srun", "mpi"):
        assert checks[(name, "head")]["ok"], checks[(name, "head")]
    assert checks[("sinfo", "head")]["summary"] == "every compute node idle: node01, node02"
    assert {"node01", "node02"} <= set(checks[("srun", "head")]["output"].split())
    mpi = checks[("mpi", "head")]["output"]
    ranks = re.findall(r"rank (\d) of 2 on (node0[12]): sum 3", mpi)
    assert sorted(r for r, _ in ranks) == ["0", "1"] and {h for _, h in ranks} == {
        "node01",
        "node02",
    }, mpi
    # the consoles and the report are kept; the flashable images are untouched
    logs = out / "rehearsal"
    for h in images:
        assert "Linux version" in (logs / f"{h}.console.log").read_text(errors="replace")
    assert json.loads((logs / "report.json").read_text())["ok"] is True
    assert {h: _sha(p) for h, p in images.items()} == before
    assert leftovers(cluster) == []


def test_rehearsal_catches_a_foreign_munge_key(cluster, env, tmp_path):
    """node02 built in another folder (its own secrets: another munge key) next to the good head."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "cluster.yaml").write_text((cluster / "cluster.yaml").read_text())
    piimage(["build", "--hostname", "node02", "--compress", "none"], env, other)
    good, bad = cluster / "out" / "testcluster", other / "out" / "testcluster"
    mixed = tmp_path / "mixed" / "testcluster"
    mixed.mkdir(parents=True)
    os.link(good / "head.img", mixed / "head.img")
    os.link(bad / "node02.img", mixed / "node02.img")
    assert (good / "node02.img").read_bytes()[:512] != b""  # the good node02 exists but is not used
    proc = piimage(
        [
            "rehearse",
            "-i",
            str(cluster / "cluster.yaml"),
            "--out",
            str(mixed.parent),
            "--nodes",
            "head,node02",
            "--timeout",
            "900",
        ],
        env,
        cluster,
        check_rc=None,
    )
    assert proc.returncode == 1, (
        f"rehearse should fail:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    # the report names the node and the check that caught it
    assert re.search(
        r"FAIL\s+munge\s+node02\s+node02 cannot decode a credential from head: .*Invalid credential",
        proc.stdout,
    ), proc.stdout
    assert "rehearsal failed:" in proc.stderr and "node02 munge" in proc.stderr
    report = json.loads((mixed / "rehearsal" / "report.json").read_text())
    assert report["ok"] is False
    failed = {(c["name"], c["node"]) for c in report["checks"] if not c["ok"]}
    assert ("munge", "node02") in failed and ("sinfo", "head") in failed
    assert ("boot", "head") not in failed and ("boot", "node02") not in failed
    # the jobs are not queued for a node that is not idle: the report says why they did not run
    checks = {(c["name"], c["node"]): c for c in report["checks"]}
    assert checks[("srun", "head")]["summary"].startswith("not run: node02 is ")
    assert leftovers(tmp_path) == []


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
    """Ctrl-C while the machines boot: exit 130, no QEMU, no overlay, images untouched."""
    import signal
    import sys
    import time

    head = cluster / "out" / "testcluster" / "head.img"
    before = _sha(head)
    proc = subprocess.Popen(
        [sys.executable, "-m", "piimage.cli", "rehearse", "--nodes", "head,node01"],
        env=env,
        cwd=cluster,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    seen = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen += line
        if "node01: booting" in line or not line:
            break
    assert "node01: booting" in seen, seen
    time.sleep(10)  # the machines are running now
    assert any("piimage-rehearse-" in p for p in leftovers(cluster))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert leftovers(cluster) == []
    assert _sha(head) == before
