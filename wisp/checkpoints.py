"""Checkpoints: point-in-time copies of a sprite's disk, made by `juicefs clone`.

A checkpoint is a metadata clone of the sprite's ext4 image, taken while the sprite's
processes are frozen and its ext4 is frozen, so it is crash-consistent. `v0` is the empty
disk every sprite starts from (a factory reset). Files are written as `vN.img.in-progress`
and renamed; the database row is written last, so a crash never leaves a listed checkpoint
without its image, and leftovers without a row are removed at the next start.

Restore clones the checkpoint next to the live disk first (while the sprite still runs),
then stops the sprite, swaps the image in with one rename, and starts it again: a crash at
any point leaves either the old disk or the new one, never a mix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from wisp.db import CheckpointRow, SpriteRow, now
from wisp.errors import BadRequest, CheckpointNotFound, Conflict, QuotaExceeded
from wisp.sprites import Sprites

__all__ = ["Checkpoints", "event"]

log = logging.getLogger("wisp.checkpoints")

HISTORY_LIMIT = 32


def event(kind: str, text: str, **extra: Any) -> dict[str, Any]:
    """One NDJSON progress line in the SDKs' shape: `data` (or `error`) is always a string."""
    key = "error" if kind == "error" else "data"
    return {"type": kind, key: text, "time": now(), **extra}


class Checkpoints:
    def __init__(self, sprites: Sprites) -> None:
        self.sprites = sprites
        self.store = sprites.store

    def to_json(self, cp: CheckpointRow) -> dict[str, Any]:
        return {"id": cp.id, "create_time": cp.create_time, "comment": cp.comment,
                "history": list(cp.history), "is_auto": False, "source_id": cp.source_id,
                "health": "", "size_bytes": cp.size_bytes}

    def list(self, name: str, history: str | None = None) -> list[CheckpointRow]:
        row = self.sprites.row(name)
        cps = self.store.checkpoints(row.id)
        if history:
            cps = [c for c in cps if any(history in h for h in c.history)]
        return cps

    def get(self, name: str, cp_id: str) -> CheckpointRow:
        row = self.sprites.row(name)
        cp = self.store.checkpoint(row.id, cp_id)
        if cp is None:
            raise CheckpointNotFound(name, cp_id)
        return cp

    # -- create ---------------------------------------------------------------------------
    async def prepare_create(self, name: str, comment: object) -> SpriteRow:
        """Checks that must fail with a 4xx status before the progress stream starts.

        Wakes the sprite (checkpoints need its disk mounted, as any API call may) and checks
        the byte budget, so an over-quota request gets its error as a status, not a line.
        """
        if comment is not None and not isinstance(comment, str):
            raise BadRequest("comment must be a string")
        if isinstance(comment, str) and len(comment) > 1024:
            raise BadRequest("comment is longer than 1024 characters")
        row = self.sprites.row(name)
        self.sprites.volume.require()
        await self.sprites.handle(name)
        self._check_quota(row)
        return row

    def _check_quota(self, row: SpriteRow) -> int:
        """The new checkpoint's size; raises QuotaExceeded when it would not fit."""
        size = self.sprites.data_bytes(row.id)
        used = self.store.checkpoint_bytes(row.id)
        limit = self.sprites.config.checkpoint_max_bytes
        if used + size > limit:
            raise QuotaExceeded(
                f"checkpoints of sprite '{row.name}' would hold {used + size} bytes, over "
                f"the limit of {limit}; delete old checkpoints first")
        return size

    async def create(self, row: SpriteRow, comment: str) -> AsyncIterator[dict[str, Any]]:
        """Progress of a new checkpoint. Everything that can refuse it (the sprite deleted
        while this waited for its lock, the quota) is checked before the first event, so
        the refusal is the reply's status."""
        sprites = self.sprites
        async with sprites.lock(row.id):
            row = sprites.same(row)
            await sprites.handle_locked(row)
            size = self._check_quota(row)
            yield event("info", "Creating checkpoint...")
            cp_id = f"v{row.next_checkpoint}"
            final = sprites.checkpoint_image(row.id, cp_id)
            partial = final.with_name(final.name + ".in-progress")
            # a VM's memory too (docs/vm.md), written with the disk clone at one instant;
            # renamed before the disk, which is what makes the checkpoint exist
            memory = sprites.checkpoint_memory(row.id, cp_id)
            memory_partial = memory.with_name(memory.name + ".in-progress")
            with_memory = sprites.rt(row.id).memory_snapshots
            yield event("info", "Saving memory and filesystem state..." if with_memory
                        else "Saving filesystem state...")
            try:
                if await sprites.consistent_clone(
                        row, partial, memory_partial if with_memory else None):
                    os.replace(memory_partial, memory)
                os.replace(partial, final)
            except BaseException:
                partial.unlink(missing_ok=True)
                memory_partial.unlink(missing_ok=True)
                memory.unlink(missing_ok=True)
                raise
            parent = self.store.checkpoint(row.id, row.current_checkpoint or "")
            history = (parent.history + [parent.id])[-HISTORY_LIMIT:] if parent else []
            self.store.insert_checkpoint(
                CheckpointRow(sprite_id=row.id, id=cp_id, seq=row.next_checkpoint,
                              comment=comment or "", create_time=now(),
                              source_id=parent.id if parent else None, history=history,
                              size_bytes=size),
                next_seq=row.next_checkpoint + 1)
            self.store.update_sprite(row.id, current_checkpoint=cp_id)
        yield event("complete", f"Checkpoint {cp_id} created", id=cp_id)

    # -- restore --------------------------------------------------------------------------
    def prepare_restore(self, name: str, cp_id: str) -> tuple[SpriteRow, CheckpointRow]:
        cp = self.get(name, cp_id)
        self.sprites.volume.require()
        return self.sprites.row(name), cp

    async def restore(self, row: SpriteRow, cp: CheckpointRow, memory: bool = True
                      ) -> AsyncIterator[dict[str, Any]]:
        """Progress of a restore; the sprite and the checkpoint are checked again once its
        lock is held (a delete may have come first), before the first event. A checkpoint
        with a memory snapshot (a VM's) resumes its processes, unless `memory` is False:
        then the sprite boots on the checkpoint's disk."""
        sprites = self.sprites
        async with sprites.lock(row.id):
            row = sprites.same(row)
            cp = self.get(row.name, cp.id)
            sprites.volume.require()
            yield event("info", f"Restoring to {cp.id}...")
            live = sprites.disk_image(row.id)
            incoming = live.with_name("disk.img.restoring")
            incoming.unlink(missing_ok=True)
            try:
                await sprites.volume.clone(sprites.checkpoint_image(row.id, cp.id), incoming)
            except BaseException:
                incoming.unlink(missing_ok=True)
                raise
            # The restore is committed by this rename, while the sprite still runs on the
            # old image (its loop device holds the replaced file open). From here on a
            # crash brings the sprite back restored, so the old disk's unwritten pages can
            # be dropped instead of flushed.
            os.replace(incoming, live)
            sprites.store.update_sprite(row.id, current_checkpoint=cp.id, updated_at=now())
            yield event("info", "Stopping sprite...")
            await sprites.stop_locked(row.id, discard_disk=True)
            snapshot = sprites.checkpoint_memory(row.id, cp.id)
            resume = memory and sprites.rt(row.id).memory_snapshots and snapshot.exists()
            yield event("info", "Resuming sprite from memory..." if resume
                        else "Starting sprite...")
            try:
                await sprites.handle_locked(sprites.row(row.name),
                                            snapshot if resume else None)
            except Exception as exc:
                if not resume:
                    raise
                # a snapshot QEMU cannot load (taken by an older device layout, damaged):
                # the checkpoint's disk is in place, and boots
                log.warning("checkpoint %s of %s: its memory could not be resumed (%s); "
                            "the sprite boots from its disk", cp.id, row.name, exc)
                yield event("info", "The memory snapshot could not be resumed; starting "
                                    "sprite from its disk...")
                await sprites.handle_locked(sprites.row(row.name))
        yield event("complete", f"Restored to {cp.id}", id=cp.id)

    # -- delete ---------------------------------------------------------------------------
    async def delete(self, name: str, cp_id: str) -> None:
        row = self.sprites.row(name)
        cp = self.get(name, cp_id)
        if cp.id == "v0":
            raise Conflict("v0 is the empty disk every sprite can be reset to; it stays")
        if cp.id == row.current_checkpoint:
            raise Conflict(f"checkpoint {cp.id} is the one the sprite is running from")
        self.sprites.volume.require()
        async with self.sprites.lock(row.id):
            self.store.delete_checkpoint(row.id, cp.id)
            self.sprites.checkpoint_image(row.id, cp.id).unlink(missing_ok=True)
            self.sprites.checkpoint_memory(row.id, cp.id).unlink(missing_ok=True)
