"""A laptop on the rehearsal's virtual Ethernet: a network namespace of its own, with one TAP
device whose frames this process relays to and from the hub. A program run in it (`ip netns
exec <name> piimage verify`) reaches the virtual nodes at their inventory addresses, over SSH,
exactly as a laptop on the cluster's switch reaches the real boards; the namespace has no
other interface, so nothing in it reaches any other network, and nothing outside reaches it.

Made with the kernel's TUN driver and iproute2 (root only): the TAP is created here, so this
process holds its file descriptor, then moved into the namespace, which it stays attached
through."""

from __future__ import annotations

import fcntl
import os
import selectors
import socket
import struct
import subprocess
import threading
from ipaddress import IPv4Address

from ..errors import UserError
from ..inventory import Cluster

TUNSETIFF = 0x400454CA  # linux/if_tun.h: _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
TAP_NAME = "laptop0"


def laptop_address(cluster: Cluster) -> IPv4Address:
    """The highest address of the cluster's subnet that no node, gateway or DNS server has."""
    net = cluster.network
    taken = {n.ip for n in cluster.nodes} | {net.gateway, *net.dns}
    for ip in reversed(list(net.subnet.hosts())):
        if ip not in taken:
            return ip
    raise UserError(f"network.subnet {net.subnet} has no free address for the laptop's side")


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise UserError(f"ip {' '.join(args)}: {p.stderr.strip()}")


class Laptop:
    """`with Laptop(cluster, hub_port) as lap:` the namespace lap.name exists and is wired to the
    hub at lap.address until the block ends (then both are gone)."""

    def __init__(
        self,
        cluster: Cluster,
        hub_port: int,
        name: str | None = None,
        address: IPv4Address | None = None,
    ):
        self.cluster = cluster
        self.hub_port = hub_port
        self.name = name or f"piimage-laptop-{os.getpid()}"
        self.address = address or laptop_address(cluster)
        self._fd = -1
        self._sock: socket.socket | None = None
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None

    # -- set-up and teardown --------------------------------------------------------------------
    def __enter__(self) -> Laptop:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        if os.geteuid() != 0:
            raise UserError("a laptop namespace on the rehearsal's network needs root")
        _ip("netns", "add", self.name)
        self._fd = os.open("/dev/net/tun", os.O_RDWR)
        ifr = struct.pack("16sH22x", TAP_NAME.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(self._fd, TUNSETIFF, ifr)
        _ip("link", "set", TAP_NAME, "netns", self.name)
        prefix = self.cluster.network.prefixlen
        _ip("-n", self.name, "addr", "add", f"{self.address}/{prefix}", "dev", TAP_NAME)
        _ip("-n", self.name, "link", "set", TAP_NAME, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        self._sock = socket.create_connection(("127.0.0.1", self.hub_port), timeout=10)
        self._sock.setblocking(True)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._relay, name="laptop-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._stop_r, self._stop_w, self._fd):
            if fd >= 0:
                os.close(fd)
        self._stop_r = self._stop_w = self._fd = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def exec_prefix(self) -> list[str]:
        """The command prefix that runs a program on the laptop's side."""
        return ["ip", "netns", "exec", self.name]

    # -- the relay ------------------------------------------------------------------------------
    def _relay(self) -> None:
        """Frames from the TAP to the hub (4-byte big-endian length, the frame: QEMU's socket
        netdev framing, which the hub speaks) and back, until close()."""
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._fd, selectors.EVENT_READ, "tap")
        sel.register(self._sock, selectors.EVENT_READ, "hub")
        sel.register(self._stop_r, selectors.EVENT_READ, "stop")
        buf = bytearray()
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "stop":
                        return
                    if key.data == "tap":
                        frame = os.read(self._fd, 65536)
                        self._sock.sendall(struct.pack(">I", len(frame)) + frame)
                        continue
                    data = self._sock.recv(262144)
                    if not data:
                        return  # the hub is gone: the rehearsal ended
                    buf.extend(data)
                    while len(buf) >= 4:
                        (n,) = struct.unpack(">I", buf[:4])
                        if len(buf) < 4 + n:
                            break
                        os.write(self._fd, bytes(buf[4 : 4 + n]))
                        del buf[: 4 + n]
        except OSError:
            return
        finally:
            sel.close()
