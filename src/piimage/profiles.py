"""Roles: `node-profiles/<role>.yaml` — the packages a role installs, the services it
enables or disables, the root filesystem headroom for its packages. A user adds a role by
putting `<role>.yaml` in a `node-profiles/` folder beside their cluster.yaml.

Also what a role *does* (`RoleFacts`: SLURM controller, runs jobs, NFS server …), read from
its packages here and nowhere else; the inventory's rules, the stages' `when:` expressions,
the build and the rehearsal ask the facts, never the package list."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import yamlloc
from .errors import UserError
from .settings import data_dir

PROFILE_KEYS = {"description", "packages", "services", "headroom_mb"}
SERVICE_KEYS = {"enable", "disable"}
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:[:=][A-Za-z0-9.+~:-]+)?$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class RoleFacts:
    """What a node does in the cluster, from the packages of its (effective) profile."""

    slurmctld: bool = False  # the SLURM controller: the head
    slurmd: bool = False  # runs jobs (a NodeName line in slurm.conf)
    slurm: bool = False  # any part of SLURM: gets slurm.conf and cgroup.conf
    munge: bool = False  # gets the cluster's munge key
    nfs_server: bool = False  # exports the shared directory
    nfs_client: bool = False  # mounts the head's shared directory
    time_server: bool = False  # serves time to the cluster (chrony)
    mpi: bool = False  # Open MPI: gets the default hostfile
    slurmdbd: bool = False  # the accounting database (slurmdbd and MariaDB): gets slurmdbd.conf

    @classmethod
    def of(cls, packages: tuple[str, ...] | list[str]) -> RoleFacts:
        p = set(packages)
        return cls(
            slurmctld="slurmctld" in p,
            slurmd="slurmd" in p,
            slurm=bool(p & {"slurmctld", "slurmd", "slurm-client"}),
            munge="munge" in p,
            nfs_server="nfs-kernel-server" in p,
            # nfs-kernel-server pulls nfs-common in: a server is not also a client
            nfs_client="nfs-common" in p and "nfs-kernel-server" not in p,
            time_server="chrony" in p,
            mpi="openmpi-bin" in p,
            slurmdbd="slurmdbd" in p,
        )

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    role: str
    path: Path
    description: str
    packages: tuple[str, ...]
    enable: tuple[str, ...]
    disable: tuple[str, ...]
    headroom_mb: int

    @property
    def facts(self) -> RoleFacts:
        return RoleFacts.of(self.packages)


# what `accounting: slurmdbd` adds to the controller's profile (Debian's own sacct test installs
# the same: slurm-wlm debian/tests/control); mariadb-server pulls in its client
ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
ACCOUNTING_SERVICES = ("mariadb.service", "slurmdbd.service")


def effective(profile: Profile, runs_jobs: bool, accounting: str = "jobcomp") -> Profile:
    """The profile a node is built with: a node that runs jobs (a head with runs_jobs: true)
    also gets slurmd and its service when its role's profile has none; the controller of a
    cluster with `accounting: slurmdbd` also gets slurmdbd and MariaDB."""
    if runs_jobs and not profile.facts.slurmd:
        profile = _with(profile, ("slurmd",), ("slurmd.service",))
    if accounting == "slurmdbd" and profile.facts.slurmctld:
        profile = _with(profile, ACCOUNTING_PACKAGES, ACCOUNTING_SERVICES)
    return profile


def _with(profile: Profile, packages: tuple[str, ...], services: tuple[str, ...]) -> Profile:
    return replace(
        profile,
        packages=tuple(dict.fromkeys([*profile.packages, *packages])),
        enable=tuple(dict.fromkeys([*profile.enable, *services])),
        disable=tuple(u for u in profile.disable if u not in services),
    )


def load_profile(path: Path) -> Profile:
    role = path.stem
    where = str(path)
    ck = yamlloc.Checker(where, yamlloc.read_file(path, where, "node profile"))
    if ck.doc.value is not None and not isinstance(ck.doc.value, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    if not ROLE_RE.match(role):
        ck.add((), f"role name '{role}' must be lower-case letters, digits and '-'")
    top = ck.doc.value if isinstance(ck.doc.value, dict) else {}
    if "stages" in top:
        # a stage says which roles it serves (`roles:` in its stage.yaml); one way, not two
        ck.add(
            ("stages",),
            "not supported in a node profile; list the role under `roles:` in "
            "the stage's stage.yaml instead",
        )
    doc = ck.mapping({k: v for k, v in top.items() if k != "stages"}, (), PROFILE_KEYS)
    packages = doc.get("packages") or []
    if not isinstance(packages, list):
        ck.add(("packages",), "expected a list")
        packages = []
    for i, p in enumerate(packages):
        if not isinstance(p, str) or not PACKAGE_RE.match(p):
            ck.add(("packages", i), f"{p!r} is not a Debian package name")
    services = doc.get("services") or {}
    if not isinstance(services, dict):
        ck.add(("services",), "expected a mapping with enable/disable")
        services = {}
    ck.mapping(services, ("services",), SERVICE_KEYS)
    headroom = doc.get("headroom_mb", 1024)
    if not isinstance(headroom, int) or isinstance(headroom, bool) or headroom < 0:
        ck.add(("headroom_mb",), f"expected a whole number of MiB ≥ 0, got {headroom!r}")
        headroom = 0
    if ck.problems:
        problems = ck.problems
        raise UserError(
            f"{len(problems)} problem(s) in node profile {path.name}", detail="\n".join(problems)
        )
    return Profile(
        role=role,
        path=path,
        description=str(doc.get("description", "")),
        packages=tuple(packages),
        enable=tuple(str(s) for s in services.get("enable") or ()),
        disable=tuple(str(s) for s in services.get("disable") or ()),
        headroom_mb=headroom,
    )


def profile_dirs(inventory_dir: Path | None) -> list[Path]:
    """Ours, then a `node-profiles/` folder beside the user's cluster.yaml (their own roles)."""
    dirs = [data_dir() / "node-profiles"]
    if inventory_dir is not None:
        dirs.append(inventory_dir / "node-profiles")
    return dirs


def load_profiles(dirs: list[Path]) -> dict[str, Profile]:
    """Profiles from every existing directory; a later directory's role replaces ours."""
    out: dict[str, Profile] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out[p.stem] = load_profile(p)
    return out
