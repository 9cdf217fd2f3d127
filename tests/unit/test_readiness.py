"""The rehearsal's wait for the cluster (rehearse/readiness.py) against fake nodes: it asks each
node only for what it has not yet seen, stops asking a compute node that has everything, and
returns when every compute node is idle."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

from piimage.rehearse import readiness
from piimage.rehearse.vm import NodeState


def _node(name, ip, **facts):
    f = dict(munge=True, slurmctld=False, nfs_server=False, slurmd=False, slurmdbd=False) | facts
    return SimpleNamespace(hostname=name, ip=ip, facts=SimpleNamespace(**f))


class FakeAgent:
    """A node that boots after `boot_after` probes; its services are up from then on, its
    share mounted one probe later, and sinfo (on the head) says idle after `idle_after`."""

    def __init__(self, name, boot_after=2, idle_after=6):
        self.name, self.boot_after, self.idle_after = name, boot_after, idle_after
        self.scripts: list[str] = []

    def call(self, script, timeout):
        self.scripts.append(script)
        n = len(self.scripts)
        booted = n > self.boot_after
        out = [f"state={'running' if booted else 'starting'}"]
        if "HOSTNAME" in script:
            out.append(f"hostname={self.name}")
        if m := re.search(r"systemctl is-active ([\w\- ]+?) 2>", script):
            out.append("units=" + " ".join("active" for _ in m.group(1).split()))
        if "ip -4" in script:
            out.append(f"addr=10.0.0.{ {'head': 10}.get(self.name, 11) }/24")
        if "findmnt" in script:
            out.append("mount=nfs4" if n > self.boot_after + 1 else "mount=")
        if "sinfo" in script:
            idle = n > self.idle_after
            out.append("sinfo=" + (" node01:idle" if idle else " node01:down"))
        return 0, "\n".join(out) + "\n"


def test_the_wait_asks_only_for_what_is_missing(monkeypatch):
    monkeypatch.setattr(readiness.time, "sleep", lambda s: None)
    head = _node("head", "10.0.0.10", slurmctld=True, nfs_server=True)
    node01 = _node("node01", "10.0.0.11", slurmd=True)
    states = {}
    for n in (head, node01):
        st = NodeState(
            node=n,
            image=None,
            agent=FakeAgent(n.hostname),
            overlay=None,
            console=None,
            memory_mb=1024,
        )
        st.started = time.monotonic()
        states[n.hostname] = st
    r = SimpleNamespace(
        t0=time.monotonic(),
        timeout=60,
        states=states,
        head=head,
        compute=[node01],
        cluster=SimpleNamespace(shared=SimpleNamespace(path="/clusterfs")),
        alive=lambda st: True,
        elapsed=lambda: 1.0,
    )
    assert readiness.wait_ready(r) == 1.0
    a_head, a_node = states["head"].agent, states["node01"].agent
    # until the boot is seen: the system state and nothing else
    assert all("is-active" not in s and "ip -4" not in s for s in a_node.scripts[:3])
    # after it: the role units in one call, the address, the mount
    assert "systemctl is-active munge slurmd 2>" in a_node.scripts[3]
    assert "ip -4" in a_node.scripts[3] and "findmnt" in a_node.scripts[3]
    # a compute node with everything seen is asked no more, while the head waits for sinfo
    assert len(a_node.scripts) == 4 and len(a_head.scripts) == 7
    assert {"booted", "address", "munge", "slurmd", "mount"} <= states["node01"].done
    assert "idle-node01" in states["head"].done
