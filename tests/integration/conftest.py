"""Shared fixtures for the integration tests: the stand-in base image, served over HTTP.

Raspberry Pi's servers are out of reach here, so integration tests start from the stand-in
(`scripts/standin-image`): an arm64 Debian image laid out like Raspberry Pi OS Lite, published
as `.img.xz` + `.sha256` + `os_list.json` exactly as downloads.raspberrypi.com publishes the
real one. The first run on a machine builds it (minutes: bookworm ~3, trixie ~10); later runs
take it from the cache (`$PIIMAGE_CACHE/standin/`, default `~/.cache/piimage/standin/`) in
seconds. The script rebuilds by itself when it changes.

Fixtures (all session-scoped, so a session builds or publishes each suite at most once):

``standin_server``
    A loopback HTTP server (with Range requests, so resumed downloads can be tested) serving
    one directory; ``.url_base`` ("http://127.0.0.1:<port>/"), ``.dir`` (Path),
    ``.os_list_url``. Every stand-in below is published into that directory, so one
    ``os_list.json`` lists each suite a session asked for.

``standin``
    Factory: ``standin("trixie")`` or ``standin("bookworm")`` → :class:`StandIn` with
    ``dir``, ``image_xz``, ``sha256_file``, ``os_list`` (paths), ``url`` (image URL on the
    server), ``os_list_url``, ``item`` (the image's os_list entry: ``extract_size``,
    ``extract_sha256``, ``image_download_sha256``, ``init_format``, …).

``standin_bookworm`` / ``standin_trixie``
    The same as ``standin("bookworm")`` / ``standin("trixie")``.

``run_standin``
    The function behind these: ``run_standin(suite, out_dir, url_base, *extra_args)`` runs
    the script into any directory and returns the CompletedProcess (stdout: published paths).

``standin_raw``
    Factory: ``standin_raw("bookworm")`` → Path of the decompressed raw ``.img``, made once
    per session (deleted at its end). Treat it as read-only: copy it before writing to it.

The published files are hard links into the cache: never modify them in place.

Example::

    @pytest.mark.integration
    @pytest.mark.slow
    def test_download(standin_trixie, tmp_path, monkeypatch):
        monkeypatch.setenv("PIIMAGE_OS_LIST_URL", standin_trixie.os_list_url)
        ...

A machine that cannot build the stand-in (not root, a missing tool) skips these tests with
the script's own message; a build that fails fails them.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import phases
import pytest
from clihelp import PERSISTENT_CACHE, home_with_key

REPO = Path(__file__).resolve().parents[2]
STANDIN_SCRIPT = REPO / "scripts" / "standin-image"
BUILD_TIMEOUT = 3600  # a cold trixie build takes ~10 min on 2 cores; leave room for slow mirrors


class _RangeHandler(SimpleHTTPRequestHandler):
    """Static files with single-range `Range: bytes=a-b` support (206 / 416), quiet."""

    def log_message(self, format, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not rng or not path.is_file():
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        size = path.stat().st_size
        if not m or (m.group(1) == "" and m.group(2) == ""):
            return super().send_head()
        if m.group(1) == "":  # suffix range: the last N bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        else:
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        if start >= size or start > end:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        f = open(path, "rb")  # noqa: SIM115 - do_GET/do_HEAD close it
        f.seek(start)
        self.send_response(HTTPStatus.PARTIAL_CONTENT)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile):
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            return super().copyfile(source, outputfile)
        try:
            while remaining > 0:
                buf = source.read(min(1 << 20, remaining))
                if not buf:
                    break
                outputfile.write(buf)
                remaining -= len(buf)
        finally:
            self._remaining = None


@dataclass
class StandInServer:
    dir: Path
    url_base: str
    _server: ThreadingHTTPServer = field(repr=False)

    @property
    def os_list_url(self) -> str:
        return self.url_base + "os_list.json"


@dataclass(frozen=True)
class StandIn:
    suite: str
    dir: Path
    image_xz: Path
    sha256_file: Path
    os_list: Path
    url: str
    os_list_url: str
    item: dict


def find_os_list_item(doc: dict, basename: str) -> dict:
    """The os_list entry (at any depth of `subitems`) whose URL ends with basename."""
    stack = list(doc.get("os_list", []))
    while stack:
        it = stack.pop()
        if "subitems" in it:
            stack.extend(it["subitems"])
        elif str(it.get("url", "")).endswith("/" + basename):
            return it
    raise LookupError(f"no os_list entry for {basename}")


# The lanes' priorities: the bookworm + Docker lane is the suite's critical path (run of
# 2026-12-06: it ended at 58 min, the trixie lane at 45, with the bookworm lane's builds at
# nice 10), so the trixie lane's builds run at a lower CPU priority and take what the bookworm
# lane leaves. Rehearsals do not: a starved VM would time out inside, which no Pi does.
BEHIND = 10  # nice(1) of the trixie lane's builds
NICE = {"trixie": BEHIND, "bookworm": 0}


def _at_priority(nice: int):
    return lambda: os.setpriority(os.PRIO_PROCESS, 0, nice)


def run_standin_script(
    suite: str, out: Path, url_base: str, *extra: str
) -> subprocess.CompletedProcess:
    """Run scripts/standin-image; skip when the host cannot build it, fail when it breaks."""
    proc = subprocess.run(
        [str(STANDIN_SCRIPT), "--suite", suite, "--out", str(out), "--url-base", url_base, *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        preexec_fn=_at_priority(NICE.get(suite, 0)),
    )
    if proc.returncode == 2:
        pytest.skip(f"cannot build the {suite} stand-in here: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(
            f"standin-image --suite {suite} failed (exit {proc.returncode}):\n"
            + "\n".join(proc.stderr.splitlines()[-30:])
        )
    return proc


@pytest.fixture(scope="session")
def run_standin():
    return run_standin_script


@pytest.fixture(scope="session")
def standin_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("standin")
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield StandInServer(
            dir=root, url_base=f"http://127.0.0.1:{server.server_port}/", _server=server
        )
    finally:
        server.shutdown()
        server.server_close()


SUITES = ("bookworm", "trixie")


def _suites_needed(session: pytest.Session) -> set[str]:
    """The stand-ins the collected tests will ask for (fixture closures name them)."""
    need: set[str] = set()
    for item in session.items:
        names = set(getattr(item, "fixturenames", ()))
        need |= {s for s in SUITES if f"standin_{s}" in names}
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        need |= {params.get(k) for k in ("suite", "rehearsal")} & set(SUITES)
    return need


@pytest.fixture(scope="session")
def standin(standin_server, request, tmp_path_factory):
    """The first request builds every stand-in the session needs at once, one process per
    suite: each build is mostly one emulated dpkg at a time, so two of them use both cores
    (cold: bookworm ~3 min and trixie ~10 min one after the other). Each is built into a
    private folder (filling the cache), then published into the server's folder from the
    cache, one suite at a time, since publishing merges into one os_list.json."""
    made: dict[str, StandIn] = {}
    builds: dict[str, Future] = {}
    pool = ThreadPoolExecutor(max_workers=len(SUITES), thread_name_prefix="standin")
    scratch = tmp_path_factory.mktemp("standin-builds")

    def build(suite: str) -> None:
        with phases.timed(f"stand-in {suite} (build or cache)"):
            run_standin_script(suite, scratch / suite, standin_server.url_base)

    def start(*suites: str) -> None:
        for s in sorted(_suites_needed(request.session) | set(suites)):
            if s not in builds:
                builds[s] = pool.submit(build, s)

    def get(suite: str) -> StandIn:
        if suite not in made:
            start(suite)
            builds[suite].result()  # re-raises the build's skip or failure here
            run_standin_script(suite, standin_server.dir, standin_server.url_base)
            d = standin_server.dir
            basename = f"raspios-standin-{suite}-arm64-lite.img.xz"
            doc = json.loads((d / "os_list.json").read_text())
            made[suite] = StandIn(
                suite=suite,
                dir=d,
                image_xz=d / basename,
                sha256_file=d / f"{basename}.sha256",
                os_list=d / "os_list.json",
                url=standin_server.url_base + basename,
                os_list_url=standin_server.os_list_url,
                item=find_os_list_item(doc, basename),
            )
        return made[suite]

    get.start = start  # type: ignore[attr-defined]
    try:
        yield get
    finally:
        for f in builds.values():
            f.cancel()
        pool.shutdown(wait=True)


@pytest.fixture(scope="session", autouse=True)
def _standins_from_the_start(standin):
    """The stand-ins start building with the first integration test, whatever it needs (the
    Docker tests, which run first, need the bookworm one only at their last step)."""
    phases.sample_disk("the start", _DISK_PATHS)
    standin.start()


@pytest.fixture(scope="session")
def standin_bookworm(standin) -> StandIn:
    return standin("bookworm")


@pytest.fixture(scope="session")
def standin_trixie(standin) -> StandIn:
    return standin("trixie")


@pytest.fixture(scope="session")
def standin_raw(standin, tmp_path_factory):
    raws: dict[str, Path] = {}
    workdir = tmp_path_factory.mktemp("standin-raw")

    def get(suite: str) -> Path:
        if suite not in raws:
            s = standin(suite)
            raw = workdir / s.image_xz.name.removesuffix(".xz")
            tmp = raw.with_name(raw.name + ".partial")
            h = hashlib.sha256()
            with lzma.open(s.image_xz) as fi, open(tmp, "wb") as fo:
                while buf := fi.read(4 << 20):
                    h.update(buf)
                    if buf.count(0) == len(buf):
                        fo.seek(len(buf), os.SEEK_CUR)  # keep the raw image sparse
                    else:
                        fo.write(buf)
                fo.truncate()
            assert h.hexdigest() == s.item["extract_sha256"], f"{suite}: raw image digest mismatch"
            tmp.rename(raw)
            raws[suite] = raw
        return raws[suite]

    yield get
    shutil.rmtree(workdir, ignore_errors=True)


# The environment piimage runs in for the end-to-end tests: a fresh HOME with an SSH key, a fresh
# download cache per session, role layers and apt archives kept in the machine's cache.
@pytest.fixture(scope="session")
def env(tmp_path_factory, standin_server):
    home = home_with_key(tmp_path_factory.mktemp("home"), "tester@laptop")
    e = dict(os.environ)
    e.pop("SUDO_USER", None)
    e.update(
        HOME=str(home),
        PIIMAGE_CACHE=str(tmp_path_factory.mktemp("cache")),
        PIIMAGE_LAYER_CACHE=str(PERSISTENT_CACHE / "layers"),
        PIIMAGE_APT_CACHE=str(PERSISTENT_CACHE / "apt-archives"),
        # lists every stand-in published so far: a test asks for its release's stand-in
        # (standin_trixie, standin_bookworm) before it builds from it
        PIIMAGE_OS_LIST_URL=standin_server.os_list_url,
    )
    return e


def pytest_sessionfinish(session):
    """On a pytest-xdist worker: hand this worker's phases to the controller, which prints
    them (tests/conftest.py; the workers' own terminal summaries are not shown)."""
    out = getattr(session.config, "workeroutput", None)
    if out is not None:
        out["piimage_phases"] = phases.export()
        out["piimage_disk"] = phases.export_disk()


def _release(item) -> str | None:
    """The release an integration test works on: its stand-in fixture, or a "suite" or
    "rehearsal" parameter; None when it names none."""
    names = set(getattr(item, "fixturenames", ()))
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    for suite in SUITES:
        if f"standin_{suite}" in names or suite in (params.get("suite"), params.get("rehearsal")):
            return suite
    return None


def pytest_runtest_setup(item):
    """Before a test and the fixtures it sets up: this worker's CPU priority for its lane
    (NICE; everything the test starts inherits it), the rehearsals at the normal one."""
    if "/tests/integration/" not in str(item.path):
        return
    rehearsal = item.path.name == "test_rehearse.py"
    nice = 0 if rehearsal else NICE.get(_release(item) or "bookworm", 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)


def pytest_runtest_logfinish(nodeid, location):
    """After each integration test: the free space where the suite writes (phases.DISK)."""
    if nodeid.startswith("tests/integration/"):
        phases.sample_disk(nodeid.split("::", 1)[-1], _DISK_PATHS)


# where the suite writes: its temporary folders and the caches it keeps (one filesystem here)
_DISK_PATHS = (tempfile.gettempdir(), str(PERSISTENT_CACHE))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Order and lanes for a machine with nothing cached, so both cores have work from the
    start. The order: the unit tests; then the Docker tests (their images need no stand-in);
    then what needs only the bookworm stand-in (~10 min to build, while trixie's takes ~20
    on the other core); the trixie tests last. The order within each group is kept.

    The lanes (scripts/test runs pytest-xdist with two workers, `--dist loadgroup`): the
    Docker and bookworm tests are one xdist group, the trixie tests another, so the two
    releases run side by side, each in one worker that builds its role layers once and boots
    its one virtual cluster; the unit tests go to whichever worker is free. Since emulated
    programs run as a Pi's CPU (piboot.CPU) the trixie lane is the shorter one (run of
    2026-12-03: it ended at 40 min, the bookworm lane at 97), so the trixie tests that only
    read cached layers and need no boot, marked `late_in_trixie_lane`, run last in the trixie
    lane, after its rehearsal (they used to run at the end of the bookworm lane). Without
    xdist the marks only order them last. (tryfirst: xdist's worker reads
    the marks in its own hook of the same name.)"""

    def rank(item) -> float:
        if "/tests/unit/" in str(item.path):
            return 0
        if item.get_closest_marker("late_in_trixie_lane"):
            return 3.5
        if _release(item) == "trixie":
            return 3
        return 1 if "docker" in getattr(item, "fixturenames", ()) else 2

    items.sort(key=rank)
    for item in items:
        r = rank(item)
        if r:
            item.add_marker(pytest.mark.xdist_group("trixie" if r >= 3 else "bookworm"))
