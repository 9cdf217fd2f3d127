"""Running the piimage command line in integration tests, and the test cluster they build."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from phases import record_piimage

# Role layers are expensive (apt under emulation): keep them in the machine's own cache so a
# later run reuses them; downloads and decompressed bases go to a fresh per-session cache, so
# "downloaded once" is tested for real.
PERSISTENT_CACHE = Path(os.environ.get("PIIMAGE_TEST_CACHE", Path.home() / ".cache" / "piimage"))

CLUSTER_YAML = """\
name: testcluster
base: raspios-lite-arm64
network:
  subnet: 10.0.0.0/24
  gateway: 10.0.0.1
  dns: [10.0.0.1]
  interface: eth0
admin:
  name: alice
  ssh_authorized_keys:
    - {key}
timezone: Europe/London
hardware:
  model: pi4-2gb
cluster_user: {{name: mpiuser, uid: 1500}}
nodes:
  - {{hostname: head, role: head, ip: 10.0.0.10}}
  - {{hostname: node01, role: compute, ip: 10.0.0.11}}
  - {{hostname: node02, role: compute, ip: {node02_ip}}}
"""


def piimage(
    args: list[str],
    env: dict,
    cwd: Path,
    check_rc: int | None = 0,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """Run piimage to its end; `on_line` sees each line of its log as it comes."""
    t0 = time.monotonic()
    if on_line is None:
        proc = subprocess.run(
            [sys.executable, "-m", "piimage.cli", *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=3600,
        )
    else:
        proc = _streamed(args, env, cwd, on_line)
    record_piimage(args, proc.stderr, time.monotonic() - t0, t0)
    if check_rc is not None and proc.returncode != check_rc:
        pytest.fail(
            f"piimage {' '.join(args)} exited {proc.returncode}, expected {check_rc}:\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def start_piimage(
    args, env, cwd, *, stdout=subprocess.PIPE, ctrl_c: bool = False
) -> subprocess.Popen:
    """`python -m piimage.cli ARGS` started, its log (stderr) a text pipe to read as it goes;
    ctrl_c: with SIGINT's default action back (with_ctrl_c), for a test that sends it."""
    return subprocess.Popen(
        [sys.executable, "-m", "piimage.cli", *args],
        env=env,
        cwd=cwd,
        preexec_fn=with_ctrl_c if ctrl_c else None,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def _streamed(args, env, cwd, on_line) -> subprocess.CompletedProcess:
    import threading

    p = start_piimage(args, env, cwd)
    err: list[str] = []

    def read_log() -> None:
        assert p.stderr is not None
        for line in p.stderr:
            err.append(line)
            on_line(line)

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    assert p.stdout is not None
    out = p.stdout.read()  # to its end: the log is read beside it, so neither pipe fills up
    try:
        p.wait(timeout=3600)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    reader.join(timeout=60)
    return subprocess.CompletedProcess(p.args, p.returncode, out, "".join(err))


def pubkey(env) -> str:
    return (Path(env["HOME"]) / ".ssh" / "id_ed25519.pub").read_text().strip()


def home_with_key(home: Path, comment: str) -> Path:
    """A HOME with ~/.ssh/id_ed25519(.pub), as a user's laptop has: the default cluster takes
    the admin's key from there."""
    (home / ".ssh").mkdir(mode=0o700)
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            comment,
            "-f",
            str(home / ".ssh" / "id_ed25519"),
        ],
        check=True,
    )
    return home


def with_ctrl_c() -> None:
    """preexec_fn for a piimage a test will interrupt: SIGINT back to its default. A process
    started with SIGINT ignored keeps it ignored (Python then installs no KeyboardInterrupt
    handler), and pytest-xdist's workers run with it ignored, so without this the test's
    Ctrl-C would never reach the build."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def live_partial(text: str) -> bool | None:
    """For a path or line naming a temporary layer ('.<layer>.partial-<pid>', fsutil.temp_name):
    whether the piimage that makes it still runs (another test lane's build, not one a test
    ended); None when `text` names no temporary layer."""
    import re

    m = re.search(r"\.partial-(\d+)", text)
    return Path(f"/proc/{m.group(1)}").exists() if m else None
