"""What the whole suite shares, loaded first by every pytest process, the pytest-xdist
controller included (it collects nothing, so tests/integration/conftest.py never loads there):
the table of the expensive phases at the end of a run, and the controller's side of
scripts/test's two lanes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "integration"))
import phases  # noqa: E402  (tests/integration/phases.py)


def pytest_terminal_summary(terminalreporter):
    """The expensive phases of this run and their wall time (scripts/test prints this last)."""
    if phases.PHASES:
        terminalreporter.section("time of the expensive phases")
        for line in phases.summary():
            terminalreporter.write_line(line)
    if phases.DISK:
        terminalreporter.section("disk space")
        for line in phases.disk_lines():
            terminalreporter.write_line(line)


class _LaneReports:
    """Controller side of the lanes: collects each worker's phases as it ends, and stops a
    run whose lanes xdist did not group."""

    def __init__(self, config):
        self.config = config

    @pytest.hookimpl
    def pytest_testnodedown(self, node, error):
        out = getattr(node, "workeroutput", {})
        phases.merge(out.get("piimage_phases", ()), node.gateway.id, out.get("piimage_disk"))

    @pytest.hookimpl
    def pytest_xdist_node_collection_finished(self, node, ids):
        """Every integration test has a lane (tests/integration/conftest.py), which xdist's
        loadgroup adds to its node ID (@bookworm, @trixie). Untagged, both workers would run
        tests of one release at once: two dockerds, one layer built twice, leftover checks
        that see the other worker's builds."""
        if self.config.getoption("dist", None) != "loadgroup":
            return
        untagged = [i for i in ids if i.startswith("tests/integration/") and "@" not in i]
        if untagged:
            pytest.exit(
                f"pytest-xdist's --dist loadgroup did not group the tests (pytest "
                f"{pytest.__version__}, pytest-dev/pytest-xdist#1386; e.g. {untagged[0]}): "
                "install pyproject.toml's test extra (pytest<9.2), or run with "
                "PIIMAGE_TEST_LANES=0",
                returncode=4,
            )


# The caches a run keeps for the next (tests/integration/clihelp.py's PERSISTENT_CACHE): role
# layers, one per profile and base, ~1-3 GB each, and nothing else ever removes those that the
# code no longer makes. A machine that runs the suite again and again (CI's does) fills its disk:
# one CI run found 1.6 GiB free and a build refused to start. So each run first trims the layer
# cache to LAYER_CACHE_CAP, least recently used first (piimage's own `cache --prune`).
LAYER_CACHE_CAP = 24 * 2**30


def _trim_layer_cache() -> None:
    import os

    from piimage import cache

    root = Path(os.environ.get("PIIMAGE_TEST_CACHE", Path.home() / ".cache" / "piimage"))
    layers = root / "layers"
    if not layers.is_dir():
        return
    saved = os.environ.get("PIIMAGE_LAYER_CACHE")
    os.environ["PIIMAGE_LAYER_CACHE"] = str(layers)
    try:
        found = [e for e in cache.entries() if e.kind == "role layer"]
        chosen = cache.to_prune(
            found, older_than_days=None, max_bytes=LAYER_CACHE_CAP, now=time.time()
        )
        gone = cache.prune(chosen, dry_run=False)
    finally:
        if saved is None:
            os.environ.pop("PIIMAGE_LAYER_CACHE", None)
        else:
            os.environ["PIIMAGE_LAYER_CACHE"] = saved
    if gone:
        freed = sum(e.size for e in gone) / 2**30
        print(f"tests: trimmed the layer cache {layers}: {len(gone)} old layers, {freed:.1f} GiB")


def _remove_earlier_runs(config) -> None:
    """Earlier runs' temporary folders (/tmp/pytest-of-<user>/pytest-<N>, tens of GB when a
    run failed or was killed) that no running pytest holds: pytest removes the ones past
    tmp_path_retention_count only when a session ends, so the last run's stay on the disk for
    the whole of this one (stop 23's CI run, pytest-1, filled its disk in the bookworm
    rehearsal). A folder is held while its .lock names a live process."""
    import os
    import shutil

    from piimage.emulate import mounts_under

    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or factory._given_basetemp is not None:
        return  # --basetemp: the user's folder, not pytest's numbered ones
    current = factory.getbasetemp()
    for old in current.parent.glob("pytest-[0-9]*"):
        if old == current or old.is_symlink() or not old.is_dir():
            continue
        try:
            pid = int((old / ".lock").read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid:
            try:
                os.kill(pid, 0)
                continue  # a pytest still running there
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        mounted = mounts_under(old)
        if mounted:  # a killed run's chroot binds (/dev, /proc) must not be emptied
            print(f"tests: kept an earlier run's {old}: {mounted[0]} is mounted there")
            continue
        size = sum(
            f.stat().st_blocks * 512 for f in old.rglob("*") if f.is_file() and not f.is_symlink()
        )
        shutil.rmtree(old, ignore_errors=True)
        print(f"tests: removed an earlier run's {old} ({size / 2**30:.1f} GiB)")


def pytest_sessionstart(session):
    """The controller (or the one process without xdist) trims the layer cache and removes
    earlier runs' temporary folders before any test: a worker must not, it would race the
    other worker's builds."""
    if not hasattr(session.config, "workerinput"):
        _remove_earlier_runs(session.config)
        _trim_layer_cache()


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_LaneReports(config), "piimage-lane-reports")
