"""`piimage flash` without a card: what lsblk says, each refusal, the block map, waiting for
cards (the writing and the read-back are real, on loop devices: tests/integration)."""

import pytest

from piimage import flash
from piimage.errors import UserError

GiB = 1 << 30


def _disk(name, size, rm=True, mounts=(None,), children=(), ro=False, model="SD Reader"):
    return {
        "name": name,
        "path": f"/dev/{name}",
        "type": "disk",
        "size": size,
        "rm": rm,
        "hotplug": False,
        "ro": ro,
        "model": model,
        "tran": "usb",
        "mountpoints": list(mounts),
        "children": list(children),
    }


def _part(name, size, mounts=(None,), fstype="ext4", label="rootfs"):
    return {
        "name": name,
        "path": f"/dev/{name}",
        "type": "part",
        "size": size,
        "rm": True,
        "hotplug": False,
        "ro": False,
        "model": None,
        "tran": None,
        "mountpoints": list(mounts),
        "fstype": fstype,
        "label": label,
    }


LSBLK = {
    "blockdevices": [
        _disk("vda", 256 * GiB, rm=False, model=None, children=[_part("vda1", 256 * GiB, ["/"])]),
        _disk(
            "sdb",
            32 * GiB,
            children=[
                _part("sdb1", GiB // 2, ["/media/alice/bootfs"], "vfat", "bootfs"),
                _part("sdb2", 4 * GiB, ["/media/alice/rootfs"]),
            ],
        ),
        _disk("sdc", 32 * GiB, children=[_part("sdc1", 32 * GiB, ["/mnt/backup"])]),
        _disk("sdd", 1 * GiB),
        _disk("sde", 64 * GiB, rm=False, model="Fixed SSD"),
        _disk("sdf", 2048 * GiB),
        _disk("sdg", 32 * GiB, ro=True),
        _disk("sdh", 0),  # a reader with no card in it
    ]
}


@pytest.fixture
def devices(monkeypatch):
    monkeypatch.setattr(flash, "block_device", lambda p: p if p.startswith("/dev/") else None)
    return flash.parse_lsblk(LSBLK)


def test_lsblk_is_read_with_partitions_and_their_disk(devices):
    assert devices["/dev/sdb2"].parent == "/dev/sdb" and devices["/dev/sdb"].removable
    assert devices["/dev/sdb"].all_mounts() == ["/media/alice/bootfs", "/media/alice/rootfs"]
    assert flash.system_disks(devices) == {"/dev/vda"}
    text = devices["/dev/sdb"].describe()
    assert text.startswith("/dev/sdb: SD Reader (usb), 32.0 GiB; partitions: sdb1 vfat bootfs")


def test_a_card_a_desktop_mounted_is_taken_and_unmounted_first(devices):
    dev, mounts = flash.check_target("/dev/sdb", 2 * GiB, devices)
    assert dev.path == "/dev/sdb"
    assert mounts == ["/media/alice/bootfs", "/media/alice/rootfs"]


@pytest.mark.parametrize(
    "path, why",
    [
        ("/dev/sdb2", "is a partition of /dev/sdb: give the whole card, /dev/sdb"),
        ("/dev/vda", "holds this system's own filesystems"),
        ("/dev/sdc", "has a filesystem mounted at /mnt/backup"),
        ("/dev/sdd", "is too small: 1.0 GiB, the image needs 2.0 GiB"),
        ("/dev/sde", "is not a removable disk"),
        ("/dev/sdf", "larger than any SD card"),
        ("/dev/sdg", "is read-only"),
        ("notadev", "not a block device"),
    ],
)
def test_each_refusal_says_why_in_one_line(devices, path, why):
    with pytest.raises(UserError) as e:
        flash.check_target(path, 2 * GiB, devices)
    assert why in e.value.message and "\n" not in e.value.message
    assert e.value.message.startswith(f"{path}: ")


def test_fixed_and_large_disks_only_when_asked(devices):
    assert flash.check_target("/dev/sde", 2 * GiB, devices, allow_fixed=True)[0].path == "/dev/sde"
    assert flash.check_target("/dev/sdf", 2 * GiB, devices, allow_large=True)[0].path == "/dev/sdf"
    with pytest.raises(UserError, match="system's own"):
        flash.check_target("/dev/vda", 2 * GiB, devices, allow_fixed=True, allow_large=True)


def test_the_block_map_is_read(tmp_path):
    p = tmp_path / "n.img.bmap"
    p.write_text(
        '<?xml version="1.0" ?>\n<bmap version="2.0">\n<ImageSize> 10000 </ImageSize>\n'
        "<BlockSize> 4096 </BlockSize>\n<BlocksCount> 3 </BlocksCount>\n"
        "<ChecksumType> sha256 </ChecksumType>\n<BlockMap>\n"
        '<Range chksum="aa"> 0 </Range>\n<Range chksum="bb"> 2 </Range>\n</BlockMap>\n</bmap>\n'
    )
    m = flash.read_bmap(p)
    assert (m.block_size, m.image_size, m.checksum) == (4096, 10000, "sha256")
    assert m.ranges == ((0, 0, "aa"), (2, 2, "bb"))
    assert m.mapped_bytes == 4096 + (10000 - 8192)  # the last block ends with the image
    p.write_text("<bmap><BlockSize>x</BlockSize></bmap>")
    with pytest.raises(UserError, match="not a block map"):
        flash.read_bmap(p)


def test_flash_all_waits_for_the_next_card_and_for_its_removal():
    empty = {"blockdevices": [_disk("sdh", 0)]}
    inserted = {"blockdevices": [_disk("sdh", 32 * GiB)]}
    seq = [empty, empty, inserted]
    sleeps = []
    before = flash.card_paths(flash.parse_lsblk(empty))
    card = flash.wait_for_card(before, lambda: flash.parse_lsblk(seq.pop(0)), sleep=sleeps.append)
    assert card.path == "/dev/sdh" and len(sleeps) == 2
    seq = [inserted, inserted, empty]
    flash.wait_for_removal("/dev/sdh", lambda: flash.parse_lsblk(seq.pop(0)), sleep=sleeps.append)
    assert len(sleeps) == 4 and not seq


def test_a_write_that_does_not_finish_leaves_a_card_that_cannot_boot(tmp_path):
    """A plain file stands for the card: the image does not match its map, the write stops,
    and the card's first MiB is zeroed (no partition table: it cannot pass for a good one)."""
    image = tmp_path / "n.img"
    image.write_bytes(b"\x01" * 8192)
    card = tmp_path / "card"
    card.write_bytes(b"\x02" * (2 << 20))
    bmap = flash.BlockMap(4096, 8192, ((0, 1, "0" * 64),), "sha256")
    with pytest.raises(Exception, match="do not match its .bmap"):
        flash.write_and_verify(image, bmap, str(card))
    assert card.read_bytes()[: 1 << 20] == bytes(1 << 20)


def test_a_write_reads_every_range_back(tmp_path):
    import hashlib

    data = bytes(range(256)) * 48  # 12288 bytes: three blocks
    image = tmp_path / "n.img"
    image.write_bytes(data)
    card = tmp_path / "card"
    card.write_bytes(b"\xff" * 16384)
    digest = hashlib.sha256(data[8192:]).hexdigest()
    bmap = flash.BlockMap(4096, len(data), ((2, 2, digest),), "sha256")
    figures = flash.write_and_verify(image, bmap, str(card))
    out = card.read_bytes()
    assert figures["bytes"] == 4096 and out[8192:12288] == data[8192:]
    assert out[:8192] == b"\xff" * 8192  # unmapped blocks are not written


def test_many_chunks_and_ranges_are_written_in_place(tmp_path, monkeypatch):
    """The reader thread runs ahead of the writer by a few chunks: with chunks smaller than
    the ranges and more chunks than the queue holds, every mapped byte lands where it
    belongs and nothing else is touched."""
    import hashlib
    import os

    monkeypatch.setattr(flash, "CHUNK", 4096)
    monkeypatch.setattr(flash, "QUEUE_CHUNKS", 2)
    data = os.urandom(64 * 4096)
    image = tmp_path / "n.img"
    image.write_bytes(data)
    card = tmp_path / "card"
    card.write_bytes(b"\xee" * len(data))
    spans = ((0, 9), (20, 20), (30, 63))
    ranges = tuple(
        (a, b, hashlib.sha256(data[a * 4096 : (b + 1) * 4096]).hexdigest()) for a, b in spans
    )
    figures = flash.write_and_verify(
        image, flash.BlockMap(4096, len(data), ranges, "sha256"), str(card)
    )
    out = card.read_bytes()
    assert figures["bytes"] == (10 + 1 + 34) * 4096
    for a, b in spans:
        assert out[a * 4096 : (b + 1) * 4096] == data[a * 4096 : (b + 1) * 4096]
    assert out[10 * 4096 : 20 * 4096] == b"\xee" * 10 * 4096


def test_an_image_shorter_than_its_map_stops_the_write(tmp_path):
    """What the reader thread finds (here: the image ends before the map does) stops the
    write with its own message, and the card is left unbootable."""
    image = tmp_path / "n.img"
    image.write_bytes(b"\x01" * 4096)
    card = tmp_path / "card"
    card.write_bytes(b"\x02" * (2 << 20))
    bmap = flash.BlockMap(4096, 16384, ((0, 3, None),), "")
    with pytest.raises(Exception, match="the image ends at 4096"):
        flash.write_and_verify(image, bmap, str(card))
    assert card.read_bytes()[: 1 << 20] == bytes(1 << 20)


def test_a_cancelled_write_is_an_interrupt(tmp_path):
    image = tmp_path / "n.img"
    image.write_bytes(b"\x01" * 8192)
    card = tmp_path / "card"
    card.write_bytes(b"\x02" * (2 << 20))
    bmap = flash.BlockMap(4096, 8192, ((0, 0, None), (1, 1, None)), "")
    with pytest.raises(KeyboardInterrupt):
        flash.write_and_verify(image, bmap, str(card), cancelled=lambda: True)
    assert card.read_bytes()[: 1 << 20] == bytes(1 << 20)


def test_an_image_that_ends_inside_a_block_is_written_whole(tmp_path, monkeypatch):
    """Direct I/O takes whole blocks only: a piece that is not (the image's last bytes, cut
    inside a block) is written through the page cache, and every byte still lands."""
    import hashlib
    import os

    monkeypatch.setattr(flash, "CHUNK", 8192)
    data = os.urandom(3 * 8192 + 1000)
    image = tmp_path / "n.img"
    image.write_bytes(data)
    card = tmp_path / "card"
    card.write_bytes(b"\xee" * (len(data) + 4096))
    bmap = flash.BlockMap(4096, len(data), ((0, 6, hashlib.sha256(data).hexdigest()),), "sha256")
    figures = flash.write_and_verify(image, bmap, str(card))
    assert figures["bytes"] == len(data)
    assert card.read_bytes()[: len(data)] == data
