"""cluster.yaml validation: every problem at once, each located by line and key."""

from pathlib import Path

import pytest

from piimage import inventory as inv
from piimage.errors import InventoryError, UserError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH3903J3epy2OvY9kxA4Gr+Ix0/+xMkM+jxK162Gs/b2 me@laptop"

GOOD = f"""\
name: lab
network:
  subnet: 10.0.0.0/24
  gateway: 10.0.0.1
  dns: [10.0.0.1, 1.1.1.1]
admin:
  name: alice
  ssh_authorized_keys:
    - {KEY}
nodes:
  - {{hostname: head, role: head, ip: 10.0.0.10}}
  - {{hostname: node01, role: compute, ip: 10.0.0.11}}
"""


def load_text(tmp_path: Path, text: str, **kw) -> inv.Cluster:
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    return inv.load(p, **kw)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(InventoryError) as ei:
        load_text(tmp_path, text)
    return ei.value.problems


def test_good_inventory(tmp_path):
    c = load_text(tmp_path, GOOD)
    assert c.name == "lab" and [n.hostname for n in c.nodes] == ["head", "node01"]
    assert str(c.network.subnet) == "10.0.0.0/24" and c.network.prefixlen == 24
    assert [str(d) for d in c.network.dns] == ["10.0.0.1", "1.1.1.1"]
    assert c.admin.ssh_authorized_keys == (KEY,)
    assert c.head.hostname == "head"
    assert c.hardware.cpus == 4 and c.hardware.memory_mb == 1800
    assert c.secrets_dir == tmp_path / ".piimage" / "secrets"
    assert c.source == (tmp_path / "cluster.yaml").resolve()


def test_every_problem_at_once_with_lines(tmp_path):
    text = GOOD.replace("ip: 10.0.0.11}", "ip: 10.0.1.12}") + (
        "  - {hostname: node_03, role: compute, ip: 10.0.0.13}\n"
        "  - {hostname: node01, role: compute, ip: 10.0.0.10}\n"
        "  - {hostnam: x, role: gpu, ip: 10.0.0.255}\n"
    )
    p = problems(tmp_path, text)
    f = str(tmp_path / "cluster.yaml")
    assert f"{f}:12: nodes[1].ip: 10.0.1.12 is outside the cluster subnet 10.0.0.0/24" in p
    assert any(s.startswith(f"{f}:13: nodes[2].hostname: 'node_03' is not a valid hostname") for s in p)
    assert f"{f}:14: nodes[3].hostname: hostname 'node01' is used twice (nodes[1])" in p
    assert f"{f}:14: nodes[3].ip: address 10.0.0.10 is used twice (nodes[0])" in p
    assert f"{f}:15: nodes[4].hostnam: unknown key 'hostnam' (did you mean 'hostname'?)" in p
    assert any("nodes[4].role: unknown role 'gpu'" in s for s in p)
    assert f"{f}:15: nodes[4].ip: 10.0.0.255 is the subnet's broadcast address" in p


def test_malformed_yaml_names_line(tmp_path):
    p = problems(tmp_path, "name: x\nnodes: [\n  - {a: 1\n")
    assert len(p) == 1 and ":3:" in p[0] and "malformed YAML" in p[0]


def test_top_level_not_mapping(tmp_path):
    assert "expected a mapping" in problems(tmp_path, "- a\n- b\n")[0]


@pytest.mark.parametrize(
    "change, fragment",
    [
        (("name: lab", "nmae: lab"), "unknown key 'nmae' (did you mean 'name'?)"),
        (("ip: 10.0.0.10}", "ip: 10.0.0.0}"), "10.0.0.0 is the subnet's network address"),
        (("ip: 10.0.0.10}", "ip: 10.0.0.1}"), "10.0.0.1 is the gateway's address"),
        (("ip: 10.0.0.10}", "ip: 10.0.0.300}"), "'10.0.0.300' is not an IPv4 address"),
        (("gateway: 10.0.0.1", "gateway: 10.9.0.1"), "network.gateway: 10.9.0.1 is outside the cluster subnet"),
        (("subnet: 10.0.0.0/24", "subnet: 10.0.0.5/24"), "network.subnet"),
        (("role: head", "role: compute"), "no node has role 'head'"),
        (("role: compute", "role: head"), "a second head node"),
        (("name: lab", "name: lab\ntimezone: Mars/Olympus Mons"), "is not a time zone name"),
        (("name: lab", "name: lab\nhardware: {model: pi4-3gb}"), "unknown hardware model 'pi4-3gb' (did you mean"),
        (("name: lab", "name: lab\nhardware: {poe_hat: yes-please}"), "is not a PoE HAT overlay"),
        (("name: lab", "name: lab\nstages: [nowhere]"), "stages[0]: stages directory"),
        (("name: lab", "name: lab\napt: {proxy: 'ftp://x'}"), "apt.proxy: 'ftp://x' is not an http(s) URL"),
        (("name: lab", "name: Lab_1"), "is not a valid cluster name"),
        (("name: alice", "name: root"), "the admin user cannot be root"),
        (("name: lab", "name: lab\ncluster_user: {uid: 1000}"), "cluster_user.uid: 1000 must be a number from 1001"),
        (("    - " + KEY, "    - ssh-ed25519 notbase64!!"), "does not look like an OpenSSH public key"),
        (("    - " + KEY, "    - /no/such/key.pub"), "key file /no/such/key.pub does not exist"),
    ],
)
def test_single_problem(tmp_path, change, fragment):
    old, new = change
    assert old in GOOD
    p = problems(tmp_path, GOOD.replace(old, new, 1))
    assert any(fragment in s for s in p), p


def test_unknown_role_lists_known(tmp_path):
    p = problems(tmp_path, GOOD.replace("role: compute", "role: comptue"))
    assert any("unknown role 'comptue' (did you mean 'compute'?)" in s for s in p)


def test_user_roles(tmp_path):
    text = GOOD + "  - {hostname: gpu1, role: gpu, ip: 10.0.0.20}\n"
    c = load_text(tmp_path, text, known_roles=("head", "compute", "gpu"))
    assert c.node("gpu1").role == "gpu"


def test_password_hash_is_never_echoed(tmp_path):
    p = problems(tmp_path, GOOD.replace("  name: alice", "  name: alice\n  password_hash: hunter2"))
    assert any("admin.password_hash" in s for s in p)
    assert not any("hunter2" in s for s in p)


def test_private_key_refused_and_not_printed(tmp_path):
    priv = tmp_path / "id_ed25519"
    priv.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETSTUFF\n-----END OPENSSH PRIVATE KEY-----\n")
    p = problems(tmp_path, GOOD.replace("    - " + KEY, f"    - {priv}"))
    assert any("is a private key" in s for s in p)
    assert not any("SECRETSTUFF" in s for s in p)


def test_key_file_relative_to_inventory(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "me.pub").write_text(KEY + "\n")
    c = load_text(tmp_path, GOOD.replace("    - " + KEY, "    - keys/me.pub"))
    assert c.admin.ssh_authorized_keys == (KEY,)


def test_missing_inventory_file(tmp_path):
    with pytest.raises(UserError, match="inventory file not found"):
        inv.load(tmp_path / "nope.yaml")


def test_default_cluster_uses_callers_keys(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SUDO_USER", raising=False)
    c = inv.load(None, cwd=tmp_path)
    assert c.name == "picluster" and c.source is None
    assert [n.hostname for n in c.nodes] == ["head", "node01", "node02", "node03", "node04"]
    assert str(c.node("node02").ip) == "10.42.0.12"
    assert c.admin.ssh_authorized_keys == (KEY,)


def test_default_yaml_loads(tmp_path):
    c = load_text(tmp_path, inv.default_yaml())
    assert len(c.nodes) == 5


def test_select_nodes(tmp_path):
    c = load_text(tmp_path, GOOD)
    assert inv.select_nodes(c, hostname="node01", role="compute", all_nodes=False)[0].hostname == "node01"
    assert len(inv.select_nodes(c, hostname=None, role=None, all_nodes=True)) == 2
    assert [n.hostname for n in inv.select_nodes(c, hostname=None, role="compute", all_nodes=True)] == ["node01"]
    with pytest.raises(UserError, match="node01 is a compute node in .*, not head"):
        inv.select_nodes(c, hostname="node01", role="head", all_nodes=False)
    with pytest.raises(UserError, match="no such node .*did you mean 'node01'"):
        inv.select_nodes(c, hostname="node1", role=None, all_nodes=False)
    with pytest.raises(UserError, match="which node"):
        inv.select_nodes(c, hostname=None, role="compute", all_nodes=False)


def test_init_writes_and_refuses_overwrite(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "nohome"))
    written = inv.init(tmp_path)
    assert (tmp_path / "cluster.yaml") in written
    secrets = tmp_path / ".piimage" / "secrets"
    assert secrets.stat().st_mode & 0o777 == 0o700
    inv.load(tmp_path / "cluster.yaml")
    with pytest.raises(UserError, match="not overwriting"):
        inv.init(tmp_path)
    inv.init(tmp_path, force=True)
