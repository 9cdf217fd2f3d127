"""piimage apply, over the fake ssh of test_verify (the remote scripts run on this machine, each
node's files under a folder of its own) with fake systemctl/scontrol/squeue/exportfs that log
what they are asked: the real scripts are run, the real files compared and written."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from test_verify import fake_ssh  # noqa: F401  (the fixture)

from piimage import apply as ap
from piimage import build
from piimage import inventory as inv
from piimage.verify import Ssh

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB3mXhF1n4O8ZQ2c9cA5y0bM0v8i7m6eQk3lF2qYH3sd me@laptop"
NODES = {"head": ("head", "10.0.0.10"), "n1": ("compute", "10.0.0.11")}
TOOLS = """#!/bin/sh
echo "$(basename "$0") $*" >> "$TOOLS_LOG"
case "$(basename "$0") $1" in
  "scontrol --version") echo "$SLURM_VERSION" ;;
  "squeue -h") [ -n "${SQUEUE_JOBS:-}" ] && printf '%s\\n' $SQUEUE_JOBS ;;
esac
exit 0
"""


def _yaml(nodes: dict) -> str:
    rows = "".join(f"  - {{hostname: {h}, role: {r}, ip: {ip}}}\n" for h, (r, ip) in nodes.items())
    return (
        f"name: lab\nadmin: {{ssh_authorized_keys: ['{KEY}']}}\n"
        f"network: {{subnet: 10.0.0.0/24}}\nnodes:\n{rows}"
    )


@pytest.fixture
def lab(tmp_path, monkeypatch, fake_ssh):  # noqa: F811
    bindir = tmp_path / "bin"
    for tool in ("scontrol", "squeue", "systemctl", "exportfs"):
        (bindir / tool).write_text(TOOLS)
        (bindir / tool).chmod(0o755)
    tools_log = tmp_path / "tools.log"
    monkeypatch.setenv("TOOLS_LOG", str(tools_log))
    monkeypatch.setenv("SLURM_VERSION", "slurm 24.11.5")
    (tmp_path / "cluster.yaml").write_text(_yaml(NODES))
    cluster = inv.load(tmp_path / "cluster.yaml")
    build.cluster_keys(cluster)  # the secrets a build would have made
    roots = tmp_path / "nodes"
    for n in cluster.nodes:  # every card as flashed from this cluster.yaml
        _flash(roots, n.hostname, ap.wanted(cluster)[n.hostname])
    return tmp_path, roots, tools_log


def _flash(roots: Path, host: str, files) -> None:
    for f in files:
        path = roots / host / f.path.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)


def _job(tmp_path: Path, roots: Path, nodes: dict, built: bool = True) -> ap.Apply:
    """An apply of cluster.yaml with `nodes`; built: every node's image was built (its host
    key made) before, as a user builds the new node's card first."""
    (tmp_path / "cluster.yaml").write_text(_yaml(nodes))
    cluster = inv.load(tmp_path / "cluster.yaml")
    if built:
        build.cluster_keys(cluster)
    work = tmp_path / f"w{len(list(tmp_path.glob('w*')))}"
    work.mkdir()
    return ap.Apply(cluster, cluster.nodes, Ssh(cluster, work), root=f"{roots}/{{host}}")


def _temps(roots: Path) -> list[Path]:
    return [p for p in roots.rglob("*") if ap.TEMP_SUFFIX in p.name]


def test_a_cluster_as_flashed_is_up_to_date(lab):
    tmp_path, roots, tools = lab
    outcome = _job(tmp_path, roots, NODES).compare()
    assert outcome.changes == 0 and outcome.diff == "" and outcome.removed == []
    assert outcome.text().splitlines() == ["  head         up to date", "  n1           up to date"]


def test_a_new_node_reaches_the_old_ones_and_slurm_is_reconfigured(lab):
    tmp_path, roots, tools = lab
    grown = {**NODES, "n2": ("compute", "10.0.0.15")}
    job = _job(tmp_path, roots, grown)
    _flash(roots, "n2", ap.wanted(job.cluster)["n2"])  # its card, built after the edit
    before = (roots / "head" / "etc/ssh/piimage").exists()
    outcome = job.compare()
    changed = {n: set(r.changed) for n, r in outcome.results.items()}
    assert changed["n2"] == set()
    for h in ("head", "n1"):
        assert {"/etc/hosts", "/etc/ssh/ssh_known_hosts", ap.SLURM_CONF} <= changed[h], changed
    assert re.search(r"^\+10\.0\.0\.15\s.*\bn2\b", outcome.diff, re.M), outcome.diff
    assert "--- head:/etc/hosts (running)" in outcome.diff
    assert "+++ head:/etc/hosts (cluster.yaml)" in outcome.diff
    assert not tools.exists()  # comparing changes nothing and tells no service
    job.run(outcome)
    assert outcome.ok, outcome.text()
    assert "scontrol reconfigure" in tools.read_text()
    assert "systemctl restart slurmd" not in tools.read_text()
    hosts = (roots / "n1" / "etc/hosts").read_text()
    assert "10.0.0.15" in hosts and "n2" in hosts
    assert stat.S_IMODE((roots / "n1" / "etc/hosts").stat().st_mode) == 0o644
    assert _temps(roots) == []
    assert _job(tmp_path, roots, grown).compare().changes == 0  # and now it is up to date
    assert before == (roots / "head" / "etc/ssh/piimage").exists()  # identity untouched


def test_slurm_22_05_restarts_the_daemons_in_the_faqs_order(lab, monkeypatch):
    tmp_path, roots, tools = lab
    monkeypatch.setenv("SLURM_VERSION", "slurm-wlm 22.05.8")
    grown = {**NODES, "n2": ("compute", "10.0.0.15")}
    job = _job(tmp_path, roots, grown)
    _flash(roots, "n2", ap.wanted(job.cluster)["n2"])
    job.run(job.compare())
    calls = [ln for ln in tools.read_text().splitlines() if ln.startswith("systemctl")]
    assert calls == [
        "systemctl stop slurmctld.service",
        "systemctl restart slurmd.service",
        "systemctl restart slurmd.service",
        "systemctl start slurmctld.service",
    ]


def test_a_node_that_does_not_answer_is_reported_and_the_others_updated(lab):
    tmp_path, roots, tools = lab
    grown = {**NODES, "n2": ("compute", "10.0.0.12")}  # the fake ssh: 10.0.0.12 times out
    job = _job(tmp_path, roots, grown)
    outcome = job.run(job.compare())
    assert not outcome.ok
    assert outcome.results["n2"].error == "n2: it does not answer over SSH (timed out)"
    assert "10.0.0.12" in (roots / "head" / "etc/hosts").read_text()
    assert "n2           FAILED: n2: it does not answer" in outcome.text()


def test_a_node_never_built_here_is_named_with_what_to_do(lab):
    tmp_path, roots, tools = lab
    job = _job(tmp_path, roots, {**NODES, "n3": ("compute", "10.0.0.16")}, built=False)
    outcome = job.compare()
    assert outcome.results["n3"].error.startswith("never built here (no host key")
    assert "piimage build --hostname n3" in outcome.results["n3"].error
    assert outcome.results["n1"].error is None and outcome.results["n1"].changed


def test_dry_run_shows_the_diff_and_writes_nothing(lab, monkeypatch):
    tmp_path, roots, tools = lab
    grown = {**NODES, "n2": ("compute", "10.0.0.15")}
    (tmp_path / "cluster.yaml").write_text(_yaml(grown))
    cluster = inv.load(tmp_path / "cluster.yaml")
    before = {p: p.read_bytes() for p in roots.rglob("*") if p.is_file()}
    shown = []
    monkeypatch.setattr(ap, "Apply", _rooted(roots))
    outcome = ap.apply(cluster, cluster.nodes[:2], dry_run=True, echo=shown.append)
    assert outcome.changes > 0 and "+++ n1:/etc/hosts (cluster.yaml)" in shown[0]
    assert {p: p.read_bytes() for p in roots.rglob("*") if p.is_file()} == before
    assert not tools.exists()


def _rooted(roots: Path):
    real = ap.Apply

    def make(cluster, nodes, ssh):
        return real(cluster, nodes, ssh, root=f"{roots}/{{host}}")

    return make


def test_a_removed_node_is_drained_first_and_one_with_jobs_stops_the_apply(lab, monkeypatch):
    tmp_path, roots, tools = lab
    monkeypatch.setenv("SQUEUE_JOBS", "17 18")
    job = _job(tmp_path, roots, {"head": NODES["head"]})
    outcome = job.compare()
    assert outcome.removed == ["n1"]
    conf = (roots / "head" / ap.SLURM_CONF.lstrip("/")).read_bytes()
    job.run(outcome)
    assert not outcome.ok and "n1 (no longer in cluster.yaml) still runs 2 job(s)" in (
        outcome.results["head"].error or ""
    )
    assert "scontrol update NodeName=n1 State=DRAIN" in tools.read_text()
    assert (roots / "head" / ap.SLURM_CONF.lstrip("/")).read_bytes() == conf  # nothing written
    monkeypatch.delenv("SQUEUE_JOBS")
    job = _job(tmp_path, roots, {"head": NODES["head"]})
    outcome = job.run(job.compare())
    assert outcome.ok, outcome.text()
    assert "NodeName=n1" not in (roots / "head" / ap.SLURM_CONF.lstrip("/")).read_text()


def test_a_write_that_fails_leaves_whole_files_and_no_temporary_one(lab):
    tmp_path, roots, tools = lab
    grown = {**NODES, "n2": ("compute", "10.0.0.15")}
    job = _job(tmp_path, roots, grown)
    _flash(roots, "n2", ap.wanted(job.cluster)["n2"])
    outcome = job.compare()
    # n1's /etc/openmpi cannot be made: a file is in the way
    blocker = roots / "n1" / "etc" / "openmpi"
    if blocker.is_dir():
        for p in blocker.iterdir():
            p.unlink()
        blocker.rmdir()
    blocker.write_text("in the way")
    job.run(outcome)
    assert outcome.results["n1"].error and "writing failed" in outcome.results["n1"].error
    assert _temps(roots) == []
    for f in ap.wanted(job.cluster)["n1"]:
        path = roots / "n1" / f.path.lstrip("/")
        if path.is_file():
            data = path.read_bytes()
            assert data == f.data or b"10.0.0.15" not in data  # old or new, never half


def test_the_read_and_write_scripts_round_trip(tmp_path):
    from piimage.actions import RenderedFile

    f = RenderedFile("/etc/x/y.conf", b"a\nb\x00c\n", 0o600, "root", "root", "t")
    script = ap.write_script([f], str(tmp_path))
    assert os.system(f"bash -c {__import__('shlex').quote(script)}") == 0
    assert (tmp_path / "etc/x/y.conf").read_bytes() == b"a\nb\x00c\n"
    assert stat.S_IMODE((tmp_path / "etc/x/y.conf").stat().st_mode) == 0o600
    out = os.popen(
        f"bash -c {__import__('shlex').quote(ap.read_script(['/etc/x/y.conf', '/no'], str(tmp_path)))}"
    ).read()
    assert ap.parse_read(out) == {"/etc/x/y.conf": b"a\nb\x00c\n", "/no": None}


@pytest.mark.parametrize(
    ("text", "want"),
    [("slurm 24.11.5", (24, 11)), ("slurm-wlm 22.05.8", (22, 5)), ("nothing", None)],
)
def test_slurm_version(text, want):
    assert ap.slurm_version(text) == want


def test_configured_nodes():
    conf = b"NodeName=DEFAULT CPUs=4\nNodeName=n1 NodeAddr=10.0.0.11\n  NodeName=n2 CPUs=4\n"
    assert ap.configured_nodes(conf) == {"n1", "n2"} and ap.configured_nodes(None) == set()
