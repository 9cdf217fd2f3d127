"""The inventory: cluster.yaml → a validated, frozen model of the cluster.

Owns the schema of cluster.yaml, its defaults, the embedded default cluster (used when there
is no cluster.yaml, so `piimage build --role compute --hostname node02` works as is), node
selection for the command line (`--hostname`, `--role`, `--all`) and `piimage init`.

Every problem is collected and reported at once, each with its file, line and key path
(`cluster.yaml:14: nodes[2].ip: 10.0.1.12 is outside the cluster subnet 10.0.0.0/24`), before
anything is downloaded or written. Loading has no side effect: it reads cluster.yaml and the
public key files it names, nothing else. Secrets (password hashes, private keys) never appear
in a message.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import os
import pwd
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import fetch, yamlloc
from .errors import InventoryError, UserError
from .fsutil import write_atomic
from .log import log
from .secrets import ensure_secrets_dir
from .suggest import unknown
from .yamlloc import Doc as _Doc
from .yamlloc import type_name as _type_name

DEFAULT_FILE = "cluster.yaml"
DEFAULT_SOURCE_LABEL = "built-in default cluster"

# Defaults of the optional keys; the embedded default cluster and `piimage init` use the same.
# 10.42.0.0/24: private, and unlike 192.168.0/1.x and 10.0.0.x rarely a home router's own.
DEFAULT_NAME = "picluster"
DEFAULT_BASE = "raspios-lite-arm64"
DEFAULT_SUBNET = "10.42.0.0/24"
DEFAULT_INTERFACE = "eth0"
DEFAULT_ADMIN = "admin"
DEFAULT_TIMEZONE = "Etc/UTC"
DEFAULT_MODEL = "pi4-2gb"
DEFAULT_SECRETS_DIR = ".piimage/secrets"
DEFAULT_SHARED_PATH = "/clusterfs"
DEFAULT_CLUSTER_USER = ("mpiuser", 1500)
DEFAULT_NODES = (("head", "head", 10), *((f"node{i:02d}", "compute", 10 + i) for i in range(1, 5)))

# Hardware models: CPUs and the RealMemory SLURM is told (MB). It must stay at or below what
# slurmd detects on the board (firmware and kernel keep their share), or the node drains.
HARDWARE_MODELS: dict[str, tuple[int, int]] = {
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

# fmt: off
TOP_KEYS = {
    "name", "base", "base_sha256", "network", "admin", "timezone", "hardware", "secrets_dir",
    "apt", "shared", "cluster_user", "stages", "nodes",
}
NETWORK_KEYS = {"subnet", "gateway", "dns", "interface"}
ADMIN_KEYS = {"name", "ssh_authorized_keys", "password_hash"}
HARDWARE_KEYS = {"model", "poe_hat"}
NODE_HARDWARE_KEYS = {"model"}
APT_KEYS = {"mirror", "proxy"}
SHARED_KEYS = {"path", "device_uuid"}
CLUSTER_USER_KEYS = {"name", "uid"}
# runs_jobs: the node is a SLURM compute node (slurmd, listed in slurm.conf). Always true for
# role compute; a head (or a role of your own) that should also run jobs sets it.
NODE_KEYS = {"hostname", "role", "ip", "hardware", "runs_jobs"}

HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")  # one RFC 1123 label
CLUSTER_NAME_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
TIMEZONE_RE = re.compile(r"^(?:UTC|[A-Z][A-Za-z_-]*(?:/[A-Za-z0-9_+-]+){1,2})$")
IFACE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
UUID_RE = re.compile(
    r"^(?:[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}|[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}"
    r"|[0-9A-Fa-f]{16})$"
)  # ext4/btrfs/xfs, vfat/exfat, ntfs
_B64 = r"[./0-9A-Za-z]"
PASSWORD_HASH_RES = (
    re.compile(rf"^\$6\$(?:rounds=\d+\$)?{_B64}{{0,16}}\${_B64}{{86}}$"),  # sha512-crypt
    re.compile(rf"^\$5\$(?:rounds=\d+\$)?{_B64}{{0,16}}\${_B64}{{43}}$"),  # sha256-crypt
    re.compile(rf"^\$g?y\${_B64}+\${_B64}+\${_B64}{{43}}$"),  # yescrypt, gost-yescrypt
)
KEY_TYPES = {
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521", "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
}
MAX_KEY_FILE = 64 * 1024
# Accounts the image already has (or its packages create): neither user may take one.
SYSTEM_USERS = {
    "root", "daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news", "uucp",
    "proxy", "www-data", "backup", "list", "irc", "nobody", "_apt", "messagebus", "sshd",
    "munge", "slurm", "statd", "_rpc", "_chrony", "systemd-network", "systemd-timesync",
}
SYSTEM_DIRS = {
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/media", "/mnt", "/opt", "/proc",
    "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
}
# fmt: on
ZONEINFO = Path("/usr/share/zoneinfo")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    subnet: IPv4Network
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    interface: str = DEFAULT_INTERFACE

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


@dataclass(frozen=True)
class AdminUser:
    name: str
    # key texts ("ssh-ed25519 AAAA… comment"); files named in cluster.yaml are read at load
    ssh_authorized_keys: tuple[str, ...]
    password_hash: str | None = field(default=None, repr=False)  # kept out of logs and tracebacks

    @property
    def home(self) -> str:
        return f"/home/{self.name}"


@dataclass(frozen=True)
class Hardware:
    model: str
    cpus: int
    memory_mb: int  # SLURM RealMemory
    poe_hat: str | None = None


@dataclass(frozen=True)
class Node:
    hostname: str
    role: str
    ip: IPv4Address
    hardware: Hardware  # the node's own model if it overrides the cluster's, else the cluster's
    runs_jobs: bool = False  # a SLURM compute node (always for role compute)


@dataclass(frozen=True)
class AptSettings:
    mirror: str | None = None
    proxy: str | None = None


@dataclass(frozen=True)
class SharedStorage:
    path: str = DEFAULT_SHARED_PATH
    device_uuid: str | None = None


@dataclass(frozen=True)
class ClusterUser:
    name: str = DEFAULT_CLUSTER_USER[0]
    uid: int = DEFAULT_CLUSTER_USER[1]

    @property
    def home(self) -> str:
        return f"/home/{self.name}"


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
    secrets_dir: Path  # absolute
    base_dir: Path  # what relative paths in the inventory are relative to
    source: Path | None = None  # the cluster.yaml read, None for the built-in default
    apt: AptSettings = AptSettings()
    shared: SharedStorage = SharedStorage()
    cluster_user: ClusterUser = ClusterUser()
    stages: tuple[Path, ...] = ()  # absolute, existing

    def node(self, hostname: str) -> Node:
        """The node of that hostname (hostnames ignore case); KeyError if there is none."""
        for n in self.nodes:
            if n.hostname.lower() == hostname.lower():
                return n
        raise KeyError(hostname)

    def nodes_with_role(self, role: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.role == role)

    @property
    def head(self) -> Node | None:
        return next((n for n in self.nodes if n.role == "head"), None)

    @property
    def compute_nodes(self) -> tuple[Node, ...]:
        """The nodes SLURM runs jobs on, in inventory order."""
        return tuple(n for n in self.nodes if n.runs_jobs)

    def to_context(self) -> dict[str, Any]:
        """Plain data for templates (no secrets: the password hash is only `has_password`)."""
        nodes = [_node_context(n, self.network) for n in self.nodes]
        by_name = {n["hostname"]: n for n in nodes}
        head = self.head
        return {
            "cluster": {"name": self.name, "timezone": self.timezone},
            "network": {
                "subnet": str(self.network.subnet),
                "prefixlen": self.network.prefixlen,
                "netmask": str(self.network.subnet.netmask),
                "gateway": str(self.network.gateway),
                "dns": [str(d) for d in self.network.dns],
                "interface": self.network.interface,
            },
            "admin": {
                "name": self.admin.name,
                "home": self.admin.home,
                "group": self.admin.name,
                "ssh_authorized_keys": list(self.admin.ssh_authorized_keys),
                "has_password": self.admin.password_hash is not None,
            },
            "hardware": _hardware_context(self.hardware),
            "nodes": nodes,
            "head": by_name[head.hostname] if head else None,
            "compute_nodes": [by_name[n.hostname] for n in self.compute_nodes],
            "apt": {"mirror": self.apt.mirror, "proxy": self.apt.proxy},
            "shared": {"path": self.shared.path, "device_uuid": self.shared.device_uuid},
            "cluster_user": {
                "name": self.cluster_user.name,
                "uid": self.cluster_user.uid,
                "home": self.cluster_user.home,
            },
        }


def _hardware_context(h: Hardware) -> dict[str, Any]:
    return {"model": h.model, "cpus": h.cpus, "memory_mb": h.memory_mb, "poe_hat": h.poe_hat}


def _node_context(n: Node, net: Network) -> dict[str, Any]:
    hw = _hardware_context(n.hardware)
    return {
        "hostname": n.hostname,
        "role": n.role,
        "ip": str(n.ip),
        "cidr": f"{n.ip}/{net.prefixlen}",
        "runs_jobs": n.runs_jobs,
        "model": hw["model"],
        "cpus": hw["cpus"],
        "memory_mb": hw["memory_mb"],
        "hardware": hw,
    }


# ---------------------------------------------------------------------------------------------
# YAML with locations (yamlloc), and the inventory's own value readers
# ---------------------------------------------------------------------------------------------
def _read_yaml(text: str, where: str) -> _Doc:
    try:
        return yamlloc.read(text, where)
    except yamlloc.MalformedYAML as e:
        raise InventoryError([e.message]) from None


class _Checker(yamlloc.Checker):
    def ip(self, value: str, path: tuple) -> IPv4Address | None:
        try:
            return IPv4Address(value)
        except ValueError:
            if "/" in value:
                self.add(
                    path,
                    f"'{value}': give the address without a prefix length (the subnet sets it)",
                )
            else:
                self.add(path, f"'{value}' is not an IPv4 address")
            return None

    def url(self, d: dict, key: str, path: tuple) -> str | None:
        value = self.text(d, key, path)
        if value is None:
            return None
        parts = urlsplit(value)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or any(c.isspace() for c in value)
        ):
            self.add(path + (key,), f"'{value}' is not an http(s) URL")
            return None
        return value


def _resolve_path(value: str, base_dir: Path, home: Path) -> Path:
    """`~` is the invoking user's home (the sudo caller's, not root's); relative → base_dir."""
    if value == "~" or value.startswith("~/"):
        p = home / value[2:]
    else:
        p = Path(os.path.expanduser(value))
    return p if p.is_absolute() else base_dir / p


# ---------------------------------------------------------------------------------------------
# SSH public keys
# ---------------------------------------------------------------------------------------------
def _split_options(line: str) -> tuple[str, str]:
    """authorized_keys options (`from="…",no-pty`) come before the key type and have no
    whitespace outside double quotes."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"' and (i == 0 or line[i - 1] != "\\"):
            quoted = not quoted
        elif c.isspace() and not quoted:
            return line[:i], line[i:].lstrip()
    return line, ""


def public_key_problem(line: str) -> str | None:
    """Why `line` is not an OpenSSH public key (authorized_keys form), or None if it is one."""
    fields = line.split()
    if fields and fields[0] not in KEY_TYPES and fields[0] != "ssh-dss":
        fields = _split_options(line)[1].split()  # skip options, if any
    if not fields or (fields[0] not in KEY_TYPES and fields[0] != "ssh-dss"):
        return "expected 'ssh-ed25519 AAAA… comment' or another OpenSSH key type"
    kind = fields[0]
    if kind == "ssh-dss":
        return (
            "a DSA key, which current OpenSSH refuses; use an ed25519 key (ssh-keygen -t ed25519)"
        )
    if len(fields) < 2:
        return f"no key data after '{kind}'"
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        return "the key data is not valid base64"
    n = int.from_bytes(blob[:4], "big")
    if len(blob) < 4 + n or blob[4 : 4 + n] != kind.encode():
        return f"the key data is not that of a {kind} key (cut short, or pasted from another key?)"
    return None


def _looks_like_key_text(entry: str) -> bool:
    """Key text rather than a file path: it starts with a key type, or has several words and
    one is a key type (authorized_keys options first) or the first looks like one (a typo)."""
    words = entry.split()
    if not words:
        return False
    if words[0] in KEY_TYPES or words[0] == "ssh-dss":
        return True
    return len(words) > 1 and (
        words[0].startswith(("ssh-", "ecdsa-", "sk-")) or any(w in KEY_TYPES for w in words)
    )


def _is_private(text: str) -> bool:
    return "PRIVATE KEY-----" in text or text.startswith("PuTTY-User-Key-File")


def _read_key_file(f: Path) -> tuple[list[str], str | None]:
    """The public keys in file `f`, or why there are none to take."""
    try:
        if f.is_dir():
            return [], f"{f} is a directory, not a public key file"
        if f.stat().st_size > MAX_KEY_FILE:
            return [], f"{f} is too large to be a public key file"
        data = f.read_bytes()
    except FileNotFoundError:
        return [], f"key file {f} does not exist"
    except OSError as e:
        return [], f"key file {f} cannot be read ({e.strerror or e})"
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = ""
    if _is_private(text) or b"PRIVATE KEY-----" in data:
        # never quote it; say what to give instead
        pub = f if f.name.endswith(".pub") else f.with_name(f.name + ".pub")
        return [], f"{f} is a private key; refusing it (give the public key, {pub})"
    if not text:
        return [], f"{f} is not a text file, so not an OpenSSH public key"
    if text.lstrip().startswith("---- BEGIN SSH2 PUBLIC KEY"):
        return [], f"{f} is in RFC 4716 (PuTTY/SSH2) form; convert it: ssh-keygen -i -f {f}"
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        reason = public_key_problem(line)
        if reason:
            return [], f"{f}: line {n} does not look like an OpenSSH public key ({reason})"
        keys.append(line)
    return keys, None if keys else f"{f} holds no public key"


def _authorized_keys(
    d: dict, path: tuple, ck: _Checker, base_dir: Path, home: Path
) -> tuple[str, ...]:
    entries = (
        ck.text_list(
            d,
            "ssh_authorized_keys",
            path,
            "a public key or a .pub file path",
            "public keys or .pub file paths",
        )
        or []
    )
    keys: list[str] = []
    for p, entry in entries:
        if _is_private(entry) or entry.startswith("-----BEGIN"):
            ck.add(
                p, "this is a private key; give the public key (the .pub file or its text) instead"
            )
        elif _looks_like_key_text(entry):
            lines = [ln.strip() for ln in entry.splitlines() if ln.strip()]
            reasons = [r for r in map(public_key_problem, lines) if r]
            if reasons:
                ck.add(p, f"does not look like an OpenSSH public key ({reasons[0]})")
            else:
                keys.extend(lines)
        else:
            found, problem = _read_key_file(_resolve_path(entry, base_dir, home))
            if problem:
                ck.add(p, problem)
            keys.extend(found)
    return tuple(dict.fromkeys(keys))  # once each, in order


def invoking_home() -> Path:
    """The home of the user who ran the command; through sudo, the one who typed sudo."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user and sudo_user != "root":
        try:
            return Path(pwd.getpwnam(sudo_user).pw_dir)
        except KeyError:
            pass
    return Path(os.environ.get("HOME") or Path.home())


def default_key_files(home: Path | None = None) -> list[str]:
    """The invoking user's usable public keys as `~/.ssh/id_*.pub` (resolved against that
    user's home at load time); unusable ones are skipped with a warning."""
    ssh = (home or invoking_home()) / ".ssh"
    found = []
    for f in sorted(ssh.glob("id_*.pub")) if ssh.is_dir() else []:
        problem = _read_key_file(f)[1]
        if problem:
            log.warning("not using %s", problem)
        else:
            found.append(f"~/.ssh/{f.name}")
    return found


# ---------------------------------------------------------------------------------------------
# Validation, section by section
# ---------------------------------------------------------------------------------------------
def _name(doc: dict, ck: _Checker) -> str:
    name = ck.text(doc, "name", (), DEFAULT_NAME) or DEFAULT_NAME
    if not CLUSTER_NAME_RE.match(name):
        ck.add(
            ("name",),
            f"'{name}' is not a valid cluster name (lower-case letters, digits and '-', "
            "not at either end; at most 63)",
        )
    return name


def _base(doc: dict, ck: _Checker, base_dir: Path) -> tuple[str, str | None]:
    base = ck.text(doc, "base", (), DEFAULT_BASE) or DEFAULT_BASE
    digest = ck.text(doc, "base_sha256", ())
    if digest is not None:
        digest = digest.lower()
        if not SHA256_RE.match(digest):
            ck.add(("base_sha256",), "expected the image's SHA-256: 64 hexadecimal digits")
    if (
        base not in fetch.IMAGER_NAMES
        and "://" not in base
        and "/" not in base
        and not base.endswith((".img", ".img.xz"))
    ):
        ck.add(
            ("base",),
            unknown("base image", base, fetch.IMAGER_NAMES)
            + "; or give an http(s) URL of a .img.xz, or a local .img/.img.xz path",
        )
        return base, digest
    try:
        fetch.parse_base_spec(base, None, relative_to=base_dir)  # the same rules as the build
    except UserError as e:
        ck.add(("base",), e.message.removeprefix("base: "))
    return base, digest


def _network(doc: dict, ck: _Checker) -> Network | None:
    path = ("network",)
    net = ck.mapping(doc.get("network"), path, NETWORK_KEYS)
    text = ck.text(net, "subnet", path, DEFAULT_SUBNET) or DEFAULT_SUBNET
    subnet = None
    try:
        if "/" not in text:  # IPv4Network would take it as a /32
            raise ValueError("no prefix length")
        subnet = IPv4Network(text, strict=True)
    except ValueError as e:
        if "/" not in text:
            ck.add(path + ("subnet",), f"'{text}' needs a prefix length, like 10.42.0.0/24")
        elif "has host bits set" in str(e):
            near = IPv4Network(text, strict=False)
            ck.add(path + ("subnet",), f"'{text}' has host bits set (did you mean {near}?)")
        else:
            ck.add(path + ("subnet",), f"'{text}' is not an IPv4 network like 10.42.0.0/24")
    if subnet is not None and subnet.prefixlen > 30:
        ck.add(path + ("subnet",), f"{subnet} is too small for a cluster (at most /30)")
        subnet = None

    gw_text = ck.text(net, "gateway", path)
    if gw_text is None:
        gateway = next(subnet.hosts()) if subnet else None  # the first address, by convention
    else:
        gateway = ck.ip(gw_text, path + ("gateway",))
        if subnet and gateway:
            if gateway not in subnet:
                ck.add(path + ("gateway",), f"{gateway} is outside the cluster subnet {subnet}")
            elif gateway in (subnet.network_address, subnet.broadcast_address):
                ck.add(
                    path + ("gateway",),
                    f"{gateway} is the subnet's "
                    f"{'network' if gateway == subnet.network_address else 'broadcast'} address",
                )

    dns: list[IPv4Address] = []
    entries = ck.text_list(net, "dns", path, "an IPv4 address", "IPv4 addresses")
    if entries is None:
        dns = [gateway] if gateway else []
    for p, entry in entries or []:
        a = ck.ip(entry, p)
        if a:
            dns.append(a)

    iface = ck.text(net, "interface", path, DEFAULT_INTERFACE) or DEFAULT_INTERFACE
    if not IFACE_RE.match(iface):
        ck.add(path + ("interface",), f"'{iface}' is not a network interface name (like eth0)")
    if subnet is None or gateway is None:
        return None
    return Network(subnet, gateway, tuple(dns), iface)


def _user_name(name: str, path: tuple, ck: _Checker) -> bool:
    if not USER_RE.match(name):
        ck.add(
            path,
            f"'{name}' is not a valid user name (lower-case letters, digits, '_', '-'; "
            "starting with a letter or '_'; at most 32)",
        )
        return False
    if name in SYSTEM_USERS:
        ck.add(path, f"'{name}' is a system account of the image; pick another name")
        return False
    return True


def _admin(doc: dict, ck: _Checker, base_dir: Path, home: Path) -> AdminUser:
    path = ("admin",)
    adm = ck.mapping(doc.get("admin"), path, ADMIN_KEYS)
    name = ck.text(adm, "name", path, DEFAULT_ADMIN) or DEFAULT_ADMIN
    _user_name(name, path + ("name",), ck)
    keys = _authorized_keys(adm, path, ck, base_dir, home)
    pw_hash = adm.get("password_hash")
    if pw_hash is not None:
        # never quote the value: it may be a real password typed by mistake
        if not isinstance(pw_hash, str) or not any(
            r.match(pw_hash.strip()) for r in PASSWORD_HASH_RES
        ):
            plain = isinstance(pw_hash, str) and "$" not in pw_hash
            ck.add(
                path + ("password_hash",),
                "not a sha512-crypt ($6$…) or yescrypt ($y$…) hash (value not shown)"
                + (
                    "; it looks like a plain password — never put one in cluster.yaml"
                    if plain
                    else ""
                )
                + "; make one with: mkpasswd -m sha-512  (or: openssl passwd -6)",
            )
            pw_hash = None
        else:
            pw_hash = pw_hash.strip()
    return AdminUser(name, keys, pw_hash)


def _timezone(doc: dict, ck: _Checker) -> str:
    tz = ck.text(doc, "timezone", (), DEFAULT_TIMEZONE) or DEFAULT_TIMEZONE
    if not TIMEZONE_RE.match(tz) or ".." in tz:
        ck.add(
            ("timezone",),
            f"'{tz}' is not a time zone name in Area/City form, like Europe/London or Etc/UTC",
        )
    elif ZONEINFO.is_dir() and not (ZONEINFO / tz).is_file():
        # the host's tz database is the image's Debian one, give or take a release
        zones = [str(p.relative_to(ZONEINFO)) for p in ZONEINFO.glob("[A-Z]*/**/*") if p.is_file()]
        near = difflib.get_close_matches(tz, zones, n=1)
        ck.add(
            ("timezone",),
            f"unknown time zone '{tz}'"
            + (f" (did you mean '{near[0]}'?)" if near else "")
            + f"; see {ZONEINFO}",
        )
    return tz


def _hardware(d: dict, path: tuple, ck: _Checker, inherit: Hardware | None) -> Hardware | None:
    model = ck.text(d, "model", path, inherit.model if inherit else DEFAULT_MODEL)
    if model not in HARDWARE_MODELS:
        ck.add(path + ("model",), unknown("hardware model", model, HARDWARE_MODELS))
        return None
    poe = inherit.poe_hat if inherit else ck.text(d, "poe_hat", path)
    if poe is not None and poe not in POE_HATS:
        ck.add(
            path + ("poe_hat",),
            f"'{poe}' is not a PoE HAT overlay (use {' or '.join(POE_HATS)}, or null)",
        )
        poe = None
    cpus, memory = HARDWARE_MODELS[model]
    return Hardware(model, cpus, memory, poe)


def _shared(doc: dict, ck: _Checker) -> SharedStorage:
    path = ("shared",)
    sh = ck.mapping(doc.get("shared"), path, SHARED_KEYS)
    where = ck.text(sh, "path", path, DEFAULT_SHARED_PATH) or DEFAULT_SHARED_PATH
    if (
        not where.startswith("/")
        or os.path.normpath(where) != where
        or any(c.isspace() for c in where)
    ):
        ck.add(
            path + ("path",),
            f"'{where}' must be a plain absolute path without spaces, like /clusterfs",
        )
    elif where in SYSTEM_DIRS or where.startswith(("/proc/", "/sys/", "/dev/", "/run/", "/boot/")):
        ck.add(
            path + ("path",),
            f"'{where}' is a system directory; give the share its own, like /clusterfs",
        )
    uuid = ck.text(sh, "device_uuid", path)
    if uuid is not None and not UUID_RE.match(uuid):
        ck.add(path + ("device_uuid",), f"'{uuid}' is not a filesystem UUID (lsblk -f shows them)")
    return SharedStorage(where, uuid)


def _cluster_user(doc: dict, ck: _Checker, admin: AdminUser) -> ClusterUser:
    path = ("cluster_user",)
    cu = ck.mapping(doc.get("cluster_user"), path, CLUSTER_USER_KEYS)
    name = ck.text(cu, "name", path, DEFAULT_CLUSTER_USER[0]) or DEFAULT_CLUSTER_USER[0]
    if _user_name(name, path + ("name",), ck) and name == admin.name:
        ck.add(
            path + ("name",),
            f"'{name}' is also the admin user's name; the cluster user needs its own",
        )
    uid = ck.integer(cu, "uid", path, DEFAULT_CLUSTER_USER[1])
    if uid is not None and not 1001 <= uid <= 59999:
        ck.add(
            path + ("uid",),
            f"{uid} must be from 1001 to 59999 (a regular user's range; 1000 is the admin)",
        )
    return ClusterUser(name, uid or DEFAULT_CLUSTER_USER[1])


def _stages(doc: dict, ck: _Checker, base_dir: Path, home: Path) -> tuple[Path, ...]:
    dirs = []
    for p, entry in ck.text_list(doc, "stages", (), "a directory", "directories") or []:
        d = _resolve_path(entry, base_dir, home)
        if not d.is_dir():
            ck.add(p, f"stages directory {d} does not exist")
        dirs.append(d)
    return tuple(dirs)


def _secrets_dir(doc: dict, ck: _Checker, base_dir: Path, home: Path) -> Path:
    text = ck.text(doc, "secrets_dir", (), DEFAULT_SECRETS_DIR) or DEFAULT_SECRETS_DIR
    d = _resolve_path(text, base_dir, home)
    if d.exists() and not d.is_dir():
        ck.add(("secrets_dir",), f"{d} exists and is not a directory")
    return d


@dataclass
class _Seen:
    """What earlier nodes took, so a later one can name the node it clashes with."""

    hostnames: dict[str, tuple[int, str]] = field(
        default_factory=dict
    )  # lower-case -> (i, as given)
    addresses: dict[IPv4Address, int] = field(default_factory=dict)
    heads: list[int] = field(default_factory=list)


def _nodes(
    doc: dict,
    ck: _Checker,
    network: Network | None,
    hardware: Hardware | None,
    known_roles: Collection[str],
) -> tuple[Node, ...]:
    raw = doc.get("nodes")
    if raw is None:
        what = "no nodes given; list the cluster's nodes, each with hostname, role and ip"
        ck.add(("nodes",), what)
        return ()
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if raw == [] else _type_name(raw)
        ck.add(("nodes",), f"expected a non-empty list of nodes, got {got}")
        return ()
    seen = _Seen()
    nodes = []
    for i, item in enumerate(raw):
        node = _node(item, ("nodes", i), ck, network, hardware, known_roles, seen)
        if node:
            nodes.append(node)
    if not seen.heads and "head" in known_roles:
        ck.add(("nodes",), "no node has role 'head': SLURM needs exactly one controller")
    return tuple(nodes)


def _node(
    item: Any,
    p: tuple,
    ck: _Checker,
    network: Network | None,
    hardware: Hardware | None,
    known_roles: Collection[str],
    seen: _Seen,
) -> Node | None:
    if not isinstance(item, dict):
        ck.add(p, f"expected a mapping with hostname, role and ip, got {_type_name(item)}")
        return None
    ck.mapping(item, p, NODE_KEYS)
    missing = [k for k in ("hostname", "role", "ip") if item.get(k) is None]
    if missing:
        ck.add(p, f"missing {' and '.join(repr(k) for k in missing)}")
    host = _node_hostname(item, p, ck, seen)
    role = _node_role(item, p, ck, known_roles, seen)
    ip = _node_ip(item, p, ck, network, seen)
    hw = hardware
    if item.get("hardware") is not None:
        hw_map = ck.mapping(item["hardware"], p + ("hardware",), NODE_HARDWARE_KEYS)
        if hw_map and hardware is not None:
            hw = _hardware(hw_map, p + ("hardware",), ck, inherit=hardware)
    runs_jobs = ck.boolean(item, "runs_jobs", p)
    if role == "compute" and runs_jobs is False:
        ck.add(p + ("runs_jobs",), "a compute node always runs jobs; give it another role instead")
    runs_jobs = role == "compute" if runs_jobs is None else runs_jobs
    if host and role and ip and hw:
        return Node(host, role, ip, hw, runs_jobs)
    return None


def _node_hostname(item: dict, p: tuple, ck: _Checker, seen: _Seen) -> str | None:
    host = ck.text(item, "hostname", p)
    if host is None:
        return None
    p += ("hostname",)
    if not HOSTNAME_RE.match(host):
        ck.add(
            p,
            f"'{host}' is not a valid hostname (letters, digits, '-'; "
            "not starting or ending with '-'; at most 63)",
        )
    elif host.lower() == "localhost":
        ck.add(p, "'localhost' is taken by every machine; pick another hostname")
    elif host.lower() in seen.hostnames:
        j, other = seen.hostnames[host.lower()]
        same = "" if other == host else f" as '{other}'; hostnames ignore case"
        ck.add(p, f"hostname '{host}' is used twice (nodes[{j}]{same})")
    else:
        seen.hostnames[host.lower()] = (p[1], host)
        return host
    return None


def _node_role(
    item: dict, p: tuple, ck: _Checker, known_roles: Collection[str], seen: _Seen
) -> str | None:
    role = ck.text(item, "role", p)
    if role is None:
        return None
    if role not in known_roles:
        roles = sorted(known_roles)
        msg = unknown("role", role, roles)
        if "did you mean" in msg:
            msg += f"; known roles: {', '.join(roles)}"
        ck.add(p + ("role",), msg + " — a role needs node-profiles/<role>.yaml")
        return None
    if role == "head":
        if seen.heads:
            first = seen.heads[0]
            ck.add(
                p + ("role",),
                f"a second head node (the first is nodes[{first}]); SLURM needs exactly one",
            )
        seen.heads.append(p[1])
    return role


def _node_ip(
    item: dict, p: tuple, ck: _Checker, network: Network | None, seen: _Seen
) -> IPv4Address | None:
    text = ck.text(item, "ip", p)
    ip = ck.ip(text, p + ("ip",)) if text is not None else None
    if ip is None:
        return None
    p += ("ip",)
    if ip in seen.addresses:
        ck.add(p, f"address {ip} is used twice (nodes[{seen.addresses[ip]}])")
    else:
        seen.addresses[ip] = p[1]
    if network is not None:
        subnet = network.subnet
        if ip not in subnet:
            ck.add(p, f"{ip} is outside the cluster subnet {subnet}")
        elif ip == subnet.network_address:
            ck.add(p, f"{ip} is the subnet's network address")
        elif ip == subnet.broadcast_address:
            ck.add(p, f"{ip} is the subnet's broadcast address")
        elif ip == network.gateway:
            ck.add(p, f"{ip} is the gateway's address")
    return ip


def _validate(
    doc: _Doc,
    *,
    where: str,
    base_dir: Path,
    known_roles: Collection[str],
    home: Path,
    source: Path | None,
) -> Cluster:
    ck = _Checker(where, doc)
    top = doc.value
    if top is None:
        top = {}
    if not isinstance(top, dict):
        line = doc.lines.get(())
        loc = f"{where}:{line}" if line else where
        raise InventoryError(
            [
                (
                    f"{loc}: expected a mapping of settings at the top level (name:, network:, "
                    f"nodes: …), got {_type_name(top)}"
                )
            ]
        )
    ck.mapping(top, (), TOP_KEYS)
    name = _name(top, ck)
    base, base_sha256 = _base(top, ck, base_dir)
    network = _network(top, ck)
    admin = _admin(top, ck, base_dir, home)
    timezone = _timezone(top, ck)
    hardware = _hardware(
        ck.mapping(top.get("hardware"), ("hardware",), HARDWARE_KEYS), ("hardware",), ck, None
    )
    secrets_dir = _secrets_dir(top, ck, base_dir, home)
    apt_map = ck.mapping(top.get("apt"), ("apt",), APT_KEYS)
    apt = AptSettings(ck.url(apt_map, "mirror", ("apt",)), ck.url(apt_map, "proxy", ("apt",)))
    shared = _shared(top, ck)
    cluster_user = _cluster_user(top, ck, admin)
    stages = _stages(top, ck, base_dir, home)
    nodes = _nodes(top, ck, network, hardware, known_roles)
    if ck.problems:
        raise InventoryError(ck.problems)
    assert network is not None and hardware is not None  # each would have been a problem
    return Cluster(
        name=name,
        base=base,
        base_sha256=base_sha256,
        network=network,
        admin=admin,
        timezone=timezone,
        hardware=hardware,
        nodes=nodes,
        secrets_dir=secrets_dir,
        base_dir=base_dir,
        source=source,
        apt=apt,
        shared=shared,
        cluster_user=cluster_user,
        stages=stages,
    )


# ---------------------------------------------------------------------------------------------
# Loading, the default cluster, node selection, init
# ---------------------------------------------------------------------------------------------
def default_yaml(keys: Sequence[str] = ()) -> str:
    """The commented cluster.yaml `piimage init` writes; also the embedded default cluster.
    `keys`: entries for admin.ssh_authorized_keys (key texts or .pub paths)."""
    net = IPv4Network(DEFAULT_SUBNET)
    gateway = next(net.hosts())
    key_lines = "".join(f"    - {_yaml_text(k)}\n" for k in keys) or (
        "    # - ~/.ssh/id_ed25519.pub\n    # - ssh-ed25519 AAAA… you@laptop\n"
    )
    nodes = "".join(
        f"  - {{hostname: {h}, role: {r}, ip: {net.network_address + host}}}\n"
        for h, r, host in DEFAULT_NODES
    )
    models = ", ".join(HARDWARE_MODELS)
    return f"""\
# piimage cluster inventory. Check it with `piimage check`, build with `piimage build --all`.
# Relative paths below are relative to this file; ~ is your home (also under sudo).

name: {DEFAULT_NAME}                       # images go to out/<name>/ (a-z, 0-9, -)

# Base image: raspios-lite-arm64 (newest Raspberry Pi OS Lite 64-bit), raspios-lite-arm64-legacy
# (bookworm), an https://….img.xz URL, or a local .img / .img.xz file.
base: {DEFAULT_BASE}
base_sha256: null                     # expected SHA-256 of a URL or local base (optional)

network:
  subnet: {net}
  gateway: {gateway}
  dns: [{gateway}]
  interface: {DEFAULT_INTERFACE}

admin:                                # replaces Raspberry Pi OS's first user (UID 1000)
  name: {DEFAULT_ADMIN}
  ssh_authorized_keys:                # public key text, or paths to .pub files
{key_lines}\
  # Optional, for console/password login: a hash, never the password itself.
  # Make one with `mkpasswd -m sha-512` (whois package) or `openssl passwd -6`.
  password_hash: null

timezone: {DEFAULT_TIMEZONE}                     # Area/City, e.g. Europe/London

hardware:
  model: {DEFAULT_MODEL}                      # {models}
  poe_hat: null                       # rpi-poe | rpi-poe-plus: PoE HAT fan settings in config.txt

secrets_dir: {DEFAULT_SECRETS_DIR}         # munge key, cluster SSH key, host keys (kept 0700)

apt:                                  # e.g. proxy: http://{gateway}:3142 (apt-cacher-ng)
  mirror: null
  proxy: null

shared:                               # exported by the head over NFS, mounted on every node
  path: {DEFAULT_SHARED_PATH}
  device_uuid: null                   # a USB drive's filesystem UUID (lsblk -f), or null

cluster_user:                         # runs MPI jobs; the same UID on every node
  name: {DEFAULT_CLUSTER_USER[0]}
  uid: {DEFAULT_CLUSTER_USER[1]}

stages: []                            # stage directories of your own, e.g. [my-stages]

# One head (SLURM controller, NFS server, time server) and compute nodes. A node may override
# the model (hardware: {{model: pi5-8gb}}); a head that should also run jobs: runs_jobs: true.
nodes:
{nodes}"""


def _yaml_text(value: str) -> str:
    """`value` as a YAML scalar: plain when that reads back the same, else double-quoted."""
    if re.fullmatch(r"[A-Za-z0-9~./][A-Za-z0-9 ~./@+=_-]*", value) and not value.endswith(" "):
        return value
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load(
    path: Path | None,
    *,
    known_roles: Collection[str] = ("head", "compute"),
    cwd: Path | None = None,
) -> Cluster:
    """Read and validate the inventory: `path`, else ./cluster.yaml, else the built-in default
    cluster. Raises InventoryError with every problem, or UserError if `path` cannot be read."""
    cwd = (cwd or Path.cwd()).absolute()
    home = invoking_home()
    if path is None:
        candidate = cwd / DEFAULT_FILE
        if not candidate.exists():
            return _load_default(cwd, known_roles, home)
        path, where = candidate, _display(candidate)
    else:
        where = str(path)
        path = path if path.is_absolute() else cwd / path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{where}: inventory file not found",
            hint="run `piimage init` to write one, or leave out --inventory for the default cluster",
        ) from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a directory, not an inventory file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"{where}: cannot read the inventory ({getattr(e, 'strerror', None) or e})"
        ) from None
    source = path.resolve()
    cluster = _validate(
        _read_yaml(text, where),
        where=where,
        base_dir=source.parent,
        known_roles=known_roles,
        home=home,
        source=source,
    )
    if not cluster.admin.ssh_authorized_keys:
        log.warning(
            "%s: admin.ssh_authorized_keys is empty: SSH login as %s stays possible only with a "
            "password, and only if admin.password_hash is set",
            where,
            cluster.admin.name,
        )
    return cluster


def _load_default(cwd: Path, known_roles: Collection[str], home: Path) -> Cluster:
    keys = default_key_files(home)
    if not keys:
        log.warning(
            "no cluster.yaml here and no SSH public key in %s/.ssh (id_*.pub): the default "
            "cluster's admin user gets no key, so SSH password login stays possible only with "
            "admin.password_hash; run `piimage init` to write a cluster.yaml you can edit",
            home,
        )
    doc = _read_yaml(default_yaml(keys), DEFAULT_SOURCE_LABEL)
    return _validate(
        doc,
        where=DEFAULT_SOURCE_LABEL,
        base_dir=cwd,
        known_roles=known_roles,
        home=home,
        source=None,
    )


def _label(cluster: Cluster) -> str:
    return _display(cluster.source) if cluster.source else f"the {DEFAULT_SOURCE_LABEL}"


def select_nodes(
    cluster: Cluster, *, hostname: str | None, role: str | None, all_nodes: bool
) -> tuple[Node, ...]:
    """The nodes a command is about: `--hostname` (checked against `--role`), or `--all`
    (filtered by `--role`)."""
    where = _label(cluster)
    names = ", ".join(n.hostname for n in cluster.nodes)
    if hostname and all_nodes:
        raise UserError("give either --hostname or --all, not both")
    if all_nodes:
        if role is None:
            return cluster.nodes
        nodes = cluster.nodes_with_role(role)
        if not nodes:
            present = ", ".join(sorted({n.role for n in cluster.nodes}))
            raise UserError(
                f"--role {role}: no {role} node in {where}", hint=f"roles there: {present}"
            )
        return nodes
    if not hostname:
        also = f"--all --role {role}" if role else "--all"
        raise UserError(
            f"which node? give --hostname NAME, or {also}", hint=f"nodes in {where}: {names}"
        )
    try:
        node = cluster.node(hostname)
    except KeyError:
        near = difflib.get_close_matches(hostname, [n.hostname for n in cluster.nodes], n=1)
        raise UserError(
            f"--hostname {hostname}: no such node in {where}"
            + (f" (did you mean '{near[0]}'?)" if near else ""),
            hint=f"nodes in {where}: {names}",
        ) from None
    if role is not None and role != node.role:
        raise UserError(
            f"--role {role}: {node.hostname} is a {node.role} node in {where}, not {role}",
            hint=f"drop --role, or change {node.hostname}'s role in the inventory",
        )
    return (node,)


def init(directory: Path, *, force: bool = False) -> list[Path]:
    """Write an editable cluster.yaml (with the invoking user's public keys, if any) and the
    secrets directory (0700). Returns what was written or created."""
    target = directory / DEFAULT_FILE
    if target.is_dir():
        raise UserError(f"{target} is a directory")
    if target.exists() and not force:
        raise UserError(
            f"{target} already exists; not overwriting it",
            hint="use --force to replace it (the secrets directory is kept)",
        )
    secrets = directory / DEFAULT_SECRETS_DIR
    existed = secrets.is_dir()
    write_atomic(target, default_yaml(default_key_files()), mode=0o644)
    ensure_secrets_dir(secrets)
    return [target] if existed else [target, secrets]
