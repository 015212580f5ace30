"""Sprites: the lifecycle of each sprite and the one seam where its actions are legal.

States (the contract's `status`, docs/lifecycle.md):

    cold ──start (any exec, fs, checkpoint…)──▶ running
    running ──idle `warm_after` / `wisp sleep`──▶ warm (frozen, disk synced)
    warm ──any call that needs the sprite──▶ running
    running, warm ──idle `cold_after` / `wisp sleep --cold`──▶ cold
    running, warm ──server shutdown / storage lost──▶ cold

Records: `creating` ─▶ `ready` ─▶ `deleting` ─▶ (gone). A start after a crash finishes a
`deleting` sprite and removes a `creating` one, so no half-made sprite survives.

Boot order of a sprite: storage (loop-mounted ext4 on JuiceFS) → overlay root → container.
Stop is the reverse. Every action on one sprite holds that sprite's lock, so a restore and
an exec never see the disk half swapped; exec's fast path on a running sprite takes no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wisp import resources, services
from wisp.base_snapshots import BaseSnapshots
from wisp.config import Config, idle_seconds
from wisp.db import CheckpointRow, SpriteRow, Store, now
from wisp.errors import BadRequest, InvalidName, SpriteExists, SpriteNotFound, SystemError_
from wisp.lifecycle import TASKS_DIR, Activity, Task, read_task_files
from wisp.network import Network, policy
from wisp.runtime.base import Limits, Runtime, SpriteHandle
from wisp.storage import disk
from wisp.storage.juicefs import Volume
from wisp.system import loop_backings, mounts_under, pid_alive, run

if TYPE_CHECKING:
    from wisp.exec.sessions import SessionRegistry
    from wisp.images import Image, ImageStore

__all__ = ["Sprites", "NAME_RE", "validate_name"]

log = logging.getLogger("wisp.sprites")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
TEMPLATE = "empty-v1.img"
ENV_VERSION = "wisp-0.1.0"


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid sprite name {name!r}: use 1-63 lowercase letters, digits and '-', "
            "starting with a letter or digit")
    return name


@dataclass
class _Live:
    handle: SpriteHandle
    init_pid: int
    #: "running"; "warm": every process frozen by the cgroup freezer, the disk synced;
    #: "stopping": being torn down (`_stop`), shown as running until it is gone.
    state: str = "running"
    #: (warm_after, cold_after) of its record (`Sprites.idle_timers`), kept here so that
    #: the sleeper's twice-a-second check reads no database.
    timers: tuple[float, float] = (0.0, 0.0)


@dataclass
class _Warm:
    """A booted sprite with no record yet: its id, base image version and init pid."""

    id: str
    image_version: str
    init_pid: int


class Sprites:
    """Owns every sprite on this host: records, disks, mounts and runtime."""

    def __init__(self, config: Config, store: Store, volume: Volume, images: ImageStore,
                 runtime: Runtime, sessions: SessionRegistry,
                 network: Network, vm: Runtime | None = None) -> None:
        self.config = config
        self.store = store
        self.volume = volume
        self.images = images
        #: The container driver (also what warm-pool sprites run on) ...
        self.runtime = runtime
        #: ... and every driver by the name a sprite records (`runtime_of`).
        self.runtimes: dict[str, Runtime] = {runtime.name: runtime}
        if vm is not None:
            self.runtimes[vm.name] = vm
        self.network = network
        self.sessions = sessions
        self.sprites_run = config.run_dir / "sprites"
        self._locks: dict[str, asyncio.Lock] = {}
        self._live: dict[str, _Live] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._pool_task: asyncio.Task[None] | None = None
        self._warm: list[_Warm] = []
        self._warm_task: asyncio.Task[None] | None = None
        #: What keeps each sprite awake (docs/lifecycle.md); `wisp.lifecycle.Sleeper` reads it.
        self.activity = Activity(config.run_dir / "tasks")
        #: ext4 metadata (journal, inode tables) an empty disk already uses; not user data.
        self.empty_disk_bytes = 0
        #: What a new VM sprite resumes instead of booting (docs/vm.md).
        self.bases = BaseSnapshots(self)

    # -- paths ----------------------------------------------------------------------------
    def volume_dir(self, sprite_id: str) -> Path:
        return self.volume.path("sprites", sprite_id)

    def disk_image(self, sprite_id: str) -> Path:
        return self.volume_dir(sprite_id) / "disk.img"

    def checkpoint_image(self, sprite_id: str, cp_id: str) -> Path:
        """Where checkpoint `cp_id` lives; v0, the empty disk, is the shared template."""
        if cp_id == "v0":
            return self.template
        return self.volume_dir(sprite_id) / "checkpoints" / f"{cp_id}.img"

    def hibernation(self, sprite_id: str) -> Path:
        """A cold VM sprite's memory (docs/vm.md, "Hibernation"): written as it goes cold,
        resumed and removed as it wakes; on the volume, so in object storage with S3."""
        return self.volume_dir(sprite_id) / "hibernated.mem"

    def checkpoint_memory(self, sprite_id: str, cp_id: str) -> Path:
        """Checkpoint `cp_id`'s memory snapshot, beside its disk (VM sprites: docs/vm.md)."""
        return self.volume_dir(sprite_id) / "checkpoints" / f"{cp_id}.mem"

    def disk_dir(self, sprite_id: str) -> Path:
        return self.sprites_run / sprite_id / "disk"

    def info_dir(self, sprite_id: str) -> Path:
        """On the sprite's disk beside its root's upper layer: /.sprite, read-only inside."""
        return self.disk_dir(sprite_id) / "sprite"

    def settings_dir(self, sprite_id: str) -> Path:
        """Where the sprite's egress policy and service definitions are kept: on its disk
        (`info_dir`, so a checkpoint and a fork carry them), or for a sprite whose disk the
        host does not mount (a VM), beside its disk image on the volume."""
        return self.info_dir(sprite_id) if self.rt(sprite_id).host_rootfs else \
            self.volume_dir(sprite_id)

    def rootfs_dir(self, sprite_id: str) -> Path:
        return self.sprites_run / sprite_id / "rootfs"

    @property
    def template(self) -> Path:
        return self.volume.path("templates", TEMPLATE)

    def data_bytes(self, sprite_id: str) -> int:
        """What the running sprite's disk holds beyond an empty disk: a checkpoint's cost
        (for a disk the host does not mount, what its image file holds)."""
        if not self.rt(sprite_id).host_rootfs:
            try:
                held = os.stat(self.disk_image(sprite_id)).st_blocks * 512
                empty = os.stat(self.template).st_blocks * 512
            except OSError:
                return 0
            return max(0, held - empty)
        return max(0, disk.used_bytes(self.disk_dir(sprite_id)) - self.empty_disk_bytes)

    def rt(self, sprite_id: str) -> Runtime:
        """The driver the sprite runs on (warm-pool sprites, which have no record yet, and
        sprites made before there was a choice run on containers)."""
        row = self.store.sprite(sprite_id)
        return self.runtimes.get(runtime_of(row) if row else "container", self.runtime)

    def _handle(self, row: SpriteRow) -> SpriteHandle:
        """What exec and the filesystem API use to reach the running sprite."""
        rt = self.rt(row.id)
        return rt.handle(row.id, SpriteHandle(name=row.name, rootfs=self.rootfs_dir(row.id),
                                              agent_socket=rt.agent_socket(row.id),
                                              env=tuple(sorted(row.environment.items()))))

    def lock(self, sprite_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sprite_id, asyncio.Lock())

    # -- lookups --------------------------------------------------------------------------
    def row(self, name: str) -> SpriteRow:
        row = self.store.sprite_by_name(name) if isinstance(name, str) else None
        if row is None or row.state != "ready":
            raise SpriteNotFound(str(name))
        return row

    def status(self, row: SpriteRow) -> str:
        live = self._live.get(row.id)
        if live is None:
            return "cold"
        if live.state == "stopping":  # until its last mount is gone, it is not cold
            return "running"
        return live.state if pid_alive(live.init_pid) else "cold"

    def idle_timers(self, row: SpriteRow) -> tuple[float, float]:
        """(warm_after, cold_after) in seconds for this sprite, 0 meaning never: its
        `lifecycle` override, else the server's."""
        own = row.config.get("lifecycle") or {}
        return (float(own.get("warm_after", self.config.warm_after)),
                float(own.get("cold_after", self.config.cold_after)))

    def to_json(self, row: SpriteRow) -> dict[str, Any]:
        return {
            "id": row.id,
            "name": row.name,
            "organization": self.config.org,
            "status": self.status(row),
            "url": self.url(row.name),
            "url_settings": {"auth": "sprite", **row.url_settings},
            "labels": list(row.labels),
            "version": ENV_VERSION,
            "environment_version": ENV_VERSION,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "last_running_at": row.last_running_at,
            "last_warming_at": row.last_warming_at,
            "config": self._config_json(row),
            "environment": dict(row.environment),
            "image": f"{row.image}@{row.image_version}",
            "lifecycle": dict(zip(("warm_after", "cold_after"), self.idle_timers(row),
                                  strict=True)),
            **self._runtime_json(row),
        }

    def _runtime_json(self, row: SpriteRow) -> dict[str, Any]:
        """Extension fields (docs/vm.md): the sprite's driver, and a VM's accelerator."""
        kind = runtime_of(row)
        out: dict[str, Any] = {"runtime": kind}
        if kind == "vm":
            out["accelerator"] = getattr(self.runtimes.get(kind), "accelerator", None)
        return out

    def _config_json(self, row: SpriteRow) -> dict[str, Any]:
        """The contract's `config`: its limits (docs/resources.md), in whole units."""
        limits = resources.limits_for(self.config, row.config)
        return {"ram_mb": limits.memory_mb, "cpus": max(1, int(limits.cpus)),
                "region": "local", "storage_gb": 100}

    def url(self, name: str, port: int | None = None) -> str:
        """The sprite's URL (docs/urls.md): `http://NAME.<urls domain>:<listen port>`, or
        with `port` the form that reaches that port in the sprite, `PORT--NAME.…`."""
        listen = self.config.listen_host_port[1]
        prefix = f"{port}--" if port is not None else ""
        suffix = "" if listen == 80 else f":{listen}"
        return f"http://{prefix}{name}.{self.config.urls.domain}{suffix}"

    def counts(self) -> dict[str, int]:
        rows = self.store.sprites()
        running = sum(1 for r in rows if self.status(r) == "running")
        warm = sum(1 for r in rows if self.status(r) == "warm")
        return {"running": running, "warm": warm, "cold": len(rows) - running - warm}

    # -- create / delete ------------------------------------------------------------------
    def _base_image(self, name: str | None = None) -> Image:
        image = self.images.latest(name or self.config.image)
        if image is None:
            raise SystemError_(f"base image '{name or self.config.image}' is not built; run "
                               "`wisp image build`")
        return image

    async def create(self, name: str, labels: list[str] | None = None,
                     url_settings: dict[str, Any] | None = None,
                     environment: dict[str, str] | None = None,
                     source: tuple[SpriteRow, str | None] | None = None,
                     lifecycle: dict[str, float] | None = None,
                     runtime: str | None = None) -> SpriteRow:
        """Make a sprite's record and disk; with `source` (sprite, checkpoint or None for its
        live state) the disk is a clone of that sprite's — a fork."""
        validate_name(name)
        # a fork runs on its source's driver: a memory snapshot belongs to one
        kind = runtime_of(source[0]) if source is not None else (
            runtime or self.config.runtime)
        if kind not in RUNTIMES:
            raise BadRequest(f"runtime must be one of {', '.join(RUNTIMES)}")
        if kind not in self.runtimes:
            raise BadRequest(f"this server has no {kind} runtime")
        if self.store.sprite_by_name(name) is not None:
            raise SpriteExists(name)
        self.volume.require()
        if source is not None:
            image_name, image_version = source[0].image, source[0].image_version
            if self.images.get(image_name, image_version) is None:
                raise SystemError_(f"source image {image_name}@{image_version} is gone")
        else:
            base = self._base_image()
            image_name, image_version = base.name, base.version
        stamp = now()
        warm = (self._take_warm(image_version)
                if source is None and kind == self.runtime.name else None)
        row = SpriteRow(id=warm.id if warm else "sprite-" + str(uuid.uuid4()), name=name,
                        state="creating",
                        image=image_name, image_version=image_version,
                        labels=list(labels or []), url_settings=dict(url_settings or {}),
                        environment=dict(environment or {}), created_at=stamp,
                        updated_at=stamp,
                        config=_new_config(lifecycle, source[0] if source else None, kind))
        try:
            self.store.insert_sprite(row)
        except Exception as exc:  # sqlite3.IntegrityError: a concurrent create won
            if warm is not None:
                self._warm.append(warm)
            raise SpriteExists(name) from exc
        try:
            async with self.lock(row.id):
                cps = self.volume_dir(row.id) / "checkpoints"
                await asyncio.to_thread(cps.mkdir, parents=True, exist_ok=True)
                if warm is not None:
                    pass  # its disk is in place and mounted already
                elif source is None:
                    if not await self.bases.take(
                            row.id, self.rt(row.id), base,
                            resources.limits_for(self.config, row.config)):
                        await self._fresh_disk(self.disk_image(row.id))
                else:
                    await self._clone_from(source[0], source[1], row.id)
                self.store.insert_checkpoint(
                    CheckpointRow(sprite_id=row.id, id="v0", seq=0, comment="empty disk",
                                  create_time=stamp, source_id=None, history=[],
                                  size_bytes=0), next_seq=1)
                self.store.update_sprite(row.id, state="ready")
                row.state = "ready"
                if warm is not None:
                    await self._adopt(row, warm)
        except BaseException:
            await asyncio.shield(self._purge(row.id))
            raise
        finally:
            if warm is not None:
                self._refill_warm()
        return row

    # -- warm sprites ---------------------------------------------------------------------
    def _take_warm(self, image_version: str) -> _Warm | None:
        while self._warm:
            warm = self._warm.pop(0)
            if warm.image_version == image_version and pid_alive(warm.init_pid):
                return warm
            self._discard_warm(warm)  # an older image, or died: not worth handing out
        return None

    async def _adopt(self, row: SpriteRow, warm: _Warm) -> None:
        """Turn a warm sprite into `row`: name it; it is running from this moment on.
        If naming fails the sprite is stopped and simply boots on its first request."""
        try:
            await self.runtime.rename(row.id, row.name)
        except Exception as exc:
            log.warning("naming warm sprite %s failed (%s); it will boot cold", row.id, exc)
            await self._stop(row.id)
            return
        handle = self._handle(row)
        self._live[row.id] = _Live(handle, warm.init_pid, timers=self.idle_timers(row))
        self.activity.touch(row.id)
        self.store.update_sprite(row.id, last_running_at=now())

    def _discard_warm(self, warm: _Warm) -> None:
        async def discard() -> None:
            await self._purge_unrecorded(warm.id)

        self.track(asyncio.create_task(discard()))

    def track(self, task: asyncio.Task[Any]) -> None:
        """Background work the server's stop cancels and waits for (`stop_all`)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _purge_unrecorded(self, sprite_id: str) -> None:
        """Remove a sprite's runtime, mounts and files, in reverse boot order (all of a warm
        sprite, which has no record)."""
        await self._stop(sprite_id, discard=True)
        if self.volume.available:
            await asyncio.to_thread(shutil.rmtree, self.volume_dir(sprite_id), True)
        await asyncio.to_thread(shutil.rmtree, self.sprites_run / sprite_id, True)

    def _refill_warm(self) -> None:
        if self.config.warm_pool <= 0 or (self._warm_task and not self._warm_task.done()):
            return

        async def refill() -> None:
            while len(self._warm) < self.config.warm_pool:
                sprite_id = "sprite-" + str(uuid.uuid4())
                try:
                    image = self._base_image()
                    self.volume.require()
                    cps = self.volume_dir(sprite_id) / "checkpoints"
                    await asyncio.to_thread(cps.mkdir, parents=True, exist_ok=True)
                    await self._fresh_disk(self.disk_image(sprite_id))
                    rootfs = self.rootfs_dir(sprite_id)
                    await disk.mount_disk(self.disk_image(sprite_id), self.disk_dir(sprite_id),
                                          image.rootfs, rootfs)
                    net = await self.network.attach(sprite_id)
                    info = self.info_dir(sprite_id)
                    await asyncio.to_thread(info.mkdir, mode=0o755, exist_ok=True)
                    await self.runtime.start(sprite_id, "sprite", rootfs,
                                             self.sprites_run / sprite_id,
                                             Limits(self.config.memory_mb, self.config.cpus,
                                                    self.config.pids), net.netns,
                                             net.resolv_conf, info)
                    pid = self.runtime.init_pid(sprite_id)
                    if pid is None:
                        raise SystemError_("warm sprite's init is gone")
                    self._warm.append(_Warm(sprite_id, image.version, pid))
                except BaseException as exc:
                    await asyncio.shield(self._purge_unrecorded(sprite_id))
                    if not isinstance(exc, Exception):
                        raise
                    log.info("preparing a warm sprite failed: %s", exc)
                    return

        self._warm_task = asyncio.create_task(refill())

    # -- prepared disks ---------------------------------------------------------------------
    POOL_SIZE = 2

    @property
    def pool_dir(self) -> Path:
        return self.volume.path("pool")

    async def _fresh_disk(self, dst: Path) -> None:
        """Move a prepared empty disk into place (a rename), or clone the template if none
        is ready; then top the pool up in the background."""
        taken = False
        try:
            for ready in sorted(self.pool_dir.glob("*.img")):
                try:
                    os.rename(ready, dst)
                except FileNotFoundError:  # another create took it first
                    continue
                taken = True
                break
        except OSError:
            taken = False
        if not taken:
            await self.volume.clone(self.template, dst)
        self._refill_pool()

    def _refill_pool(self) -> None:
        if self._pool_task is not None and not self._pool_task.done():
            return

        async def refill() -> None:
            try:
                self.pool_dir.mkdir(exist_ok=True)
                while len(list(self.pool_dir.glob("*.img"))) < self.POOL_SIZE:
                    tmp = self.pool_dir / f"{uuid.uuid4()}.tmp"
                    await self.volume.clone(self.template, tmp)
                    os.rename(tmp, tmp.with_suffix(".img"))
            except Exception as exc:
                log.info("refilling the prepared-disk pool failed: %s", exc)

        self._pool_task = asyncio.create_task(refill())

    async def _clone_from(self, src: SpriteRow, checkpoint: str | None, dst_id: str) -> None:
        """Clone another sprite's checkpoint, or its live disk frozen for the clone only.
        On a driver with `memory_snapshots` its memory comes along (the live memory, the
        checkpoint's, or a cold sprite's hibernated one) as the new sprite's hibernation
        file: its first start resumes the source's processes, under its own identity
        (docs/vm.md, "Forks"). Its egress policy and services come along too."""
        dst = self.disk_image(dst_id)
        memory = self.hibernation(dst_id) if self.rt(dst_id).memory_snapshots else None
        if not self.rt(dst_id).host_rootfs:  # kept off its disk: copied here
            for name in (policy.FILE, Path(services.FILE)):
                if (self.settings_dir(src.id) / name).exists():
                    await asyncio.to_thread((self.settings_dir(dst_id) / name).parent.mkdir,
                                            parents=True, exist_ok=True)
                    await self.volume.clone(self.settings_dir(src.id) / name,
                                            self.settings_dir(dst_id) / name)
        if checkpoint is not None:
            await self.volume.clone(self.checkpoint_image(src.id, checkpoint), dst)
            snapshot = self.checkpoint_memory(src.id, checkpoint)
            if memory is not None and snapshot.exists():
                await self.volume.clone(snapshot, memory)
            return
        async with self.lock(src.id):
            hibernated = self.hibernation(src.id)
            if memory is not None and src.id not in self._live and hibernated.exists():
                await self.volume.clone(hibernated, memory)
                await self.volume.clone(self.disk_image(src.id), dst)
                return
            await self.consistent_clone(src, dst, memory)

    async def consistent_clone(self, row: SpriteRow, dst: Path,
                               memory: Path | None = None) -> bool:
        """Clone `row`'s disk image to `dst` as a crash-consistent point in time, and with
        `memory`, on a driver with `memory_snapshots`, write the running sprite's memory
        there at that same instant. True when `memory` was written.

        Caller holds the sprite's lock. A running (or warm) sprite is held still by its
        runtime for the metadata clone alone (`Runtime.quiesced`).
        """
        live = self._live.get(row.id)
        if live is None or not pid_alive(live.init_pid):
            await self.volume.clone(self.disk_image(row.id), dst)
            return False
        rt = self.rt(row.id)
        if memory is not None and rt.memory_snapshots:
            async def copy_disk() -> None:
                await self.volume.clone(self.disk_image(row.id), dst)

            await rt.snapshot(row.id, memory, copy_disk)
            return True
        async with rt.quiesced(row.id, self.disk_dir(row.id)):
            await self.volume.clone(self.disk_image(row.id), dst)
        return False

    async def delete(self, name: str) -> None:
        row = self.row(name)
        async with self.lock(row.id):
            self.store.update_sprite(row.id, state="deleting")
            await self._purge(row.id)
        self._locks.pop(row.id, None)

    async def _purge(self, sprite_id: str) -> None:
        """Remove every trace of a sprite, its record last; safe to repeat."""
        await self._purge_unrecorded(sprite_id)
        self.store.delete_sprite(sprite_id)

    # -- update / upgrade -----------------------------------------------------------------
    async def update(self, name: str, body: dict[str, Any]) -> SpriteRow:
        row = self.row(name)
        fields: dict[str, Any] = {}
        if "labels" in body and body["labels"] is not None:
            labels = body["labels"]
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise BadRequest("labels must be an array of strings")
            fields["labels"] = labels
        if body.get("clear_labels") is True:
            fields["labels"] = []
        if "url_settings" in body and body["url_settings"] is not None:
            fields["url_settings"] = check_url_settings(body["url_settings"])
        if "lifecycle" in body:
            config = dict(row.config)
            own = {**config.get("lifecycle", {}), **check_lifecycle(body["lifecycle"])}
            config["lifecycle"] = {k: v for k, v in own.items() if v is not None}
            if body["lifecycle"] is None or not config["lifecycle"]:
                config.pop("lifecycle")
            fields["config"] = config
        if not fields:
            raise BadRequest("nothing to update: send labels, clear_labels, url_settings "
                             "or lifecycle")
        fields["updated_at"] = now()
        self.store.update_sprite(row.id, **fields)
        row = self.row(name)
        live = self._live.get(row.id)
        if live is not None:
            live.timers = self.idle_timers(row)
        return row

    async def upgrade(self, name: str) -> SpriteRow:
        """Move the sprite onto the newest build of its base image, keeping its disk."""
        row = self.row(name)
        newest = self._base_image(row.image)
        if newest.version == row.image_version:
            return row
        async with self.lock(row.id):
            was_running = row.id in self._live
            if was_running:
                await self._terminate([row.id])
            await self._stop(row.id)
            self.hibernation(row.id).unlink(missing_ok=True)  # of the old image's disk
            self.store.update_sprite(row.id, image_version=newest.version, updated_at=now())
            if was_running:
                await self._start(self.row(name))
        return self.row(name)

    async def restart(self, name: str) -> SpriteRow:
        """End every process of the sprite and start it again; its disk is kept.

        The way back for a sprite its own processes wedged (a fork bomb, a hung agent): the
        processes get SIGTERM and `stop_grace` seconds, then the container is killed as a
        whole, which needs nothing from inside the sprite. A cold sprite just starts."""
        row = self.row(name)
        async with self.lock(row.id):
            row = self.same(row)
            if row.id in self._live:
                await self._terminate([row.id])
            await self._stop(row.id, restarting=True)
            self.hibernation(row.id).unlink(missing_ok=True)  # every process ends
            await self._start(row)
        return row

    def same(self, row: SpriteRow) -> SpriteRow:
        """`row` read again, for a caller that waited for the sprite's lock: the sprite may
        have been deleted meanwhile (and its name even taken by a new one)."""
        current = self.store.sprite_by_name(row.name)
        if current is None or current.id != row.id or current.state != "ready":
            raise SpriteNotFound(row.name)
        return current

    # -- run / stop -----------------------------------------------------------------------
    async def handle(self, name: str) -> SpriteHandle:
        """The running sprite, woken first if it is cold (requests wait, never fail)."""
        row = self.row(name)
        live = self._live.get(row.id)
        if live is not None and live.state == "running" and pid_alive(live.init_pid):
            self.activity.touch(row.id)
            return live.handle
        async with self.lock(row.id):
            return await self._start(self.row(name))

    async def connect(self, name: str, host: str, port: int
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """A TCP connection to `host:port` inside the sprite (woken first), and the target
        as "ip:port": for the URL and port proxies. Raises `DialError` (the message is fit
        for the client) when nothing answers there."""
        row = self.row(name)
        await self.handle(name)
        inside = await self.rt(row.id).dial(row.id, host, port)
        return inside if inside is not None else await self.network.connect(row.id, host, port)

    async def proc_net(self, row: SpriteRow) -> tuple[dict[str, str], Path | None]:
        """A running sprite's /proc/net/tcp and tcp6, and the network namespace their
        sockets are in when the host can see their owners (None for a VM: its processes
        are the guest's). Raises OSError when it stopped meanwhile."""
        tables = await self.rt(row.id).proc_net(row.id)
        if tables is not None:
            return tables, None
        return await self.network.proc_net(row.id), self.network.netns(row.id)

    async def stop_locked(self, sprite_id: str, *, discard_disk: bool = False) -> None:
        """For a caller holding the sprite's lock that starts it again at once
        (`handle_locked`): end it, keeping its network namespace. `discard_disk`: its disk
        image was just replaced (a restore), so the old disk's unwritten pages are dropped
        rather than flushed."""
        if discard_disk:  # a hibernated memory belongs to the disk that was replaced
            self.hibernation(sprite_id).unlink(missing_ok=True)
        await self._stop(sprite_id, discard=discard_disk, restarting=True)

    async def handle_locked(self, row: SpriteRow, memory: Path | None = None) -> SpriteHandle:
        """`handle` for a caller that already holds the sprite's lock; with `memory` (a
        stopped sprite, a driver with `memory_snapshots`) it starts from that memory
        snapshot, its processes going on where they were."""
        return await self._start(row, memory)

    async def _start(self, row: SpriteRow, memory: Path | None = None) -> SpriteHandle:
        live = self._live.get(row.id)
        if live is not None and pid_alive(live.init_pid):
            if live.state == "warm":
                await self._thaw(row.id, live)
                self.store.update_sprite(row.id, last_running_at=now())
            self.activity.touch(row.id)
            return live.handle
        self.volume.require()
        if live is not None:  # died behind our back: tear down before starting again
            await self._stop(row.id)
        image = self.images.get(row.image, row.image_version)
        if image is None:
            raise SystemError_(f"base image {row.image}@{row.image_version} of sprite "
                               f"'{row.name}' is missing")
        disk_dir, rootfs = self.disk_dir(row.id), self.rootfs_dir(row.id)
        rt = self.rt(row.id)
        hibernated = self.hibernation(row.id)
        if memory is None and rt.memory_snapshots and hibernated.exists():
            try:
                return await self._start(row, hibernated)
            except Exception as exc:
                log.warning("sprite %s could not resume from hibernation (%s); it boots",
                            row.name, exc)
            finally:
                hibernated.unlink(missing_ok=True)
        try:
            if rt.host_rootfs:
                await disk.mount_disk(self.disk_image(row.id), disk_dir, image.rootfs, rootfs)
            net = await self.network.attach(row.id)
            info = self.info_dir(row.id)
            if rt.host_rootfs:
                await asyncio.to_thread(info.mkdir, mode=0o755, exist_ok=True)
            # before the sprite's first packet: its processes are new (or, resumed from
            # memory, their connections are lost with the old address), so are its lookups
            await self.network.set_policy(
                row.id, await asyncio.to_thread(policy.load, self.settings_dir(row.id)),
                fresh=True)
            await rt.start(row.id, row.name, rootfs, self.sprites_run / row.id,
                           resources.limits_for(self.config, row.config), net.netns,
                           net.resolv_conf, info, disk_image=self.disk_image(row.id),
                           base_rootfs=image.rootfs, memory=memory)
        except BaseException:
            await asyncio.shield(self._stop(row.id))
            raise
        pid = rt.init_pid(row.id)
        if pid is None:
            await asyncio.shield(self._stop(row.id))
            raise SystemError_(f"sprite '{row.name}' stopped right after it started")
        handle = self._handle(row)
        self._live[row.id] = _Live(handle, pid, timers=self.idle_timers(row))
        self.activity.touch(row.id)
        self.store.update_sprite(row.id, last_running_at=now())
        if memory is None:  # resumed from memory, its agent has them running already
            await services.boot(self.settings_dir(row.id), handle)  # in `needs` order
        return handle

    def prestart(self, name: str) -> None:
        """Start a new sprite in the background: the first exec usually follows a create."""
        async def start() -> None:
            try:
                await self.handle(name)
            except Exception as exc:
                log.info("background start of %s failed: %s", name, exc)

        self.track(asyncio.create_task(start()))

    async def _stop(self, sprite_id: str, *, discard: bool = False,
                    restarting: bool = False) -> None:
        """Container, then overlay, then ext4 and its loop device. Idempotent.

        `discard`: the mounted disk will never be read again, so its unwritten pages are
        dropped rather than flushed. `restarting`: a start follows at once; keep what
        survives a restart (the network namespace, its veth and address: making them
        costs ~10 ms)."""
        live = self._live.get(sprite_id)
        try:
            if live is not None:
                live.state = "stopping"
                await self.sessions.close_sprite(live.handle.name)
            self.activity.forget(sprite_id)
            await self.rt(sprite_id).stop(sprite_id)
            if not restarting:
                await self.network.detach(sprite_id)
            await disk.unmount_disk(self.disk_dir(sprite_id), self.rootfs_dir(sprite_id),
                                    self.disk_image(sprite_id), discard=discard)
        finally:
            if self._live.get(sprite_id) is live:
                self._live.pop(sprite_id, None)

    # -- sleep and wake (docs/lifecycle.md) -------------------------------------------------
    async def _terminate(self, sprite_ids: list[str]) -> None:
        """SIGTERM and the grace period; a warm sprite is thawed first, or its frozen
        processes could not act on the signal."""
        for sprite_id in sprite_ids:
            live = self._live.get(sprite_id)
            if live is not None and live.state == "warm":
                await self._thaw(sprite_id, live)
        by_driver: dict[str, list[str]] = {}
        for sprite_id in sprite_ids:
            by_driver.setdefault(self.rt(sprite_id).name, []).append(sprite_id)
        await asyncio.gather(*(self.runtimes[kind].terminate(ids, self.config.stop_grace)
                               for kind, ids in by_driver.items()))

    async def _thaw(self, sprite_id: str, live: _Live) -> None:
        await self.rt(sprite_id).resume(sprite_id)
        live.state = "running"

    def sleep_candidates(self) -> list[tuple[str, str]]:
        """(sprite id, "warm" or "cold") for every live sprite idle past a timer."""
        return [(sprite_id, target) for sprite_id, live in list(self._live.items())
                if (target := self._due(sprite_id, live)) is not None]

    def _due(self, sprite_id: str, live: _Live) -> str | None:
        """The state the sprite should go to now, judged by its activity (sessions and
        API tasks included; its task files are read only under the lock)."""
        if self.sessions.active(live.handle.name) or self.activity.tasks(sprite_id):
            self.activity.touch(sprite_id)
            return None
        idle = self.activity.idle_for(sprite_id)
        warm_after, cold_after = live.timers
        if cold_after and idle >= cold_after:
            return "cold"
        if live.state == "running" and warm_after and idle >= warm_after:
            return "warm"
        return None

    async def sleep_if_idle(self, sprite_id: str, target: str) -> None:
        """Put the sprite to `target` if, under its lock, it is still idle that long and
        no task file inside it holds it."""
        async with self.lock(sprite_id):
            row = self.store.sprite(sprite_id)
            live = self._live.get(sprite_id)
            if row is None or row.state != "ready" or live is None:
                return
            if self._due(sprite_id, live) != target:
                return
            if await asyncio.to_thread(self._task_files, sprite_id):
                self.activity.touch(sprite_id)
                return
            await self._sleep(row, live, target)

    async def sleep(self, name: str, target: str) -> SpriteRow:
        """`wisp sleep`: put the sprite to `target` ("warm" or "cold") now, whatever its
        activity (its tasks end with a cold stop). A cold sprite stays cold."""
        row = self.row(name)
        async with self.lock(row.id):
            row = self.same(row)
            live = self._live.get(row.id)
            if live is not None and pid_alive(live.init_pid):
                await self._sleep(row, live, target)
        return self.row(name)

    async def _sleep(self, row: SpriteRow, live: _Live, target: str) -> None:
        """Caller holds the lock. Warm: sync, freeze, sync what was dirty at the freeze.
        Cold: what a server stop does to one sprite (SIGTERM, grace, then every process,
        mount, loop device and network device of it gone)."""
        if target == "warm":
            if live.state == "warm":
                return
            disk_dir = self.disk_dir(row.id)
            rt = self.rt(row.id)
            if rt.host_rootfs:  # a VM's disks are flushed by QEMU as it pauses
                await disk.sync(disk_dir)
            live.state = "warm"
            try:
                await rt.pause(row.id)
                if rt.host_rootfs:
                    await disk.sync(disk_dir)
            except BaseException:
                await asyncio.shield(rt.resume(row.id))
                live.state = "running"
                raise
            stamp = now()
            self.store.update_sprite(row.id, last_warming_at=stamp, last_running_at=stamp)
            log.info("sprite %s is warm", row.name)
            return
        if await self._hibernate(row.id):
            log.info("sprite %s is cold, hibernated", row.name)
            return
        await self._terminate([row.id])
        await self._stop(row.id)
        log.info("sprite %s is cold", row.name)

    async def _hibernate(self, sprite_id: str) -> bool:
        """Caller holds the lock. A running sprite whose driver has `memory_snapshots`
        goes cold keeping its processes: its memory to the volume, then stopped (the
        snapshot is not resumed, so its disk stays what the memory expects). False when
        the driver has none or the snapshot failed (the sprite then stops as any other)."""
        rt = self.rt(sprite_id)
        live = self._live.get(sprite_id)
        if not rt.memory_snapshots or live is None or not pid_alive(live.init_pid):
            return False
        path = self.hibernation(sprite_id)

        async def nothing() -> None:  # the disk stays in place, consistent with the memory
            return None

        try:
            await rt.snapshot(sprite_id, path, nothing, resume=False)
        except Exception as exc:
            log.warning("hibernating sprite %s failed (%s): it stops", sprite_id, exc)
            path.unlink(missing_ok=True)
            with contextlib.suppress(Exception):
                await rt.resume(sprite_id)
            return False
        await self._stop(sprite_id)
        return True

    def _task_files(self, sprite_id: str) -> list[Task]:
        root = self.rt(sprite_id).sprite_path(sprite_id, "/")
        return read_task_files(root, TASKS_DIR) if root is not None else []

    async def tasks(self, name: str) -> list[Task]:
        """The sprite's live tasks, from the API and from its task files (a cold sprite
        has none: a task holds the current run)."""
        row = self.row(name)
        files = await asyncio.to_thread(self._task_files, row.id) if self.status(
            row) != "cold" else []
        return sorted([*self.activity.tasks(row.id), *files], key=lambda t: t.name)

    async def set_task(self, name: str, task: str, seconds: float) -> Task:
        """Hold the sprite awake for `seconds` (woken first: a task holds a running one)."""
        await self.handle(name)
        row = self.row(name)
        return self.activity.set_task(row.id, task, seconds)

    def drop_task(self, name: str, task: str) -> None:
        self.activity.drop_task(self.row(name).id, task)

    # -- server start / stop --------------------------------------------------------------
    def survivors(self) -> set[str]:
        """Sprites an earlier server process left running (docs/lifecycle.md, "Server
        restarts"): recorded and ready, their init alive, their root mounted."""
        mounted = {point for point, _ in mounts_under(self.sprites_run)}
        return {row.id for row in self.store.all_sprites()
                if row.state == "ready" and (rt := self.rt(row.id)).init_pid(row.id) is not None
                and (not rt.host_rootfs
                     or os.path.realpath(self.rootfs_dir(row.id)) in mounted)}

    async def clear_host(self, keep: Collection[str] = ()) -> None:
        """Tear down whatever an earlier server process left running (reverse boot order),
        except the sprites in `keep`, which the next steps adopt.

        Runs before the volume is mounted: containers first, then every mount below our run
        dir, then loop devices whose backing files live on the volume.
        """
        # every container in our runc root, every recorded sprite, and warm sprites (which
        # have a run dir but no record), then each one's network namespace and veth
        known = {r.id for r in self.store.all_sprites()}
        for rt in self.runtimes.values():
            known |= set(await rt.list_ids())
        if self.sprites_run.exists():
            known |= {d.name for d in self.sprites_run.iterdir() if d.name.startswith("sprite-")}
        for sprite_id in sorted(known - set(keep)):
            for rt in self.runtimes.values():  # a warm sprite has no record to ask
                await rt.stop(sprite_id)
            await self.network.detach(sprite_id)
            self.activity.forget(sprite_id)  # its API tasks held the run that ended
        for row in self.store.all_sprites():  # and its sessions' files their processes
            if row.id not in keep:
                await self.sessions.close_sprite(row.name)
        kept_dirs = tuple(str(self.sprites_run / i) + "/" for i in keep)
        if self.sprites_run.exists():
            for point, _ in mounts_under(self.sprites_run):
                if (point + "/").startswith(kept_dirs):
                    continue
                await disk.thaw(Path(point))
                res = await run("umount", point, check=False)
                if res.returncode != 0:
                    await run("umount", "-l", point, check=False)
        kept_disks = {os.path.realpath(self.disk_image(i)) for i in keep}
        for dev, backing in loop_backings(self.config.mount_point).items():
            if backing not in kept_disks:
                await run("losetup", "-d", dev, check=False)
        if not keep:
            for rt in self.runtimes.values():
                rt.release()
        self._live.clear()

    async def adopt(self, sprite_ids: Collection[str]) -> int:
        """After `recover`: take over sprites an earlier server process left running, with
        their exec sessions. A warm (frozen) one is thawed: its agent must answer, and the
        idle timers freeze it again. Returns how many were adopted; one that cannot be is
        stopped (it starts again, cold, on its next request)."""
        async def one(sprite_id: str) -> bool:
            row = self.store.sprite(sprite_id)
            rt = self.rt(sprite_id)
            pid = rt.init_pid(sprite_id)
            try:
                if row is None or row.state != "ready" or pid is None:
                    raise SystemError_("its record or its init is gone")
                # a server killed inside a checkpoint's clone left the disk and the
                # processes frozen; a warm sprite's are thawed too (see the docstring)
                await disk.thaw(self.disk_dir(sprite_id))
                if rt.frozen(sprite_id):
                    await rt.resume(sprite_id)
                await rt.adopt(sprite_id, self.network.netns(sprite_id))
                handle = self._handle(row)
                await self.network.adopt_policy(
                    row.id, await asyncio.to_thread(policy.load, self.settings_dir(row.id)))
                self._live[row.id] = _Live(handle, pid, timers=self.idle_timers(row))
                self.activity.touch(row.id)
                self.activity.load(row.id)
                await self.sessions.adopt(handle)
                return True
            except Exception as exc:
                log.warning("adopting sprite %s failed (%s): stopping it", sprite_id, exc)
                self._live.pop(sprite_id, None)
                await self.stop_one(sprite_id)
                return False

        adopted = sum(await asyncio.gather(*(one(i) for i in sorted(sprite_ids))))
        if sprite_ids:
            log.info("adopted %d running sprites of the previous server process", adopted)
        return adopted

    async def recover(self) -> None:
        """After the volume is mounted: finish or undo what a crash interrupted."""
        if not self.template.exists():
            self.template.parent.mkdir(parents=True, exist_ok=True)
            await disk.make_template(self.template, self.volume.compact)
        baseline = self.template.with_suffix(".used")
        if not baseline.exists():
            probe = self.sprites_run / ".template-probe"
            used = await disk.measure_used(self.template, probe)
            baseline.write_text(str(used))
        self.empty_disk_bytes = int(baseline.read_text())
        self.bases.recover()
        if self.pool_dir.exists():  # half-made pool entries from a crash
            for tmp in self.pool_dir.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
        for row in self.store.all_sprites():
            if row.state in ("creating", "deleting"):
                log.info("removing %s sprite %s left by a crash", row.state, row.name)
                await self._purge(row.id)
                continue
            self._clean_sprite_dir(row)
        known = {r.id for r in self.store.all_sprites()}
        sprites_dir = self.volume.path("sprites")
        if sprites_dir.exists():
            for entry in sprites_dir.iterdir():
                if entry.name not in known:
                    shutil.rmtree(entry, ignore_errors=True)
        # Only now: a warm sprite has a directory but no record, and the sweep above would
        # take its disk from under it.
        self._refill_pool()
        self._refill_warm()

    def _clean_sprite_dir(self, row: SpriteRow) -> None:
        """Drop half-written files and checkpoint images that have no record."""
        cps = self.volume_dir(row.id) / "checkpoints"
        recorded = {c.id for c in self.store.checkpoints(row.id)}
        for leftover in self.volume_dir(row.id).glob("*.restoring"):
            leftover.unlink(missing_ok=True)
        if cps.exists():
            for f in cps.iterdir():
                if f.suffix != ".img" or f.stem not in recorded:
                    log.info("removing unrecorded checkpoint file %s", f)
                    f.unlink(missing_ok=True)

    async def stop_one(self, sprite_id: str) -> None:
        """Stop one sprite found running (whatever its record says), under its lock."""
        async with self.lock(sprite_id):
            await self._stop(sprite_id)
            row = self.store.sprite(sprite_id)
            if row is not None:
                await self.sessions.close_sprite(row.name)

    async def stop_all(self, keep: bool = False) -> None:
        """Server shutdown: end background work and the unnamed warm sprites; then stop
        every running sprite, or with `keep` leave them running for the next server."""
        tasks = [*self._background, *([self._pool_task] if self._pool_task else []),
                 *([self._warm_task] if self._warm_task else [])]
        for task in tasks:
            task.cancel()
            try:
                await task
            except BaseException:
                pass
        warm, self._warm = self._warm, []
        for w in warm:
            await self._purge_unrecorded(w.id)
        if keep:
            for sprite_id in list(self._live):
                async with self.lock(sprite_id):  # what is under way finishes first
                    pass
            self._live.clear()
            return
        for sprite_id in list(self._live):  # VM sprites keep their processes, asleep
            async with self.lock(sprite_id):
                await self._hibernate(sprite_id)
        # all at once, so that N sprites cost one grace period, not N
        await self._terminate(list(self._live))
        for sprite_id in list(self._live):
            async with self.lock(sprite_id):
                await self._stop(sprite_id)

    async def storage_lost(self) -> None:
        """JuiceFS died: fail fast — kill every sprite; they restart from durable state."""
        warm, self._warm = self._warm, []
        for w in warm:
            try:
                await self._stop(w.id)  # its directory goes at the next recover
            except Exception:
                log.exception("stopping warm sprite %s after storage loss", w.id)
        for sprite_id in list(self._live):
            try:
                await self._stop(sprite_id)
            except Exception:
                log.exception("stopping sprite %s after storage loss", sprite_id)


def check_url_settings(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest("url_settings must be an object")
    out: dict[str, Any] = {}
    for key in ("auth", "private_access"):
        if key in value and value[key] is not None:
            if not isinstance(value[key], str):
                raise BadRequest(f"url_settings.{key} must be a string")
            out[key] = value[key]
    if "auth" in out and out["auth"] not in ("sprite", "public"):
        raise BadRequest("url_settings.auth must be 'sprite' or 'public'")
    return out


def check_lifecycle(value: object) -> dict[str, float | None]:
    """A sprite's `lifecycle` override: {"warm_after": s, "cold_after": s}, each seconds
    (0 = never) or null (back to the server's); null as a whole clears both."""
    if value is None:
        return {"warm_after": None, "cold_after": None}
    if not isinstance(value, dict):
        raise BadRequest("lifecycle must be an object")
    unknown = set(value) - {"warm_after", "cold_after"}
    if unknown:
        raise BadRequest(f"lifecycle: unknown field {sorted(unknown)[0]!r}")
    return {k: None if v is None else idle_seconds(f"lifecycle.{k}", v)
            for k, v in value.items()}


def _new_config(lifecycle: dict[str, float] | None, source: SpriteRow | None,
                runtime: str = "container") -> dict[str, Any]:
    """A new sprite's `config`: its lifecycle override, and a fork's resources policy from
    its source (docs/resources.md), and its runtime (docs/vm.md)."""
    config: dict[str, Any] = {"runtime": runtime}
    if source is not None and resources.RECORD_KEY in source.config:
        config[resources.RECORD_KEY] = source.config[resources.RECORD_KEY]
    if lifecycle:
        config["lifecycle"] = lifecycle
    return config


#: The drivers a sprite may run on (docs/vm.md); a sprite keeps its driver for life.
RUNTIMES = ("container", "vm")


def runtime_of(row: SpriteRow) -> str:
    """The driver a sprite runs on: recorded at create; sprites made before there was a
    choice are containers."""
    kind = row.config.get("runtime", "container")
    return kind if isinstance(kind, str) else "container"
