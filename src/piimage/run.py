"""The one door for external commands: logging, output capture, failure messages, and
making sure no child outlives an interrupt."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import IO

from .errors import CommandError, MissingToolError
from .log import log

# Host tools → the Debian package that provides them (for the "missing tool" message).
TOOL_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-aarch64-static": "qemu-user-static",
    "qemu-aarch64": "qemu-user-static",
    "qemu-system-aarch64": "qemu-system-arm",
    "xz": "xz-utils",
    "zstd": "zstd",
    "gzip": "gzip",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "fsck.vfat": "dosfstools",
    "mcopy": "mtools",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "growpart": "cloud-guest-utils",
    "mmdebstrap": "mmdebstrap",
    "ssh-keygen": "openssh-client",
    "bmaptool": "bmap-tools",
    "losetup": "mount",
    "mount": "mount",
    "chroot": "coreutils",
    "setpriv": "util-linux",
}

TAIL_LINES = 25

# Children started by run() and still running, so an interrupt in the main thread can end
# those that worker threads started.
_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def terminate_all() -> None:
    """End every child run() started that is still running (their run() then fails)."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        _terminate(proc)


def require_tools(tools: Sequence[str]) -> None:
    """Raise MissingToolError naming every missing tool and the apt packages that provide them."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    pkgs = sorted({TOOL_PACKAGES.get(t, t) for t in missing})
    raise MissingToolError(
        f"missing host tool{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
        hint=f"install with: sudo apt-get install {' '.join(pkgs)}",
    )


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        # Children run in their own process group so that a Ctrl-C reaches us first and we
        # decide how they end; here we end the whole group.
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run(
    cmd: Sequence[str | os.PathLike],
    *,
    what: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    input: bytes | None = None,
    check: bool = True,
    ok: Collection[int] = (0,),
    capture: bool = True,
    on_line: Callable[[str], None] | None = None,
    hint: str | None = None,
    stdout: IO[bytes] | None = None,
) -> subprocess.CompletedProcess:
    """Run a command, stdout and stderr merged; on an exit code not in `ok` raise CommandError
    with the output's tail (`check=False`: never; the caller reads the returncode). `on_line`
    sees each line as it comes (for progress). With `stdout`, the command's output goes to that
    file and only its stderr is read. Children are killed if we are interrupted."""
    argv = [str(c) for c in cmd]
    log.debug("$ %s", " ".join(argv))
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update(env)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    lines: list[str] = []
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.PIPE if capture else None,
        stderr=(subprocess.PIPE if stdout is not None else subprocess.STDOUT) if capture else None,
        env=full_env,
        cwd=cwd,
        start_new_session=True,
    )
    with _live_lock:
        _live.add(proc)
    try:
        if input is not None:
            assert proc.stdin is not None
            proc.stdin.write(input)
            proc.stdin.close()
        if capture:
            stream = proc.stderr if stdout is not None else proc.stdout
            assert stream is not None
            # Split on \r too: progress meters (qemu-img -p, xz -v) redraw one line with \r.
            buf = b""
            while True:
                chunk = stream.read1(65536)
                if chunk:
                    buf += chunk
                parts = re.split(rb"\r\n|\r|\n", buf)
                buf = parts.pop() if chunk else b""
                for raw in parts if chunk else parts + ([buf] if buf else []):
                    line = raw.decode("utf-8", "replace")
                    if not line.strip():
                        continue
                    tail.append(line)
                    lines.append(line)
                    if on_line:
                        on_line(line)
                    log.debug("  %s", line)
                if not chunk:
                    break
        rc = proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    finally:
        with _live_lock:
            _live.discard(proc)
    out = "\n".join(lines)
    if check and rc not in ok:
        raise CommandError(
            f"{what or argv[0]} failed (exit {rc})",
            returncode=rc,
            output_tail="\n".join(tail),
            hint=hint,
        )
    return subprocess.CompletedProcess(argv, rc, stdout=out, stderr="")


def spawn(cmd: Sequence[str | os.PathLike], *, what: str) -> subprocess.Popen:
    """Start a long-running child (a virtual machine) in its own process group, its output
    discarded; `stop()` it. Until then terminate_all() ends it too, so an interrupt never
    leaves it behind, and the kernel kills it when piimage dies of anything (SIGKILL, the
    OOM killer): setpriv sets its parent-death signal, which follows the thread that
    started it, so only the main thread spawns."""
    assert threading.current_thread() is threading.main_thread(), "spawn() from a worker"
    argv = ["setpriv", "--pdeathsig", "KILL", "--", *(str(c) for c in cmd)]
    log.debug("$ %s &", " ".join(argv))
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        raise CommandError(
            f"{what}: cannot start {argv[4]}: {e.strerror}", returncode=-1, output_tail=""
        ) from None
    with _live_lock:
        _live.add(proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    """End a child started by spawn() (SIGTERM to its group, SIGKILL after 10 s) and reap it."""
    try:
        _terminate(proc)
    finally:
        with _live_lock:
            _live.discard(proc)
