"""A sprite on the network: its namespace, its veth and address, the server's firewall.

The sprite state machine uses only `attach` (before the runtime starts the sprite in the
returned namespace) and `detach` (after the runtime stopped it); every runtime driver takes
the namespace as given (runc joins it, the microVM will put its tap device there).

Without an uplink (`[network] uplink = "none"`) a sprite gets a namespace with loopback
only, as before egress existed.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from wisp.config import NetworkConfig
from wisp.errors import BadRequest, SystemError_
from wisp.network import dial, firewall, links
from wisp.network.addresses import Pair, SlotPool, parse_subnet
from wisp.network.dns import Resolver, host_nameservers
from wisp.network.egress import Egress
from wisp.network.policy import Policy
from wisp.system import run

__all__ = ["Network", "NetworkConfig", "Attachment"]

log = logging.getLogger("wisp.network")

#: Subnets tried, in order, by `subnet = "auto"`: the first that no host route and no
#: other Wisp server on this host uses.
AUTO_SUBNETS = tuple(f"10.{n}.0.0/16" for n in range(213, 256)) + \
    tuple(f"10.{n}.0.0/16" for n in range(200, 213))
LOCK = Path("/run/wisp/network.lock")


@dataclass(frozen=True)
class Attachment:
    netns: Path
    #: The sprite's address and its gateway (the host's end); None without an uplink.
    pair: Pair | None

    @property
    def resolv_conf(self) -> str | None:
        """The sprite's /etc/resolv.conf: its gateway, where every DNS packet it sends is
        answered by Wisp's resolver anyway (None without an uplink: the image's own)."""
        if self.pair is None:
            return None
        return f"nameserver {self.pair.host}\noptions edns0\n"


class Network:
    def __init__(self, config: NetworkConfig, tag: str) -> None:
        self.config = config
        self.tag = tag
        self.uplink: str | None = None
        self.pool: SlotPool | None = None
        self._slots: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self.resolver: Resolver | None = None
        self.egress: Egress | None = None

    # -- server start / stop --------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the uplink, claim a subnet, load the firewall, turn on IPv4 forwarding,
        and remove veths an earlier run of this server left (none of its sprites runs now).
        """
        self.uplink = await self._resolve_uplink()
        for link in await links.links(self.tag):
            await links.remove_link(link.ifname)
        if self.uplink is None:
            await self._delete_table()
            return
        upstream = self.config.dns_upstream or host_nameservers()
        if not upstream:
            raise SystemError_("no DNS upstream: the host's resolv.conf names no nameserver; "
                               "set network.dns_upstream")
        self.egress = Egress(self.tag)
        self.resolver = Resolver(upstream, self.egress)
        await self.resolver.start()
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # host-wide: two servers starting at once must not pick the same subnet
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            subnet = await self._choose_subnet()
            text = firewall.ruleset(self.tag, links.ifprefix(self.tag), subnet, self.uplink,
                                    self.resolver.port)
            await run("nft", "-f", "-", input=text.encode(), timeout=30)
        except BaseException:
            await self.resolver.stop()
            self.resolver = self.egress = None
            raise
        finally:
            os.close(fd)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        self.pool = SlotPool(subnet)
        log.info("sprites reach the network through %s from %s", self.uplink, subnet)

    async def stop(self) -> None:
        """Remove what is left (call after every sprite was detached): veths, the table."""
        for link in await links.links(self.tag):
            await links.remove_link(link.ifname)
        await self._delete_table()
        if self.resolver is not None:
            await self.resolver.stop()
            self.resolver = None
        self.egress = None
        self._slots.clear()
        self.pool = None

    async def _delete_table(self) -> None:
        await run("nft", "-f", "-", input=firewall.delete_command(self.tag).encode(),
                  timeout=30)

    async def _resolve_uplink(self) -> str | None:
        name = self.config.uplink
        if name == "none":
            return None
        if name == "auto":
            res = await run("ip", "-j", "-4", "route", "show", "default", timeout=30)
            routes = json.loads(res.stdout or b"[]")
            devs = [r["dev"] for r in routes if r.get("dev")]
            if not devs:
                raise SystemError_("network.uplink = \"auto\": the host has no default "
                                   "route; set network.uplink (or \"none\")")
            return str(devs[0])
        if not Path("/sys/class/net", name).exists():
            raise BadRequest(f"config: network.uplink {name!r} is not an interface here")
        return name

    async def _choose_subnet(self) -> ipaddress.IPv4Network:
        taken = await self._claimed_by_others()
        res = await run("ip", "-j", "-4", "route", "show", "table", "all", timeout=30)
        for route in json.loads(res.stdout or b"[]"):
            dst = route.get("dst", "default")
            if dst in ("default", "") or route.get("dev", "").startswith(
                    links.ifprefix(self.tag)):
                continue
            try:
                taken.append(ipaddress.IPv4Network(dst, strict=False))
            except ValueError:
                continue
        candidates = AUTO_SUBNETS if self.config.subnet == "auto" else (self.config.subnet,)
        for text in candidates:
            net = parse_subnet(text)
            if not any(net.overlaps(t) for t in taken):
                return net
        if self.config.subnet == "auto":
            raise SystemError_("network.subnet = \"auto\": every candidate overlaps a host "
                               "route or another Wisp server; set network.subnet")
        raise BadRequest(f"config: network.subnet {self.config.subnet} overlaps a host route "
                         "or another Wisp server's subnet")

    async def _claimed_by_others(self) -> list[ipaddress.IPv4Network]:
        res = await run("nft", "-j", "list", "sets", "inet", check=False, timeout=30)
        if res.returncode != 0 or not res.stdout.strip():
            return []
        found = []
        for item in json.loads(res.stdout).get("nftables", []):
            s = item.get("set")
            if not s or s.get("name") != "subnet" or not s.get("table", "").startswith("wisp_") \
                    or s["table"] == firewall.table_name(self.tag):
                continue
            for elem in s.get("elem", []):
                prefix = elem.get("prefix") if isinstance(elem, dict) else None
                if prefix:
                    found.append(ipaddress.IPv4Network(f"{prefix['addr']}/{prefix['len']}"))
        return found

    # -- per sprite -----------------------------------------------------------------------
    def netns(self, sprite_id: str) -> Path:
        return links.NETNS_DIR / links.netns_name(self.tag, sprite_id)

    async def connect(self, sprite_id: str, host: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """A TCP connection to `host:port` as the sprite sees it (`localhost` is the
        sprite's loopback), and the target as "ip:port"; raises `dial.DialError`."""
        return await dial.open_connection(self.netns(sprite_id), host, port)

    async def proc_net(self, sprite_id: str) -> dict[str, str]:
        """The sprite's /proc/net/tcp and tcp6 (its listening ports)."""
        return await asyncio.to_thread(dial.read_proc_net, self.netns(sprite_id))

    async def attach(self, sprite_id: str) -> Attachment:
        """The sprite's namespace, made if missing (idempotent: a namespace kept across a
        restore is returned as it is)."""
        async with self._lock:
            slot = self._slots.get(sprite_id)
            if links.netns_alive(self.tag, sprite_id) and (
                    self.pool is None or (slot is not None and Path(
                        "/sys/class/net", links.host_ifname(self.tag, slot)).exists())):
                return Attachment(links.NETNS_DIR / links.netns_name(self.tag, sprite_id),
                                  self.pool.pair(slot) if self.pool and slot is not None
                                  else None)
            if slot is not None and self.pool is not None:
                self.pool.release(slot)
                self._slots.pop(sprite_id, None)
            pair = self.pool.take() if self.pool is not None else None
            try:
                path = await links.make(self.tag, sprite_id, pair)
            except BaseException:
                if pair is not None and self.pool is not None:
                    self.pool.release(pair.slot)
                raise
            if pair is not None:
                self._slots[sprite_id] = pair.slot
                if self.egress is not None:
                    self.egress.add(str(pair.sprite), sprite_id, pair.slot,
                                    links.netns_name(self.tag, sprite_id))
            return Attachment(path, pair)

    async def detach(self, sprite_id: str) -> None:
        """Remove the sprite's veth and namespace (after its processes are gone)."""
        async with self._lock:
            slot = self._slots.pop(sprite_id, None)
            if slot is None:  # not ours in memory: look for its veth by alias
                slot = next((lk.slot for lk in await links.links(self.tag)
                             if lk.sprite_id == sprite_id), None)
            await links.remove(self.tag, sprite_id, slot)
            if slot is not None and self.pool is not None:
                if self.egress is not None:
                    self.egress.remove(str(self.pool.pair(slot).sprite))
                self.pool.release(slot)

    async def set_policy(self, sprite_id: str, policy: Policy, *, fresh: bool = False
                         ) -> None:
        """Enforce `policy` for an attached sprite from now on (see `Egress.set_policy`;
        without an uplink there is nothing to enforce)."""
        slot = self._slots.get(sprite_id)
        if slot is None or self.pool is None or self.egress is None:
            return
        await self.egress.set_policy(str(self.pool.pair(slot).sprite), policy, fresh=fresh)
