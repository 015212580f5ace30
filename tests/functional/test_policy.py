"""Egress policy (contract §2.12, §5.3) through sprites-py, on the test's fake internet.

A denied name is REFUSED by Wisp's resolver; an allowed name's addresses are reachable;
any other address is not, however the sprite got it; a change applies at once and cuts
live connections; the policy lives on the sprite's disk (restore rewinds it, fork copies
it) and is readable, not writable, at /.sprite/policy/network.json.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from sprites import NetworkPolicy, PolicyRule, SpritesClient
from sprites.exceptions import SpriteError

from tests.framework.internet import Internet, curl, lookup, sh
from tests.framework.internet import curl_ip as fetch
from tests.framework.server import WispServer

PORT = Internet.PORT
pytestmark = pytest.mark.debian

def _policy(*rules: tuple[str, str] | str) -> NetworkPolicy:
    return NetworkPolicy(rules=[PolicyRule(include=r) if isinstance(r, str) else
                                PolicyRule(domain=r[0], action=r[1]) for r in rules])


def test_allowed_name_reachable_denied_refused_raw_ip_dropped(
        policy_client: SpritesClient, internet: Internet) -> None:
    s = policy_client.create_sprite("pol-basic")
    try:
        assert s.get_network_policy().rules == []
        # open egress before: by name and by any public address
        assert curl(s, f"http://other.test:{PORT}/").startswith(f"hello from {internet.OTHER}")
        assert fetch(s, internet.API).startswith("hello")
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
        policy_client.delete_sprite("pol-basic")


def test_wildcards_and_precedence(policy_client: SpritesClient, internet: Internet) -> None:
    """Exact beats `*.suffix` beats `*`; `*.suffix` does not cover the suffix itself; with
    no `*` rule an unmatched name is denied."""
    s = policy_client.create_sprite("pol-wild")
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
        policy_client.delete_sprite("pol-wild")


def test_include_defaults(policy_client: SpritesClient, internet: Internet) -> None:
    """The `defaults` preset allows package registries such as PyPI (pypi.org is served
    by the fake internet), and nothing outside it."""
    s = policy_client.create_sprite("pol-defaults")
    try:
        s.update_network_policy(_policy("defaults"))
        assert s.get_network_policy().rules[0].include == "defaults"
        assert curl(s, f"http://pypi.org:{PORT}/").startswith(f"hello from {internet.PYPI}")
        assert lookup(s, "web.test") == "REFUSED"
        s.update_network_policy(_policy("defaults", ("pypi.org", "deny")))
        assert lookup(s, "pypi.org") == "REFUSED"
    finally:
        policy_client.delete_sprite("pol-defaults")


def test_change_cuts_live_connection(policy_client: SpritesClient, internet: Internet) -> None:
    """A connection open to an address the new policy no longer allows ends when the
    change is made, without a restart; one to a still-allowed address goes on."""
    s = policy_client.create_sprite("pol-cut")
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
        policy_client.delete_sprite("pol-cut")


def test_restore_rewinds_and_fork_copies_policy(policy_client: SpritesClient,
                                                internet: Internet) -> None:
    s = policy_client.create_sprite("pol-rs")
    try:
        s.update_network_policy(_policy(("web.test", "allow")))
        list(s.create_checkpoint("web only"))
        s.update_network_policy(_policy(("other.test", "allow")))
        fork = httpx.post(f"{policy_client.base_url}/v1/sprites/pol-rs/fork",
                          headers={"Authorization": f"Bearer {policy_client.token}"},
                          json={"name": "pol-fork"}, timeout=60)
        assert fork.status_code in (200, 201), fork.text
        f = policy_client.sprite("pol-fork")
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
            policy_client.delete_sprite(name)
    # their allow sets, chains and map entries went with them
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                            check=True).stdout.split()
    for table in [t for t in tables if t.startswith("wisp_")]:
        text = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True,
                              text=True, check=True).stdout
        assert not re.search(r"(allow|sprite)_\d", text), text


@pytest.fixture(scope="module")
def bad_target(policy_client: SpritesClient) -> Iterator[str]:
    policy_client.create_sprite("pol-bad")
    yield "pol-bad"
    policy_client.delete_sprite("pol-bad")


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
def test_bad_policy_is_400(policy_server: WispServer, bad_target: str, body: object) -> None:
    r = httpx.post(f"{policy_server.url}/v1/sprites/pol-bad/policy/network", json=body,
                   headers={"Authorization": f"Bearer {policy_server.token}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and r.json()["message"]


def test_null_rules_and_unknown_sprite(policy_server: WispServer,
                                       policy_client: SpritesClient) -> None:
    auth = {"Authorization": f"Bearer {policy_server.token}"}
    r = httpx.post(f"{policy_server.url}/v1/sprites/pol-none/policy/network",
                   json={"rules": []}, headers=auth, timeout=30)
    assert r.status_code == 404 and r.json()["error"] == "sprite_not_found"
    s = policy_client.create_sprite("pol-null")
    try:
        s.update_network_policy(_policy(("web.test", "allow")))
        r = httpx.post(f"{policy_server.url}/v1/sprites/pol-null/policy/network",
                       json={"rules": None}, headers=auth, timeout=30)
        assert r.status_code == 204
        assert s.get_network_policy().rules == []
        with pytest.raises(SpriteError, match="400"):
            s.update_network_policy(_policy(("", "allow")))
    finally:
        policy_client.delete_sprite("pol-null")
