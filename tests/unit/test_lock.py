"""piimage.lock: which base a cluster's builds use, and the refusal of mixed Slurm releases."""

from __future__ import annotations

import pytest
import yaml

from piimage import lock
from piimage.errors import UserError
from piimage.fetch import BaseImage, BaseSpec

SHA = "ab" * 32


def _base(sha=SHA, url="https://downloads.example/2025-10-01-lite.img.xz") -> BaseImage:
    return BaseImage("Raspberry Pi OS Lite (64-bit)", url, sha, None, 0, "2025-10-01")


def _write(tmp_path, nodes=None, asked="raspios-lite-arm64"):
    path = tmp_path / lock.LOCK_NAME
    building = nodes or {"head": {"role": "head", "release": "trixie", "slurm": "24.11"}}
    lock.write(path, None, asked, _base(), building, set(building))
    return path


def test_write_then_read_round_trip(tmp_path):
    path = _write(tmp_path)
    text = path.read_text()
    assert text.startswith("# Written by piimage build")
    got = lock.read(path)
    assert got.base == {
        "asked": "raspios-lite-arm64",
        "name": "Raspberry Pi OS Lite (64-bit)",
        "url": "https://downloads.example/2025-10-01-lite.img.xz",
        "sha256": SHA,
        "release_date": "2025-10-01",
    }
    assert got.nodes["head"]["slurm"] == "24.11" and got.nodes["head"]["built"].endswith("Z")


def test_the_locked_base_is_used_while_cluster_yaml_asks_for_the_same(tmp_path):
    got = lock.read(_write(tmp_path))
    spec = BaseSpec("imager", "raspios-lite-arm64")
    used = lock.locked_spec(got, spec, update=False)
    assert used == BaseSpec(
        "url",
        "https://downloads.example/2025-10-01-lite.img.xz",
        SHA,
        name="Raspberry Pi OS Lite (64-bit)",
        release_date="2025-10-01",
    )
    # --update-base, or another base in cluster.yaml: resolved anew
    assert lock.locked_spec(got, spec, update=True) is spec
    other = BaseSpec("imager", "raspios-lite-arm64-legacy")
    assert lock.locked_spec(got, other, update=False) is other
    # exact bases are not locked: a local file, a URL with its digest
    exact = BaseSpec("url", "https://x/y.img.xz", "cd" * 32)
    assert lock.locked_spec(got, exact, update=False) is exact
    assert not lock.lockable(BaseSpec("path", "/images/a.img"))
    assert lock.locked_spec(None, spec, update=False) is spec


def test_other_nodes_keep_their_entries_and_removed_nodes_go(tmp_path):
    path = _write(
        tmp_path,
        {
            "head": {"role": "head", "release": "trixie", "slurm": "24.11"},
            "node01": {"role": "compute", "release": "trixie", "slurm": "24.11"},
            "node09": {"role": "compute", "release": "trixie", "slurm": "24.11"},
        },
    )
    first = lock.read(path)
    lock.write(
        path,
        first,
        "raspios-lite-arm64",
        _base("cd" * 32),
        {"node01": {"role": "compute", "release": "trixie", "slurm": "24.11"}},
        {"head", "node01"},  # node09 left the inventory
    )
    again = lock.read(path)
    assert again.base["sha256"] == "cd" * 32
    assert sorted(again.nodes) == ["head", "node01"]
    assert again.nodes["head"] == first.nodes["head"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("base: [", "cannot read the lock"),
        ("nodes: {}\n", "base: missing"),
        ("base: {asked: x, url: 'https://x/y.img.xz'}\n", "base.sha256: missing or not text"),
        (
            "base: {asked: x, url: 'https://x/y.img.xz', sha256: abc}\n",
            "base.sha256: 'abc' is not 64 lowercase hexadecimal digits",
        ),
        (
            f"base: {{asked: x, url: 'https://x/y.img.xz', sha256: {SHA}}}\nnodes: [a]\n",
            "nodes: expected a mapping",
        ),
    ],
)
def test_a_damaged_lock_names_the_file_and_key(tmp_path, text, problem):
    path = tmp_path / lock.LOCK_NAME
    path.write_text(text)
    with pytest.raises(UserError) as e:
        lock.read(path)
    assert str(e.value).startswith(f"{path}: ") and problem in str(e.value)
    assert "remove piimage.lock" in e.value.hint


def test_slurm_release_from_package_versions():
    assert lock.slurm_release({"slurmd": "24.11.5-4"}) == "24.11"
    assert lock.slurm_release({"slurm-client": "22.05.8-4+deb12u3"}) == "22.05"
    assert lock.slurm_release({"slurmctld": "1:23.11.4-2"}) == "23.11"
    assert lock.slurm_release({"openmpi-bin": "4.1.4-3"}) is None


def test_releases_that_talk():
    assert lock.talk("24.11", "24.11") and lock.talk("24.11", "23.11")
    assert lock.talk("24.11", "23.02") and not lock.talk("24.11", "22.05")
    assert not lock.talk("22.05", "24.11")  # a slurmd newer than its controller


def _lock_with(tmp_path, nodes) -> lock.Lock:
    return lock.read(_write(tmp_path, nodes))


def test_a_new_node_on_a_release_the_controller_cannot_talk_to_is_refused(tmp_path):
    old = _lock_with(
        tmp_path,
        {
            "head": {"role": "head", "release": "bookworm", "slurm": "22.05"},
            "node01": {"role": "compute", "release": "bookworm", "slurm": "22.05"},
        },
    )
    new = {"node02": {"role": "compute", "release": "trixie", "slurm": "24.11"}}
    with pytest.raises(UserError) as e:
        lock.check_mixed(old, new, "head", {"head", "node01", "node02"})
    assert str(e.value) == (
        "these nodes would run Slurm releases that cannot work together: node02: Slurm 24.11 "
        "(the controller head runs Slurm 22.05, which talks to 22.05, 21.08, 20.11 only)"
    )
    assert "--all" in e.value.hint
    # rebuilding every node from the new base is fine
    every = {h: dict(new["node02"]) for h in ("head", "node01", "node02")}
    lock.check_mixed(old, every, "head", {"head", "node01", "node02"})
    # an older compute node within the new controller's window is fine too
    newer_head = {"head": {"role": "head", "release": "x", "slurm": "24.11"}}
    mid = _lock_with(tmp_path, {"node01": {"role": "compute", "release": "x", "slurm": "23.11"}})
    lock.check_mixed(mid, newer_head, "head", {"head", "node01"})


def test_a_controller_rebuilt_on_a_newer_release_names_the_nodes_left_behind(tmp_path):
    old = _lock_with(
        tmp_path,
        {
            "head": {"role": "head", "release": "bookworm", "slurm": "22.05"},
            "node01": {"role": "compute", "release": "bookworm", "slurm": "22.05"},
            "gone": {"role": "compute", "release": "bookworm", "slurm": "22.05"},
        },
    )
    head = {"head": {"role": "head", "release": "trixie", "slurm": "24.11"}}
    with pytest.raises(UserError, match=r"node01: Slurm 22.05 \(as last built\)") as e:
        lock.check_mixed(old, head, "head", {"head", "node01"})
    assert "gone" not in str(e.value)  # no longer in the inventory


def test_the_lock_is_plain_yaml(tmp_path):
    doc = yaml.safe_load(_write(tmp_path).read_text())
    assert set(doc) == {"base", "nodes"}
