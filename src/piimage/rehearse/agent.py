"""Commands on a node: a virtio-serial port and a small agent that exists only in the
rehearsal's overlay (overlay.py puts it there), so a node with a broken network is reported as
such instead of hanging the run. AGENT_SCRIPT is the guest's end of the protocol, Agent the
host's."""

from __future__ import annotations

import base64
import socket
import threading
import time
from pathlib import Path

AGENT_PORT = "org.piimage.agent"
AGENT_PATH = "/usr/local/sbin/piimage-rehearsal-agent"
AGENT_UNIT = "piimage-rehearsal-agent.service"

# The agent: reads "<id> <base64 script>" lines from the port, runs each script with bash and
# answers "R <id> <exit code> <base64 output>". Commands run one at a time, each under timeout.
AGENT_SCRIPT = f"""#!/bin/bash
# Added by `piimage rehearse` to a throw-away overlay only; never part of a flashable image.
# Runs the commands the rehearsal sends over a virtio-serial port (independent of the network).
port=/dev/virtio-ports/{AGENT_PORT}
work=/run/piimage-agent
mkdir -p "$work"
exec 3<>"$port" || exit 1
while IFS=' ' read -r id payload <&3; do
    [ -n "$id" ] || continue
    printf '%s' "$payload" | base64 -d > "$work/cmd" 2>/dev/null
    timeout 900 bash "$work/cmd" > "$work/out" 2>&1 < /dev/null
    rc=$?
    printf 'R %s %s %s\\n' "$id" "$rc" "$(tail -c 65536 "$work/out" | base64 -w0)" >&3
done
"""


class AgentTimeout(Exception):
    pass


class Agent:
    """The host end of a node's virtio-serial port (QEMU's unix socket chardev)."""

    def __init__(self, path: Path):
        self.path = path
        self.sock: socket.socket | None = None
        self._buf = b""
        self._next = 1
        self._lock = threading.Lock()

    def connect(self, timeout: float = 30) -> bool:
        """Connect to QEMU's end of the port; False if it is not there within `timeout` (QEMU
        still starting, or already gone: a first boot that reboots at once). call() tries
        again."""
        self.close()
        self._buf = b""  # a new power-on: nothing of the last connection's stream is an answer
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                return True
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)

    def call(self, script: str, timeout: float) -> tuple[int, str]:
        """Run `script` with bash on the node as root: (exit code, output)."""
        if self.sock is None and not self.connect(timeout=min(timeout, 5)):
            raise AgentTimeout("the node's agent port is not open (is QEMU running?)")
        assert self.sock is not None
        with self._lock:
            cid = self._next
            self._next += 1
            try:
                self.sock.sendall(f"{cid} {base64.b64encode(script.encode()).decode()}\n".encode())
            except OSError as e:
                self.close()
                raise AgentTimeout(f"the node's agent port closed ({e.strerror})") from None
            deadline = time.monotonic() + timeout
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    parts = line.decode("ascii", "replace").split(" ")
                    if len(parts) >= 3 and parts[0] == "R" and parts[1] == str(cid):
                        out = base64.b64decode(parts[3]) if len(parts) > 3 and parts[3] else b""
                        return int(parts[2]), out.decode("utf-8", "replace")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentTimeout(f"no answer in {timeout:.0f} s")
                self.sock.settimeout(min(left, 5))
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    self.close()  # QEMU went away (a reboot); the next call connects anew
                    raise AgentTimeout("the node's agent port closed")
                self._buf += chunk

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
