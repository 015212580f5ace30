"""Resources of sprites (contract §2.12 `/policy/resources`): memory and CPU limits.

A sprite's resources policy names what it changed from the server's defaults
(`[sprites] memory_mb`, `cpus`); what it leaves unset follows the config, including a
config changed later. The policy lives in the sprite's record (`config["resources"]` in
the sprites table), not on its disk: a checkpoint restore does not rewind it, a fork copies
it (`Sprites.create`), and reading or changing it never wakes a cold sprite.

A change is applied to a running sprite's cgroups before the call returns, without a
restart (`Runtime.set_limits`), and stored only once applied; a cold sprite's is stored
and applied by its next start (`Sprites._start` reads `limits_for`). Both happen under the
sprite's lock, so a start sees either the old policy or the new one, never half of each.

Wire shape (docs/resources.md):

    {"memory": {"limit_mb": 4096, "autoscale": true, "default": false},
     "cpu": {"limit_cpus": 2.0, "default": true}}

`memory` is the contract's (the JS SDK sends `limit_mb` and optionally `autoscale`);
`cpu` and the `default` flags are Wisp extensions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from wisp.errors import BadRequest
from wisp.runtime.base import Limits

if TYPE_CHECKING:
    from wisp.config import Config
    from wisp.sprites import Sprites

__all__ = ["Resources", "ResourcePolicy", "parse", "limits_for", "to_json", "host_memory_mb",
           "host_cpus", "MIN_MEMORY_MB", "MIN_CPUS", "RECORD_KEY"]

#: Below this a Debian userland cannot even start a shell reliably.
MIN_MEMORY_MB = 64
#: CFS enforces quotas of at least 1 ms per 100 ms period; 5 % keeps a sprite usable.
MIN_CPUS = 0.05
#: The key of the policy in the sprite record's `config` JSON.
RECORD_KEY = "resources"


def host_memory_mb() -> int:
    """The host's RAM (MemTotal), the largest memory limit a sprite may ask for."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise OSError("no MemTotal in /proc/meminfo")  # pragma: no cover - every Linux has it


def host_cpus() -> int:
    """CPUs the host has, the largest CPU limit a sprite may ask for."""
    return os.cpu_count() or 1


@dataclass(frozen=True)
class ResourcePolicy:
    """What a sprite set; `None` = the server's default for that resource."""

    memory_mb: int | None = None
    cpus: float | None = None

    @classmethod
    def from_record(cls, config: Mapping[str, Any]) -> ResourcePolicy:
        """The policy stored in a sprite record's `config`. A value that is not a valid
        limit (written by another version, edited by hand) counts as unset, so a record
        can never make a start or a GET fail."""
        stored = config.get(RECORD_KEY)
        if not isinstance(stored, dict):
            return cls()
        memory, cpus = stored.get("memory_mb"), stored.get("cpus")
        return cls(
            memory_mb=memory if type(memory) is int and memory >= MIN_MEMORY_MB else None,
            cpus=float(cpus) if isinstance(cpus, int | float) and not isinstance(cpus, bool)
            and math.isfinite(cpus) and cpus >= MIN_CPUS else None)

    def to_record(self) -> dict[str, Any]:
        """The `config["resources"]` value: only what is set."""
        out: dict[str, Any] = {}
        if self.memory_mb is not None:
            out["memory_mb"] = self.memory_mb
        if self.cpus is not None:
            out["cpus"] = self.cpus
        return out


def limits_for(config: Config, record: Mapping[str, Any]) -> Limits:
    """The limits a sprite with this record `config` runs with."""
    policy = ResourcePolicy.from_record(record)
    return Limits(memory_mb=policy.memory_mb if policy.memory_mb is not None
                  else config.memory_mb,
                  cpus=policy.cpus if policy.cpus is not None else config.cpus,
                  pids=config.pids)


def to_json(config: Config, policy: ResourcePolicy) -> dict[str, Any]:
    """The GET shape; `default` says the value is the server's, not the sprite's own."""
    return {
        "memory": {"limit_mb": policy.memory_mb if policy.memory_mb is not None
                   else config.memory_mb,
                   "autoscale": True, "default": policy.memory_mb is None},
        "cpu": {"limit_cpus": policy.cpus if policy.cpus is not None else config.cpus,
                "default": policy.cpus is None},
    }


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where} must be an object or null")
    return value


def _only(obj: Mapping[str, Any], where: str, known: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise BadRequest(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(known)})")


def parse(body: object, max_memory_mb: int, max_cpus: float) -> dict[str, Any]:
    """The change a POST body asks for: `{"memory_mb": …, "cpus": …}` with only the
    resources the body names, `None` for one sent as `null` (back to the default).

    Raises `BadRequest` for anything else: unknown fields (a typo must not pass as "no
    change"), a non-integer or out-of-range `limit_mb` (`MIN_MEMORY_MB`..`max_memory_mb`),
    `autoscale: false` (memory is always on demand up to the limit, never reserved, so a
    fixed allocation cannot be honoured), a CPU limit outside `MIN_CPUS`..`max_cpus`, or
    a body that names nothing.
    """
    obj = _object(body, "the body")
    _only(obj, "the body", ("memory", "cpu"))
    if not obj:
        raise BadRequest("nothing to set: send memory ({\"limit_mb\": N}) and/or cpu "
                         "({\"limit_cpus\": N}); DELETE reverts to the defaults")
    change: dict[str, Any] = {}
    if "memory" in obj:
        change["memory_mb"] = None
        if obj["memory"] is not None:
            memory = _object(obj["memory"], "memory")
            _only(memory, "memory", ("limit_mb", "autoscale"))
            limit = memory.get("limit_mb")
            if type(limit) is not int:
                raise BadRequest("memory.limit_mb must be an integer number of MB")
            if not MIN_MEMORY_MB <= limit <= max_memory_mb:
                raise BadRequest(f"memory.limit_mb must be between {MIN_MEMORY_MB} and "
                                 f"{max_memory_mb} (the host's RAM), not {limit}")
            autoscale = memory.get("autoscale", True)
            if type(autoscale) is not bool:
                raise BadRequest("memory.autoscale must be a boolean")
            if not autoscale:
                raise BadRequest("memory.autoscale false is not supported: a sprite's "
                                 "memory is always used on demand up to limit_mb, never "
                                 "reserved")
            change["memory_mb"] = limit
    if "cpu" in obj:
        change["cpus"] = None
        if obj["cpu"] is not None:
            cpu = _object(obj["cpu"], "cpu")
            _only(cpu, "cpu", ("limit_cpus",))
            cpus = cpu.get("limit_cpus")
            if (isinstance(cpus, bool) or not isinstance(cpus, int | float)
                    or not math.isfinite(cpus)):
                raise BadRequest("cpu.limit_cpus must be a number of CPUs")
            if not MIN_CPUS <= cpus <= max_cpus:
                raise BadRequest(f"cpu.limit_cpus must be between {MIN_CPUS} and "
                                 f"{max_cpus:g} (the host's CPUs), not {cpus:g}")
            change["cpus"] = float(cpus)
    return change


class Resources:
    """Read and change sprites' resources policies (the `/policy/resources` routes)."""

    def __init__(self, sprites: Sprites) -> None:
        self.sprites = sprites

    async def get(self, name: str) -> dict[str, Any]:
        """The sprite's policy, defaults filled in; a cold sprite stays cold."""
        row = self.sprites.row(name)
        return to_json(self.sprites.config, ResourcePolicy.from_record(row.config))

    async def set(self, name: str, body: object) -> dict[str, Any]:
        """Change the resources the body names (others keep their value); applied to the
        running sprite, then stored. Raises `Conflict` (nothing changed) when the kernel
        cannot bring the sprite's memory under a lower limit."""
        change = parse(body, host_memory_mb(), host_cpus())  # refused before any lock
        return await self._change(name, change)

    async def clear(self, name: str) -> dict[str, Any]:
        """Back to the server's defaults (DELETE); applied and stored like `set`."""
        return await self._change(name, {"memory_mb": None, "cpus": None})

    async def _change(self, name: str, change: dict[str, Any]) -> dict[str, Any]:
        sprites = self.sprites
        row = sprites.row(name)
        async with sprites.lock(row.id):
            row = sprites.same(row)
            policy = replace(ResourcePolicy.from_record(row.config), **change)
            record = {**row.config, RECORD_KEY: policy.to_record()}
            if sprites.status(row) != "cold":
                await sprites.runtime.set_limits(row.id, limits_for(sprites.config, record))
            sprites.store.update_sprite(row.id, config=record)
        return to_json(sprites.config, policy)
