"""The virtual machines: one `qemu-system-aarch64 -M virt` per node, booted from its overlay
(overlay.py) with Debian's arm64 kernel of the image's release (guestkernel.py), on the hub's
Ethernet (hub.py), its agent on a virtio-serial port (agent.py) and its serial console logged.
The Raspberry Pi parts of a power-on come from piboot.py."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import piboot
from ..errors import UserError
from ..guestkernel import GuestKernel
from ..inventory import Node
from ..log import log
from ..run import spawn, stop
from .agent import AGENT_PORT, Agent

MAX_REBOOTS = 3  # Raspberry Pi OS reboots once on a first boot (bookworm's init=firstboot)

# Console lines that explain a boot gone wrong (emergency mode, failed or timed-out units).
_CONSOLE_TROUBLE = re.compile(
    r"Timed out waiting for|Dependency failed for|Failed to (start|mount)|emergency mode|"
    r"\bFAILED\b|Kernel panic|Give root password|You are in emergency mode",
    re.IGNORECASE,
)


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


def _host_available_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 4096


def memory_mb(nodes: tuple[Node, ...]) -> dict[str, int]:
    """Each node's memory: its board's, scaled down when the host cannot spare that much."""
    want = {n.hostname: piboot.vm_memory_mb(n.hardware.model) for n in nodes}
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
    return want


def tcg_threading() -> str:
    """QEMU's TCG threading for the rehearsal's VMs: `multi` (a host thread per vCPU, QEMU's
    default) unless $PIIMAGE_REHEARSE_TCG_THREAD says `single` (one host thread per VM, its
    vCPUs taking turns). The VMs have the board's CPU count either way."""
    mode = os.environ.get("PIIMAGE_REHEARSE_TCG_THREAD", "multi")
    if mode not in ("multi", "single"):
        raise UserError(f"PIIMAGE_REHEARSE_TCG_THREAD={mode!r}: must be 'multi' or 'single'")
    return mode


def qemu_command(st: NodeState, kernel: GuestKernel, hub_port: int, cmdline: str) -> list[str]:
    """One power-on of a node. The Raspberry Pi parts (command line, memory, clock, card
    size) come from piboot.py; QEMU exits when the guest reboots (-no-reboot), and the
    rehearsal powers it on again with the card's cmdline.txt read anew, as a Pi's
    firmware would."""
    cpus = st.node.hardware.cpus
    mac = f"52:54:00:5e:{st.index // 256:02x}:{st.index % 256:02x}"
    return [
        "qemu-system-aarch64",
        "-M",
        "virt",
        "-cpu",
        piboot.CPU,
        "-smp",
        str(cpus),
        "-m",
        str(st.memory_mb),
        "-accel",
        f"tcg,thread={tcg_threading()}",
        *piboot.RTC_ARGS,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel.vmlinuz),
        "-initrd",
        str(kernel.initrd),
        "-append",
        cmdline,
        "-drive",
        f"file={st.overlay},format=qcow2,if=none,id=root,cache=unsafe",
        "-device",
        "virtio-blk-pci,drive=root",
        "-drive",
        f"file={kernel.modules_disk},format=raw,if=none,id=mods,readonly=on",
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


def power_on(st: NodeState, kernel: GuestKernel, hub_port: int, run_dir: Path) -> None:
    cmdline = piboot.kernel_cmdline(
        st.node.hardware.model, piboot.card_cmdline_txt(st.overlay, run_dir)
    )
    st.cmdlines.append(cmdline)
    # the report shows the Pi kernel's line; Debian's kernel gets what that line means
    st.proc = spawn(
        qemu_command(st, kernel, hub_port, piboot.for_debian_kernel(cmdline)),
        what=f"booting {st.name}",
    )


def alive(
    st: NodeState, power_on: Callable[[NodeState], None], elapsed: Callable[[], float]
) -> bool:
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
        power_on(st)
        st.agent.connect(timeout=10)
        log.info(
            "%s: rebooted (%.0f s); powered on again: %s",
            st.name,
            elapsed(),
            st.cmdlines[-1],
        )
        return True
    log.info("%s: %s", st.name, st.failed)
    return False


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


def stop_all(states: Iterable[NodeState]) -> None:
    for st in states:
        st.agent.close()
        if st.proc is not None:
            stop(st.proc)
