"""Pure helpers of the node stamp (the libguestfs side is covered by integration tests)."""

import pytest

from piimage.errors import BuildError
from piimage.stamp import _install_targets, _rewrite_accounts, node_disk_id, replace_partuuids


def test_disk_id_is_stable_and_distinct():
    a, b = node_disk_id("c", "node01"), node_disk_id("c", "node02")
    assert a == node_disk_id("c", "node01")
    assert a != b and len(a) == 8 and int(a, 16) != 0


def test_replace_partuuids_keeps_single_line():
    cmd = "console=serial0,115200 root=PARTUUID=abcdef01-02 rootfstype=ext4 rootwait resize\n"
    out = replace_partuuids(cmd, "abcdef01", "12345678", "cmdline.txt")
    assert out == cmd.replace("abcdef01", "12345678")
    assert out.count("\n") == 1


def test_replace_partuuids_refuses_foreign_ids():
    with pytest.raises(BuildError, match="PARTUUID"):
        replace_partuuids("root=/dev/mmcblk0p2\n", "abcdef01", "12345678", "cmdline.txt")


def test_rewrite_accounts():
    passwd = "root:x:0:0:root:/root:/bin/bash\npi:x:1000:1000:,,,:/home/pi:/bin/bash\n"
    out = _rewrite_accounts(passwd, "pi", "admin", home_field=5)
    assert "admin:x:1000:1000:,,,:/home/admin:/bin/bash\n" in out
    group = "sudo:x:27:pi\npi:x:1000:\nadm:x:4:syslog,pi\n"
    out = _rewrite_accounts(group, "pi", "admin", members_field=3)
    assert out == "sudo:x:27:admin\nadmin:x:1000:\nadm:x:4:syslog,admin\n"
    shadow = "pi:*:19000:0:99999:7:::\n"
    assert (
        _rewrite_accounts(shadow, "pi", "admin", hash_field=1, password_hash="$6$s$h")
        == "admin:$6$s$h:19000:0:99999:7:::\n"
    )
    assert (
        _rewrite_accounts(shadow, "pi", "admin", hash_field=1, password_hash=None)
        == "admin:*:19000:0:99999:7:::\n"
    )


def test_install_section():
    unit = "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n[Install]\nWantedBy=multi-user.target\nAlias=sshd.service\n"
    assert _install_targets(unit) == (["multi-user.target"], [], ["sshd.service"])


def test_cmdline_gets_the_memory_cgroup_back_at_its_end():
    from piimage.stamp import with_kernel_words

    trixie = "console=serial0,115200 console=tty1 root=PARTUUID=abcd1234-02 rootfstype=ext4 fsck.repair=yes rootwait resize\n"
    out = with_kernel_words(trixie)
    assert out == trixie.rstrip("\n") + " cgroup_enable=memory\n"
    assert with_kernel_words(out) == out  # once
    assert with_kernel_words("a b").count("\n") == 1


def test_machine_id_keeps_the_first_boot_state_and_never_a_real_id():
    from piimage.stamp import first_boot_machine_id

    assert first_boot_machine_id(b"") is None  # bookworm: empty, kept
    assert first_boot_machine_id(b"uninitialized\n") is None  # trixie: first boot, kept
    assert first_boot_machine_id(None) is None
    assert first_boot_machine_id(b"0123456789abcdef0123456789abcdef\n") == b"uninitialized\n"


def test_fake_hwclock_data_is_utc_in_its_own_format():
    from piimage.stamp import fake_hwclock_data

    assert fake_hwclock_data(0) == b"1970-01-01 00:00:00\n"
    assert fake_hwclock_data(1796140800) == b"2026-12-01 16:00:00\n"
