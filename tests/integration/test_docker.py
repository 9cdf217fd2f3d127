"""The Docker builder (issue 5): build the image from the Dockerfile, run the README's
`scripts/piimage-docker build …` against the bookworm stand-in, and read the image back.

Docker Hub is out of reach here, so the base image is made offline from Debian's mirror
(`mmdebstrap --variant=minbase bookworm - | docker import -`) and passed as BASE_IMAGE. Both
images are kept between runs (the tag, and Docker's layer cache), so a later run pays seconds
for them. The node build in the container is real: download, role layer (apt under emulation
on a loop-mounted root, in the container) and stamp; only the apt archive cache and the
libguestfs appliance are reused from an earlier run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clihelp import home_with_key
from phases import record
from readback import fsck_partitions, open_images

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PIIMAGE_DOCKER = REPO / "scripts" / "piimage-docker"
PERSISTENT_CACHE = Path(os.environ.get("PIIMAGE_TEST_CACHE", Path.home() / ".cache" / "piimage"))
# Kept between runs: the apt archives (downloads from Debian's mirror) and the libguestfs
# appliance. Everything else in the container's /cache is emptied before the build.
DOCKER_CACHE = PERSISTENT_CACHE / "docker-cache"
KEEP_IN_CACHE = {"apt-archives", "libguestfs"}
BASE_TAG = "piimage-test-base:bookworm"
IMAGE_TAG = "piimage:test"
# Not the owner of anything on the host: the files the container writes must end up its own.
WORKDIR_OWNER = (1234, 1234)

CLUSTER_YAML = """\
name: dockercluster
base: raspios-lite-arm64
network:
  subnet: 10.0.0.0/24
  gateway: 10.0.0.1
  dns: [10.0.0.1]
admin:
  name: alice
  ssh_authorized_keys:
    - ~/.ssh/id_ed25519.pub
hardware:
  model: pi4-2gb
nodes:
  - {hostname: head, role: head, ip: 10.0.0.10}
  - {hostname: node01, role: compute, ip: 10.0.0.11}
  - {hostname: node02, role: compute, ip: 10.0.0.12}
"""


def _docker_client() -> str:
    # Debian's client matches Debian's daemon; another `docker` earlier in PATH may not.
    for c in ("/usr/bin/docker", shutil.which("docker")):
        if c and os.access(c, os.X_OK):
            return c
    pytest.fail("no docker client: scripts/test installs Debian's docker.io (TEST_PACKAGES)")


def _docker_ok(docker: str) -> subprocess.CompletedProcess:
    return subprocess.run([docker, "info"], check=False, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def docker(tmp_path_factory):
    """A Docker daemon that answers: the running one, else a dockerd started (and stopped) here."""
    client = _docker_client()
    if _docker_ok(client).returncode == 0:
        yield client
        return
    dockerd = shutil.which("dockerd", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if dockerd is None:
        pytest.fail("no dockerd: scripts/test installs Debian's docker.io (TEST_PACKAGES)")
    log_path = tmp_path_factory.mktemp("dockerd") / "dockerd.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [dockerd], stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 90
    while True:
        r = _docker_ok(client)
        if r.returncode == 0:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
            pytest.skip(
                f"dockerd cannot run here (exit {proc.returncode}): "
                f"{r.stderr.strip()}\n" + "\n".join(tail)
            )
        time.sleep(1)
    try:
        yield client
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _image_exists(docker: str, tag: str) -> bool:
    return (
        subprocess.run(
            [docker, "image", "inspect", tag], check=False, capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def base_image(docker) -> str:
    """Debian 12 minbase as a Docker image, made from Debian's mirror (no Docker Hub); kept."""
    if _image_exists(docker, BASE_TAG):
        return BASE_TAG
    t0 = time.monotonic()
    mm = subprocess.Popen(
        ["mmdebstrap", "--quiet", "--variant=minbase", "bookworm", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    imp = subprocess.run(
        [docker, "import", "-", BASE_TAG],
        check=False,
        stdin=mm.stdout,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    mm.stdout.close()
    mm_err = mm.stderr.read().decode(errors="replace")
    mm.wait()
    if mm.returncode != 0 or imp.returncode != 0:
        pytest.fail(
            f"making {BASE_TAG} failed: mmdebstrap exit {mm.returncode}, docker import "
            f"exit {imp.returncode}\n{mm_err[-3000:]}{imp.stderr[-2000:]}"
        )
    print(f"base image {BASE_TAG}: made in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    record(f"docker: base image {BASE_TAG} (mmdebstrap | docker import)", time.monotonic() - t0, t0)
    return BASE_TAG


@pytest.fixture(scope="module")
def builder_image(docker, base_image) -> str:
    """The Dockerfile built on that base; Docker's layer cache makes an unchanged rebuild quick."""
    t0 = time.monotonic()
    r = subprocess.run(
        [docker, "build", "--build-arg", f"BASE_IMAGE={base_image}", "-t", IMAGE_TAG, str(REPO)],
        check=False,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if r.returncode != 0:
        pytest.fail(f"docker build failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-5000:]}")
    print(
        f"builder image {IMAGE_TAG}: docker build took {time.monotonic() - t0:.0f} s",
        file=sys.stderr,
    )
    record(f"docker: docker build {IMAGE_TAG}", time.monotonic() - t0, t0)
    return IMAGE_TAG


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _in_use(path: str) -> bool:
    """Whether a running process uses this directory (a mount under it, or it in a command
    line, working directory, root or open file): then it belongs to a piimage of the other
    test lane that is still at work, not to the finished container build. The container's
    processes have all ended when the state is read."""
    if any(
        len(f := ln.split()) > 1 and (f[1] + "/").startswith(path + "/")
        for ln in Path("/proc/mounts").read_text().splitlines()
    ):
        return True
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        proc = Path("/proc", pid)
        try:
            if path in proc.joinpath("cmdline").read_bytes().decode(errors="replace"):
                return True
            links = [proc / "cwd", proc / "root", *(proc / "fd").iterdir()]
        except OSError:
            continue
        for link in links:
            try:
                if (os.readlink(link) + "/").startswith(path + "/"):
                    return True
            except OSError:
                continue
    return False


def _leftover_state(docker: str, roots: tuple[str, ...]) -> dict[str, set[str]]:
    """What a build in the container could leave on the host: loop devices, mounts under the
    paths the build and the container use (the working directory, the cache, the temporary
    directories, Docker's container storage), piimage's own temporary directories, and
    containers of the builder image. Nothing else of the host's state is compared: a dockerd
    that has just been installed adds mounts of its own (`/run/docker/netns/default` the first
    time a container uses the host network), and so may anything else on the host."""
    container_roots = roots + ("/var/lib/docker/containers", "/var/lib/docker/overlay2")
    mounts = set()
    for ln in Path("/proc/mounts").read_text().splitlines():
        fields = ln.split()
        if len(fields) >= 2 and _under(fields[1].replace("\\040", " "), container_roots):
            # ... but a container's own overlay stays only while the container exists; it is
            # counted below by the containers themselves
            if "/var/lib/docker/overlay2/" in fields[1] and fields[0] == "overlay":
                continue
            mounts.add(ln)
    loops = {
        ln
        for ln in subprocess.run(
            ["losetup", "-a"], check=False, capture_output=True, text=True
        ).stdout.splitlines()
        # a stand-in being built at the same time (another session) is not ours
        if "/standin/.build-" not in ln
    }
    # another lane's layer build (host paths: the container's show as it named them inside)
    loops = {ln for ln in loops if str(PERSISTENT_CACHE / "layers") not in ln}
    tmp = {
        str(p)
        for d in ("/tmp", "/var/tmp")
        for p in Path(d).glob("piimage-*")
        if not _in_use(str(p))
    }
    containers = set(
        subprocess.run(
            [docker, "ps", "-a", "-q", "--filter", f"ancestor={IMAGE_TAG}"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout.split()
    )
    return {"loops": loops, "mounts": mounts, "tmp": tmp, "containers": containers}


@pytest.fixture(scope="module")
def docker_build(docker, builder_image, standin_bookworm, tmp_path_factory):
    """The README's command in a directory with a cluster.yaml, as a user who is not root."""
    home = home_with_key(tmp_path_factory.mktemp("docker-home"), "alice@laptop")
    cwd = tmp_path_factory.mktemp("docker-cluster")
    (cwd / "cluster.yaml").write_text(CLUSTER_YAML)
    os.chown(cwd, *WORKDIR_OWNER)
    os.chown(cwd / "cluster.yaml", *WORKDIR_OWNER)

    DOCKER_CACHE.mkdir(parents=True, exist_ok=True)
    for p in DOCKER_CACHE.iterdir():
        if p.name not in KEEP_IN_CACHE:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    env = dict(os.environ)
    env.pop("SUDO_USER", None)
    env.update(
        HOME=str(home),
        DOCKER=docker,
        PIIMAGE_DOCKER_IMAGE=builder_image,
        PIIMAGE_DOCKER_CACHE=str(DOCKER_CACHE),
        # the stand-in is served on the host's 127.0.0.1
        PIIMAGE_DOCKER_NETWORK="host",
        PIIMAGE_OS_LIST_URL=standin_bookworm.os_list_url,
    )
    roots = (str(cwd), str(DOCKER_CACHE), str(home))
    before = _leftover_state(docker, roots)
    t0 = time.monotonic()
    # README's command; bookworm is "Legacy" in the stand-in's os_list (as in
    # test_build.test_bookworm_node), and no compression saves a minute
    args = ["build", "--role", "compute", "--hostname", "node02"]
    args += ["--base", "raspios-lite-arm64-legacy", "--compress", "none"]
    proc = subprocess.run(
        [str(PIIMAGE_DOCKER), *args],
        check=False,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    print(f"piimage-docker build: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    record("docker: scripts/piimage-docker build (in the container)", time.monotonic() - t0, t0)
    after = _leftover_state(docker, roots)
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/piimage-docker build exited {proc.returncode}:\n{proc.stderr[-5000:]}"
        )
    return cwd, home, proc, before, after


def test_outputs_and_ownership(docker_build):
    cwd, _, proc, _, _ = docker_build
    out = cwd / "out" / "dockercluster"
    assert "out/dockercluster/node02.img" in proc.stdout
    # the package step really ran in the container, not taken from a cache
    assert "role layer compute: built" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "manifest.json",
        "node02.img",
        "node02.img.bmap",
        "node02.img.sha256",
        "os_list.json",
        "piimage-node.png",
    ]
    # everything piimage wrote under the working directory belongs to its owner, not root
    written = list(cwd.rglob("*"))
    assert written, "nothing written"
    wrong = [
        str(p.relative_to(cwd))
        for p in written
        if (p.lstat().st_uid, p.lstat().st_gid) != WORKDIR_OWNER
    ]
    assert not wrong, f"not owned by {WORKDIR_OWNER}: {wrong}"
    secrets = cwd / ".piimage" / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert (secrets / "munge.key").stat().st_mode & 0o777 == 0o600
    digest = subprocess.run(
        ["sha256sum", str(out / "node02.img")], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert (out / "node02.img.sha256").read_text() == f"{digest}  node02.img\n"


def test_no_leftovers_on_the_host(docker_build):
    cwd, _, _, before, after = docker_build
    assert after["loops"] - before["loops"] == set(), "loop devices left attached"
    assert after["mounts"] - before["mounts"] == set(), "mounts left under the build's paths"
    assert after["tmp"] - before["tmp"] == set(), "piimage temporary directories left behind"
    assert after["containers"] - before["containers"] == set(), "builder containers left behind"
    # nothing half-written: in the working directory, the out/ folder, the layer cache
    assert sorted(p.name for p in cwd.iterdir()) == [".piimage", "cluster.yaml", "out"]
    assert sorted(p.name for p in (cwd / "out").iterdir()) == ["dockercluster"]
    assert not [
        p.name
        for p in (DOCKER_CACHE / "layers").iterdir()
        if p.name.startswith(".") and not p.name.endswith(".lock")  # the per-layer locks stay
    ]


def test_image_read_back(docker_build):
    cwd, home, _, _, _ = docker_build
    img = cwd / "out" / "dockercluster" / "node02.img"
    key = (home / ".ssh" / "id_ed25519.pub").read_text().strip()
    munge_key = (cwd / ".piimage" / "secrets" / "munge.key").read_bytes()
    with open_images([img]) as (v,), v.mounted():
        assert "bookworm" in v.text("/etc/os-release")
        assert v.text("/etc/hostname") == "node02\n"
        hosts = v.text("/etc/hosts")
        for ip, h in (("10.0.0.10", "head"), ("10.0.0.11", "node01"), ("10.0.0.12", "node02")):
            assert f"{ip}\t{h}" in hosts
        assert "raspberrypi" not in hosts
        nm = "/etc/NetworkManager/system-connections/cluster-eth0.nmconnection"
        assert v.mode(nm) == 0o600 and v.owner(nm) == (0, 0)
        assert "address1=10.0.0.12/24,10.0.0.1" in v.text(nm)
        # the key came from ~/.ssh, which piimage-docker passes into the container
        ak = "/home/alice/.ssh/authorized_keys"
        assert key in v.text(ak) and v.mode(ak) == 0o600
        assert {"slurmd", "munge", "python3-mpi4py", "openmpi-bin"} <= v.dpkg_installed()
        assert v.read("/etc/munge/munge.key") == munge_key
        assert v.owner("/etc/munge/munge.key") == (v.uid_of("munge"), v.gid_of("munge"))
        assert v.mode("/etc/munge/munge.key") == 0o400
        assert v.mode("/etc/munge") == 0o700
        for f in ("/etc/slurm/slurm.conf", "/etc/slurm/cgroup.conf"):
            assert v.owner(f) == (0, 0) and v.mode(f) == 0o644
        conf = v.text("/etc/slurm/slurm.conf")
        assert (
            "SlurmctldHost=head(10.0.0.10)" in conf and "NodeName=node02 NodeAddr=10.0.0.12" in conf
        )
        assert f"root=PARTUUID={v.disk_id()}-02" in v.text("/boot/firmware/cmdline.txt")
        # the package step left no trace of the build in the image
        assert not v.exists("/usr/sbin/policy-rc.d")
        assert not [n for n in v.ls("/var/cache/apt/archives") if n.endswith(".deb")]
    for tool, r in fsck_partitions(img).items():
        assert r.returncode == 0, f"{tool}: {r.stdout}{r.stderr}"
