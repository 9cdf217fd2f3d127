"""What each node's throw-away overlay gets: a copy-on-write qcow2 over its built image (the
flashable `.img` is never written), with the agent (agent.py), its unit, and systemd's and
NetworkManager's waits raised for emulation. Nothing here is ever part of a flashable image."""

from __future__ import annotations

import io
import re
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import disk, piboot
from ..errors import BuildError, UserError
from .agent import AGENT_PATH, AGENT_PORT, AGENT_SCRIPT, AGENT_UNIT

if TYPE_CHECKING:
    from .vm import NodeState

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


def create(image: Path, overlay: Path, hostname: str) -> None:
    """A qcow2 overlay with `image` as its backing file."""
    # the card is larger than the image, as the SD card a user flashes is
    disk.overlay(
        image,
        overlay,
        size=max(piboot.CARD_BYTES, image.stat().st_size),
        what=f"qemu-img create (overlay for {hostname})",
    )


def install(states: Iterable[NodeState]) -> str:
    """Put what only the rehearsal adds into every node's overlay; the images' one release."""
    from ..image import GuestSession

    states = list(states)
    tar = _overlay_tar()
    suites = set()
    with GuestSession([s.overlay for s in states]) as gs:
        for disk, st in zip(gs.disks(), states):
            disk.mount()
            osr = disk.read_text("/etc/os-release")
            m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", osr, re.MULTILINE)
            if not m:
                raise BuildError(f"{st.image}: /etc/os-release names no release (VERSION_CODENAME)")
            suites.add(m.group(1))
            disk.tar_in(tar)
            disk.umount()
    if len(suites) != 1:
        raise UserError(
            f"the images are of different releases ({', '.join(sorted(suites))}); "
            "rebuild them from one base"
        )
    return suites.pop()
