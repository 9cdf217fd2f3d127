"""The base image: resolve `base:` (Imager name, URL, local path), download with resume,
verify SHA-256 before anything enters the cache, decompress once. The only module that
talks HTTP.

Cache layout (`$PIIMAGE_CACHE`, default ~/.cache/piimage):
    downloads/<sha16>-<name>.part     resumable partial download (HTTP Range)
    images/<sha256>/<name>.img.xz     verified download, keyed by its digest
    images/<sha256>/image.img         decompressed once, sparse
    images/<sha256>/info.json         name, source, digests, release date
    local.json                        digests of local .img files by (path, size, mtime)
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .cache import touch_used
from .errors import BuildError, ChecksumError, UserError
from .fsutil import (
    CHUNK,
    atomic_path,
    damage,
    ensure_space,
    exclusive,
    filled_up,
    fingerprint,
    out_of_space,
    sha256_file,
    temp_pid,
    write_atomic,
)
from .log import log, progress

IMAGER_NAMES = {
    # name -> (must contain, must not contain) in the os_list entry's name
    "raspios-lite-arm64": (("lite", "64-bit"), ("legacy",)),
    "raspios-lite-arm64-legacy": (("lite", "64-bit", "legacy"), ()),
}
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TIMEOUT = (15, 60)  # connect, read (seconds)
NET_CHUNK = 256 * 1024


@dataclass(frozen=True)
class BaseSpec:
    kind: str  # "imager" | "url" | "path"
    value: str
    sha256: str | None = None
    # what a locked base (lock.py) knew of the image it resolved to
    name: str | None = None
    release_date: str | None = None


@dataclass(frozen=True)
class BaseImage:
    name: str
    source: str
    sha256: str
    path: Path
    size: int
    release_date: str | None = None


def parse_base_spec(
    spec: str, sha256: str | None = None, *, relative_to: Path | None = None
) -> BaseSpec:
    """Resolve `base:` without any network access (so a typo fails before downloading)."""
    spec = spec.strip()
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_RE.match(sha256):
            raise UserError(f"base_sha256: '{sha256}' is not 64 hexadecimal digits")
    if spec in IMAGER_NAMES:
        return BaseSpec("imager", spec, sha256)
    if "://" in spec:
        if not re.match(r"^https?://[^\s/]+/\S+$", spec):
            raise UserError(f"base: '{spec}' is not an http(s) URL of an image")
        if not spec.endswith((".img", ".img.xz")):
            raise UserError(f"base: '{spec}' must end with .img.xz or .img")
        return BaseSpec("url", spec, sha256)
    path = Path(os.path.expanduser(spec))
    if not path.is_absolute():
        path = (relative_to or Path.cwd()) / path
    if not spec.endswith((".img", ".img.xz")) and not path.exists():
        raise UserError(
            f"base: '{spec}' is not a known image name, an https:// URL or a local .img/.img.xz file",
            hint=f"known names: {', '.join(IMAGER_NAMES)}",
        )
    if not path.is_file():
        raise UserError(f"base: local image {path} does not exist")
    if not path.name.endswith((".img", ".img.xz")):
        raise UserError(f"base: {path} must be a .img or .img.xz file")
    return BaseSpec("path", str(path.resolve()), sha256)


def _requests():
    import requests

    return requests


def _get(url: str, **kw):
    requests = _requests()
    try:
        r = requests.get(url, timeout=TIMEOUT, **kw)
    except requests.RequestException as e:
        raise BuildError(
            f"cannot download {url}: {_reason(e)}",
            hint="check the network, or set PIIMAGE_MIRROR / use a local base image (--base PATH)",
        ) from None
    if r.status_code >= 400:
        r.close()
        raise BuildError(f"cannot download {url}: HTTP {r.status_code} {r.reason}")
    return r


def _reason(e: Exception) -> str:
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^')]+)", text)
    return m.group(1) if m else text.splitlines()[0][:200]


def _rewrite_mirror(url: str, mirror: str | None) -> str:
    if mirror and url.startswith(settings.DEFAULT_DOWNLOAD_HOST):
        return mirror.rstrip("/") + "/" + url[len(settings.DEFAULT_DOWNLOAD_HOST) :]
    return url


def _walk_os_list(items: list) -> list[dict]:
    out = []
    for it in items or []:
        if isinstance(it, dict):
            if it.get("subitems"):
                out.extend(_walk_os_list(it["subitems"]))
            elif it.get("url"):
                out.append(it)
    return out


def resolve_imager(name: str, os_list_url: str) -> dict:
    """The newest entry of Imager's os_list matching the name (nested subitems included)."""
    r = _get(os_list_url)
    try:
        doc = r.json()
    except ValueError:
        raise BuildError(f"{os_list_url}: not a JSON image list") from None
    want, avoid = IMAGER_NAMES[name]
    matches = []
    for it in _walk_os_list(doc.get("os_list", []) if isinstance(doc, dict) else []):
        n = str(it.get("name", "")).lower()
        if all(w in n for w in want) and not any(a in n for a in avoid):
            matches.append(it)
    if not matches:
        raise BuildError(f"{os_list_url} lists no image matching '{name}'")
    return max(matches, key=lambda it: str(it.get("release_date", "")))


def _sidecar_sha256(url: str, basename: str) -> str:
    r = _get(url + ".sha256")
    for line in r.text.splitlines():
        parts = line.split()
        if (
            len(parts) >= 2
            and parts[1].lstrip("*").endswith(basename)
            and SHA256_RE.match(parts[0].lower())
        ):
            return parts[0].lower()
        if len(parts) == 1 and SHA256_RE.match(parts[0].lower()):
            return parts[0].lower()
    raise BuildError(f"{url}.sha256 does not hold a SHA-256 for {basename}")


def _download(url: str, expected: str, cache: Path) -> Path:
    """Download to a resumable partial file, verify, then move into images/<sha256>/."""
    basename = url.rsplit("/", 1)[-1]
    final = cache / "images" / expected / basename
    if final.exists():
        return final
    part = cache / "downloads" / f"{expected[:16]}-{basename}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    r = _get(url, stream=True, headers=headers)
    with r:
        if have and r.status_code != 206:
            log.info("%s: the server does not resume downloads; starting over", url)
            have = 0
        total = int(r.headers.get("Content-Length", 0)) + have or None
        if total:
            ensure_space(part.parent, total - have, f"the download of {basename}")
        requests = _requests()
        try:
            with (
                open(part, "ab" if have else "wb") as f,
                progress(f"downloading {basename}", total) as p,
            ):
                p.update(have)
                # small reads: data before a broken connection still lands in the partial file
                for chunk in r.iter_content(NET_CHUNK):
                    f.write(chunk)
                    p.update(len(chunk))
        except requests.RequestException as e:
            raise BuildError(
                f"download of {url} broke off: {_reason(e)}",
                hint="run the command again: the download resumes where it stopped",
            ) from None
        except OSError as e:
            if not out_of_space(e):
                raise
            part.unlink(missing_ok=True)
            raise filled_up(part.parent, total or 0, f"downloading {basename}") from None
    with progress(f"verifying {basename}", part.stat().st_size) as p:
        actual = sha256_file(part, p)
    if actual != expected:
        part.unlink()
        raise ChecksumError(
            f"{url}: checksum mismatch — expected sha256 {expected}, got {actual}; the download was deleted",
            hint="run again to download afresh; if it persists, the mirror or the published checksum is wrong",
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    return final


def _decompress(src: Path, dest: Path, expected_raw: str | None) -> str:
    """xz → sparse raw image, once, atomically; verified against extract_sha256 when known.
    Returns the raw image's SHA-256."""
    try:
        return _decompress_to(src, dest, expected_raw)
    except OSError as e:
        if not out_of_space(e):
            raise
        # atomic_path removed the half-written image
        raise filled_up(dest.parent, src.stat().st_size * 5, f"decompressing {src.name}") from None


def _decompress_to(src: Path, dest: Path, expected_raw: str | None) -> str:
    with atomic_path(dest) as tmp:
        h = hashlib.sha256()
        size = src.stat().st_size
        with (
            lzma.open(src) as fi,
            open(tmp, "wb") as fo,
            progress(f"decompressing {src.name}", size) as p,
        ):
            raw_f = fi._fp if hasattr(fi, "_fp") else None  # compressed position, for progress
            last = 0
            while buf := fi.read(CHUNK):
                h.update(buf)
                if buf.count(0) == len(buf):
                    fo.seek(len(buf), os.SEEK_CUR)  # keep zero runs as holes
                else:
                    fo.write(buf)
                pos = raw_f.tell() if raw_f is not None else 0
                if pos > last:
                    p.update(pos - last)
                    last = pos
            fo.truncate()
        if expected_raw and h.hexdigest() != expected_raw:
            raise ChecksumError(
                f"{src.name}: decompressed image has sha256 {h.hexdigest()}, "
                f"the image list says {expected_raw}"
            )
    return h.hexdigest()


def _local_digest(path: Path, cache: Path) -> str:
    index = cache / "local.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    st = path.stat()
    key = f"{path}:{st.st_size}:{st.st_mtime_ns}"
    if key not in known:
        with progress(f"checksumming {path.name}", st.st_size) as p:
            known[key] = sha256_file(path, p)
        write_atomic(index, json.dumps(known, indent=1))
    return known[key]


@contextmanager
def _making(raw: Path, name: str) -> Iterator[None]:
    """Hold the base image's lock (images/.<sha256>.lock) while it is checked and, if need
    be, downloaded and decompressed: a second build on the same cache waits and then finds
    it made, rather than writing the same partial download at once or taking an image whose
    description is not written yet for a damaged one. Holding it, the half-decompressed
    images of builds that were killed outright (.image.img.partial-<pid>) are removed."""
    with exclusive(
        raw.parent.parent / f".{raw.parent.name}.lock",
        on_wait=lambda: log.info("base image %s: another piimage is fetching it; waiting", name),
    ):
        for f in raw.parent.glob(".*.partial-*") if raw.parent.is_dir() else ():
            pid = temp_pid(f.name)
            if pid is not None and not Path(f"/proc/{pid}").exists():
                log.warning("removing %s, left by a build that was killed", f)
                f.unlink(missing_ok=True)
        yield


def _cached_raw(raw: Path, name: str) -> bool:
    """The decompressed base is in the cache and is what it was made as (its info.json holds
    its fingerprint); a damaged one is said so and removed, to be made again from the
    download (verified again itself) or fetched anew."""
    if not raw.exists():
        return False
    try:
        made = json.loads((raw.parent / "info.json").read_text()).get("image")
    except (OSError, ValueError, AttributeError):
        made = None
    problem = damage(raw, made)
    if problem is None:
        touch_used(raw.parent / "info.json")  # for `piimage cache --prune`
        return True
    log.warning("base image %s: the cached %s %s; making it again", name, raw, problem)
    raw.unlink()
    for xz in raw.parent.glob("*.xz"):
        # the download it came from: checked against its published SHA-256 before reuse
        if sha256_file(xz) != raw.parent.name:
            log.warning("base image %s: the cached download %s is damaged too", name, xz.name)
            xz.unlink()
    return False


def _write_info(raw: Path, info: dict, raw_sha256: str | None) -> None:
    made = fingerprint(raw, raw_sha256)
    write_atomic(raw.parent / "info.json", json.dumps({**info, "image": made}, indent=2))


def fetch_base(
    spec: BaseSpec,
    *,
    cache: Path | None = None,
    os_list_url: str | None = None,
    mirror: str | None = None,
) -> BaseImage:
    cache = cache or settings.cache_dir()
    mirror = mirror if mirror is not None else settings.mirror()
    release = None
    extract_sha = None
    if spec.kind == "imager":
        url_list = os_list_url or settings.os_list_url()
        item = resolve_imager(spec.value, url_list)
        upstream = str(item["url"])
        url = _rewrite_mirror(upstream, mirror)
        expected = str(item.get("image_download_sha256") or "").lower() or None
        extract_sha = str(item.get("extract_sha256") or "").lower() or None
        release = item.get("release_date")
        name = str(item.get("name", spec.value))
        if not expected:
            expected = _sidecar_sha256(url, url.rsplit("/", 1)[-1])
    elif spec.kind == "url":
        upstream = spec.value
        url = _rewrite_mirror(upstream, mirror)
        name = spec.name or url.rsplit("/", 1)[-1]
        release = spec.release_date
        expected = spec.sha256 or _sidecar_sha256(url, url.rsplit("/", 1)[-1])
    else:
        path = Path(spec.value)
        digest = _local_digest(path, cache)
        if spec.sha256 and digest != spec.sha256:
            raise ChecksumError(f"{path}: sha256 is {digest}, base_sha256 says {spec.sha256}")
        if path.name.endswith(".img"):
            return BaseImage(path.name, str(path), digest, path, path.stat().st_size)
        raw = cache / "images" / digest / "image.img"
        with _making(raw, path.name):
            if not _cached_raw(raw, path.name):
                raw_sha = _decompress(path, raw, None)
                info = {"name": path.name, "source": str(path), "sha256": digest}
                _write_info(raw, info, raw_sha)
        return BaseImage(path.name, str(path), digest, raw, raw.stat().st_size)

    entry = cache / "images" / expected
    raw = entry / "image.img"
    with _making(raw, name):
        if not _cached_raw(raw, name):
            downloaded = _download(url, expected, cache)
            if downloaded.name.endswith(".xz"):
                raw_sha = _decompress(downloaded, raw, extract_sha)
            else:
                os.replace(downloaded, raw)
                raw_sha = expected
            info = {"name": name, "source": url, "sha256": expected, "release_date": release}
            _write_info(raw, info, raw_sha)
        else:
            log.info("base image %s: cached", name)
    # the source as published, not the mirror it was fetched from (manifest, lock)
    return BaseImage(name, upstream, expected, raw, raw.stat().st_size, release)


def public_url(url: str) -> str:
    """A URL as it may be shown or written into an image or a manifest: without the
    `user:password@` a private mirror's URL may carry."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
