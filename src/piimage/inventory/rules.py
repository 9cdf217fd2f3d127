"""The rules of cluster.yaml, section by section: every problem collected with its location,
the valid document turned into the model. Role rules (one controller, who runs jobs) read the
roles' facts from their node profiles."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from .. import fetch
from ..errors import InventoryError, UserError
from ..profiles import Profile, effective
from ..suggest import unknown
from .boards import HARDWARE_MODELS, POE_HATS
from .defaults import (
    DEFAULT_ADMIN,
    DEFAULT_BASE,
    DEFAULT_CLUSTER_USER,
    DEFAULT_INTERFACE,
    DEFAULT_MODEL,
    DEFAULT_NAME,
    DEFAULT_SECRETS_DIR,
    DEFAULT_SHARED_PATH,
    DEFAULT_SUBNET,
    DEFAULT_TIMEZONE,
)
from .located import _Checker, _Doc, _resolve_path, _type_name
from .model import (
    AdminUser,
    AptSettings,
    Cluster,
    ClusterUser,
    Hardware,
    Network,
    Node,
    SharedStorage,
)
from .sshkeys import _authorized_keys

# fmt: off
TOP_KEYS = {
    "name", "base", "base_sha256", "network", "admin", "timezone", "hardware", "secrets_dir",
    "apt", "shared", "cluster_user", "stages", "nodes", "accounting",
}
ACCOUNTING = {
    "jobcomp": "a job completion log on the head, the default",
    "slurmdbd": "slurmdbd and MariaDB on the head, for sacct and sreport",
}
NETWORK_KEYS = {"subnet", "gateway", "dns", "interface"}
ADMIN_KEYS = {"name", "ssh_authorized_keys", "password_hash"}
HARDWARE_KEYS = {"model", "poe_hat"}
NODE_HARDWARE_KEYS = {"model", "real_memory"}
MIN_REAL_MEMORY_MB = 256  # below this a Pi runs no job at all beside its own services
APT_KEYS = {"mirror", "proxy", "security_mirror", "raspberrypi_mirror"}
SHARED_KEYS = {"path", "device_uuid"}
CLUSTER_USER_KEYS = {"name", "uid"}
# runs_jobs: the node is a SLURM compute node (slurmd, listed in slurm.conf). Always true for
# a role whose profile installs slurmd (compute); a head (or a role of your own) that should
# also run jobs sets it.
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
SHARED_TMP = {"/tmp", "/var/tmp", "/dev/shm", "/run/shm"}


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
    if inherit is not None and d.get("real_memory") is not None:
        # a node whose board reports less than its model's figure (slurmd drains a node that
        # registers with less memory than slurm.conf's RealMemory)
        real = ck.integer(d, "real_memory", path, memory)
        if real is not None and not MIN_REAL_MEMORY_MB <= real <= memory:
            ck.add(
                path + ("real_memory",),
                f"{real} must be from {MIN_REAL_MEMORY_MB} to {memory} MiB: the {model}'s "
                "RealMemory is at most that, and a node that reports less memory than "
                "slurm.conf says is drained",
            )
            real = None
        memory = real or memory
    return Hardware(model, cpus, memory, poe)


def _shared(doc: dict, ck: _Checker) -> SharedStorage:
    path = ("shared",)
    sh = ck.mapping(doc.get("shared"), path, SHARED_KEYS)
    where = ck.text(sh, "path", path, DEFAULT_SHARED_PATH) or DEFAULT_SHARED_PATH
    if (
        not where.startswith("/")
        or where.startswith("//")  # normpath keeps a leading "//": //etc would pass as not /etc
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


def _cluster_user(doc: dict, ck: _Checker, admin: AdminUser, shared: SharedStorage) -> ClusterUser:
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
    return ClusterUser(name, uid or DEFAULT_CLUSTER_USER[1], shared.path)


def _accounting(doc: dict, ck: _Checker) -> str:
    value = ck.text(doc, "accounting", (), "jobcomp") or "jobcomp"
    if value not in ACCOUNTING:
        kinds = "; ".join(f"{k} ({what})" for k, what in ACCOUNTING.items())
        ck.add(("accounting",), f"'{value}' is not a kind of job history: {kinds}")
        return "jobcomp"
    return value


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
    real = Path(os.path.realpath(d))
    if str(real) in SYSTEM_DIRS | SHARED_TMP or real.parent == Path("/"):
        # build makes the directory 0700 and keeps keys in it: never a shared or system one
        ck.add(
            ("secrets_dir",),
            f"{d} is a system or shared directory; piimage makes the secrets directory 0700 "
            "and keeps private keys in it: give it its own, like .piimage/secrets",
        )
    elif d.exists() and not d.is_dir():
        ck.add(("secrets_dir",), f"{d} exists and is not a directory")
    elif d.is_dir() and d.stat().st_mode & 0o002:
        ck.add(
            ("secrets_dir",),
            f"{d} is writable by every user; the secrets directory must be private (0700)",
        )
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
    roles: Mapping[str, Profile],
    accounting: str = "jobcomp",
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
        node = _node(item, ("nodes", i), ck, network, hardware, roles, seen, accounting)
        if node:
            nodes.append(node)
    controllers = sorted(r for r, prof in roles.items() if prof.facts.slurmctld)
    if not seen.heads and controllers:
        which = " or ".join(repr(r) for r in controllers)
        ck.add(("nodes",), f"no node has role {which}: SLURM needs exactly one controller")
    return tuple(nodes)


def _node(
    item: Any,
    p: tuple,
    ck: _Checker,
    network: Network | None,
    hardware: Hardware | None,
    roles: Mapping[str, Profile],
    seen: _Seen,
    accounting: str = "jobcomp",
) -> Node | None:
    if not isinstance(item, dict):
        ck.add(p, f"expected a mapping with hostname, role and ip, got {_type_name(item)}")
        return None
    ck.mapping(item, p, NODE_KEYS)
    missing = [k for k in ("hostname", "role", "ip") if item.get(k) is None]
    if missing:
        ck.add(p, f"missing {' and '.join(repr(k) for k in missing)}")
    host = _node_hostname(item, p, ck, seen)
    role = _node_role(item, p, ck, roles, seen)
    ip = _node_ip(item, p, ck, network, seen)
    hw = hardware
    if item.get("hardware") is not None:
        hw_map = ck.mapping(item["hardware"], p + ("hardware",), NODE_HARDWARE_KEYS)
        if hw_map and hardware is not None:
            hw = _hardware(hw_map, p + ("hardware",), ck, inherit=hardware)
    runs_jobs = ck.boolean(item, "runs_jobs", p)
    if role is None:
        return None
    profile = roles[role]
    if profile.facts.slurmd and runs_jobs is False:
        ck.add(p + ("runs_jobs",), f"a {role} node always runs jobs; give it another role instead")
    runs_jobs = profile.facts.slurmd if runs_jobs is None else runs_jobs
    if host and ip and hw:
        facts = effective(profile, runs_jobs, accounting).facts
        return Node(host, role, ip, hw, runs_jobs, facts)
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
    item: dict, p: tuple, ck: _Checker, roles: Mapping[str, Profile], seen: _Seen
) -> str | None:
    role = ck.text(item, "role", p)
    if role is None:
        return None
    if role not in roles:
        names = sorted(roles)
        msg = unknown("role", role, names)
        if "did you mean" in msg:
            msg += f"; known roles: {', '.join(names)}"
        ck.add(p + ("role",), msg + " — a role needs node-profiles/<role>.yaml")
        return None
    if roles[role].facts.slurmctld:
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
    roles: Mapping[str, Profile],
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
    apt = AptSettings(**{k: ck.url(apt_map, k, ("apt",)) for k in sorted(APT_KEYS)})
    shared = _shared(top, ck)
    cluster_user = _cluster_user(top, ck, admin, shared)
    stages = _stages(top, ck, base_dir, home)
    accounting = _accounting(top, ck)
    nodes = _nodes(top, ck, network, hardware, roles, accounting)
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
        roles=roles,
        accounting=accounting,
    )
