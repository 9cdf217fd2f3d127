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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import render
from .accounts import home_dir
from .errors import UserError
from .suggest import unknown

STAGE_KEYS = {"scope", "roles", "packages", "files", "links", "remove", "enable", "disable", "mask", "description",
              "dirs", "users", "append"}
DIR_KEYS = {"path", "mode", "owner", "group", "when"}
USER_KEYS = {"name", "uid", "home", "shell", "groups", "when"}
APPEND_KEYS = {"path", "section", "lines", "when"}
FILE_KEYS = {"path", "template", "source", "secret", "mode", "owner", "group", "when"}
LINK_KEYS = {"path", "target", "when"}
STAGE_DIR_RE = re.compile(r"^\d\d-[a-z0-9][a-z0-9-]*$")


@dataclass(frozen=True)
class FileSpec:
    path: str
    template: str | None = None
    source: str | None = None
    secret: str | None = None
    mode: int = 0o644
    owner: str = "root"
    group: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class LinkSpec:
    path: str
    target: str
    when: str | None = None


@dataclass(frozen=True)
class DirSpec:
    path: str
    mode: int = 0o755
    owner: str = "root"
    group: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class UserSpec:
    name: str
    uid: str  # rendered, then int
    home: str | None = None
    shell: str = "/bin/bash"
    groups: tuple[str, ...] = ()
    when: str | None = None


@dataclass(frozen=True)
class AppendSpec:
    path: str
    lines: tuple[str, ...]
    section: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    dir: Path
    scope: str
    roles: tuple[str, ...]
    description: str = ""
    packages: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()
    links: tuple[LinkSpec, ...] = ()
    remove: tuple[str, ...] = ()
    enable: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()
    disable: tuple[str, ...] = ()
    dirs: tuple[DirSpec, ...] = ()
    users: tuple[UserSpec, ...] = ()
    append: tuple[AppendSpec, ...] = ()
    script: Path | None = None

    def applies_to(self, role: str) -> bool:
        return "all" in self.roles or role in self.roles


@dataclass(frozen=True)
class RenderedFile:
    path: str
    data: bytes = field(repr=False)
    mode: int
    owner: str
    group: str
    stage: str
    secret: bool = False


@dataclass(frozen=True)
class RenderedLink:
    path: str
    target: str
    stage: str


@dataclass(frozen=True)
class RenderedDir:
    path: str
    mode: int
    owner: str
    group: str


@dataclass(frozen=True)
class RenderedUser:
    name: str
    uid: int
    home: str
    shell: str
    groups: tuple[str, ...]


@dataclass(frozen=True)
class RenderedAppend:
    path: str
    section: str | None
    lines: tuple[str, ...]


@dataclass(frozen=True)
class NodePlan:
    """Everything one node's stamp writes, decided before any image is opened."""

    hostname: str
    role: str
    files: tuple[RenderedFile, ...]
    links: tuple[RenderedLink, ...]
    remove: tuple[str, ...]
    enable: tuple[str, ...]
    mask: tuple[str, ...]
    disable: tuple[str, ...] = ()
    dirs: tuple[RenderedDir, ...] = ()
    users: tuple[RenderedUser, ...] = ()
    append: tuple[RenderedAppend, ...] = ()


def _mode(value: Any, where: str, problems: list[str]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML reads 0644 as the octal int 420 (YAML 1.1) — accept it as written.
        return value
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3,4}", value):
        return int(value, 8)
    problems.append(f"{where}: mode {value!r} is not an octal mode like \"0644\"")
    return 0o644


def _unknown(keys, allowed: set[str], where: str, problems: list[str]) -> None:
    problems.extend(f"{where}: {unknown('key', k, allowed)}" for k in keys if k not in allowed)


def load_stage(d: Path) -> Stage:
    problems: list[str] = []
    meta_path = d / "stage.yaml"
    where0 = str(meta_path)
    try:
        meta = yaml.safe_load(meta_path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{d}: stage directory has no stage.yaml") from None
    except yaml.YAMLError as e:
        raise UserError(f"{where0}: malformed YAML: {e}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{where0}: expected a mapping at the top level")
    _unknown(meta, STAGE_KEYS, where0, problems)
    scope = meta.get("scope", "node")
    if scope not in ("node", "role"):
        problems.append(f"{where0}: scope: {scope!r} must be 'node' or 'role'")
    roles = meta.get("roles", ["all"])
    if isinstance(roles, str):
        roles = [roles]
    files = []
    for i, f in enumerate(meta.get("files") or []):
        w = f"{where0}: files[{i}]"
        if not isinstance(f, dict) or "path" not in f:
            problems.append(f"{w}: expected a mapping with 'path'")
            continue
        _unknown(f, FILE_KEYS, w, problems)
        sources = [k for k in ("template", "source", "secret") if k in f]
        if len(sources) != 1:
            problems.append(f"{w}: needs exactly one of template, source, secret")
            continue
        for k in ("template", "source"):
            if k in f and not (d / "files" / f[k]).is_file():
                problems.append(f"{w}: {k}: {d / 'files' / f[k]} does not exist")
        files.append(
            FileSpec(
                path=str(f["path"]),
                template=f.get("template"),
                source=f.get("source"),
                secret=f.get("secret"),
                mode=_mode(f.get("mode", "0644"), w, problems),
                owner=str(f.get("owner", "root")),
                group=str(f["group"]) if "group" in f else None,
                when=f.get("when"),
            )
        )
    links = []
    for i, lk in enumerate(meta.get("links") or []):
        w = f"{where0}: links[{i}]"
        if not isinstance(lk, dict) or "path" not in lk or "target" not in lk:
            problems.append(f"{w}: expected a mapping with 'path' and 'target'")
            continue
        _unknown(lk, LINK_KEYS, w, problems)
        links.append(LinkSpec(str(lk["path"]), str(lk["target"]), lk.get("when")))
    dirs = []
    for i, x in enumerate(meta.get("dirs") or []):
        w = f"{where0}: dirs[{i}]"
        if not isinstance(x, dict) or "path" not in x:
            problems.append(f"{w}: expected a mapping with 'path'")
            continue
        _unknown(x, DIR_KEYS, w, problems)
        dirs.append(DirSpec(str(x["path"]), _mode(x.get("mode", "0755"), w, problems), str(x.get("owner", "root")),
                            str(x["group"]) if "group" in x else None, x.get("when")))
    users = []
    for i, x in enumerate(meta.get("users") or []):
        w = f"{where0}: users[{i}]"
        if not isinstance(x, dict) or "name" not in x or "uid" not in x:
            problems.append(f"{w}: expected a mapping with 'name' and 'uid'")
            continue
        _unknown(x, USER_KEYS, w, problems)
        users.append(UserSpec(str(x["name"]), str(x["uid"]), x.get("home"), str(x.get("shell", "/bin/bash")),
                              tuple(str(g) for g in x.get("groups") or ()), x.get("when")))
    appends = []
    for i, x in enumerate(meta.get("append") or []):
        w = f"{where0}: append[{i}]"
        if not isinstance(x, dict) or "path" not in x or not isinstance(x.get("lines"), list):
            problems.append(f"{w}: expected a mapping with 'path' and a list of 'lines'")
            continue
        _unknown(x, APPEND_KEYS, w, problems)
        appends.append(AppendSpec(str(x["path"]), tuple(str(v) for v in x["lines"]), x.get("section"), x.get("when")))
    script = d / "run-chroot.sh"
    if script.exists() and scope != "role":
        problems.append(f"{d}: run-chroot.sh is only allowed in role-scope stages")
    if meta.get("packages") and scope != "role":
        problems.append(f"{where0}: packages: only role-scope stages install packages")
    if problems:
        raise UserError(f"{len(problems)} problem(s) in stage {d.name}", detail="\n".join(problems))
    return Stage(
        name=d.name,
        dir=d,
        scope=scope,
        roles=tuple(str(r) for r in roles),
        description=str(meta.get("description", "")),
        packages=tuple(str(p) for p in meta.get("packages") or ()),
        files=tuple(files),
        links=tuple(links),
        remove=tuple(str(r) for r in meta.get("remove") or ()),
        enable=tuple(str(u) for u in meta.get("enable") or ()),
        mask=tuple(str(u) for u in meta.get("mask") or ()),
        disable=tuple(str(u) for u in meta.get("disable") or ()),
        dirs=tuple(dirs),
        users=tuple(users),
        append=tuple(appends),
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


def plan_node(
    stages: list[Stage],
    context: Mapping[str, Any],
    *,
    hostname: str,
    role: str,
    secrets: Mapping[str, bytes],
    scope: str = "node",
) -> NodePlan:
    """Render every file of the given scope's stages for one node."""
    env = render.environment()
    files: dict[str, RenderedFile] = {}
    links: dict[str, RenderedLink] = {}
    remove: list[str] = []
    enable: list[str] = []
    mask: list[str] = []
    disable: list[str] = []
    dirs: dict[str, RenderedDir] = {}
    users: dict[str, RenderedUser] = {}
    appends: list[RenderedAppend] = []
    for st in stages:
        if st.scope != scope or not st.applies_to(role):
            continue
        for i, f in enumerate(st.files):
            where = f"{st.name}/stage.yaml: files[{i}]"
            if f.when and not render.evaluate(env, f.when, context, where):
                continue
            path = render.render_string(env, f.path, context, where)
            if not path.startswith("/"):
                raise UserError(f"{where}: path {path!r} must be absolute")
            if f.template:
                data = render.render_file(st.dir / "files" / f.template, context, where).encode()
            elif f.source:
                data = (st.dir / "files" / f.source).read_bytes()
            else:
                assert f.secret is not None
                if f.secret not in secrets:
                    raise UserError(f"{where}: unknown secret {f.secret!r}")
                data = secrets[f.secret]
            owner = render.render_string(env, f.owner, context, where)
            group = render.render_string(env, f.group, context, where) if f.group else owner
            files[path] = RenderedFile(path, data, f.mode, owner, group, st.name, bool(f.secret))
        for i, lk in enumerate(st.links):
            where = f"{st.name}/stage.yaml: links[{i}]"
            if lk.when and not render.evaluate(env, lk.when, context, where):
                continue
            p = render.render_string(env, lk.path, context, where)
            links[p] = RenderedLink(p, render.render_string(env, lk.target, context, where), st.name)
        for i, x in enumerate(st.dirs):
            where = f"{st.name}/stage.yaml: dirs[{i}]"
            if x.when and not render.evaluate(env, x.when, context, where):
                continue
            p = render.render_string(env, x.path, context, where)
            owner = render.render_string(env, x.owner, context, where)
            group = render.render_string(env, x.group, context, where) if x.group else owner
            dirs[p] = RenderedDir(p, x.mode, owner, group)
        for i, u in enumerate(st.users):
            where = f"{st.name}/stage.yaml: users[{i}]"
            if u.when and not render.evaluate(env, u.when, context, where):
                continue
            name = render.render_string(env, u.name, context, where)
            uid_text = render.render_string(env, u.uid, context, where)
            if not uid_text.isdigit():
                raise UserError(f"{where}: uid {uid_text!r} is not a number")
            home = render.render_string(env, u.home, context, where) if u.home else home_dir(name)
            users[name] = RenderedUser(name, int(uid_text), home, u.shell, u.groups)
        for i, a in enumerate(st.append):
            where = f"{st.name}/stage.yaml: append[{i}]"
            if a.when and not render.evaluate(env, a.when, context, where):
                continue
            lines = tuple(render.render_string(env, v, context, where) for v in a.lines)
            appends.append(RenderedAppend(render.render_string(env, a.path, context, where), a.section, lines))
        remove.extend(st.remove)
        enable.extend(u for u in st.enable if u not in enable)
        mask.extend(u for u in st.mask if u not in mask)
        disable.extend(u for u in st.disable if u not in disable)
    return NodePlan(hostname, role, tuple(files.values()), tuple(links.values()), tuple(remove), tuple(enable),
                    tuple(mask), tuple(disable), tuple(dirs.values()), tuple(users.values()), tuple(appends))
