"""cluster.yaml → Cluster: every problem at once, each located by file, line and key path;
the built-in default cluster; key files; node selection; init; the secrets directory."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import stat
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from piimage import inventory as inv
from piimage import render, secrets
from piimage.errors import InventoryError, UserError
from piimage.profiles import Profile, load_profiles, profile_dirs

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH3903J3epy2OvY9kxA4Gr+Ix0/+xMkM+jxK162Gs/b2 me@laptop"
KEY2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKJ5Y1q6zkUiqsUVxXEC4zyVTrxPwtw9YbHhnTZ6Bzx0 other@desk"
BLOB = KEY.split()[1]
SHA512 = "$6$/XN/ciQM6egBFc8Z$qcxgSa5FZ0c5Y7q1WooY7Nq36QHVHIyR.gVqtP39OR0sTJAyjCnrsTVXm01qBdVid/nFqLpsyfuEulokUiBWE1"
YESCRYPT = "$y$j9T$abcdefghijklmnop$wRwvHNqzMkHLG74uLLCRVTwaZ.a1aIothEUeYGf9oED"
PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE SECRETSTUFF\n-----END OPENSSH PRIVATE KEY-----\n"

# line numbers matter: the tests below name them
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
F = "cluster.yaml"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A home of our own (never the real ~/.ssh), no sudo, and cwd = tmp_path."""
    h = tmp_path / "home"
    (h / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.chdir(tmp_path)
    return h


@pytest.fixture
def logged(caplog, monkeypatch):
    # cli.py's log setup turns propagation off; caplog listens at the root
    monkeypatch.setattr(logging.getLogger("piimage"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="piimage")
    return caplog


def builtin_roles() -> dict[str, Profile]:
    return load_profiles(profile_dirs(None))


def load(tmp_path: Path, text: str, **kw) -> inv.Cluster:
    (tmp_path / F).write_text(text)
    return inv.load(Path(F), cwd=tmp_path, **kw)


def problems(tmp_path: Path, text: str, **kw) -> list[str]:
    with pytest.raises(InventoryError) as ei:
        load(tmp_path, text, **kw)
    assert ei.value.exit_code == 2
    return ei.value.problems


def edit(old: str, new: str, text: str = GOOD) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


# --- a good inventory and the model --------------------------------------------------------
def test_good_inventory_model(tmp_path):
    c = load(tmp_path, GOOD)
    assert c.name == "lab" and c.base == "raspios-lite-arm64" and c.base_sha256 is None
    assert c.network.subnet == IPv4Network("10.0.0.0/24") and c.network.prefixlen == 24
    assert c.network.gateway == IPv4Address("10.0.0.1") and c.network.interface == "eth0"
    assert c.network.dns == (IPv4Address("10.0.0.1"), IPv4Address("1.1.1.1"))
    assert c.admin.name == "alice" and c.admin.home == "/home/alice"
    assert c.admin.ssh_authorized_keys == (KEY,)
    assert c.timezone == "Etc/UTC" and c.hardware == inv.Hardware("pi4-2gb", 4, 1800, None)
    assert isinstance(c.nodes, tuple) and [n.hostname for n in c.nodes] == ["head", "node01"]
    assert c.nodes[1].ip == IPv4Address("10.0.0.11") and c.nodes[1].hardware == c.hardware
    assert c.source == tmp_path / F and c.base_dir == tmp_path
    assert c.secrets_dir == tmp_path / ".piimage" / "secrets" and c.secrets_dir.is_absolute()
    assert (c.apt.mirror, c.apt.proxy) == (None, None)
    assert (c.shared.path, c.shared.device_uuid) == ("/clusterfs", None)
    assert (c.cluster_user.name, c.cluster_user.uid) == ("mpiuser", 1500) and c.stages == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.name = "x"  # type: ignore[misc]


def test_helpers(tmp_path):
    c = load(tmp_path, GOOD + "  - {hostname: node02, role: compute, ip: 10.0.0.12}\n")
    assert c.head.hostname == "head" and c.node("NODE01").hostname == "node01"
    assert [n.hostname for n in c.nodes_with_role("compute")] == ["node01", "node02"]
    assert [n.hostname for n in c.job_nodes] == ["node01", "node02"]
    with pytest.raises(KeyError):
        c.node("node09")


def test_every_key_of_the_schema(tmp_path):
    (tmp_path / "extra").mkdir()
    text = edit(
        "name: lab\n",
        f"""\
name: lab
base: https://example.org/images/raspios.img.xz
base_sha256: {"AB" * 32}
timezone: Europe/London
hardware: {{model: pi5-8gb, poe_hat: rpi-poe-plus}}
secrets_dir: private/keys
apt: {{mirror: 'http://deb.example.org/debian', proxy: 'http://10.0.0.1:3142',
      security_mirror: 'http://deb.example.org/debian-security/'}}
shared: {{path: /srv/shared, device_uuid: 0b3c5a2e-41cf-4bd2-9a1c-1d2e3f405162}}
cluster_user: {{name: mpi, uid: 2000}}
stages: [extra]
""",
    )
    text = edit("  dns:", "  interface: end0\n  dns:", text)
    text = edit(f"    - {KEY}\n", f"    - {KEY}\n  password_hash: {SHA512}\n", text)
    text += "  - {hostname: big1, role: compute, ip: 10.0.0.12, hardware: {model: pi5-16gb}}\n"
    text += "  - {hostname: low1, role: compute, ip: 10.0.0.13, hardware: {real_memory: 7000}}\n"
    c = load(tmp_path, text)
    # a board that reports less than its model: the cluster's model with its own RealMemory
    assert c.node("low1").hardware == inv.Hardware("pi5-8gb", 4, 7000, "rpi-poe-plus")
    assert c.base.startswith("https://") and c.base_sha256 == "ab" * 32
    assert c.timezone == "Europe/London" and c.network.interface == "end0"
    assert c.hardware == inv.Hardware("pi5-8gb", 4, 7600, "rpi-poe-plus")
    # the node's own model; the PoE HAT setting comes from the cluster's
    assert c.node("big1").hardware == inv.Hardware("pi5-16gb", 4, 15600, "rpi-poe-plus")
    assert c.secrets_dir == tmp_path / "private" / "keys"
    assert c.apt == inv.AptSettings(
        "http://deb.example.org/debian",
        "http://10.0.0.1:3142",
        security_mirror="http://deb.example.org/debian-security/",
    )
    assert c.apt.mirrors() == {
        "mirror": "http://deb.example.org/debian",
        "security_mirror": "http://deb.example.org/debian-security/",
    }
    assert c.shared.path == "/srv/shared" and c.shared.device_uuid.startswith("0b3c")
    assert c.cluster_user == inv.ClusterUser("mpi", 2000, "/srv/shared") and c.stages == (
        tmp_path / "extra",
    )
    assert c.admin.password_hash == SHA512 and SHA512 not in repr(c)


def test_cluster_context_is_plain_data_without_secrets(tmp_path):
    text = edit("    - " + KEY + "\n", f"    - {KEY}\n  password_hash: {YESCRYPT}\n")
    text = edit("role: head, ip: 10.0.0.10}", "role: head, ip: 10.0.0.10, runs_jobs: true}", text)
    ctx = render.cluster_context(load(tmp_path, text))
    assert set(ctx) == {
        "cluster",
        "network",
        "admin",
        "hardware",
        "nodes",
        "head",
        "compute_nodes",
        "apt",
        "shared",
        "cluster_user",
        "slurm",
    }
    # a head that runs jobs keeps memory back for its services; the default --mem fits every node
    spec = {n["hostname"]: n["mem_spec_mb"] for n in ctx["nodes"]}
    assert spec["head"] == render.HEAD_MEM_SPEC_MB and set(spec.values()) == {0, 512}
    assert ctx["slurm"]["def_mem_per_cpu"] == min(
        (n["memory_mb"] - n["mem_spec_mb"]) // n["cpus"] for n in ctx["compute_nodes"]
    )
    assert any(n["hostname"] == "head" for n in ctx["compute_nodes"])
    assert ctx["cluster"] == {"name": "lab", "timezone": "Etc/UTC", "accounting": "jobcomp"}
    assert ctx["network"] == {
        "subnet": "10.0.0.0/24",
        "prefixlen": 24,
        "netmask": "255.255.255.0",
        "gateway": "10.0.0.1",
        "dns": ["10.0.0.1", "1.1.1.1"],
        "interface": "eth0",
    }
    assert ctx["admin"] == {
        "name": "alice",
        "home": "/home/alice",
        "group": "alice",
        "ssh_authorized_keys": [KEY],
        "has_password": True,
    }
    assert ctx["nodes"][1] == {
        "hostname": "node01",
        "role": "compute",
        "ip": "10.0.0.11",
        "cidr": "10.0.0.11/24",
        "runs_jobs": True,
        "model": "pi4-2gb",
        "cpus": 4,
        "memory_mb": 1800,
        "mem_spec_mb": 0,
        "hardware": {"model": "pi4-2gb", "cpus": 4, "memory_mb": 1800, "poe_hat": None},
    }
    assert ctx["head"]["hostname"] == "head"
    compute = [n["hostname"] for n in ctx["compute_nodes"]]
    assert compute == ["head", "node01"]  # this head runs jobs too
    assert ctx["cluster_user"] == {
        "name": "mpiuser",
        "uid": 1500,
        "home": "/clusterfs/home/mpiuser",
    }
    dumped = json.dumps(ctx)  # plain types only
    assert YESCRYPT not in dumped


# --- all at once, located ------------------------------------------------------------------
def test_four_problems_four_messages_in_line_order(tmp_path):
    text = edit("name: lab", "name: Lab") + (
        "  - {hostname: node_03, role: compute, ip: 10.0.0.13}\n"
        "  - {hostname: node04, role: compute, ip: 10.0.1.14}\n"
    )
    text = edit("  gateway: 10.0.0.1\n", "  gateway: 10.0.0.1\n  interfce: eth0\n", text)
    assert problems(tmp_path, text) == [
        (
            "cluster.yaml:1: name: 'Lab' is not a valid cluster name (lower-case letters, digits and '-', "
            "not at either end; at most 63)"
        ),
        "cluster.yaml:5: network.interfce: unknown key 'interfce' (did you mean 'interface'?)",
        (
            "cluster.yaml:14: nodes[2].hostname: 'node_03' is not a valid hostname (letters, digits, '-'; "
            "not starting or ending with '-'; at most 63)"
        ),
        "cluster.yaml:15: nodes[3].ip: 10.0.1.14 is outside the cluster subnet 10.0.0.0/24",
    ]


def test_message_count_in_error(tmp_path):
    with pytest.raises(InventoryError, match="2 problems in the inventory"):
        load(tmp_path, GOOD.replace("role: compute", "role: hed").replace("node01", "-n"))


def test_block_style_nodes_are_located_by_key(tmp_path):
    text = GOOD + "  - hostname: node02\n    role: compute\n    ip: 10.0.0.300\n"
    assert problems(tmp_path, text) == [
        "cluster.yaml:15: nodes[2].ip: '10.0.0.300' is not an IPv4 address"
    ]


# fmt: off
SINGLE_PROBLEMS = [
    # unknown keys, at every level
    ("name: lab", "nmae: lab", "cluster.yaml:1: nmae: unknown key 'nmae' (did you mean 'name'?)"),
    ("  dns:", "  dnss:", "cluster.yaml:5: network.dnss: unknown key 'dnss' (did you mean 'dns'?)"),
    ("  ssh_authorized_keys:", "  ssh_authorised_keys:",
     "cluster.yaml:8: admin.ssh_authorised_keys: unknown key 'ssh_authorised_keys' (did you mean 'ssh_authorized_keys'?)"),
    ("{hostname: node01", "{hostnme: node01",
     "cluster.yaml:12: nodes[1].hostnme: unknown key 'hostnme' (did you mean 'hostname'?)"),
    ("{hostname: node01", "{hostnme: node01", "cluster.yaml:12: nodes[1]: missing 'hostname'"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11, hardware: {modle: pi4-4gb}}",
     "cluster.yaml:12: nodes[1].hardware.modle: unknown key 'modle' (did you mean 'model'?)"),
    ("name: lab", "name: lab\nhardware: {model: pi4-4gb, fan: on}",
     "cluster.yaml:2: hardware.fan: unknown key 'fan'"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11, hardware: {model: pi4-2gb, real_memory: 2048}}",
     "cluster.yaml:12: nodes[1].hardware.real_memory: 2048 must be from 256 to 1800 MiB: the "
     "pi4-2gb's RealMemory is at most that, and a node that reports less memory than "
     "slurm.conf says is drained"),
    ("name: lab", "name: lab\nshared: {path: //etc}",
     "cluster.yaml:2: shared.path: '//etc' must be a plain absolute path without spaces"),
    ("name: lab", "name: lab\nsecrets_dir: /tmp",
     "cluster.yaml:2: secrets_dir: /tmp is a system or shared directory; piimage makes the secrets directory 0700"),
    ("name: lab", "name: lab\nsecrets_dir: /etc",
     "cluster.yaml:2: secrets_dir: /etc is a system or shared directory"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11, hardware: {real_memory: lots}}",
     "cluster.yaml:12: nodes[1].hardware.real_memory: expected a whole number, got text"),
    ("name: lab", "name: lab\nzzz: 1", "cluster.yaml:2: zzz: unknown key 'zzz' (known: accounting, admin, apt,"),
    # wrong types
    ("name: lab", "name: [lab]", "cluster.yaml:1: name: expected text, got a list"),
    ("  dns: [10.0.0.1, 1.1.1.1]", "  dns: {a: 1}",
     "cluster.yaml:5: network.dns: expected a list of IPv4 addresses, got a mapping"),
    ("  dns: [10.0.0.1, 1.1.1.1]", "  dns: [10.0.0.1, [1]]",
     "cluster.yaml:5: network.dns[1]: expected an IPv4 address, got a list"),
    ("name: lab", "name: lab\ncluster_user: {uid: lots}",
     "cluster.yaml:2: cluster_user.uid: expected a whole number, got text"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11, runs_jobs: maybe}",
     "cluster.yaml:12: nodes[1].runs_jobs: expected true or false, got text"),
    ("name: lab", "name: lab\nshared: /data",
     "cluster.yaml:2: shared: expected a mapping (key: value), got text"),
    ("name: lab", "name: lab\nstages: 3",
     "cluster.yaml:2: stages: expected a list of directories, got a number"),
    ("  - {hostname: node01, role: compute, ip: 10.0.0.11}", "  - node01",
     "cluster.yaml:12: nodes[1]: expected a mapping with hostname, role and ip, got text"),
    ("  - {hostname: node01, role: compute, ip: 10.0.0.11}", "  -",
     "cluster.yaml:12: nodes[1]: expected a mapping with hostname, role and ip, got nothing"),
    # network
    ("  subnet: 10.0.0.0/24", "  subnet: 10.0.0.5/24",
     "cluster.yaml:3: network.subnet: '10.0.0.5/24' has host bits set (did you mean 10.0.0.0/24?)"),
    ("  subnet: 10.0.0.0/24", "  subnet: 10.0.0.0",
     "cluster.yaml:3: network.subnet: '10.0.0.0' needs a prefix length"),
    ("  subnet: 10.0.0.0/24", "  subnet: fd00::/64",
     "cluster.yaml:3: network.subnet: 'fd00::/64' is not an IPv4 network"),
    ("  subnet: 10.0.0.0/24", "  subnet: 10.0.0.0/31",
     "cluster.yaml:3: network.subnet: 10.0.0.0/31 is too small"),
    ("  gateway: 10.0.0.1", "  gateway: 10.9.0.1",
     "cluster.yaml:4: network.gateway: 10.9.0.1 is outside the cluster subnet 10.0.0.0/24"),
    ("  gateway: 10.0.0.1", "  gateway: 10.0.0.255",
     "cluster.yaml:4: network.gateway: 10.0.0.255 is the subnet's broadcast address"),
    ("  gateway: 10.0.0.1", "  gateway: router",
     "cluster.yaml:4: network.gateway: 'router' is not an IPv4 address"),
    ("1.1.1.1]", "1.1.1]", "cluster.yaml:5: network.dns[1]: '1.1.1' is not an IPv4 address"),
    ("  dns:", "  interface: 'eth 0'\n  dns:",
     "cluster.yaml:5: network.interface: 'eth 0' is not a network interface name"),
    # node addresses
    ("ip: 10.0.0.11}", "ip: 10.0.1.11}",
     "cluster.yaml:12: nodes[1].ip: 10.0.1.11 is outside the cluster subnet 10.0.0.0/24"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.0}",
     "cluster.yaml:12: nodes[1].ip: 10.0.0.0 is the subnet's network address"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.255}",
     "cluster.yaml:12: nodes[1].ip: 10.0.0.255 is the subnet's broadcast address"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.1}", "cluster.yaml:12: nodes[1].ip: 10.0.0.1 is the gateway's address"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.10}",
     "cluster.yaml:12: nodes[1].ip: address 10.0.0.10 is used twice (nodes[0])"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11/24}",
     "cluster.yaml:12: nodes[1].ip: '10.0.0.11/24': give the address without a prefix length"),
    ("ip: 10.0.0.11}", "ip: }", "cluster.yaml:12: nodes[1]: missing 'ip'"),
    # hostnames
    ("hostname: node01", "hostname: node-",
     "cluster.yaml:12: nodes[1].hostname: 'node-' is not a valid hostname"),
    ("hostname: node01", "hostname: -node",
     "cluster.yaml:12: nodes[1].hostname: '-node' is not a valid hostname"),
    ("hostname: node01", "hostname: n.lab",
     "cluster.yaml:12: nodes[1].hostname: 'n.lab' is not a valid hostname"),
    ("hostname: node01", "hostname: " + "n" * 64,
     "cluster.yaml:12: nodes[1].hostname: '" + "n" * 64 + "' is not a valid"),
    ("hostname: node01", "hostname: head",
     "cluster.yaml:12: nodes[1].hostname: hostname 'head' is used twice (nodes[0])"),
    ("hostname: node01", "hostname: HEAD",
     "cluster.yaml:12: nodes[1].hostname: hostname 'HEAD' is used twice (nodes[0] as 'head'; hostnames ignore case)"),
    ("hostname: node01", "hostname: localhost", "cluster.yaml:12: nodes[1].hostname: 'localhost' is taken"),
    # roles and the head
    ("role: compute", "role: comptue",
     "cluster.yaml:12: nodes[1].role: unknown role 'comptue' (did you mean 'compute'?); known roles: compute, head"),
    ("role: compute", "role: gpu",
     "cluster.yaml:12: nodes[1].role: unknown role 'gpu' (known: compute, head)"),
    ("role: head", "role: compute",
     "cluster.yaml:10: nodes: no node has role 'head': SLURM needs exactly one controller"),
    ("role: compute", "role: head",
     "cluster.yaml:12: nodes[1].role: a second head node (the first is nodes[0]); SLURM needs exactly one"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11, runs_jobs: false}",
     "cluster.yaml:12: nodes[1].runs_jobs: a compute node always runs jobs"),
    # time, hardware, users
    ("name: lab", "name: lab\ntimezone: Mars/Olympus Mons",
     "cluster.yaml:2: timezone: 'Mars/Olympus Mons' is not a time zone name in Area/City form"),
    ("name: lab", "name: lab\ntimezone: london",
     "cluster.yaml:2: timezone: 'london' is not a time zone name"),
    ("name: lab", "name: lab\nhardware: {model: pi4-2g}",
     "cluster.yaml:2: hardware.model: unknown hardware model 'pi4-2g' (did you mean 'pi4-2gb'?)"),
    ("ip: 10.0.0.11}", "ip: 10.0.0.11, hardware: {model: pi6}}",
     "cluster.yaml:12: nodes[1].hardware.model: unknown hardware model 'pi6'"),
    ("name: lab", "name: lab\nhardware: {poe_hat: yes-please}",
     "cluster.yaml:2: hardware.poe_hat: 'yes-please' is not a PoE HAT overlay (use rpi-poe or rpi-poe-plus, or null)"),
    ("  name: alice", "  name: root", "cluster.yaml:7: admin.name: 'root' is a system account of the image"),
    ("  name: alice", "  name: Alice", "cluster.yaml:7: admin.name: 'Alice' is not a valid user name"),
    ("name: lab", "name: lab\ncluster_user: {name: alice}",
     "cluster.yaml:2: cluster_user.name: 'alice' is also the admin user's name"),
    ("name: lab", "name: lab\ncluster_user: {name: slurm}",
     "cluster.yaml:2: cluster_user.name: 'slurm' is a system account"),
    ("name: lab", "name: lab\ncluster_user: {uid: 1000}",
     "cluster.yaml:2: cluster_user.uid: 1000 must be from 1001 to 59999"),
    ("name: lab", "name: lab\naccounting: mysql",
     "cluster.yaml:2: accounting: 'mysql' is not a kind of job history: jobcomp (a job "
     "completion log on the head, the default); slurmdbd (slurmdbd and MariaDB on the head, "
     "for sacct and sreport)"),
    # names, storage, stages, URLs, base
    ("name: lab", "name: -lab", "cluster.yaml:1: name: '-lab' is not a valid cluster name"),
    ("name: lab", "name: lab\nshared: {path: clusterfs}",
     "cluster.yaml:2: shared.path: 'clusterfs' must be a plain absolute path"),
    ("name: lab", "name: lab\nshared: {path: /home}",
     "cluster.yaml:2: shared.path: '/home' is a system directory"),
    ("name: lab", "name: lab\nshared: {device_uuid: sdb1}",
     "cluster.yaml:2: shared.device_uuid: 'sdb1' is not a filesystem UUID"),
    ("name: lab", "name: lab\nstages: [nowhere]",
     "cluster.yaml:2: stages[0]: stages directory {tmp}/nowhere does not exist"),
    ("name: lab", "name: lab\napt: {proxy: 'ftp://x'}",
     "cluster.yaml:2: apt.proxy: 'ftp://x' is not an http(s) URL"),
    ("name: lab", "name: lab\napt: {mirror: 'http:///debian'}",
     "cluster.yaml:2: apt.mirror: 'http:///debian' is not an http(s) URL"),
    ("name: lab", "name: lab\nbase: raspios-lite",
     "cluster.yaml:2: base: unknown base image 'raspios-lite' (did you mean 'raspios-lite-arm64'?); or give an http(s) URL"),
    ("name: lab", "name: lab\nbase: https://example.org/raspios.zip",
     "cluster.yaml:2: base: 'https://example.org/raspios.zip' must end with .img.xz or .img"),
    ("name: lab", "name: lab\nbase: images/pi.img.xz",
     "cluster.yaml:2: base: local image {tmp}/images/pi.img.xz does not exist"),
    ("name: lab", "name: lab\nbase_sha256: 1234",
     "cluster.yaml:2: base_sha256: expected the image's SHA-256: 64 hexadecimal digits"),
    # YAML-level
    ("name: lab", "name: lab\nname: lab2", "cluster.yaml:2: name: given twice (also at line 1)"),
    ("ip: 10.0.0.11}", "ip: !!python/object/apply:os.system [echo]}",
     "cluster.yaml:12: nodes[1].ip: unsupported YAML tag"),
    ("ip: 10.0.0.11}", "ip: !!python/name:os.system x}",
     "cluster.yaml:12: nodes[1].ip: cannot read this value: could not determine a constructor"),
]
# fmt: on


@pytest.mark.parametrize("old, new, expected", SINGLE_PROBLEMS)
def test_single_problem(tmp_path, old, new, expected):
    p = problems(tmp_path, edit(old, new))
    expected = expected.replace("{tmp}", str(tmp_path))
    assert any(s.startswith(expected) for s in p), "\n".join(p)


# --- YAML ----------------------------------------------------------------------------------
# fmt: off
MALFORMED = [
    ("name: x\nnodes: [\n  - {a: 1\n",
     "cluster.yaml:3:3: malformed YAML: while parsing a flow node: expected the node content, but found '-'"),
    ("name: x\n\tnodes: 1\n",
     "cluster.yaml:2:1: malformed YAML: while scanning for the next token: found character '\\t' that cannot start any token"),
    ("name: [1, 2\nnodes: 3\n",
     "cluster.yaml:2:6: malformed YAML: while parsing a flow sequence that starts at line 1: expected ',' or ']', but got ':'"),
    ("a: 1\n---\nb: 2\n",
     "cluster.yaml:2:1: malformed YAML: expected a single document in the stream, but found another document"),
]
# fmt: on


@pytest.mark.parametrize("text, expected", MALFORMED)
def test_malformed_yaml_is_one_located_problem(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_empty_node_list(tmp_path):
    text = GOOD.split("nodes:")[0] + "nodes: []\n"
    assert problems(tmp_path, text) == [
        "cluster.yaml:10: nodes: expected a non-empty list of nodes, got an empty list"
    ]


def test_top_level_must_be_a_mapping(tmp_path):
    assert problems(tmp_path, "- a\n- b\n") == [
        "cluster.yaml:1: expected a mapping of settings at the top level (name:, network:, nodes: …), got a list"
    ]


def test_empty_file_wants_nodes(tmp_path):
    assert problems(tmp_path, "# nothing yet\n") == [
        "cluster.yaml: nodes: no nodes given; list the cluster's nodes, each with hostname, role and ip"
    ]


def test_nul_character_is_refused(tmp_path):
    p = problems(tmp_path, edit("  dns:", '  interface: "eth\\0"\n  dns:'))
    assert p == ["cluster.yaml:5: network.interface: contains a NUL character"]


def test_plain_scalars_keep_their_text(tmp_path):
    # YAML 1.1 would read `no` as false and 0012 as 12: hostnames are text
    text = (
        GOOD
        + "  - {hostname: no, role: compute, ip: 10.0.0.12}\n  - {hostname: 0012, role: compute, ip: 10.0.0.13}\n"
    )
    assert [n.hostname for n in load(tmp_path, text).nodes][2:] == ["no", "0012"]


def test_merge_keys_and_anchors(tmp_path):
    text = GOOD + (
        "  - &big {hostname: node02, role: compute, ip: 10.0.0.12, hardware: {model: pi5-8gb}}\n"
        "  - {<<: *big, hostname: node03, ip: 10.0.0.13}\n"
    )
    c = load(tmp_path, text)
    assert c.node("node03").role == "compute" and c.node("node03").hardware.model == "pi5-8gb"


def test_mixed_case_and_63_char_hostnames_are_fine(tmp_path):
    text = (
        GOOD
        + f"  - {{hostname: Node02, role: compute, ip: 10.0.0.12}}\n  - {{hostname: {'a' * 63}, role: compute, ip: 10.0.0.13}}\n"
    )
    assert len(load(tmp_path, text).nodes) == 4


# --- roles ---------------------------------------------------------------------------------
def test_roles_of_your_own(tmp_path):
    c = load(
        tmp_path,
        GOOD + "  - {hostname: gpu1, role: gpu, ip: 10.0.0.20, runs_jobs: true}\n",
        roles={**builtin_roles(), "gpu": Profile("gpu", Path("gpu.yaml"), "", (), (), (), 0)},
    )
    assert c.node("gpu1").role == "gpu" and c.node("gpu1").runs_jobs
    assert not c.head.runs_jobs and [n.hostname for n in c.job_nodes] == ["node01", "gpu1"]


def test_several_heads_each_reported(tmp_path):
    text = (
        GOOD
        + "  - {hostname: head2, role: head, ip: 10.0.0.20}\n  - {hostname: head3, role: head, ip: 10.0.0.21}\n"
    )
    p = problems(tmp_path, text)
    assert [s.split(": ")[0] for s in p] == ["cluster.yaml:13", "cluster.yaml:14"]


# --- secrets never echoed --------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, plain", [("hunter2", True), ("$6$salt$short", False), ("$1$a$b", False)]
)
def test_password_hash_problems_never_echo_the_value(tmp_path, value, plain):
    p = problems(tmp_path, edit("  name: alice", f"  name: alice\n  password_hash: '{value}'"))
    assert len(p) == 1 and p[0].startswith(
        "cluster.yaml:8: admin.password_hash: not a sha512-crypt ($6$…) "
        "or yescrypt ($y$…) hash (value not shown)"
    )
    assert ("looks like a plain password" in p[0]) == plain and "mkpasswd -m sha-512" in p[0]
    assert value not in p[0]


@pytest.mark.parametrize("good_hash", [SHA512, YESCRYPT])
def test_password_hashes_accepted(tmp_path, good_hash):
    c = load(tmp_path, edit("  name: alice", f"  name: alice\n  password_hash: {good_hash}"))
    assert c.admin.password_hash == good_hash and good_hash not in repr(c.admin)


def test_private_key_file_refused_not_printed(tmp_path):
    (tmp_path / "id_ed25519").write_text(PRIVATE)
    p = problems(tmp_path, edit(KEY, "id_ed25519"))
    assert p == [
        (
            f"cluster.yaml:9: admin.ssh_authorized_keys[0]: {tmp_path}/id_ed25519 is a private key; "
            f"refusing it (give the public key, {tmp_path}/id_ed25519.pub)"
        )
    ]


def test_private_key_pasted_inline_refused_not_printed(tmp_path):
    text = edit(
        f"    - {KEY}\n", "    - |\n" + "".join(f"      {ln}\n" for ln in PRIVATE.splitlines())
    )
    p = problems(tmp_path, text)
    assert p == [
        (
            "cluster.yaml:9: admin.ssh_authorized_keys[0]: this is a private key; give the public key "
            "(the .pub file or its text) instead"
        )
    ]


# --- SSH key entries -------------------------------------------------------------------------
# fmt: off
BAD_KEYS = [
    ("ssh-ed25519 notbase64!!",
     "does not look like an OpenSSH public key (the key data is not valid base64)"),
    ("ssh-ed25519", "does not look like an OpenSSH public key (no key data after 'ssh-ed25519')"),
    (f"ssh-rsa {BLOB} x",
     "does not look like an OpenSSH public key (the key data is not that of a ssh-rsa key"),
    (f"ssh-ed25519 {base64.b64encode(base64.b64decode(BLOB)[:10]).decode()}",
     "does not look like an OpenSSH public key (the key data is not that of a ssh-ed25519"),
    ("ssh-dss AAAAB3NzaC1kc3MAAACBAP8 x",
     "does not look like an OpenSSH public key (a DSA key, which current OpenSSH refuses"),
    # the whole type name, but the key itself cut short: it would lock the admin out
    (f"ssh-ed25519 {base64.b64encode(base64.b64decode(KEY.split()[1])[:-6]).decode()} me@laptop",
     "does not look like an OpenSSH public key (the ssh-ed25519 key data is cut short or damaged"),
    (f"ssh-ed25519 {base64.b64encode(base64.b64decode(KEY.split()[1]) + b'xx').decode()}",
     "does not look like an OpenSSH public key (the ssh-ed25519 key data is cut short or damaged"),
    ("/no/such/key.pub", "key file /no/such/key.pub does not exist"),
    ("keys", "{tmp}/keys is a directory, not a public key file"),
    ("binary.pub", "{tmp}/binary.pub is not a text file"),
    ("empty.pub", "{tmp}/empty.pub holds no public key"),
    ("putty.pub",
     "{tmp}/putty.pub is in RFC 4716 (PuTTY/SSH2) form; convert it: ssh-keygen -i -f {tmp}/putty.pub"),
    ("junk.pub",
     "{tmp}/junk.pub: line 2 does not look like an OpenSSH public key (expected 'ssh-ed25519 AAAA… comment'"),
]
# fmt: on


@pytest.mark.parametrize("entry, expected", BAD_KEYS)
def test_bad_key_entries(tmp_path, entry, expected):
    (tmp_path / "keys").mkdir()
    (tmp_path / "binary.pub").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "empty.pub").write_text("# nothing\n\n")
    (tmp_path / "putty.pub").write_text(
        "---- BEGIN SSH2 PUBLIC KEY ----\nAAAA\n---- END SSH2 PUBLIC KEY ----\n"
    )
    (tmp_path / "junk.pub").write_text(f"{KEY}\nhello world\n")
    p = problems(tmp_path, edit(KEY, entry))
    expected = expected.replace("{tmp}", str(tmp_path))
    assert len(p) == 1 and p[0].startswith(
        f"cluster.yaml:9: admin.ssh_authorized_keys[0]: {expected}"
    ), p


def test_a_path_that_starts_like_a_key_type_is_a_path(tmp_path):
    (tmp_path / "ssh-keys").mkdir()
    (tmp_path / "ssh-keys" / "admin.pub").write_text(KEY + "\n")
    assert load(tmp_path, edit(KEY, "ssh-keys/admin.pub")).admin.ssh_authorized_keys == (KEY,)


def test_unreadable_key_file(tmp_path, monkeypatch):
    (tmp_path / "me.pub").write_text(KEY)
    real = Path.read_bytes

    def denied(self):
        if self.name == "me.pub":
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)  # tests may run as root, who reads anything
    assert problems(tmp_path, edit(KEY, "me.pub")) == [
        f"cluster.yaml:9: admin.ssh_authorized_keys[0]: key file {tmp_path}/me.pub cannot be read (Permission denied)"
    ]


def test_key_files_relative_to_the_inventory_not_cwd(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    (conf / "keys").mkdir(parents=True)
    (conf / "keys" / "team.pub").write_text(f"# the team\n{KEY}\n\n{KEY2}\n")
    (conf / F).write_text(edit(KEY, "keys/team.pub"))
    monkeypatch.chdir(tmp_path)
    c = inv.load(Path("conf/cluster.yaml"))
    assert c.admin.ssh_authorized_keys == (KEY, KEY2) and c.base_dir == conf


def test_key_text_file_and_options_mixed_and_deduplicated(tmp_path, home):
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    opts = f'from="10.0.0.0/24",no-pty,command="echo hi there" {KEY2}'
    text = edit(f"    - {KEY}\n", f"    - ~/.ssh/id_ed25519.pub\n    - {KEY}\n    - '{opts}'\n")
    assert load(tmp_path, text).admin.ssh_authorized_keys == (KEY, opts)


def test_tilde_is_the_sudo_callers_home(tmp_path, monkeypatch):
    caller = tmp_path / "caller"
    (caller / ".ssh").mkdir(parents=True)
    (caller / ".ssh" / "id_ed25519.pub").write_text(KEY2 + "\n")
    monkeypatch.setenv("SUDO_USER", "caller")
    monkeypatch.setattr(inv.pwd, "getpwnam", lambda name: SimpleNamespace(pw_dir=str(caller)))
    c = load(tmp_path, edit(KEY, "~/.ssh/id_ed25519.pub"))
    assert c.admin.ssh_authorized_keys == (KEY2,)


def test_no_keys_is_a_warning_not_an_error(tmp_path, logged):
    c = load(tmp_path, edit(f"  ssh_authorized_keys:\n    - {KEY}\n", ""))
    assert c.admin.ssh_authorized_keys == ()
    assert (
        "stays possible only with a password, and only if admin.password_hash is set" in logged.text
    )


# --- time zones ------------------------------------------------------------------------------
def test_timezone_checked_against_the_zone_database(tmp_path, monkeypatch):
    zi = tmp_path / "zoneinfo"
    (zi / "Europe").mkdir(parents=True)
    (zi / "Europe" / "London").write_text("")
    monkeypatch.setattr(inv.rules, "ZONEINFO", zi)  # the rule that reads it
    assert (
        load(tmp_path, edit("name: lab", "name: lab\ntimezone: Europe/London")).timezone
        == "Europe/London"
    )
    assert problems(tmp_path, edit("name: lab", "name: lab\ntimezone: Europe/Londn")) == [
        f"cluster.yaml:2: timezone: unknown time zone 'Europe/Londn' (did you mean 'Europe/London'?); see {zi}"
    ]
    monkeypatch.setattr(
        inv.rules, "ZONEINFO", tmp_path / "none"
    )  # no tz database here: the form only
    assert (
        load(tmp_path, edit("name: lab", "name: lab\ntimezone: Europe/Londn")).timezone
        == "Europe/Londn"
    )


# --- loading -----------------------------------------------------------------------------------
def test_missing_inventory_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"^lab\.yaml: inventory file not found$") as ei:
        inv.load(Path("lab.yaml"), cwd=tmp_path)
    assert "piimage init" in ei.value.hint and not isinstance(ei.value, InventoryError)


def test_inventory_that_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        inv.load(tmp_path)


def test_no_path_takes_cluster_yaml_from_cwd(tmp_path):
    (tmp_path / F).write_text(edit("name: lab", "name: here"))
    assert inv.load(None, cwd=tmp_path).name == "here"
    (tmp_path / F).write_text(edit("role: compute", "role: gpu"))
    with pytest.raises(InventoryError) as ei:
        inv.load(None)
    assert ei.value.problems[0].startswith(
        "cluster.yaml:12: nodes[1].role"
    )  # shown relative to cwd


# --- the built-in default cluster ---------------------------------------------------------------
def test_default_cluster(tmp_path, home):
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    (home / ".ssh" / "id_rsa").write_text(PRIVATE)  # a private key beside it is never read
    c = inv.load(None, cwd=tmp_path)
    assert c.source is None and c.name == "picluster" and c.base == "raspios-lite-arm64"
    assert [(n.hostname, n.role, str(n.ip)) for n in c.nodes] == [
        ("head", "head", "10.42.0.10"),
        ("node01", "compute", "10.42.0.11"),
        ("node02", "compute", "10.42.0.12"),
        ("node03", "compute", "10.42.0.13"),
        ("node04", "compute", "10.42.0.14"),
    ]
    assert str(c.network.subnet) == "10.42.0.0/24" and str(c.network.gateway) == "10.42.0.1"
    assert [str(d) for d in c.network.dns] == ["10.42.0.1"]
    assert c.admin.name == "admin" and c.admin.ssh_authorized_keys == (KEY,)
    assert c.timezone == "Etc/UTC" and c.hardware.model == "pi4-2gb"
    assert c.secrets_dir == tmp_path / ".piimage" / "secrets" and c.base_dir == tmp_path
    assert not (tmp_path / ".piimage").exists()  # loading writes nothing


def test_default_cluster_takes_the_sudo_callers_keys(tmp_path, monkeypatch):
    caller = tmp_path / "caller"
    (caller / ".ssh").mkdir(parents=True)
    (caller / ".ssh" / "id_ecdsa.pub").write_text(KEY2 + "\n")
    monkeypatch.setenv("SUDO_USER", "caller")
    monkeypatch.setattr(inv.pwd, "getpwnam", lambda name: SimpleNamespace(pw_dir=str(caller)))
    assert inv.load(None, cwd=tmp_path).admin.ssh_authorized_keys == (KEY2,)


def test_default_cluster_without_keys_loads_with_a_warning(tmp_path, logged):
    c = inv.load(None, cwd=tmp_path)
    assert c.admin.ssh_authorized_keys == () and len(c.nodes) == 5
    assert "SSH password login stays possible only with admin.password_hash" in logged.text
    assert "piimage init" in logged.text


def test_default_cluster_skips_a_broken_key_file(tmp_path, home, logged):
    (home / ".ssh" / "id_ed25519.pub").write_text("not a key\n")
    (home / ".ssh" / "id_rsa.pub").write_text(KEY2 + "\n")
    assert inv.load(None, cwd=tmp_path).admin.ssh_authorized_keys == (KEY2,)
    assert f"not using {home}/.ssh/id_ed25519.pub: line 1" in logged.text


def test_default_yaml_loads_cleanly_and_documents_every_key(tmp_path):
    text = inv.default_yaml()
    assert set(yaml.safe_load(text)) == inv.TOP_KEYS
    c = load(tmp_path, text)
    assert c.source == tmp_path / F and len(c.nodes) == 5
    odd = f"{KEY2.rsplit(' ', 1)[0]} me #2: laptop"  # '#' and ': ' need quoting in YAML
    assert load(tmp_path, inv.default_yaml([KEY, odd])).admin.ssh_authorized_keys == (KEY, odd)


def test_defaults_of_absent_keys_match_the_default_yaml(tmp_path):
    nodes_only = "nodes:\n" + inv.default_yaml().split("\nnodes:\n", 1)[1]
    a = load(tmp_path, nodes_only)
    b = load(tmp_path, inv.default_yaml())
    assert a == b


# --- select_nodes ------------------------------------------------------------------------------
@pytest.fixture
def lab(tmp_path):
    return load(tmp_path, GOOD + "  - {hostname: node02, role: compute, ip: 10.0.0.12}\n")


def test_select_one_node(lab):
    assert [
        n.hostname for n in inv.select_nodes(lab, hostname="node02", role=None, all_nodes=False)
    ] == ["node02"]
    assert (
        inv.select_nodes(lab, hostname="Node02", role="compute", all_nodes=False)[0].hostname
        == "node02"
    )


def test_select_all_and_all_of_a_role(lab):
    assert inv.select_nodes(lab, hostname=None, role=None, all_nodes=True) == lab.nodes
    assert [
        n.hostname for n in inv.select_nodes(lab, hostname=None, role="compute", all_nodes=True)
    ] == ["node01", "node02"]


def test_select_role_contradicting_the_inventory(lab):
    with pytest.raises(
        UserError, match=r"^--role head: node02 is a compute node in cluster\.yaml, not head$"
    ):
        inv.select_nodes(lab, hostname="node02", role="head", all_nodes=False)


def test_select_unknown_hostname_lists_the_known_ones(lab):
    with pytest.raises(
        UserError,
        match=r"^--hostname node2: no such node in cluster\.yaml \(did you mean 'node02'\?\)$",
    ) as ei:
        inv.select_nodes(lab, hostname="node2", role=None, all_nodes=False)
    assert ei.value.hint == "nodes in cluster.yaml: head, node01, node02"


def test_select_needs_hostname_or_all(lab):
    with pytest.raises(UserError, match=r"^which node\? give --hostname NAME, or --all$"):
        inv.select_nodes(lab, hostname=None, role=None, all_nodes=False)
    with pytest.raises(UserError, match=r"or --all --role compute$"):  # --role alone is not enough
        inv.select_nodes(lab, hostname=None, role="compute", all_nodes=False)


def test_select_hostname_and_all_conflict(lab):
    with pytest.raises(UserError, match="either --hostname or --all, not both"):
        inv.select_nodes(lab, hostname="node01", role=None, all_nodes=True)


def test_select_all_of_a_role_nobody_has(lab):
    with pytest.raises(UserError, match=r"^--role gpu: no gpu node in cluster\.yaml$") as ei:
        inv.select_nodes(lab, hostname=None, role="gpu", all_nodes=True)
    assert ei.value.hint == "roles there: compute, head"


def test_select_in_the_default_cluster_names_it(tmp_path):
    c = inv.load(None, cwd=tmp_path)
    with pytest.raises(
        UserError, match="node02 is a compute node in the built-in default cluster, not head"
    ):
        inv.select_nodes(c, hostname="node02", role="head", all_nodes=False)


# --- init ----------------------------------------------------------------------------------------
def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_init_writes_inventory_and_private_secrets_dir(tmp_path, home):
    (home / ".ssh" / "id_ed25519.pub").write_text(KEY + "\n")
    d = tmp_path / "mycluster"
    written = inv.init(d)
    assert written == [d / F, d / ".piimage" / "secrets"]
    assert mode(d / F) == 0o644 and mode(d / ".piimage" / "secrets") == 0o700
    assert "    - ~/.ssh/id_ed25519.pub\n" in (d / F).read_text()
    c = inv.load(d / F)
    assert c.admin.ssh_authorized_keys == (KEY,) and c.secrets_dir == d / ".piimage" / "secrets"


def test_init_refuses_to_overwrite_unless_forced(tmp_path):
    inv.init(tmp_path)
    (tmp_path / F).write_text("# mine\n")
    (tmp_path / ".piimage" / "secrets" / "munge.key").write_bytes(b"k" * 32)
    with pytest.raises(UserError, match="cluster.yaml already exists; not overwriting it") as ei:
        inv.init(tmp_path)
    assert "--force" in ei.value.hint and (tmp_path / F).read_text() == "# mine\n"
    assert inv.init(tmp_path, force=True) == [tmp_path / F]  # the secrets dir was already there
    assert (tmp_path / F).read_text() == inv.default_yaml()
    assert (tmp_path / ".piimage" / "secrets" / "munge.key").read_bytes() == b"k" * 32


# --- secrets.py ------------------------------------------------------------------------------------
def test_ensure_secrets_dir_creates_and_tightens(tmp_path, logged):
    d = secrets.ensure_secrets_dir(tmp_path / "a" / "b")
    assert d.is_dir() and mode(d) == 0o700 and not logged.text
    os.chmod(d, 0o755)
    secrets.ensure_secrets_dir(d)
    assert mode(d) == 0o700 and "was open to others (mode 0755)" in logged.text
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="exists and is not a directory"):
        secrets.ensure_secrets_dir(tmp_path / "file")
