"""The rehearsal's result: one Check per check and node, and the report that `piimage rehearse`
prints (text or --json) and writes to <out>/<cluster>/rehearsal/report.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import PiimageError


class RehearsalFailed(PiimageError):
    """At least one check failed (the report says which)."""

    exit_code = 1


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
    # "rehearsal" (virtual cluster) or "verify" (the real boards: boot_seconds is their uptime)
    kind: str = "rehearsal"

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def text(self) -> str:
        real = self.kind != "rehearsal"
        lines = [
            f"{self.kind} of {self.cluster}: {', '.join(self.nodes)} "
            f"(kernel {self.kernel or 'unknown'})"
        ]
        for n, s in self.boot_seconds.items():
            if s is None:
                lines.append(f"  {n:<12} {'does not answer' if real else 'did not boot'}")
            else:
                lines.append(f"  {n:<12} {'up' if real else 'booted in'} {s:.0f} s")
        if not real:
            lines.append(
                f"  cluster ready after {self.ready_seconds:.0f} s"
                if self.ready_seconds is not None
                else "  cluster never became ready"
            )
        for c in self.checks:
            lines.append(f"  {'PASS' if c.ok else 'FAIL'}  {c.name:<9} {c.node:<12} {c.summary}")
            if not c.ok and c.output.strip():
                lines.extend("        | " + ln for ln in c.output.strip().splitlines()[-12:])
        lines.append(f"  {'report' if real else 'consoles and report'}: {self.logs}")
        lines.append(
            f"{self.kind} passed"
            if self.ok
            else f"{self.kind} FAILED: "
            + "; ".join(f"{c.node}: {c.name}" for c in self.checks if not c.ok)
        )
        return "\n".join(lines)
