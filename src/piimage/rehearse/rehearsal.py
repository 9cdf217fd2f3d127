"""The rehearsal itself: the inputs checked, each node's overlay and VM prepared, the cluster
booted on the hub, waited for (readiness.py) and checked (checks.py), and everything torn down
again; `rehearse()` is what `piimage rehearse` calls."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

from ..errors import PiimageError, UserError
from ..fsutil import write_atomic
from ..guestkernel import GuestKernel, guest_kernel
from ..inventory import Cluster, Node
from ..log import log
from ..run import require_tools
from . import overlay, readiness, vm
from .agent import Agent, AgentTimeout
from .checks import Context, Target, Unreachable, run_checks
from .hub import Hub
from .report import Check, Report
from .vm import NodeState

RUN_ROOT = Path("/var/tmp")  # overlays are GBs: not a tmpfs /tmp
RUN_PREFIX = "piimage-rehearse-"  # then the pid of the piimage that owns it


def clean_stale_runs(root: Path = RUN_ROOT) -> None:
    """Run directories (overlays, sockets) of rehearsals killed outright (SIGKILL, the OOM
    killer, a closed terminal's hang-up): their piimage is gone, so they are removed, and a
    QEMU process still using one is ended first (spawn() ties every VM to its piimage's life,
    so there should be none)."""
    for d in root.glob(RUN_PREFIX + "*"):
        pid = d.name[len(RUN_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue  # an older name, or a rehearsal that is running
        for qemu in _processes_using(d):
            with contextlib.suppress(ProcessLookupError):
                os.kill(qemu, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)
        log.warning("removed %s, left by a rehearsal that was killed (pid %s)", d, pid)


def _processes_using(run_dir: Path) -> list[int]:
    """Processes whose command line names `run_dir` (a VM's overlay and sockets are in it)."""
    found = []
    needle = str(run_dir).encode() + b"/"
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if needle in (p / "cmdline").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return found


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
        require_tools(["qemu-system-aarch64", "qemu-img", "setpriv"])
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
        self.run_dir = run_dir
        self.logs.mkdir(parents=True, exist_ok=True)
        want = vm.memory_mb(self.nodes)
        for n in self.nodes:
            self.states[n.hostname] = self._new_state(n, want[n.hostname])
        self.suite = overlay.install(self.states.values())
        self.kernel = guest_kernel(self.suite)

    def _new_state(self, n: Node, memory_mb: int) -> NodeState:
        """A node's overlay of its image, its console log started afresh, its agent's socket;
        next on the virtual network."""
        img = (self.images / f"{n.hostname}.img").resolve()
        ov = self.run_dir / f"{n.hostname}.qcow2"
        overlay.create(img, ov, n.hostname)
        console = self.logs / f"{n.hostname}.console.log"
        console.unlink(missing_ok=True)
        return NodeState(
            n,
            img,
            ov,
            console,
            Agent(self.run_dir / f"{n.hostname}.agent"),
            memory_mb,
            index=len(self.states) + 1,
        )

    def join(self, cluster: Cluster, node: Node, timeout: float) -> tuple[bool, str]:
        """Boot `node` (in `cluster`, the inventory as it is now) into the running cluster, as a
        newly flashed card is powered on beside the others: (it is up, what came of it).
        Raises UserError for a node that cannot join (no image, another release, running)."""
        if node.hostname in self.states:
            raise UserError(f"{node.hostname} is already part of the rehearsal")
        img = self.images / f"{node.hostname}.img"
        if not img.is_file():
            raise UserError(
                f"no built image for {node.hostname} in {self.images}/",
                hint=f"build it first: piimage build --hostname {node.hostname}",
            )
        st = self._new_state(node, vm.memory_mb((node,))[node.hostname])
        suite = overlay.install([st])
        if suite != self.suite:
            st.overlay.unlink(missing_ok=True)
            raise UserError(f"{node.hostname}'s image is {suite}, the cluster runs {self.suite}")
        self.states[node.hostname] = st
        self.cluster = cluster
        self.nodes = (*self.nodes, node)
        if node.facts.slurmd:
            self.compute.append(node)
        self._power_on(st)
        st.started = time.monotonic()
        log.info("%s: joining (%d MiB): %s", st.name, st.memory_mb, st.cmdlines[-1])
        st.agent.connect(timeout=10)
        if readiness.wait_node(self, st, timeout):
            return True, f"{node.hostname} booted in {st.boot_s:.0f} s and is up"
        why = st.failed or f"not up in {timeout:.0f} s"
        return False, f"{node.hostname} did not come up: {why}; see {st.console}"

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
        assert self.kernel is not None
        vm.power_on(st, self.kernel, self.hub_port, self.run_dir)

    def alive(self, st: NodeState) -> bool:
        return vm.alive(st, self._power_on, self.elapsed)

    def wait_ready(self) -> float | None:
        return readiness.wait_ready(self)

    def teardown(self) -> None:
        vm.stop_all(self.states.values())

    # -- checks -----------------------------------------------------------------------------------
    def call(
        self, st: Target, script: str, timeout: float = 300, *, diagnose: bool = False
    ) -> tuple[int, str]:
        """checks.Call, through the node's agent."""
        assert isinstance(st, NodeState)
        if diagnose:
            try:
                return st.agent.call(script, timeout)
            except (AgentTimeout, OSError, AssertionError) as e:
                raise Unreachable(str(e)) from e
        if st.failed:
            return 255, st.failed
        try:
            return st.agent.call(script, timeout=timeout)
        except AgentTimeout as e:
            return 255, f"{st.name}: {e}"

    def checks(self) -> list[Check]:
        assert self.head is not None
        nodes = list(self.states.values())
        ctx = Context(
            self.cluster,
            nodes,
            self.states[self.head.hostname],
            self.compute,
            self.timeout,
            self.call,
        )
        return run_checks(ctx)


def _hold(r: Rehearsal, hub: Hub, results: list[Check]) -> None:
    """Keep the cluster running after its checks, reachable from a laptop namespace on its
    network, until Ctrl-C or SIGTERM; where that namespace is goes to <logs>/laptop.json."""
    from .netns import Laptop

    failed = [f"{c.node} {c.name}" for c in results if not c.ok]
    log.info(
        "checks done: %d passed, %d failed%s",
        len(results) - len(failed),
        len(failed),
        f" ({', '.join(failed)})" if failed else "",
    )
    info = r.logs / "laptop.json"
    with Laptop(r.cluster, hub.port) as lap:
        write_atomic(
            info,
            json.dumps({"netns": lap.name, "address": str(lap.address), "pid": os.getpid()}) + "\n",
        )
        log.info(
            "holding the cluster: reach it with  ip netns exec %s ssh %s@%s  "
            "(the laptop side is %s; Ctrl-C ends the rehearsal)",
            lap.name,
            r.cluster.admin.name,
            r.head.ip if r.head else "",
            lap.address,
        )
        try:
            while True:
                time.sleep(1)
                _serve_joins(r)
        except KeyboardInterrupt:
            log.info("ending the held rehearsal")
        finally:
            info.unlink(missing_ok=True)


JOIN_REQUEST = "join-request.json"


def _serve_joins(r: Rehearsal) -> None:
    """A `rehearse --join` waiting (its request in the logs folder): boot its nodes here, in
    the main thread (QEMU dies with the thread that started it), and answer beside it."""
    req_path = r.logs / JOIN_REQUEST
    try:
        req = json.loads(req_path.read_text())
    except (OSError, ValueError):
        return
    req_path.unlink(missing_ok=True)
    from .. import inventory as inv

    answer: dict = {"nodes": {}}
    try:
        cluster = inv.load(Path(req["inventory"]))
        nodes = inv.select_nodes(cluster, names=list(req["nodes"]), all_nodes=False)
        for n in nodes:
            ok, summary = r.join(cluster, n, float(req.get("timeout", 1200)))
            answer["nodes"][n.hostname] = {"ok": ok, "summary": summary}
    except PiimageError as e:
        answer["error"] = e.message
    write_atomic(r.logs / f"join-{req.get('token', 'x')}.json", json.dumps(answer) + "\n")


def join(
    cluster: Cluster, names: list[str], *, out_dir: Path, inventory: Path, timeout: float
) -> dict:
    """Ask the held rehearsal of `cluster` (rehearse --hold, same --out) to boot `names`; its
    answer: {"nodes": {name: {"ok", "summary"}}, "error"?}."""
    import uuid

    logs = out_dir.absolute() / cluster.name / "rehearsal"
    try:
        held = json.loads((logs / "laptop.json").read_text())
    except (OSError, ValueError):
        held = None
    if not held or not Path(f"/proc/{held['pid']}").exists():
        raise UserError(
            f"no held rehearsal of {cluster.name} in {logs.parent}/",
            hint="start one first: piimage rehearse --hold (with the same --out)",
        )
    token = uuid.uuid4().hex[:12]
    answer_path = logs / f"join-{token}.json"
    request = {
        "inventory": str(inventory.absolute()),
        "nodes": names,
        "timeout": timeout,
        "token": token,
    }
    write_atomic(logs / JOIN_REQUEST, json.dumps(request) + "\n")
    deadline = time.monotonic() + timeout + 300
    try:
        while time.monotonic() < deadline:
            if answer_path.exists():
                return json.loads(answer_path.read_text())
            if not Path(f"/proc/{held['pid']}").exists():
                raise UserError("the held rehearsal ended before it answered")
            time.sleep(1)
        raise UserError(f"the held rehearsal did not answer in {timeout + 300:.0f} s")
    finally:
        answer_path.unlink(missing_ok=True)


def rehearse(
    cluster: Cluster,
    nodes: tuple[Node, ...],
    *,
    out_dir: Path,
    timeout: float = 1200,
    hold: bool = False,
) -> Report:
    """Boot `nodes` from their built images, wait for the cluster, run the checks (with hold:
    then keep it running, reachable from a laptop namespace, until interrupted). Always
    tears down (QEMU processes, hub, overlays); the logs and report stay in <out>/<cluster>/rehearsal/."""
    r = Rehearsal(cluster, nodes, out_dir, timeout)
    r.check_inputs()
    clean_stale_runs()
    run_dir = Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-", dir=RUN_ROOT))
    # whose this is, for anyone who finds it (it is removed when the rehearsal ends)
    (run_dir / "images").write_text(f"{r.images}\n")
    report = Report(cluster.name, [n.hostname for n in nodes], "", logs=str(r.logs))
    try:
        r.prepare(run_dir)
        assert r.kernel is not None
        report.kernel = r.kernel.version
        with Hub() as hub:
            try:
                r.boot(hub)
                report.ready_seconds = r.wait_ready()
                log.info("running the checks (%.0f s after power-on)", r.elapsed())
                report.checks = r.checks()
                if hold:
                    _hold(r, hub, report.checks)
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
