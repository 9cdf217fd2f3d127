"""The cluster's secrets directory (default `.piimage/secrets/` beside cluster.yaml).

It holds what must stay private: the munge key, the cluster SSH keypair, per-node host keys
(made by keys.py). The directory is 0700 and secret files 0600; a secret's content never goes
into a log line or a message — only its path does.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError
from .log import log

DIR_MODE = 0o700


def ensure_secrets_dir(path: Path) -> Path:
    """Create `path` (and missing parents) as a 0700 directory; tighten an existing one whose
    mode lets group or others in. Returns `path`."""
    if path.exists() and not path.is_dir():
        raise UserError(f"secrets directory {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:  # mkdir(mode=0o700) never makes this: the directory was there before
            os.chmod(path, DIR_MODE)
            log.warning("%s was open to others (mode %04o); set it to 0700", path, mode)
        elif mode != DIR_MODE:
            os.chmod(path, DIR_MODE)  # e.g. 0500: we must be able to write into it
    except OSError as e:
        raise UserError(f"cannot create the secrets directory {path} ({e.strerror or e})") from None
    return path
