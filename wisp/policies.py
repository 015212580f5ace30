"""Egress policies of sprites (contract §2.12, §5.3): read and replace, enforced at once.

The policy is a file on the sprite's disk (`wisp.network.policy`), so reading or changing
it wakes the sprite, as any call that needs its disk does; the change is written under the
sprite's lock, so a checkpoint holds either the old policy or the new one, and is enforced
for the running sprite before the call returns (`Network.set_policy`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from wisp.network.policy import Policy, load, save
from wisp.sprites import Sprites

__all__ = ["Policies"]


class Policies:
    def __init__(self, sprites: Sprites) -> None:
        self.sprites = sprites

    async def get(self, name: str) -> dict[str, Any]:
        sprites = self.sprites
        row = sprites.row(name)
        sprites.volume.require()
        async with sprites.lock(row.id):
            row = sprites.same(row)
            await sprites.handle_locked(row)
            current = await asyncio.to_thread(load, sprites.info_dir(row.id))
        return current.to_json()

    async def set(self, name: str, body: object) -> None:
        new = Policy.parse(body)  # a bad body is refused before the sprite is woken
        sprites = self.sprites
        row = sprites.row(name)
        sprites.volume.require()
        async with sprites.lock(row.id):
            row = sprites.same(row)
            await sprites.handle_locked(row)
            await asyncio.to_thread(save, sprites.info_dir(row.id), new)
            await sprites.network.set_policy(row.id, new)
