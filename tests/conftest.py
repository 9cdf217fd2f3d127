"""What the whole suite shares, loaded first by every pytest process, the pytest-xdist
controller included (it collects nothing, so tests/integration/conftest.py never loads there):
the table of the expensive phases at the end of a run, and the controller's side of
scripts/test's two lanes."""

from __future__ import annotations

import sys
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


class _LaneReports:
    """Controller side of the lanes: collects each worker's phases as it ends, and stops a
    run whose lanes xdist did not group."""

    def __init__(self, config):
        self.config = config

    @pytest.hookimpl
    def pytest_testnodedown(self, node, error):
        phases.merge(getattr(node, "workeroutput", {}).get("piimage_phases", ()), node.gateway.id)

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


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_LaneReports(config), "piimage-lane-reports")
