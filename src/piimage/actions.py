"""Stage actions: each entry kind of a node-scope stage.yaml (files, links, dirs, users, append,
remove, enable, disable, mask), written once, here: what keys it takes, how it renders for one
node (`make`) and what the node stamp does with the rendered entries (`write`).

Adding an action is one class in this module and its place in ACTIONS: its dataclass fields
are the stage.yaml keys an entry may have (those without a default are required, `when:` is
every entry's), every text field is rendered with the node's context unless marked STATIC, and
the order of ACTIONS is the order the stamp applies them in (the `early` ones before the node's
identity and account files, the rest after). stages.py loads and plans them, stamp.py calls
`write` with a `Writes` (the stamp of one node: the disk, the tar, the accounts).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2

from . import render
from .accounts import home_dir
from .errors import BuildError, UserError
from .log import log

if TYPE_CHECKING:
    from .image import Disk
    from .stages import Stage
    from .stamp import Accounts, TarBuilder

STATIC = {"static": True}  # field metadata: taken as written, never rendered (file names, modes)


# ---------------------------------------------------------------------------------------------
# What a plan holds, and what a stamp writes it with
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodePlan:
    """Everything one node's stamp writes, decided before any image is opened: the rendered
    entries of every action, by its stage.yaml key (`plan.files`, `plan.enable`, …)."""

    hostname: str
    role: str
    items: Mapping[str, tuple] = field(default_factory=dict)

    def __getattr__(self, key: str) -> tuple:
        if key in ACTION_KEYS:
            return self.__dict__.get("items", {}).get(key, ())
        raise AttributeError(key)

    def with_items(self, **by_key: tuple) -> NodePlan:
        """This plan with some actions' entries replaced (the profile's units, say)."""
        unknown = set(by_key) - ACTION_KEYS
        if unknown:
            raise KeyError(f"not stage actions: {sorted(unknown)}")
        return NodePlan(self.hostname, self.role, {**self.items, **by_key})


@dataclass(frozen=True)
class WrittenFile:
    path: str
    sha256: str
    mode: int
    owner: str
    stage: str


@dataclass
class Writes:
    """One node's stamp while it is being made (stamp.py): the mounted disk, the tar that will
    hold everything for the root filesystem, the accounts in memory, the FAT files to write,
    and the record of files written (for the manifest)."""

    disk: Disk
    tar: TarBuilder
    acc: Accounts
    plan: NodePlan
    boot_writes: dict[str, bytes] = field(default_factory=dict)
    written: list[WrittenFile] = field(default_factory=list)

    @property
    def where(self) -> Path:
        return self.disk.path

    def ids(self, owner: str, group: str) -> tuple[int, int]:
        return self.acc.uid(owner, self.where), self.acc.gid(group, self.where)


# ---------------------------------------------------------------------------------------------
# Rendering
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
    """One entry of a stage.yaml list. Subclasses set `key`, turn their rendered fields into
    what the plan holds (`make`) and write a node's entries into its image (`write`); `ident`
    says which entries replace each other."""

    key: ClassVar[str]
    scalar: ClassVar[str | None] = None  # a bare text entry fills this field
    early: ClassVar[bool] = False  # written before the node's identity and account files
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

    @classmethod
    def write(cls, entries: tuple, w: Writes) -> None:
        """What the stamp does with this node's rendered entries of this action."""
        raise NotImplementedError


def _inside(files: Path, name: str, r: Renderer) -> Path:
    """A stage's template or source: a regular file inside its files/ folder (a stage cannot
    copy /etc/shadow, or ../../anything, into an image)."""
    path = files / name
    try:
        real, root = Path(os.path.realpath(path)), Path(os.path.realpath(files))
        inside, is_file = real.is_relative_to(root), real.is_file()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        raise UserError(f"{r.where}: {name!r} cannot be a file name ({_why(e)})") from None
    if os.path.isabs(name) or not inside:
        raise UserError(f"{r.where}: {name!r} is outside the stage's files/ folder")
    if not is_file:
        raise UserError(f"{r.where}: {name!r} is not a file in {files}")
    return path


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# ---------------------------------------------------------------------------------------------
# The actions, in the order the stamp applies them
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderedUser:
    name: str
    uid: int
    home: str
    shell: str
    groups: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class User(Action):
    """A system account created offline, with the same UID (= GID) on every node."""

    key = "users"
    early = True  # accounts exist before anything is owned by them
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

    @classmethod
    def write(cls, entries: tuple[RenderedUser, ...], w: Writes) -> None:
        for u in entries:
            w.acc.ensure_user(u, w.where)


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
    """Globs removed from the image before anything is written."""

    key = "remove"
    early = True

    @staticmethod
    def ident(rendered: str) -> Hashable | None:
        return None  # globs are applied in order, as written

    @classmethod
    def write(cls, entries: tuple[str, ...], w: Writes) -> None:
        for pattern in entries:
            for gone in w.disk.remove_glob(pattern):
                log.debug("%s: removed %s", w.where.name, gone)


@dataclass(frozen=True, kw_only=True)
class Disable(_Name):
    """Units disabled: their enablement links removed."""

    key = "disable"
    early = True

    @classmethod
    def write(cls, entries: tuple[str, ...], w: Writes) -> None:
        if not entries:
            return
        linked = [
            d for d in w.disk.g.ls("/etc/systemd/system") if d.endswith((".wants", ".requires"))
        ]
        for unit in entries:
            for d in linked:
                w.disk.remove_glob(f"/etc/systemd/system/{d}/{unit}")


@dataclass(frozen=True)
class RenderedDir:
    path: str
    mode: int
    owner: str
    group: str


@dataclass(frozen=True, kw_only=True)
class Dir(Action):
    key = "dirs"
    path: str
    mode: int = field(default=0o755, metadata={"static": True, "read": "mode"})
    owner: str = "root"
    group: str | None = None

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedDir:
        return RenderedDir(v["path"], self.mode, v["owner"], v["group"] or v["owner"])

    @classmethod
    def write(cls, entries: tuple[RenderedDir, ...], w: Writes) -> None:
        for d in entries:
            if not w.disk.on_boot(d.path):
                w.tar.dir(d.path, d.mode, *w.ids(d.owner, d.group))


@dataclass(frozen=True)
class RenderedFile:
    path: str
    data: bytes = field(repr=False)
    mode: int
    owner: str
    group: str
    stage: str
    secret: bool = False


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
            try:
                real = Path(os.path.realpath(files / name))
                if os.path.isabs(name) or not real.is_relative_to(os.path.realpath(files)):
                    problem((k,), f"{name!r} is outside the stage's files/ folder")
                elif not real.is_file():
                    problem((k,), f"{files / name} does not exist")
            except (OSError, ValueError) as e:  # a name too long, a NUL byte
                problem((k,), f"{name!r} cannot be a file name ({_why(e)})")

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

    @classmethod
    def write(cls, entries: tuple[RenderedFile, ...], w: Writes) -> None:
        for f in entries:
            if w.disk.on_boot(f.path):
                w.boot_writes[f.path] = f.data
            else:
                w.tar.file(f.path, f.data, f.mode, *w.ids(f.owner, f.group))
                parent = posixpath.dirname(f.path)
                if f.owner != "root" and posixpath.basename(parent) == ".ssh":
                    w.tar.dir(parent, 0o700, *w.ids(f.owner, f.group))  # ~/.ssh: its user's, 0700
            w.written.append(
                WrittenFile(f.path, hashlib.sha256(f.data).hexdigest(), f.mode, f.owner, f.stage)
            )
            if not f.secret:
                log.debug("%s: %s (%o %s)", w.where.name, f.path, f.mode, f.owner)


@dataclass(frozen=True)
class RenderedAppend:
    path: str
    section: str | None
    lines: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Append(Action):
    """Lines ensured in a file of the image (or one the plan writes), under a section if
    given; each line once."""

    key = "append"
    path: str
    lines: tuple[str, ...] = field(metadata={"read": "texts"})
    section: str | None = None

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedAppend:
        return RenderedAppend(v["path"], v["section"], v["lines"])

    @staticmethod
    def ident(rendered: RenderedAppend) -> Hashable | None:
        return None  # each entry adds its lines

    @classmethod
    def write(cls, entries: tuple[RenderedAppend, ...], w: Writes) -> None:
        for a in entries:
            if w.disk.on_boot(a.path):
                current = w.boot_writes.get(a.path)
                text = current.decode() if current is not None else w.disk.read_text(a.path)
                w.boot_writes[a.path] = append_lines(text, a).encode()
                continue
            if not w.disk.exists(a.path):
                raise BuildError(
                    f"{w.where}: cannot add lines to {a.path}: it does not exist in the image"
                )
            st = w.disk.stat(a.path)
            w.tar.file(
                a.path,
                append_lines(w.disk.read_text(a.path), a).encode(),
                st["st_mode"] & 0o7777,
                st["st_uid"],
                st["st_gid"],
            )


def append_lines(text: str, append: RenderedAppend) -> str:
    present = {ln.strip() for ln in text.splitlines()}
    missing = [ln for ln in append.lines if ln.strip() not in present]
    if not missing:
        return text
    if text and not text.endswith("\n"):
        text += "\n"
    if append.section:
        headers = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("[")]
        if not headers or headers[-1] != append.section:
            text += f"\n{append.section}\n"
    return text + "".join(ln + "\n" for ln in missing)


@dataclass(frozen=True)
class RenderedLink:
    path: str
    target: str
    stage: str


@dataclass(frozen=True, kw_only=True)
class Link(Action):
    key = "links"
    path: str
    target: str

    def make(self, v: dict[str, Any], r: Renderer) -> RenderedLink:
        return RenderedLink(v["path"], v["target"], r.stage.name)

    @classmethod
    def write(cls, entries: tuple[RenderedLink, ...], w: Writes) -> None:
        for lk in entries:
            w.tar.symlink(lk.path, lk.target)


UNIT_DIRS = ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system")


@dataclass(frozen=True, kw_only=True)
class Enable(_Name):
    """Units enabled as `systemctl enable` does, offline: links from their [Install]."""

    key = "enable"

    @classmethod
    def write(cls, entries: tuple[str, ...], w: Writes) -> None:
        planned = {f.path: f for f in w.plan.files}
        for unit in entries:
            path, text = _unit_file(w.disk, unit, planned)
            wanted, required, alias = install_targets(text)
            if not (wanted or required or alias):
                raise BuildError(
                    f"{w.where}: {unit} has no [Install] section; it cannot be enabled"
                )
            for target in wanted:
                w.tar.symlink(f"/etc/systemd/system/{target}.wants/{unit}", path)
            for target in required:
                w.tar.symlink(f"/etc/systemd/system/{target}.requires/{unit}", path)
            for a in alias:
                w.tar.symlink(f"/etc/systemd/system/{a}", path)


def _unit_file(disk: Disk, unit: str, planned: Mapping[str, RenderedFile]) -> tuple[str, str]:
    """Where a unit's file is (an instance's: its template's) and its text: a file the plan
    writes wins over the image's own."""
    template = re.sub(r"@[^.]+\.", "@.", unit) if "@" in unit else unit
    for d in UNIT_DIRS:
        p = f"{d}/{template}"
        if p in planned:
            return p, planned[p].data.decode()
    path = disk.unit_path(template)
    if path is None:
        raise BuildError(f"{disk.path}: cannot enable {unit}: no unit file {template} in the image")
    return path, disk.read_text(path)


def install_targets(unit_text: str) -> tuple[list[str], list[str], list[str]]:
    """A unit's [Install] section: (WantedBy, RequiredBy, Alias)."""
    wanted, required, alias = [], [], []
    section = None
    for raw in unit_text.splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
            continue
        if section != "[Install]" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        bucket = {"WantedBy": wanted, "RequiredBy": required, "Alias": alias}.get(key.strip())
        if bucket is not None:
            bucket.extend(value.split())
    return wanted, required, alias


@dataclass(frozen=True, kw_only=True)
class Mask(_Name):
    key = "mask"

    @classmethod
    def write(cls, entries: tuple[str, ...], w: Writes) -> None:
        for unit in entries:
            w.tar.symlink(f"/etc/systemd/system/{unit}", "/dev/null")


ACTIONS: tuple[type[Action], ...] = (User, Remove, Disable, Dir, File, Append, Link, Enable, Mask)
ACTION_KEYS = frozenset(a.key for a in ACTIONS)


def write_all(w: Writes, *, early: bool) -> None:
    """Every action's entries of w.plan, in ACTIONS order: the early ones, or the others."""
    for action in ACTIONS:
        if action.early == early:
            action.write(getattr(w.plan, action.key), w)
