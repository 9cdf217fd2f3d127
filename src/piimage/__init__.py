"""piimage: Raspberry Pi OS Lite → flashable SLURM/MPI cluster node images."""

__version__ = "0.1.0"
