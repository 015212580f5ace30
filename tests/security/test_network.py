"""Network isolation, tried from inside a sprite: the host, the Wisp API, other sprites,
private and metadata addresses and IPv6 are out of reach, and the sprite cannot change its
own network to get around that. The targets exist and answer (each test checks that from
the host): only Wisp's rules stop the sprite."""

from __future__ import annotations

import socket
import threading

from sprites import SpritesClient

from tests.framework.internet import Internet, address, fetch, gateway, sh
from tests.framework.server import WispServer

PORT = Internet.PORT




def test_private_and_metadata_addresses_blocked(net_client: SpritesClient,
                                               internet: Internet) -> None:
    """10.99.0.1 and 169.254.169.254 answer on the fake internet (routed there like any
    public address), but a sprite never reaches them; a public address in the same test
    still works."""
    s = net_client.create_sprite("net-private")
    try:
        assert fetch(s, internet.PUBLIC).startswith("hello")
        assert fetch(s, internet.PRIVATE) == "FAILED\n"
        assert fetch(s, internet.METADATA) == "FAILED\n"
    finally:
        net_client.delete_sprite("net-private")
    # the host itself reaches both: only the sprite's rules stopped them
    for addr in (internet.PRIVATE, internet.METADATA):
        with socket.create_connection((addr, PORT), timeout=2):
            pass


def test_host_services_unreachable(net_client: SpritesClient, net_server: WispServer,
                                   internet: Internet) -> None:
    """A service listening on every host address (and the Wisp API's port) cannot be
    reached from a sprite: not at its gateway, not at the uplink's address."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    accepted: list[object] = []
    threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True).start()
    s = net_client.create_sprite("net-host")
    try:
        gw = gateway(s)
        for addr in (gw, internet.UPLINK_ADDR):
            for p in (port, net_server.port):
                # -e true: exit 0 as soon as a connection is made
                out = sh(s, f"timeout 5 nc -w 2 {addr} {p} -e true && echo CONNECTED "
                            "|| echo FAILED")
                assert out.strip() == "FAILED", (addr, p, out)
        assert accepted == []
        # the listener works: the host reaches it through the same address
        with socket.create_connection((gw, port), timeout=2):
            pass
    finally:
        net_client.delete_sprite("net-host")
        listener.close()


def test_sprites_cannot_reach_each_other(net_client: SpritesClient) -> None:
    """A sprite listening on its address is reachable from itself, never from another."""
    a, b = net_client.create_sprite("net-a"), net_client.create_sprite("net-b")
    try:
        addr_b = address(b)
        assert address(a) != addr_b
        b.command("sh", "-c", "nc -l -p 9000 -e echo hi >/dev/null 2>&1 &").output()
        out = sh(a, f"timeout 5 nc -w 2 {addr_b} 9000 </dev/null || echo FAILED")
        assert "hi" not in out and "FAILED" in out
        assert "hi" in sh(b, f"timeout 5 nc -w 2 {addr_b} 9000 </dev/null || echo FAILED")
    finally:
        net_client.delete_sprite("net-a")
        net_client.delete_sprite("net-b")


def test_no_ipv6_way_out(net_client: SpritesClient) -> None:
    """IPv6 is off: the sprite has no global IPv6 address and no IPv6 route out."""
    s = net_client.create_sprite("net-v6")
    try:
        assert "global" not in sh(s, "ip -6 addr show 2>/dev/null; true")
        assert sh(s, "ip -6 route show default 2>/dev/null; true").strip() == ""
    finally:
        net_client.delete_sprite("net-v6")


def test_sprite_cannot_reconfigure_its_network(net_client: SpritesClient) -> None:
    """Root in the sprite holds no capability in its network namespace (owned by the
    host's user namespace): no new address (a spoofed source), no route, no link change,
    no raw socket."""
    s = net_client.create_sprite("net-caps")
    try:
        for cmd in ("ip addr add 10.213.9.9/32 dev eth0", "ip route add 1.2.3.0/24 dev eth0",
                    "ip link set eth0 down", "ip link add d0 type dummy"):
            out = sh(s, f"{cmd} 2>&1; echo rc=$?")
            assert "rc=0" not in out, (cmd, out)
        out = sh(s, "ping -c 1 -W 1 203.0.113.1 2>&1; echo rc=$?")
        assert "rc=0" not in out and "1 packets received" not in out
        assert address(s) in sh(s, "ip -4 -o addr show dev eth0")
    finally:
        net_client.delete_sprite("net-caps")
