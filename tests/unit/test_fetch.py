"""fetch.py against a loopback HTTP server: resolution, resume, verification, caching."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from piimage import fetch
from piimage.errors import BuildError, ChecksumError, UserError

RAW = (b"\0" * (1 << 20)) + os.urandom(3 << 20) + (b"\0" * (2 << 20))
XZ = lzma.compress(RAW, preset=0)
SHA_XZ = hashlib.sha256(XZ).hexdigest()
SHA_RAW = hashlib.sha256(RAW).hexdigest()


class Server:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()  # paths whose next full response breaks off midway
        self.no_range = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def count(self, path: str) -> int:
        return sum(1 for p, _ in self.requests if p == path)


@contextmanager
def serve():
    state = Server()

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            path = self.path.lstrip("/")
            rng = self.headers.get("Range")
            state.requests.append((path, rng))
            body = state.files.get(path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            m = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if m and not state.no_range:
                start = int(m.group(1))
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            part = body[start:]
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            if path in state.cut_once:
                state.cut_once.discard(path)
                self.wfile.write(part[: len(part) // 3])
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            self.wfile.write(part)

    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    state.port = srv.server_port
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield state
    finally:
        srv.shutdown()
        srv.server_close()


def os_list(url_base: str) -> bytes:
    def item(name, fn, date):
        return {
            "name": name,
            "description": "x",
            "url": url_base + fn,
            "extract_size": len(RAW),
            "extract_sha256": SHA_RAW,
            "image_download_size": len(XZ),
            "image_download_sha256": SHA_XZ,
            "release_date": date,
            "devices": ["pi4-64bit"],
            "init_format": "cloudinit-rpi",
        }

    return json.dumps(
        {
            "os_list": [
                {
                    "name": "Raspberry Pi OS (64-bit)",
                    "url": url_base + "desktop.img.xz",
                    "release_date": "2025-10-01",
                },
                {
                    "name": "Raspberry Pi OS (other)",
                    "subitems": [
                        item("Raspberry Pi OS Lite (64-bit)", "trixie.img.xz", "2025-10-01"),
                        item("Raspberry Pi OS Lite (64-bit)", "trixie-old.img.xz", "2025-09-01"),
                        item(
                            "Raspberry Pi OS (Legacy, 64-bit) Lite", "bookworm.img.xz", "2025-05-13"
                        ),
                    ],
                },
            ]
        }
    ).encode()


@pytest.fixture
def server():
    with serve() as s:
        for n in ("trixie.img.xz", "trixie-old.img.xz", "bookworm.img.xz", "plain.img.xz"):
            s.files[n] = XZ
        s.files["plain.img.xz.sha256"] = f"{SHA_XZ}  plain.img.xz\n".encode()
        s.files["os_list.json"] = os_list(s.url)
        yield s


def test_parse_spec(tmp_path):
    assert fetch.parse_base_spec("raspios-lite-arm64").kind == "imager"
    assert fetch.parse_base_spec("https://example.org/a/b.img.xz").kind == "url"
    (tmp_path / "x.img").write_bytes(b"x")
    s = fetch.parse_base_spec("x.img", relative_to=tmp_path)
    assert s.kind == "path" and s.value == str(tmp_path / "x.img")
    for bad, msg in [
        ("raspios-full", "not a known image name"),
        ("ftp://x/a.img.xz", "not an http"),
        ("https://example.org/a.zip", "must end with"),
        (str(tmp_path / "missing.img"), "does not exist"),
    ]:
        with pytest.raises(UserError, match=msg):
            fetch.parse_base_spec(bad, relative_to=tmp_path)
    with pytest.raises(UserError, match="64 hexadecimal"):
        fetch.parse_base_spec("raspios-lite-arm64", "abc")


def test_imager_newest_lite_and_legacy(server, tmp_path):
    img = fetch.fetch_base(
        fetch.parse_base_spec("raspios-lite-arm64"),
        cache=tmp_path,
        os_list_url=server.url + "os_list.json",
    )
    assert img.source.endswith("/trixie.img.xz") and img.release_date == "2025-10-01"
    assert img.sha256 == SHA_XZ and img.path.read_bytes() == RAW and img.size == len(RAW)
    assert img.path.stat().st_blocks * 512 < len(RAW)  # zero runs became holes
    legacy = fetch.fetch_base(
        fetch.parse_base_spec("raspios-lite-arm64-legacy"),
        cache=tmp_path / "l",
        os_list_url=server.url + "os_list.json",
    )
    assert legacy.source.endswith("/bookworm.img.xz")


def test_cache_hit_makes_no_image_request(server, tmp_path):
    spec = fetch.parse_base_spec("raspios-lite-arm64")
    a = fetch.fetch_base(spec, cache=tmp_path, os_list_url=server.url + "os_list.json")
    mtime = a.path.stat().st_mtime_ns
    b = fetch.fetch_base(spec, cache=tmp_path, os_list_url=server.url + "os_list.json")
    assert server.count("trixie.img.xz") == 1
    assert a.path == b.path and b.path.stat().st_mtime_ns == mtime  # not decompressed again


def test_url_with_sidecar_checksum(server, tmp_path):
    img = fetch.fetch_base(fetch.parse_base_spec(server.url + "plain.img.xz"), cache=tmp_path)
    assert img.sha256 == SHA_XZ and server.count("plain.img.xz.sha256") == 1


def test_resume_after_broken_download(server, tmp_path):
    server.cut_once.add("plain.img.xz")
    spec = fetch.parse_base_spec(server.url + "plain.img.xz", SHA_XZ)
    with pytest.raises(BuildError, match="broke off|cannot download"):
        fetch.fetch_base(spec, cache=tmp_path)
    parts = list((tmp_path / "downloads").glob("*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(XZ)
    have = parts[0].stat().st_size
    img = fetch.fetch_base(spec, cache=tmp_path)
    assert img.path.read_bytes() == RAW
    assert server.requests[-1] == ("plain.img.xz", f"bytes={have}-")
    assert not list((tmp_path / "downloads").glob("*.part"))


def test_server_without_range_starts_over(server, tmp_path):
    server.cut_once.add("plain.img.xz")
    server.no_range = True
    spec = fetch.parse_base_spec(server.url + "plain.img.xz", SHA_XZ)
    with pytest.raises(BuildError):
        fetch.fetch_base(spec, cache=tmp_path)
    assert fetch.fetch_base(spec, cache=tmp_path).path.read_bytes() == RAW


def test_checksum_mismatch_deletes_download(server, tmp_path):
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as ei:
        fetch.fetch_base(fetch.parse_base_spec(server.url + "plain.img.xz", wrong), cache=tmp_path)
    assert (
        wrong in ei.value.message and SHA_XZ in ei.value.message and "deleted" in ei.value.message
    )
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / "images" / wrong).exists()


def test_corrupted_download(server, tmp_path):
    server.files["plain.img.xz"] = XZ[:-10] + b"corrupted!"
    with pytest.raises(ChecksumError):
        fetch.fetch_base(fetch.parse_base_spec(server.url + "plain.img.xz"), cache=tmp_path)
    assert not list(tmp_path.rglob("*.img"))


def test_unreachable_server_is_one_line(tmp_path):
    with pytest.raises(BuildError) as ei:
        fetch.fetch_base(
            fetch.parse_base_spec("http://127.0.0.1:9/a.img.xz", SHA_XZ), cache=tmp_path
        )
    assert (
        "cannot download http://127.0.0.1:9/a.img.xz" in ei.value.message
        and "\n" not in ei.value.message
    )


def test_mirror_rewrite(server, tmp_path):
    spec = fetch.parse_base_spec("https://downloads.raspberrypi.com/plain.img.xz", SHA_XZ)
    img = fetch.fetch_base(spec, cache=tmp_path, mirror=server.url)
    # fetched from the mirror; recorded (manifest, lock) as the URL it is published at
    assert "plain.img.xz" in [p for p, _ in server.requests]
    assert img.source == "https://downloads.raspberrypi.com/plain.img.xz"
    assert img.path.read_bytes() == RAW


def test_local_img_and_xz(tmp_path):
    raw = tmp_path / "base.img"
    raw.write_bytes(RAW)
    a = fetch.fetch_base(fetch.parse_base_spec(str(raw)), cache=tmp_path / "c")
    assert a.path == raw and a.sha256 == SHA_RAW
    xz = tmp_path / "base.img.xz"
    xz.write_bytes(XZ)
    b = fetch.fetch_base(fetch.parse_base_spec(str(xz)), cache=tmp_path / "c")
    assert b.path.read_bytes() == RAW and b.sha256 == SHA_XZ
    with pytest.raises(ChecksumError):
        fetch.fetch_base(fetch.parse_base_spec(str(xz), "1" * 64), cache=tmp_path / "c")
