"""The runtime interface shared by every driver (container now, QEMU microvm later).

A runtime takes a prepared root filesystem and turns it into a running sprite whose
processes are started through the in-sprite init agent (`wisp/runtime/init/wisp-init.c`).
Callers outside `wisp/runtime/` only ever see `SpriteHandle`, never runc or QMP.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SpriteHandle", "Limits", "Runtime", "ROOT_UID_BASE", "ID_RANGE", "SPRITE_UID",
           "SPRITE_HOME"]

#: Host uid that is root inside every sprite (user namespace mapping 0 -> 100000, 65536 ids).
ROOT_UID_BASE = 100000
ID_RANGE = 65536
#: The default user inside a sprite, as the contract's `/home/sprite` implies.
SPRITE_UID = 1000
SPRITE_HOME = "/home/sprite"


@dataclass(frozen=True)
class SpriteHandle:
    """What exec and the filesystem API need to reach a running sprite.

    `rootfs` is the host path of the sprite's merged root filesystem; file operations on it
    must run chrooted there under the mapped host uid (`host_uid(uid)`), never as host root.
    `agent_socket` is the host path of the init agent's socket inside the sprite.
    """

    name: str
    rootfs: Path
    agent_socket: Path
    uid_base: int = ROOT_UID_BASE
    user_uid: int = SPRITE_UID
    user_gid: int = SPRITE_UID
    home: str = SPRITE_HOME
    groups: tuple[int, ...] = field(default=(SPRITE_UID,))
    #: The sprite's `environment` (set at create): every exec starts with it.
    env: tuple[tuple[str, str], ...] = ()
    #: For a sprite whose root is not a host mount (a VM): given the fs agent's setup,
    #: opens a stream to a worker of the fs agent inside it, which runs the fs protocol on
    #: `rootfs` (then a path in the guest).
    fs_connect: Callable[[bytes], Awaitable[tuple[asyncio.StreamReader,
                                                  asyncio.StreamWriter]]] | None = field(
        default=None, compare=False)

    def host_uid(self, uid: int) -> int:
        return self.uid_base + uid


@dataclass(frozen=True)
class Limits:
    """cgroup limits applied to a sprite."""

    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 2048


class Runtime(abc.ABC):
    """Operations every runtime driver implements. All are idempotent and check real state.

    The sprite state machine (`wisp.sprites.Sprites`) reaches a driver only through this
    class; a second driver (the QEMU microvm, issue 8) implements the same methods.
    """

    name: str
    #: Names this server's host objects (boot dirs, network namespaces, firewall table)
    #: apart from another server's on the same host.
    tag: str
    #: The server's own directory under /run/wisp for this driver's host state (the
    #: sprites' agent sockets, the exec sessions' tmpfs); `release` removes it.
    host_dir: Path
    #: Capabilities the state machine may ask for. `memory_snapshots`: a checkpoint can
    #: hold the sprite's memory too (the microvm), not only its disk (containers).
    memory_snapshots: bool = False
    #: Whether the sprite's root is a host mount the state machine assembles before
    #: `start` (containers), or the driver boots from the disk image itself (a VM).
    host_rootfs: bool = True

    @abc.abstractmethod
    async def start(self, sprite_id: str, hostname: str, rootfs: Path, run_dir: Path,
                    limits: Limits, netns: Path, resolv_conf: str | None = None,
                    info_dir: Path | None = None, *, disk_image: Path | None = None,
                    base_rootfs: Path | None = None, memory: Path | None = None) -> None:
        """Start the sprite's init on `rootfs` in the network namespace at `netns` (made by
        `wisp.network`), with `resolv_conf` as its /etc/resolv.conf if given (else the
        image's) and `info_dir` (on the sprite's disk, outside its root) readable but not
        writable at /.sprite; return once its agent socket accepts.

        A driver without `host_rootfs` boots from `disk_image` (the sprite's disk) over the
        base image `base_rootfs` instead, and with `memory_snapshots` from the memory
        snapshot `memory` (`snapshot`) when given: its processes go on from there."""

    async def snapshot(self, sprite_id: str, memory: Path,
                       copy_disk: Callable[[], Awaitable[None]], resume: bool = True) -> None:
        """With `memory_snapshots`: hold the running sprite still, run `copy_disk` (the
        disk image is consistent then), write its memory and device state to `memory`, and
        let it go on; with `resume=False` it stays held (it is to be stopped: a disk it
        wrote to after the snapshot would no longer match the memory)."""
        raise NotImplementedError(f"the {self.name} runtime keeps no memory snapshots")

    @abc.abstractmethod
    async def adopt(self, sprite_id: str, netns: Path) -> None:
        """Take over a sprite an earlier server process left running (its `init_pid`
        alive): remake what lived in that process only. Raises when the sprite does not
        answer; the caller then stops it."""

    def handle(self, sprite_id: str, handle: SpriteHandle) -> SpriteHandle:
        """The handle exec and the filesystem API use, from the state machine's `handle`:
        a driver whose sprites' roots are not host mounts changes how files are reached."""
        return handle

    async def snapshot_key(self, limits: Limits, image_version: str) -> str:
        """With `memory_snapshots`: what a memory snapshot of a sprite booted with
        `limits` on that image can be resumed by (equal keys: compatible snapshots)."""
        raise NotImplementedError(f"the {self.name} runtime keeps no memory snapshots")

    async def dial(self, sprite_id: str, host: str, port: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str] | None:
        """A TCP connection to `host:port` as the sprite sees it, for a driver whose
        sprite's network is not the network namespace it was given (a VM's is inside the
        guest); None: dial in that namespace (`wisp.network`)."""
        return None

    async def proc_net(self, sprite_id: str) -> dict[str, str] | None:
        """The sprite's /proc/net/tcp and tcp6, where the namespace's are not the
        sprite's (see `dial`); None: read them in the namespace."""
        return None

    @abc.abstractmethod
    async def stop(self, sprite_id: str) -> None:
        """End every process of the sprite and release its runtime resources (not its
        network namespace: `wisp.network` owns that)."""

    @abc.abstractmethod
    async def terminate(self, sprite_ids: list[str], grace: float) -> None:
        """Send SIGTERM to every process of these sprites but their init, and wait up to
        `grace` seconds for them to exit; `stop` then kills whatever is left."""

    @abc.abstractmethod
    async def set_limits(self, sprite_id: str, limits: Limits) -> bool:
        """Change a running sprite's memory and CPU limits in place (pids stay), without
        stopping anything; False when the sprite is not running (nothing to change). Raises
        `Conflict`, with nothing changed, when the kernel cannot bring the sprite's memory
        under a lower limit."""

    @abc.abstractmethod
    async def pause(self, sprite_id: str) -> None:
        """Freeze every process (cgroup freezer); legal only while running."""

    @abc.abstractmethod
    async def resume(self, sprite_id: str) -> None:
        """Thaw a paused sprite."""

    @abc.abstractmethod
    def quiesced(self, sprite_id: str, disk_dir: Path) -> AbstractAsyncContextManager[None]:
        """Hold a running sprite still for a point-in-time copy of its disk image: inside
        the block its processes are stopped and its filesystem is consistent on the image.
        A warm (paused) sprite stays paused after. `disk_dir` is the host mount of the
        sprite's disk, for a driver whose sprite filesystem is a host mount (containers);
        a VM driver quiesces inside its guest instead."""

    @abc.abstractmethod
    def frozen(self, sprite_id: str) -> bool:
        """Whether the sprite is paused (asked of the system: a server adopting sprites
        an earlier process left finds warm ones this way)."""

    @abc.abstractmethod
    async def running(self, sprite_id: str) -> bool:
        """True when the sprite's init is alive (asked of the system, not remembered)."""

    @abc.abstractmethod
    def sprite_path(self, sprite_id: str, path: str) -> Path | None:
        """Where the host reads `path` (absolute, as the sprite sees it) of a running
        sprite, or None when it is not running. For small host-side reads of files the
        sprite writes (its task files); never for writing."""

    @abc.abstractmethod
    async def list_ids(self) -> list[str]:
        """Ids of every sprite this driver has on the host, including crashed leftovers."""

    @abc.abstractmethod
    def agent_socket(self, sprite_id: str) -> Path:
        """The host's unix socket to the sprite's agent (wisp-init): exec, services and
        sessions go through it, whatever the driver carries it over."""

    @abc.abstractmethod
    def init_pid(self, sprite_id: str) -> int | None:
        """The host pid whose life is the sprite's (its init, or its VM's process) while it
        runs, else None: asked of the system, so a restarted server finds survivors."""

    @abc.abstractmethod
    async def rename(self, sprite_id: str, hostname: str) -> None:
        """Give a running sprite its name (hostname and /etc/hosts): a warm-pool sprite
        booted before it had one."""

    @abc.abstractmethod
    def release(self) -> None:
        """Remove `host_dir` with whatever a crash left mounted there; call only once no
        sprite of this server runs."""
