"""Where piimage keeps things and which URLs it talks to; all overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError

# Raspberry Pi Imager's list of images; the default source of the base image.
DEFAULT_OS_LIST_URL = "https://downloads.raspberrypi.com/os_list_imagingutility_v4.json"
DEFAULT_DOWNLOAD_HOST = "https://downloads.raspberrypi.com/"


def cache_dir() -> Path:
    """$PIIMAGE_CACHE, else $XDG_CACHE_HOME/piimage, else ~/.cache/piimage."""
    env = os.environ.get("PIIMAGE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "piimage" if xdg else Path.home() / ".cache" / "piimage"


def os_list_url() -> str:
    return os.environ.get("PIIMAGE_OS_LIST_URL") or DEFAULT_OS_LIST_URL


def mirror() -> str | None:
    """A base URL that replaces DEFAULT_DOWNLOAD_HOST in image URLs (a local mirror)."""
    return os.environ.get("PIIMAGE_MIRROR") or None


def guestfs_env() -> dict[str, str]:
    """libguestfs settings for this kind of host: the direct backend, TCG unless told otherwise."""
    return {
        "LIBGUESTFS_BACKEND": os.environ.get("LIBGUESTFS_BACKEND", "direct"),
        "LIBGUESTFS_BACKEND_SETTINGS": os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),
        # the appliance is built once and kept here, whatever TMPDIR says
        "LIBGUESTFS_CACHEDIR": os.environ.get("LIBGUESTFS_CACHEDIR", "/var/tmp"),
    }


def layer_cache_dir() -> Path:
    """Role layers (apt under emulation: the slow part); $PIIMAGE_LAYER_CACHE to keep them apart."""
    env = os.environ.get("PIIMAGE_LAYER_CACHE")
    return Path(env) if env else cache_dir() / "layers"


def apt_cache_dir() -> Path:
    """Host-side apt archive cache shared by every role-layer build."""
    env = os.environ.get("PIIMAGE_APT_CACHE")
    return Path(env) if env else cache_dir() / "apt-archives"


DEFAULT_DEBIAN_MIRROR = "http://deb.debian.org/debian"


def debian_mirror() -> str:
    """Debian's archive, for the rehearsal kernel ($PIIMAGE_DEBIAN_MIRROR for a local mirror)."""
    return os.environ.get("PIIMAGE_DEBIAN_MIRROR") or DEFAULT_DEBIAN_MIRROR


def data_dir() -> Path:
    """Where `stages/` and `node-profiles/` are: $PIIMAGE_DATA_DIR, else the package's own
    data/ (symlinks to the checkout's top-level folders; copies in an installed piimage)."""
    env = os.environ.get("PIIMAGE_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent / "data")
    for c in candidates:
        if (c / "stages").is_dir() and (c / "node-profiles").is_dir():
            return c
    raise UserError(
        "cannot find piimage's stages/ and node-profiles/",
        hint="set PIIMAGE_DATA_DIR to a folder holding both (the piimage checkout)",
    )
