"""Outputs: the sparse raw .img, its .sha256, and manifest.json — each written under a
temporary name and renamed only when complete."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BuildError
from .fsutil import atomic_path, sha256_file, write_atomic
from .log import log, progress
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
        # -U: the appliance may still hold the overlay open (it is done with this one)
        run(
            ["qemu-img", "convert", "-U", "-p", "-f", fmt, "-O", "raw", str(src), str(dest)],
            what=f"qemu-img convert to {dest.name}",
            on_line=on_line,
        )


def checksum_line(digest: str, name: str) -> str:
    return f"{digest}  {name}\n"


class _Abortable:
    """Progress that stops the work when `abort` is set (another job failed, or Ctrl-C)."""

    def __init__(self, p, abort):
        self.p, self.abort = p, abort

    def update(self, n: int) -> None:
        if self.abort is not None and self.abort.is_set():
            raise BuildError("stopped: another part of the build failed or was interrupted")
        self.p.update(n)


def sidecar(path: Path) -> Path:
    """The `.sha256` file published beside `path`."""
    return path.with_name(path.name + ".sha256")


def publish_image(overlay: Path, final: Path, abort=None) -> str:
    """Convert the node's overlay to `final` (.img) atomically; write `final`.sha256. Returns the digest."""
    with atomic_path(final) as tmp:
        convert_to_raw(overlay, tmp, f"writing {final.name}")
        with progress(f"checksumming {final.name}", os.path.getsize(tmp)) as p:
            digest = sha256_file(tmp, _Abortable(p, abort))
    write_atomic(sidecar(final), checksum_line(digest, final.name))
    return digest


COMPRESSORS = {
    # format: (suffix, command writing the compressed stream to stdout; every core)
    "xz": (".xz", ["xz", "-T0", "-3", "-c"]),
    "zstd": (".zst", ["zstd", "-T0", "-q", "-c"]),
    "gzip": (".gz", ["pigz", "-c"]),
}


def compress(image: Path, fmt: str) -> Path | None:
    """image.img -> image.img.xz (+ .sha256), atomically; the raw .img stays."""
    if fmt == "none":
        return None
    suffix, cmd = COMPRESSORS[fmt]
    final = image.with_name(image.name + suffix)
    t0 = time.monotonic()
    log.info("compressing %s (%s) …", image.name, fmt)
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            run([*cmd, str(image)], what=f"{cmd[0]} of {image.name}", stdout=f)
        digest = sha256_file(tmp)
    write_atomic(sidecar(final), checksum_line(digest, final.name))
    log.info("compressed %s in %.0f s", final.name, time.monotonic() - t0)
    return final


def write_bmap(image: Path) -> Path:
    """A block map (bmaptool) so `bmaptool copy` writes only the mapped blocks."""
    final = image.with_name(image.name + ".bmap")
    with atomic_path(final) as tmp:
        run(
            ["bmaptool", "create", "-o", str(tmp), str(image)],
            what=f"bmaptool create for {image.name}",
        )
        os.chmod(tmp, 0o644)
    return final


IMAGER_DEVICES = ["pi5-64bit", "pi4-64bit", "pi3-64bit"]
IMAGER_ICON = "piimage-node.png"  # the list's icon for every node, written beside os_list.json


def node_icon_png(size: int = 40) -> bytes:
    """Our own icon, drawn here: a dark rack unit with three green lights (a PNG, RGBA)."""
    import struct
    import zlib

    rows = []
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            inside = 3 <= x < size - 3 and 6 <= y < size - 6
            light = (
                inside
                and 12 <= y < size - 12
                and any(c - 3 <= x < c + 3 for c in (size // 4, size // 2, 3 * size // 4))
            )
            row += bytes(
                (60, 200, 90, 255) if light else (40, 44, 52, 255) if inside else (0, 0, 0, 0)
            )
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", size, size, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
        + chunk(b"IEND", b"")
    )


def write_imager_repo(
    out: Path, cluster_name: str, nodes: dict[str, dict[str, Any]], url_base: str | None
) -> Path:
    """An os_list for Raspberry Pi Imager (`rpi-imager --repo out/<cluster>/os_list.json`), one
    entry per node image present, with the fields Imager's schema requires of an image
    (name, description, icon, url, sizes and digests, release_date, devices; rpi-imager's
    doc/json-schema/os-list-schema.json) and bmap_url where the .bmap is there.
    init_format is "none": the identity is baked in, and Imager 2.x offers no customisation
    for "none" (rpi-imager src/imagewriter.cpp reads it as no format), which would otherwise
    add a second user and hostname on top of ours. Imager 1.x does not know "none" and
    assumes "systemd" (its doc/os_customisation_formats.md): README says to answer No."""
    items = []
    icon = out / IMAGER_ICON
    data = node_icon_png()
    if not icon.is_file() or icon.read_bytes() != data:
        write_atomic(icon, data)
    for host, info in sorted(nodes.items()):
        img = out / info["image"]
        if not img.exists():
            continue
        dl = next(
            (
                img.with_name(img.name + s)
                for s in (".xz", ".zst", ".gz")
                if img.with_name(img.name + s).exists()
            ),
            img,
        )
        dl_sha = _sidecar_digest(dl) or sha256_file(dl)
        base = url_base if url_base is not None else out.resolve().as_uri() + "/"
        items.append(
            {
                "name": f"{cluster_name}: {host} ({info['role']})",
                "description": f"piimage node image for {host} of cluster {cluster_name}: identity, network and services baked in.",
                "url": base + dl.name,
                "extract_size": img.stat().st_size,
                "extract_sha256": info["sha256"],
                "image_download_size": dl.stat().st_size,
                "image_download_sha256": dl_sha,
                "release_date": info.get("release_date", ""),
                "devices": IMAGER_DEVICES,
                "init_format": "none",
                "icon": base + IMAGER_ICON,
            }
        )
        bmap = img.with_name(img.name + ".bmap")
        if bmap.exists():
            items[-1]["bmap_url"] = base + bmap.name
    path = out / "os_list.json"
    write_atomic(path, json.dumps({"os_list": items}, indent=2) + "\n")
    return path


def _sidecar_digest(path: Path) -> str | None:
    side = sidecar(path)
    if side.exists():
        fields = side.read_text().split()
        if len(fields) == 2 and fields[1] == path.name:
            return fields[0]
    return None


def write_sha256sums(out: Path) -> Path:
    """SHA256SUMS over every published file of the folder (sidecar digests reused)."""
    lines = []
    for p in sorted(out.iterdir()):
        if p.name.startswith(".") or p.name == "SHA256SUMS" or not p.is_file():
            continue
        lines.append(checksum_line(_sidecar_digest(p) or sha256_file(p), p.name))
    path = out / "SHA256SUMS"
    write_atomic(path, "".join(lines))
    return path


def update_manifest(
    path: Path, cluster: dict[str, Any], base: dict[str, Any], nodes: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """manifest.json lists every node image in the folder; a build of some nodes updates their
    entries and keeps the others."""
    old: dict[str, Any] = {}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
    merged_nodes = (
        dict(old.get("nodes", {}))
        if old.get("cluster", {}).get("name") == cluster.get("name")
        else {}
    )
    merged_nodes.update(nodes)
    doc = {
        "piimage_version": __version__,
        "cluster": cluster,
        "base": base,
        "nodes": dict(sorted(merged_nodes.items())),
    }
    write_atomic(path, json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return doc
