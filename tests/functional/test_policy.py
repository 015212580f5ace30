"""Egress policy (contract §2.12, §5.3) through sprites-py, on the test's fake internet.

A denied name is REFUSED by Wisp's resolver; an allowed name's addresses are reachable;
any other address is not, however the sprite got it; a change applies at once and cuts
live connections; the policy lives on the sprite's disk (restore rewinds it, fork copies
it) and is readable, not writable, at /.sprite/policy/network.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sprites import NetworkPolicy, PolicyRule, SpritesClient
from sprites.exceptions import SpriteError

from tests.framework.internet import Internet, sh
from tests.framework.server import WispServer

PORT = Internet.PORT
pytestmark = pytest.mark.debian

#: The rcode of a lookup of argv[1] (any resolver in argv[2], else resolv.conf's), and
#: with NOERROR its first address (through the C library, as programs resolve).
DIG = r"""
import socket, struct, sys
name = sys.argv[1]
server = sys.argv[2] if len(sys.argv) > 2 else open("/etc/resolv.conf").read().split()[1]
q = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!2H", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(q, (server, 53)); rcode = s.recv(4096)[3] & 15
if rcode:
    print({3: "NXDOMAIN", 5: "REFUSED", 2: "SERVFAIL"}.get(rcode, rcode))
else:
    print(socket.gethostbyname(name))
"""


@pytest.fixture(scope="module")
def net_server(leak_check: Path, internet: Internet) -> Iterator[WispServer]:
    """This module's own server: the Debian image (curl, python3) on the fake internet."""
    srv = WispServer(leak_check / "policy", image="debian",
                     extra_env={"WISP_UPLINK": internet.uplink,
                                "WISP_DNS_UPSTREAM": internet.GATEWAY})
    srv.start()
    yield srv
    srv.stop()


def fetch(sprite, addr: str) -> str:  # type: ignore[no-untyped-def]
    """GET / of a test host by address: its body, or "FAILED\n"."""
    out = curl(sprite, f"http://{addr}:{PORT}/")
    return "FAILED\n" if out.startswith("exit ") else out


def _policy(*rules: tuple[str, str] | str) -> NetworkPolicy:
    return NetworkPolicy(rules=[PolicyRule(include=r) if isinstance(r, str) else
                                PolicyRule(domain=r[0], action=r[1]) for r in rules])


def lookup(sprite, name: str, server: str = "") -> str:  # type: ignore[no-untyped-def]
    """The address `name` resolves to in the sprite, or REFUSED / NXDOMAIN / SERVFAIL."""
    return sh(sprite, f"python3 -c '{DIG}' {name} {server} 2>&1").strip()


def curl(sprite, url: str) -> str:  # type: ignore[no-untyped-def]
    """The body, or `exit N` (6: name not resolved, 7: refused/reset, 28: timed out)."""
    out = sh(sprite, f"curl -sS --connect-timeout 2 -m 4 {url} 2>/dev/null; echo \"exit $?\"")
    body, _, code = out.rpartition("exit ")
    return body if code.strip() == "0" else f"exit {code.strip()}"


def test_allowed_name_reachable_denied_refused_raw_ip_dropped(
        net_client: SpritesClient, internet: Internet) -> None:
    s = net_client.create_sprite("pol-basic")
    try:
        assert s.get_network_policy().rules == []
        assert fetch(s, internet.OTHER).startswith("hello")  # open egress before
        s.update_network_policy(_policy(("web.test", "allow")))
        assert [(r.domain, r.action) for r in s.get_network_policy().rules] == \
            [("web.test", "allow")]
        assert lookup(s, "web.test") == internet.PUBLIC
        assert curl(s, f"http://web.test:{PORT}/").startswith(f"hello from {internet.PUBLIC}")
        # the address an allowed lookup gave is reachable by IP too
        assert fetch(s, internet.PUBLIC).startswith("hello")
        assert lookup(s, "other.test") == "REFUSED"
        assert curl(s, f"http://other.test:{PORT}/") == "exit 6"
        # a raw IP nobody looked up (other.test's), and the fake internet's DNS server's
        assert fetch(s, internet.OTHER) == "FAILED\n"
        assert fetch(s, internet.GATEWAY) == "FAILED\n"
        # asking another resolver changes nothing: it is Wisp's that answers
        assert lookup(s, "other.test", "8.8.8.8") == "REFUSED"
        # allowed by name, but private: still never reachable
        s.update_network_policy(_policy(("web.test", "allow"), ("private.test", "allow")))
        assert lookup(s, "private.test") == internet.PRIVATE
        assert fetch(s, internet.PRIVATE) == "FAILED\n"
        # no rules: open again, raw IPs included
        s.update_network_policy(_policy())
        assert fetch(s, internet.OTHER).startswith("hello")
        assert lookup(s, "other.test") == internet.OTHER
    finally:
        net_client.delete_sprite("pol-basic")


def test_wildcards_and_precedence(net_client: SpritesClient, internet: Internet) -> None:
    """Exact beats `*.suffix` beats `*`; `*.suffix` does not cover the suffix itself; with
    no `*` rule an unmatched name is denied."""
    s = net_client.create_sprite("pol-wild")
    try:
        s.update_network_policy(_policy(("*.web.test", "allow"), ("api.web.test", "deny")))
        assert lookup(s, "www.web.test") == internet.PUBLIC  # CNAME to web.test
        assert curl(s, f"http://www.web.test:{PORT}/").startswith("hello")
        assert lookup(s, "api.web.test") == "REFUSED"
        assert lookup(s, "web.test") == "REFUSED"
        assert lookup(s, "other.test") == "REFUSED"
        assert fetch(s, internet.API) == "FAILED\n"
        s.update_network_policy(_policy(("*", "allow"), ("other.test", "deny"),
                                        ("*.web.test", "deny"), ("api.web.test", "allow")))
        assert lookup(s, "web.test") == internet.PUBLIC
        assert lookup(s, "other.test") == "REFUSED"
        assert lookup(s, "www.web.test") == "REFUSED"
        assert lookup(s, "api.web.test") == internet.API
        assert curl(s, f"http://api.web.test:{PORT}/").startswith(f"hello from {internet.API}")
        assert fetch(s, internet.OTHER) == "FAILED\n"
    finally:
        net_client.delete_sprite("pol-wild")


def test_include_defaults(net_client: SpritesClient, internet: Internet) -> None:
    """The `defaults` preset allows package registries such as PyPI (pypi.org is served
    by the fake internet), and nothing outside it."""
    s = net_client.create_sprite("pol-defaults")
    try:
        s.update_network_policy(_policy("defaults"))
        assert s.get_network_policy().rules[0].include == "defaults"
        assert curl(s, f"http://pypi.org:{PORT}/").startswith(f"hello from {internet.PYPI}")
        assert lookup(s, "web.test") == "REFUSED"
        s.update_network_policy(_policy("defaults", ("pypi.org", "deny")))
        assert lookup(s, "pypi.org") == "REFUSED"
    finally:
        net_client.delete_sprite("pol-defaults")


def test_change_cuts_live_connection(net_client: SpritesClient, internet: Internet) -> None:
    """A connection open to an address the new policy no longer allows ends when the
    change is made, without a restart; one to a still-allowed address goes on."""
    s = net_client.create_sprite("pol-cut")
    try:
        s.update_network_policy(_policy(("web.test", "allow"), ("api.web.test", "allow")))
        for name, host in (("web", "web.test"), ("api", "api.web.test")):
            sh(s, f"setsid sh -c 'curl -sSN http://{host}:{PORT}/drip "
                  f"> /tmp/{name}.out 2>&1; echo \"exit $?\" >> /tmp/{name}.out' "
                  "</dev/null >/dev/null 2>&1 &")
        deadline = time.monotonic() + 10
        while sh(s, "grep -l '^drip 3$' /tmp/web.out /tmp/api.out 2>/dev/null; true"
                 ).count(".out") < 2:
            assert time.monotonic() < deadline, sh(s, "cat /tmp/*.out")
            time.sleep(0.2)
        s.update_network_policy(_policy(("api.web.test", "allow")))
        deadline = time.monotonic() + 5
        while "exit" not in sh(s, "cat /tmp/web.out"):
            assert time.monotonic() < deadline, "the denied connection is still open"
            time.sleep(0.1)
        assert "exit 0" not in sh(s, "cat /tmp/web.out")
        before = sh(s, "grep -c drip /tmp/api.out").strip()
        time.sleep(0.5)
        api = sh(s, "cat /tmp/api.out")
        assert "exit" not in api and int(api.count("drip")) > int(before), api
        assert fetch(s, internet.PUBLIC) == "FAILED\n"
    finally:
        net_client.delete_sprite("pol-cut")


def test_restore_rewinds_and_fork_copies_policy(net_client: SpritesClient,
                                                internet: Internet) -> None:
    s = net_client.create_sprite("pol-rs")
    try:
        s.update_network_policy(_policy(("web.test", "allow")))
        list(s.create_checkpoint("web only"))
        s.update_network_policy(_policy(("other.test", "allow")))
        fork = httpx.post(f"{net_client.base_url}/v1/sprites/pol-rs/fork",
                          headers={"Authorization": f"Bearer {net_client.token}"},
                          json={"name": "pol-fork"}, timeout=60)
        assert fork.status_code in (200, 201), fork.text
        f = net_client.sprite("pol-fork")
        assert [r.domain for r in f.get_network_policy().rules] == ["other.test"]
        assert lookup(f, "other.test") == internet.OTHER
        assert lookup(f, "web.test") == "REFUSED"
        list(s.restore_checkpoint("v1"))
        assert [r.domain for r in s.get_network_policy().rules] == ["web.test"]
        assert lookup(s, "web.test") == internet.PUBLIC
        assert lookup(s, "other.test") == "REFUSED"
        assert fetch(s, internet.OTHER) == "FAILED\n"
        inside = json.loads(sh(s, "cat /.sprite/policy/network.json"))
        assert inside == {"rules": [{"domain": "web.test", "action": "allow"}]}
    finally:
        for name in ("pol-fork", "pol-rs"):
            net_client.delete_sprite(name)


@pytest.fixture(scope="module")
def bad_target(net_client: SpritesClient) -> Iterator[str]:
    net_client.create_sprite("pol-bad")
    yield "pol-bad"
    net_client.delete_sprite("pol-bad")


@pytest.mark.parametrize("body", [
    {}, {"rules": "x"}, {"rules": [{"domain": "a.test"}]},
    {"rules": [{"domain": "a.test", "action": "maybe"}]},
    {"rules": [{"domain": "a..test", "action": "allow"}]},
    {"rules": [{"domain": "*a.test", "action": "allow"}]},
    {"rules": [{"domain": "a.*.test", "action": "allow"}]},
    {"rules": [{"include": "everything"}]},
    {"rules": [{"include": "defaults", "domain": "a.test"}]},
    {"rules": [{"domain": "a.test", "action": "allow", "port": 443}]},
    {"rules": [17]},
])
def test_bad_policy_is_400(net_server: WispServer, bad_target: str, body: object) -> None:
    r = httpx.post(f"{net_server.url}/v1/sprites/pol-bad/policy/network", json=body,
                   headers={"Authorization": f"Bearer {net_server.token}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and r.json()["message"]


def test_null_rules_and_unknown_sprite(net_server: WispServer,
                                       net_client: SpritesClient) -> None:
    auth = {"Authorization": f"Bearer {net_server.token}"}
    r = httpx.post(f"{net_server.url}/v1/sprites/pol-none/policy/network",
                   json={"rules": []}, headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"] == "sprite_not_found"
    s = net_client.create_sprite("pol-null")
    try:
        s.update_network_policy(_policy(("web.test", "allow")))
        r = httpx.post(f"{net_server.url}/v1/sprites/pol-null/policy/network",
                       json={"rules": None}, headers=auth, timeout=30)
        assert r.status_code == 204
        assert s.get_network_policy().rules == []
        with pytest.raises(SpriteError, match="400"):
            s.update_network_policy(_policy(("", "allow")))
    finally:
        net_client.delete_sprite("pol-null")
