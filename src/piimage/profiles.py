"""Roles: `node-profiles/<role>.yaml` — the packages a role installs, the services it
enables or disables, the root filesystem headroom for its packages. A user adds a role by
putting `<role>.yaml` in a `node-profiles/` folder beside their cluster.yaml."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .stages import _unknown

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
    problems: list[str] = []
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    if not ROLE_RE.match(role):
        problems.append(f"{path}: role name '{role}' must be lower-case letters, digits and '-'")
    _unknown(doc, PROFILE_KEYS, str(path), problems)
    packages = doc.get("packages") or []
    if not isinstance(packages, list):
        problems.append(f"{path}: packages: expected a list")
        packages = []
    for i, p in enumerate(packages):
        if not isinstance(p, str) or not PACKAGE_RE.match(p):
            problems.append(f"{path}: packages[{i}]: {p!r} is not a Debian package name")
    services = doc.get("services") or {}
    if not isinstance(services, dict):
        problems.append(f"{path}: services: expected a mapping with enable/disable")
        services = {}
    _unknown(services, SERVICE_KEYS, f"{path}: services", problems)
    headroom = doc.get("headroom_mb", 1024)
    if not isinstance(headroom, int) or isinstance(headroom, bool) or headroom < 0:
        problems.append(f"{path}: headroom_mb: expected a whole number of MiB ≥ 0, got {headroom!r}")
        headroom = 0
    if problems:
        raise UserError(f"{len(problems)} problem(s) in node profile {path.name}", detail="\n".join(problems))
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
