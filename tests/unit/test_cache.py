"""`piimage cache`: listing and pruning the caches (a fake cache folder, real files and locks)."""

from __future__ import annotations

import fcntl
import os
import time

import pytest
from click.testing import CliRunner

from piimage import cache
from piimage.cli import main

DAY = 86400


def _layer(root, name: str, mb: int, days_ago: float):
    layers = root / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    img, desc = layers / f"{name}.img", layers / f"{name}.json"
    img.write_bytes(b"\1" * (mb << 20))
    desc.write_text("{}")
    t = time.time() - days_ago * DAY
    os.utime(desc, (t, t))
    return img, desc


def _base(root, sha: str, mb: int, days_ago: float):
    d = root / "images" / sha
    d.mkdir(parents=True)
    (d / "image.img").write_bytes(b"\2" * (mb << 20))
    (d / "info.json").write_text("{}")
    t = time.time() - days_ago * DAY
    os.utime(d / "info.json", (t, t))
    return d


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("PIIMAGE_CACHE", str(tmp_path))
    monkeypatch.delenv("PIIMAGE_LAYER_CACHE", raising=False)
    monkeypatch.delenv("PIIMAGE_APT_CACHE", raising=False)
    return tmp_path


def test_listing_names_every_entry_with_size_and_last_use(root):
    _layer(root, "head-aaaa", 2, 40)
    _base(root, "b" * 64, 3, 1)
    (root / "apt-archives" / "arm64").mkdir(parents=True)
    (root / "apt-archives" / "arm64" / "x.deb").write_bytes(b"\3" * (1 << 20))
    out = CliRunner().invoke(main, ["cache"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:3] == ["role", "layer", "head-aaaa"]
    assert "2.0 MiB" in lines[0] and "used 40 days ago" in lines[0]
    assert lines[1].split()[:3] == ["base", "image", "b" * 16]
    assert "3.0 MiB" in lines[1] and "used 1 days ago" in lines[1]
    assert lines[2].startswith("apt archive") and "1.0 MiB" in lines[2]
    assert lines[3].split()[:2] == ["in", "all"] and "6.0 MiB" in lines[3]


def test_prune_by_age_removes_old_entries_whole_and_keeps_recent_ones(root):
    old_img, old_desc = _layer(root, "compute-old", 1, 45)
    new_img, _ = _layer(root, "compute-new", 1, 2)
    old_base = _base(root, "c" * 64, 1, 60)
    out = CliRunner().invoke(main, ["cache", "--prune"])  # 30 days by default
    assert out.exit_code == 0, out.output
    assert not old_img.exists() and not old_desc.exists() and not old_base.exists()
    assert new_img.exists()
    assert "removed 2 entries, 2.0 MiB; the caches hold 1.0 MiB" in out.output


def test_prune_to_a_size_goes_oldest_first_and_dry_run_removes_nothing(root):
    a, _ = _layer(root, "compute-a", 2, 10)
    b, _ = _layer(root, "compute-b", 2, 5)
    c, _ = _layer(root, "compute-c", 2, 1)
    dry = CliRunner().invoke(main, ["cache", "--prune", "--max-size", "3M", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "would remove 2 entries" in dry.output and a.exists() and b.exists()
    out = CliRunner().invoke(main, ["cache", "--prune", "--max-size", "3M"])
    assert out.exit_code == 0, out.output
    assert not a.exists() and not b.exists() and c.exists()


def test_an_entry_a_build_holds_is_left_and_a_fresh_base_image_is_never_pruned(root):
    img, _ = _layer(root, "head-busy", 1, 90)
    base = _base(root, "d" * 64, 1, 0.01)  # used minutes ago: perhaps by a build right now
    with open(img.with_name(f".{img.stem}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # what a build making or using it holds
        out = CliRunner().invoke(main, ["cache", "--prune", "--max-size", "0"])
    assert out.exit_code == 0, out.output
    assert img.exists() and base.exists()
    assert "removed 0 entries" in out.output


def test_bad_options_are_refused_with_the_option_named(root):
    out = CliRunner().invoke(main, ["cache", "--prune", "--max-size", "lots"])
    assert out.exit_code == 2 and "--max-size: 'lots' is not a size" in out.output
    out = CliRunner().invoke(main, ["cache", "--older-than", "3"])
    assert out.exit_code == 2 and "go with --prune" in out.output


def test_sizes_parse_as_binary_units():
    assert cache.parse_size("20G") == 20 << 30
    assert cache.parse_size("500MiB") == 500 << 20
    assert cache.parse_size("1.5k") == 1536
    assert cache.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        cache.parse_size("-1G")
