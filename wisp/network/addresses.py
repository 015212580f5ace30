"""Sprite addresses: each sprite owns one /31 of the server's subnet.

A /31 is a point-to-point pair (RFC 3021): the even address is the host's end of the
sprite's veth (its gateway and, later, its resolver), the odd one the sprite's. Slot n of a
/16 is the pair (2n, 2n + 1): 32,768 sprites per server. The slot also names the veth
(`links.host_ifname`), so the allocation is read back from the system after a restart
rather than kept in a file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from wisp.errors import BadRequest, SystemError_

__all__ = ["Pair", "SlotPool", "parse_subnet"]


@dataclass(frozen=True)
class Pair:
    slot: int
    host: ipaddress.IPv4Address
    sprite: ipaddress.IPv4Address


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 network of /8 to /28 with no host bits set (config input)."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise BadRequest(f"config: network.subnet {text!r}: {exc}") from None
    if not 8 <= net.prefixlen <= 28:
        raise BadRequest(f"config: network.subnet {text!r} must be a /8 to /28")
    return net


class SlotPool:
    """Free /31 slots of one subnet. Not thread safe: used from the event loop only."""

    def __init__(self, subnet: ipaddress.IPv4Network) -> None:
        self.subnet = subnet
        self.size = subnet.num_addresses // 2
        self._used: set[int] = set()
        self._next = 0

    def pair(self, slot: int) -> Pair:
        base = int(self.subnet.network_address) + 2 * slot
        return Pair(slot, ipaddress.IPv4Address(base), ipaddress.IPv4Address(base + 1))

    def claim(self, slot: int) -> Pair:
        """Mark a slot found in use on the system (a veth that survived)."""
        if not 0 <= slot < self.size:
            raise ValueError(f"slot {slot} is outside {self.subnet}")
        self._used.add(slot)
        return self.pair(slot)

    def take(self) -> Pair:
        """The next free slot, round robin, so a released address is not reused at once
        (a connection tracked for the old sprite cannot be taken over by a new one)."""
        for i in range(self.size):
            slot = (self._next + i) % self.size
            if slot not in self._used:
                self._used.add(slot)
                self._next = (slot + 1) % self.size
                return self.pair(slot)
        raise SystemError_(f"no free address in {self.subnet}",
                           public="no free sprite address: the network subnet is full")

    def release(self, slot: int) -> None:
        self._used.discard(slot)

    def __contains__(self, slot: int) -> bool:
        return slot in self._used
