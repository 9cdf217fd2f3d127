"""Failures and interrupts on real images: the right exit code, a one-screen message, and
nothing left behind — no partial image, no mount, no loop device, no appliance, no workspace."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clihelp import live_partial, start_piimage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PERSISTENT_CACHE = Path(os.environ.get("PIIMAGE_TEST_CACHE", Path.home() / ".cache" / "piimage"))
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH3903J3epy2OvY9kxA4Gr+Ix0/+xMkM+jxK162Gs/b2 me@laptop"


def cluster_yaml(
    extra: str = "", base: str = "raspios-lite-arm64-legacy", computes: int = 1
) -> str:
    nodes = "".join(
        f"  - {{hostname: node{i:02d}, role: compute, ip: 10.0.0.{10 + i}}}\n"
        for i in range(1, computes + 1)
    )
    return f"""\
name: failing
base: {base}
network: {{subnet: 10.0.0.0/24, gateway: 10.0.0.1}}
admin: {{name: alice, ssh_authorized_keys: ['{KEY}']}}
{extra}
nodes:
  - {{hostname: head, role: head, ip: 10.0.0.10}}
{nodes}"""


def _work(tmp_path, standin):
    cache = tmp_path / "cache"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ)
    env.update(
        PIIMAGE_CACHE=str(cache),
        PIIMAGE_LAYER_CACHE=str(PERSISTENT_CACHE / "layers"),
        PIIMAGE_APT_CACHE=str(PERSISTENT_CACHE / "apt-archives"),
        PIIMAGE_OS_LIST_URL=standin.os_list_url,
        TMPDIR=str(tmpdir),
    )
    _BEFORE[tmp_path] = _host_entries()
    return tmp_path, env, standin


@pytest.fixture
def work(tmp_path, standin_bookworm):
    return _work(tmp_path, standin_bookworm)


# Every failure test is in the bookworm lane, one after another: the killed-outright test
# leaves a dead build's partial layer, loop device and mount in the shared layer cache on
# purpose, which the leftover checks of a failure test running beside it in the other lane
# would take for its own (stop 23's runs: the matrix, moved to the trixie lane, failed so).


# what the machine held when each test began: leftovers are what a test added, not what an
# earlier process (a killed CI run, say) left
_BEFORE: dict[Path, set[str]] = {}


def _host_entries() -> set[str]:
    layers = PERSISTENT_CACHE / "layers"
    found = {f"partial layer {p}" for p in layers.iterdir()} if layers.exists() else set()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return found | {f"loop {ln}" for ln in loops.splitlines()}


def run_piimage(args, env, cwd, timeout=3600):
    return subprocess.run(
        [sys.executable, "-m", "piimage.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def leftovers(tmp_path: Path) -> list[str]:
    """Everything a failed or interrupted run must not leave behind."""
    found = []
    out = tmp_path / "out"
    if out.exists():
        found += [f"out/{p.relative_to(out)}" for p in out.rglob("*") if p.is_file()]
    work = tmp_path / "cache" / "work"
    if work.exists():
        found += [f"workspace {p}" for p in work.iterdir()]
    # a half-decompressed base (.image.img.partial-<pid>) beside the test's cached ones
    images = tmp_path / "cache" / "images"
    if images.exists():
        found += [f"partial base {p}" for p in images.glob("*/.*.partial-*")]
    found += [f"tmp {p}" for p in (tmp_path / "tmp").iterdir()]
    # The layer cache is shared with the other test lane and any other piimage on the machine:
    # a partial layer counts when the process its name ends with is gone (the build under
    # test); the per-layer lock files are meant to stay.
    layers = PERSISTENT_CACHE / "layers"
    if layers.exists():
        found += [
            f"partial layer {p}"
            for p in layers.iterdir()
            if p.name.startswith(".") and not p.name.endswith(".lock") and not live_partial(p.name)
        ]
    # this test's chroot mounts are under its TMPDIR
    mounts = Path("/proc/mounts").read_text()
    found += [
        f"mount {ln.split()[1]}"
        for ln in mounts.splitlines()
        if "piimage-root-" in ln and str(tmp_path) in ln
    ]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [
        f"loop {ln}"
        for ln in loops.splitlines()
        if (str(layers) in ln and not live_partial(ln)) or str(tmp_path) in ln
    ]
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = (
                    Path(f"/proc/{pid}/cmdline")
                    .read_bytes()
                    .replace(b"\0", b" ")
                    .decode(errors="replace")
                )
            except OSError:
                continue
            if str(tmp_path) in cmd and ("qemu" in cmd or "apt" in cmd or "dpkg" in cmd):
                found.append(f"process {pid}: {cmd[:120]}")
    before = _BEFORE.get(tmp_path, set())
    return [f for f in found if f not in before]


def test_corrupted_download(work):
    tmp_path, env, s = work
    bad = s.dir / "corrupt.img.xz"
    if not bad.exists():
        data = bytearray(s.image_xz.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
        (s.dir / "corrupt.img.xz.sha256").write_text(
            s.sha256_file.read_text().split()[0] + "  corrupt.img.xz\n"
        )
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    r = run_piimage(
        ["build", "--hostname", "node01", "--base", s.url.rsplit("/", 1)[0] + "/corrupt.img.xz"],
        env,
        tmp_path,
    )
    assert r.returncode == 1, r.stderr
    assert "checksum mismatch" in r.stderr and "the download was deleted" in r.stderr
    assert len(r.stderr.splitlines()) < 25 and "Traceback" not in r.stderr
    assert leftovers(tmp_path) == []


def test_wrong_checksum(work):
    tmp_path, env, s = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml(f"base_sha256: {'ab' * 32}", base=s.url))
    r = run_piimage(["build", "--hostname", "node01"], env, tmp_path)
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "ab" * 32 in r.stderr
    assert leftovers(tmp_path) == []


def _profiles(tmp_path: Path, compute: str) -> None:
    (tmp_path / "node-profiles").mkdir(exist_ok=True)
    (tmp_path / "node-profiles" / "compute.yaml").write_text(compute)


def test_package_that_does_not_exist(work):
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    _profiles(tmp_path, "packages: [munge, no-such-package-piimage]\nheadroom_mb: 64\n")
    r = run_piimage(["build", "--hostname", "node01"], env, tmp_path)
    assert r.returncode == 1, r.stderr
    assert "no package named no-such-package-piimage" in r.stderr
    assert "Unable to locate package no-such-package-piimage" in r.stderr  # apt's own tail
    assert leftovers(tmp_path) == []


def test_failing_chroot_script(work):
    tmp_path, env, _ = work
    st = tmp_path / "mystages" / "90-fails"
    st.mkdir(parents=True)
    (st / "stage.yaml").write_text("scope: role\nroles: [compute]\n")
    (st / "run-chroot.sh").write_text("echo about to fail\nfalse\necho never\n")
    (tmp_path / "cluster.yaml").write_text(cluster_yaml("stages: [mystages]"))
    _profiles(tmp_path, "packages: []\nheadroom_mb: 0\n")
    r = run_piimage(["build", "--hostname", "node01"], env, tmp_path)
    assert r.returncode == 1, r.stderr
    assert "90-fails/run-chroot.sh failed" in r.stderr and "about to fail" in r.stderr
    assert "never" not in r.stderr
    assert leftovers(tmp_path) == []


def test_lost_mirror(work):
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(
        cluster_yaml("apt: {mirror: 'http://127.0.0.1:9/debian'}")
    )
    _profiles(tmp_path, "packages: [hello]\nheadroom_mb: 64\n")
    r = run_piimage(["build", "--hostname", "node01"], env, tmp_path)
    assert r.returncode == 1, r.stderr
    assert "apt-get update could not reach every package source" in r.stderr
    assert "127.0.0.1:9" in r.stderr
    assert leftovers(tmp_path) == []


def _interrupt_when(
    args, env, cwd, marker: str, delay: float = 2.0, timeout: float = 1800, sig=signal.SIGINT
) -> tuple[int, str]:
    proc = start_piimage(args, env, cwd, ctrl_c=True)
    lines = []
    t0 = time.monotonic()
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if marker in line:
            time.sleep(delay)
            proc.send_signal(sig)
            break
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("marker never seen: " + "".join(lines[-20:]))
    else:
        pytest.fail(f"exited before {marker!r}: " + "".join(lines[-20:]))
    try:
        rest = proc.stderr.read()
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("piimage did not stop within 120 s of Ctrl-C")
    return rc, "".join(lines) + rest


# The interrupt matrix (issue 13): for each phase of a build, each way a build is stopped.
MATRIX_PHASES = {
    "download": "downloading",
    "decompress": "decompressing",
    "stamp": "starting the libguestfs appliance",
    "publish": "writing node01.img",
}
MATRIX_SIGNALS = {"INT": signal.SIGINT, "TERM": signal.SIGTERM, "KILL": signal.SIGKILL}


def _when_logged(args, env, cwd, marker: str, act) -> tuple[subprocess.Popen, list[str]]:
    """Start piimage and call act(proc) when `marker` appears in its log (the lines so far
    are returned with it; the rest of the log is still to be read from proc.stderr)."""
    proc = start_piimage(args, env, cwd, stdout=subprocess.DEVNULL)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            act(proc)
            return proc, seen
    pytest.fail(f"exited before {marker!r}: " + "".join(seen[-20:]))


def _stop_when(args, env, cwd, marker: str, sig, delay: float) -> tuple[int, str]:
    """Run piimage, and `delay` s after `marker` appears in its log stop it with `sig`
    (SIGKILL: the whole process tree at once, as the OOM killer or `docker kill` would)."""
    if sig != signal.SIGKILL:
        return _interrupt_when(args, env, cwd, marker, delay=delay, sig=sig)

    def kill(proc):
        time.sleep(delay)
        _kill_tree(proc.pid)

    proc, seen = _when_logged(args, env, cwd, marker, kill)
    rc = proc.wait(timeout=60)
    time.sleep(1)  # the kernel reaps the tree
    return rc, "".join(seen)


def _outputs(out: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the output folder, hidden ones too: inode, size, mtime. A file that was
    replaced (published by rename) or written in place shows up changed."""
    return {
        p.name: (st.st_ino, st.st_size, st.st_mtime_ns)
        for p in sorted(out.iterdir())
        if p.is_file() and (st := p.stat())
    }


@contextlib.contextmanager
def _slow_mirror(standin, rate: int = 32 << 20):
    """The stand-in's image list and files served at `rate` bytes/s from a server of the
    test's own: a download that lasts long enough to be interrupted. Its image list points at
    itself; it does not resume (the build then says so and starts over)."""
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    doc = json.loads(standin.os_list.read_text())
    old_base = standin.url.rsplit("/", 1)[0] + "/"

    class Slow(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(standin.dir), **kw)

        def log_message(self, *a):
            pass

        def do_GET(self):
            if self.path == "/os_list.json":
                body = json.dumps(doc).replace(old_base, base).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def copyfile(self, source, outputfile):
            try:
                while buf := source.read(1 << 20):
                    outputfile.write(buf)
                    time.sleep(len(buf) / rate)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the build was stopped in the middle of its download: the point

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield base + "os_list.json"
    finally:
        server.shutdown()
        server.server_close()


def test_interrupt_matrix(work):
    """Each phase of a build (download, decompress, stamp, publish) stopped by SIGINT, then
    SIGTERM, then SIGKILL: out/ keeps the previous complete images every time (no partial
    one, none replaced), an interrupted build exits 130 and leaves nothing mounted, running or
    half-written; after the kill the next build cleans what the killed one left and succeeds,
    and its image (the next phase's previous one) is complete. One package-less compute
    node, its layer from the cache, the base from a slow server of the test's own (so the
    download lasts long enough to be stopped). One build to start, one after each phase."""
    tmp_path, env, standin = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml(computes=1))
    _profiles(tmp_path, "packages: []\nheadroom_mb: 0\n")
    args = ["build", "--all", "--role", "compute", "--compress", "none"]
    out = tmp_path / "out" / "failing"
    table = []
    with _slow_mirror(standin) as os_list_url:
        # from the first build on: piimage.lock names the slow server's URL
        env = dict(env, PIIMAGE_OS_LIST_URL=os_list_url)
        r = run_piimage(args, env, tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        for phase, marker in MATRIX_PHASES.items():
            before = _outputs(out)
            assert {"node01.img", "manifest.json"} <= set(before)
            for name, sig in MATRIX_SIGNALS.items():
                if phase in ("download", "decompress"):
                    # the decompressed base goes (for the download phase the download too),
                    # so it is made again: the build is stopped while it does so
                    shutil.rmtree(tmp_path / "cache" / "images", ignore_errors=True)
                    if phase == "download":
                        shutil.rmtree(tmp_path / "cache" / "downloads", ignore_errors=True)
                t0 = time.monotonic()
                rc, err = _stop_when(args, env, tmp_path, marker, sig, delay=0.5)
                cell = f"{phase} x {name}"
                if sig == signal.SIGKILL:
                    assert rc == -signal.SIGKILL, (cell, rc, err[-2000:])
                    # nothing could run: the kill may leave a hidden half-written file,
                    # never a changed or partial image under its own name
                    now = {k: v for k, v in _outputs(out).items() if not k.startswith(".")}
                    assert now == before, cell
                else:
                    assert rc == 130, (cell, rc, err[-3000:])
                    assert "interrupted" in err and "Traceback" not in err, (cell, err[-3000:])
                    assert _outputs(out) == before, cell
                    left = [f for f in leftovers(tmp_path) if not f.startswith("out/")]
                    assert left == [], (cell, left)
                table.append(f"{cell}: exit {rc}, {time.monotonic() - t0:.0f} s")
            # after the kill: the next build cleans up and succeeds
            r = run_piimage(args, env, tmp_path)
            assert r.returncode == 0, (phase, r.stderr[-3000:])
            assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == [], phase
            assert not [k for k in _outputs(out) if k.startswith(".")], phase
    manifest = json.loads((out / "manifest.json").read_text())
    digest = subprocess.run(
        ["sha256sum", str(out / "node01.img")], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert digest == manifest["nodes"]["node01"]["sha256"]
    print("interrupt matrix:", *table, sep="\n  ")


@pytest.mark.parametrize("sig", ["INT", "TERM"])  # KILL: the next test
def test_ctrl_c_during_package_install(work, sig):
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    # a package set of its own, so this layer is never cached and apt really runs: one that a
    # run whose interrupt did not land may have left is removed first (this test's own)
    layers = PERSISTENT_CACHE / "layers"
    for info in layers.glob("compute-*.json") if layers.exists() else ():
        if json.loads(info.read_text()).get("packages") == ["hello", "cowsay"]:
            info.with_suffix(".img").unlink(missing_ok=True)
            info.unlink()
    _profiles(tmp_path, f"packages: [hello, cowsay]\nheadroom_mb: {64 + os.getpid() % 100}\n")
    rc, err = _interrupt_when(
        ["build", "--hostname", "node01", "-v"],
        env,
        tmp_path,
        "apt-get",
        delay=3,
        sig=MATRIX_SIGNALS[sig],
    )
    assert rc == 130, err[-3000:]
    assert leftovers(tmp_path) == []


def test_a_build_killed_outright_is_cleaned_up_by_the_next(work):
    """SIGKILL to the whole build (the OOM killer, `docker kill`, a power cut short of the
    disk) during the package install leaves its chroot mounted, a loop device on its temporary
    layer and the file itself: nothing of piimage runs to undo them. The next build of that
    layer unmounts, detaches and removes them before it builds, and leaves nothing either.
    Costs a small layer (hello) built once and a half, ~2-3 min."""
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    # a layer of its own (headroom by pid), never cached, so apt really runs both times
    _profiles(tmp_path, f"packages: [hello]\nheadroom_mb: {200 + os.getpid() % 100}\n")

    def kill(proc):
        time.sleep(3)
        _kill_tree(proc.pid)

    proc, _ = _when_logged(["build", "--hostname", "node01", "-v"], env, tmp_path, "apt-get", kill)
    proc.wait(timeout=60)
    time.sleep(1)  # the kernel reaps the tree's processes
    left = leftovers(tmp_path)
    assert any(f.startswith("mount ") for f in left), left  # what the kill left: the test's
    assert any(f.startswith("loop ") for f in left), left  # premise, else it proves nothing
    r = run_piimage(["build", "--hostname", "node01", "--compress", "none"], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "left by a build that was killed" in r.stderr, r.stderr[-3000:]
    assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == []


def _tree(root: int) -> set[int]:
    """A process and everything under it, now."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    todo, found = [root], set()
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


@contextlib.contextmanager
def _small_disk(folder: Path, size: int):
    """`folder` on a tmpfs of `size` bytes for the block; yields `fill(proc)`, which stops
    the build `proc` (its whole tree, until every thread has stopped), takes all the room
    but a MiB, and lets the build go on. At the end no build started there is left (a
    failed check kills it, stopped or not) and the tmpfs is unmounted."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    started: list[subprocess.Popen] = []

    def fill(proc: subprocess.Popen) -> None:
        started.append(proc)
        pids = _stop_tree(proc.pid)
        # should the count still move (the page cache settling), a step that does not fit
        # is halved and the filler grows until the disk is full
        with open(folder / ".filler", "wb") as f:
            step = shutil.disk_usage(folder).free - (1 << 20)
            while step >= (1 << 20):
                try:
                    os.posix_fallocate(f.fileno(), os.fstat(f.fileno()).st_size, step)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    step //= 2
                else:
                    step = shutil.disk_usage(folder).free - (1 << 20)
        assert shutil.disk_usage(folder).free < (8 << 20), shutil.disk_usage(folder)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    try:
        yield fill
        (folder / ".filler").unlink(missing_ok=True)
    finally:
        for proc in started:
            if proc.poll() is None:
                _kill_tree(proc.pid)
                proc.wait(timeout=60)
        subprocess.run(["umount", str(folder)], check=False)


def _fails_filling(args, env, cwd, marker: str, fill) -> str:
    """Run piimage, fill the disk when `marker` is logged; it must fail (exit 1) saying the
    disk filled up, with no traceback. Returns its log."""
    proc, seen = _when_logged(args, env, cwd, marker, fill)
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=600) == 1, err[-3000:]
    assert "the disk filled up while" in err, err[-3000:]
    assert "is free now" in err and "Traceback" not in err, err[-3000:]
    return err


def test_a_disk_that_fills_up_while_publishing(work):
    """out/ on a tmpfs with room for the image when the build starts; as it starts writing
    the image the room is taken by something else (the test stops the build's processes,
    fills the tmpfs, lets them go on). The build fails naming the folder, the room it needs
    and what is free, removes its half-written image, and the earlier outputs stay. ~1 min."""
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    _profiles(tmp_path, "packages: []\nheadroom_mb: 0\n")
    first = tmp_path / "first"
    args = ["build", "--hostname", "node01", "--compress", "none"]
    r = run_piimage([*args, "--out", str(first)], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    need = (first / "failing" / "node01.img").stat().st_blocks * 512
    shutil.rmtree(first)
    out = tmp_path / "out"
    with _small_disk(out, int(need * 1.3) + (64 << 20)) as fill:
        previous = out / "failing" / "node01.img"
        previous.parent.mkdir()
        previous.write_bytes(b"the image of an earlier build")
        err = _fails_filling(args, env, tmp_path, "writing node01.img", fill)
        assert "out/failing: the disk filled up while writing node01.img" in err, err[-3000:]
        assert sorted(p.name for p in (out / "failing").iterdir()) == ["node01.img"]
        assert previous.read_bytes() == b"the image of an earlier build"
    assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == []


def test_a_disk_that_fills_up_while_downloading(work):
    """The cache on a tmpfs with room for the base image's download; as the download starts
    the room is taken. The build fails naming the downloads folder, removes the partial
    download (a later build starts it afresh, never from a file cut short by the full disk),
    and the earlier outputs in out/ stay. The base from the test's slow server; ~30 s."""
    tmp_path, env, standin = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    _profiles(tmp_path, "packages: []\nheadroom_mb: 0\n")
    previous = tmp_path / "out" / "failing" / "node01.img"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"the image of an earlier build")
    cache = tmp_path / "cache"
    with (
        _slow_mirror(standin) as os_list_url,
        _small_disk(cache, standin.image_xz.stat().st_size + (32 << 20)) as fill,
    ):
        env = dict(env, PIIMAGE_OS_LIST_URL=os_list_url)
        args = ["build", "--hostname", "node01", "--compress", "none"]
        err = _fails_filling(args, env, tmp_path, "downloading", fill)
        assert "cache/downloads: the disk filled up while downloading" in err, err[-3000:]
        assert list((cache / "downloads").iterdir()) == []
        assert not (cache / "images").exists() or not any((cache / "images").rglob("*.img"))
    assert sorted(p.name for p in previous.parent.iterdir()) == ["node01.img"]
    assert previous.read_bytes() == b"the image of an earlier build"
    assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == []


def test_a_disk_that_fills_up_while_building_a_layer(work):
    """The layer cache on a tmpfs with room for the new layer when its build starts; as apt
    runs in it the room is taken (the layer is a loop-mounted file there: the kernel sees
    write errors, apt fails). The build says the disk filled up while building the layer,
    nothing of the layer stays (no partial file, mount or loop device), and the earlier
    outputs stay. A layer of its own (hello, headroom by pid), never cached; ~2 min."""
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    args = ["build", "--hostname", "node01", "--compress", "none"]
    # the base decompressed first, in the test's own cache (not on the small disk), by a
    # build of a package-less layer from the cache
    _profiles(tmp_path, "packages: []\nheadroom_mb: 0\n")
    r = run_piimage([*args, "--out", str(tmp_path / "first")], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    shutil.rmtree(tmp_path / "first")
    _profiles(tmp_path, f"packages: [hello]\nheadroom_mb: {100 + os.getpid() % 100}\n")
    (raw,) = (tmp_path / "cache" / "images").glob("*/image.img")
    previous = tmp_path / "out" / "failing" / "node01.img"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"the image of an earlier build")
    layers = tmp_path / "layers"
    env = dict(env, PIIMAGE_LAYER_CACHE=str(layers))
    with _small_disk(layers, raw.stat().st_blocks * 512 + (400 << 20)) as fill:
        err = _fails_filling([*args, "-v"], env, tmp_path, "apt-get", fill)
        assert "layers: the disk filled up while building the compute role layer" in err, err[
            -3000:
        ]
        made = [p.name for p in layers.iterdir() if p.name != ".filler"]
        assert [n for n in made if not n.endswith(".lock")] == [], made
    assert previous.read_bytes() == b"the image of an earlier build"
    assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == []


def _stop_tree(root: int) -> set[int]:
    """SIGSTOP a process and everything under it, and wait until every thread of it has
    stopped (kill() returns before the signal lands: a write under way still finishes). The
    tree is walked again until nothing new appears, so nothing in it starts anything new."""
    tree: set[int] = set()
    for _ in range(5):
        found = _tree(root)
        for pid in found - tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        if found <= tree:
            break
        tree |= found
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = []
        for pid in tree:
            for task in Path(f"/proc/{pid}/task").glob("*/stat"):
                with contextlib.suppress(OSError, IndexError):
                    if task.read_text().rsplit(")", 1)[1].split()[0] not in "TtZX":
                        running.append(task)
        if not running:
            break
        time.sleep(0.05)
    return tree


def _kill_tree(root: int) -> None:
    """SIGKILL a process and everything under it at once, as the OOM killer or `docker kill`
    would (piimage starts its tools in sessions of their own, so a process group is not
    enough): the tree is stopped first, so nothing in it starts anything new, then killed."""
    for pid in _stop_tree(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_damaged_cache_entries_are_found_and_made_again(work):
    """A decompressed base cut short and a role layer changed in place (a disk error, a
    half-finished copy of the cache) are found before use, said, made again, and the build
    that finds them succeeds. A layer of its own (no packages, headroom by pid); ~2 min."""
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    _profiles(tmp_path, f"packages: []\nheadroom_mb: {300 + os.getpid() % 100}\n")
    args = ["build", "--hostname", "node01", "--compress", "none"]
    r = run_piimage(args, env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (raw,) = (tmp_path / "cache" / "images").glob("*/image.img")
    with open(raw, "r+b") as f:
        f.truncate(raw.stat().st_size - 4096)
    manifest = json.loads((tmp_path / "out" / "failing" / "manifest.json").read_text())
    layer = PERSISTENT_CACHE / "layers" / manifest["nodes"]["node01"]["role_layer"]
    with open(layer, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\xff" * 512)
    r = run_piimage(args, env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base image" in r.stderr and "making it again" in r.stderr, r.stderr[-3000:]
    assert f"the cached {layer.name} was changed after it was made" in r.stderr, r.stderr[-3000:]
    assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == []


def test_two_builds_into_one_folder_wait_for_each_other(work):
    """Two piimage builds of one cluster at once, head and node01, into the same out/: the
    second waits for the first (they share manifest.json, SHA256SUMS and piimage.lock), both
    succeed, and what each wrote is there. Role layers from the cache; ~1-2 min."""
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    procs = [
        start_piimage(
            ["build", "--hostname", h, "--compress", "none"],
            env,
            tmp_path,
            stdout=subprocess.DEVNULL,
        )
        for h in ("head", "node01")
    ]
    errs = [p.communicate(timeout=3600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    assert any("another piimage is building into" in e for e in errs), errs
    out = tmp_path / "out" / "failing"
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["nodes"]) == {"head", "node01"}
    sums = (out / "SHA256SUMS").read_text()
    assert "head.img" in sums and "node01.img" in sums
    for h in ("head", "node01"):
        assert manifest["nodes"][h]["sha256"] in sums


def test_two_builds_into_two_folders_share_one_cache(work):
    """Two builds at once on one empty cache, of two clusters in folders of their own (builds
    of one cluster take turns: they share its piimage.lock): the base is downloaded and
    decompressed once (the second waits for the first, then finds it made), both succeed,
    and each out/ holds its own node, whole. The base from the test's slow server, so the
    first is still fetching when the second starts; ~1-2 min."""
    tmp_path, env, standin = work
    sites = {"head": tmp_path / "site-a", "node01": tmp_path / "site-b"}
    for site in sites.values():
        site.mkdir()
        (site / "cluster.yaml").write_text(cluster_yaml())
        _profiles(site, "packages: []\nheadroom_mb: 0\n")
    with _slow_mirror(standin) as os_list_url:
        env = dict(env, PIIMAGE_OS_LIST_URL=os_list_url)
        procs = {
            h: start_piimage(
                ["build", "--hostname", h, "--compress", "none"],
                env,
                site,
                stdout=subprocess.DEVNULL,
            )
            for h, site in sites.items()
        }
        errs = {h: p.communicate(timeout=1800)[1] for h, p in procs.items()}
    both = "\n".join(e[-2000:] for e in errs.values())
    assert [p.returncode for p in procs.values()] == [0, 0], both
    assert sum("downloading" in e for e in errs.values()) == 1, both
    assert sum("another piimage is fetching it" in e for e in errs.values()) == 1, both
    for h, site in sites.items():
        out = site / "out" / "failing"
        manifest = json.loads((out / "manifest.json").read_text())
        assert set(manifest["nodes"]) == {h}
        digest = subprocess.run(
            ["sha256sum", str(out / f"{h}.img")], capture_output=True, text=True, check=True
        ).stdout.split()[0]
        assert digest == manifest["nodes"][h]["sha256"]
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert len(list((tmp_path / "cache" / "images").glob("*/image.img"))) == 1
    assert list((tmp_path / "cache" / "downloads").iterdir()) == []
    assert [f for f in leftovers(tmp_path) if not f.startswith("out/")] == []


def test_a_full_disk_is_refused_before_anything_is_written(work):
    """out/ on a small filesystem (a 64 MiB tmpfs) that cannot hold the image: the build says
    so before it writes any of it, naming the folder and the room needed and free, and the
    previous outputs there stay as they were. Layers from the cache (a package-less one)."""
    tmp_path, env, _ = work
    (tmp_path / "cluster.yaml").write_text(cluster_yaml())
    _profiles(tmp_path, "packages: []\nheadroom_mb: 0\n")
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(out)], check=True)
    try:
        previous = out / "failing" / "node01.img"
        previous.parent.mkdir()
        previous.write_bytes(b"the image of an earlier build")
        r = run_piimage(["build", "--hostname", "node01", "--compress", "none"], env, tmp_path)
        assert r.returncode == 1, r.stderr[-3000:]
        # the folder as the user named it (--out's default, "out", relative)
        assert "out/failing: not enough free space for 1 node image" in r.stderr, r.stderr
        assert "GiB is free" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert sorted(p.name for p in (out / "failing").iterdir()) == ["node01.img"]
        assert previous.read_bytes() == b"the image of an earlier build"
    finally:
        subprocess.run(["umount", str(out)], check=True)
    assert [f for f in leftovers(tmp_path)] == []
