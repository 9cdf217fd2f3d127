"""'Did you mean …?' for unknown keys and names, one wording everywhere."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown(kind: str, value: object, known: Iterable[str]) -> str:
    """e.g. unknown("key", "hostnme", {...}) -> "unknown key 'hostnme' (did you mean 'hostname'?)"."""
    known = sorted(known)
    near = difflib.get_close_matches(str(value), known, n=1, cutoff=0.6)
    hint = f"did you mean '{near[0]}'?" if near else f"known: {', '.join(known)}"
    return f"unknown {kind} '{value}' ({hint})"
