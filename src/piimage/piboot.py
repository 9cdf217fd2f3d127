"""How a Raspberry Pi boots a card, as `piimage rehearse` plays it on qemu-system-aarch64 -M virt.

The rehearsal cannot run the Pi's firmware, the Raspberry Pi kernel or the image's own
initramfs, so every part of a Pi's boot that changes what the image sees is played here, and
only here. Each one says which Raspberry Pi behaviour it stands for (the upstream sources are
listed in ../shared/REAL-PIOS.md; this is our own code for the behaviour):

- The firmware (`start4.elf`, `start_cd.elf`): the kernel command line is the board's
  device-tree `bootargs` followed by the first line of the card's `cmdline.txt`, read again at
  every boot (a card's first boot edits it), with `console=serial0` resolved to the primary
  UART. `kernel_cmdline()`, `card_cmdline_txt()`.
- The Raspberry Pi kernel's defaults, which come from those bootargs: the memory cgroup
  controller is off (`cgroup_disable=memory`, in `bcm2711-rpi.dtsi` and `bcm2712-rpi.dtsi` of
  raspberrypi/linux); `cgroup_enable=memory` later on the line turns it back on. `BOOTARGS`.
  `cgroup_enable=` exists only in the Pi kernel (raspberrypi/linux "cgroup: Disable cgroup
  "memory" by default", kernel/cgroup/cgroup.c); Debian's kernel, which the rehearsal boots,
  has no such parameter and keeps a controller off once `cgroup_disable=` named it. So the
  line the Pi kernel would read is kept for the report, and Debian's kernel is given what it
  means: `for_debian_kernel()`.
- The image's initramfs (Raspberry Pi OS's kernels load `initramfs8`/`initramfs_2712`, built
  with raspberrypi-sys-mods' hooks): `INITRAMFS_SCRIPT`, the rehearsal initrd's /init —
  - bookworm `local-premount/firstboot`: when `firstboot` is on the command line, partition 2
    is grown to the end of the card and its ext4 with it;
  - trixie `local-premount/resize_early`: when the word `resize` is on the command line,
    partition 2 is grown (the filesystem is left to the image's `rpi-resize.service`);
  - trixie `local-bottom/set_partuuid`: then the disk gets a random identifier, and `/etc/fstab`
    and `cmdline.txt` follow it, with ` resize` dropped;
  - like initramfs-tools, the root is mounted read-only (unless `rw`) and `init=` is honoured.
- The board: the memory its kernel reports (`MemTotal`, which `slurmd -C` gives as RealMemory),
  not the nominal size (`inventory/boards.py`, `vm_memory_mb()`); no real-time clock (a Pi 4 has none, a
  Pi 5's keeps no time without a battery): the VM's clock starts at 1970 on every power-on, so
  the image's own means (fake-hwclock, timesyncd's clock file, NTP) must set it
  (`RTC_ARGS`); one wired NIC that the image itself must name `eth0` (its `.link` files), so
  no `net.ifnames=0` is passed.
- The card: larger than the image (`CARD_BYTES`), so growing the root on first boot shows.
- The CPU: a Pi 4's Cortex-A72 (`CPU`), for the rehearsal's VMs and for every arm64 program
  the build runs under QEMU user emulation (emulate.py sets $QEMU_CPU). No Pi has pointer
  authentication (Pi 3 A53, Pi 4 A72, Pi 5 A76: ARMv8.0/8.2, PAC is 8.3), so the PAC and BTI
  instructions that trixie's packages are built with (dpkg's default branch protection on
  arm64; `readelf -n` says "AArch64 feature: BTI, PAC") are the no-ops a Pi executes, where
  QEMU's default `max` CPU emulates the QARMA5 ciphers on every call and return: a Python
  loop under qemu-aarch64 7.2 took 50.9 s with `max` and 6.9 s as cortex-a72 here.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from .errors import BuildError
from .inventory.boards import BOARDS, Board
from .run import run

CPU = "cortex-a72"  # QEMU's name for a Pi 4's cores (see above)
CARD_BYTES = 8 << 30  # an 8 GB card: the smallest a cluster node is sold with
PRIMARY_UART = "ttyAMA0"  # the virt machine's PL011; a Pi 4 resolves serial0 to ttyS0 or ttyAMA0
RTC_ARGS = ["-rtc", "base=1970-01-01T00:00:00,clock=vm"]

# Device-tree bootargs, the part of /proc/cmdline before cmdline.txt on a real board.
_PI4_BOOTARGS = (
    "coherent_pool=1M 8250.nr_uarts=1 snd_bcm2835.enable_headphones=0 cgroup_disable=memory "
    "numa_policy=interleave nvme.max_host_mem_size_mb=0"
)  # bcm2711-rpi.dtsi
_PI5_BOOTARGS = (
    "reboot=w coherent_pool=1M 8250.nr_uarts=1 pci=pcie_bus_safe cgroup_disable=memory "
    "numa_policy=interleave"
)  # bcm2712-rpi.dtsi


BOOTARGS = {"pi4": _PI4_BOOTARGS, "pi5": _PI5_BOOTARGS}


def board(model: str) -> Board:
    try:
        return BOARDS[model]
    except KeyError:
        raise BuildError(
            f"the rehearsal knows no board {model!r} (known: {', '.join(BOARDS)})"
        ) from None


def vm_memory_mb(model: str) -> int:
    """QEMU's -m for a board: its MemTotal plus what Debian's arm64 kernel keeps for itself
    (struct pages, about 1/64 of memory, and its own image), so the guest reports about the
    board's MemTotal."""
    mem = board(model).mem_total_mb
    return mem + mem // 64 + 24


def kernel_cmdline(model: str, cmdline_txt: str) -> str:
    """What the firmware hands the kernel: the board's bootargs, then cmdline.txt's first line."""
    line = cmdline_txt.split("\n", 1)[0]
    words = [re.sub(r"^console=serial[01]\b", f"console={PRIMARY_UART}", w) for w in line.split()]
    return " ".join([BOOTARGS[board(model).family], *words])


def for_debian_kernel(pi_cmdline: str) -> str:
    """The Pi kernel's command line as Debian's kernel must get it to end in the same state:
    each controller's cgroup_disable=/cgroup_enable= words are read left to right, as the Pi
    kernel's handlers run in command-line order (the last one wins); Debian's kernel gets a
    cgroup_disable= for the controllers that end disabled and no cgroup_enable= at all."""
    words = pi_cmdline.split()
    off: dict[str, bool] = {}
    for w in words:
        for prefix, state in (("cgroup_disable=", True), ("cgroup_enable=", False)):
            if w.startswith(prefix):
                for ctl in filter(None, w[len(prefix) :].split(",")):
                    off[ctl] = state
    kept = [w for w in words if not w.startswith(("cgroup_disable=", "cgroup_enable="))]
    disabled = [c for c, is_off in off.items() if is_off]
    if disabled:
        kept.append("cgroup_disable=" + ",".join(disabled))
    return " ".join(kept)


def card_cmdline_txt(card: Path, work: Path) -> str:
    """cmdline.txt from the FAT partition of a card (any format qemu-img reads, e.g. a qcow2
    overlay), read the way the firmware does at power-on: partition 1 of the MBR."""
    mbr = work / "mbr.raw"
    _dd(card, mbr, skip=0, count=1)
    start, sectors = fat_partition(mbr.read_bytes())
    fat = work / "fat.raw"
    try:
        _dd(card, fat, skip=start, count=sectors)
        out = run(
            ["mtype", "-i", str(fat), "::cmdline.txt"],
            env={"MTOOLS_SKIP_CHECK": "1"},
            what=f"reading cmdline.txt of {card.name}",
        )
    finally:
        fat.unlink(missing_ok=True)
        mbr.unlink(missing_ok=True)
    return out.stdout


def fat_partition(mbr: bytes) -> tuple[int, int]:
    """(first sector, sectors) of MBR partition 1, which the firmware boots from."""
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        raise BuildError("the card has no MBR partition table")
    start, sectors = struct.unpack_from("<II", mbr, 446 + 8)
    if not sectors:
        raise BuildError("the card has no first partition (the firmware's FAT)")
    return start, sectors


def _dd(src: Path, dest: Path, *, skip: int, count: int) -> None:
    dest.unlink(missing_ok=True)
    run(
        [
            "qemu-img",
            "dd",
            "-U",
            "-O",
            "raw",
            "bs=512",
            f"skip={skip}",
            f"count={count}",
            f"if={src}",
            f"of={dest}",
        ],
        what=f"qemu-img dd ({src.name})",
    )


# The rehearsal initrd's /init (busybox sh). Its progress and failures go to the kernel log
# (/dev/kmsg at error priority, so `quiet` keeps them): the last console= of a Pi's command
# line is tty1, which the rehearsal does not see.
INITRAMFS_SCRIPT = r"""#!/bin/busybox sh
# piimage rehearsal initramfs: plays the image's own Raspberry Pi OS initramfs, whose kernel
# cannot run on QEMU's virt machine. Which Raspberry Pi behaviour each step stands for:
# src/piimage/piboot.py.
/bin/busybox mkdir -p /proc /sys /dev /newroot /fat /bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "<3>rehearsal initrd: $*" > /dev/kmsg; }
fail() { say "FAILED: $*"; sleep 2; poweroff -f; }
for m in $(cat /modules.list); do
    insmod "/modules/$m" 2>/dev/null || say "insmod $m failed"
done

cmdline=$(cat /proc/cmdline)
root=""; init=/sbin/init; mode=ro; resize=""
for w in $cmdline; do
    case "$w" in
        root=*) root="${w#root=}" ;;
        init=*) init="${w#init=}" ;;
        ro) mode=ro ;;
        rw) mode=rw ;;
        resize) resize=1 ;;
    esac
done
firstboot=""
case "$cmdline" in *firstboot*) firstboot=1 ;; esac

le32() { od -An -tu4 -j"$2" -N4 "$1" | tr -d ' \n'; }
put_le32() {
    v=$3
    printf "$(printf '\\%03o\\%03o\\%03o\\%03o' $((v & 255)) $((v >> 8 & 255)) $((v >> 16 & 255)) $((v >> 24 & 255)))" \
        | dd of="$1" bs=1 seek="$2" count=4 conv=notrunc 2>/dev/null
}
disk_id() { od -An -tx4 -j440 -N4 "$1" | tr -d ' \n'; }

# root=PARTUUID=<disk id>-<nn> (what Raspberry Pi OS writes) or a device path; rootwait.
dev=""; disk=""; part=""
i=0
while [ -z "$dev" ]; do
    case "$root" in
        PARTUUID=*)
            want="${root#PARTUUID=}"; id="${want%-*}"; part="${want##*-}"; part="${part#0}"
            for b in /sys/block/vd*; do
                [ -e "$b" ] || continue
                d="/dev/${b##*/}"
                if [ "$(disk_id "$d")" = "$id" ] && [ -b "$d$part" ]; then disk="$d"; dev="$d$part"; fi
            done ;;
        /dev/*) [ -b "$root" ] && dev="$root" && disk="${root%[0-9]*}" && part="${root##*[!0-9]}" ;;
        *) fail "cannot use root=$root" ;;
    esac
    [ -n "$dev" ] && break
    i=$((i + 1)); [ "$i" -gt 6000 ] && fail "root $root did not appear in 600 s"
    sleep 0.1
done

grow_partition() {
    ent=$((446 + 16 * (part - 1)))
    start=$(le32 "$disk" $((ent + 8)))
    size=$(le32 "$disk" $((ent + 12)))
    total=$(cat "/sys/block/${disk##*/}/size")
    if [ $((start + size)) -lt "$total" ]; then
        put_le32 "$disk" $((ent + 12)) $((total - start))
        say "grew partition $part of $disk from $size to $((total - start)) sectors"
        changed=1
    fi
}
changed=""; newid=""
if [ -n "$firstboot" ] || { [ -n "$resize" ] && [ "$part" = 2 ]; }; then
    grow_partition
fi
if [ -n "$resize" ]; then
    oldid=$(disk_id "$disk")
    newid=$(od -An -tx4 -N4 /dev/urandom | tr -d ' \n')
    [ "$newid" = 00000000 ] && newid=0badcafe
    put_le32 "$disk" 440 $((0x$newid))
    say "disk identifier $oldid -> $newid"
    changed=1
fi
[ -n "$changed" ] && { blockdev --rereadpt "$disk" || fail "cannot re-read the partition table of $disk"; }

if [ -n "$firstboot" ] || [ -n "$newid" ]; then
    mount -t ext4 -o rw "$dev" /newroot || fail "cannot mount $dev"
    if [ -n "$firstboot" ]; then
        mount --bind /dev /newroot/dev && mount -t proc proc /newroot/proc
        chroot /newroot resize2fs "$dev" > /dev/null 2>&1 || say "resize2fs $dev failed"
        say "grew the filesystem on $dev"
        umount /newroot/proc /newroot/dev
    fi
    if [ -n "$newid" ]; then
        sed -i "s/PARTUUID=$oldid-/PARTUUID=$newid-/g" /newroot/etc/fstab
        mount -t vfat "${disk}1" /fat || fail "cannot mount ${disk}1"
        sed -i -e "s/PARTUUID=$oldid-/PARTUUID=$newid-/g" -e 's/ resize$//' -e 's/ resize / /' /fat/cmdline.txt
        umount /fat
    fi
    [ -d /newroot/lib/modules ] || mkdir -p /newroot/lib/modules
    umount /newroot
fi

mount -t ext4 -o "$mode" "$dev" /newroot || fail "cannot mount $dev"
if [ ! -d /newroot/lib/modules ]; then
    mount -o remount,rw /newroot && mkdir -p /newroot/lib/modules && mount -o remount,"$mode" /newroot
fi
# Debian's modules for this kernel (the rehearsal's modules disk), over the Pi kernel's.
for b in /sys/block/vd*; do
    d="/dev/${b##*/}"
    [ "$d" = "$disk" ] && continue
    mount -t ext4 -o ro "$d" /newroot/lib/modules && break
done
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot "$init"
"""
