"""The Raspberry Pi boot the rehearsal plays (piboot.py): command line, board, card."""

import struct

import pytest

from piimage import piboot
from piimage.errors import BuildError
from piimage.inventory.boards import BOARDS

TRIXIE = (
    "console=serial0,115200 console=tty1 root=PARTUUID=1234abcd-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait resize cgroup_enable=memory\n"
)


def test_command_line_is_bootargs_then_cmdline_txt():
    line = piboot.kernel_cmdline("pi4-2gb", TRIXIE + "second line is never read\n")
    words = line.split()
    # the device tree's bootargs come first, with the Pi kernel's memory cgroup default ...
    assert line.startswith("coherent_pool=1M 8250.nr_uarts=1 ")
    assert words.index("cgroup_disable=memory") < words.index("root=PARTUUID=1234abcd-02")
    # ... then cmdline.txt's first line, word for word, serial0 resolved to the primary UART
    assert words[-1] == "cgroup_enable=memory" and "resize" in words
    assert "console=ttyAMA0,115200" in words and "console=serial0,115200" not in words
    assert words.index("console=ttyAMA0,115200") < words.index("console=tty1")
    assert "second" not in words and "net.ifnames=0" not in words


def test_pi5_bootargs_and_unknown_board():
    assert piboot.kernel_cmdline("pi5-8gb", "root=/dev/mmcblk0p2").startswith("reboot=w ")
    with pytest.raises(BuildError, match="no board 'pi9-1gb'"):
        piboot.kernel_cmdline("pi9-1gb", "")


def test_every_inventory_board_has_a_rehearsal_board_below_its_realmemory():
    """slurm.conf's RealMemory (inventory) must not exceed what the board reports, or slurmd
    drains the node; the VM is given about that MemTotal."""
    for model, b in BOARDS.items():
        assert b.real_memory_mb <= b.mem_total_mb, model
        assert b.mem_total_mb < piboot.vm_memory_mb(model) < b.mem_total_mb * 1.05, model
    assert piboot.board("pi4-2gb").mem_total_mb == 1853 and piboot.board("pi4-2gb").measured


def _mbr(entries, disk_id=0x1234ABCD):
    mbr = bytearray(512)
    struct.pack_into("<I", mbr, 440, disk_id)
    for i, (ptype, start, size) in enumerate(entries):
        struct.pack_into("<B3xB3xII", mbr, 446 + 16 * i, 0, ptype, start, size)
    mbr[510:512] = b"\x55\xaa"
    return bytes(mbr)


def test_fat_partition_from_the_mbr():
    assert piboot.fat_partition(_mbr([(0x0C, 16384, 1048576), (0x83, 1064960, 4000000)])) == (
        16384,
        1048576,
    )
    with pytest.raises(BuildError, match="no MBR"):
        piboot.fat_partition(b"\0" * 512)
    with pytest.raises(BuildError, match="no first partition"):
        piboot.fat_partition(_mbr([]))


def test_initramfs_plays_the_pi_first_boot_steps():
    s = piboot.INITRAMFS_SCRIPT
    # bookworm's firstboot grows partition and filesystem; trixie's resize only the partition,
    # then a new disk id that fstab and cmdline.txt follow, ` resize` dropped
    assert "*firstboot*) firstboot=1" in s and "resize) resize=1" in s
    assert "resize2fs" in s and 'put_le32 "$disk" 440' in s
    assert "/newroot/etc/fstab" in s and "/fat/cmdline.txt" in s and "'s/ resize$//'" in s
    # the root is mounted read-only unless `rw`, and init= is honoured
    assert "mode=ro" in s and 'exec switch_root /newroot "$init"' in s


def test_pi_kernel_cgroup_words_as_debians_kernel_needs_them():
    pi = piboot.kernel_cmdline("pi4-2gb", "console=serial0,115200 root=PARTUUID=1-02 rootwait\n")
    # the Pi kernel's default: the memory controller off, and Debian's kernel is told so
    assert "cgroup_disable=memory" in piboot.for_debian_kernel(pi).split()
    # cgroup_enable=memory later on the line (piimage's cmdline.txt) turns it back on: Debian's
    # kernel, which has no cgroup_enable=, gets neither word
    on = piboot.for_debian_kernel(pi + " cgroup_enable=memory")
    assert "cgroup" not in on and "root=PARTUUID=1-02" in on.split()
    # the last word for a controller wins; other controllers are kept apart
    line = "a cgroup_enable=memory cgroup_disable=memory,cpuset b cgroup_enable=cpuset"
    assert piboot.for_debian_kernel(line) == "a b cgroup_disable=memory"
