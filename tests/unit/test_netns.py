"""The laptop's side of the rehearsal's network: real namespaces, TAP devices and the hub (root
only; skipped elsewhere). Two laptops on one hub reach each other, and nothing is left."""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from types import SimpleNamespace as NS

import pytest

from piimage.errors import UserError
from piimage.rehearse.hub import Hub
from piimage.rehearse.netns import Laptop, laptop_address

SERVER = """
import socket
s = socket.create_server(("10.0.0.201", 2222))
print("listening", flush=True)
c, (peer, _) = s.accept()
c.sendall(f"hello from {peer}\\n".encode())
c.close()
"""
CLIENT = """
import socket
c = socket.create_connection(("10.0.0.201", 2222), timeout=10)
print(c.makefile().readline(), end="")
"""


def _cluster(subnet="10.0.0.0/24", nodes=("10.0.0.10", "10.0.0.11"), dns=("10.0.0.1",)):
    return NS(
        network=NS(
            subnet=IPv4Network(subnet),
            gateway=IPv4Address("10.0.0.1") if subnet.startswith("10.0.0.") else None,
            dns=tuple(IPv4Address(d) for d in dns),
            prefixlen=IPv4Network(subnet).prefixlen,
        ),
        nodes=[NS(ip=IPv4Address(ip)) for ip in nodes],
    )


def test_the_laptop_takes_the_highest_free_address():
    assert laptop_address(_cluster()) == IPv4Address("10.0.0.254")
    c = _cluster(nodes=("10.0.0.254", "10.0.0.10"), dns=("10.0.0.253",))
    assert laptop_address(c) == IPv4Address("10.0.0.252")


def test_a_full_subnet_is_a_clear_error():
    c = _cluster(subnet="10.0.0.0/30", nodes=("10.0.0.2",), dns=())
    with pytest.raises(UserError, match="no free address"):
        laptop_address(c)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root")
def test_two_laptops_on_one_hub_reach_each_other_and_leave_nothing():
    name = f"piimage-test-{os.getpid()}"
    c = _cluster()
    with (
        Hub() as hub,
        Laptop(c, hub.port, name=f"{name}-a", address=IPv4Address("10.0.0.200")) as a,
        Laptop(c, hub.port, name=f"{name}-b", address=IPv4Address("10.0.0.201")) as b,
    ):
        # a TCP server on b's side, a client on a's: ARP and TCP both ways through the hub
        server = subprocess.Popen(
            [*b.exec_prefix(), sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True
        )
        try:
            assert server.stdout is not None and server.stdout.readline() == "listening\n"
            client = subprocess.run(
                [*a.exec_prefix(), sys.executable, "-c", CLIENT],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert client.stdout == "hello from 10.0.0.200\n", client.stderr
        finally:
            server.kill()
            server.wait()
        # the namespace has nothing but the TAP and lo: no route anywhere else
        routes = subprocess.run(
            [*a.exec_prefix(), "ip", "-4", "route"], capture_output=True, text=True
        ).stdout
        assert routes.strip() == "10.0.0.0/24 dev laptop0 proto kernel scope link src 10.0.0.200"
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in left
    assert "laptop0" not in subprocess.run(["ip", "link"], capture_output=True, text=True).stdout
