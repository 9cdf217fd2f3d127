"""The frozen model of a cluster that cluster.yaml describes: plain data, validated by
`rules`, with the facts every consumer asks (`cluster.head`, `cluster.job_nodes`, `admin.home`,
`node.facts`) computed here once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from ..accounts import home_dir
from ..profiles import Profile, RoleFacts
from .defaults import DEFAULT_CLUSTER_USER, DEFAULT_INTERFACE, DEFAULT_SHARED_PATH


@dataclass(frozen=True)
class Network:
    subnet: IPv4Network
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    interface: str = DEFAULT_INTERFACE

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


@dataclass(frozen=True)
class AdminUser:
    name: str
    # key texts ("ssh-ed25519 AAAA… comment"); files named in cluster.yaml are read at load
    ssh_authorized_keys: tuple[str, ...]
    password_hash: str | None = field(default=None, repr=False)  # kept out of logs and tracebacks

    @property
    def home(self) -> str:
        return home_dir(self.name)


@dataclass(frozen=True)
class Hardware:
    model: str
    cpus: int
    memory_mb: int  # SLURM RealMemory
    poe_hat: str | None = None


@dataclass(frozen=True)
class Node:
    hostname: str
    role: str
    ip: IPv4Address
    hardware: Hardware  # the node's own model if it overrides the cluster's, else the cluster's
    runs_jobs: bool = False  # a SLURM compute node (always for a role whose profile has slurmd)
    # what the node does, from its effective profile (profiles.effective): set by the rules
    facts: RoleFacts = field(default_factory=RoleFacts)


@dataclass(frozen=True)
class AptSettings:
    mirror: str | None = None  # Debian's main archive (deb.debian.org/debian)
    proxy: str | None = None
    security_mirror: str | None = None  # Debian's security archive (…/debian-security)
    raspberrypi_mirror: str | None = None  # Raspberry Pi's archive (archive.raspberrypi.com)

    def mirrors(self) -> dict[str, str]:
        """The archives the build points elsewhere, by their cluster.yaml key."""
        keys = ("mirror", "security_mirror", "raspberrypi_mirror")
        return {k: getattr(self, k) for k in keys if getattr(self, k)}


@dataclass(frozen=True)
class SharedStorage:
    path: str = DEFAULT_SHARED_PATH
    device_uuid: str | None = None


@dataclass(frozen=True)
class ClusterUser:
    name: str = DEFAULT_CLUSTER_USER[0]
    uid: int = DEFAULT_CLUSTER_USER[1]
    shared_path: str = DEFAULT_SHARED_PATH  # the cluster's shared directory (SharedStorage.path)

    @property
    def home(self) -> str:
        """On the shared directory: a job script, its input and its output are the same files
        on every node, and so are the cluster's SSH keys."""
        return f"{self.shared_path}/home/{self.name}"


@dataclass(frozen=True)
class Cluster:
    name: str
    base: str
    base_sha256: str | None
    network: Network
    admin: AdminUser
    timezone: str
    hardware: Hardware
    nodes: tuple[Node, ...]
    secrets_dir: Path  # absolute
    base_dir: Path  # what relative paths in the inventory are relative to
    source: Path | None = None  # the cluster.yaml read, None for the built-in default
    apt: AptSettings = AptSettings()
    shared: SharedStorage = SharedStorage()
    cluster_user: ClusterUser = ClusterUser()
    stages: tuple[Path, ...] = ()  # absolute, existing
    # job history: "jobcomp" (a completion log on the head) or "slurmdbd" (sacct, sreport)
    accounting: str = "jobcomp"
    # the node profiles the inventory was checked against, by role (the build uses the same)
    roles: Mapping[str, Profile] = field(default_factory=dict, compare=False, repr=False)

    def node(self, hostname: str) -> Node:
        """The node of that hostname (hostnames ignore case); KeyError if there is none."""
        for n in self.nodes:
            if n.hostname.lower() == hostname.lower():
                return n
        raise KeyError(hostname)

    def nodes_with_role(self, role: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == role)

    @property
    def head(self) -> Node | None:
        """The SLURM controller (also the NFS server and time source); the rules allow one."""
        return next((n for n in self.nodes if n.facts.slurmctld), None)

    @property
    def job_nodes(self) -> tuple[Node, ...]:
        """The nodes SLURM runs jobs on, in inventory order."""
        return tuple(n for n in self.nodes if n.facts.slurmd)
