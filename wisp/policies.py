"""Egress policies of sprites (contract §2.12, §5.3): read and replace, enforced at once.

The policy is a file on the sprite's disk (`wisp.network.policy`), so reading or changing
it wakes the sprite, as any call that needs its disk does; the change is written under the
sprite's lock, so a checkpoint holds either the old policy or the new one, and is enforced
for the running sprite before the call returns (`Network.set_policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from wisp.db import SpriteRow
from wisp.network.policy import Policy, load, save
from wisp.sprites import Sprites

__all__ = ["Policies"]


class Policies:
    def __init__(self, sprites: Sprites) -> None:
        self.sprites = sprites

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[SpriteRow]:
        """The sprite, its lock held and its disk mounted (woken)."""
        sprites = self.sprites
        row = sprites.row(name)
        sprites.volume.require()
        async with sprites.lock(row.id):
            row = sprites.same(row)
            await sprites.handle_locked(row)
            yield row

    async def get(self, name: str) -> dict[str, Any]:
        async with self._locked(name) as row:
            current = await asyncio.to_thread(load, self.sprites.settings_dir(row.id))
        return current.to_json()

    async def set(self, name: str, body: object) -> None:
        new = Policy.parse(body)  # a bad body is refused before the sprite is woken
        async with self._locked(name) as row:
            await asyncio.to_thread(save, self.sprites.settings_dir(row.id), new)
            await self.sprites.network.set_policy(row.id, new)
