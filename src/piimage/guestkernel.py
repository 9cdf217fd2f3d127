"""A kernel to boot built images under qemu-system-aarch64 -M virt, for `piimage rehearse`.

Raspberry Pi OS's own kernel only boots on a Pi, so the rehearsal boots the images with Debian's
arm64 kernel of the same release (Raspberry Pi OS is built on Debian). Everything is done on the
host without emulation, in seconds, and kept in the cache per release:

- `apt-get download` of `linux-image-arm64`'s kernel package and `busybox-static`, with a
  private apt configuration (its own lists, cache and sources), so the host's apt is untouched;
- `dpkg-deb -x`, then `depmod -b` over the unpacked modules;
- `initrd.img`: a tiny busybox initramfs that plays the image's Raspberry Pi OS initramfs
  (piboot.py says what of it), mounts the image's root from `root=` and the modules disk over
  `/lib/modules`, and switches root to `init=`;
- `modules.ext4`: the kernel's whole `lib/modules/<version>` as a read-only disk (`/dev/vdb`),
  so the image gets the modules it needs (NFS, vfat, virtio-net, …) without a byte of them
  written into the overlay.

Installing the kernel package inside the image instead would run initramfs-tools under user
emulation: over ten minutes here.
"""

from __future__ import annotations

import gzip
import io
import json
import lzma
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .fsutil import blame_a_full_disk, ensure_space, write_atomic
from .log import log
from .piboot import INITRAMFS_SCRIPT
from .run import require_tools, run
from .settings import cache_dir, debian_mirror

KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
# What the initramfs loads (with their dependencies, in order): enough to mount the root and
# the modules disk, and the FAT whose cmdline.txt trixie's first boot edits. virtio-pci and the
# serial console are built into Debian's arm64 kernel. The code pages are optional: a kernel
# may have them built in.
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "vfat")
INITRD_OPTIONAL_MODULES = ("nls_cp437", "nls_ascii", "nls_utf8", "nls_iso8859_1")
FORMAT = 2  # bump when the cached layout changes
# The room making a kernel takes at its peak: the .debs, their unpacked tree and the modules
# disk (bookworm's 6.1.0-50: ~70 MB, ~450 MB and 293 MB written, 2026-12-06), with a margin.
KERNEL_ROOM = 3 << 29


@dataclass(frozen=True)
class GuestKernel:
    suite: str
    version: str  # e.g. 6.12.117+deb13-arm64
    vmlinuz: Path
    initrd: Path
    modules_disk: Path


def guest_kernel(suite: str, *, mirror: str | None = None) -> GuestKernel:
    """Debian's arm64 kernel for `suite` (bookworm, trixie, …), from the cache or made now."""
    root = cache_dir() / "rehearse" / f"kernel-{suite}-arm64"
    meta = root / "kernel.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("format") == FORMAT:
            log.info("rehearsal kernel: %s (cached)", info["version"])
            return _kernel(root, suite, info["version"])
    require_tools(["apt-get", "dpkg-deb", "depmod", "modprobe", "mkfs.ext4"])
    if not KEYRING.is_file():
        raise BuildError(
            f"{KEYRING} is missing: cannot verify Debian's packages",
            hint="sudo apt-get install debian-archive-keyring",
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    ensure_space(root.parent, KERNEL_ROOM, "making the rehearsal kernel")
    work = Path(tempfile.mkdtemp(prefix=f".kernel-{suite}-", dir=root.parent))
    try:
        # a full disk is named as such (mkfs.ext4 -d says only "No space left on device")
        with blame_a_full_disk(root.parent, KERNEL_ROOM, "making the rehearsal kernel"):
            version = _make(work, suite, mirror or debian_mirror())
        write_atomic(
            work / "kernel.json",
            json.dumps({"format": FORMAT, "suite": suite, "version": version}) + "\n",
        )
        if root.exists():
            shutil.rmtree(root)
        work.rename(root)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _kernel(root, suite, version)


def _kernel(root: Path, suite: str, version: str) -> GuestKernel:
    return GuestKernel(suite, version, root / "vmlinuz", root / "initrd.img", root / "modules.ext4")


def _make(work: Path, suite: str, mirror: str) -> str:
    apt_env = _private_apt(work / "apt", suite, mirror)
    log.info("rehearsal kernel: fetching Debian %s's arm64 kernel …", suite)
    run(["apt-get", "update", "-q"], env=apt_env, what=f"apt-get update (Debian {suite} arm64)")
    lists = list((work / "apt" / "lists").glob("*Packages*"))
    if not lists:
        raise BuildError(
            f"apt-get could not fetch Debian {suite}'s package list from {mirror}",
            hint="check the mirror ($PIIMAGE_DEBIAN_MIRROR) and the network",
        )
    deps = run(
        ["apt-cache", "depends", "linux-image-arm64"], env=apt_env, what="apt-cache depends"
    ).stdout
    pkg = next(
        (
            line.split(":", 1)[1].strip()
            for line in deps.splitlines()
            if line.strip().startswith("Depends:") and "linux-image-" in line
        ),
        None,
    )
    if not pkg:
        raise BuildError(
            f"Debian {suite} has no arm64 kernel package (linux-image-arm64 depends on nothing)"
        )
    debs = work / "debs"
    debs.mkdir()
    run(
        ["apt-get", "download", "-q", pkg, "busybox-static"],
        env=apt_env,
        cwd=debs,
        what=f"apt-get download {pkg} busybox-static",
    )
    tree = work / "tree"
    for deb in sorted(debs.glob("*.deb")):
        run(["dpkg-deb", "-x", deb, tree], what=f"unpacking {deb.name}")
    mods_parent = next(
        (p for p in (tree / "usr/lib/modules", tree / "lib/modules") if p.is_dir()), None
    )
    vmlinuz = next(iter(sorted((tree / "boot").glob("vmlinuz-*"))), None)
    if mods_parent is None or vmlinuz is None:
        raise BuildError(f"{pkg} has no kernel or modules where expected")
    version = vmlinuz.name[len("vmlinuz-") :]
    # depmod and modprobe -d want <base>/lib/modules/<version>
    base = work / "base"
    (base / "lib").mkdir(parents=True)
    (base / "lib" / "modules").symlink_to(mods_parent)
    run(["depmod", "-b", base, version], what="depmod")
    shutil.copyfile(vmlinuz, work / "vmlinuz")
    busybox = next(
        (p for p in (tree / "usr/bin/busybox", tree / "bin/busybox") if p.is_file()), None
    )
    if busybox is None:
        raise BuildError("busybox-static has no busybox binary where expected")
    _make_initrd(work / "initrd.img", busybox, base, version)
    _make_modules_disk(work / "modules.ext4", mods_parent)
    for p in ("apt", "debs", "tree", "base"):
        shutil.rmtree(work / p)
    log.info("rehearsal kernel: %s ready", version)
    return version


def _private_apt(root: Path, suite: str, mirror: str) -> dict[str, str]:
    """An APT_CONFIG with its own state, cache and sources: the host's apt is never touched."""
    for d in (
        "lists/partial",
        "archives/partial",
        "etc/sources.list.d",
        "etc/preferences.d",
        "etc/trusted.gpg.d",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "status").touch()
    (root / "etc" / "sources.list").write_text(
        f"deb [arch=arm64 signed-by={KEYRING}] {mirror.rstrip('/')} {suite} main\n"
    )
    conf = root / "apt.conf"
    conf.write_text(
        "\n".join(
            [
                'APT::Architecture "arm64";',
                'APT::Architectures { "arm64"; };',
                'APT::Sandbox::User "root";',
                f'Dir::State "{root}";',
                f'Dir::State::Lists "{root}/lists";',
                f'Dir::State::status "{root}/status";',
                f'Dir::Cache "{root}";',
                f'Dir::Cache::Archives "{root}/archives";',
                f'Dir::Etc::SourceList "{root}/etc/sources.list";',
                f'Dir::Etc::SourceParts "{root}/etc/sources.list.d";',
                f'Dir::Etc::Preferences "{root}/etc/preferences";',
                f'Dir::Etc::PreferencesParts "{root}/etc/preferences.d";',
                f'Dir::Etc::Trusted "{root}/etc/trusted.gpg";',
                f'Dir::Etc::TrustedParts "{root}/etc/trusted.gpg.d";',
                'Acquire::Languages "none";',
                "",
            ]
        )
    )
    return {"APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive"}


def _initrd_modules(base: Path, version: str) -> list[Path]:
    """INITRD_MODULES and what they depend on, in load order, without duplicates."""
    out: list[Path] = []
    for name in (*INITRD_MODULES, *INITRD_OPTIONAL_MODULES):
        r = run(
            ["modprobe", "-d", base, "-S", version, "--show-depends", name],
            what=f"modprobe --show-depends {name}",
            check=name in INITRD_MODULES,
        )
        deps = r.stdout if r.returncode == 0 else ""
        for line in deps.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "insmod":
                p = Path(parts[1])
                if p not in out:
                    out.append(p)
    return out


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def _make_initrd(dest: Path, busybox: Path, base: Path, version: str) -> None:
    entries: list[tuple[str, int, bytes]] = [
        ("bin", stat.S_IFDIR | 0o755, b""),
        ("modules", stat.S_IFDIR | 0o755, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        ("init", stat.S_IFREG | 0o755, INITRAMFS_SCRIPT.encode()),
    ]
    names = []
    for mod in _initrd_modules(base, version):
        name = mod.name.split(".ko")[0] + ".ko"
        entries.append((f"modules/{name}", stat.S_IFREG | 0o644, _module_bytes(mod)))
        names.append(name)
    entries.append(("modules.list", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode()))
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(newc_archive(entries))
    dest.write_bytes(buf.getvalue())


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's initramfs ("newc") format: (name, st_mode, data) entries,
    owned by root. Written here so the host needs no cpio."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        raw = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0]
        out.extend(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
        out.extend(raw)
        pad4()
        out.extend(data)
        pad4()
    return bytes(out)


def _make_modules_disk(dest: Path, mods_parent: Path) -> None:
    size = sum(p.stat().st_size for p in mods_parent.rglob("*") if p.is_file())
    size_mb = size * 13 // 10 // (1 << 20) + 64
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "piimage-mods", "-d", mods_parent, dest, f"{size_mb}M"],
        what="mkfs.ext4 (rehearsal modules disk)",
    )
    os.chmod(dest, 0o444)
