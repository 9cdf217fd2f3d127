"""The cluster's keys, generated once into the secrets directory and reused by every build:
the munge key, the cluster user's SSH keypair, and one SSH host key per node (so a rebuilt
node keeps its identity and every node's ssh_known_hosts can list all of them).

Private material is created 0600 inside a 0700 directory and never logged."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BuildError
from .fsutil import write_atomic
from .run import require_tools, run
from .secrets import ensure_secrets_dir

MUNGE_KEY_BYTES = 1024


@dataclass(frozen=True)
class KeyPair:
    private: bytes = field(repr=False)
    public: str  # "ssh-ed25519 AAAA…" without comment


def munge_key(secrets_dir: Path) -> bytes:
    """One munge key per cluster: made once, then the same bytes in every image."""
    path = ensure_secrets_dir(secrets_dir) / "munge.key"
    if not path.exists():
        write_atomic(path, os.urandom(MUNGE_KEY_BYTES), mode=0o600)
    data = path.read_bytes()
    if len(data) < 32:
        raise BuildError(
            f"{path}: munge key is {len(data)} bytes; munge needs at least 32",
            hint="delete it to have a new one made",
        )
    return data


def _keypair(secrets_dir: Path, rel: str, comment: str) -> KeyPair:
    path = secrets_dir / rel
    pub_path = path.with_name(path.name + ".pub")
    if not path.exists():
        require_tools(["ssh-keygen"])
        d = ensure_secrets_dir(secrets_dir)
        for part in Path(rel).parent.parts:  # every level 0700, not just the last
            d = ensure_secrets_dir(d / part)
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".keygen-") as td:
            tmp = Path(td) / "key"
            run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(tmp)],
                what="ssh-keygen",
            )
            os.chmod(tmp, 0o600)
            os.replace(tmp.with_name("key.pub"), pub_path)
            os.replace(tmp, path)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o600)
    if not pub_path.exists():
        raise BuildError(
            f"{pub_path} is missing beside its private key",
            hint=f"delete {path} to have a new pair made",
        )
    fields = pub_path.read_text().split()
    return KeyPair(path.read_bytes(), " ".join(fields[:2]))


def cluster_ssh_key(secrets_dir: Path, cluster_name: str) -> KeyPair:
    return _keypair(secrets_dir, "cluster_ed25519", f"{cluster_name}-cluster")


def node_host_key(secrets_dir: Path, hostname: str) -> KeyPair:
    return _keypair(secrets_dir, f"hosts/{hostname}/ssh_host_ed25519_key", f"root@{hostname}")
