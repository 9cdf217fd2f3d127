"""Running arm64 code in an image's root: the only module that mounts things and runs
foreign binaries.

The ext4 root partition is loop-attached by byte offset (this kernel cannot see loop
partitions), mounted, given /proc /sys /dev, and entered with chroot; qemu-aarch64 runs the
binaries through binfmt_misc (the F flag lets it work inside the chroot). During the run the
root gets a policy-rc.d that forbids starting services, the host's resolv.conf, the host-side
apt archive cache and, if set, an apt proxy or mirror; all of it is undone on the way out,
whatever happens: success, failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import disk, piboot
from .errors import CommandError, MissingToolError
from .fsutil import temp_name, temp_pid
from .log import log, progress
from .run import require_tools, run

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
AARCH64_MAGIC = "7f454c460201010000000000000000000200b700"
CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
    "HOME": "/root",
    # every arm64 program in the chroot runs as on a Pi's CPU, not QEMU's default `max`, whose
    # emulated pointer authentication makes trixie's binaries several times slower (piboot.CPU)
    "QEMU_CPU": piboot.CPU,
}
# apt prints these and still exits 0 (an unreachable source during `apt-get update`).
APT_FAILURES = re.compile(
    r"^(?:Err:\d+ |E: |W: Failed to fetch|W: Some index files failed)"
    r"|Temporary failure resolving|Could not resolve"
    r"|Unable to locate package|Connection failed|Could not connect",
    re.MULTILINE,
)
POLICY_RC_D = (
    "#!/bin/sh\n# piimage: no service starts while packages are installed in the image\nexit 101\n"
)


# ---------------------------------------------------------------------------------------------
# Host checks
# ---------------------------------------------------------------------------------------------
def _binfmt_entry() -> Path | None:
    if not BINFMT_DIR.joinpath("status").exists():
        return None
    for e in BINFMT_DIR.iterdir():
        if e.name in ("register", "status"):
            continue
        try:
            text = e.read_text()
        except OSError:
            continue
        if AARCH64_MAGIC in text.replace("\n", " ") or e.name == "qemu-aarch64":
            return e
    return None


def check_host() -> None:
    """Everything the package step needs, with what to do about what is missing."""
    if os.geteuid() != 0:
        raise MissingToolError(
            "installing packages into an image needs root (loop devices, mount, chroot)",
            hint="run piimage with sudo",
        )
    require_tools(
        ["losetup", "mount", "umount", "chroot", "sfdisk", "e2fsck", "resize2fs", "growpart"]
    )
    if not Path("/dev/loop-control").exists():
        raise MissingToolError(
            "no loop device support (/dev/loop-control is missing)",
            hint="load the loop module (modprobe loop); in Docker pass --device /dev/loop-control",
        )
    ensure_binfmt()


def ensure_binfmt() -> None:
    """Make arm64 binaries runnable here: mount binfmt_misc and register qemu-aarch64 (with
    the F flag, so it works inside chroots and containers) where either is missing."""
    if not BINFMT_DIR.joinpath("status").exists():
        try:
            run(
                ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                what="mounting binfmt_misc",
            )
        except CommandError as e:
            raise MissingToolError(
                "binfmt_misc is not mounted and cannot be mounted",
                hint="mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
            ) from e
    entry = _binfmt_entry()
    if entry is None:
        interp = next(
            (
                p
                for p in (
                    "/usr/libexec/qemu-binfmt/aarch64-binfmt-P",
                    "/usr/bin/qemu-aarch64-static",
                )
                if Path(p).exists()
            ),
            None,
        )
        if interp is None:
            raise MissingToolError(
                "qemu-aarch64 user emulation is missing",
                hint="sudo apt-get install qemu-user-static binfmt-support",
            )
        if shutil.which("update-binfmts"):
            run(
                ["update-binfmts", "--enable", "qemu-aarch64"],
                what="registering qemu-aarch64",
                check=False,
            )
        entry = _binfmt_entry()
        if entry is None:
            mask = "ffffffffffffff00fffffffffffffffffeffffff"
            reg = (
                ":qemu-aarch64:M::"
                + "".join(f"\\x{AARCH64_MAGIC[i : i + 2]}" for i in range(0, 40, 2))
                + ":"
                + "".join(f"\\x{mask[i : i + 2]}" for i in range(0, 40, 2))
                + f":{interp}:F"
            )
            try:
                BINFMT_DIR.joinpath("register").write_text(reg)
            except OSError as e:
                raise MissingToolError(
                    f"cannot register qemu-aarch64 with binfmt_misc: {e.strerror}"
                ) from None
            entry = _binfmt_entry()
    if entry is None:
        raise MissingToolError(
            "qemu-aarch64 is not registered with binfmt_misc",
            hint="sudo update-binfmts --enable qemu-aarch64",
        )
    text = entry.read_text()
    if not text.startswith("enabled"):
        raise MissingToolError(
            f"the binfmt_misc entry {entry.name} is disabled", hint=f"echo 1 > {entry}"
        )
    flags = re.search(r"^flags: *(\S*)", text, re.MULTILINE)
    if not flags or "F" not in flags.group(1):
        raise MissingToolError(
            f"binfmt_misc entry {entry.name} lacks the F (fix binary) flag, "
            "so it cannot work inside a chroot",
            hint="install qemu-user-static from Debian (it registers with F)",
        )


# ---------------------------------------------------------------------------------------------
# Mounts
# ---------------------------------------------------------------------------------------------
def mounts_under(path: Path) -> list[str]:
    p = str(Path(path).resolve())
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mp = line.split()[1].replace("\\040", " ")
        if mp == p or mp.startswith(p + "/"):
            out.append(mp)
    return out


def _umount(mp: str) -> None:
    if run(["umount", mp], check=False).returncode != 0:
        time.sleep(0.5)
        if run(["umount", mp], check=False).returncode != 0:
            log.warning("%s is busy; detaching it lazily", mp)
            run(["umount", "-l", mp], check=False)


ROOT_PREFIX = "piimage-root-"  # + "<pid>-": a chroot's mount point, under the temp dir
_DEAD_ROOT = re.compile(rf"/{ROOT_PREFIX}(\d+)-[^/]+")


def _dead(pid: str) -> bool:
    return not Path(f"/proc/{pid}").exists()


def stale_mounts(mounts_text: str) -> list[str]:
    """Mount points (deepest first) of chroots whose build is gone: killed outright (SIGKILL,
    a crash of the parent tools), it never reached its own teardown."""
    found = []
    for line in mounts_text.splitlines():
        fields = line.split()
        mp = fields[1].replace("\\040", " ") if len(fields) > 1 else ""
        m = _DEAD_ROOT.search(mp)
        if m and _dead(m.group(1)):
            found.append(mp)
    return sorted(found, key=lambda p: -p.count("/"))


def _others_temp(name: str, final: Path) -> bool:
    """`name` is a temporary file of `final` (fsutil.temp_name) made by another process."""
    pid = temp_pid(name)
    return (
        pid is not None
        and name.rpartition(".partial-")[0] == f".{final.name}"
        and name != temp_name(final).name
    )


def stale_loops(losetup_text: str, final: Path) -> list[str]:
    """Loop devices (`losetup -l -n -O NAME,BACK-FILE` lines) on a temporary file of `final`
    made by another process, deleted or not."""
    found = []
    for line in losetup_text.splitlines():
        name, _, back = line.strip().partition(" ")
        back = back.strip().removesuffix(" (deleted)")
        if (
            name.startswith("/dev/loop")
            and posixpath.dirname(back) == str(final.parent)
            and _others_temp(posixpath.basename(back), final)
        ):
            found.append(name)
    return found


def clean_stale_mounts() -> None:
    """Unmount the chroots of builds killed outright (SIGKILL, a crash of the tools around
    them), which never reached their own teardown: a leaked chroot keeps /proc, /sys and /dev
    bound under /tmp and its loop device busy. Only this mount namespace's, by dead pid."""
    for mp in stale_mounts(Path("/proc/self/mounts").read_text()):
        log.warning("unmounting %s, left by a build that was killed", mp)
        _umount(mp)
    for d in Path(tempfile.gettempdir()).glob(f"{ROOT_PREFIX}*"):
        m = _DEAD_ROOT.search("/" + d.name)
        if m and _dead(m.group(1)) and not mounts_under(d):
            with contextlib.suppress(OSError):
                d.rmdir()


def clean_stale_partials(final: Path) -> None:
    """The temporary files of `final` that killed builds left, and the loop devices on them
    (which keep a deleted file's blocks in use). Call it holding `final`'s build lock: then
    every other process's temporary file of it is dead, whatever pid namespace it was in."""
    final = final.resolve()
    listed = run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], check=False)
    for dev in stale_loops(listed.stdout if listed.returncode == 0 else "", final):
        log.warning("detaching %s, left on a temporary %s by a killed build", dev, final.name)
        disk.detach(dev)
    for f in final.parent.iterdir():
        if _others_temp(f.name, final):
            log.warning("removing %s, left by a build that was killed", f.name)
            with contextlib.suppress(OSError):
                f.unlink()


# The archives a Raspberry Pi OS image lists (pi-gen stage0/00-configure-apt: sources.list and
# raspi.list on bookworm, debian.sources and raspi.sources on trixie), by the key of
# cluster.yaml's `apt:` that replaces each for the build.
APT_ARCHIVES = {
    "mirror": re.compile(r"https?://deb\.debian\.org/debian(?![-\w])"),
    "security_mirror": re.compile(
        r"https?://(?:deb|security)\.debian\.org/debian-security(?![-\w])"
    ),
    "raspberrypi_mirror": re.compile(r"https?://archive\.raspberrypi\.(?:com|org)/debian(?![-\w])"),
}


def with_mirrors(sources: str, mirrors: dict[str, str]) -> str:
    """An apt source file's text with each archive of APT_ARCHIVES that has a mirror replaced."""
    for key, url in mirrors.items():
        sources = APT_ARCHIVES[key].sub(url.rstrip("/"), sources)
    return sources


# ---------------------------------------------------------------------------------------------
# The chroot
# ---------------------------------------------------------------------------------------------
class Chroot:
    def __init__(
        self,
        image: Path,
        *,
        apt_cache: Path | None = None,
        apt_proxy: str | None = None,
        apt_mirrors: dict[str, str] | None = None,
    ):
        self.image = Path(image)
        self.apt_cache = apt_cache
        self.apt_proxy = apt_proxy
        self.apt_mirrors = apt_mirrors
        self.root: Path = Path()
        self._undo: list[tuple[str, Callable[[], None]]] = []

    # -- entering ------------------------------------------------------------------------------
    def __enter__(self) -> Chroot:
        try:
            self._setup()
        except BaseException:
            self._teardown(ok=False)
            raise
        return self

    def _push(self, what: str, fn: Callable[[], None]) -> None:
        self._undo.append((what, fn))

    def _mount(self, args: list[str], target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        run(["mount", *args, str(target)], what=f"mount {target}")
        self._push(f"umount {target}", lambda t=str(target): _umount(t))

    def _setup(self) -> None:
        part = disk.root_partition(self.image)
        # the pid in the name lets a later build tell a dead build's mounts (clean_stale)
        self.root = Path(tempfile.mkdtemp(prefix=f"{ROOT_PREFIX}{os.getpid()}-"))
        self._push(
            "remove mount point", lambda r=self.root: r.rmdir() if not mounts_under(r) else None
        )
        dev = disk.attach(self.image, part)
        self._dev = dev
        self._push(f"detach {dev}", lambda d=dev: disk.detach(d))
        self._mount(["-t", "ext4", dev], self.root)
        r = self.root
        self._mount(["-t", "proc", "proc"], r / "proc")
        self._mount(["-t", "sysfs", "sysfs"], r / "sys")
        self._mount(["--bind", "/dev"], r / "dev")
        self._mount(["--bind", "/dev/pts"], r / "dev/pts")
        self._push("stop leftover processes", self._kill_leftovers)
        # policy-rc.d: keep an existing one aside and put it back afterwards
        self._replace_file(r / "usr/sbin/policy-rc.d", POLICY_RC_D.encode(), 0o755)
        host_resolv = (
            Path("/etc/resolv.conf").read_bytes() if Path("/etc/resolv.conf").exists() else b""
        )
        self._replace_file(r / "etc/resolv.conf", host_resolv, 0o644)
        if self.apt_cache is not None:
            self.apt_cache.mkdir(parents=True, exist_ok=True)
            (self.apt_cache / "partial").mkdir(exist_ok=True)
            self._mount(["--bind", str(self.apt_cache)], r / "var/cache/apt/archives")
        conf = 'APT::Install-Recommends "false";\nAcquire::Retries "3";\nDpkg::Use-Pty "false";\n'
        if self.apt_proxy:
            conf += f'Acquire::http::Proxy "{self.apt_proxy}";\n'
        self._replace_file(r / "etc/apt/apt.conf.d/99piimage-build", conf.encode(), 0o644)
        if self.apt_mirrors:
            self._use_mirror(self.apt_mirrors)

    def _replace_file(self, path: Path, data: bytes, mode: int) -> None:
        """Put `data` at path for the run; afterwards the original (file or symlink) comes back."""
        backup = path.with_name(path.name + ".piimage-orig")
        existed = os.path.lexists(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if existed:
            os.rename(path, backup)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

        def undo(path=path, backup=backup, existed=existed):
            if os.path.lexists(path) or path.is_symlink():
                path.unlink()
            if existed:
                os.rename(backup, path)

        self._push(f"restore {path}", undo)

    def _use_mirror(self, mirrors: dict[str, str]) -> None:
        """Point the image's apt sources (one-line or deb822) at the mirrors, for this run."""
        files = [self.root / "etc/apt/sources.list"] + sorted(
            (self.root / "etc/apt/sources.list.d").glob("*")
        )
        for f in files:
            if not f.is_file():
                continue
            text = f.read_text()
            new = with_mirrors(text, mirrors)
            if new != text:
                self._replace_file(f, new.encode(), f.stat().st_mode & 0o7777)

    # -- running -------------------------------------------------------------------------------
    def run(
        self,
        argv: list[str],
        *,
        what: str,
        env: dict | None = None,
        on_line: Callable[[str], None] | None = None,
    ):
        e = dict(CHROOT_ENV)
        e.update(env or {})
        return run(
            ["env", "-i", *(f"{k}={v}" for k, v in e.items()), "chroot", str(self.root), *argv],
            what=what,
            on_line=on_line,
        )

    def apt_install(self, packages: list[str]) -> None:
        t0 = time.monotonic()
        r = self.run(["apt-get", "update"], what="apt-get update")
        bad = [ln for ln in r.stdout.splitlines() if APT_FAILURES.search(ln)]
        if bad:
            raise CommandError(
                "apt-get update could not reach every package source",
                0,
                "\n".join(r.stdout.splitlines()[-25:]),
                hint="check apt.mirror / apt.proxy in cluster.yaml and the network",
            )
        with progress(
            f"installing {len(packages)} packages under emulation", None, unit="steps"
        ) as p:

            def on_line(line: str) -> None:
                if line.startswith(("Unpacking ", "Setting up ")):
                    p.update(1)

            try:
                r = self.run(
                    [
                        "apt-get",
                        "install",
                        "-y",
                        "--no-install-recommends",
                        "-o",
                        "Dpkg::Options::=--force-confdef",
                        "-o",
                        "Dpkg::Options::=--force-confold",
                        *packages,
                    ],
                    what="apt-get install",
                    on_line=on_line,
                )
            except CommandError as e:
                missing = re.findall(r"Unable to locate package (\S+)", e.detail or "")
                if missing:
                    e.message = f"apt-get install failed: no package named {', '.join(missing)}"
                raise
        bad = [ln for ln in r.stdout.splitlines() if ln.startswith("E: ")]
        if bad:
            raise CommandError(
                "apt-get install reported errors", 0, "\n".join(r.stdout.splitlines()[-25:])
            )
        log.info("installed %s in %.0f s", " ".join(packages), time.monotonic() - t0)

    def run_script(self, script: Path, *, what: str) -> None:
        dest = self.root / "tmp" / f"piimage-{script.name}"
        shutil.copy(script, dest)
        os.chmod(dest, 0o755)
        try:
            self.run(["/bin/sh", "-e", f"/tmp/{dest.name}"], what=what)
        finally:
            dest.unlink(missing_ok=True)

    # -- leaving -------------------------------------------------------------------------------
    def _kill_leftovers(self) -> None:
        """Processes whose root is the chroot (a daemon a postinst started anyway)."""
        root = str(self.root.resolve())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            found = False
            for pid_dir in Path("/proc").iterdir():
                if not pid_dir.name.isdigit():
                    continue
                try:
                    if os.readlink(pid_dir / "root") == root:
                        os.kill(int(pid_dir.name), sig)
                        found = True
                except OSError:
                    continue
            if not found:
                return
            time.sleep(1)

    def _clean_apt(self) -> None:
        r = self.root
        # With the host's archive cache bind-mounted, `apt-get clean` would empty the host's
        # cache; the image's own archives dir stayed empty under the mount anyway.
        if self.apt_cache is None and (r / "usr/bin/apt-get").exists():
            try:
                self.run(["apt-get", "clean"], what="apt-get clean")
            except CommandError as e:
                log.warning("apt-get clean failed: %s", e.message)
        lists = r / "var/lib/apt/lists"
        if lists.is_dir():
            for p in lists.iterdir():
                if p.name in ("partial", "lock", "auxfiles"):
                    continue
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        for p in (r / "var/cache/apt").glob("*.bin"):
            p.unlink()

    def _teardown(self, ok: bool) -> None:
        # A second Ctrl-C must not cut the cleanup short: hold signals until it is done.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if ok and self.root and (self.root / "etc").exists():
                self._clean_apt()
            errors = []
            while self._undo:
                what, fn = self._undo.pop()
                try:
                    fn()
                except Exception as e:  # noqa: BLE001 - keep undoing the rest
                    errors.append(f"{what}: {e}")
            if errors:
                log.warning("cleanup problems: %s", "; ".join(errors))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._teardown(ok=exc_type is None)
        if exc_type is None:
            with disk.loop_device(self.image, disk.root_partition(self.image)) as dev:
                disk.fsck(
                    dev, what="e2fsck of the root filesystem after the package step", repair="-p"
                )
