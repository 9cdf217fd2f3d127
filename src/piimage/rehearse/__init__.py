"""`piimage rehearse`: boot the built images as a virtual cluster and prove it works.

Each chosen node boots from a copy-on-write overlay of its built image (qcow2 with the `.img` as
backing file: the flashable image is never written) in `qemu-system-aarch64 -M virt`, with
Debian's arm64 kernel of the image's release (guestkernel.py). The nodes share one virtual
Ethernet: a hub in this process on 127.0.0.1 that QEMU's socket netdevs connect to, forwarding
each frame to the other nodes only — nothing reaches any other network, and no root-only
network setup is needed. The nodes keep exactly the addresses and names of the inventory.

Commands reach a node through a virtio-serial port and a small agent that exists only in the
overlay, so a node with a broken network is reported as such instead of hanging the run. Serial
consoles are logged to `<out>/<cluster>/rehearsal/<node>.console.log`, with the report
(`report.json`) beside them.

Every QEMU process, the hub and the overlays are gone when rehearse() returns or raises.
"""

from __future__ import annotations

import base64
import io
import json
import re
import selectors
import shlex
import shutil
import socket
import struct
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import piboot
from .errors import BuildError, PiimageError, UserError
from .fsutil import write_atomic
from .guestkernel import GuestKernel, guest_kernel
from .inventory import Cluster, Node
from .log import log
from .profiles import effective
from .run import require_tools, run, spawn, stop

AGENT_PORT = "org.piimage.agent"
AGENT_PATH = "/usr/local/sbin/piimage-rehearsal-agent"
AGENT_UNIT = "piimage-rehearsal-agent.service"
OUTPUT_TAIL = 4000  # characters of a check's output kept in the report

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

_DEVICE_UNIT = r"dev-virtio\x2dports-" + AGENT_PORT + ".device"
AGENT_SERVICE = f"""[Unit]
Description=piimage rehearsal agent (rehearsal overlays only)
DefaultDependencies=no
# Keep answering when a failed boot isolates emergency.target, so the rehearsal can say why.
IgnoreOnIsolate=yes
Wants={_DEVICE_UNIT}
After={_DEVICE_UNIT} local-fs.target

[Service]
ExecStart={AGENT_PATH}
Restart=always
RestartSec=1

[Install]
WantedBy=sysinit.target
"""

# Waits that a Pi never comes near but full emulation stretches several times (a node here boots
# in 2-5 minutes on two host cores, a Pi 4 in well under one): systemd's 90 s default for a
# device to appear (fstab's /boot/firmware, by PARTUUID) and for a unit to start. Raised in the
# rehearsal overlay only; the flashable images keep systemd's defaults.
EMULATION_TIMEOUT_S = 600
SYSTEMD_TIMEOUTS_PATH = "/etc/systemd/system.conf.d/90-piimage-rehearsal-timeouts.conf"
SYSTEMD_TIMEOUTS = f"""# Added by `piimage rehearse` to a throw-away overlay only (emulation is slow; a Pi is not).
[Manager]
DefaultTimeoutStartSec={EMULATION_TIMEOUT_S}s
DefaultDeviceTimeoutSec={EMULATION_TIMEOUT_S}s
"""
# NetworkManager-wait-online gives NetworkManager 60 s (NM_ONLINE_TIMEOUT in its unit) to finish
# starting; failing it leaves the node degraded.
NM_WAIT_PATH = "/etc/systemd/system/NetworkManager-wait-online.service.d/90-piimage-rehearsal.conf"
NM_WAIT = f"""# Added by `piimage rehearse` to a throw-away overlay only (emulation is slow; a Pi is not).
[Service]
Environment=NM_ONLINE_TIMEOUT={EMULATION_TIMEOUT_S}
"""

# Console lines that explain a boot gone wrong (emergency mode, failed or timed-out units).
_CONSOLE_TROUBLE = re.compile(
    r"Timed out waiting for|Dependency failed for|Failed to (start|mount)|emergency mode|"
    r"\bFAILED\b|Kernel panic|Give root password|You are in emergency mode",
    re.IGNORECASE,
)

MPI_PROGRAM = """\
from mpi4py import MPI
comm = MPI.COMM_WORLD
total = comm.allreduce(comm.Get_rank() + 1)
print(f"rank {comm.Get_rank()} of {comm.Get_size()} on {MPI.Get_processor_name()}: sum {total}", flush=True)
"""


MUNGE_TTL_S = 300  # munge's default credential lifetime (MUNGE_DEFAULT_TTL)
CLOCK_SLACK_S = 120  # the head's clock may lag its image's build time by this much
MAX_REBOOTS = 3  # Raspberry Pi OS reboots once on a first boot (bookworm's init=firstboot)


class RehearsalFailed(PiimageError):
    """At least one check failed (the report says which)."""

    exit_code = 1


class AgentTimeout(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The virtual network
# ---------------------------------------------------------------------------------------------
class Hub:
    """An Ethernet hub for QEMU's `-netdev socket,connect=`: frames arrive as a 4-byte
    big-endian length and the frame; each goes to every other connected port."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._bufs: dict[socket.socket, bytearray] = {}
        self._stop = threading.Event()
        self.frames = 0
        self._thread = threading.Thread(target=self._serve, name="rehearsal-hub", daemon=True)

    def __enter__(self) -> Hub:
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in list(self._bufs):
            s.close()
        self.listener.close()
        self._sel.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.2):
                s = key.fileobj
                if s is self.listener:
                    conn, _ = self.listener.accept()
                    conn.setblocking(True)
                    conn.settimeout(5)
                    self._bufs[conn] = bytearray()
                    self._sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = s.recv(262144)
                except OSError:
                    data = b""
                if not data:
                    self._drop(s)
                    continue
                buf = self._bufs[s]
                buf.extend(data)
                while len(buf) >= 4:
                    (n,) = struct.unpack(">I", buf[:4])
                    if len(buf) < 4 + n:
                        break
                    frame = bytes(buf[: 4 + n])
                    del buf[: 4 + n]
                    self.frames += 1
                    for other in list(self._bufs):
                        if other is not s:
                            try:
                                other.sendall(frame)
                            except OSError:
                                self._drop(other)

    @property
    def connected(self) -> int:
        return len(self._bufs)

    def _drop(self, s: socket.socket) -> None:
        if s in self._bufs:
            del self._bufs[s]
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()


# ---------------------------------------------------------------------------------------------
# One node: its overlay, QEMU process and agent
# ---------------------------------------------------------------------------------------------
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


@dataclass
class NodeState:
    node: Node
    image: Path
    overlay: Path
    console: Path
    agent: Agent
    memory_mb: int
    index: int = 0  # the node's place on the virtual network (its MAC)
    proc: Any = None
    started: float = 0.0
    boot_s: float | None = None
    cmdlines: list = field(default_factory=list)  # the kernel command line of each boot
    reboots: int = 0
    failed: str | None = None  # why this node cannot become ready (stops waiting on it)
    done: set = field(default_factory=set)  # milestones reached ("munge", "slurmd", …)
    last: dict = field(default_factory=dict)  # the last readiness probe

    @property
    def name(self) -> str:
        return self.node.hostname


@dataclass
class Check:
    name: str
    node: str
    ok: bool
    summary: str
    output: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    cluster: str
    nodes: list[str]
    kernel: str
    boot_seconds: dict[str, float | None] = field(default_factory=dict)
    ready_seconds: float | None = None
    checks: list[Check] = field(default_factory=list)
    logs: str = ""
    # every power-on's kernel command line, as the Pi's firmware would have made it (piboot.py)
    boot_cmdlines: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def text(self) -> str:
        lines = [f"rehearsal of {self.cluster}: {', '.join(self.nodes)} (kernel {self.kernel})"]
        for n, s in self.boot_seconds.items():
            lines.append(
                f"  {n:<12} booted in {s:.0f} s" if s is not None else f"  {n:<12} did not boot"
            )
        lines.append(
            f"  cluster ready after {self.ready_seconds:.0f} s"
            if self.ready_seconds is not None
            else "  cluster never became ready"
        )
        for c in self.checks:
            lines.append(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<9} {c.node:<12} {c.summary}")
            if not c.ok and c.output.strip():
                lines.extend("        | " + ln for ln in c.output.strip().splitlines()[-12:])
        lines.append(f"  consoles and report: {self.logs}")
        lines.append(
            "rehearsal passed"
            if self.ok
            else "rehearsal FAILED: "
            + "; ".join(f"{c.node}: {c.name}" for c in self.checks if not c.ok)
        )
        return "\n".join(lines)


def _host_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 4096


def _overlay_tar() -> bytes:
    """What only the rehearsal adds: the agent, its unit, the link that enables it, and
    systemd's start and device timeouts and NetworkManager's wait raised for emulation
    (EMULATION_TIMEOUT_S)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(path: str, data: bytes | None, mode: int, link: str | None = None) -> None:
            ti = tarfile.TarInfo(path.lstrip("/"))
            ti.uid = ti.gid = 0
            ti.mtime = int(time.time())
            ti.mode = mode
            if link is not None:
                ti.type = tarfile.SYMTYPE
                ti.linkname = link
                tar.addfile(ti)
            else:
                ti.size = len(data or b"")
                tar.addfile(ti, io.BytesIO(data or b""))

        add(AGENT_PATH, AGENT_SCRIPT.encode(), 0o755)
        add(f"/etc/systemd/system/{AGENT_UNIT}", AGENT_SERVICE.encode(), 0o644)
        add(
            f"/etc/systemd/system/sysinit.target.wants/{AGENT_UNIT}",
            None,
            0o777,
            link=f"/etc/systemd/system/{AGENT_UNIT}",
        )
        add(SYSTEMD_TIMEOUTS_PATH, SYSTEMD_TIMEOUTS.encode(), 0o644)
        add(NM_WAIT_PATH, NM_WAIT.encode(), 0o644)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The rehearsal
# ---------------------------------------------------------------------------------------------
class Rehearsal:
    def __init__(self, cluster: Cluster, nodes: tuple[Node, ...], out_dir: Path, timeout: float):
        self.cluster = cluster
        self.nodes = nodes
        self.images = out_dir.absolute() / cluster.name  # QEMU's paths name it in full
        self.logs = self.images / "rehearsal"
        self.timeout = timeout
        self.head = next((n for n in nodes if n.facts.slurmctld), None)
        self.compute = [n for n in nodes if n.facts.slurmd]
        self.states: dict[str, NodeState] = {}
        self.t0 = 0.0
        self.kernel: GuestKernel | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def check_inputs(self) -> None:
        require_tools(["qemu-system-aarch64", "qemu-img"])
        if self.head is None:
            raise UserError(
                "rehearse needs the head node (slurmctld, NFS server) among --nodes",
                hint=f"add {self.cluster.head.hostname if self.cluster.head else 'the head'} to --nodes",
            )
        if not self.compute:
            raise UserError("rehearse needs at least one node that runs jobs among --nodes")
        missing = [
            n.hostname for n in self.nodes if not (self.images / f"{n.hostname}.img").is_file()
        ]
        if missing:
            raise UserError(
                f"no built image for {', '.join(missing)} in {self.images}/",
                hint="build them first: piimage build --all (rehearse boots the .img files of --out)",
            )

    def prepare(self, run_dir: Path) -> None:
        """Overlays for every node (the agent added), the kernel for their release."""
        from .image import GuestSession

        self.run_dir = run_dir
        self.logs.mkdir(parents=True, exist_ok=True)
        want = {n.hostname: piboot.vm_memory_mb(n.hardware.model) for n in self.nodes}
        budget = int(_host_available_mb() * 0.8)
        if sum(want.values()) > budget:
            scale = budget / sum(want.values())
            log.warning(
                "the host has %d MiB to spare: giving each node %.0f%% of its board's memory "
                "(SLURM may then find less memory than slurm.conf says)",
                budget,
                scale * 100,
            )
            want = {k: max(512, int(v * scale)) for k, v in want.items()}
        for n in self.nodes:
            img = (self.images / f"{n.hostname}.img").resolve()
            ov = run_dir / f"{n.hostname}.qcow2"
            # the card is larger than the image, as the SD card a user flashes is
            run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "raw",
                    "-b",
                    img,
                    ov,
                    str(max(piboot.CARD_BYTES, img.stat().st_size)),
                ],
                what=f"qemu-img create (overlay for {n.hostname})",
            )
            console = self.logs / f"{n.hostname}.console.log"
            console.unlink(missing_ok=True)
            self.states[n.hostname] = NodeState(
                n,
                img,
                ov,
                console,
                Agent(run_dir / f"{n.hostname}.agent"),
                want[n.hostname],
                index=len(self.states) + 1,
            )
        tar = _overlay_tar()
        suites = set()
        with GuestSession([s.overlay for s in self.states.values()]) as gs:
            for disk, st in zip(gs.disks(), self.states.values()):
                disk.mount()
                osr = disk.read_text("/etc/os-release")
                m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", osr, re.MULTILINE)
                if not m:
                    raise BuildError(
                        f"{st.image}: /etc/os-release names no release (VERSION_CODENAME)"
                    )
                suites.add(m.group(1))
                disk.tar_in(tar)
                disk.umount()
        if len(suites) != 1:
            raise UserError(
                f"the images are of different releases ({', '.join(sorted(suites))}); "
                "rebuild them from one base"
            )
        self.kernel = guest_kernel(suites.pop())

    def qemu_command(self, st: NodeState, hub_port: int, cmdline: str) -> list[str]:
        """One power-on of a node. The Raspberry Pi parts (command line, memory, clock, card
        size) come from piboot.py; QEMU exits when the guest reboots (-no-reboot), and the
        rehearsal powers it on again with the card's cmdline.txt read anew, as a Pi's
        firmware would."""
        assert self.kernel is not None
        cpus = st.node.hardware.cpus
        mac = f"52:54:00:5e:{st.index // 256:02x}:{st.index % 256:02x}"
        return [
            "qemu-system-aarch64",
            "-M",
            "virt",
            "-cpu",
            "cortex-a72",
            "-smp",
            str(cpus),
            "-m",
            str(st.memory_mb),
            "-accel",
            "tcg,thread=multi",
            *piboot.RTC_ARGS,
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(self.kernel.vmlinuz),
            "-initrd",
            str(self.kernel.initrd),
            "-append",
            cmdline,
            "-drive",
            f"file={st.overlay},format=qcow2,if=none,id=root,cache=unsafe",
            "-device",
            "virtio-blk-pci,drive=root",
            "-drive",
            f"file={self.kernel.modules_disk},format=raw,if=none,id=mods,readonly=on",
            "-device",
            "virtio-blk-pci,drive=mods",
            "-netdev",
            f"socket,id=net0,connect=127.0.0.1:{hub_port}",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={mac}",
            "-device",
            "virtio-serial-pci",
            "-chardev",
            f"socket,id=agent,path={st.agent.path},server=on,wait=off",
            "-device",
            f"virtserialport,chardev=agent,name={AGENT_PORT}",
            # every power-on appends to the one console log
            "-chardev",
            f"file,id=console,path={st.console},append=on",
            "-serial",
            "chardev:console",
            "-object",
            "rng-random,filename=/dev/urandom,id=rng0",
            "-device",
            "virtio-rng-pci,rng=rng0",
        ]

    # -- running ----------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def boot(self, hub: Hub) -> None:
        self.t0 = time.monotonic()
        self.hub_port = hub.port
        for st in self.states.values():
            self._power_on(st)
            st.started = time.monotonic()
            log.info(
                "%s: booting (%d CPUs, %d MiB): %s",
                st.name,
                st.node.hardware.cpus,
                st.memory_mb,
                st.cmdlines[-1],
            )
        for st in self.states.values():
            st.agent.connect(timeout=10)

    def _power_on(self, st: NodeState) -> None:
        cmdline = piboot.kernel_cmdline(
            st.node.hardware.model, piboot.card_cmdline_txt(st.overlay, self.run_dir)
        )
        st.cmdlines.append(cmdline)
        # the report shows the Pi kernel's line; Debian's kernel gets what that line means
        st.proc = spawn(
            self.qemu_command(st, self.hub_port, piboot.for_debian_kernel(cmdline)),
            what=f"booting {st.name}",
        )

    def _alive(self, st: NodeState) -> bool:
        """False once a node cannot come up; a node that rebooted (a first boot may) is
        powered on again, at most MAX_REBOOTS times."""
        if st.proc is None or st.proc.poll() is None or st.failed:
            return st.failed is None
        trouble = [ln for ln in _read(st.console).splitlines() if "rehearsal initrd: FAILED" in ln]
        if st.proc.returncode != 0 or trouble:
            st.failed = (
                trouble[-1].split("rehearsal initrd: ", 1)[1]
                if trouble
                else f"QEMU exited (code {st.proc.returncode})"
            ) + f"; see {st.console}"
        elif st.reboots >= MAX_REBOOTS:
            st.failed = f"rebooted {st.reboots + 1} times without coming up; see {st.console}"
        else:
            st.reboots += 1
            st.agent.close()
            self._power_on(st)
            st.agent.connect(timeout=10)
            log.info(
                "%s: rebooted (%.0f s); powered on again: %s",
                st.name,
                self.elapsed(),
                st.cmdlines[-1],
            )
            return True
        log.info("%s: %s", st.name, st.failed)
        return False

    def _units(self, st: NodeState) -> list[str]:
        f = st.node.facts  # the node's role facts (profiles.RoleFacts)
        units = [
            ("munge", f.munge),
            ("slurmctld", f.slurmctld),
            ("nfs-server", f.nfs_server),
            ("slurmd", f.slurmd),
        ]
        return [u for u, on in units if on]

    def _probe(self, st: NodeState) -> dict[str, str]:
        shared = shlex.quote(self.cluster.shared.path)
        script = [
            "echo state=$(systemctl is-system-running 2>/dev/null)",
            "echo failed=$(systemctl list-units --state=failed --plain --no-legend 2>/dev/null"
            " | awk '{print $1}' | tr '\\n' ' ')",
            "echo hostname=$(hostname)",
            "echo addr=$(ip -4 -o addr show 2>/dev/null | awk '{print $4}' | tr '\\n' ' ')",
        ]
        for u in self._units(st):
            script.append(f"echo unit.{u}=$(systemctl is-active {u} 2>/dev/null)")
        if st.node is not self.head:
            script.append(
                f"timeout 20 ls {shared} >/dev/null 2>&1; "
                f"echo mount=$(findmnt -n -o FSTYPE {shared} | tr '\\n' ' ')"
            )
        if st.node is self.head:
            script.append(
                "echo sinfo=$(timeout 20 sinfo -h -N -o '%N:%T' 2>/dev/null | tr '\\n' ' ')"
            )
        _, out = st.agent.call("\n".join(script), timeout=120)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def _milestone(self, st: NodeState, key: str, text: str) -> None:
        if key not in st.done:
            st.done.add(key)
            log.info("%s: %s (%.0f s)", st.name, text, self.elapsed())

    def wait_ready(self) -> float | None:
        """Poll every node until the cluster is ready (every compute node idle in sinfo), every
        node is settled (ready or failed), or the time is up. Returns seconds to ready."""
        deadline = self.t0 + self.timeout
        settled_at: float | None = None
        ready_at: float | None = None
        grace = 90  # once every service is up or failed: how long sinfo may take to agree
        while time.monotonic() < deadline:
            for st in self.states.values():
                if not self._alive(st):
                    continue
                try:
                    probe = self._probe(st)
                except AgentTimeout:
                    continue
                st.last = probe
                if st.boot_s is None and probe.get("state") not in (
                    "",
                    "initializing",
                    "starting",
                    None,
                ):
                    st.boot_s = time.monotonic() - st.started
                    self._milestone(st, "booted", f"booted, system {probe.get('state')}")
                if probe.get("state") == "maintenance" and not st.failed:
                    # emergency or rescue mode: nothing more will start on this node
                    st.failed = f"in emergency mode; {_failed_units_text(probe)}"
                    log.info("%s: %s", st.name, st.failed)
                if probe.get("hostname") != st.name and "hostname" not in st.done:
                    st.done.add("hostname")
                    log.info("%s: reports hostname %r", st.name, probe.get("hostname"))
                if str(st.node.ip) in probe.get("addr", "").replace("/", " ").split():
                    self._milestone(st, "address", f"has address {st.node.ip}")
                for u in self._units(st):
                    state = probe.get(f"unit.{u}", "")
                    if state == "active":
                        self._milestone(st, u, f"{u} up")
                    elif state == "failed":
                        self._milestone(st, u + "-failed", f"{u} FAILED")
                if "nfs" in probe.get("mount", ""):
                    self._milestone(st, "mount", f"{self.cluster.shared.path} mounted")
            head = self.states[self.head.hostname]
            idle = _idle_nodes(head.last.get("sinfo", ""))
            for n in self.compute:
                if n.hostname in idle:
                    self._milestone(head, f"idle-{n.hostname}", f"sinfo: {n.hostname} idle")
            if all(n.hostname in idle for n in self.compute):
                # ready; the checks start once every node has also finished booting (a
                # node's last boot jobs can end after the cluster answers)
                ready_at = ready_at if ready_at is not None else self.elapsed()
                if all(st.boot_s is not None or st.failed for st in self.states.values()):
                    return ready_at
            if settled_at is None and all(self._settled(st) for st in self.states.values()):
                settled_at = time.monotonic()
            if settled_at is not None and time.monotonic() - settled_at > grace:
                log.info(
                    "services settled %d s ago and the cluster is not ready: checking what fails",
                    grace,
                )
                return None
            time.sleep(3)
        log.info("timed out after %.0f s waiting for the cluster", self.timeout)
        return ready_at

    def _settled(self, st: NodeState) -> bool:
        if st.failed or st.boot_s is None:
            return st.failed is not None
        units_done = all(u in st.done or u + "-failed" in st.done for u in self._units(st))
        mount_done = st.node is self.head or "mount" in st.done
        return units_done and (mount_done or time.monotonic() - st.started - st.boot_s > 60)

    # -- checks -----------------------------------------------------------------------------------
    def _as_user(self, cmd: str) -> str:
        user = self.cluster.cluster_user
        return (
            f"cd {shlex.quote(self.cluster.shared.path)} 2>/dev/null || cd; "
            f"runuser -u {user.name} -- env HOME={user.home} USER={user.name} bash -c {shlex.quote(cmd)}"
        )

    def _call(self, st: NodeState, script: str, timeout: float = 300) -> tuple[int, str]:
        if st.failed:
            return 255, st.failed
        try:
            return st.agent.call(script, timeout=timeout)
        except AgentTimeout as e:
            return 255, f"{st.name}: {e}"

    def checks(self) -> list[Check]:
        out: list[Check] = []

        def add(
            name: str, node: str, ok: bool, summary: str, output: str = "", t0: float | None = None
        ) -> None:
            c = Check(
                name,
                node,
                ok,
                summary,
                output[-OUTPUT_TAIL:],
                round(time.monotonic() - t0, 1) if t0 else 0.0,
            )
            out.append(c)
            log.info("%s  %-9s %-12s %s", "PASS" if ok else "FAIL", name, node, summary)

        head = self.states[self.head.hostname]
        # per node: booted, name, address, services
        for st in self.states.values():
            state = st.last.get("state", "")
            if st.boot_s is None or state == "maintenance":
                # what the kernel said on the serial console, and (the agent outlives emergency
                # mode) the journal's errors: a Pi's last console is tty1, which systemd writes to
                try:
                    _, journal = st.agent.call(
                        "systemctl list-jobs --no-pager 2>&1 | tail -n 20; echo '--- journal'; "
                        "journalctl -b -p warning --no-pager -o short-monotonic -n 40",
                        60,
                    )
                except (AgentTimeout, OSError, AssertionError):
                    journal = "(the node's agent does not answer)"
                add(
                    "boot",
                    st.name,
                    False,
                    st.failed
                    or f"did not finish booting in {self.timeout:.0f} s "
                    f"(system {state or 'not answering'}); see {st.console}",
                    _console_trouble(st.console) + "\n--- jobs still queued\n" + journal,
                )
                continue
            again = (
                f" ({st.reboots} reboot{'s' if st.reboots != 1 else ''} on the way)"
                if st.reboots
                else ""
            )
            add(
                "boot",
                st.name,
                True,
                f"booted in {st.boot_s:.0f} s{again}, system {state or 'running'}",
            )
            rc, name = self._call(st, "hostname")
            add(
                "hostname",
                st.name,
                rc == 0 and name.strip() == st.name,
                f"hostname is {name.strip()!r}"
                + ("" if name.strip() == st.name else f", expected {st.name!r}"),
            )
            rc, addrs = self._call(st, "ip -4 -o addr show | awk '{print $2, $4}'")
            ip = str(st.node.ip)
            has = [a for a in addrs.split() if "/" in a]
            add(
                "address",
                st.name,
                any(a.split("/")[0] == ip for a in has),
                f"has {ip}"
                if any(a.split("/")[0] == ip for a in has)
                else f"{st.name} has no address {ip} (has: {', '.join(has) or 'none'})",
                addrs,
            )
            bad = []
            for u in self._units(st):
                rc, state = self._call(st, f"systemctl is-active {u}")
                if state.strip() != "active":
                    _, journal = self._call(st, f"journalctl -b -u {u} -n 15 --no-pager -o cat")
                    bad.append((u, state.strip(), journal))
            add(
                "services",
                st.name,
                not bad,
                "all up: " + ", ".join(self._units(st))
                if not bad
                else "; ".join(f"{u} is {s or 'unknown'}" for u, s, _ in bad),
                "\n".join(f"--- {u}\n{j}" for u, _, j in bad),
            )
        booted = [st for st in self.states.values() if st.boot_s is not None and not st.failed]
        for st in booted:
            self._check_units(st, add)
            self._check_enablement(st, add)
            self._check_root(st, add)
            self._check_login(st, add)
            self._check_memcg(st, add)
        if head.boot_s is None:
            return out
        self._check_clocks(head, booted, add)
        # munge: a credential made on the head decodes on every other node
        rc, cred = self._call(head, "munge -n")
        cred = cred.strip()
        for st in self.states.values():
            if st is head or st.boot_s is None:
                continue
            t0 = time.monotonic()
            if rc != 0:
                add("munge", st.name, False, "the head cannot make a munge credential", cred, t0)
                continue
            r, dec = self._call(st, f"printf '%s' {shlex.quote(cred)} | unmunge")
            ok = r == 0 and "STATUS:" in dec and "Success" in dec
            add(
                "munge",
                st.name,
                ok,
                f"decodes {self.head.hostname}'s credential"
                if ok
                else f"{st.name} cannot decode a credential from {self.head.hostname}: {_unmunge_error(dec)}",
                dec,
                t0,
            )
        # sinfo: every compute node idle
        t0 = time.monotonic()
        rc, sinfo = self._call(head, "timeout 60 sinfo -N -o '%N %T'")
        states = {}
        for line in sinfo.splitlines()[1:]:
            parts = line.split()
            if len(parts) == 2:
                states[parts[0]] = parts[1]
        not_idle = [
            f"{n.hostname} is {states.get(n.hostname, 'missing')}"
            for n in self.compute
            if states.get(n.hostname) != "idle"
        ]
        add(
            "sinfo",
            self.head.hostname,
            rc == 0 and not not_idle,
            "every compute node idle: " + ", ".join(n.hostname for n in self.compute)
            if rc == 0 and not not_idle
            else "; ".join(not_idle) or "sinfo failed",
            sinfo,
            t0,
        )
        # jobs run on the compute nodes that are idle; those that are not would only make them
        # queue, and are already named by the sinfo check
        jobs = [n for n in self.compute if states.get(n.hostname) == "idle"]
        names = ",".join(n.hostname for n in jobs)
        count = len(jobs)
        left_out = f" ({'; '.join(not_idle)}: left out)" if not_idle else ""
        if not jobs:
            for name in ("srun", "mpi"):
                add(
                    name,
                    self.head.hostname,
                    False,
                    "not run: " + ("; ".join(not_idle) or "sinfo failed"),
                )
        # srun across every idle compute node
        else:
            t0 = time.monotonic()
            rc, text = self._call(
                head, self._as_user(f"timeout 240 srun -I120 -N{count} -w {names} hostname")
            )
            got = sorted(set(text.split()) & {n.hostname for n in jobs})
            ok = rc == 0 and len(got) == count
            add(
                "srun",
                self.head.hostname,
                ok,
                f"srun -N{count} hostname: {' '.join(got)}{left_out}"
                if ok
                else f"srun -N{count} hostname failed (exit {rc}); answered: {' '.join(got) or 'none'}",
                text,
                t0,
            )
        # the shared directory: written on the head, read on each compute node
        token = f"rehearsal {time.time_ns()}"
        shared = self.cluster.shared.path
        fname = f"{shared}/.piimage-rehearsal"
        rc, text = self._call(
            head,
            self._as_user(
                f"printf '%s\\n' {shlex.quote(token)} > {fname}-token && "
                f"printf '%s' {shlex.quote(MPI_PROGRAM)} > {fname}-mpi.py"
            ),
        )
        for n in self.compute:
            st = self.states[n.hostname]
            if st is head:
                continue
            t0 = time.monotonic()
            r, seen = self._call(st, self._as_user(f"timeout 60 cat {fname}-token"))
            ok = rc == 0 and r == 0 and seen.strip() == token
            add(
                "shared",
                n.hostname,
                ok,
                f"reads {shared} written on {self.head.hostname}"
                if ok
                else f"{n.hostname} cannot read the file {self.head.hostname} wrote in {shared}",
                text + seen,
                t0,
            )
        # an mpi4py job across every idle compute node
        if not jobs:
            self._call(head, f"rm -f {fname}-token {fname}-mpi.py")
            return out
        t0 = time.monotonic()
        rc, text = self._call(
            head,
            self._as_user(
                f"timeout 400 srun -I120 --mpi=pmix -N{count} --ntasks-per-node=1 -w {names} python3 {fname}-mpi.py"
            ),
            timeout=480,
        )
        ranks = re.findall(r"rank (\d+) of (\d+) on (\S+): sum (\d+)", text)
        want_sum = count * (count + 1) // 2
        hosts = sorted({h for _, _, h, _ in ranks})
        ok = (
            rc == 0
            and len(ranks) == count
            and all(int(s) == want_sum and int(z) == count for _, z, _, s in ranks)
            and hosts == sorted(n.hostname for n in jobs)
        )
        add(
            "mpi",
            self.head.hostname,
            ok,
            f"mpi4py allreduce over {count} ranks on {' '.join(hosts)}: sum {want_sum}{left_out}"
            if ok
            else f"mpi4py job across {names} failed (exit {rc}, {len(ranks)} of {count} ranks answered)",
            text,
            t0,
        )
        self._check_hostkeys(booted, add)
        self._check_ssh(head, booted, add)
        self._check_mpirun(head, jobs, fname, left_out, add)
        self._call(head, f"rm -f {fname}-token {fname}-mpi.py {fname}-hostfile")
        return out

    # -- what a Raspberry Pi's first boot must leave right (piboot.py plays that boot) ---------
    def _check_units(self, st: NodeState, add: Callable) -> None:
        """No failed unit: a degraded node is reported with the errors of its boot."""
        t0 = time.monotonic()
        rc, text = self._call(
            st,
            "systemctl list-units --state=failed --plain --no-legend --no-pager | awk '{print $1}'",
        )
        failed = text.split()
        journal = ""
        if failed:
            # each failed unit's own story, then the boot's errors
            _, journal = self._call(
                st,
                "".join(
                    f"systemctl status --no-pager -l -n 25 {shlex.quote(u)} 2>&1; echo; "
                    for u in failed[:4]
                )
                + "journalctl -b -p err --no-pager -o short-monotonic -n 40",
            )
        add(
            "units",
            st.name,
            rc == 0 and not failed,
            "no failed unit"
            if rc == 0 and not failed
            else "failed units: " + (", ".join(failed) or text.strip()),
            journal,
            t0,
        )

    def _check_enablement(self, st: NodeState, add: Callable) -> None:
        """The role's services are enabled or disabled as its profile says, after a first boot
        that may have applied systemd's presets (systemd.preset(5))."""
        profile = self.cluster.roles.get(st.node.role)
        if profile is None:
            return
        profile = effective(profile, st.node.runs_jobs)
        want = {u: "enabled" for u in profile.enable} | {u: "disabled" for u in profile.disable}
        if not want:
            return
        # is-enabled prints the state of any unit it knows (masked, disabled: exit 1) and, for
        # one the image does not have, nothing (systemd 252, bookworm) or "not-found" (257)
        rc, text = self._call(
            st,
            "\n".join(
                f"s=$(systemctl is-enabled {u} 2>/dev/null); echo {u}=${{s:-not-installed}}"
                for u in want
            ),
        )
        got = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        # a unit the image does not have cannot start: as good as disabled
        ok_states = {
            "enabled": {"enabled"},
            "disabled": {"disabled", "masked", "not-installed", "not-found"},
        }
        wrong = [
            f"{u} is {got.get(u) or 'unknown'}, wanted {w}"
            for u, w in want.items()
            if got.get(u) not in ok_states[w]
        ]
        add(
            "enablement",
            st.name,
            rc == 0 and not wrong,
            f"as the {profile.role} profile says: " + ", ".join(f"{u} {w}" for u, w in want.items())
            if not wrong
            else "; ".join(wrong),
            text,
        )

    def _check_root(self, st: NodeState, add: Callable) -> None:
        """The root filesystem spans the card, as a Pi's first boot makes it (and on the head,
        the shared directory has that room)."""
        shared = shlex.quote(self.cluster.shared.path)
        script = (
            'b=$(basename "$(readlink -f "$(findmnt -no SOURCE /)")"); '
            'd=$(basename "$(readlink -f /sys/class/block/$b/..)"); '
            "echo fs=$(findmnt -bno SIZE /); echo start=$(cat /sys/class/block/$b/start); "
            "echo part=$(cat /sys/class/block/$b/size); echo disk=$(cat /sys/block/$d/size)"
        )
        if st.node is self.head:
            script += f"; echo shared=$(findmnt -bno SIZE -T {shared})"
        rc, text = self._call(st, script)
        v = {
            k: int(x)
            for k, x in (ln.split("=", 1) for ln in text.splitlines() if "=" in ln)
            if x.strip().isdigit()
        }
        if not {"fs", "start", "part", "disk"} <= set(v):
            add("root", st.name, False, "cannot read the root filesystem's size", text)
            return
        part, disk, fs = v["part"] * 512, v["disk"] * 512, v["fs"]
        spans = (v["start"] + v["part"]) * 512 >= disk - (4 << 20)
        full = fs >= 0.93 * part
        shared_ok = (
            st.node is not self.head
            or self.cluster.shared.device_uuid
            or v.get("shared", 0) >= 0.93 * part
        )
        gib = 1 << 30
        summary = (
            f"root filesystem {fs / gib:.1f} GiB on a {disk / gib:.1f} GiB card "
            f"(partition {part / gib:.1f} GiB)"
        )
        if st.node is self.head and not self.cluster.shared.device_uuid:
            summary += f"; {self.cluster.shared.path} has {v.get('shared', 0) / gib:.1f} GiB"
        if not spans:
            summary = "the root partition does not reach the end of the card: " + summary
        elif not full:
            summary = "the root filesystem was not grown to its partition: " + summary
        add("root", st.name, bool(spans and full and shared_ok), summary, text)

    def _check_login(self, st: NodeState, add: Callable) -> None:
        """The admin can log in: no first-boot user wizard pending (Raspberry Pi's userconfig),
        logins allowed, and no "SSH may not work" banner from rename-user."""
        rc, text = self._call(
            st,
            "echo wizard=$(systemctl is-active userconfig 2>/dev/null); "
            "echo nologin=$(test -e /run/nologin && echo yes || echo no); "
            "echo banner=$(sshd -T 2>/dev/null | awk '$1==\"banner\"{print $2}')",
        )
        v = dict(ln.split("=", 1) for ln in text.splitlines() if "=" in ln)
        bad = []
        if v.get("wizard") in ("active", "activating"):
            bad.append("the first-boot user wizard (userconfig) is pending")
        if v.get("nologin") != "no":
            bad.append("logins are not allowed yet (/run/nologin)")
        if v.get("banner", "none") not in ("none", ""):
            bad.append(f"sshd shows a banner ({v['banner']})")
        add(
            "login",
            st.name,
            rc == 0 and not bad,
            f"{self.cluster.admin.name} can log in: no wizard, no banner"
            if rc == 0 and not bad
            else "; ".join(bad) or text,
            text,
        )

    def _check_memcg(self, st: NodeState, add: Callable) -> None:
        """The memory cgroup controller is on (a Pi kernel turns it off: piboot.BOARDS)."""
        rc, text = self._call(st, "cat /sys/fs/cgroup/cgroup.controllers; cat /proc/cmdline")
        controllers = text.splitlines()[0].split() if text.strip() else []
        add(
            "memcg",
            st.name,
            "memory" in controllers,
            "memory controller available"
            if "memory" in controllers
            else "no memory cgroup controller (Raspberry Pi kernels start with cgroup_disable=memory; "
            "cmdline.txt needs cgroup_enable=memory)",
            text,
        )

    def _check_clocks(self, head: NodeState, booted: list[NodeState], add: Callable) -> None:
        """Every node's clock within munge's credential lifetime (300 s) of the head's, though
        every board starts without a real-time clock."""
        offset = {}
        for st in booted:
            t0 = time.time()
            rc, text = self._call(st, "date +%s.%N")
            t1 = time.time()
            try:
                offset[st.name] = float(text.strip()) - (t0 + t1) / 2
            except ValueError:
                add("clock", st.name, False, "cannot read the clock", text)
        if head.name not in offset:
            return
        behind = -offset[head.name]
        for st in booted:
            if st.name not in offset:
                continue
            if st is head:
                # it started at 1970 (no real-time clock, no internet): only the time its card
                # last knew (fake-hwclock, written when the image was built) can have set it
                built = st.image.stat().st_mtime
                head_time = time.time() + offset[head.name]
                ok = head_time >= built - CLOCK_SLACK_S
                when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(head_time))
                add(
                    "clock",
                    st.name,
                    ok,
                    f"{abs(behind) / 86400:.1f} days {'behind' if behind > 0 else 'ahead of'} "
                    "this machine, not before its image was built (no real-time clock, no internet)"
                    if ok
                    else f"its clock says {when}, before its image was built: nothing restored "
                    "the time it last knew (no real-time clock, no internet)",
                )
                continue
            skew = offset[st.name] - offset[head.name]
            why = ""
            if abs(skew) >= MUNGE_TTL_S:
                # what the node's NTP client and the head's server say about it
                _, why = self._call(
                    st,
                    "timedatectl timesync-status --no-pager 2>&1; timedatectl show 2>&1; "
                    "journalctl -b -u systemd-timesyncd --no-pager -n 15 2>&1",
                    60,
                )
                _, served = self._call(
                    head, "chronyc -n tracking 2>&1; chronyc -n clients 2>&1 | head -n 8", 60
                )
                why += f"\n--- {head.name}\n{served}"
            add(
                "clock",
                st.name,
                abs(skew) < MUNGE_TTL_S,
                f"{skew:+.1f} s from {head.name}"
                + (
                    ""
                    if abs(skew) < MUNGE_TTL_S
                    else f": beyond munge's {MUNGE_TTL_S} s, credentials are refused"
                ),
                why,
            )

    def _check_hostkeys(self, booted: list[NodeState], add: Callable) -> None:
        """Each node's SSH host key is the one every other node's ssh_known_hosts lists (a
        first boot that makes new keys breaks SSH between nodes)."""
        served = {}
        for st in booted:
            _, text = self._call(
                st, "ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null | awk '{print $2, $3}'"
            )
            served[st.name] = text.strip()
        names = " ".join(st.name for st in booted)
        listed: dict[tuple[str, str], set[str]] = {}
        for st in booted:
            _, text = self._call(
                st,
                f'for h in {names}; do ssh-keygen -F "$h" -f /etc/ssh/ssh_known_hosts 2>/dev/null '
                "| grep -v '^#' | awk -v h=\"$h\" '{print h, $2, $3}'; done",
            )
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 3:
                    listed.setdefault((st.name, parts[0]), set()).add(f"{parts[1]} {parts[2]}")
        for st in booted:
            key = served[st.name]
            stale = [
                v.name
                for v in booted
                if v is not st and key not in listed.get((v.name, st.name), set())
            ]
            ok = bool(key) and not stale
            add(
                "hostkey",
                st.name,
                ok,
                "its host key is the one every node's ssh_known_hosts lists"
                if ok
                else (
                    "sshd serves no ed25519 host key"
                    if not key
                    else f"its host key is not the one ssh_known_hosts lists on {', '.join(stale)}"
                ),
                key,
            )

    def _check_ssh(self, head: NodeState, booted: list[NodeState], add: Callable) -> None:
        """The cluster user reaches every node from the head with SSH, host keys checked
        strictly (what Open MPI's launcher does)."""
        user = self.cluster.cluster_user.name
        for st in booted:
            if st is head:
                continue
            t0 = time.monotonic()
            rc, text = self._call(
                head,
                self._as_user(
                    f"timeout 90 ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=60 {st.name} hostname"
                ),
            )
            ok = rc == 0 and text.strip().splitlines()[-1:] == [st.name]
            add(
                "ssh",
                st.name,
                ok,
                f"{user}@{head.name} logs in with the cluster key, host key checked"
                if ok
                else f"{user}@{head.name} cannot SSH to {st.name} (exit {rc})",
                text,
                t0,
            )

    def _check_mpirun(
        self, head: NodeState, jobs: list[Node], fname: str, left_out: str, add: Callable
    ) -> None:
        """A plain `mpirun --hostfile` job, Open MPI's SSH launcher outside Slurm, across the
        compute nodes (those of the cluster's hostfile that are up)."""
        if not jobs:
            add("mpirun", head.name, False, "not run: no compute node is idle")
            return
        count = len(jobs)
        pattern = "|".join(n.hostname for n in jobs)
        hostfile = f"{self.cluster.shared.path}/hostfile"
        t0 = time.monotonic()
        rc, text = self._call(
            head,
            self._as_user(
                f"grep -E '^({pattern})([[:space:]]|$)' {hostfile} > {fname}-hostfile && "
                f"timeout 400 mpirun --hostfile {fname}-hostfile -np {count} --map-by ppr:1:node python3 {fname}-mpi.py"
            ),
            timeout=480,
        )
        ranks = re.findall(r"rank (\d+) of (\d+) on (\S+): sum (\d+)", text)
        want_sum = count * (count + 1) // 2
        hosts = sorted({h for _, _, h, _ in ranks})
        ok = (
            rc == 0
            and len(ranks) == count
            and all(int(s) == want_sum and int(z) == count for _, z, _, s in ranks)
            and hosts == sorted(n.hostname for n in jobs)
        )
        add(
            "mpirun",
            head.name,
            ok,
            f"mpirun --hostfile over {count} ranks on {' '.join(hosts)}: sum {want_sum}{left_out}"
            if ok
            else f"mpirun --hostfile across {pattern.replace('|', ',')} failed (exit {rc}, {len(ranks)} of {count} ranks)",
            text,
            t0,
        )

    def teardown(self) -> None:
        for st in self.states.values():
            st.agent.close()
            if st.proc is not None:
                stop(st.proc)


def _unmunge_error(out: str) -> str:
    """unmunge's own words: "STATUS: Invalid credential (6)", or its error line."""
    for line in out.splitlines():
        if line.startswith("STATUS:"):
            return line.split(":", 1)[1].strip()
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return lines[-1].removeprefix("unmunge: ").removeprefix("Error: ") if lines else "no output"


def _idle_nodes(sinfo: str) -> set[str]:
    return {p.split(":")[0] for p in sinfo.split() if p.endswith(":idle")}


def _failed_units_text(probe: dict[str, str]) -> str:
    units = probe.get("failed", "").split()
    return "failed units: " + ", ".join(units) if units else "no failed unit listed"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _console_trouble(path: Path, n: int = 25) -> str:
    """The console lines that explain a failed boot, else the console's last lines."""
    lines = _read(path).splitlines()
    hits = [ln for ln in lines if _CONSOLE_TROUBLE.search(ln)]
    return "\n".join(hits[-n:] if hits else lines[-n:])


def rehearse(
    cluster: Cluster, nodes: tuple[Node, ...], *, out_dir: Path, timeout: float = 1200
) -> Report:
    """Boot `nodes` from their built images, wait for the cluster, run the checks. Always
    tears down (QEMU processes, hub, overlays); the logs and report stay in <out>/<cluster>/rehearsal/."""
    r = Rehearsal(cluster, nodes, out_dir, timeout)
    r.check_inputs()
    run_dir = Path(tempfile.mkdtemp(prefix="piimage-rehearse-", dir="/var/tmp"))
    report = Report(cluster.name, [n.hostname for n in nodes], "", logs=str(r.logs))
    try:
        r.prepare(run_dir)
        assert r.kernel is not None
        report.kernel = r.kernel.version
        with Hub() as hub:
            try:
                r.boot(hub)
                report.ready_seconds = r.wait_ready()
                report.checks = r.checks()
            finally:
                r.teardown()
        report.boot_seconds = {
            st.name: (round(st.boot_s, 1) if st.boot_s is not None else None)
            for st in r.states.values()
        }
        report.boot_cmdlines = {st.name: st.cmdlines for st in r.states.values()}
        if report.ready_seconds is not None:
            report.ready_seconds = round(report.ready_seconds, 1)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    write_atomic(r.logs / "report.json", json.dumps(report.to_json(), indent=2) + "\n")
    return report
