"""The defaults of cluster.yaml's optional keys, the embedded default cluster and the commented
cluster.yaml `piimage init` writes (the same text: one source for both)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from ipaddress import IPv4Network

from .boards import HARDWARE_MODELS

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
  mirror: null                        # Debian's archive, e.g. http://mirror.example/debian
  security_mirror: null               # Debian's security archive (…/debian-security)
  raspberrypi_mirror: null            # Raspberry Pi's archive (archive.raspberrypi.com/debian)
  proxy: null

shared:                               # exported by the head over NFS, mounted on every node
  path: {DEFAULT_SHARED_PATH}
  device_uuid: null                   # a USB drive's filesystem UUID (lsblk -f), or null

cluster_user:                         # runs MPI jobs; the same UID on every node, home in shared
  name: {DEFAULT_CLUSTER_USER[0]}
  uid: {DEFAULT_CLUSTER_USER[1]}

accounting: jobcomp                   # job history: jobcomp (a log on the head) or slurmdbd
                                      # (slurmdbd + MariaDB on the head: sacct, sreport)

stages: []                            # stage directories of your own, e.g. [my-stages]

# One head (SLURM controller, NFS server, time server) and compute nodes. A node may override
# the model (hardware: {{model: pi5-8gb}}) and, for a board that reports less memory than its
# model, SLURM's RealMemory in MiB (hardware: {{model: pi4-4gb, real_memory: 3600}}); a head
# that should also run jobs: runs_jobs: true.
nodes:
{nodes}"""


def _yaml_text(value: str) -> str:
    """`value` as a YAML scalar: plain when that reads back the same, else double-quoted."""
    if re.fullmatch(r"[A-Za-z0-9~./][A-Za-z0-9 ~./@+=_-]*", value) and not value.endswith(" "):
        return value
    return json.dumps(value)  # a JSON string is a valid YAML double-quoted scalar
