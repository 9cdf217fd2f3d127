"""Planning a build renders every node's files before any image is touched."""

import shutil

import pytest

from piimage import build
from piimage import inventory as inv

pytestmark = pytest.mark.skipif(
    shutil.which("ssh-keygen") is None,
    reason="the cluster's keys are made with ssh-keygen (openssh-client)",
)

YAML = """\
name: lab
network: {subnet: 10.0.0.0/24, gateway: 10.0.0.1}
nodes:
  - {hostname: head, role: head, ip: 10.0.0.10, runs_jobs: %s}
  - {hostname: node01, role: compute, ip: 10.0.0.11}
  - {hostname: node02, role: compute, ip: 10.0.0.12, hardware: {model: pi4-4gb}}
"""


def plan_for(tmp_path, runs_jobs: bool):
    (tmp_path / "cluster.yaml").write_text(YAML % ("true" if runs_jobs else "false"))
    cluster = inv.load(tmp_path / "cluster.yaml")
    keys = build.cluster_keys(cluster)  # plan() itself needs no host tool: only the keys do
    return build.plan(cluster, cluster.nodes, keys=keys, out_dir=tmp_path / "out")


def files(bp, host):
    return {f.path: f for f in next(p for p in bp.nodes if p.hostname == host).stamp.files}


def test_cluster_files_identical_and_per_node(tmp_path):
    bp = plan_for(tmp_path, False)
    confs = {files(bp, h)["/etc/slurm/slurm.conf"].data for h in ("head", "node01", "node02")}
    assert len(confs) == 1
    conf = confs.pop().decode()
    assert "SlurmctldHost=head(10.0.0.10)" in conf
    assert "NodeName=node01 NodeAddr=10.0.0.11 CPUs=4 RealMemory=1800" in conf
    assert "NodeName=node02 NodeAddr=10.0.0.12 CPUs=4 RealMemory=3700" in conf
    assert "NodeName=head" not in conf
    keys = {files(bp, h)["/etc/munge/munge.key"].data for h in ("head", "node01", "node02")}
    assert len(keys) == 1 and len(keys.pop()) == 1024
    assert files(bp, "node01")["/etc/hostname"].data == b"node01\n"
    assert (
        b"address1=10.0.0.12/24,10.0.0.1"
        in files(bp, "node02")[
            "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection"
        ].data
    )
    assert "slurmd" not in bp.profiles["head"].packages
    assert (tmp_path / ".piimage" / "secrets").stat().st_mode & 0o777 == 0o700


def test_head_that_runs_jobs_gets_slurmd(tmp_path):
    bp = plan_for(tmp_path, True)
    conf = files(bp, "head")["/etc/slurm/slurm.conf"].data.decode()
    assert "NodeName=head NodeAddr=10.0.0.10" in conf and "Nodes=head,node01,node02" in conf
    head = bp.profiles["head"]
    assert (
        "slurmd" in head.packages
        and "slurmd.service" in head.enable
        and "slurmd.service" not in head.disable
    )


def test_accounting_slurmdbd_gives_the_head_slurmdbd_and_its_database(tmp_path):
    (tmp_path / "cluster.yaml").write_text(YAML % "false" + "accounting: slurmdbd\n")
    cluster = inv.load(tmp_path / "cluster.yaml")
    assert cluster.accounting == "slurmdbd" and cluster.head.facts.slurmdbd
    bp = build.plan(cluster, cluster.nodes, keys=build.cluster_keys(cluster), out_dir=tmp_path)
    head = bp.profiles["head"]
    assert {"slurmdbd", "mariadb-server"} <= set(head.packages)
    assert {"mariadb.service", "slurmdbd.service"} <= set(head.enable)
    assert "slurmdbd" not in bp.profiles["node01"].packages
    hf = files(bp, "head")
    dbd = hf["/etc/slurm/slurmdbd.conf"]
    assert (dbd.mode, dbd.owner, dbd.group) == (0o600, "slurm", "slurm")
    text = dbd.data.decode()
    assert "StorageType=accounting_storage/mysql" in text and "DbdHost=head" in text
    assert "StoragePass" not in text  # unix_socket: MariaDB knows slurm by its uid
    assert (
        "IDENTIFIED VIA unix_socket"
        in hf["/etc/systemd/system/piimage-slurm-db.service"].data.decode()
    )
    assert (
        "After=slurmdbd.service"
        in hf["/etc/systemd/system/slurmctld.service.d/piimage-after-slurmdbd.conf"].data.decode()
    )
    pn = next(p for p in bp.nodes if p.hostname == "head")
    assert {"piimage-mariadb-init.service", "piimage-slurm-db.service"} <= set(pn.stamp.enable)
    # the data directory that mariadb-server's postinst left under QEMU is emptied; the system
    # tables are made on the board's first boot, before MariaDB starts
    assert "/var/lib/mysql/*" in pn.stamp.remove
    init = hf["/etc/systemd/system/piimage-mariadb-init.service"].data.decode()
    assert "ExecStart=/usr/bin/mariadb-install-db --user=mysql" in init
    assert "Before=mariadb.service" in init and "RequiredBy=mariadb.service" in init
    # slurm.conf, the same everywhere, sends the records to the head's slurmdbd
    for host in ("head", "node01"):
        conf = files(bp, host)["/etc/slurm/slurm.conf"].data.decode()
        assert "AccountingStorageType=accounting_storage/slurmdbd" in conf
        assert "AccountingStorageHost=head" in conf and "JobCompType=jobcomp/filetxt" in conf
    assert not [p for p in files(bp, "node01") if "slurmdbd" in p or "slurm-db" in p]
    assert (
        "/var/lib/mysql/*" not in next(p for p in bp.nodes if p.hostname == "node01").stamp.remove
    )
    # the default: no database, the completion log
    (tmp_path / "plain").mkdir()
    plain = files(plan_for(tmp_path / "plain", False), "head")
    assert "/etc/slurm/slurmdbd.conf" not in plain
    assert (
        "AccountingStorageType=accounting_storage/none"
        in plain["/etc/slurm/slurm.conf"].data.decode()
    )


def test_missing_layers_are_built_side_by_side_and_cached_ones_kept(tmp_path, monkeypatch):
    """ensure_layers builds the layers it lacks at the same time (one per core) and takes the
    others from the cache; each concurrent build gets a private apt archive."""
    import json
    import threading
    import time

    from piimage import layers
    from piimage.fsutil import fingerprint

    monkeypatch.setattr(layers.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("PIIMAGE_LAYER_CACHE", str(tmp_path / "layers"))
    (tmp_path / "layers").mkdir()
    mk = lambda role: layers.LayerInputs(role, "b" * 64, (role + "-pkg",), 0, ())  # noqa: E731
    wanted = {i.key(): i for i in (mk("head"), mk("compute"), mk("login"))}
    cached = layers.layer_path(mk("login"))
    cached.write_bytes(b"")
    cached.with_suffix(".json").write_text(json.dumps({"image": fingerprint(cached)}))
    running, peak, calls = set(), [0], []
    lock = threading.Lock()

    def fake(base, inputs, stages, *, apt_proxy=None, apt_mirrors=None, private_apt=False, **kw):
        assert kw.keys() <= {"stopping"}
        with lock:
            running.add(inputs.role)
            peak[0] = max(peak[0], len(running))
            calls.append((inputs.role, private_apt))
        time.sleep(0.3)
        with lock:
            running.discard(inputs.role)
        return tmp_path / f"{inputs.role}.img"

    monkeypatch.setattr(layers, "ensure_layer", fake)
    out = layers.ensure_layers(None, wanted, [])
    assert out[mk("login").key()] == cached
    assert (
        out[mk("head").key()] == tmp_path / "head.img"
        and out[mk("compute").key()] == tmp_path / "compute.img"
    )
    assert peak[0] == 2 and sorted(calls) == [("compute", True), ("head", True)]


def test_private_apt_archive_links_in_and_back(tmp_path):
    from piimage.layers import _private_archives

    shared = tmp_path / "arm64"
    shared.mkdir()
    (shared / "a.deb").write_bytes(b"a")
    with _private_archives(shared) as private:
        assert (private / "a.deb").stat().st_ino == (shared / "a.deb").stat().st_ino
        (private / "b.deb").write_bytes(b"b")  # what apt downloaded
    assert (shared / "b.deb").read_bytes() == b"b" and not private.exists()


def test_a_usb_drive_as_the_shared_directory_gets_no_files_under_it(tmp_path):
    """The drive is mounted over the directory at boot: what the image holds there would be
    hidden, so neither the hostfile nor the example jobs are written there."""
    (tmp_path / "cluster.yaml").write_text(
        YAML % "false"
        + "shared: {path: /srv/shared, device_uuid: 0b3c5a2e-41cf-4bd2-9a1c-1d2e3f405162}\n"
    )
    cluster = inv.load(tmp_path / "cluster.yaml")
    bp = build.plan(cluster, cluster.nodes, keys=build.cluster_keys(cluster), out_dir=tmp_path)
    head = files(bp, "head")
    assert "/etc/systemd/system/srv-shared.mount" in head
    assert not [p for p in head if p.startswith("/srv/shared/")]
    pn = next(p for p in bp.nodes if p.hostname == "head")
    assert [d.path for d in pn.stamp.dirs if d.path.startswith("/srv/shared")] == ["/srv/shared"]
    # the cluster user's home (its SSH keys) waits beside, and is copied onto a drive without one
    seed = "/var/lib/piimage/cluster-home"
    key = head[f"{seed}/.ssh/id_ed25519"]
    assert (key.mode, key.owner) == (0o600, "mpiuser")
    assert next(d for d in pn.stamp.dirs if d.path == seed).owner == "mpiuser"
    unit = head["/etc/systemd/system/piimage-cluster-home.service"].data.decode()
    assert "ConditionPathExists=!/srv/shared/home/mpiuser/.ssh/authorized_keys" in unit
    assert f"ExecStart=/bin/cp -a {seed}/. /srv/shared/home/mpiuser" in unit
    assert "piimage-cluster-home.service" in pn.stamp.enable
    # without a drive, the head's card holds them, the home too; compute nodes hold no home
    (tmp_path / "plain").mkdir()
    plain_plan = plan_for(tmp_path / "plain", False)
    plain = files(plain_plan, "head")
    home = "/clusterfs/home/mpiuser"
    assert {"/clusterfs/hostfile", "/clusterfs/examples/pi.sbatch"} <= set(plain)
    assert f"{home}/.ssh/authorized_keys" in plain and not [p for p in plain if seed in p]
    assert "/etc/systemd/system/piimage-cluster-home.service" not in plain
    assert not [p for p in files(plain_plan, "node01") if p.startswith(("/clusterfs", seed))]
