"""Stages: `stages/NN-name/stage.yaml` + `files/` (+ `run-chroot.sh` for role scope).

A stage says what it writes into an image and for which roles. Role-scope stages run
arm64 code (packages, chroot script) and are cached in the role layer; node-scope stages
only write rendered files through libguestfs. This module loads and validates stages and
turns them into a plan of concrete files for one node — no image is touched here.

stage.yaml:
    scope: node | role
    roles: [all] | [head, compute, …]
    packages: [..]                 # role scope only
    files:
      - path: /etc/hostname        # Jinja allowed in path
        template: hostname.j2      # in files/; rendered with StrictUndefined
        # or  source: some.conf    # copied verbatim from files/
        # or  secret: munge.key    # bytes from the cluster's secrets (never logged)
        mode: "0644"
        owner: root                # user/group names, resolved in the image's /etc/passwd
        group: root
        when: "admin.ssh_authorized_keys"   # optional Jinja expression over render.node_context;
                                            # role facts: node.nfs_client, node.slurmd … (profiles.RoleFacts)
    links:
      - {path: /etc/localtime, target: "/usr/share/zoneinfo/{{ cluster.timezone }}"}
    remove: [/etc/ssh/ssh_host_*]  # globs removed before files are written
    enable: [ssh.service]          # systemd units to enable (wants symlinks from [Install])
    disable: [slurmd.service]      # systemd units to disable (their enablement symlinks removed)
    mask: [userconfig.service]     # systemd units to mask (-> /dev/null)
    dirs:
      - {path: /clusterfs, mode: "0755", owner: root, when: …}
    users:                         # system accounts created offline (same UID on every node)
      - {name: "{{ cluster_user.name }}", uid: "{{ cluster_user.uid }}", shell: /bin/bash}
    append:                        # lines ensured in an existing file, under a section if given
      - {path: /boot/firmware/config.txt, section: "[all]", lines: ["dtoverlay=rpi-poe"], when: …}

Every list above but `packages` is a stage action: a class in actions.ACTIONS, which says its
keys, how it renders and what the stamp writes for it (adding an action is one class there).
Every entry may have a `when:`; every text field is rendered with the node's context unless
marked static. The lists of names (remove, enable, disable, mask) take plain texts or
`{name: …, when: …}`.

Role-scope stages (the contract): they take `packages`, a `run-chroot.sh` and a `files/`
folder copied verbatim into the root (layers.py); there is no node at role level, so nothing
there is rendered. Any action key in a role-scope stage is an error naming the file and key.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import render, yamlloc
from .actions import ACTION_KEYS, ACTIONS, Action, NodePlan, Renderer
from .errors import UserError

STAGE_DIR_RE = re.compile(r"^\d\d-[a-z0-9][a-z0-9-]*$")
ROLE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")  # as a node profile's name (profiles.ROLE_RE)
__all__ = ["ACTIONS", "NodePlan", "Stage", "discover", "load_stage", "plan_node"]


STAGE_KEYS = {"scope", "roles", "packages", "description"} | ACTION_KEYS
ROLE_SCOPE_KEYS = STAGE_KEYS - ACTION_KEYS
ROLE_SCOPE_REFUSED = (
    f"role-scope stages take only {', '.join(sorted(ROLE_SCOPE_KEYS))}, "
    "run-chroot.sh and files/ (copied as they are); put it in a node-scope stage"
)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    name: str
    dir: Path
    scope: str
    roles: tuple[str, ...]
    description: str = ""
    packages: tuple[str, ...] = ()
    actions: tuple[Action, ...] = ()
    script: Path | None = None

    def applies_to(self, role: str) -> bool:
        return "all" in self.roles or role in self.roles


def _read_mode(ck: yamlloc.Checker, v: Any, p: tuple) -> int | None:
    if isinstance(v, int) and not isinstance(v, bool):
        # YAML reads 0644 as the octal int 420 (YAML 1.1) — accept it as written.
        return v
    if isinstance(v, str) and re.fullmatch(r"0?[0-7]{3,4}", v):
        return int(v, 8)
    ck.add(p, f'mode {v!r} is not an octal mode like "0644"')
    return None


def _read_text(ck: yamlloc.Checker, v: Any, p: tuple) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float, bool)):
        return ck.doc.raw.get(p, str(v))  # `uid: 1500`, `when: true`: as written
    ck.add(p, f"expected text, got {yamlloc.type_name(v)}")
    return None


def _read_texts(ck: yamlloc.Checker, v: Any, p: tuple) -> tuple[str, ...] | None:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list):
        ck.add(p, f"expected a list of texts, got {yamlloc.type_name(v)}")
        return None
    out = [_read_text(ck, x, p + (i,)) for i, x in enumerate(v)]
    return None if None in out else tuple(out)  # type: ignore[arg-type]


READERS = {"text": _read_text, "texts": _read_texts, "mode": _read_mode}


def _load_action(
    cls: type[Action], item: Any, path: tuple, ck: yamlloc.Checker, d: Path, label: str
) -> Action | None:
    if cls.scalar and not isinstance(item, (dict, list)):
        item = {cls.scalar: item}
        raw = ck.doc.raw.get(path)
        if raw is not None:
            ck.doc.raw[path + (cls.scalar,)] = raw
    required = cls.required()
    if isinstance(item, dict):
        ck.mapping(item, path, cls.allowed())
    if not isinstance(item, dict) or any(k not in item for k in required):
        ck.add(path, f"expected a mapping with {' and '.join(repr(k) for k in required)}")
        return None
    values: dict[str, Any] = {}
    for f in cls.yaml_fields():
        if f.name not in item or (item[f.name] is None and f.name not in required):
            continue
        value = READERS[f.metadata.get("read", "text")](ck, item[f.name], path + (f.name,))
        if value is None and f.name in required:
            return None  # reported; the entry cannot be checked further
        if value is not None:  # else reported, and the default stands in for the checks below
            values[f.name] = value
    action = cls(where=f"{label}:{ck.line(path)}: {yamlloc.fmt_path(path)}", **values)
    action.check(d, lambda sub, msg: ck.add(path + sub, msg))
    return action


def load_stage(d: Path) -> Stage:
    meta_path = d / "stage.yaml"
    where0 = str(meta_path)
    if not meta_path.exists() and not meta_path.is_symlink():
        raise UserError(f"{d}: stage directory has no stage.yaml")
    doc = yamlloc.read_file(meta_path, where0, "stage.yaml")
    ck = yamlloc.Checker(where0, doc)
    if doc.value is not None and not isinstance(doc.value, dict):
        raise UserError(f"{where0}: expected a mapping at the top level")
    meta = ck.mapping(doc.value, (), STAGE_KEYS)
    scope = meta.get("scope", "node")
    if scope not in ("node", "role"):
        ck.add(("scope",), f"{scope!r} must be 'node' or 'role'")
    roles = ck.text_list(meta, "roles", (), "a role name", "role names")
    for rp, role in roles or []:
        if role != "all" and not ROLE_NAME_RE.match(role):
            ck.add(rp, f"{role!r} is not a role name (lower-case letters, digits and '-'; or all)")
    packages = ck.text_list(meta, "packages", (), "a package name", "package names") or []
    label = f"{d.name}/stage.yaml"
    actions: list[Action] = []
    for cls in ACTIONS:
        items = meta.get(cls.key)
        if items is None:
            continue
        if scope == "role":
            ck.add((cls.key,), ROLE_SCOPE_REFUSED)
            continue
        if not isinstance(items, list):
            ck.add((cls.key,), f"expected a list, got {yamlloc.type_name(items)}")
            continue
        for i, item in enumerate(items):
            action = _load_action(cls, item, (cls.key, i), ck, d, label)
            if action is not None:
                actions.append(action)
    script = d / "run-chroot.sh"
    if script.exists() and scope != "role":
        ck.add((), "run-chroot.sh is only allowed in role-scope stages")
    if packages and scope != "role":
        ck.add(("packages",), "only role-scope stages install packages")
    if ck.problems:
        problems = ck.problems
        raise UserError(f"{len(problems)} problem(s) in stage {d.name}", detail="\n".join(problems))
    return Stage(
        name=d.name,
        dir=d,
        scope=scope,
        roles=tuple(r for _, r in roles) if roles is not None else ("all",),
        description=str(meta.get("description", "")),
        packages=tuple(p for _, p in packages),
        actions=tuple(actions),
        script=script if script.exists() else None,
    )


def discover(dirs: list[Path]) -> list[Stage]:
    """Stages from every directory, ordered by their NN prefix (a user's own stages
    interleave with ours by number; the same name in a later dir replaces ours)."""
    by_name: dict[str, Stage] = {}
    for base in dirs:
        if not base.is_dir():
            raise UserError(f"{base}: stages directory does not exist")
        for d in sorted(base.iterdir()):
            if d.is_dir() and STAGE_DIR_RE.match(d.name):
                by_name[d.name] = load_stage(d)
    return [by_name[k] for k in sorted(by_name)]


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------
def plan_node(
    stages: list[Stage],
    context: Mapping[str, Any],
    *,
    hostname: str,
    role: str,
    secrets: Mapping[str, bytes],
) -> NodePlan:
    """Render every action of the node-scope stages that apply to this node's role."""
    env = render.environment()
    keyed: dict[str, dict[Hashable, Any]] = {a.key: {} for a in ACTIONS}
    listed: dict[str, list[Any]] = {a.key: [] for a in ACTIONS}
    for st in stages:
        if st.scope != "node" or not st.applies_to(role):
            continue
        for action in st.actions:
            r = Renderer(env, context, secrets, st, action.where)
            if not r.when(action.when):
                continue
            out = action.render(r)
            ident = action.ident(out)
            if ident is None:
                listed[action.key].append(out)
            else:
                keyed[action.key][ident] = out
    return NodePlan(
        hostname, role, {a.key: (*listed[a.key], *keyed[a.key].values()) for a in ACTIONS}
    )
