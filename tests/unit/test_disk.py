"""Sprite disks on real loop devices and mounts (no server): unmounting frees the loop
device for real before it returns."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from wisp.storage import disk
from wisp.system import loop_devices_for


def test_unmount_waits_until_the_loop_device_is_gone(tmp_path: Path) -> None:
    """While another mount namespace still holds the ext4 (as a sprite's does for a moment
    while its last process exits), `losetup -d` only marks the device; `unmount_disk`
    returns once the kernel has detached it, not before."""
    image, disk_dir, lower, rootfs = (tmp_path / "disk.img", tmp_path / "disk",
                                      tmp_path / "image", tmp_path / "rootfs")
    subprocess.run(["truncate", "-s", "64M", image], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
    lower.mkdir()
    holder = None
    try:
        asyncio.run(disk.mount_disk(image, disk_dir, lower, rootfs))
        # a private copy of the mounts that lives 1 s, holding the ext4's superblock
        holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "1"])
        time.sleep(0.2)
        assert loop_devices_for(image)
        started = time.monotonic()
        asyncio.run(disk.unmount_disk(disk_dir, rootfs, image))
        assert loop_devices_for(image) == [], "unmount_disk returned with the loop attached"
        assert time.monotonic() - started > 0.3  # it did have to wait for the holder
    finally:
        if holder is not None:
            holder.wait()
        for point in (rootfs, disk_dir):
            subprocess.run(["umount", point], capture_output=True)
        for dev in loop_devices_for(image):
            subprocess.run(["losetup", "-d", dev])
