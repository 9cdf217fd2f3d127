"""Outputs: the sparse raw .img, its .sha256, and manifest.json — each written under a
temporary name and renamed only when complete."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from . import __version__
from .fsutil import atomic_path, sha256_file, write_atomic
from .log import progress
from .run import run

_PCT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")


def convert_to_raw(src: Path, dest: Path, label: str) -> None:
    """qemu-img writes a sparse raw file (zero runs become holes)."""
    fmt = "qcow2" if src.suffix == ".qcow2" else "raw"
    with progress(label, 100, unit="%") as p:
        last = [0]

        def on_line(line: str) -> None:
            for m in _PCT.finditer(line):
                pct = int(float(m.group(1)))
                if pct > last[0]:
                    p.update(pct - last[0])
                    last[0] = pct

        # qemu-img -p redraws with \r; run() splits on \n, so ask for line-wise output.
        run(["qemu-img", "convert", "-p", "-f", fmt, "-O", "raw", str(src), str(dest)],
            what=f"qemu-img convert to {dest.name}", on_line=on_line)


def checksum_line(digest: str, name: str) -> str:
    return f"{digest}  {name}\n"


def publish_image(overlay: Path, final: Path) -> str:
    """Convert the node's overlay to `final` (.img) atomically; write `final`.sha256. Returns the digest."""
    with atomic_path(final) as tmp:
        convert_to_raw(overlay, tmp, f"writing {final.name}")
        with progress(f"checksumming {final.name}", os.path.getsize(tmp)) as p:
            digest = sha256_file(tmp, p)
    write_atomic(final.with_name(final.name + ".sha256"), checksum_line(digest, final.name))
    return digest


def update_manifest(path: Path, cluster: dict[str, Any], base: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> None:
    """manifest.json lists every node image in the folder; a build of some nodes updates their
    entries and keeps the others."""
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
    merged_nodes = dict(old.get("nodes", {})) if old.get("cluster", {}).get("name") == cluster.get("name") else {}
    merged_nodes.update(nodes)
    doc = {
        "piimage_version": __version__,
        "cluster": cluster,
        "base": base,
        "nodes": dict(sorted(merged_nodes.items())),
    }
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
