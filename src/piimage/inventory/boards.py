"""Hardware models (boards) a node can be. Adding a board is one line here: the inventory
checks names against it, templates read the CPUs and RealMemory, and the rehearsal
(piboot.py) gives the board's VM its MemTotal and its family's device-tree bootargs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Board:
    family: str  # "pi4" | "pi5": which device tree (and so which bootargs) the firmware loads
    cpus: int
    # What SLURM is told (RealMemory, MB). It must stay at or below what slurmd detects on the
    # board (firmware and kernel keep their share), or the node drains.
    real_memory_mb: int
    # MemTotal as the board's kernel reports it (what slurmd -C detects): published figures
    # where there are some (../shared/REAL-PIOS.md §2.3), else estimated from the neighbours.
    mem_total_mb: int
    measured: bool


BOARDS: dict[str, Board] = {
    "pi4-1gb": Board("pi4", 4, 800, 870, False),
    "pi4-2gb": Board("pi4", 4, 1800, 1853, True),
    "pi4-4gb": Board("pi4", 4, 3700, 3789, True),
    "pi4-8gb": Board("pi4", 4, 7600, 7807, True),
    "pi5-2gb": Board("pi5", 4, 1800, 1900, False),
    "pi5-4gb": Board("pi5", 4, 3700, 3950, False),
    "pi5-8gb": Board("pi5", 4, 7600, 8030, True),
    "pi5-16gb": Board("pi5", 4, 15600, 16100, False),
}
# (CPUs, RealMemory) by model, as the inventory reads them.
HARDWARE_MODELS: dict[str, tuple[int, int]] = {m: (b.cpus, b.real_memory_mb) for m, b in BOARDS.items()}
POE_HATS = ("rpi-poe", "rpi-poe-plus")
