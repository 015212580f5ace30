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
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Collection
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
    @property
    def _state_file(self) -> Path:
        """What a later server process needs to adopt this one's firewall (tmpfs: gone
        with a reboot, as are the sprites it describes)."""
        return LOCK.parent / self.tag / "network.json"

    async def start(self, keep: Collection[str] = ()) -> set[str]:
        """Resolve the uplink, claim a subnet, load the firewall, turn on IPv4 forwarding,
        and remove what an earlier run of this server left.

        `keep`: sprites still running from an earlier server process. When that process's
        firewall is in place exactly as this config makes it, it is adopted as it is (the
        resolver takes its port back; each sprite's allow set keeps what it learned), and
        so are those sprites' namespaces, veths and addresses. Returns the sprites whose
        network was kept; every other veth goes.
        """
        self.uplink = await self._resolve_uplink()
        found = await links.links(self.tag)
        if self.uplink is None:
            for link in found:
                await links.remove_link(link.ifname)
            await self._delete_table()
            self._state_file.unlink(missing_ok=True)
            return {s for s in keep if links.netns_alive(self.tag, s)}
        upstream = self.config.dns_upstream or host_nameservers()
        if not upstream:
            raise SystemError_("no DNS upstream: the host's resolv.conf names no nameserver; "
                               "set network.dns_upstream")
        self.egress = Egress(self.tag)
        self.resolver = Resolver(upstream, self.egress)
        try:
            table = await self._adopt_table() if keep else None
            if table is None:
                subnet = await self._load_table()
            else:
                subnet = table.subnet
        except BaseException:
            await self.resolver.stop()
            self.resolver = self.egress = None
            raise
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        self.pool = SlotPool(subnet)
        kept: set[str] = set()
        for link in found:
            if (table is not None and link.sprite_id in keep and 0 <= link.slot < self.pool.size
                    and links.netns_alive(self.tag, link.sprite_id)):
                pair = self.pool.claim(link.slot)
                self._slots[link.sprite_id] = link.slot
                self.egress.add(str(pair.sprite), link.sprite_id, link.slot,
                                links.netns_name(self.tag, link.sprite_id),
                                enforced=str(pair.sprite) in table.policed)
                kept.add(link.sprite_id)
            else:
                await links.remove_link(link.ifname)
        log.info("sprites reach the network through %s from %s%s", self.uplink, subnet,
                 " (firewall adopted)" if table is not None else "")
        return kept

    async def _load_table(self) -> ipaddress.IPv4Network:
        """A fresh resolver port and a fresh table on a subnet no one else uses."""
        assert self.resolver is not None
        await self.resolver.start()
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # host-wide: two servers starting at once must not pick the same subnet
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            subnet = await self._choose_subnet()
            text = self._ruleset(subnet, self.resolver.port)
            await run("nft", "-f", "-", input=text.encode(), timeout=30)
        finally:
            os.close(fd)
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        self._state_file.write_text(json.dumps({
            "subnet": str(subnet), "dns_port": self.resolver.port,
            "ruleset": hashlib.sha256(text.encode()).hexdigest()}))
        return subnet

    def _ruleset(self, subnet: ipaddress.IPv4Network, port: int) -> str:
        assert self.uplink is not None
        return firewall.ruleset(self.tag, links.ifprefix(self.tag), subnet, self.uplink, port)

    async def _adopt_table(self) -> firewall.Table | None:
        """The earlier server's table, if it is in place and is exactly the one this config
        would load on the same subnet and port, with the resolver bound to that port."""
        assert self.resolver is not None
        try:
            state = json.loads(self._state_file.read_text())
            subnet = ipaddress.IPv4Network(state["subnet"])
            port = int(state["dns_port"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if hashlib.sha256(self._ruleset(subnet, port).encode()).hexdigest() != state.get(
                "ruleset"):
            log.info("the firewall changed since the last run: loading it afresh")
            return None
        table = await firewall.read(self.tag)
        if table is None or table.subnet != subnet:
            return None
        try:
            await self.resolver.start(port)
        except OSError as exc:
            log.info("the resolver's port %d is taken (%s): loading the firewall afresh",
                     port, exc)
            return None
        return table

    async def stop(self, keep: bool = False) -> None:
        """Remove what is left (call after every sprite was detached): veths, the table.
        `keep`: sprites run on without this server: only its resolver stops (their DNS
        lookups fail until the next server adopts the firewall)."""
        if not keep:
            for link in await links.links(self.tag):
                await links.remove_link(link.ifname)
            await self._delete_table()
            self._state_file.unlink(missing_ok=True)
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

    async def adopt_policy(self, sprite_id: str, policy: Policy) -> None:
        """A sprite adopted from an earlier server: `policy` is its, and the kernel holds
        its allow set already; enforced afresh only if the kernel disagrees with it."""
        slot = self._slots.get(sprite_id)
        if slot is None or self.pool is None or self.egress is None:
            return
        await self.egress.adopt(str(self.pool.pair(slot).sprite), policy)

    async def set_policy(self, sprite_id: str, policy: Policy, *, fresh: bool = False
                         ) -> None:
        """Enforce `policy` for an attached sprite from now on (see `Egress.set_policy`;
        without an uplink there is nothing to enforce)."""
        slot = self._slots.get(sprite_id)
        if slot is None or self.pool is None or self.egress is None:
            return
        await self.egress.set_policy(str(self.pool.pair(slot).sprite), policy, fresh=fresh)
