"""Hardware models (boards) a node can be: CPUs and the RealMemory SLURM is told. Adding a
board is one line here; the inventory checks names against it and templates read the numbers."""

from __future__ import annotations

# Hardware models: CPUs and the RealMemory SLURM is told (MB). It must stay at or below what
# slurmd detects on the board (firmware and kernel keep their share), or the node drains.
HARDWARE_MODELS: dict[str, tuple[int, int]] = {
    "pi4-1gb": (4, 800),
    "pi4-2gb": (4, 1800),
    "pi4-4gb": (4, 3700),
    "pi4-8gb": (4, 7600),
    "pi5-2gb": (4, 1800),
    "pi5-4gb": (4, 3700),
    "pi5-8gb": (4, 7600),
    "pi5-16gb": (4, 15600),
}
POE_HATS = ("rpi-poe", "rpi-poe-plus")
