"""The server's nftables table: what a sprite's packets may do on the host.

One table per server, `inet wisp_<tag>`, replaced as a whole (`nft -f`, atomic). It matches
sprites by their host-side veth names (`w<tag6>*`), so it needs no change per sprite:

* prerouting: every DNS packet from a sprite (port 53, any address) is redirected to the
  server's resolver port (`wisp.network.dns`): a sprite cannot ask another resolver.
* input (packets to any host address): only that resolver port, and replies to
  connections the host opened; the Wisp API and every other host service, and the
  host's other addresses, are dropped. The resolver port is dropped for anyone else.
* forward: a sprite's packets may leave only through the uplink, never to another sprite
  (another veth) nor to a private, link-local, loopback, multicast or reserved range, and
  only with its own source address; nothing may open a connection into a sprite.
* a sprite with an egress policy has an entry in the `policed` map, which sends its new
  connections through its own chain: only to its allow set (`wisp.network.egress`).
* postrouting: masquerade the subnet out of the uplink.
* IPv6 from a sprite is dropped everywhere: it is off, never a way around these rules.

The table's `subnet` set is also the server's claim on its subnet: another server picks
a subnet no `wisp_*` table holds (`Network.start`).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from wisp.system import run

__all__ = ["BLOCKED_RANGES", "Table", "table_name", "ruleset", "delete_command", "read"]

#: Destinations a sprite never reaches: RFC 1918, CGNAT, loopback, link-local (cloud
#: metadata at 169.254.169.254 included), "this network", IETF protocol assignments,
#: benchmarking, multicast and reserved.
BLOCKED_RANGES = ("0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8",
                  "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16",
                  "198.18.0.0/15", "224.0.0.0/3")


def table_name(tag: str) -> str:
    return f"wisp_{tag}"


def ruleset(tag: str, ifprefix: str, subnet: ipaddress.IPv4Network, uplink: str,
            dns_port: int) -> str:
    """The whole table as `nft -f` input: created if missing, then flushed and refilled in
    the same transaction, so there is no moment without the rules."""
    t = table_name(tag)
    sprites = f'iifname "{ifprefix}*"'
    return f"""table inet {t}
delete table inet {t}
table inet {t} {{
    set subnet {{ type ipv4_addr; flags interval; elements = {{ {subnet} }}; }}
    set blocked {{ type ipv4_addr; flags interval; elements = {{ {", ".join(BLOCKED_RANGES)} }}; }}
    map policed {{ type ipv4_addr : verdict; }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {sprites} meta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns_port}
    }}
    chain input {{
        type filter hook input priority filter - 1; policy accept;
        {sprites} jump sprite_in
        meta l4proto {{ tcp, udp }} th dport {dns_port} counter drop
    }}
    chain sprite_in {{
        meta nfproto != ipv4 counter drop
        ct state established,related accept
        ip daddr != @subnet counter drop
        meta l4proto {{ tcp, udp }} th dport {dns_port} accept
        counter drop
    }}
    chain forward {{
        type filter hook forward priority filter - 1; policy accept;
        {sprites} jump sprite_out
        oifname "{ifprefix}*" ct state established,related accept
        oifname "{ifprefix}*" counter drop
    }}
    chain sprite_out {{
        meta nfproto != ipv4 counter drop
        ip saddr != @subnet counter drop
        oifname != "{uplink}" counter drop
        ip daddr @blocked counter drop
        ct state established,related accept
        ip saddr vmap @policed
        accept
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr @subnet oifname "{uplink}" masquerade
    }}
}}
"""


def delete_command(tag: str) -> str:
    t = table_name(tag)
    return f"table inet {t}\ndelete table inet {t}\n"


@dataclass(frozen=True)
class Table:
    """What a running server's table holds that a later server adopts."""

    subnet: ipaddress.IPv4Network
    #: sprite addresses with an entry in the `policed` map (an egress policy enforced)
    policed: frozenset[str]


async def read(tag: str) -> Table | None:
    """The server's table as the kernel has it, or None if it is missing or incomplete."""
    res = await run("nft", "-j", "list", "table", "inet", table_name(tag), check=False,
                    timeout=30)
    if res.returncode != 0:
        return None
    subnet: ipaddress.IPv4Network | None = None
    policed: set[str] = set()
    chains: set[str] = set()
    try:
        for item in json.loads(res.stdout).get("nftables", []):
            if "chain" in item:
                chains.add(item["chain"].get("name", ""))
            elif item.get("set", {}).get("name") == "subnet":
                prefixes = [e["prefix"] for e in item["set"].get("elem", [])
                            if isinstance(e, dict) and "prefix" in e]
                if len(prefixes) == 1:
                    subnet = ipaddress.IPv4Network(
                        f"{prefixes[0]['addr']}/{prefixes[0]['len']}")
            elif item.get("map", {}).get("name") == "policed":
                policed.update(e[0] for e in item["map"].get("elem", [])
                               if isinstance(e, list) and e and isinstance(e[0], str))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    base = {"prerouting", "input", "sprite_in", "forward", "sprite_out", "postrouting"}
    if subnet is None or not base <= chains:
        return None
    return Table(subnet, frozenset(policed))
