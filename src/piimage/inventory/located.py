"""The inventory's side of located YAML (file:line and key path for every value): the reader
and checker live in `yamlloc` (shared with stage.yaml and node profiles); here are only what
cluster.yaml needs on top — its error type, IPv4 and URL values, and paths relative to the
inventory."""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import urlsplit

from .. import yamlloc
from ..errors import InventoryError
from ..yamlloc import Doc as _Doc
from ..yamlloc import type_name as _type_name

__all__ = ["_Checker", "_Doc", "_read_yaml", "_resolve_path", "_type_name"]


def _read_yaml(text: str, where: str) -> _Doc:
    """Parse with marks; a syntax error is fatal (nothing after it can be trusted)."""
    try:
        return yamlloc.read(text, where)
    except yamlloc.MalformedYAML as e:
        raise InventoryError([e.message]) from None


class _Checker(yamlloc.Checker):
    """yamlloc's checker with the inventory's own value readers."""

    def ip(self, value: str, path: tuple) -> IPv4Address | None:
        try:
            return IPv4Address(value)
        except ValueError:
            if "/" in value:
                self.add(
                    path,
                    f"'{value}': give the address without a prefix length (the subnet sets it)",
                )
            else:
                self.add(path, f"'{value}' is not an IPv4 address")
            return None

    def url(self, d: dict, key: str, path: tuple) -> str | None:
        value = self.text(d, key, path)
        if value is None:
            return None
        parts = urlsplit(value)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or any(c.isspace() for c in value)
        ):
            self.add(path + (key,), f"'{value}' is not an http(s) URL")
            return None
        return value


def _resolve_path(value: str, base_dir: Path, home: Path) -> Path:
    """`~` is the invoking user's home (the sudo caller's, not root's); relative → base_dir."""
    if value == "~" or value.startswith("~/"):
        p = home / value[2:]
    else:
        p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base_dir / p
