"""Base snapshots: a new VM sprite starts from memory instead of booting a kernel.

For each kind of VM (base image, RAM and CPUs, boot assets: `Runtime.snapshot_key`) a
guest is booted once on a fresh empty disk and snapshotted as soon as its agent answers:
its memory and its disk at that instant are kept under `vm-bases/<key>/` on the volume.
A create then clones both for the new sprite (metadata-only `juicefs clone`s): the disk
becomes its disk and the memory its hibernation file, so its first start resumes that
guest, and the driver tells it who it is (hostname, address, MAC, clock, fresh entropy),
as for a fork. The first create of a kind boots as before and has the snapshot made in the
background for the next ones; a snapshot that fails to resume falls back to booting.

The build runs as a sprite with no record (`sprite-base-…`): if the server dies during
it, the next start's sweep of unrecorded sprites stops its VM and removes its network.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wisp.images import Image
from wisp.runtime.base import Limits, Runtime

if TYPE_CHECKING:
    from wisp.sprites import Sprites

__all__ = ["BaseSnapshots"]

log = logging.getLogger("wisp.base_snapshots")

DISK = "disk.img"
MEMORY = "memory.mem"
META = "meta.json"


class BaseSnapshots:
    def __init__(self, sprites: Sprites) -> None:
        self.sprites = sprites
        self._building: dict[str, asyncio.Task[None]] = {}

    @property
    def root(self) -> Path:
        return self.sprites.volume.path("vm-bases")

    def recover(self) -> None:
        """Half-made snapshots a crash left (hidden directories)."""
        if self.root.exists():
            for entry in self.root.iterdir():
                if entry.name.startswith("."):
                    shutil.rmtree(entry, ignore_errors=True)

    async def take(self, sprite_id: str, rt: Runtime, image: Image, limits: Limits) -> bool:
        """Give the new sprite `sprite_id` its disk and, as its hibernation file, its
        memory from the base snapshot of its kind. False when there is none yet: the
        caller gives it an empty disk (it boots), and one is made in the background."""
        if not rt.memory_snapshots:
            return False
        key = await rt.snapshot_key(limits, image.version)
        ready = self.root / key
        if not (ready / META).exists():
            self._build_later(key, rt, image, limits)
            return False
        volume = self.sprites.volume
        await volume.clone(ready / DISK, self.sprites.disk_image(sprite_id))
        try:
            await volume.clone(ready / MEMORY, self.sprites.hibernation(sprite_id))
        except BaseException:
            self.sprites.disk_image(sprite_id).unlink(missing_ok=True)
            raise
        return True

    def _build_later(self, key: str, rt: Runtime, image: Image, limits: Limits) -> None:
        if key in self._building:
            return
        task = asyncio.create_task(self._build(key, rt, image, limits))
        self._building[key] = task
        self.sprites.track(task)
        task.add_done_callback(lambda _: self._building.pop(key, None))

    async def _build(self, key: str, rt: Runtime, image: Image, limits: Limits) -> None:
        sprites = self.sprites
        build_id = f"sprite-base-{uuid.uuid4().hex[:16]}"
        tmp = self.root / f".{key}.{build_id}"
        try:
            await asyncio.to_thread(tmp.mkdir, parents=True)
            work = tmp / "disk.work"
            await sprites.volume.clone(sprites.template, work)
            try:
                net = await sprites.network.attach(build_id)
                await rt.start(build_id, "sprite", sprites.rootfs_dir(build_id),
                               sprites.sprites_run / build_id, limits, net.netns, None,
                               None, disk_image=work, base_rootfs=image.rootfs)

                async def copy_disk() -> None:
                    await sprites.volume.clone(work, tmp / DISK)

                await rt.snapshot(build_id, tmp / MEMORY, copy_disk, resume=False)
            finally:
                await asyncio.shield(self._discard_build(build_id, rt))
            work.unlink()
            meta: dict[str, Any] = {"image": image.name, "image_version": image.version,
                                    "memory_mb": limits.memory_mb, "cpus": limits.cpus}
            (tmp / META).write_text(json.dumps(meta))
            try:
                os.rename(tmp, self.root / key)
            except OSError:  # another server made it first
                return
            log.info("base snapshot %s ready: VM sprites of %s (%d MB) start from memory",
                     key, image.name, limits.memory_mb)
            await asyncio.to_thread(self._prune, key, meta)
        except Exception as exc:
            log.warning("making a base snapshot of %s failed: %s", image.name, exc)
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)

    async def _discard_build(self, build_id: str, rt: Runtime) -> None:
        await rt.stop(build_id)
        await self.sprites.network.detach(build_id)
        await asyncio.to_thread(shutil.rmtree, self.sprites.sprites_run / build_id, True)

    def _prune(self, key: str, meta: dict[str, Any]) -> None:
        """Snapshots this one supersedes: the same image name and size, an older version
        or older boot assets (a snapshot never changes once made)."""
        for entry in self.root.iterdir():
            if entry.name == key or entry.name.startswith("."):
                continue
            try:
                other = json.loads((entry / META).read_text())
            except (OSError, ValueError):
                continue
            if (other.get("image"), other.get("memory_mb"), other.get("cpus")) == (
                    meta["image"], meta["memory_mb"], meta["cpus"]):
                shutil.rmtree(entry, ignore_errors=True)
