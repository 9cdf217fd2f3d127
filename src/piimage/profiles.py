"""Roles: `node-profiles/<role>.yaml` — the packages a role installs, the services it
enables or disables, the root filesystem headroom for its packages. A user adds a role by
putting `<role>.yaml` in a `node-profiles/` folder beside their cluster.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from . import yamlloc
from .errors import UserError

PROFILE_KEYS = {"description", "packages", "services", "headroom_mb", "stages"}
SERVICE_KEYS = {"enable", "disable"}
PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(?:[:=][A-Za-z0-9.+~:-]+)?$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9-]*$")


@dataclass(frozen=True)
class Profile:
    role: str
    path: Path
    description: str
    packages: tuple[str, ...]
    enable: tuple[str, ...]
    disable: tuple[str, ...]
    headroom_mb: int


def load_profile(path: Path) -> Profile:
    role = path.stem
    where = str(path)
    ck = yamlloc.Checker(where, yamlloc.read(path.read_text(), where))
    if ck.doc.value is not None and not isinstance(ck.doc.value, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    if not ROLE_RE.match(role):
        ck.add((), f"role name '{role}' must be lower-case letters, digits and '-'")
    doc = ck.mapping(ck.doc.value, (), PROFILE_KEYS)
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
        raise UserError(f"{len(problems)} problem(s) in node profile {path.name}",
                        detail="\n".join(problems))
    return Profile(
        role=role,
        path=path,
        description=str(doc.get("description", "")),
        packages=tuple(packages),
        enable=tuple(str(s) for s in services.get("enable") or ()),
        disable=tuple(str(s) for s in services.get("disable") or ()),
        headroom_mb=headroom,
    )


def load_profiles(dirs: list[Path]) -> dict[str, Profile]:
    """Profiles from every existing directory; a later directory's role replaces ours."""
    out: dict[str, Profile] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                out[p.stem] = load_profile(p)
    return out
