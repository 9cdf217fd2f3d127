"""Role layers: the base image grown and with a role's packages installed (apt inside the
arm64 root through QEMU user emulation), cached by a digest of everything that feeds it.
Node stamps start from a layer, so adding a node or changing an address never re-runs apt."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import disk, emulate, settings
from .cache import touch_used
from .errors import PiimageError
from .fetch import BaseImage
from .fsutil import (
    DiskFull,
    allocated,
    atomic_path,
    blame_a_full_disk,
    damage,
    ensure_space,
    exclusive,
    filled_up,
    fingerprint,
    out_of_space,
    write_atomic,
)
from .log import log
from .profiles import Profile
from .run import run, terminate_all
from .stages import Stage

LAYER_FORMAT = 4  # bump when the way layers are made changes (3: installed packages recorded,
# 4: the image's fingerprint, checked before each use)
FREE_AFTER_PACKAGES = 384 << 20  # free space left in a layer's root after its packages


@dataclass(frozen=True)
class LayerInputs:
    role: str
    base_sha256: str
    packages: tuple[str, ...]
    headroom_mb: int
    # (relative path, sha256) of role-scope stage files/scripts
    stage_files: tuple[tuple[str, str], ...]

    def key(self) -> str:
        doc = json.dumps(
            {
                "format": LAYER_FORMAT,
                "role": self.role,
                "base": self.base_sha256,
                "packages": sorted(self.packages),
                "headroom_mb": self.headroom_mb,
                "stage_files": sorted(self.stage_files),
            },
            sort_keys=True,
        )
        return hashlib.sha256(doc.encode()).hexdigest()


def _stage_digests(stages: list[Stage], role: str) -> tuple[tuple[str, str], ...]:
    out = []
    for st in stages:
        if st.scope != "role" or not st.applies_to(role):
            continue
        for p in sorted(st.dir.rglob("*")):
            if p.is_file():
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
                out.append((f"{st.name}/{p.relative_to(st.dir)}", digest))
    return tuple(out)


def inputs_for(profile: Profile, stages: list[Stage], base_sha256: str) -> LayerInputs:
    role_stage_packages = [
        p
        for st in stages
        if st.scope == "role" and st.applies_to(profile.role)
        for p in st.packages
    ]
    packages = tuple(dict.fromkeys([*profile.packages, *role_stage_packages]))
    return LayerInputs(
        profile.role,
        base_sha256,
        packages,
        profile.headroom_mb,
        _stage_digests(stages, profile.role),
    )


def layer_dir() -> Path:
    return settings.layer_cache_dir()


def layer_path(inputs: LayerInputs) -> Path:
    return layer_dir() / f"{inputs.role}-{inputs.key()[:16]}.img"


def ensure_layers(
    base: BaseImage,
    wanted: dict[str, LayerInputs],
    stages: list[Stage],
    *,
    apt_proxy: str | None = None,
    apt_mirrors: dict[str, str] | None = None,
) -> dict[str, Path]:
    """The layers for these inputs (by key), from the cache or built now. Layers still to be
    built are built side by side, one per core: apt under user emulation runs one emulated
    dpkg at a time, so a head and a compute layer take the time of the longer one. If one
    fails or the build is interrupted, the others are stopped and cleaned up too."""
    out = {k: layer_path(i) for k, i in wanted.items() if _cached(layer_path(i), i.role)}
    for k in out:
        log.info("role layer %s: cached (%s)", wanted[k].role, out[k].name)
    todo = [k for k in wanted if k not in out]
    if todo:
        emulate.clean_stale_mounts()
    if len(todo) <= 1:
        for k in todo:
            out[k] = ensure_layer(
                base, wanted[k], stages, apt_proxy=apt_proxy, apt_mirrors=apt_mirrors
            )
        return out
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    stopping = threading.Event()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layer") as pool:
        futures = {
            pool.submit(
                ensure_layer,
                base,
                wanted[k],
                stages,
                apt_proxy=apt_proxy,
                apt_mirrors=apt_mirrors,
                private_apt=True,
                stopping=stopping,
            ): k
            for k in todo
        }
        try:
            for f in as_completed(futures):
                out[futures[f]] = f.result()
        except BaseException:
            # a failure or Ctrl-C: end every build's commands (and waits for another
            # process's build of a layer); each cleans up in its thread
            stopping.set()
            terminate_all()
            for f in futures:
                f.cancel()
            wait(list(futures))
            raise
    return out


def ensure_layer(
    base: BaseImage,
    inputs: LayerInputs,
    stages: list[Stage],
    *,
    apt_proxy: str | None = None,
    apt_mirrors: dict[str, str] | None = None,
    private_apt: bool = False,
    stopping: threading.Event | None = None,
) -> Path:
    """The cached layer for these inputs, building it if needed (whole or nothing). With
    `private_apt`, apt works in a copy (hard links) of the shared archive cache, so builds
    side by side do not fight over its lock; new downloads are linked back afterwards.
    Another piimage building the same layer at the same time (two builds on one machine,
    say) is waited for, and its layer used, rather than built twice."""
    final = layer_path(inputs)
    if _cached(final, inputs.role):
        log.info("role layer %s: cached (%s)", inputs.role, final.name)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(
        final.with_name(f".{final.stem}.lock"),
        on_wait=lambda: log.info(
            "role layer %s: another piimage is building it; waiting for that build",
            inputs.role,
        ),
        cancelled=stopping.is_set if stopping is not None else None,
    ):
        if _cached(final, inputs.role):
            log.info("role layer %s: built by the other piimage (%s)", inputs.role, final.name)
            return final
        emulate.clean_stale_partials(final)  # with the lock held, any other one's is dead
        return _build_locked(base, inputs, stages, final, apt_proxy, apt_mirrors, private_apt)


def _build_locked(
    base: BaseImage,
    inputs: LayerInputs,
    stages: list[Stage],
    final: Path,
    apt_proxy: str | None,
    apt_mirrors: dict[str, str] | None,
    private_apt: bool,
) -> Path:
    t0 = time.monotonic()
    log.info(
        "role layer %s: building (packages: %s)", inputs.role, " ".join(inputs.packages) or "none"
    )
    emulate.check_host()
    final.parent.mkdir(parents=True, exist_ok=True)
    shared_cache = settings.apt_cache_dir() / "arm64"
    shared_cache.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        apt_cache = (
            stack.enter_context(_private_archives(shared_cache)) if private_apt else shared_cache
        )
        try:
            _build_layer(base, inputs, stages, final, apt_cache, apt_proxy, apt_mirrors)
        except (OSError, PiimageError) as e:
            if isinstance(e, DiskFull) or not out_of_space(e):
                raise
            raise filled_up(
                final.parent, base.size, f"building the {inputs.role} role layer"
            ) from None
    log.info("role layer %s: built in %.0f s", inputs.role, time.monotonic() - t0)
    return final


@contextmanager
def _private_archives(shared: Path) -> Iterator[Path]:
    """A private apt archive directory holding hard links to the shared cache's packages;
    what apt adds to it is linked into the shared cache when done, and the directory removed."""
    private = Path(tempfile.mkdtemp(prefix=".private-", dir=shared.parent))
    private.chmod(0o755)  # apt downloads as _apt into its partial/ directory
    try:
        for deb in shared.glob("*.deb"):
            os.link(deb, private / deb.name)
        yield private
        for deb in private.glob("*.deb"):
            try:
                os.link(deb, shared / deb.name)
            except FileExistsError:
                pass
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _build_layer(
    base: BaseImage,
    inputs: LayerInputs,
    stages: list[Stage],
    final: Path,
    apt_cache: Path,
    apt_proxy: str | None,
    apt_mirrors: dict[str, str] | None,
) -> None:
    t0 = time.monotonic()
    ensure_space(
        final.parent, allocated(base.path) + inputs.headroom_mb * 2**20, f"the {inputs.role} layer"
    )
    with (
        atomic_path(final) as tmp,
        blame_a_full_disk(final.parent, base.size, f"building the {inputs.role} role layer"),
    ):
        # A sparse copy: the base's holes stay holes.
        run(["cp", "--sparse=always", str(base.path), str(tmp)], what="copying the base image")
        if inputs.headroom_mb:
            disk.grow_image(tmp, inputs.headroom_mb * 1024 * 1024)
        with emulate.Chroot(
            tmp, apt_cache=apt_cache, apt_proxy=apt_proxy, apt_mirrors=apt_mirrors
        ) as ch:
            if inputs.packages:
                ch.apt_install(list(inputs.packages))
            for st in stages:
                if st.scope == "role" and st.applies_to(inputs.role):
                    _copy_role_files(ch.root, st)
                    if st.script is not None:
                        ch.run_script(st.script, what=f"{st.name}/run-chroot.sh")
            # what the layer holds, read from the root itself (no emulated dpkg-query)
            installed = installed_packages((ch.root / "var/lib/dpkg/status").read_text())
            release = os_release_codename((ch.root / "etc/os-release").read_text())
        if inputs.headroom_mb:
            # the headroom was for apt; what is left of it is not flashed (first boot grows
            # the root)
            disk.shrink_image(tmp, FREE_AFTER_PACKAGES)
        # the description first: whoever sees the layer finds it described, and what it
        # must be (a later build checks it before use: damage())
        image = fingerprint(tmp)
        write_atomic(
            final.with_suffix(".json"),
            json.dumps(
                {
                    "role": inputs.role,
                    "key": inputs.key(),
                    "packages": list(inputs.packages),
                    "base_sha256": inputs.base_sha256,
                    "release": release,
                    "installed": installed,
                    "image": image,
                    "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(time.monotonic() - t0, 1),
                },
                indent=2,
            ),
        )


def installed_packages(status: str) -> dict[str, str]:
    """Package -> version of what dpkg's status file says is installed ("install ok
    installed"), sorted by name."""
    out = {}
    for block in status.split("\n\n"):
        fields = dict(
            ln.split(": ", 1) for ln in block.splitlines() if ": " in ln and not ln.startswith(" ")
        )
        if fields.get("Status") == "install ok installed" and "Package" in fields:
            out[fields["Package"]] = fields.get("Version", "")
    return dict(sorted(out.items()))


def os_release_codename(text: str) -> str | None:
    """VERSION_CODENAME of an os-release file ("bookworm", "trixie")."""
    for ln in text.splitlines():
        if ln.startswith("VERSION_CODENAME="):
            return ln.split("=", 1)[1].strip().strip('"') or None
    return None


def _cached(final: Path, role: str) -> bool:
    """The layer is in the cache and is what it was made as; a damaged one (cut short, changed,
    its description gone) is said so and removed, to be built again."""
    if not final.exists():
        return False
    problem = damage(final, layer_info(final).get("image"))
    if problem is None:
        touch_used(final.with_suffix(".json"))  # for `piimage cache --prune`
        return True
    log.warning("role layer %s: the cached %s %s; building it again", role, final.name, problem)
    for p in (final, final.with_suffix(".json")):
        p.unlink(missing_ok=True)
    return False


def layer_info(layer: Path) -> dict:
    """The description written beside a layer (layer.json): role, release, installed packages."""
    try:
        return json.loads(layer.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}


def _copy_role_files(root: Path, st: Stage) -> None:
    """Role-scope stages copy files/ verbatim into the root (no node data exists at role level)."""
    src = st.dir / "files"
    if not src.is_dir():
        return
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        dest = root / rel
        if p.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dest)
            os.chown(dest, 0, 0)
