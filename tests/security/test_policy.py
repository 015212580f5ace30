"""Egress policy, attacked from inside the sprite: root in the sprite cannot change or
escape its policy, and one sprite's lookups open nothing for another."""

from __future__ import annotations

import struct

import pytest
from sprites import NetworkPolicy, PolicyRule, SpritesClient

from tests.framework.internet import Internet, curl, curl_ip, lookup, sh

pytestmark = pytest.mark.debian


def _allow(*names: str) -> NetworkPolicy:
    return NetworkPolicy(rules=[PolicyRule(domain=n, action="allow") for n in names])


def test_root_in_sprite_cannot_change_its_policy(policy_client: SpritesClient,
                                                 internet: Internet) -> None:
    s = policy_client.create_sprite("polsec-ro")
    try:
        s.update_network_policy(_allow("web.test"))
        open_policy = '{"rules": []}'
        out = sh(s, f"echo '{open_policy}' | sudo tee /.sprite/policy/network.json 2>&1; "
                    "sudo rm -f /.sprite/policy/network.json 2>&1; "
                    "sudo mount -o remount,rw /.sprite 2>&1; sudo umount -l /.sprite 2>&1; "
                    "cat /.sprite/policy/network.json 2>&1; true")
        assert "Read-only file system" in out, out
        # whatever the sprite now sees at that path, the policy it lives under is unchanged
        assert [r.domain for r in s.get_network_policy().rules] == ["web.test"]
        assert lookup(s, "other.test") == "REFUSED"
        assert curl_ip(s, internet.OTHER) == "FAILED\n"
    finally:
        policy_client.delete_sprite("polsec-ro")


def test_one_sprites_lookup_opens_nothing_for_another(policy_client: SpritesClient,
                                                     internet: Internet) -> None:
    a = policy_client.create_sprite("polsec-a")
    b = policy_client.create_sprite("polsec-b")
    try:
        a.update_network_policy(_allow("web.test"))
        b.update_network_policy(_allow("other.test"))
        assert curl(a, f"http://web.test:{Internet.PORT}/").startswith("hello")
        assert curl_ip(b, internet.PUBLIC) == "FAILED\n"
        assert curl(b, f"http://other.test:{Internet.PORT}/").startswith("hello")
        assert curl_ip(a, internet.OTHER) == "FAILED\n"
    finally:
        policy_client.delete_sprite("polsec-a")
        policy_client.delete_sprite("polsec-b")


def test_other_resolvers_and_protocols_fall_under_the_policy(
        policy_client: SpritesClient, internet: Internet) -> None:
    """DNS to another resolver over UDP or TCP is answered by Wisp's (REFUSED for a denied
    name); DNS over TLS or HTTPS to an address no allowed lookup gave goes nowhere; UDP to
    such an address is stopped too."""
    s = policy_client.create_sprite("polsec-dns")
    try:
        s.update_network_policy(_allow("web.test"))
        assert lookup(s, "other.test", internet.GATEWAY) == "REFUSED"
        assert lookup(s, "other.test", "8.8.8.8") == "REFUSED"
        query = (struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\x05other\x04test\x00"
                 + struct.pack("!2H", 1, 1))
        tcp = sh(s, "python3 -c 'import socket,sys; q=bytes.fromhex(sys.argv[1]); "
                    "c=socket.create_connection((sys.argv[2], 53), 3); "
                    "c.sendall(len(q).to_bytes(2, \"big\") + q); r=c.recv(512); "
                    f"print(r[5] & 15)' {query.hex()} {internet.GATEWAY}")
        assert tcp.strip() == "5"  # REFUSED
        for port in (853, 443):
            assert curl(s, f"https://{internet.GATEWAY}:{port}/dns-query").startswith("exit")
        # a connected UDP socket learns its fate from the ICMP error it gets back: the
        # test host's "port unreachable" (nothing listens on 9) when the packet arrived,
        # Wisp's "administratively prohibited" when it was stopped at the host
        probe = ("python3 -c 'import socket, errno; u=socket.socket(socket.AF_INET, "
                 f"socket.SOCK_DGRAM); u.settimeout(2); u.connect((\"{internet.OTHER}\", 9)); "
                 "u.send(b\"x\")\ntry: u.recv(10)\nexcept OSError as e: "
                 "print(errno.errorcode.get(e.errno, e))' 2>&1; true")
        assert sh(s, probe).strip() == "EHOSTUNREACH"
        s.update_network_policy(NetworkPolicy(rules=[]))
        assert sh(s, probe).strip() == "ECONNREFUSED"
    finally:
        policy_client.delete_sprite("polsec-dns")
