"""End to end: real stand-in base images served over loopback HTTP, real libguestfs, real
apt under QEMU user emulation; every image is read back and checked."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from clihelp import CLUSTER_YAML, live_partial, piimage, pubkey, with_ctrl_c
from readback import fsck_partitions, open_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def host_mounts_and_loops() -> tuple[frozenset[str], frozenset[str]]:
    """The host's mounts and loop devices that piimage could leave (a chroot's mounts, loop
    devices on its layers and workspaces: every such path names piimage), less those of
    piimage processes still at work (the other test lane's builds and stand-ins). Docker's
    own mounts, which come and go with the other lane's Docker tests, are not piimage's."""
    loops = {}
    for ln in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines():
        dev, _, rest = ln.partition(":")
        loops[dev] = ln
    busy = {dev for dev, ln in loops.items() if _still_at_work(ln)}
    mounts = [ln.split() for ln in Path("/proc/mounts").read_text().splitlines()]
    roots = {f[1] for f in mounts if len(f) > 1 and f[0] in busy}
    kept = frozenset(
        " ".join(f)
        for f in mounts
        if len(f) > 1
        and "piimage" in " ".join(f[:2])
        and f[0] not in busy
        and not any(f[1] == r or f[1].startswith(r + "/") for r in roots)
        and not _still_at_work(f[1])
    )
    return kept, frozenset(ln for dev, ln in loops.items() if dev not in busy and "piimage" in ln)


def _still_at_work(text: str) -> bool:
    """A layer being built by a live process ('.partial-<pid>'), a stand-in being built, or
    a chroot of a live build (its mount point is some process's root or cwd)."""
    live = live_partial(text)
    if live is not None:
        return live
    if "/standin/.build-" in text:
        return True
    m = re.search(r"(/\S*/piimage-root-[^/\s]+)", text)
    return bool(m) and _in_use(m.group(1))


def _in_use(path: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            for link in ("root", "cwd"):
                try:
                    if (os.readlink(f"/proc/{pid}/{link}") + "/").startswith(path + "/"):
                        return True
                except OSError:
                    continue
    return False


# --------------------------------------------------------------------------------------------
# The README command, from the embedded default cluster, on the trixie stand-in.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def node02_default(env, standin_trixie, cluster_all, tmp_path_factory):
    # after cluster_all, whose --all builds the head and compute layers side by side; this
    # build of the default cluster then finds its compute layer cached (same profile, same key)
    cwd = tmp_path_factory.mktemp("default-cluster")
    proc = piimage(["build", "--role", "compute", "--hostname", "node02"], env, cwd)
    return cwd, proc


def test_default_cluster_node02(node02_default, env):
    cwd, proc = node02_default
    out = cwd / "out" / "picluster"
    img = out / "node02.img"
    assert str(img.relative_to(cwd)) in proc.stdout or str(img) in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "manifest.json",
        "node02.img",
        "node02.img.bmap",
        "node02.img.sha256",
        "os_list.json",
        "piimage-node.png",
    ]
    digest = subprocess.run(
        ["sha256sum", str(img)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert (out / "node02.img.sha256").read_text() == f"{digest}  node02.img\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["nodes"]["node02"]["sha256"] == digest
    assert manifest["nodes"]["node02"]["role"] == "compute"
    assert len(manifest["base"]["sha256"]) == 64
    assert any(f["path"] == "/etc/hostname" for f in manifest["nodes"]["node02"]["files"])
    # sparse: far fewer blocks than bytes
    st = img.stat()
    assert st.st_blocks * 512 < st.st_size

    key = pubkey(env)
    with open_images([img]) as (v,):
        with v.mounted():
            assert v.text("/etc/hostname") == "node02\n"
            hosts = v.text("/etc/hosts")
            for i, h in enumerate(["head", "node01", "node02", "node03", "node04"]):
                assert f"10.42.0.{10 + i}\t{h}" in hosts
            assert "raspberrypi" not in hosts
            nm = "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection"
            assert v.mode(nm) == 0o600 and v.owner(nm) == (0, 0)
            assert "address1=10.42.0.12/24,10.42.0.1" in v.text(nm)
            # cloud-init: ours sorts after Raspberry Pi's 99_raspberry-pi.cfg, so it wins shared keys
            assert "network: {config: disabled}" in v.text(
                "/etc/cloud/cloud.cfg.d/99_zz-piimage.cfg"
            )
            assert not v.exists("/etc/cloud/cloud.cfg.d/99-piimage.cfg")
            assert sorted(["99_raspberry-pi.cfg", "99_zz-piimage.cfg"])[-1] == "99_zz-piimage.cfg"
            # the admin user replaced UID 1000 and has the key
            assert v.uid_of("admin") == 1000
            ak = "/home/admin/.ssh/authorized_keys"
            assert key in v.text(ak)
            assert v.mode(ak) == 0o600 and v.owner(ak) == (1000, 1000)
            assert v.mode("/home/admin/.ssh") == 0o700 and v.owner("/home/admin/.ssh")[0] == 1000
            assert "PasswordAuthentication no" in v.text("/etc/ssh/sshd_config.d/50-piimage.conf")
            assert v.lexists("/etc/systemd/system/multi-user.target.wants/ssh.service")
            assert v.readlink("/etc/systemd/system/userconfig.service") == "/dev/null"
            # rename-user's "SSH may not work until a valid user has been set up" banner is gone
            assert not v.exists("/etc/ssh/sshd_config.d/rename_user.conf")
            # as Raspberry Pi OS trixie ships it: the first boot is a first boot (rpi-resize)
            assert v.text("/etc/machine-id") == "uninitialized\n"
            assert v.readlink("/etc/localtime").endswith("/Etc/UTC")
            # identity: PARTUUIDs follow the new disk id; cmdline stays one line with resize
            did = v.disk_id()
            cmdline = v.text("/boot/firmware/cmdline.txt")
            assert cmdline.count("\n") <= 1 and f"root=PARTUUID={did}-02" in cmdline
            assert "resize" in cmdline
            # the Pi kernel's memory cgroup back on, at the end of the line
            assert cmdline.split()[-1] == "cgroup_enable=memory"
            assert f"PARTUUID={did}-02" in v.text("/etc/fstab")
            assert f"PARTUUID={did}-01" in v.text("/etc/fstab")
            assert did == manifest["nodes"]["node02"]["disk_id"]
            # host key 0600 root, where the first boot's regeneration (ssh_host_*_key*) cannot reach
            assert v.mode("/etc/ssh/piimage/ssh_host_ed25519_key") == 0o600
            assert "HostKey /etc/ssh/piimage/ssh_host_ed25519_key" in v.text(
                "/etc/ssh/sshd_config.d/50-piimage.conf"
            )
            assert not v.exists("/etc/ssh/ssh_host_ed25519_key")
            assert manifest["nodes"]["node02"]["disk_id_after_first_boot"].startswith("random")
    results = fsck_partitions(img)
    for tool, r in results.items():
        assert r.returncode == 0, f"{tool}: {r.stdout}{r.stderr}"


# --------------------------------------------------------------------------------------------
# A three-node cluster with --all: issue 2's --all and issue 3's cluster services.
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster_all(env, standin_trixie, tmp_path_factory):
    # No compression here: test_outputs_for_flashing_tools compresses the one image it checks
    # (xz of three ~2 GB images would cost minutes of a two-core CI machine for nothing).
    cwd = tmp_path_factory.mktemp("cluster")
    (cwd / "cluster.yaml").write_text(CLUSTER_YAML.format(key=pubkey(env), node02_ip="10.0.0.12"))
    before = host_mounts_and_loops()
    proc = piimage(["build", "--all", "--compress", "none"], env, cwd)
    return cwd, proc, before


def copy_of(cwd: Path, dest: Path) -> Path:
    """The cluster folder with its secrets, its out/ hard-linked: a build there replaces the
    links (files are published by rename) and leaves the session's cluster as it was."""
    subprocess.run(["cp", "-a", "--link", str(cwd), str(dest)], check=True)
    return dest


def test_all_nodes_distinct_identities(cluster_all):
    cwd, proc, _ = cluster_all
    out = cwd / "out" / "testcluster"
    imgs = [out / f"{h}.img" for h in ("head", "node01", "node02")]
    assert all(p.exists() for p in imgs)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left in out/"
    with open_images(imgs) as views:
        ids, hostkeys = set(), set()
        for v, h in zip(views, ("head", "node01", "node02")):
            with v.mounted():
                assert v.text("/etc/hostname") == f"{h}\n"
                ids.add(v.disk_id())
                hostkeys.add(v.text("/etc/ssh/piimage/ssh_host_ed25519_key.pub"))
                known = v.text("/etc/ssh/ssh_known_hosts")
                assert all(f"{n}," in known for n in ("head", "node01", "node02"))
        assert len(ids) == 3 and len(hostkeys) == 3


def test_cluster_services(cluster_all):
    cwd, proc, before = cluster_all
    out = cwd / "out" / "testcluster"
    imgs = [out / f"{h}.img" for h in ("head", "node01", "node02")]
    secrets = cwd / ".piimage" / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    munge_key = (secrets / "munge.key").read_bytes()
    assert (secrets / "munge.key").stat().st_mode & 0o777 == 0o600
    confs = {}
    with open_images(imgs) as (head, n1, n2):
        for v, role in ((head, "head"), (n1, "compute"), (n2, "compute")):
            with v.mounted():
                pk = v.dpkg_installed()
                need = {"munge", "slurm-client", "openmpi-bin", "python3-mpi4py"}
                need |= (
                    {"slurmctld", "nfs-kernel-server", "chrony"}
                    if role == "head"
                    else {"slurmd", "nfs-common"}
                )
                assert need <= pk, f"{v.path.name}: missing {need - pk}"
                # munge: the cluster's key, owned by this image's munge user, 0400
                assert v.read("/etc/munge/munge.key") == munge_key
                assert v.owner("/etc/munge/munge.key") == (v.uid_of("munge"), v.gid_of("munge"))
                assert v.mode("/etc/munge/munge.key") == 0o400
                confs[v.path.name] = v.read("/etc/slurm/slurm.conf")
                wants = v.ls("/etc/systemd/system/multi-user.target.wants")
                assert "munge.service" in wants
                daemon = "slurmctld" if role == "head" else "slurmd"
                assert "Restart=on-failure" in v.text(
                    f"/etc/systemd/system/{daemon}.service.d/piimage-restart.conf"
                )
                if role != "head":  # a retry must not meet the failed scope of the try before
                    assert "reset-failed --quiet *slurmstepd.scope" in v.text(
                        "/etc/systemd/system/slurmd.service.d/piimage-stepd-scope.conf"
                    )
                if role == "head":
                    assert "slurmctld.service" in wants and "slurmd.service" not in wants
                    assert "10.0.0.0/24(rw,sync,no_subtree_check,no_root_squash)" in v.text(
                        "/etc/exports.d/piimage.exports"
                    )
                    assert "allow 10.0.0.0/24" in v.text("/etc/chrony/conf.d/piimage.conf")
                    assert "node01 slots=4" in v.text("/clusterfs/hostfile")
                else:
                    assert "slurmd.service" in wants and "slurmctld.service" not in wants
                    assert "What=head:/clusterfs" in v.text("/etc/systemd/system/clusterfs.mount")
                    assert v.lexists(
                        "/etc/systemd/system/remote-fs.target.wants/clusterfs.automount"
                    )
                    assert "NTP=10.0.0.10" in v.text("/etc/systemd/timesyncd.conf.d/piimage.conf")
                    # munge (and slurmd after it) wait for the first sync with the head: the
                    # wait unit is the release's own (the link must not point at nothing)
                    wait = "/etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service"
                    assert v.exists(v.readlink(wait))
                    assert "After=time-sync.target" in v.text(
                        "/etc/systemd/system/munge.service.d/piimage-after-sync.conf"
                    )
                # cluster user: same UID everywhere, its home on the shared directory (the
                # head's card holds it, compute nodes mount the head's), the cluster keypair
                assert v.uid_of("mpiuser") == 1500
                home = "/clusterfs/home/mpiuser"
                assert f"mpiuser:x:1500:1500::{home}:/bin/bash" in v.text("/etc/passwd")
                if role == "head":
                    assert v.mode(home) == 0o700 and v.owner(home)[0] == 1500
                    assert v.mode(f"{home}/.ssh/id_ed25519") == 0o600
                    assert v.owner(f"{home}/.ssh/id_ed25519")[0] == 1500
                    assert (
                        v.read(f"{home}/.ssh/authorized_keys").strip()
                        == v.read(f"{home}/.ssh/id_ed25519.pub").strip()
                    )
                else:
                    assert not v.lexists(f"{home}/.ssh")  # the head's, over NFS
                # nothing of the package step is left behind
                assert not v.lexists("/usr/sbin/policy-rc.d")
                assert [
                    f
                    for f in v.ls("/var/lib/apt/lists")
                    if f not in ("partial", "lock", "auxfiles")
                ] == []
                assert v.ls("/var/cache/apt/archives") in (
                    [],
                    ["partial"],
                    ["lock", "partial"],
                    ["partial", "lock"],
                )
    assert len(set(confs.values())) == 1
    conf = next(iter(confs.values())).decode()
    assert "SlurmctldHost=head(10.0.0.10)" in conf
    assert "NodeName=node01 NodeAddr=10.0.0.11 CPUs=4 RealMemory=1800" in conf
    assert "NodeName=node02 NodeAddr=10.0.0.12" in conf
    assert "NodeName=head" not in conf
    # nothing stayed mounted or attached on the host
    mounts, loops = host_mounts_and_loops()
    assert mounts - before[0] == set() and loops - before[1] == set()


# --------------------------------------------------------------------------------------------
# The bookworm stand-in (Raspberry Pi OS Legacy).
# --------------------------------------------------------------------------------------------
def test_bookworm_node(env, standin_bookworm, tmp_path):
    (tmp_path / "cluster.yaml").write_text(
        CLUSTER_YAML.format(key=pubkey(env), node02_ip="10.0.0.12")
    )
    piimage(
        [
            "build",
            "--role",
            "compute",
            "--hostname",
            "node01",
            "--base",
            "raspios-lite-arm64-legacy",
        ],
        env,
        tmp_path,
    )
    img = tmp_path / "out" / "testcluster" / "node01.img"
    with open_images([img]) as (v,):
        with v.mounted():
            assert "bookworm" in v.text("/etc/os-release")
            assert v.text("/etc/hostname") == "node01\n"
            nm = "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection"
            assert v.mode(nm) == 0o600 and "address1=10.0.0.11/24,10.0.0.1" in v.text(nm)
            assert pubkey(env) in v.text("/home/alice/.ssh/authorized_keys")
            assert {"slurmd", "munge", "python3-mpi4py"} <= v.dpkg_installed()
            assert v.owner("/etc/munge/munge.key")[0] == v.uid_of("munge")
            wait = "/etc/systemd/system/sysinit.target.wants/systemd-time-wait-sync.service"
            assert v.exists(v.readlink(wait))  # bookworm's systemd has the wait unit too
            cmdline = v.text("/boot/firmware/cmdline.txt")
            assert "init=/usr/lib/raspberrypi-sys-mods/firstboot" in cmdline
            assert cmdline.split()[-1] == "cgroup_enable=memory"
            assert v.text("/etc/machine-id") == ""  # as Raspberry Pi OS bookworm ships it
            assert f"root=PARTUUID={v.disk_id()}-02" in cmdline
    for tool, r in fsck_partitions(img).items():
        assert r.returncode == 0, f"{tool}: {r.stdout}{r.stderr}"


# --------------------------------------------------------------------------------------------
# piimage.lock: the base stays what the first build took until the user asks for another.
# --------------------------------------------------------------------------------------------
@contextmanager
def _served(directory: Path):
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_lock_keeps_the_base_until_asked(env, standin_bookworm, standin_raw, tmp_path):
    """A second build after the upstream image list names a newer image keeps the locked base;
    --update-base takes the new one; a node whose Slurm its controller cannot talk to is
    refused before any image is written. Costs one bookworm compute layer (the new base's
    digest makes a new layer key) and three stamps."""
    site = tmp_path / "site"
    site.mkdir()
    old_name = standin_bookworm.image_xz.name
    os.link(standin_bookworm.image_xz, site / old_name)
    old_item = dict(standin_bookworm.item)
    # the same image, compressed again: another download digest, a later release date
    new_name = old_name.replace(".img.xz", "-v2.img.xz")
    with open(site / new_name, "wb") as f:
        subprocess.run(
            ["xz", "-0", "-T0", "-c", str(standin_raw("bookworm"))], stdout=f, check=True
        )
    new_sha = _sha(site / new_name)
    cwd = tmp_path / "cluster"
    cwd.mkdir()
    (cwd / "cluster.yaml").write_text(
        CLUSTER_YAML.format(key=pubkey(env), node02_ip="10.0.0.12").replace(
            "base: raspios-lite-arm64\n", "base: raspios-lite-arm64-legacy\n"
        )
    )
    with _served(site) as url:

        def publish(*items):
            doc = {"os_list": [{"name": "Raspberry Pi OS (other)", "subitems": list(items)}]}
            (site / "os_list.json").write_text(json.dumps(doc))

        publish({**old_item, "url": url + old_name})
        e = dict(env, PIIMAGE_OS_LIST_URL=url + "os_list.json")
        out = cwd / "out" / "testcluster"
        piimage(["build", "--hostname", "node01"], e, cwd)
        locked = yaml.safe_load((cwd / "piimage.lock").read_text())
        assert locked["base"]["sha256"] == old_item["image_download_sha256"]
        assert locked["base"]["asked"] == "raspios-lite-arm64-legacy"
        assert locked["nodes"]["node01"]["slurm"] == "22.05"
        assert locked["nodes"]["node01"]["release"] == "bookworm"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["nodes"]["node01"]["packages"]["slurmd"].startswith("22.05.")

        # upstream now lists a newer image: the lock keeps the old one
        publish(
            {**old_item, "url": url + old_name},
            {
                **old_item,
                "url": url + new_name,
                "image_download_sha256": new_sha,
                "release_date": "2099-01-01",
            },
        )
        proc = piimage(["build", "--hostname", "node02"], e, cwd)
        assert "as locked in piimage.lock" in proc.stderr
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["base"]["sha256"] == old_item["image_download_sha256"]
        locked = yaml.safe_load((cwd / "piimage.lock").read_text())
        assert sorted(locked["nodes"]) == ["node01", "node02"]

        # a controller the new node's Slurm cannot talk to (as if the head had been built on
        # trixie): refused, exit 2, nothing written
        head_on_trixie = {"role": "head", "release": "trixie", "slurm": "24.11"}
        (cwd / "piimage.lock").write_text(
            yaml.safe_dump({**locked, "nodes": {**locked["nodes"], "head": head_on_trixie}})
        )
        before = sorted(p.name for p in out.iterdir())
        proc = piimage(["build", "--hostname", "node02"], e, cwd, check_rc=2)
        assert (
            "these nodes would run Slurm releases that cannot work together: node01: Slurm "
            "22.05 (as last built); node02: Slurm 22.05 (the controller head runs Slurm 24.11"
        ) in proc.stderr
        assert sorted(p.name for p in out.iterdir()) == before
        locked["nodes"].pop("head", None)
        (cwd / "piimage.lock").write_text(yaml.safe_dump(locked))

        # --update-base: the newest image, locked from now on
        proc = piimage(["build", "--hostname", "node02", "--update-base"], e, cwd)
        locked = yaml.safe_load((cwd / "piimage.lock").read_text())
        assert locked["base"]["sha256"] == new_sha
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["base"]["sha256"] == new_sha


# `piimage inspect` (issue 14): which node each image is, read-only; with an inventory, drift.
def test_inspect_names_each_node_and_its_drift(cluster_all, env, tmp_path):
    cwd = cluster_all[0]
    out = cwd / "out" / "testcluster"
    hosts = ("head", "node01", "node02")
    imgs = [out / f"{h}.img" for h in hosts]
    manifest = json.loads((out / "manifest.json").read_text())
    proc = piimage(
        ["inspect", "--json", "-i", str(cwd / "cluster.yaml"), *map(str, imgs)], env, cwd
    )
    docs = json.loads(proc.stdout)
    assert [d["identity"]["node"] for d in docs] == list(hosts)
    for doc, h in zip(docs, hosts):
        ident, built = doc["identity"], manifest["nodes"][h]
        assert (ident["cluster"], ident["role"]) == ("testcluster", built["role"])
        assert ident["base"]["sha256"] == manifest["base"]["sha256"]
        assert ident["role_layer"] == built["role_layer"] and ident["release"] == "trixie"
        # read from the card's dpkg status: the versions the manifest has from the layer
        assert doc["packages"] and all(
            built["packages"][p] == v for p, v in doc["packages"].items()
        )
        # the inventory it was built from: nothing drifted (files with keys are not compared)
        assert doc["drift"] == [], doc["drift"]
        assert doc["drift_not_compared"] > 0
    assert {"slurmctld", "munge"} <= set(docs[0]["packages"])
    assert {"slurmd", "munge", "openmpi-bin", "python3-mpi4py"} <= set(docs[1]["packages"])
    # node02 moved to another address in cluster.yaml: its card and the head's drifted
    moved = tmp_path / "cluster.yaml"
    moved.write_text(CLUSTER_YAML.format(key=pubkey(env), node02_ip="10.0.0.22"))
    said = piimage(["inspect", "-i", str(moved), str(imgs[2]), str(imgs[0])], env, cwd).stdout
    assert f"{imgs[2]}: node node02 of cluster testcluster (compute)" in said
    node02, head = said.split(f"\n\n{imgs[0]}: ")
    assert "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection: differs" in node02
    assert "+address1=10.0.0.22/24" in node02 and "-address1=10.0.0.12/24" in node02
    for text in (node02, head):
        assert "/etc/hosts: differs" in text and "/etc/slurm/slurm.conf: differs" in text
        assert "+NodeName=node02 NodeAddr=10.0.0.22" in text
    assert "nmconnection" not in head
    # read-only: the image is the one the manifest names
    assert _sha(imgs[2]) == manifest["nodes"]["node02"]["sha256"]


# `piimage flash` (issue 14) onto a real block device: a loop device over a sparse file, with
# direct I/O so the writes reach the file as a card's would reach the card.
@contextmanager
def loop_card(path: Path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_flash_writes_a_card_that_reads_back_as_the_image(cluster_all, env, tmp_path):
    import signal

    out = cluster_all[0] / "out" / "testcluster"
    img = out / "node01.img"
    manifest = json.loads((out / "manifest.json").read_text())
    size = img.stat().st_size
    card = tmp_path / "card"
    with loop_card(card, size + (256 << 20)) as dev:
        # a loop device is not removable: a card reader's disk is, and nothing else is written
        refused = piimage(["flash", str(img), dev, "--yes"], env, tmp_path, check_rc=2)
        assert f"{dev}: is not a removable disk" in refused.stderr
        proc = piimage(["flash", str(img), dev, "--yes", "--allow-fixed"], env, tmp_path)
        assert f"done: node01.img on {dev}" in proc.stdout, proc.stderr[-2000:]
        # the card was empty: the mapped ranges written, the holes still zero, so the card's
        # first bytes are the image exactly
        h = subprocess.run(
            f"head -c {size} {card} | sha256sum", shell=True, capture_output=True, text=True
        ).stdout.split()[0]
        assert h == manifest["nodes"]["node01"]["sha256"]
        said = piimage(["inspect", dev], env, tmp_path).stdout
        assert said.startswith(f"{dev}: node node01 of cluster testcluster (compute)"), said
        # Ctrl-C in the middle of writing the head's image onto the same card
        p = subprocess.Popen(
            [sys.executable, "-m", "piimage.cli", "flash", str(out / "head.img"), dev]
            + ["--yes", "--allow-fixed"],
            env=env,
            cwd=tmp_path,
            preexec_fn=with_ctrl_c,  # xdist's workers ignore SIGINT, and children inherit that
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        start = card.stat().st_mtime_ns
        deadline = time.monotonic() + 120
        while card.stat().st_mtime_ns == start and p.poll() is None:
            assert time.monotonic() < deadline, "flash never started writing"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 130, (p.returncode, stdout, stderr[-2000:])
        assert "is not a good card" in stderr and "done" not in stdout
        with open(card, "rb") as f:
            assert f.read(1 << 20) == bytes(1 << 20), "the half-written card still has a table"


# --------------------------------------------------------------------------------------------
# Outputs every flashing tool takes (xz, the default of --all: see tests/unit/test_cli.py).
# --------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return subprocess.run(
        ["sha256sum", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()[0]


@pytest.mark.late_in_trixie_lane  # ~5 min (stamp + xz of one image), after the rehearsal
def test_outputs_for_flashing_tools(cluster_all, env, tmp_path):
    import xml.etree.ElementTree as ET

    cwd = copy_of(cluster_all[0], tmp_path / "cluster")
    piimage(["build", "--hostname", "node01", "--compress", "xz"], env, cwd)
    out = cwd / "out" / "testcluster"
    img, xz = out / "node01.img", out / "node01.img.xz"
    # .img.xz decompresses to exactly the .img, and both sidecars are right
    assert (out / "node01.img.xz.sha256").read_text() == f"{_sha(xz)}  node01.img.xz\n"
    unpacked = tmp_path / "node01.img"
    with open(unpacked, "wb") as f:
        subprocess.run(["xz", "-dc", str(xz)], stdout=f, check=True)
    assert _sha(unpacked) == _sha(img)
    unpacked.unlink()
    # bmaptool copy with the .bmap writes the same bytes in every mapped range
    dest = tmp_path / "card.img"
    subprocess.run(
        ["bmaptool", "copy", "--bmap", str(out / "node01.img.bmap"), str(img), str(dest)],
        check=True,
        capture_output=True,
    )
    root = ET.parse(out / "node01.img.bmap").getroot()
    bs = int(root.findtext("BlockSize"))
    ranges = [r.text.strip() for r in root.iter("Range")]
    assert ranges
    with open(img, "rb") as a, open(dest, "rb") as b:
        for r in ranges:
            first, _, last = r.partition("-")
            first, last = int(first), int(last or first)
            a.seek(first * bs)
            b.seek(first * bs)
            n = (last - first + 1) * bs
            while n > 0:
                k = min(n, 1 << 22)
                assert a.read(k) == b.read(k), f"range {r} differs"
                n -= k
    dest.unlink()
    # Raspberry Pi Imager repository: sizes and digests match the files
    doc = json.loads((out / "os_list.json").read_text())
    items = {i["name"].split(": ", 1)[1].split(" ")[0]: i for i in doc["os_list"]}
    assert set(items) == {"head", "node01", "node02"}
    it = items["node01"]
    assert it["url"].endswith("/node01.img.xz")
    assert it["extract_size"] == img.stat().st_size and it["extract_sha256"] == _sha(img)
    assert it["image_download_size"] == xz.stat().st_size and it["image_download_sha256"] == _sha(
        xz
    )
    assert it["init_format"] == "none" and "pi4-64bit" in it["devices"] and it["release_date"]
    # every field Imager's schema requires of an image; the icon and the block map are there
    required = ("name", "description", "icon", "url", "extract_size", "extract_sha256")
    assert all(it.get(k) for k in (*required, "image_download_size", "release_date", "devices"))
    assert it["bmap_url"].endswith("/node01.img.bmap") and it["icon"].endswith("/piimage-node.png")
    assert (out / "piimage-node.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # `piimage inspect` reads the compressed image too (unpacked to a temporary file, removed)
    said = piimage(["inspect", str(xz)], env, cwd).stdout
    assert said.startswith(f"{xz}: node node01 of cluster testcluster (compute)"), said
    assert not list((Path(env["PIIMAGE_CACHE"]) / "work").glob("*-inspect-*"))
    # SHA256SUMS covers the folder and checks out
    sums = (out / "SHA256SUMS").read_text()
    assert "node01.img.xz" in sums and "os_list.json" in sums and "manifest.json" in sums
    subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=out, check=True)


# Rebuilds a copy of the cluster above, with node01's .img.xz, with a new address for node02.
@pytest.mark.late_in_trixie_lane
def test_changed_ip_reuses_role_layers(cluster_all, env, tmp_path):
    cwd = copy_of(cluster_all[0], tmp_path / "cluster")
    # what `--compress zstd` left beside node02.img in an earlier build
    first = cwd / "out" / "testcluster" / "node02.img"
    subprocess.run(["zstd", "-q", "-T0", "-1", str(first), "-o", f"{first}.zst"], check=True)
    Path(f"{first}.zst.sha256").write_text(f"{_sha(Path(f'{first}.zst'))}  node02.img.zst\n")
    (cwd / "cluster.yaml").write_text(CLUSTER_YAML.format(key=pubkey(env), node02_ip="10.0.0.22"))
    cache_images = Path(env["PIIMAGE_CACHE"]) / "images"
    before = {p: p.stat().st_mtime_ns for p in cache_images.glob("*/image.img")}
    proc = piimage(["build", "--all", "--compress", "none"], env, cwd)
    assert "role layer head: cached" in proc.stderr
    assert "role layer compute: cached" in proc.stderr
    assert "apt-get" not in proc.stderr and "building" not in proc.stderr
    # the base was downloaded and decompressed once for the whole session: nothing new in the
    # cache, and the trixie base this cluster uses is the one entry made by the first build
    assert {p: p.stat().st_mtime_ns for p in cache_images.glob("*/image.img")} == before
    out = cwd / "out" / "testcluster"
    base_sha = json.loads((out / "manifest.json").read_text())["base"]["sha256"]
    assert (cache_images / base_sha / "image.img") in before
    assert "downloading" not in proc.stderr and "decompressing" not in proc.stderr
    with open_images([out / "node02.img"]) as (v,):
        with v.mounted():
            assert "address1=10.0.0.22/24" in v.text(
                "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection"
            )
            assert "NodeName=node02 NodeAddr=10.0.0.22" in v.text("/etc/slurm/slurm.conf")
    # the earlier build's .img.zst no longer matches the new .img: it is gone, not left stale
    assert not (out / "node02.img.zst").exists() and not (out / "node02.img.zst.sha256").exists()


# --------------------------------------------------------------------------------------------
# Installed, not run from the checkout (issue 14): a wheel of this tree in a fresh venv.
# --------------------------------------------------------------------------------------------
@pytest.mark.late_in_trixie_lane  # needs the trixie layers that cluster_all made
def test_an_installed_wheel_works_outside_the_checkout(cluster_all, env, tmp_path):
    import sys

    repo = Path(__file__).resolve().parents[2]
    wheels = tmp_path / "wheels"
    # this venv's setuptools builds it (no download of a build environment)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(wheels), str(repo)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("piimage-*.whl")
    venv = tmp_path / "venv"  # as README says: Debian's python3 and its python3-guestfs
    subprocess.run(
        ["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], check=True
    )
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True
    )
    e = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PIIMAGE_DATA_DIR")}
    e["PATH"] = f"{venv / 'bin'}:{e['PATH']}"

    def run(args, cwd):
        p = subprocess.run(
            [str(venv / "bin" / "piimage"), *args],
            env=e,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert p.returncode == 0, f"piimage {' '.join(args)}: {p.returncode}\n{p.stderr[-3000:]}"
        return p

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import piimage; print(piimage.__file__)"],
        env=e,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), f"piimage came from {where}, not the installed wheel"
    version = run(["--version"], tmp_path).stdout
    assert re.fullmatch(r"piimage, version \d+\.\d+\.\d+\S*\n", version), version
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    run(["init"], fresh)
    assert (fresh / "cluster.yaml").is_file()
    p = run(["check"], fresh)
    checked = p.stdout + p.stderr
    # the stages and node profiles came from the package's data, not from a checkout
    assert "55-slurm" in checked and "80-examples" in checked, checked
    # a node build with the installed tool, from the stand-in, with the session's layers
    cwd = copy_of(cluster_all[0], tmp_path / "cluster")
    built = run(["build", "--hostname", "node01", "--compress", "none"], cwd)
    assert "role layer compute: cached" in built.stderr, built.stderr[-2000:]
    img = cwd / "out" / "testcluster" / "node01.img"
    manifest = json.loads((cwd / "out" / "testcluster" / "manifest.json").read_text())
    assert manifest["nodes"]["node01"]["sha256"] == _sha(img)
    with open_images([img]) as (v,):
        with v.mounted():
            assert v.text("/etc/hostname") == "node01\n"
            assert "NodeName=node01" in v.text("/etc/slurm/slurm.conf")
