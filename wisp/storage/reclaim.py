"""Give the host back the space of files deleted inside sprites.

The path of a block freed in a sprite: its ext4 is mounted with `discard`
(`wisp.storage.disk`), so the next journal commit (within 5 s) discards the block; the loop
device turns that into a punched hole in `disk.img`; JuiceFS records the hole as a zero
slice laid over the chunk. The chunk's old slices, and with them the objects in the chunk
store (and their cached copies), stay until the chunk is compacted, and JuiceFS compacts a
chunk by itself only once it holds many slices (every 100th write to it, or a read of it
with 5 or more). A delete alone would free nothing.

`Reclaimer` closes that gap. Every `interval` seconds it reads each loop device's count of
completed discards from sysfs and compacts (`Volume.compact`, `juicefs compact`) the image
of every sprite disk whose device discarded since the last pass. A chunk whose every byte
was discarded compacts to nothing, and JuiceFS deletes its objects at once (the volume has
no trash). Only disks that discarded are compacted: compaction rewrites every chunk that
holds more than one slice, which costs I/O, and space while a checkpoint still shares the
old slices.

A compaction holds the sprite's lock, as every clone of its disk does (checkpoint, fork):
with Redis metadata, JuiceFS 1.4's clone can race a compaction of its source and point at
slices the compaction deletes (docs/storage.md, Known issues). A sprite whose lock is taken
is tried again at the next pass.

A loop device keeps its counters after it is detached, so discards a sprite made while
stopping (its unmount commits the journal) are seen at the next pass and the image it
backed last is compacted; `stop` runs one last pass after the sprites have stopped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from wisp.errors import StorageUnavailable, WispError
from wisp.storage.juicefs import Volume

__all__ = ["Reclaimer", "loop_discards"]

log = logging.getLogger("wisp.storage")

#: Field of /sys/block/<dev>/stat: discard requests completed (Linux 4.18 and later).
_DISCARDS_FIELD = 11
#: The last pass at server stop gives up after this long; JuiceFS's own compaction, or a
#: later delete in the same sprite, frees what it leaves.
_FINAL_PASS_TIMEOUT = 30.0


def loop_discards() -> dict[str, tuple[str, str | None]]:
    """For every loop device: (its discard counter, its backing file or None if detached).

    The counter is kept as text and only compared: a kernel without discard statistics
    gives the whole stat line instead, which changes on any I/O (then a disk is compacted
    after any write, not only after a delete)."""
    found: dict[str, tuple[str, str | None]] = {}
    for entry in Path("/sys/block").glob("loop*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.split()
        counter = fields[_DISCARDS_FIELD] if len(fields) > _DISCARDS_FIELD else stat
        try:
            backing: str | None = (entry / "loop" / "backing_file").read_text().strip()
        except OSError:
            backing = None
        found[entry.name] = (counter, backing)
    return found


@dataclass
class _Seen:
    discards: str
    image: Path | None  # the sprite disk the device backed at that pass


class Reclaimer:
    """Compact the disk images of sprites that deleted data, a pass every `interval` s.

    `lock(sprite_id)` is the sprite's lock (`Sprites.lock`); it is held for each
    compaction. An interval of 0 turns the reclaimer off: discards still punch holes, and
    JuiceFS frees their chunks when it compacts them on its own."""

    def __init__(self, volume: Volume, lock: Callable[[str], asyncio.Lock],
                 interval: float) -> None:
        self.volume = volume
        self.interval = interval
        self._lock = lock
        self._sprites_dir = ""  # set by start(), once the volume is mounted
        self._seen: dict[str, _Seen] = {}
        self._pending: set[Path] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Take every loop device's counter as it is now, then run passes in the background.

        Call once the volume is mounted and the host cleared: discards counted before this
        (other users of loop devices, an earlier server) are not ours to act on."""
        if self.interval <= 0 or self._task is not None:
            return
        self._sprites_dir = os.path.realpath(self.volume.path("sprites"))
        self._seen = {dev: _Seen(count, self._sprite_disk(backing))
                      for dev, (count, backing) in loop_discards().items()}
        self._task = asyncio.create_task(self._run(), name="disk-space-reclaimer")

    async def stop(self) -> None:
        """Stop the passes, then one last one for what the stopped sprites discarded."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        if not self.volume.available:
            return
        try:
            await asyncio.wait_for(self.reclaim(), _FINAL_PASS_TIMEOUT)
        except TimeoutError:
            log.warning("reclaiming deleted space at stop took over %.0fs; left to JuiceFS",
                        _FINAL_PASS_TIMEOUT)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reclaim()
            except Exception:  # pragma: no cover - logged; the next pass tries again
                log.exception("reclaiming deleted space failed")

    async def reclaim(self) -> None:
        """One pass: find the disks that discarded since the last pass and compact them."""
        self._scan()
        for image in sorted(self._pending):
            lock = self._lock(image.parent.name)
            if lock.locked():
                continue  # a checkpoint, restore or stop is at work: next pass
            async with lock:
                self._pending.discard(image)
                await self._compact(image)

    def _scan(self) -> None:
        for dev, (count, backing) in loop_discards().items():
            image = self._sprite_disk(backing)
            seen = self._seen.get(dev)
            # a device made after start() began at zero
            if count != (seen.discards if seen is not None else "0"):
                if seen is not None and seen.image is not None:
                    self._pending.add(seen.image)  # it may have discarded before detaching
                if image is not None:
                    self._pending.add(image)
            self._seen[dev] = _Seen(count, image)

    def _sprite_disk(self, backing: str | None) -> Path | None:
        """`<mount>/sprites/<id>/disk.img` if that is what `backing` is, else None (other
        users' loop devices, a probe mount, a disk already replaced: "... (deleted)")."""
        if backing is None or os.path.basename(backing) != "disk.img":
            return None
        sprite_dir = os.path.dirname(backing)
        if os.path.dirname(sprite_dir) != self._sprites_dir:
            return None
        return Path(backing)

    async def _compact(self, image: Path) -> None:
        if not await asyncio.to_thread(image.exists):  # deleted: its chunks went with it
            return
        started = time.monotonic()
        try:
            await self.volume.compact(image)
        except StorageUnavailable:
            self._pending.add(image)  # the mount is down: after it is back
            return
        except WispError as exc:
            log.warning("compacting %s to free deleted space failed: %s", image, exc)
            return
        log.debug("compacted %s in %.0f ms", image, (time.monotonic() - started) * 1000)
