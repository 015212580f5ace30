"""VM sprites on the network (docs/vm.md, "Network") and forks of their live memory, on real
QEMU (TCG here) and the test's fake internet (tests/framework/internet.py): the guest owns
the sprite's address, so egress, DNS, the egress policy, sprite URLs, the port proxy and
ports/watch work as for a container; a fork resumes its source's processes under its own
hostname, address, MAC and random stream.

No packet leaves the machine: the `internet` fixture's guard counter must read 0."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient
from sprites.types import NetworkPolicy, PolicyRule

from tests.framework.internet import Internet, address, fetch, gateway, sh
from tests.framework.ports import open_ws, proxy
from tests.framework.server import WispServer
from tests.framework.urls import host, url_get
from tests.functional.test_vm import COUNTER

PORT = Internet.PORT


@pytest.fixture(scope="module")
def vm_net_server(leak_check: Path, internet: Internet) -> Iterator[WispServer]:
    cfg = leak_check / "vm-net.toml"
    cfg.write_text("[sprites]\nmemory_mb = 256\n")
    srv = WispServer(leak_check / "vm-net", config_file=cfg, extra_env={
        "WISP_RUNTIME": "vm", "WISP_UPLINK": internet.uplink,
        "WISP_DNS_UPSTREAM": internet.GATEWAY})
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def vm_net_client(vm_net_server: WispServer) -> Iterator[SpritesClient]:
    c = SpritesClient(vm_net_server.token, base_url=vm_net_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def box(vm_net_client: SpritesClient, vm_net_server: WispServer) -> Iterator[object]:
    s = vm_net_client.create_sprite("vmnet")
    yield s
    vm_net_client.delete_sprite("vmnet")


def _mac(sprite) -> str:  # type: ignore[no-untyped-def]
    m = re.search(r"link/ether ([0-9a-f:]{17})", sh(sprite, "ip -o link show dev eth0"))
    assert m
    return m.group(1)


def test_guest_owns_the_sprite_address(box, vm_net_server: WispServer,
                                       internet: Internet) -> None:
    """The guest's eth0 has the sprite's /31 and the MAC of the sprite namespace's veth
    end; it reaches the fake internet through NAT and resolves through Wisp's DNS."""
    sprite_ip = address(box)
    assert sprite_ip.startswith("10.")
    assert sh(box, "cat /etc/resolv.conf").startswith(f"nameserver {gateway(box)}\n")
    assert fetch(box, internet.PUBLIC) == \
        f"hello from {internet.PUBLIC} to {internet.UPLINK_ADDR}\n"
    assert internet.PUBLIC in sh(box, "nslookup web.test")
    uid = vm_net_server.api("GET", "/v1/sprites/vmnet").json()["id"].removeprefix(
        "sprite-")[:24]
    netns = next(n for n in os.listdir("/run/netns") if n.startswith("wisp-")
                 and n.endswith(uid))
    veth = json.loads(subprocess.run(["ip", "-n", netns, "-j", "addr", "show", "dev", "eth0"],
                                     capture_output=True, check=True).stdout)[0]
    assert veth["address"] == _mac(box)
    assert [a["local"] for a in veth["addr_info"] if a["family"] == "inet"] == [sprite_ip]


def test_sprite_cannot_reach_the_agent_link(box, internet: Internet) -> None:
    """The agent link's NIC stays in the guest's own namespace: the sprite has only lo and
    eth0, and neither the relay (10.0.2.15:7000, the sprite's own 127.0.0.1:7000) nor the
    user-mode network behind it (10.0.2.2) answers; the same probe reaches the fake internet
    (the control). (Port 53 of any address is Wisp's resolver: docs/network.md.)"""
    links = sh(box, "ip -o link show | cut -d: -f2 | tr -d ' '").split()
    assert sorted(links) == ["eth0", "lo"]
    assert "10.0.2." not in sh(box, "ip -o addr show")
    script = (f"nc -w 2 {internet.PUBLIC} {PORT} </dev/null >/dev/null 2>&1 && echo control-ok; "
              "for t in 10.0.2.15:7000 127.0.0.1:7000 10.0.2.2:7000 10.0.2.2:22; do "
              "nc -w 2 ${t%:*} ${t#*:} </dev/null >/dev/null 2>&1 && echo open $t; done; "
              "echo done")
    assert sh(box, script) == "control-ok\ndone\n"


def test_egress_policy_applies_to_a_vm(box, internet: Internet) -> None:
    """The policy is enforced on the host (the sprite's veth and Wisp's resolver): a VM
    sprite is held to it as a container is."""
    box.update_network_policy(NetworkPolicy(rules=[PolicyRule(domain="web.test",
                                                              action="allow")]))
    try:
        assert internet.PUBLIC in sh(box, "nslookup web.test")
        assert fetch(box, internet.PUBLIC).startswith("hello")
        assert fetch(box, internet.OTHER) == "FAILED\n"
        assert "REFUSED" in sh(box, "nslookup other.test 2>&1; true") or \
            internet.OTHER not in sh(box, "nslookup other.test 2>&1; true")
    finally:
        box.update_network_policy(NetworkPolicy(rules=[]))
    assert fetch(box, internet.OTHER).startswith("hello")


def test_url_proxy_and_ports_reach_the_guest_loopback(box, vm_net_server: WispServer
                                                      ) -> None:
    """A server bound to the guest sprite's 127.0.0.1 only: its sprite URL answers, the
    port proxy reaches it, and ports/watch lists it (all three dial and look inside the
    guest through the agent link)."""
    sh(box, "mkdir -p /tmp/www && echo 'hello from vm' > /tmp/www/index.html && "
            "setsid httpd -p 127.0.0.1:8080 -h /tmp/www </dev/null >/dev/null 2>&1 &")
    r = url_get(vm_net_server, host(vm_net_server, "vmnet"), "/index.html",
                token=vm_net_server.token)
    assert r.status_code == 200, r.text
    assert r.text == "hello from vm\n"
    ws, reply = proxy(vm_net_server, "vmnet", 8080)
    try:
        assert reply["status"] == "connected", reply
        ws.send(b"GET /index.html HTTP/1.0\r\n\r\n")
        got = b""
        while b"hello from vm" not in got:
            got += ws.recv(timeout=30)
    finally:
        ws.close()
    watch = open_ws(vm_net_server, "vmnet", "ports/watch")
    try:
        listing = json.loads(watch.recv(timeout=30))
    finally:
        watch.close()
    assert listing["type"] == "port_list"
    assert 8080 in [p["port"] for p in listing["ports"]], listing
    # nothing listens on 8081: the proxy says so, as for a container
    ws, reply = proxy(vm_net_server, "vmnet", 8081)
    ws.close()
    assert reply["status"] != "connected", reply
    sh(box, "pkill httpd; true")


def _count(sprite) -> int:  # type: ignore[no-untyped-def]
    return int(sh(sprite, "cat /dev/shm/count").strip())


def _wait_past(sprite, n: int) -> int:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (c := _count(sprite)) > n:
            return c
        time.sleep(0.2)
    raise AssertionError(f"the counter did not pass {n}")


def test_fork_resumes_live_memory_with_its_own_identity(
        box, vm_net_client: SpritesClient, vm_net_server: WispServer,
        internet: Internet) -> None:
    """A fork of a running VM sprite resumes its processes (the counter goes on from
    where the source was, same pid) under its own name, hostname, address and MAC; both
    reach the internet and diverge from then on. Two forks of one checkpoint's memory read
    different random bytes: each start reseeds the guest's RNG."""
    pid = int(sh(box, COUNTER).strip())
    at_fork = _wait_past(box, 3)
    r = vm_net_server.api("POST", "/v1/sprites/vmnet/fork", json={"name": "vmnet-kid"})
    assert r.status_code == 201, r.text
    kid = vm_net_client.sprite("vmnet-kid")
    try:
        counted = _count(kid)
        assert counted >= at_fork, (at_fork, counted)
        assert _wait_past(kid, counted) > counted
        assert sh(kid, f"cat /proc/{pid}/cmdline | tr '\\0' ' '").startswith("sh -c i=0")
        assert sh(kid, "hostname") == "vmnet-kid\n"
        assert sh(box, "hostname") == "vmnet\n"
        assert "vmnet-kid" in sh(kid, "cat /etc/hosts")
        assert address(kid) != address(box)
        assert _mac(kid) != _mac(box)
        assert sh(kid, "cat /etc/resolv.conf").startswith(f"nameserver {gateway(kid)}\n")
        for s in (kid, box):
            assert fetch(s, internet.PUBLIC).startswith("hello"), s.name
        sh(kid, "echo kid > /tmp/who")
        sh(box, "echo box > /tmp/who")
        assert (sh(kid, "cat /tmp/who"), sh(box, "cat /tmp/who")) == ("kid\n", "box\n")
        # two children of one memory snapshot
        list(box.create_checkpoint("for twins"))
        cp = box.list_checkpoints()[0].id
        twins = []
        for name in ("vmnet-t1", "vmnet-t2"):
            r = vm_net_server.api("POST", "/v1/sprites/vmnet/fork",
                                  json={"name": name, "checkpoint": cp})
            assert r.status_code == 201, r.text
            twins.append(vm_net_client.sprite(name))
        bytes_ = [sh(t, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'") for t in twins]
        assert len(bytes_[0]) == 64 and bytes_[0] != bytes_[1]
        assert len({address(t) for t in twins} | {address(box)}) == 3
        for t in twins:
            assert sh(t, "hostname") == f"{t.name}\n"
            assert _count(t) > 0  # the counter was running at the checkpoint: it goes on
    finally:
        for name in ("vmnet-kid", "vmnet-t1", "vmnet-t2"):
            vm_net_server.api("DELETE", f"/v1/sprites/{name}")
        sh(box, f"kill {pid}")
