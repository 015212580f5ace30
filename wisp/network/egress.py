"""Enforcing a sprite's egress policy in the kernel, from what its lookups were answered.

While a sprite has a policy, its new connections leave only to addresses in its allow set
(`allow_<slot>` in the server's table, reached through the `policed` verdict map by the
sprite's address). The resolver puts an allowed answer's addresses there for the record's
TTL before it replies (`grant`); nothing else does, so raw IPs, other resolvers and DoH to
unlisted hosts get nowhere. Connections already open are left alone until the policy
changes: then the set is rebuilt from the sprite's lookups that the new policy still
allows, and every open connection to an address that is no longer allowed is cut, at once:
its socket in the sprite is destroyed (`ss -K`, the sprite's process sees the connection
aborted and the peer gets a reset) and its conntrack entry deleted.

Set updates go through libnftables in-process (~0.05 ms each, `nft` as a process costs
~18 ms: docs/network.md); the resolver waits for them before it answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import time
from dataclasses import dataclass, field

import nftables

from wisp.network import firewall
from wisp.network.policy import OPEN, Policy
from wisp.system import run

__all__ = ["Egress", "EgressError", "MIN_TTL"]

log = logging.getLogger("wisp.network.egress")

#: An answer's addresses stay allowed at least this long (s): a TTL of 0 is common behind
#: CDNs, and the client connects only after it has the reply.
MIN_TTL = 5
#: ... and at most this long (s), however long the record's TTL.
MAX_TTL = 86400
#: Lookups remembered per sprite; the oldest expired ones go first beyond this.
MAX_GRANTS = 4096


class EgressError(Exception):
    """The kernel refused a set update (the resolver answers SERVFAIL then)."""


@dataclass
class _Sprite:
    sprite_id: str
    slot: int
    netns_name: str
    policy: Policy = OPEN
    #: address -> name -> expiry (monotonic), for every answered lookup, policy or not:
    #: what a new policy may keep allowed
    grants: dict[str, dict[str, float]] = field(default_factory=dict)
    #: whether the sprite's set, chain and map element exist in the kernel
    enforced: bool = False


class Egress:
    def __init__(self, tag: str) -> None:
        self.table = firewall.table_name(tag)
        self._nft = nftables.Nftables()
        self._by_addr: dict[str, _Sprite] = {}
        self._conntrack = shutil.which("conntrack")

    # -- sprites come and go --------------------------------------------------------------
    def add(self, address: str, sprite_id: str, slot: int, netns_name: str, *,
            enforced: bool = False) -> None:
        """`enforced`: its set, chain and map element exist already (an adopted sprite)."""
        self._by_addr[address] = _Sprite(sprite_id, slot, netns_name, enforced=enforced)

    async def adopt(self, address: str, policy: Policy) -> None:
        """The policy of a sprite whose kernel state an earlier server made. What it
        looked up then stays allowed in the kernel until its TTL; this process does not
        know the names behind those addresses, so a later policy change forgets them (the
        sprite looks them up again)."""
        sprite = self._by_addr.get(address)
        if sprite is None:
            return
        sprite.policy = policy
        if policy.open != sprite.enforced:
            return  # the kernel agrees: open and not policed, or policed
        await self.set_policy(address, policy)

    def remove(self, address: str) -> None:
        """Forget the sprite and remove its set, chain and map element."""
        sprite = self._by_addr.pop(address, None)
        if sprite is not None and sprite.enforced:
            try:
                self._run(self._unenforce(address, sprite))
            except EgressError as exc:  # the table was replaced meanwhile: nothing left
                log.info("removing %s's allow set: %s", sprite.sprite_id, exc)

    def sprite_id(self, address: str) -> str | None:
        sprite = self._by_addr.get(address)
        return sprite.sprite_id if sprite else None

    def policy(self, address: str) -> Policy | None:
        """The policy of the sprite at `address` (None: not a sprite of this server)."""
        sprite = self._by_addr.get(address)
        return sprite.policy if sprite else None

    # -- the resolver's side --------------------------------------------------------------
    def grant(self, address: str, name: str, answers: list[tuple[str, int]]) -> None:
        """Remember that `name` resolved to `answers` (ip, ttl) for the sprite, and allow
        those addresses now if it has a policy. Raises EgressError."""
        sprite = self._by_addr.get(address)
        if sprite is None or not answers:
            return
        now = time.monotonic()
        name = name.lower().removesuffix(".")
        elements = []
        for ip, ttl in answers:
            ttl = max(MIN_TTL, min(MAX_TTL, ttl))
            names = sprite.grants.setdefault(ip, {})
            names[name] = max(names.get(name, 0.0), now + ttl)
            # never shorten: the element lives as long as the longest grant of its address
            left = int(max(names.values()) - now) + 1
            elements.append(f"{ip} timeout {left}s expires {left}s")
        if len(sprite.grants) > MAX_GRANTS:
            self._prune(sprite, now)
        if sprite.enforced:
            self._run(f"add element inet {self.table} {_set(sprite)} "
                      f"{{ {', '.join(elements)} }}\n")

    # -- policy changes -------------------------------------------------------------------
    async def set_policy(self, address: str, policy: Policy, *, fresh: bool = False) -> None:
        """Make `policy` the sprite's, in the kernel too, and cut its open connections that
        the new policy does not allow. `fresh`: the sprite's processes are new (a start or
        a restore): what they looked up before is forgotten."""
        sprite = self._by_addr.get(address)
        if sprite is None:
            return
        if fresh:
            sprite.grants.clear()
        sprite.policy = policy
        now = time.monotonic()
        self._prune(sprite, now)
        if policy.open:
            if sprite.enforced:
                self._run(self._unenforce(address, sprite))
            return
        allowed: dict[str, float] = {}
        for ip, names in sprite.grants.items():
            keep = [exp for name, exp in names.items() if policy.allows(name)]
            if keep:
                allowed[ip] = max(keep)
        s, chain = _set(sprite), _chain(sprite)
        cmds = [f"add set inet {self.table} {s} {{ type ipv4_addr; flags timeout; }}",
                f"flush set inet {self.table} {s}",
                f"add chain inet {self.table} {chain}",
                f"flush chain inet {self.table} {chain}",
                f"add rule inet {self.table} {chain} ip daddr @{s} accept",
                f"add rule inet {self.table} {chain} meta l4proto tcp counter "
                "reject with tcp reset",
                f"add rule inet {self.table} {chain} counter reject with icmp type "
                "admin-prohibited",
                f"add element inet {self.table} policed {{ {address} : jump {chain} }}"]
        if allowed:
            cmds.append(f"add element inet {self.table} {s} {{ " + ", ".join(
                f"{ip} timeout {int(exp - now) + 1}s expires {int(exp - now) + 1}s"
                for ip, exp in allowed.items()) + " }")
        self._run("\n".join(cmds) + "\n")
        sprite.enforced = True
        await self._cut(address, sprite, set(allowed))

    def _unenforce(self, address: str, sprite: _Sprite) -> str:
        sprite.enforced = False
        return (f"delete element inet {self.table} policed {{ {address} }}\n"
                f"delete chain inet {self.table} {_chain(sprite)}\n"
                f"delete set inet {self.table} {_set(sprite)}\n")

    async def _cut(self, address: str, sprite: _Sprite, allowed: set[str]) -> None:
        """Abort the sprite's connections to addresses outside `allowed`."""
        res = await run("ss", "-N", sprite.netns_name, "-Htun", "state", "established",
                        check=False, timeout=10)
        peers = set()
        for line in res.stdout.decode(errors="replace").splitlines():
            parts = line.split()
            if len(parts) < 5:
                continue
            peer = parts[-1].rsplit(":", 1)[0].strip("[]")
            try:
                ip = ipaddress.ip_address(peer)
            except ValueError:
                continue
            if ip.version == 4 and not ip.is_loopback and str(ip) not in allowed:
                peers.add(str(ip))
        # the resolver is reached through the gateway, never forwarded: not a peer to cut
        peers.discard(str(ipaddress.ip_address(address) - 1))
        if not peers:
            return
        expr = " or ".join(f"dst {ip}" for ip in sorted(peers))
        await run("ss", "-N", sprite.netns_name, "-K", "-tun", *expr.split(), check=False,
                  timeout=10)
        if self._conntrack:
            await asyncio.gather(*(run(self._conntrack, "-D", "-s", address, "-d", ip,
                                       check=False, timeout=10) for ip in sorted(peers)))
        log.info("policy change cut %s's connections to %d address(es)", sprite.sprite_id,
                 len(peers))

    # -- helpers --------------------------------------------------------------------------
    def _prune(self, sprite: _Sprite, now: float) -> None:
        for ip in list(sprite.grants):
            names = {n: e for n, e in sprite.grants[ip].items() if e > now}
            if names:
                sprite.grants[ip] = names
            else:
                del sprite.grants[ip]

    def _run(self, text: str) -> None:
        rc, _, err = self._nft.cmd(text)
        if rc != 0:
            raise EgressError(str(err).strip().splitlines()[0] if err else f"nft rc {rc}")


def _set(sprite: _Sprite) -> str:
    return f"allow_{sprite.slot}"


def _chain(sprite: _Sprite) -> str:
    return f"sprite_{sprite.slot}"
