"""Network namespaces and veth pairs, made and removed with iproute2 in batches.

A sprite's namespace is `wisp-<server tag>-<id>` under /run/netns. It is made by the host,
so it is owned by the host's user namespace: root in the sprite holds no capability there
and can change neither its address, its routes nor send raw packets. Each sprite's veth is
named by its slot (`w<tag6><slot hex>` on the host, `eth0` inside) and carries the sprite
id as its alias, which is how the host side is found again from the system.

Two `ip -batch` runs per sprite (one on the host, one in the namespace) instead of one
process per step: each `ip` costs ~2-3 ms to start.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wisp.network.addresses import Pair
from wisp.system import is_mountpoint, run

__all__ = ["NETNS_DIR", "Link", "netns_name", "host_ifname", "make", "remove", "links",
           "remove_netns"]

NETNS_DIR = Path("/run/netns")


@dataclass(frozen=True)
class Link:
    ifname: str
    sprite_id: str
    slot: int


def netns_name(tag: str, sprite_id: str) -> str:
    return f"wisp-{tag}-{sprite_id.removeprefix('sprite-')[:24]}"


def ifprefix(tag: str) -> str:
    return f"w{tag[:6]}"


def host_ifname(tag: str, slot: int) -> str:
    return f"{ifprefix(tag)}{slot:04x}"


async def make(tag: str, sprite_id: str, pair: Pair | None) -> Path:
    """The sprite's namespace with loopback up and, given a pair, its veth: addresses, link
    up, default route via the host end. Any stale namespace of the same name goes first."""
    name = netns_name(tag, sprite_id)
    path = NETNS_DIR / name
    host: list[str] = []
    if path.exists():
        host.append(f"netns delete {name}")
    host.append(f"netns add {name}")
    inside = ["link set lo up"]
    if pair is not None:
        hif = host_ifname(tag, pair.slot)
        host += [f"link add {hif} type veth peer name eth0 netns {name}",
                 f"link set dev {hif} alias {sprite_id}",
                 f"addr add {pair.host}/31 dev {hif}",
                 f"link set dev {hif} up"]
        inside += [f"addr add {pair.sprite}/31 dev eth0", "link set eth0 up",
                   f"route add default via {pair.host} dev eth0"]
    try:
        await run("ip", "-batch", "-", input="\n".join(host).encode() + b"\n", timeout=30)
        await run("ip", "-n", name, "-batch", "-", input="\n".join(inside).encode() + b"\n",
                  timeout=30)
    except BaseException:
        await remove(tag, sprite_id, pair.slot if pair else None)
        raise
    return path


async def links(tag: str) -> list[Link]:
    """This server's host-side veths, read from the system."""
    res = await run("ip", "-j", "-d", "link", "show", "type", "veth", check=False, timeout=30)
    if res.returncode != 0 or not res.stdout.strip():
        return []
    found = []
    prefix = ifprefix(tag)
    for item in json.loads(res.stdout):
        ifname = item.get("ifname", "")
        if not ifname.startswith(prefix) or len(ifname) != len(prefix) + 4:
            continue
        try:
            slot = int(ifname[len(prefix):], 16)
        except ValueError:
            continue
        found.append(Link(ifname, str(item.get("ifalias", "")), slot))
    return found


async def remove_link(ifname: str) -> None:
    """Delete a host-side veth (its peer goes with it); nothing if it is gone."""
    if Path("/sys/class/net", ifname).exists():
        await run("ip", "link", "delete", ifname, check=False, timeout=30)


async def remove_netns(tag: str, sprite_id: str) -> None:
    # and the name used before namespaces carried the server's tag
    for name in (netns_name(tag, sprite_id), f"wisp-{sprite_id[:24]}"):
        if (NETNS_DIR / name).exists():
            await run("ip", "netns", "delete", name, check=False, timeout=30)


async def remove(tag: str, sprite_id: str, slot: int | None) -> None:
    """The veth (if a slot is given), then the namespace. Deleting the namespace would also
    destroy the veth, but only once the kernel frees it, asynchronously: removing the link
    first means it is gone when this returns."""
    if slot is not None:
        await remove_link(host_ifname(tag, slot))
    await remove_netns(tag, sprite_id)


def netns_alive(tag: str, sprite_id: str) -> bool:
    return is_mountpoint(NETNS_DIR / netns_name(tag, sprite_id), "nsfs")
