"""Egress: a sprite reaches the (fake) internet through the uplink Wisp is given; its
network lives as long as it does (restore keeps it, delete and a killed server's next
start remove it). What a sprite must not reach is in tests/security/test_network.py.

No packet leaves the machine: the only uplink is the test's own (tests/framework/internet.py),
and its guard counter of packets that tried another way out must read 0 at the end.
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

from dnslib import DNSRecord
from sprites import SpritesClient

from tests.framework.internet import Internet, address, fetch, gateway, host_veth, sh
from tests.framework.leaks import leaks
from tests.framework.server import WispServer

PORT = Internet.PORT


def test_sprite_reaches_internet_through_nat(net_client: SpritesClient,
                                             internet: Internet) -> None:
    """A sprite fetches from hosts beyond the uplink, seen there as the uplink's address
    (masquerade); its own address comes from the server's subnet."""
    s = net_client.create_sprite("net-out")
    try:
        body = fetch(s, internet.GATEWAY)
        assert body == f"hello from {internet.GATEWAY} to {internet.UPLINK_ADDR}\n"
        assert fetch(s, internet.PUBLIC).startswith(
            f"hello from {internet.PUBLIC}")
        assert address(s).startswith("10.")
    finally:
        net_client.delete_sprite("net-out")


def test_names_resolve_through_wisp(net_client: SpritesClient, internet: Internet) -> None:
    """The sprite's resolv.conf names its gateway; names of the test zone resolve (CNAME
    chains too, over UDP and TCP), and a query sent to any other resolver is answered by
    Wisp's all the same (it never leaves: the guard counts it otherwise)."""
    s = net_client.create_sprite("net-dns")
    try:
        conf = sh(s, "cat /etc/resolv.conf")
        assert f"nameserver {gateway(s)}" in conf
        assert internet.PUBLIC in sh(s, "nslookup web.test")
        assert internet.PUBLIC in sh(s, "nslookup www.web.test")
        assert "NXDOMAIN" in sh(s, "nslookup nothing.test 2>&1; true")
        # 192.0.2.53 and 8.8.8.8 are routed nowhere here: only the redirect answers
        assert internet.PUBLIC in sh(s, "nslookup web.test 8.8.8.8")
        assert fetch(s, internet.PUBLIC).startswith("hello")
        # over TCP (busybox has no TCP client for DNS: the query's bytes go through nc)
        query = DNSRecord.question("www.web.test").pack()
        framed = struct.pack("!H", len(query)) + query
        octal = "".join(f"\\{b:03o}" for b in framed)
        out = sh(s, f"printf '{octal}' | timeout 5 nc -w 2 {gateway(s)} 53 | od -An -v -tx1")
        data = bytes.fromhex("".join(out.split()))
        reply = DNSRecord.parse(data[2:2 + struct.unpack("!H", data[:2])[0]])
        assert internet.PUBLIC in [str(rr.rdata) for rr in reply.rr]
    finally:
        net_client.delete_sprite("net-dns")


def test_restore_keeps_network_and_delete_removes_it(net_client: SpritesClient,
                                                     net_server: WispServer,
                                                     internet: Internet) -> None:
    """A restore keeps the sprite's address and egress; a delete removes its veth and
    namespace from the host."""
    s = net_client.create_sprite("net-rs")
    before = address(s)
    list(s.create_checkpoint("net"))
    list(s.restore_checkpoint("v1"))
    assert address(s) == before
    assert fetch(s, internet.PUBLIC).startswith("hello")
    veth = host_veth(s)
    assert veth is not None, "the sprite's veth is not on the host"
    net_client.delete_sprite("net-rs")
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], check=True,
                                      capture_output=True, text=True).stdout)
    assert veth not in {i["ifname"] for i in links}


def test_sigkill_then_start_leaves_no_network(leak_check: Path, internet: Internet) -> None:
    """A server killed with SIGKILL leaves its sprite's veth and its table behind; the next
    start removes them, the sprite gets a new veth and egress again, and a stop leaves no
    veth and no table."""
    srv = WispServer(leak_check / "network-kill", extra_env={
        "WISP_UPLINK": internet.uplink, "WISP_DNS_UPSTREAM": internet.GATEWAY})
    srv.start()
    try:
        c = SpritesClient(srv.token, base_url=srv.url)
        s = c.create_sprite("net-kill")
        old = host_veth(s)
        assert old is not None
        old_index = Path("/sys/class/net", old, "ifindex").read_text()
        srv.kill()
        assert Path("/sys/class/net", old).exists()  # what the kill left
        srv.start()
        c = SpritesClient(srv.token, base_url=srv.url)
        s = c.sprite("net-kill")
        assert fetch(s, internet.PUBLIC).startswith("hello")
        new = host_veth(s)
        assert new is not None
        assert Path("/sys/class/net", new, "ifindex").read_text() != old_index
    finally:
        srv.stop()
    found = leaks(srv.data_dir)
    assert found["veths"] == [] and found["nftables tables"] == [], found
