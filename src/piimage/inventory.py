"""The inventory: cluster.yaml → a validated, frozen model.

Every problem is collected and reported at once, each with its file, line and key path
(`cluster.yaml:14: nodes[2].ip: …`), before anything is downloaded or written. With no
cluster.yaml, an embedded example cluster is used so `piimage build` works out of the box.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import pwd
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Collection

import yaml

from .errors import InventoryError, UserError
from .suggest import unknown

log = logging.getLogger("piimage")

DEFAULT_FILE = "cluster.yaml"

# Hardware models: CPUs and the RealMemory SLURM is told (MB), kept below what slurmd
# detects on the board (the firmware and kernel take their share), or the node drains.
HARDWARE_MODELS: dict[str, tuple[int, int]] = {
    "pi3-1gb": (4, 800),
    "pi4-1gb": (4, 800),
    "pi4-2gb": (4, 1800),
    "pi4-4gb": (4, 3700),
    "pi4-8gb": (4, 7600),
    "pi5-2gb": (4, 1800),
    "pi5-4gb": (4, 3700),
    "pi5-8gb": (4, 7600),
    "pi5-16gb": (4, 15600),
}
POE_HATS = ("rpi-poe", "rpi-poe-plus")

HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
CLUSTER_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
TIMEZONE_RE = re.compile(r"^(?:UTC|Etc/[A-Za-z0-9+-]+|[A-Z][A-Za-z_-]+(?:/[A-Za-z0-9_+-]+){1,2})$")
IFACE_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")
PUBKEY_RE = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)\s+[A-Za-z0-9+/=]{16,}(\s+.*)?$")
HASH_RE = re.compile(r"^\$(6|5|y|gy|2[aby]|7)\$[./A-Za-z0-9$=,]{8,}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UUID_RE = re.compile(r"^(?:[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}|[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}|[0-9A-Fa-f]{16})$")

TOP_KEYS = {"name", "base", "base_sha256", "network", "admin", "timezone", "hardware", "secrets_dir", "apt", "shared",
            "cluster_user", "stages", "nodes"}
NETWORK_KEYS = {"subnet", "gateway", "dns", "interface"}
ADMIN_KEYS = {"name", "ssh_authorized_keys", "password_hash"}
HARDWARE_KEYS = {"model", "poe_hat"}
NODE_HARDWARE_KEYS = {"model"}
APT_KEYS = {"mirror", "proxy"}
SHARED_KEYS = {"path", "device_uuid"}
CLUSTER_USER_KEYS = {"name", "uid"}
NODE_KEYS = {"hostname", "role", "ip", "hardware"}


@dataclass(frozen=True)
class Network:
    subnet: IPv4Network
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    interface: str = "eth0"

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


@dataclass(frozen=True)
class AdminUser:
    name: str
    ssh_authorized_keys: tuple[str, ...]
    password_hash: str | None = field(default=None, repr=False)

    @property
    def home(self) -> str:
        return f"/home/{self.name}"


@dataclass(frozen=True)
class Hardware:
    model: str
    cpus: int
    memory_mb: int
    poe_hat: str | None = None


@dataclass(frozen=True)
class Node:
    hostname: str
    role: str
    ip: IPv4Address
    hardware: Hardware | None = None


@dataclass(frozen=True)
class AptSettings:
    mirror: str | None = None
    proxy: str | None = None


@dataclass(frozen=True)
class SharedStorage:
    path: str = "/clusterfs"
    device_uuid: str | None = None


@dataclass(frozen=True)
class ClusterUser:
    name: str = "mpiuser"
    uid: int = 1500


@dataclass(frozen=True)
class Cluster:
    name: str
    base: str
    base_sha256: str | None
    network: Network
    admin: AdminUser
    timezone: str
    hardware: Hardware
    nodes: tuple[Node, ...]
    secrets_dir: Path
    base_dir: Path
    source: Path | None = None
    apt: AptSettings = AptSettings()
    shared: SharedStorage = SharedStorage()
    cluster_user: ClusterUser = ClusterUser()
    stages: tuple[Path, ...] = ()

    def node(self, hostname: str) -> Node:
        for n in self.nodes:
            if n.hostname.lower() == hostname.lower():
                return n
        raise KeyError(hostname)

    def nodes_with_role(self, role: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == role)

    @property
    def head(self) -> Node | None:
        return next((n for n in self.nodes if n.role == "head"), None)

    def hardware_of(self, node: Node) -> Hardware:
        return node.hardware or self.hardware


# ---------------------------------------------------------------------------------------------
# YAML with locations
# ---------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also keeps the line of every mapping value and sequence item."""


def _compose_with_lines(text: str, where: str) -> tuple[Any, dict[tuple, int]]:
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise InventoryError([f"{where}{line}: malformed YAML: {e.problem or e}"]) from None
    except yaml.YAMLError as e:
        raise InventoryError([f"{where}: malformed YAML: {e}"]) from None
    lines: dict[tuple, int] = {}
    scalar = yaml.SafeLoader("")  # builds plain values from scalar nodes (safe tags only)

    def walk(n, path: tuple) -> Any:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            out = {}
            for k, v in n.value:
                key = scalar.construct_object(k) if isinstance(k, yaml.ScalarNode) else str(k.value)
                lines[path + (key,)] = k.start_mark.line + 1
                out[key] = walk(v, path + (key,))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [walk(v, path + (i,)) for i, v in enumerate(n.value)]
        return scalar.construct_object(n)

    if node is None:
        return None, lines
    try:
        return walk(node, ()), lines
    except yaml.YAMLError as e:
        raise InventoryError([f"{where}: malformed YAML: {e}"]) from None


def _fmt_path(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


class _Problems:
    def __init__(self, where: str, lines: dict[tuple, int]):
        self.where = where
        self.lines = lines
        self.items: list[str] = []

    def add(self, path: tuple, msg: str) -> None:
        line = None
        p = path
        while p and line is None:
            line = self.lines.get(p)
            p = p[:-1]
        loc = f"{self.where}:{line}" if line else self.where
        key = _fmt_path(path)
        self.items.append(f"{loc}: {key}: {msg}" if key else f"{loc}: {msg}")


def _unknown_keys(doc: dict, allowed: set[str], path: tuple, pr: _Problems) -> None:
    for k in doc:
        if k not in allowed:
            pr.add(path + (k,), unknown("key", k, allowed))


def _mapping(doc: dict, key: str, allowed: set[str], path: tuple, pr: _Problems) -> dict:
    v = doc.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        pr.add(path + (key,), f"expected a mapping, got {type(v).__name__}")
        return {}
    _unknown_keys(v, allowed, path + (key,), pr)
    return v


def _str(d: dict, key: str, path: tuple, pr: _Problems, default: str | None = None) -> str | None:
    v = d.get(key, default)
    if v is None:
        return None
    if not isinstance(v, (str, int, float)) or isinstance(v, bool):
        pr.add(path + (key,), f"expected a text value, got {type(v).__name__}")
        return default
    return str(v)


def _ip(value: Any, path: tuple, pr: _Problems) -> IPv4Address | None:
    try:
        return IPv4Address(str(value))
    except (ipaddress.AddressValueError, ValueError):
        pr.add(path, f"'{value}' is not an IPv4 address")
        return None


def _url(value: Any, path: tuple, pr: _Problems) -> str | None:
    if value is None:
        return None
    s = str(value)
    if not re.match(r"^https?://[^\s/]+(/\S*)?$", s):
        pr.add(path, f"'{s}' is not an http(s) URL")
        return None
    return s


# ---------------------------------------------------------------------------------------------
# SSH keys
# ---------------------------------------------------------------------------------------------
def _key_texts(entries: Any, base_dir: Path, home: Path, path: tuple, pr: _Problems) -> tuple[str, ...]:
    if entries is None:
        return ()
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        pr.add(path, "expected a list of public keys or .pub file paths")
        return ()
    keys: list[str] = []
    for i, e in enumerate(entries):
        p = path + (i,)
        if not isinstance(e, str) or not e.strip():
            pr.add(p, "expected a public key or a path to a .pub file")
            continue
        e = e.strip()
        if PUBKEY_RE.match(e):
            keys.append(e)
            continue
        if "PRIVATE KEY" in e:
            pr.add(p, "this is a private key; give the public key (.pub) instead")
            continue
        if re.match(r"^(ssh-|ecdsa-|sk-)", e):
            pr.add(p, "does not look like an OpenSSH public key (type, base64 data, optional comment)")
            continue
        f = Path(os.path.expanduser(e.replace("~", str(home), 1) if e.startswith("~") else e))
        if not f.is_absolute():
            f = base_dir / f
        if not f.exists():
            pr.add(p, f"key file {f} does not exist")
            continue
        try:
            text = f.read_text()
        except (OSError, UnicodeDecodeError) as err:
            pr.add(p, f"key file {f} cannot be read: {getattr(err, 'strerror', None) or err}")
            continue
        if "PRIVATE KEY" in text:
            pr.add(p, f"{f} is a private key; give the public key ({f}.pub) instead")
            continue
        found = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        bad = [ln for ln in found if not PUBKEY_RE.match(ln)]
        if not found or bad:
            pr.add(p, f"{f} does not hold OpenSSH public keys")
            continue
        keys.extend(found)
    return tuple(dict.fromkeys(keys))


def invoking_home() -> Path:
    """The home of the user who ran the command (through sudo: the one who typed sudo)."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != "root":
        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path(os.environ.get("HOME") or Path.home())


def default_public_keys() -> list[str]:
    ssh = invoking_home() / ".ssh"
    return [str(p) for p in sorted(ssh.glob("id_*.pub"))] if ssh.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _hardware(d: dict, path: tuple, pr: _Problems, inherit_poe: str | None = None) -> Hardware | None:
    model = _str(d, "model", path, pr, "pi4-2gb")
    if model not in HARDWARE_MODELS:
        pr.add(path + ("model",), unknown("hardware model", model, HARDWARE_MODELS))
        return None
    poe = d.get("poe_hat", inherit_poe)
    if poe is not None and poe not in POE_HATS:
        pr.add(path + ("poe_hat",), f"'{poe}' is not a PoE HAT overlay (use {' or '.join(POE_HATS)}, or null)")
        poe = None
    cpus, mem = HARDWARE_MODELS[model]
    return Hardware(model, cpus, mem, poe)


def validate(doc: Any, *, where: str, lines: dict[tuple, int], base_dir: Path, known_roles: Collection[str],
             home: Path | None = None, source: Path | None = None) -> Cluster:
    pr = _Problems(where, lines)
    home = home or invoking_home()
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InventoryError([f"{where}: expected a mapping of settings at the top level (name:, network:, nodes: …)"])
    _unknown_keys(doc, TOP_KEYS, (), pr)

    name = _str(doc, "name", (), pr, "picluster") or "picluster"
    if not CLUSTER_NAME_RE.match(name):
        pr.add(("name",), f"'{name}' is not a valid cluster name (lower-case letters, digits, '-')")

    base = _str(doc, "base", (), pr, "raspios-lite-arm64") or "raspios-lite-arm64"
    base_sha = _str(doc, "base_sha256", (), pr)
    if base_sha is not None:
        base_sha = base_sha.lower()
        if not SHA256_RE.match(base_sha):
            pr.add(("base_sha256",), "expected 64 hexadecimal digits")

    # network
    net = _mapping(doc, "network", NETWORK_KEYS, (), pr)
    subnet = None
    try:
        subnet = IPv4Network(str(net.get("subnet", "10.42.0.0/24")), strict=True)
    except ValueError as e:
        pr.add(("network", "subnet"), f"'{net.get('subnet')}' is not an IPv4 network like 10.0.0.0/24 ({e})")
    gateway = _ip(net.get("gateway", str(next(subnet.hosts())) if subnet else "10.42.0.1"), ("network", "gateway"), pr)
    if subnet and gateway and gateway not in subnet:
        pr.add(("network", "gateway"), f"{gateway} is outside the cluster subnet {subnet}")
    dns_raw = net.get("dns", [str(gateway)] if gateway else [])
    if isinstance(dns_raw, str):
        dns_raw = [dns_raw]
    dns: list[IPv4Address] = []
    if not isinstance(dns_raw, list):
        pr.add(("network", "dns"), "expected a list of IPv4 addresses")
    else:
        for i, d in enumerate(dns_raw):
            a = _ip(d, ("network", "dns", i), pr)
            if a:
                dns.append(a)
    iface = _str(net, "interface", ("network",), pr, "eth0") or "eth0"
    if not IFACE_RE.match(iface):
        pr.add(("network", "interface"), f"'{iface}' is not a network interface name")

    # admin
    adm = _mapping(doc, "admin", ADMIN_KEYS, (), pr)
    admin_name = _str(adm, "name", ("admin",), pr, "admin") or "admin"
    if not USER_RE.match(admin_name):
        pr.add(("admin", "name"), f"'{admin_name}' is not a valid user name (lower-case letters, digits, '_', '-')")
    elif admin_name == "root":
        pr.add(("admin", "name"), "the admin user cannot be root")
    keys_entry = adm.get("ssh_authorized_keys") if "ssh_authorized_keys" in adm else None
    keys = _key_texts(keys_entry, base_dir, home, ("admin", "ssh_authorized_keys"), pr)
    pw_hash = adm.get("password_hash")
    if pw_hash is not None:
        if not isinstance(pw_hash, str) or not HASH_RE.match(pw_hash):
            # never echo what was given: it may be a real password typed by mistake
            pr.add(("admin", "password_hash"), "not a crypt(3) hash ($6$… sha512-crypt or $y$… yescrypt); "
                   "make one with: mkpasswd -m sha-512")
            pw_hash = None

    tz = _str(doc, "timezone", (), pr, "Etc/UTC") or "Etc/UTC"
    if not TIMEZONE_RE.match(tz) or ".." in tz:
        pr.add(("timezone",), f"'{tz}' is not a time zone name like Europe/London or Etc/UTC")

    hw = _hardware(_mapping(doc, "hardware", HARDWARE_KEYS, (), pr), ("hardware",), pr) or \
        Hardware("pi4-2gb", *HARDWARE_MODELS["pi4-2gb"])

    secrets_raw = _str(doc, "secrets_dir", (), pr, ".piimage/secrets") or ".piimage/secrets"
    secrets_dir = Path(os.path.expanduser(secrets_raw))
    if not secrets_dir.is_absolute():
        secrets_dir = base_dir / secrets_dir

    apt_d = _mapping(doc, "apt", APT_KEYS, (), pr)
    apt = AptSettings(_url(apt_d.get("mirror"), ("apt", "mirror"), pr), _url(apt_d.get("proxy"), ("apt", "proxy"), pr))

    sh = _mapping(doc, "shared", SHARED_KEYS, (), pr)
    sh_path = _str(sh, "path", ("shared",), pr, "/clusterfs") or "/clusterfs"
    if not sh_path.startswith("/") or sh_path in ("/", "/etc", "/usr", "/home", "/boot", "/var") or " " in sh_path:
        pr.add(("shared", "path"), f"'{sh_path}' must be an absolute path of its own (e.g. /clusterfs)")
    sh_uuid = _str(sh, "device_uuid", ("shared",), pr)
    if sh_uuid is not None and not UUID_RE.match(sh_uuid):
        pr.add(("shared", "device_uuid"), f"'{sh_uuid}' is not a filesystem UUID (see: lsblk -f)")

    cu = _mapping(doc, "cluster_user", CLUSTER_USER_KEYS, (), pr)
    cu_name = _str(cu, "name", ("cluster_user",), pr, "mpiuser") or "mpiuser"
    if not USER_RE.match(cu_name):
        pr.add(("cluster_user", "name"), f"'{cu_name}' is not a valid user name")
    elif cu_name == admin_name:
        pr.add(("cluster_user", "name"), f"'{cu_name}' is also the admin user; pick another name")
    cu_uid = cu.get("uid", 1500)
    if not isinstance(cu_uid, int) or isinstance(cu_uid, bool) or not 1001 <= cu_uid <= 59999:
        pr.add(("cluster_user", "uid"), f"{cu_uid!r} must be a number from 1001 to 59999 (1000 is the admin user)")
        cu_uid = 1500

    stages_raw = doc.get("stages") or []
    stage_dirs: list[Path] = []
    if not isinstance(stages_raw, list):
        pr.add(("stages",), "expected a list of directories")
    else:
        for i, s in enumerate(stages_raw):
            p = Path(os.path.expanduser(str(s)))
            p = p if p.is_absolute() else base_dir / p
            if not p.is_dir():
                pr.add(("stages", i), f"stages directory {p} does not exist")
            stage_dirs.append(p)

    # nodes
    nodes: list[Node] = []
    raw_nodes = doc.get("nodes")
    if raw_nodes is None:
        pr.add(("nodes",), "missing: list the cluster's nodes (hostname, role, ip)")
        raw_nodes = []
    elif not isinstance(raw_nodes, list) or not raw_nodes:
        pr.add(("nodes",), "expected a non-empty list of nodes")
        raw_nodes = []
    seen_host: dict[str, int] = {}
    seen_ip: dict[IPv4Address, int] = {}
    for i, n in enumerate(raw_nodes):
        p = ("nodes", i)
        if not isinstance(n, dict):
            pr.add(p, "expected a mapping with hostname, role and ip")
            continue
        _unknown_keys(n, NODE_KEYS, p, pr)
        host = n.get("hostname")
        role = n.get("role")
        ok = True
        if host is None:
            pr.add(p, "missing hostname")
            ok = False
        elif not isinstance(host, str) or not HOSTNAME_RE.match(host):
            pr.add(p + ("hostname",), f"'{host}' is not a valid hostname (letters, digits, '-'; at most 63)")
            ok = False
        elif host.lower() in seen_host:
            pr.add(p + ("hostname",), f"hostname '{host}' is used twice (nodes[{seen_host[host.lower()]}])")
            ok = False
        else:
            seen_host[host.lower()] = i
        if role is None:
            pr.add(p, "missing role")
            ok = False
        elif role not in known_roles:
            pr.add(p + ("role",), unknown("role", role, known_roles))
            ok = False
        ip = None
        if n.get("ip") is None:
            pr.add(p, "missing ip")
            ok = False
        else:
            ip = _ip(n["ip"], p + ("ip",), pr)
            if ip is None:
                ok = False
            elif subnet is not None:
                if ip not in subnet:
                    pr.add(p + ("ip",), f"{ip} is outside the cluster subnet {subnet}")
                    ok = False
                elif ip == subnet.network_address:
                    pr.add(p + ("ip",), f"{ip} is the subnet's network address")
                    ok = False
                elif ip == subnet.broadcast_address:
                    pr.add(p + ("ip",), f"{ip} is the subnet's broadcast address")
                    ok = False
                elif ip == gateway:
                    pr.add(p + ("ip",), f"{ip} is the gateway's address")
                    ok = False
            if ip is not None and ip in seen_ip:
                pr.add(p + ("ip",), f"address {ip} is used twice (nodes[{seen_ip[ip]}])")
                ok = False
            elif ip is not None:
                seen_ip[ip] = i
        node_hw = None
        if n.get("hardware") is not None:
            if isinstance(n["hardware"], dict):
                _unknown_keys(n["hardware"], NODE_HARDWARE_KEYS, p + ("hardware",), pr)
                node_hw = _hardware(n["hardware"], p + ("hardware",), pr, inherit_poe=hw.poe_hat)
            else:
                pr.add(p + ("hardware",), "expected a mapping like {model: pi4-4gb}")
        if ok and ip is not None:
            nodes.append(Node(str(host), str(role), ip, node_hw))
    heads = [i for i, n in enumerate(raw_nodes) if isinstance(n, dict) and n.get("role") == "head"]
    if raw_nodes and "head" in known_roles:
        if not heads:
            pr.add(("nodes",), "no node has role 'head': SLURM needs exactly one controller")
        for extra in heads[1:]:
            pr.add(("nodes", extra, "role"), f"a second head node (the first is nodes[{heads[0]}]); SLURM needs exactly one")

    if pr.items:
        raise InventoryError(pr.items)
    return Cluster(
        name=name, base=base, base_sha256=base_sha,
        network=Network(subnet, gateway, tuple(dns), iface),  # type: ignore[arg-type]
        admin=AdminUser(admin_name, keys, pw_hash), timezone=tz, hardware=hw, nodes=tuple(nodes),
        secrets_dir=secrets_dir, base_dir=base_dir, source=source, apt=apt,
        shared=SharedStorage(sh_path, sh_uuid), cluster_user=ClusterUser(cu_name, cu_uid), stages=tuple(stage_dirs),
    )


# ---------------------------------------------------------------------------------------------
# Loading, the default cluster, init
# ---------------------------------------------------------------------------------------------
def default_yaml(keys: list[str] | None = None) -> str:
    key_lines = "\n".join(f"    - {k}" for k in (keys or [])) or "    # - ~/.ssh/id_ed25519.pub\n    # - ssh-ed25519 AAAA… you@laptop"
    return f"""\
# piimage cluster inventory. Validate with `piimage check`, build with `piimage build --all`.
name: picluster                     # images go to out/<name>/

# Base image: raspios-lite-arm64 (newest Raspberry Pi OS Lite 64-bit), raspios-lite-arm64-legacy
# (bookworm), an https://….img.xz URL, or a local .img / .img.xz file.
base: raspios-lite-arm64
# base_sha256: <64 hex digits>      # for a URL without a .sha256 beside it, or a local file

network:
  subnet: 10.42.0.0/24
  gateway: 10.42.0.1
  dns: [10.42.0.1]
  interface: eth0

admin:                              # replaces Raspberry Pi OS's first user (UID 1000)
  name: admin
  ssh_authorized_keys:              # key text or paths to .pub files
{key_lines}
  # password_hash: $6$…             # mkpasswd -m sha-512; without it, SSH keys only

timezone: Etc/UTC
hardware:
  model: pi4-2gb                    # {", ".join(HARDWARE_MODELS)}
  poe_hat: null                     # rpi-poe | rpi-poe-plus: fan settings in config.txt

secrets_dir: .piimage/secrets       # munge key, cluster SSH key, host keys (0700)
apt: {{mirror: null, proxy: null}}  # e.g. proxy: http://10.42.0.1:3142 (apt-cacher-ng)
shared: {{path: /clusterfs, device_uuid: null}}   # NFS export on the head (optional USB drive UUID)
cluster_user: {{name: mpiuser, uid: 1500}}      # same UID on every node; runs MPI jobs
stages: []                          # extra stage directories of your own

nodes:
  - {{hostname: head, role: head, ip: 10.42.0.10}}
  - {{hostname: node01, role: compute, ip: 10.42.0.11}}
  - {{hostname: node02, role: compute, ip: 10.42.0.12}}
  - {{hostname: node03, role: compute, ip: 10.42.0.13}}
  - {{hostname: node04, role: compute, ip: 10.42.0.14}}
"""


def load(path: Path | None, *, known_roles: Collection[str] = ("head", "compute"), cwd: Path | None = None) -> Cluster:
    cwd = cwd or Path.cwd()
    if path is None:
        candidate = cwd / DEFAULT_FILE
        if not candidate.exists():
            keys = default_public_keys()
            if not keys:
                log.warning("no cluster.yaml and no ~/.ssh/id_*.pub: the admin user gets no SSH key and no "
                            "password; run `piimage init` to write a cluster.yaml you can edit")
            text = default_yaml(keys)
            doc, lines = _compose_with_lines(text, "built-in default cluster")
            return validate(doc, where="built-in default cluster", lines=lines, base_dir=cwd,
                            known_roles=known_roles, source=None)
        path = candidate
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: inventory file not found", hint="run `piimage init` to write one") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the inventory: {getattr(e, 'strerror', None) or e}") from None
    doc, lines = _compose_with_lines(text, str(path))
    return validate(doc, where=str(path), lines=lines, base_dir=path.resolve().parent, known_roles=known_roles,
                    source=path.resolve())


def select_nodes(cluster: Cluster, *, hostname: str | None, role: str | None, all_nodes: bool) -> tuple[Node, ...]:
    where = str(cluster.source) if cluster.source else "the built-in default cluster"
    if hostname and all_nodes:
        raise UserError("give either --hostname or --all, not both")
    if all_nodes:
        nodes = cluster.nodes if role is None else cluster.nodes_with_role(role)
        if not nodes:
            raise UserError(f"no node with role '{role}' in {where}")
        return nodes
    if not hostname:
        raise UserError("which node? give --hostname NAME (with --role to double-check) or --all",
                        hint=f"nodes in {where}: {', '.join(n.hostname for n in cluster.nodes)}")
    try:
        node = cluster.node(hostname)
    except KeyError:
        near = difflib.get_close_matches(hostname, [n.hostname for n in cluster.nodes], n=1)
        raise UserError(
            f"--hostname {hostname}: no such node in {where}" + (f" (did you mean '{near[0]}'?)" if near else ""),
            hint=f"nodes: {', '.join(n.hostname for n in cluster.nodes)}",
        ) from None
    if role is not None and role != node.role:
        raise UserError(f"--role {role}: {node.hostname} is a {node.role} node in {where}, not {role}")
    return (node,)


def init(directory: Path, *, force: bool = False) -> list[Path]:
    from .fsutil import write_atomic

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / DEFAULT_FILE
    if target.exists() and not force:
        raise UserError(f"{target} exists; not overwriting it", hint="use --force to replace it")
    written = []
    write_atomic(target, default_yaml(default_public_keys()))
    written.append(target)
    secrets = directory / ".piimage" / "secrets"
    secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(secrets, 0o700)
    written.append(secrets)
    return written
