"""A sprite's disk: a sparse 100 GB ext4 image on JuiceFS, loop-mounted, whose `upper/` and
`work/` directories make the overlayfs upper layer over the read-only base image.

New disks are clones of one pre-formatted template image (a metadata copy, a few ms) rather
than a fresh mkfs per sprite. Mount and unmount check /proc/self/mountinfo and sysfs, so
they are safe to call again after a crash left things half done.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from wisp.errors import SystemError_
from wisp.runtime.base import ROOT_UID_BASE
from wisp.system import is_mountpoint, loop_devices_for, mount_source, mounts_under, run

__all__ = ["DISK_SIZE", "make_template", "mount_disk", "unmount_disk", "freeze", "thaw", "sync",
           "used_bytes", "measure_used"]

log = logging.getLogger("wisp.storage")

DISK_SIZE = "100G"
_libc = ctypes.CDLL(None, use_errno=True)


async def make_template(path: Path, settle: Callable[[Path], Awaitable[None]]) -> None:
    """Format an empty sprite disk at `path` (written to `path.tmp`, then renamed).

    `settle` runs on the formatted file before it is published: the volume compacts it
    there (`Volume.compact`). Every sprite disk is a clone of the template, and mkfs leaves
    its first 64 MB chunk in many small pieces, which JuiceFS compacts in the background on
    the first read; with Redis metadata a clone taken while that compaction commits points
    at pieces the compaction then deletes (see docs/storage.md, Known issues). Compacted
    before anyone can clone it, the template is never compacted again: nothing writes it.
    """
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    await run("truncate", "-s", DISK_SIZE, tmp)
    await run("mkfs.ext4", "-q", "-F", "-O", "sparse_super2", "-E",
              "lazy_itable_init=1,lazy_journal_init=1,nodiscard,num_backup_sb=0,"
              f"root_owner={ROOT_UID_BASE}:{ROOT_UID_BASE}", tmp)
    await settle(tmp)
    os.replace(tmp, path)


async def mount_disk(image: Path, disk_dir: Path, lower: Path, rootfs: Path) -> None:
    """Loop-mount `image` at `disk_dir` and mount the overlay root at `rootfs`."""
    disk_dir.mkdir(parents=True, exist_ok=True)
    rootfs.mkdir(parents=True, exist_ok=True)
    if not is_mountpoint(disk_dir):
        # noinit_itable: never let ext4lazyinit write ~1.6 GB of zeroed inode tables per
        # 100 GB disk into JuiceFS in the background (uninit_bg makes them unnecessary).
        # discard: blocks freed inside the sprite are discarded at each journal commit; the
        # loop device punches them out of the image and `wisp.storage.reclaim` has JuiceFS
        # free their chunks. Online, not fstrim: the first fstrim after each mount trims
        # all free space, which gives every 64 MB chunk of the image a metadata record and
        # makes every later clone (checkpoint) of it slower (docs/storage.md, "Disk space").
        await run("mount", "-t", "ext4", "-o", "loop,noatime,noinit_itable,discard", image,
                  disk_dir)
    for sub in ("upper", "work"):
        d = disk_dir / sub
        if not d.exists():
            d.mkdir()
            os.chown(d, ROOT_UID_BASE, ROOT_UID_BASE)
    if not is_mountpoint(rootfs):
        # Paths relative to the sprite's run dir (and `lower`, a link to the image): the
        # kernel shows the options as given in the sprite's /proc/mounts, which must not
        # name host paths.
        base = rootfs.parent
        if disk_dir.parent != base:
            raise ValueError("the disk dir and the root must share a parent directory")
        link = base / "lower"
        tmp_link = base / "lower.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(lower)
        os.replace(tmp_link, link)
        opts = (f"lowerdir={link.name},upperdir={disk_dir.name}/upper,"
                f"workdir={disk_dir.name}/work")
        await run("mount", "-t", "overlay", "overlay", "-o", opts, rootfs.name, cwd=base)


async def unmount_disk(disk_dir: Path, rootfs: Path, image: Path | None = None, *,
                       discard: bool = False) -> None:
    """Unmount everything at or below the overlay, then the ext4, then free its loop device.

    Reverse order of `mount_disk`; a frozen ext4 is thawed first (a crash mid-checkpoint can
    leave it frozen and an unmount would hang). `discard` is for a disk nobody will read
    again (replaced by a restore, or deleted): the ext4 is shut down without flushing, so
    unmounting does not push its dirty pages through FUSE into JuiceFS first (a 30 MB
    backlog costs ~150 ms to flush, ~15 ms to drop).
    """
    loop = mount_source(disk_dir)  # None: the ext4 is not mounted
    if loop is not None:
        await thaw(disk_dir)
        if discard:
            await _shutdown(disk_dir)
    for point, _ in mounts_under(rootfs):
        await run("umount", point, check=False)
        if is_mountpoint(Path(point)):
            await run("umount", "-l", point)
    if loop is not None:
        res = await run("umount", disk_dir, check=False)
        if res.returncode != 0 and is_mountpoint(disk_dir):
            await run("umount", "-l", disk_dir)
    # the loop device is found by what was mounted as well as by path: after a restore
    # the image it was opened on has been replaced and sysfs calls it "(deleted)"
    devices = set(loop_devices_for(image)) if image is not None else set()
    if loop is not None and loop.startswith("/dev/loop") and _loop_attached(loop):
        devices.add(loop)
    for dev in sorted(devices):
        await run("losetup", "-d", dev, check=False)
    await _wait_detached(devices)


#: How long `unmount_disk` waits for a loop device to let go of its image.
DETACH_WAIT = 10.0


async def _wait_detached(devices: set[str]) -> None:
    """`losetup -d` on a device something still holds only marks it to be cleared on its
    last close, and returns: the ext4 on it lives on while anything still references the
    mount (the last process of the sprite's mount namespace being torn down, a lazy
    unmount). Wait, bounded, until the kernel has really detached each one, so that a
    restore or delete that returns has left no loop device on the replaced image."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + DETACH_WAIT
    pending = {d for d in devices if _loop_attached(d)}
    while pending and loop.time() < deadline:
        await asyncio.sleep(0.005)
        pending = {d for d in pending if _loop_attached(d)}
    waited = loop.time() - started
    if pending:
        log.warning("loop devices %s still attached %.1f s after losetup -d",
                    sorted(pending), waited)
    elif waited > 0.05:
        log.info("loop devices %s detached %.0f ms after losetup -d", sorted(devices),
                 waited * 1000)


def _loop_attached(dev: str) -> bool:
    return Path("/sys/block", os.path.basename(dev), "loop", "backing_file").exists()


EXT4_IOC_SHUTDOWN = 0x8004587D           # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2          # drop everything not yet in the journal


async def _shutdown(disk_dir: Path) -> None:
    def shutdown() -> None:
        fd = os.open(disk_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, EXT4_GOING_FLAGS_NOLOGFLUSH.to_bytes(4, "little"))
        finally:
            os.close(fd)

    try:
        await asyncio.to_thread(shutdown)
    except OSError as exc:  # the unmount below still works, only slower
        log.warning("shutting down the ext4 at %s failed: %s", disk_dir, exc)


FIFREEZE = 0xC0045877
FITHAW = 0xC0045878


def _ioctl(disk_dir: Path, request: int) -> None:
    fd = os.open(disk_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, request, 0)
    finally:
        os.close(fd)


async def freeze(disk_dir: Path) -> None:
    """Flush and freeze the ext4 so that the image file below is a consistent disk."""
    try:
        await asyncio.to_thread(_ioctl, disk_dir, FIFREEZE)
    except OSError as exc:
        raise SystemError_(f"freezing {disk_dir} failed: {exc}") from exc


async def sync(disk_dir: Path) -> None:
    """syncfs of this one filesystem (never a global sync, which can hang on FUSE)."""
    def syncfs() -> None:
        fd = os.open(disk_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            _libc.syncfs(fd)
        finally:
            os.close(fd)

    await asyncio.to_thread(syncfs)


async def thaw(disk_dir: Path) -> None:
    """Thaw; thawing a filesystem that is not frozen is harmless (EINVAL, ignored)."""
    try:
        await asyncio.to_thread(_ioctl, disk_dir, FITHAW)
    except OSError:
        pass


def used_bytes(disk_dir: Path) -> int:
    """Bytes the ext4 really holds: what a checkpoint of it costs against the quota."""
    st = os.statvfs(disk_dir)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


async def measure_used(image: Path, probe_dir: Path) -> int:
    """Used bytes of an unmounted image (mounted read-only for a moment)."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    await run("mount", "-t", "ext4", "-o", "loop,ro,noload", image, probe_dir)
    try:
        return used_bytes(probe_dir)
    finally:
        await run("umount", probe_dir)
        for dev in loop_devices_for(image):
            await run("losetup", "-d", dev, check=False)
