"""`piimage inspect`'s pure side: the identity the build writes, which planned files can be
compared without keys, the drift found on a card, and the report (the libguestfs side, a real
image read back, is in tests/integration/test_build.py)."""

import io
import json
import tarfile

from test_stamp_unit import GROUP, PASSWD, FakeDisk

from piimage import __version__, build, identify
from piimage import inventory as inv
from piimage.actions import RenderedFile
from piimage.fetch import public_url
from piimage.stamp import IDENTITY, Admin, _stamp_mounted


def test_the_identity_names_the_node_its_base_and_its_key_packages():
    doc = json.loads(
        identify.record(
            cluster="c",
            node="node01",
            role="compute",
            base={"name": "Raspberry Pi OS Lite (64-bit)", "sha256": "ab" * 32},
            layer="compute-1234.img",
            layer_info={
                "release": "trixie",
                "installed": {"slurmd": "24.11.5-4", "munge": "0.5.16-1", "bash": "5.2"},
            },
            now=0,
        )
    )
    assert doc["format"] == identify.FORMAT and doc["piimage"] == __version__
    assert (doc["cluster"], doc["node"], doc["role"]) == ("c", "node01", "compute")
    assert doc["built"] == "1970-01-01T00:00:00Z" and doc["release"] == "trixie"
    # the packages a cluster owner asks about, in KEY_PACKAGES' order; not every package
    assert doc["packages"] == {"slurmd": "24.11.5-4", "munge": "0.5.16-1"}


def test_a_private_mirror_url_loses_its_credentials():
    assert public_url("https://bob:s3cret@mirror.lan/x.img.xz") == "https://mirror.lan/x.img.xz"
    assert public_url("https://mirror.lan:8080/x") == "https://mirror.lan:8080/x"
    assert public_url("/srv/images/x.img") == "/srv/images/x.img"


def test_the_stamp_writes_the_identity():
    disk = FakeDisk(
        {
            "/etc/passwd": PASSWD.encode(),
            "/etc/group": GROUP.encode(),
            "/etc/fstab": b"PARTUUID=abcdef01-02 / ext4 defaults 0 1\n",
            "/boot/firmware/cmdline.txt": b"root=PARTUUID=abcdef01-02 rootwait\n",
        }
    )
    from piimage.stages import NodePlan

    _stamp_mounted(
        disk,
        NodePlan("n1", "compute"),
        cluster_name="c",
        admin=Admin("alice", None),
        identity=b"{}\n",
    )
    with tarfile.open(fileobj=io.BytesIO(disk.tars[0])) as t:
        m = t.getmember(IDENTITY.lstrip("/"))
        assert (m.mode, m.uid, t.extractfile(m).read()) == (0o644, 0, b"{}\n")


def _file(path, data, secret=False, mode=0o644):
    return RenderedFile(path, data, mode, "root", "root", "10-x", secret)


def test_only_files_without_keys_are_compared():
    a = [_file("/etc/hosts", b"h"), _file("/etc/k", b"A"), _file("/etc/munge/munge.key", b"", True)]
    b = [_file("/etc/hosts", b"h"), _file("/etc/k", b"B"), _file("/etc/munge/munge.key", b"", True)]
    keep, skipped = identify.comparable(a, b)
    assert [f.path for f in keep] == ["/etc/hosts"] and skipped == 2


def test_the_stand_in_key_variants_tell_the_files_that_hold_keys(tmp_path):
    (tmp_path / "cluster.yaml").write_text(
        "name: c\nnodes:\n  - {hostname: head, role: head, ip: 10.42.0.10}\n"
        "  - {hostname: node01, role: compute, ip: 10.42.0.11}\n"
        "admin: {name: alice, ssh_authorized_keys: ['ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIGm6QmZrLrI5tBL+3ODQoVeImb1QX5wA1U7hI1Yj0Pqd a@b']}\n"
    )
    cluster = inv.load(tmp_path / "cluster.yaml")
    a, b = (
        build.plan(cluster, cluster.nodes, keys=build.stand_in_keys(cluster, v), out_dir=tmp_path)
        for v in (0, 1)
    )
    node = next(p for p in a.nodes if p.hostname == "node01")
    other = next(p for p in b.nodes if p.hostname == "node01")
    keep, skipped = identify.comparable(node.stamp.files, other.stamp.files)
    kept = {f.path for f in keep}
    assert {"/etc/hosts", "/etc/slurm/slurm.conf", "/etc/hostname"} <= kept
    assert "/etc/ssh/ssh_known_hosts" not in kept and "/etc/munge/munge.key" not in kept
    assert skipped >= 3


class _Card(FakeDisk):
    def stat(self, p):
        return {"st_mode": 0o100600 if p == "/etc/private" else 0o100644}


def test_drift_names_missing_changed_and_mode():
    card = _Card({"/etc/hosts": b"10.0.0.12 node02\n", "/etc/private": b"x", "/etc/same": b"s"})
    files = [
        _file("/etc/hosts", b"10.0.0.22 node02\n"),
        _file("/etc/private", b"x"),
        _file("/etc/same", b"s"),
        _file("/etc/new", b"n"),
    ]
    drift = {d.path: d for d in identify._drift(card, files)}
    assert set(drift) == {"/etc/hosts", "/etc/private", "/etc/new"}
    assert drift["/etc/new"].problem == "missing" and drift["/etc/private"].problem == "mode"
    assert "-10.0.0.12 node02" in drift["/etc/hosts"].diff
    assert "+10.0.0.22 node02" in drift["/etc/hosts"].diff


def test_the_report_says_who_the_card_is_and_what_drifted():
    item = identify.Inspected(
        "out/c/node02.img",
        {
            "node": "node02",
            "cluster": "c",
            "role": "compute",
            "built": "2026-12-03T10:00:00Z",
            "piimage": "0.1.0",
            "base": {"name": "Raspberry Pi OS Lite (64-bit)", "sha256": "ab" * 32},
            "release": "trixie",
            "role_layer": "compute-1.img",
        },
        {"slurmd": "24.11.5-4", "munge": "0.5.16-1"},
        "Debian GNU/Linux 13 (trixie)",
        [identify.Drift("/etc/hosts", "differs", ["--- a", "+++ b", "@@ -1 +1 @@", "-x", "+y"])],
        3,
    )
    text = "\n".join(identify.text_report(item))
    assert text.startswith("out/c/node02.img: node node02 of cluster c (compute)")
    assert "slurmd 24.11.5-4" in text and "munge  0.5.16-1" in text
    assert "1 file differs from" in text and "/etc/hosts: differs" in text
    assert "      -x" in text and "      +y" in text and "@@" not in text
    doc = item.to_json()
    assert doc["drift"][0]["path"] == "/etc/hosts" and doc["drift_not_compared"] == 3
    item.drift = []
    assert "drift     none" in "\n".join(identify.text_report(item))
