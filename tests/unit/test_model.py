"""Fast proofs of what the slow tests show on real images: which role-layer inputs change a
layer's cache key (and which must not), and what every shipped stage renders for every kind
of node. plan() is pure: no host tool, no secrets directory (the keys here are fakes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from piimage import build, layers
from piimage import inventory as inv
from piimage.errors import UserError
from piimage.keys import KeyPair
from piimage.profiles import RoleFacts, effective, load_profile
from piimage.settings import data_dir
from piimage.stages import discover

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH3903J3epy2OvY9kxA4Gr+Ix0/+xMkM+jxK162Gs/b2 me@laptop"
BASE = "0" * 64


def cluster_yaml(
    computes: list[tuple[str, str]], *, head_jobs: bool = False, extra: str = ""
) -> str:
    nodes = "".join(f"  - {{hostname: {h}, role: compute, ip: {ip}}}\n" for h, ip in computes)
    return (
        f"name: lab\nnetwork: {{subnet: 10.0.0.0/24, gateway: 10.0.0.1}}\n{extra}"
        f"nodes:\n  - {{hostname: head, role: head, ip: 10.0.0.10, runs_jobs: {str(head_jobs).lower()}}}\n"
        + nodes
    )


def fake_keys(cluster: inv.Cluster) -> build.ClusterKeys:
    hosts = {
        n.hostname: KeyPair(f"private {n.hostname}".encode(), f"ssh-ed25519 HOST{n.hostname}")
        for n in cluster.nodes
    }
    return build.ClusterKeys(hosts, KeyPair(b"cluster private", "ssh-ed25519 CLUSTER"), b"m" * 1024)


def plan(d: Path, text: str) -> build.BuildPlan:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cluster.yaml").write_text(text)
    cluster = inv.load(d / "cluster.yaml")
    return build.plan(cluster, cluster.nodes, keys=fake_keys(cluster), out_dir=d / "out")


def layer_key(bp: build.BuildPlan, host: str, base: str = BASE) -> str:
    pn = next(p for p in bp.nodes if p.hostname == host)
    return layers.inputs_for(pn.profile, list(bp.stages), base).key()


@pytest.fixture(autouse=True)
def _no_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.ssh keys, no warnings about them
    monkeypatch.delenv("SUDO_USER", raising=False)


# --- role-layer cache key ----------------------------------------------------------------
TWO = [("node01", "10.0.0.11"), ("node02", "10.0.0.12")]


def test_plan_needs_no_host_tool_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no qemu-img, bmaptool, ssh-keygen
    bp = plan(tmp_path / "a", cluster_yaml(TWO))
    assert [p.hostname for p in bp.nodes] == ["head", "node01", "node02"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["cluster.yaml"]


def test_layer_key_ignores_addresses_hostnames_and_node_count(tmp_path):
    ref = plan(tmp_path / "ref", cluster_yaml(TWO))
    moved = plan(tmp_path / "ip", cluster_yaml([("node01", "10.0.0.51"), ("node02", "10.0.0.52")]))
    renamed = plan(
        tmp_path / "name", cluster_yaml([("worker7", "10.0.0.11"), ("worker8", "10.0.0.12")])
    )
    more = plan(
        tmp_path / "n", cluster_yaml([(f"node{i:02d}", f"10.0.0.{10 + i}") for i in range(1, 7)])
    )
    assert layer_key(ref, "node01") == layer_key(moved, "node01") == layer_key(renamed, "worker7")
    assert layer_key(ref, "node01") == layer_key(more, "node06") == layer_key(ref, "node02")
    assert layer_key(ref, "head") == layer_key(moved, "head") == layer_key(more, "head")
    assert layer_key(ref, "head") != layer_key(ref, "node01")


def test_layer_key_follows_packages_headroom_base_and_role_stage_files(tmp_path):
    ref = layer_key(plan(tmp_path / "ref", cluster_yaml(TWO)), "node01")
    ours = (data_dir() / "node-profiles" / "compute.yaml").read_text()

    def with_profile(name: str, text: str) -> str:
        d = tmp_path / name
        (d / "node-profiles").mkdir(parents=True)
        (d / "node-profiles" / "compute.yaml").write_text(text)
        return layer_key(plan(d, cluster_yaml(TWO)), "node01")

    assert with_profile("pkg", ours.replace("  - slurmd\n", "  - slurmd\n  - htop\n")) != ref
    assert with_profile("room", ours.replace("headroom_mb: 1536", "headroom_mb: 2048")) != ref
    assert with_profile("same", ours) == ref  # a copy of ours: same inputs, same layer
    assert layer_key(plan(tmp_path / "b", cluster_yaml(TWO)), "node01", base="1" * 64) != ref

    # a role-scope stage of the user's: its files feed the compute layer, not the head's
    def with_stage(name: str, content: str) -> build.BuildPlan:
        d = tmp_path / name
        st = d / "my-stages" / "15-tuning"
        (st / "files" / "etc").mkdir(parents=True)
        (st / "stage.yaml").write_text("scope: role\nroles: [compute]\n")
        (st / "files" / "etc" / "tuning.conf").write_text(content)
        return plan(d, cluster_yaml(TWO, extra="stages: [my-stages]\n"))

    one, two = with_stage("s1", "a=1\n"), with_stage("s2", "a=2\n")
    assert layer_key(one, "node01") not in (ref, layer_key(two, "node01"))
    assert (
        layer_key(one, "head")
        == layer_key(two, "head")
        == layer_key(plan(tmp_path / "h", cluster_yaml(TWO)), "head")
    )


def test_a_head_that_runs_jobs_has_its_own_layer(tmp_path):
    plain = plan(tmp_path / "a", cluster_yaml(TWO))
    jobs = plan(tmp_path / "b", cluster_yaml(TWO, head_jobs=True))
    assert layer_key(plain, "head") != layer_key(jobs, "head")
    assert layer_key(plain, "node01") == layer_key(jobs, "node01")


# --- role facts --------------------------------------------------------------------------
def test_role_facts_of_the_shipped_roles(tmp_path):
    c = inv.load(None, cwd=tmp_path)
    head, node01 = c.node("head"), c.node("node01")
    assert head.facts == RoleFacts(
        slurmctld=True, slurm=True, munge=True, nfs_server=True, time_server=True, mpi=True
    )
    assert node01.facts == RoleFacts(slurmd=True, slurm=True, munge=True, nfs_client=True, mpi=True)
    assert c.head is head and c.job_nodes == c.nodes[1:]
    (tmp_path / "cluster.yaml").write_text(cluster_yaml(TWO, head_jobs=True))
    c = inv.load(tmp_path / "cluster.yaml")
    assert c.node("head").facts.slurmd and c.job_nodes == c.nodes
    profile = effective(c.roles["head"], True)
    assert profile.facts == c.node("head").facts and "slurmd.service" in profile.enable


def test_profile_key_stages_is_refused(tmp_path):
    p = tmp_path / "login.yaml"
    p.write_text("packages: [htop]\nstages: [10-identity]\n")
    with pytest.raises(UserError) as ei:
        load_profile(p)
    assert "stages: not supported in a node profile" in ei.value.detail


def test_select_nodes_by_names(tmp_path):
    c = inv.load(None, cwd=tmp_path)
    got = inv.select_nodes(c, names=["node02", "head", "node02"])
    assert [n.hostname for n in got] == ["node02", "head"]
    with pytest.raises(
        UserError, match=r"^--nodes: 'node07' is not a node of cluster picluster \(nodes: head, "
    ):
        inv.select_nodes(c, names=["node01", "node07"])


# --- render matrix: every shipped stage, every kind of node --------------------------------
COMMON = {
    "10-identity": {
        "/etc/hostname",
        "/etc/hosts",
        "/etc/ssh/piimage/ssh_host_ed25519_key",
        "/etc/ssh/piimage/ssh_host_ed25519_key.pub",
        "/etc/ssh/ssh_known_hosts",
        "->/var/lib/dbus/machine-id",
    },
    "20-network": {
        "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection",
        "/etc/cloud/cloud.cfg.d/99_zz-piimage.cfg",
    },
    "30-admin": {
        "/home/alice/.ssh/authorized_keys",
        "/etc/ssh/sshd_config.d/50-piimage.conf",
        "/etc/sudoers.d/010_piimage-admin",
    },
    "40-time": {"/etc/timezone", "->/etc/localtime"},
    "50-munge": {"/etc/munge/munge.key"},
    "55-slurm": {"/etc/slurm/slurm.conf", "/etc/slurm/cgroup.conf"},
    "70-cluster-user": {"/etc/ssh/ssh_config.d/50-piimage-cluster.conf"},  # + HOME on the head
    "75-poe": set(),  # no file: lines appended to config.txt (checked below)
    "80-examples": set(),  # on the head only
}
EXAMPLES = {
    f"/clusterfs/examples/{n}"
    for n in ("README.md", "pi_mpi.py", "pi.sbatch", "sweep.py", "sweep.sbatch")
}
HEAD = {
    "60-timesync": {
        "/etc/chrony/conf.d/piimage.conf",
        "/etc/systemd/system/piimage-clock-save.service",
        "/etc/systemd/system/piimage-clock-save.timer",
        "->/etc/systemd/system/timers.target.wants/piimage-clock-save.timer",
    },
    "65-shared": {
        "/etc/exports.d/piimage.exports",
        "/clusterfs/hostfile",
        "/etc/openmpi/openmpi-default-hostfile",
        "/etc/openmpi/prte-default-hostfile",
    },
    "80-examples": EXAMPLES,
    # the cluster user's home is on the shared directory: compute nodes mount the head's
    "70-cluster-user": COMMON["70-cluster-user"]
    | {
        "/clusterfs/home/mpiuser/.ssh/id_ed25519",
        "/clusterfs/home/mpiuser/.ssh/id_ed25519.pub",
        "/clusterfs/home/mpiuser/.ssh/authorized_keys",
    },
}
CLIENT = {
    "60-timesync": {
        "/etc/systemd/timesyncd.conf.d/piimage.conf",
        "/etc/systemd/system/piimage-time-follow.service",
        "/etc/systemd/system/piimage-time-follow.timer",
        "->/etc/systemd/system/timers.target.wants/piimage-time-follow.timer",
        "/etc/systemd/system/munge.service.d/piimage-after-sync.conf",
        "->/etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service",
    },
    "65-shared": {
        "/etc/systemd/system/clusterfs.mount",
        "/etc/systemd/system/clusterfs.automount",
        "->/etc/systemd/system/remote-fs.target.wants/clusterfs.automount",
    },
}
MPI = {"/etc/openmpi/openmpi-default-hostfile", "/etc/openmpi/prte-default-hostfile"}
# kind: (hostname in the cluster, head runs jobs, stage -> paths, /clusterfs mode)
SLURM = COMMON["55-slurm"]
RESTART_SLURMD = {
    "/etc/systemd/system/slurmd.service.d/piimage-restart.conf",
    "/etc/systemd/system/slurmd.service.d/piimage-stepd-scope.conf",
}
RESTART_SLURMCTLD = {"/etc/systemd/system/slurmctld.service.d/piimage-restart.conf"}
KINDS = {
    "head": ("head", False, {**COMMON, **HEAD, "55-slurm": SLURM | RESTART_SLURMCTLD}, 0o777),
    "head-runs-jobs": (
        "head",
        True,
        {**COMMON, **HEAD, "55-slurm": SLURM | RESTART_SLURMCTLD | RESTART_SLURMD},
        0o777,
    ),
    "compute": (
        "node01",
        False,
        {
            **COMMON,
            **CLIENT,
            "55-slurm": SLURM | RESTART_SLURMD,
            "65-shared": CLIENT["65-shared"] | MPI,
        },
        0o755,
    ),
    # a role of the user's: SLURM client, munge and the NFS mount, but no Open MPI, no slurmd
    "custom": ("login1", False, {**COMMON, **CLIENT}, 0o755),
}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[bool, build.BuildPlan]:
    out = {}
    for jobs in (False, True):
        d = tmp_path_factory.mktemp(f"matrix-{jobs}")
        (d / "node-profiles").mkdir()
        (d / "node-profiles" / "login.yaml").write_text(
            "packages: [slurm-client, munge, nfs-common]\n"
        )
        extra = (
            f"admin: {{name: alice, ssh_authorized_keys: ['{KEY}']}}\n"
            "hardware: {poe_hat: rpi-poe}\n"
        )
        text = cluster_yaml(TWO, head_jobs=jobs, extra=extra)
        out[jobs] = plan(d, text + "  - {hostname: login1, role: login, ip: 10.0.0.30}\n")
    return out


def test_the_matrix_covers_every_shipped_stage():
    shipped = {s.name for s in discover([data_dir() / "stages"])}
    for _, _, expected, _ in KINDS.values():
        assert set(expected) == shipped


@pytest.mark.parametrize("kind", KINDS)
def test_render_matrix(matrix, kind):
    host, jobs, expected, share_mode = KINDS[kind]
    bp = matrix[jobs]
    pn = next(p for p in bp.nodes if p.hostname == host)
    by_stage: dict[str, set[str]] = {name: set() for name in expected}
    for f in pn.stamp.files:
        by_stage[f.stage].add(f.path)
    for link in pn.stamp.links:
        by_stage[link.stage].add("->" + link.path)
    assert by_stage == expected
    examples = {"/clusterfs/examples": 0o755, "/clusterfs/examples/results": 0o755}
    home = {"/clusterfs/home": 0o755, "/clusterfs/home/mpiuser": 0o700}  # the cluster user's
    assert {d.path: d.mode for d in pn.stamp.dirs} == {
        "/etc/ssh/piimage": 0o755,
        "/etc/munge": 0o700,
        "/clusterfs": share_mode,
        **({**examples, **home} if host == "head" else {}),
    }
    # the example jobs are the cluster user's, to run and change
    assert {(d.owner, d.group) for d in pn.stamp.dirs if d.path in examples} <= {
        ("mpiuser", "mpiuser")
    }
    assert {(f.owner, f.group, f.mode) for f in pn.stamp.files if f.path in EXAMPLES} <= {
        ("mpiuser", "mpiuser", 0o644)
    }
    assert [u.name for u in pn.stamp.users] == ["mpiuser"]
    assert [(a.path, a.lines[0]) for a in pn.stamp.append] == [
        ("/boot/firmware/config.txt", "dtoverlay=rpi-poe")
    ]

    files = {f.path: f.data.decode(errors="replace") for f in pn.stamp.files}
    conf = files["/etc/slurm/slurm.conf"]
    assert "SlurmctldHost=head(10.0.0.10)" in conf
    assert ("NodeName=head NodeAddr=10.0.0.10" in conf) is jobs
    assert "NodeName=login1" not in conf and "NodeName=node02 NodeAddr=10.0.0.12" in conf
    assert files["/etc/hostname"] == f"{host}\n"
    assert "slurmd" in pn.profile.packages or kind in ("head", "custom")
    if "/etc/openmpi/openmpi-default-hostfile" in files:
        hostfile = files["/etc/openmpi/openmpi-default-hostfile"]
        assert ("head slots=4" in hostfile) is jobs and "node01 slots=4" in hostfile
        assert files["/etc/openmpi/prte-default-hostfile"] == hostfile  # Open MPI 5's name
    assert "MpiDefault=pmix" in conf  # plain srun: one MPI world, not singletons
    # job history: a completion log on the head
    assert "JobCompType=jobcomp/filetxt\nJobCompLoc=/var/log/slurm/jobcomp.log\n" in conf
    if host == "head":
        pi = files["/clusterfs/examples/pi.sbatch"]
        # every job node, one rank per core (the head too when it runs jobs)
        assert f"#SBATCH --nodes={3 if jobs else 2}\n#SBATCH --ntasks-per-node=4\n" in pi
        assert pi.rstrip().endswith("srun python3 pi_mpi.py")
        sweep = files["/clusterfs/examples/sweep.sbatch"]
        assert "#SBATCH --array=0-7\n" in sweep and "--output=results/" in sweep
    # containment: cgroup tracking and limits; memory consumable, a default that fits every node
    assert (
        "ProctrackType=proctrack/cgroup" in conf and "TaskPlugin=task/cgroup,task/affinity" in conf
    )
    assert "SelectTypeParameters=CR_Core_Memory" in conf
    assert ("DefMemPerCPU=322" if jobs else "DefMemPerCPU=450") in conf  # (1800 - 512) // 4
    assert ("MemSpecLimit=512 State" in conf) is jobs  # only the head that runs jobs
    cgroup = files["/etc/slurm/cgroup.conf"]
    assert "ConstrainRAMSpace=yes" in cgroup and "ConstrainSwapSpace=yes" in cgroup
    if "/etc/systemd/system/clusterfs.mount" in files:
        mount = files["/etc/systemd/system/clusterfs.mount"]
        assert "Options=_netdev,nofail,hard," in mount and "soft" not in mount.split("Options=")[1]
    if "/etc/systemd/system/clusterfs.mount" in files:
        assert "What=head:/clusterfs" in files["/etc/systemd/system/clusterfs.mount"]
    # every node's slurm.conf, hosts and known_hosts are the same
    for path in ("/etc/slurm/slurm.conf", "/etc/hosts", "/etc/ssh/ssh_known_hosts"):
        assert len({next(f.data for f in p.stamp.files if f.path == path) for p in bp.nodes}) == 1
