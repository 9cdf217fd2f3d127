"""Output files: compression round trips, sidecars, SHA256SUMS, the Imager repository file."""

import hashlib
import json
import os
import subprocess

import pytest

from piimage.output import compress, update_manifest, write_imager_repo, write_sha256sums

DECOMPRESS = {"xz": ["xz", "-dc"], "zstd": ["zstd", "-dcq"], "gzip": ["gzip", "-dc"]}
SUFFIX = {"xz": ".xz", "zstd": ".zst", "gzip": ".gz"}


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "node01.img"
    p.write_bytes(os.urandom(1 << 20) + bytes(3 << 20))
    return p


@pytest.mark.parametrize("fmt", ["xz", "zstd", "gzip"])
def test_compress_round_trip(image, fmt):
    packed = compress(image, fmt)
    assert packed.name == "node01.img" + SUFFIX[fmt]
    assert (
        subprocess.run([*DECOMPRESS[fmt], str(packed)], capture_output=True, check=True).stdout
        == image.read_bytes()
    )
    digest = hashlib.sha256(packed.read_bytes()).hexdigest()
    assert packed.with_name(packed.name + ".sha256").read_text() == f"{digest}  {packed.name}\n"
    assert not [p for p in image.parent.iterdir() if p.name.startswith(".")]


def test_no_compression(image):
    assert compress(image, "none") is None


def test_repo_manifest_and_sums(image, tmp_path):
    out = image.parent
    compress(image, "xz")
    raw_sha = hashlib.sha256(image.read_bytes()).hexdigest()
    doc = update_manifest(
        out / "manifest.json",
        {"name": "lab"},
        {"name": "base", "sha256": "0" * 64},
        {
            "node01": {
                "role": "compute",
                "image": "node01.img",
                "sha256": raw_sha,
                "release_date": "2026-11-24",
            }
        },
    )
    # a later build of another node keeps node01's entry
    doc = update_manifest(
        out / "manifest.json",
        {"name": "lab"},
        {"name": "base", "sha256": "0" * 64},
        {"node02": {"role": "compute", "image": "node02.img", "sha256": "1" * 64}},
    )
    assert set(doc["nodes"]) == {"node01", "node02"}
    repo = json.loads(
        write_imager_repo(out, "lab", doc["nodes"], "https://example.org/lab/").read_text()
    )
    (item,) = repo["os_list"]  # node02.img does not exist: not listed
    xz = out / "node01.img.xz"
    assert item["url"] == "https://example.org/lab/node01.img.xz"
    assert item["extract_size"] == image.stat().st_size and item["extract_sha256"] == raw_sha
    assert item["image_download_size"] == xz.stat().st_size
    assert item["image_download_sha256"] == hashlib.sha256(xz.read_bytes()).hexdigest()
    assert item["init_format"] == "none"
    # the icon Imager's schema requires, our own PNG beside the list; no .bmap, no bmap_url
    assert item["icon"] == "https://example.org/lab/piimage-node.png" and "bmap_url" not in item
    png = (out / "piimage-node.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    assert int.from_bytes(png[16:20], "big") == 40  # width
    sums = write_sha256sums(out)
    subprocess.run(["sha256sum", "-c", "--quiet", sums.name], cwd=out, check=True)
    assert "manifest.json" in sums.read_text() and "SHA256SUMS" not in sums.read_text()
