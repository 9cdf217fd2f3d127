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

Every list above but `packages` is a stage action: a class in ACTIONS below. Its dataclass
fields are the keys an entry may have (those without a default are required); every entry may
have a `when:`; every text field is rendered with the node's context unless marked static. The
lists of names (remove, enable, disable, mask) take plain texts or `{name: …, when: …}`.
Adding an action is one class here, one NodePlan field, and what stamp.py does with it.

Role-scope stages (the contract): they take `packages`, a `run-chroot.sh` and a `files/`
folder copied verbatim into the root (layers.py); there is no node at role level, so nothing
there is rendered. Any action key in a role-scope stage is an error naming the file and key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import jinja2

from . import render, yamlloc
from .accounts import home_dir
from .errors import UserError

STAGE_DIR_RE = re.compile(r"^\d\d-[a-z0-9][a-z0-9-]*$")
ROLE_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")  # as a node profile's name (profiles.ROLE_RE)
STATIC = {"static": True}  # field metadata: taken as written, never rendered (file names, modes)


# ---------------------------------------------------------------------------------------------
# What a node plan holds (stamp.py writes it)
# ---------------------------------------------------------------------------------------------
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
    """Everything one node's stamp writes, decided before any image is opened. One field per
    stage action, named by its stage.yaml key."""

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


# ---------------------------------------------------------------------------------------------
# Stage actions
# ---------------------------------------------------------------------------------------------
class Renderer:
    """Renders one action's texts for one node; errors name the action (`file:line: key[i]`)."""

    def __init__(
        self,
        env: jinja2.Environment,
        context: Mapping[str, Any],
        secrets: Mapping[str, bytes],
        stage: Stage,
        where: str,
    ):
        self.env = env
        self.context = context
        self.secrets = secrets
        self.stage = stage
        self.where = where

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            return render.render_string(self.env, v, self.context, self.where)
        if isinstance(v, tuple):
            return tuple(self.value(x) for x in v)
        return v

    def when(self, expr: str | None) -> bool:
        return not expr or render.evaluate(self.env, expr, self.context, self.where)


@dataclass(frozen=True, kw_only=True)
class Action:
    """One entry of a stage.yaml list. Subclasses set `key` and turn their rendered fields into
    what the plan holds (`make`); `ident` says which entries replace each other."""

    key: ClassVar[str]
    scalar: ClassVar[str | None] = None  # a bare text entry fills this field
    where: str = field(default="", compare=False, metadata={"yaml": False})
    when: str | None = field(default=None, metadata=STATIC)

    @classmethod
    def yaml_fields(cls) -> list:
        return [f for f in fields(cls) if f.metadata.get("yaml", True)]

    @classmethod
    def allowed(cls) -> set[str]:
        return {f.name for f in cls.yaml_fields()}

    @classmethod
    def required(cls) -> list[str]:
        return [
            f.name
            for f in cls.yaml_fields()
            if f.default is MISSING and f.default_factory is MISSING
        ]

    def check(self, stage_dir: Path, problem: Callable[[tuple, str], None]) -> None:
        """Checks that need more than one field or the stage's files (at load time)."""

    def render(self, r: Renderer) -> Any:
        """The one render path: every field not marked static, then `make`."""
        values = {}
        for f in self.yaml_fields():
            v = getattr(self, f.name)
            values[f.name] = v if f.metadata.get("static") else r.value(v)
        return self.make(values, r)

    def make(self, v: dict[str, Any], r: Renderer) -> Any:
        raise NotImplementedError

    @staticmethod
    def ident(rendered: Any) -> Hashable | None:
        """Entries with the same ident: the later one wins (in the earlier one's place);
        None: every entry is kept."""
        return getattr(rendered, "path", None)


@dataclass(frozen=True, kw_only=True)
class File(Action):
    key = "files"
    path: str
    template: str | None = field(default=None, metadata=STATIC)
    source: str | None = field(default=None, metadata=STATIC)
    secret: str | None = field(default=None, metadata=STATIC)
    mode: int = field(default=0o644, metadata={"static": True, "read": "mode"})
    owner: str = "root"
    group: str | None = None

    def check(self, stage_dir: Path, problem: Callable[[tuple, str], None]) -> None:
        sources = [k for k in ("template", "source", "secret") if getattr(self, k) is not None]
        if len(sources) != 1:
            problem((), "needs exactly one of template, source, secret")
        files = stage_dir / "files"
        for k in ("template", "source"):
            name = getattr(self, k)
            if name is None:
                continue
            real = Path(os.path.realpath(files / name))
            if os.path.isabs(name) or not real.is_relative_to(os.path.realpath(files)):
                problem((k,), f"{name!r} is outside the stage's files/ folder")
            elif not real.is_file():
                problem((k,), f"{files / name} does not exist")

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedFile:
        path = v["path"]
        if not path.startswith("/"):
            raise UserError(f"{r.where}: path {path!r} must be absolute")
        files = r.stage.dir / "files"
        if self.template:
            data = render.render_file(_inside(files, self.template, r), r.context, r.where).encode()
        elif self.source:
            data = _inside(files, self.source, r).read_bytes()
        else:
            assert self.secret is not None
            if self.secret not in r.secrets:
                raise UserError(f"{r.where}: unknown secret {self.secret!r}")
            data = r.secrets[self.secret]
        owner, group = v["owner"], v["group"] or v["owner"]
        return RenderedFile(path, data, self.mode, owner, group, r.stage.name, bool(self.secret))


@dataclass(frozen=True, kw_only=True)
class Link(Action):
    key = "links"
    path: str
    target: str

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedLink:
        return RenderedLink(v["path"], v["target"], r.stage.name)


def _inside(files: Path, name: str, r: Renderer) -> Path:
    """A stage's template or source: a regular file inside its files/ folder (a stage cannot
    copy /etc/shadow, or ../../anything, into an image)."""
    path = files / name
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(files))
    if os.path.isabs(name) or not real.is_relative_to(root):
        raise UserError(f"{r.where}: {name!r} is outside the stage's files/ folder")
    if not real.is_file():
        raise UserError(f"{r.where}: {name!r} is not a file in {files}")
    return path


@dataclass(frozen=True, kw_only=True)
class Dir(Action):
    key = "dirs"
    path: str
    mode: int = field(default=0o755, metadata={"static": True, "read": "mode"})
    owner: str = "root"
    group: str | None = None

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedDir:
        return RenderedDir(v["path"], self.mode, v["owner"], v["group"] or v["owner"])


@dataclass(frozen=True, kw_only=True)
class User(Action):
    key = "users"
    name: str
    uid: str  # rendered, then a number
    home: str | None = None
    shell: str = "/bin/bash"
    groups: tuple[str, ...] = field(default=(), metadata={"read": "texts"})

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedUser:
        if not v["uid"].isdigit():
            raise UserError(f"{r.where}: uid {v['uid']!r} is not a number")
        home = v["home"] or home_dir(v["name"])
        return RenderedUser(v["name"], int(v["uid"]), home, v["shell"], v["groups"])

    @staticmethod
    def ident(rendered: RenderedUser) -> Hashable | None:
        return rendered.name


@dataclass(frozen=True, kw_only=True)
class Append(Action):
    key = "append"
    path: str
    lines: tuple[str, ...] = field(metadata={"read": "texts"})
    section: str | None = None

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedAppend:
        return RenderedAppend(v["path"], v["section"], v["lines"])

    @staticmethod
    def ident(rendered: RenderedAppend) -> Hashable | None:
        return None  # each entry adds its lines


@dataclass(frozen=True, kw_only=True)
class _Name(Action):
    """A list of names (a glob, a unit): plain texts or mappings with `name` and `when`."""

    scalar = "name"
    name: str

    def make(self, v: dict[str, Any], r: Renderer) -> str:
        return v["name"]

    @staticmethod
    def ident(rendered: str) -> Hashable | None:
        return rendered  # a unit named twice is enabled once, where it first appeared


@dataclass(frozen=True, kw_only=True)
class Remove(_Name):
    key = "remove"

    @staticmethod
    def ident(rendered: str) -> Hashable | None:
        return None  # globs are applied in order, as written


@dataclass(frozen=True, kw_only=True)
class Enable(_Name):
    key = "enable"


@dataclass(frozen=True, kw_only=True)
class Disable(_Name):
    key = "disable"


@dataclass(frozen=True, kw_only=True)
class Mask(_Name):
    key = "mask"


ACTIONS: tuple[type[Action], ...] = (File, Link, Dir, User, Append, Remove, Enable, Mask, Disable)
ACTION_KEYS = {a.key for a in ACTIONS}
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
        hostname, role, **{a.key: (*listed[a.key], *keyed[a.key].values()) for a in ACTIONS}
    )
