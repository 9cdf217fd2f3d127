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

from .agent import AGENT_PATH, AGENT_PORT, AGENT_SCRIPT, AGENT_UNIT, Agent, AgentTimeout
from .checks import (
    CHECKS,
    CLOCK_SLACK_S,
    MPI_PROGRAM,
    MUNGE_TTL_S,
    OUTPUT_TAIL,
    Context,
    Unreachable,
    _unmunge_error,
    run_checks,
)
from .hub import Hub
from .overlay import (
    AGENT_SERVICE,
    EMULATION_TIMEOUT_S,
    NM_WAIT,
    NM_WAIT_PATH,
    SYSTEMD_TIMEOUTS,
    SYSTEMD_TIMEOUTS_PATH,
    _overlay_tar,
)
from .readiness import _failed_units_text, _idle_nodes
from .rehearsal import Rehearsal, join, rehearse
from .report import Check, RehearsalFailed, Report
from .vm import MAX_REBOOTS, NodeState, _console_trouble

__all__ = [
    "AGENT_PATH",
    "AGENT_PORT",
    "AGENT_SCRIPT",
    "AGENT_SERVICE",
    "AGENT_UNIT",
    "CHECKS",
    "CLOCK_SLACK_S",
    "EMULATION_TIMEOUT_S",
    "MAX_REBOOTS",
    "MPI_PROGRAM",
    "MUNGE_TTL_S",
    "NM_WAIT",
    "NM_WAIT_PATH",
    "OUTPUT_TAIL",
    "SYSTEMD_TIMEOUTS",
    "SYSTEMD_TIMEOUTS_PATH",
    "Agent",
    "AgentTimeout",
    "Check",
    "Context",
    "Hub",
    "NodeState",
    "Rehearsal",
    "RehearsalFailed",
    "Report",
    "Unreachable",
    "_console_trouble",
    "_failed_units_text",
    "_idle_nodes",
    "_overlay_tar",
    "_unmunge_error",
    "join",
    "rehearse",
    "run_checks",
]
