"""The inventory: cluster.yaml → a validated, frozen model of the cluster.

Owns the schema of cluster.yaml, its defaults, the embedded default cluster (used when there
is no cluster.yaml, so `piimage build --role compute --hostname node02` works as is), node
selection for the command line (`--hostname`, `--role`, `--all`, `--nodes`) and `piimage init`.

Every problem is collected and reported at once, each with its file, line and key path
(`cluster.yaml:14: nodes[2].ip: 10.0.1.12 is outside the cluster subnet 10.0.0.0/24`), before
anything is downloaded or written. Loading has no side effect: it reads cluster.yaml, the
public key files it names and the node profiles, nothing else. Secrets (password hashes,
private keys) never appear in a message.

The seams: `model` (the frozen dataclasses and their derived facts), `rules` (validation),
`located` (YAML with line numbers, the problem collector), `defaults` (default values, the
default cluster's text), `boards` (hardware models), `sshkeys` (public keys), `select`.
"""

from __future__ import annotations

import pwd  # noqa: F401  (tests patch inventory.pwd.getpwnam; sshkeys uses the same module)
from collections.abc import Mapping
from pathlib import Path

from .. import yamlloc
from ..errors import UserError
from ..fsutil import write_atomic
from ..log import log
from ..profiles import Profile, load_profiles, profile_dirs
from ..secrets import ensure_secrets_dir
from .boards import HARDWARE_MODELS, POE_HATS
from .defaults import (
    DEFAULT_ADMIN,
    DEFAULT_BASE,
    DEFAULT_CLUSTER_USER,
    DEFAULT_FILE,
    DEFAULT_INTERFACE,
    DEFAULT_MODEL,
    DEFAULT_NAME,
    DEFAULT_NODES,
    DEFAULT_SECRETS_DIR,
    DEFAULT_SHARED_PATH,
    DEFAULT_SOURCE_LABEL,
    DEFAULT_SUBNET,
    DEFAULT_TIMEZONE,
    default_yaml,
)
from .located import _read_yaml
from .model import (
    AdminUser,
    AptSettings,
    Cluster,
    ClusterUser,
    Hardware,
    Network,
    Node,
    SharedStorage,
)
from .rules import TOP_KEYS, _validate
from .select import _display, select_nodes
from .sshkeys import default_key_files, invoking_home, public_key_problem

__all__ = [
    "DEFAULT_ADMIN", "DEFAULT_BASE", "DEFAULT_CLUSTER_USER", "DEFAULT_FILE", "DEFAULT_INTERFACE",
    "DEFAULT_MODEL", "DEFAULT_NAME", "DEFAULT_NODES", "DEFAULT_SECRETS_DIR", "DEFAULT_SHARED_PATH",
    "DEFAULT_SOURCE_LABEL", "DEFAULT_SUBNET", "DEFAULT_TIMEZONE", "HARDWARE_MODELS", "POE_HATS",
    "TOP_KEYS", "AdminUser", "AptSettings", "Cluster", "ClusterUser", "Hardware", "Network", "Node",
    "SharedStorage", "default_key_files", "default_yaml", "init", "invoking_home", "load",
    "public_key_problem", "select_nodes",
]  # fmt: skip


def load(
    path: Path | None,
    *,
    roles: Mapping[str, Profile] | None = None,
    cwd: Path | None = None,
) -> Cluster:
    """Read and validate the inventory: `path`, else ./cluster.yaml, else the built-in default
    cluster. Roles are those of `roles`, else of the node profiles (ours, and a node-profiles/
    folder beside cluster.yaml — beside cwd for the default cluster). Raises InventoryError
    with every problem, or UserError if `path` or a profile cannot be read."""
    cwd = (cwd or Path.cwd()).absolute()
    home = invoking_home()
    if path is None:
        candidate = cwd / DEFAULT_FILE
        # a ./cluster.yaml that is a broken link is a mistake to report, not "no inventory"
        if not candidate.exists() and not candidate.is_symlink():
            return _load_default(cwd, _roles(roles, cwd), home)
        path, where = candidate, _display(candidate)
    else:
        where = str(path)
        path = path if path.is_absolute() else cwd / path
    if not path.exists() and not path.is_symlink():
        raise UserError(
            f"{where}: inventory file not found",
            hint="run `piimage init` to write one, or leave out --inventory for the default cluster",
        )
    text = yamlloc.read_text_file(path, where, "inventory file")  # before resolve(): loops
    roles = _roles(roles, path.resolve().parent)
    source = path.resolve()
    cluster = _validate(
        _read_yaml(text, where),
        where=where,
        base_dir=source.parent,
        roles=roles,
        home=home,
        source=source,
    )
    if not cluster.admin.ssh_authorized_keys:
        log.warning(
            "%s: admin.ssh_authorized_keys is empty: SSH login as %s stays possible only with a "
            "password, and only if admin.password_hash is set",
            where,
            cluster.admin.name,
        )
    return cluster


def _roles(roles: Mapping[str, Profile] | None, inventory_dir: Path) -> Mapping[str, Profile]:
    return roles if roles is not None else load_profiles(profile_dirs(inventory_dir))


def _load_default(cwd: Path, roles: Mapping[str, Profile], home: Path) -> Cluster:
    keys = default_key_files(home)
    if not keys:
        log.warning(
            "no cluster.yaml here and no SSH public key in %s/.ssh (id_*.pub): the default "
            "cluster's admin user gets no key, so SSH password login stays possible only with "
            "admin.password_hash; run `piimage init` to write a cluster.yaml you can edit",
            home,
        )
    doc = _read_yaml(default_yaml(keys), DEFAULT_SOURCE_LABEL)
    return _validate(
        doc,
        where=DEFAULT_SOURCE_LABEL,
        base_dir=cwd,
        roles=roles,
        home=home,
        source=None,
    )


def init(directory: Path, *, force: bool = False) -> list[Path]:
    """Write an editable cluster.yaml (with the invoking user's public keys, if any) and the
    secrets directory (0700). Returns what was written or created."""
    target = directory / DEFAULT_FILE
    if target.is_dir():
        raise UserError(f"{target} is a directory")
    if target.exists() and not force:
        raise UserError(
            f"{target} already exists; not overwriting it",
            hint="use --force to replace it (the secrets directory is kept)",
        )
    secrets = directory / DEFAULT_SECRETS_DIR
    existed = secrets.is_dir()
    write_atomic(target, default_yaml(default_key_files()), mode=0o644)
    ensure_secrets_dir(secrets)
    return [target] if existed else [target, secrets]
