"""The rehearsal's host-side parts that need no virtual machine: the initramfs archive, the
Ethernet hub, the agent protocol, the report, and input checks."""

from __future__ import annotations

import base64
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from piimage.errors import UserError
from piimage.guestkernel import newc_archive
from piimage.inventory import Hardware, Node
from piimage.profiles import RoleFacts
from piimage.rehearse import (
    Agent,
    AgentTimeout,
    Check,
    Hub,
    Rehearsal,
    Report,
    _console_trouble,
    _failed_units_text,
    _idle_nodes,
    _overlay_tar,
    _unmunge_error,
)


def test_newc_archive_reads_back_with_cpio(tmp_path):
    data = newc_archive(
        [
            ("bin", stat.S_IFDIR | 0o755, b""),
            ("bin/busybox", stat.S_IFREG | 0o755, b"\x7fELF" + b"x" * 1001),
            ("init", stat.S_IFREG | 0o755, b"#!/bin/busybox sh\n"),
        ]
    )
    assert len(data) % 4 == 0 and data.startswith(b"070701")
    listing = subprocess.run(
        ["cpio", "-itv"], input=data, capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[-1] for line in listing.splitlines()]
    assert names == ["bin", "bin/busybox", "init"]
    subprocess.run(["cpio", "-id", "--quiet"], input=data, cwd=tmp_path, check=True)
    assert (tmp_path / "bin" / "busybox").read_bytes() == b"\x7fELF" + b"x" * 1001
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _read_frame(s: socket.socket) -> bytes:
    s.settimeout(5)
    head = b""
    while len(head) < 4:
        head += s.recv(4 - len(head))
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return body


def test_hub_forwards_each_frame_to_every_other_port():
    with Hub() as hub:
        a, b, c = (socket.create_connection(("127.0.0.1", hub.port)) for _ in range(3))
        try:
            deadline = time.monotonic() + 5
            while hub.connected < 3 and time.monotonic() < deadline:  # all ports plugged in first
                time.sleep(0.01)
            for s in (a, b, c):
                s.sendall(_frame(b"hello"))
            for s in (a, b, c):
                assert [_read_frame(s), _read_frame(s)] == [b"hello", b"hello"]
            big = bytes(range(256)) * 6  # a full-size Ethernet frame, sent in two pieces
            msg = _frame(big)
            a.sendall(msg[:700])
            a.sendall(msg[700:])
            assert _read_frame(b) == big and _read_frame(c) == big
            a.setblocking(False)
            with pytest.raises(BlockingIOError):
                a.recv(1)  # the sender does not get its own frame back
        finally:
            for s in (a, b, c):
                s.close()
    assert hub.frames == 4


def _fake_agent(path: Path, answers: dict[str, tuple[int, str]], ready: threading.Event) -> None:
    """Speaks the guest side of the agent protocol over a unix socket, like QEMU's chardev."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    ready.set()
    conn, _ = srv.accept()
    f = conn.makefile("rb")
    for line in f:
        cid, b64 = line.decode().split()
        script = base64.b64decode(b64).decode()
        if script == "sleep":
            continue  # never answers
        rc, out = answers[script]
        conn.sendall(b"noise from a previous command\n")
        conn.sendall(f"R {cid} {rc} {base64.b64encode(out.encode()).decode()}\n".encode())
    conn.close()
    srv.close()


def test_agent_call_round_trip_and_timeout(tmp_path):
    path = tmp_path / "node.agent"
    ready = threading.Event()
    t = threading.Thread(
        target=_fake_agent,
        args=(path, {"hostname": (0, "node01\n"), "false": (1, "")}, ready),
        daemon=True,
    )
    t.start()
    ready.wait(5)
    agent = Agent(path)
    agent.connect(timeout=5)
    assert agent.call("hostname", timeout=5) == (0, "node01\n")
    assert agent.call("false", timeout=5) == (1, "")
    with pytest.raises(AgentTimeout):
        agent.call("sleep", timeout=0.5)
    agent.close()


def test_overlay_adds_only_the_agent_and_emulation_timeouts():
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(_overlay_tar())) as tar:
        members = {m.name: m for m in tar.getmembers()}
        timeouts = (
            tar.extractfile("etc/systemd/system.conf.d/90-piimage-rehearsal-timeouts.conf")
            .read()
            .decode()
        )
        unit = tar.extractfile("etc/systemd/system/piimage-rehearsal-agent.service").read().decode()
    assert set(members) == {
        "usr/local/sbin/piimage-rehearsal-agent",
        "etc/systemd/system/piimage-rehearsal-agent.service",
        "etc/systemd/system/sysinit.target.wants/piimage-rehearsal-agent.service",
        "etc/systemd/system.conf.d/90-piimage-rehearsal-timeouts.conf",
        "etc/systemd/system/NetworkManager-wait-online.service.d/90-piimage-rehearsal.conf",
    }
    assert members["usr/local/sbin/piimage-rehearsal-agent"].mode == 0o755
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    # systemd's 90 s device and start waits, raised for emulation only
    assert "[Manager]" in timeouts
    assert "DefaultDeviceTimeoutSec=600s" in timeouts and "DefaultTimeoutStartSec=600s" in timeouts
    # the agent keeps answering in emergency mode, to say why a node is there
    assert "IgnoreOnIsolate=yes" in unit


def test_failed_boot_is_described_from_units_and_console(tmp_path):
    console = tmp_path / "node01.console.log"
    console.write_text(
        "[  OK  ] Started foo\n"
        "[ TIME ] Timed out waiting for device dev-disk-by\\x2dpartuuid-1234\\x2d01.device\n"
        "[DEPEND] Dependency failed for boot-firmware.mount - /boot/firmware.\n"
        'You are in emergency mode. After logging in, type "journalctl -xb"\n'
        "[  OK  ] Reached target bar\n"
    )
    text = _console_trouble(console)
    assert (
        "Timed out waiting for device" in text
        and "Dependency failed for boot-firmware.mount" in text
    )
    assert "emergency mode" in text and "Started foo" not in text
    assert (
        _failed_units_text({"failed": "boot-firmware.mount local-fs.target "})
        == "failed units: boot-firmware.mount, local-fs.target"
    )
    assert _unmunge_error("unmunge: Error: Invalid credential\n") == "Invalid credential"
    assert _unmunge_error("STATUS:          Expired credential (15)\n") == "Expired credential (15)"


def test_sinfo_parsing():
    assert _idle_nodes("node01:idle node02:down* head:mixed node03:idle") == {"node01", "node03"}


def test_report_text_names_failing_node_and_check():
    r = Report(
        "lab",
        ["head", "node01"],
        "6.12.1-arm64",
        {"head": 50.0, "node01": None},
        None,
        [
            Check("boot", "head", True, "booted in 50 s"),
            Check(
                "munge",
                "node01",
                False,
                "node01 cannot decode a credential from head",
                "STATUS: Invalid",
            ),
        ],
        logs="/out/lab/rehearsal",
    )
    text = r.text()
    assert not r.ok
    assert "node01       did not boot" in text and "cluster never became ready" in text
    assert "FAIL  munge     node01" in text and "| STATUS: Invalid" in text
    assert text.endswith("rehearsal FAILED: node01: munge")
    assert r.to_json()["ok"] is False


class _Cluster:
    name = "lab"
    head = None


def _node(name: str, role: str, jobs: bool) -> Node:
    packages = ("slurmctld", "munge") if role == "head" else ("slurmd", "munge")
    return Node(
        name,
        role,
        IPv4Address("10.0.0.10"),
        Hardware("pi4-2gb", 4, 1800),
        jobs,
        facts=RoleFacts.of(packages + (("slurmd",) if jobs else ())),
    )


def test_inputs_are_checked_before_anything_starts(tmp_path):
    head, n1 = _node("head", "head", False), _node("node01", "compute", True)
    with pytest.raises(UserError, match="needs the head node"):
        Rehearsal(_Cluster(), (n1,), tmp_path, 60).check_inputs()
    with pytest.raises(UserError, match="at least one node that runs jobs"):
        Rehearsal(_Cluster(), (head,), tmp_path, 60).check_inputs()
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "head.img").write_bytes(b"")
    with pytest.raises(UserError, match=r"no built image for node01 in .*/lab/") as e:
        Rehearsal(_Cluster(), (head, n1), tmp_path, 60).check_inputs()
    assert "piimage build --all" in e.value.hint


def test_tcg_threading_is_multi_unless_asked(monkeypatch):
    from piimage.errors import UserError
    from piimage.rehearse import vm

    monkeypatch.delenv("PIIMAGE_REHEARSE_TCG_THREAD", raising=False)
    assert vm.tcg_threading() == "multi"
    monkeypatch.setenv("PIIMAGE_REHEARSE_TCG_THREAD", "single")
    assert vm.tcg_threading() == "single"
    monkeypatch.setenv("PIIMAGE_REHEARSE_TCG_THREAD", "many")
    with pytest.raises(UserError, match="PIIMAGE_REHEARSE_TCG_THREAD='many'"):
        vm.tcg_threading()


def test_stale_run_directories_are_removed_and_live_ones_kept(tmp_path):
    from piimage.rehearse.rehearsal import RUN_PREFIX, clean_stale_runs

    dead = 2**22 + 7  # above any pid_max: no such process
    stale = tmp_path / f"{RUN_PREFIX}{dead}-abc"
    live = tmp_path / f"{RUN_PREFIX}{os.getpid()}-def"
    older = tmp_path / f"{RUN_PREFIX}k2j4h"  # a name from before the pid was in it
    for d in (stale, live, older):
        d.mkdir()
        (d / "node01.qcow2").write_bytes(b"overlay")
    clean_stale_runs(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, older.name])


def test_a_spawned_machine_dies_with_piimage(tmp_path):
    """SIGKILL to the process that spawn()ed a VM ends the VM too (its parent-death signal)."""
    pidfile = tmp_path / "child"
    script = (
        "import sys, time\n"
        "from piimage.run import spawn\n"
        "p = spawn(['sleep', '300'], what='a machine')\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    # the pid is setpriv's until it has set the signal and exec'd the machine: on a busy host
    # that can come after spawn() returns, so wait for the exec (killing sooner tests nothing)
    cmdline = Path(f"/proc/{child}/cmdline")
    while not cmdline.read_bytes().startswith(b"sleep\0") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cmdline.read_bytes().startswith(b"sleep\0")
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break  # gone
        if state == "Z":  # killed, waiting for init to reap it
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"pid {child} still runs after its piimage was killed")


# ---------------------------------------------------------------------------------------------
# rehearse --join: the request and answer files between the asking piimage and the holder
# ---------------------------------------------------------------------------------------------
def test_join_without_a_held_rehearsal_says_how_to_start_one(tmp_path):
    from types import SimpleNamespace as NS

    from piimage.rehearse import join

    with pytest.raises(UserError, match="no held rehearsal of lab") as e:
        join(NS(name="lab"), ["node04"], out_dir=tmp_path, inventory=tmp_path / "c.yaml", timeout=5)
    assert "rehearse --hold" in e.value.hint


def test_a_join_request_is_served_in_the_holders_loop_and_answered(tmp_path, monkeypatch):
    """The asking side writes join-request.json and waits; the holder's loop boots each node
    (here a fake join) and writes join-<token>.json, which the asker reads and removes."""
    import json
    from types import SimpleNamespace as NS

    from piimage.rehearse import join, rehearsal

    logs = tmp_path / "out" / "lab" / "rehearsal"
    logs.mkdir(parents=True)
    (logs / "laptop.json").write_text(json.dumps({"netns": "x", "pid": os.getpid()}))
    joined = []

    class Holder:
        def __init__(self):
            self.logs = logs

        def join(self, cluster, node, timeout):
            joined.append((node.hostname, timeout))
            return True, f"{node.hostname} booted in 99 s and is up"

    inventory = tmp_path / "cluster.yaml"
    monkeypatch.setattr("piimage.inventory.load", lambda path: NS(name="lab", source=path))
    monkeypatch.setattr(
        "piimage.inventory.select_nodes",
        lambda cluster, names, all_nodes: tuple(NS(hostname=n) for n in names),
    )
    holder = Holder()
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            rehearsal._serve_joins(holder)
            time.sleep(0.1)

    t = threading.Thread(target=loop)
    t.start()
    try:
        answer = join(
            NS(name="lab"), ["node04"], out_dir=tmp_path / "out", inventory=inventory, timeout=30
        )
    finally:
        stop.set()
        t.join()
    assert answer == {
        "nodes": {"node04": {"ok": True, "summary": "node04 booted in 99 s and is up"}}
    }
    assert joined == [("node04", 30.0)]
    assert sorted(p.name for p in logs.iterdir()) == ["laptop.json"]  # request and answer gone
