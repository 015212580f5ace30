"""The read-only disk a VM sprite boots its base image from.

A base image is a directory whose files are owned by host ids shifted by `ROOT_UID_BASE`
(what a container's user namespace maps to root). A VM is its own machine, so its disks
hold the ids the guest sees: the image's tree is copied with its ids shifted back and
packed into an ext4 image (`mke2fs -d`), once per image version, next to the image.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

from wisp.errors import SystemError_
from wisp.runtime.base import ID_RANGE, ROOT_UID_BASE

__all__ = ["base_disk", "BASE_DISK"]

BASE_DISK = "vm-base.ext4"


def _unshift(top: Path) -> None:
    def fix(path: str) -> None:
        st = os.lstat(path)
        uid, gid = st.st_uid, st.st_gid
        if ROOT_UID_BASE <= uid < ROOT_UID_BASE + ID_RANGE:
            uid -= ROOT_UID_BASE
        if ROOT_UID_BASE <= gid < ROOT_UID_BASE + ID_RANGE:
            gid -= ROOT_UID_BASE
        if (uid, gid) != (st.st_uid, st.st_gid):
            os.lchown(path, uid, gid)
            if not os.path.islink(path):
                os.chmod(path, st.st_mode & 0o7777)  # chown clears setuid bits

    fix(str(top))
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            fix(os.path.join(root, name))


def base_disk(rootfs: Path) -> Path:
    """The ext4 image of `rootfs` (an image's root tree) for VM sprites, made if missing.
    Written under a temporary name and renamed, so a crash never leaves a partial one."""
    out = rootfs.parent / BASE_DISK
    if out.exists():
        return out
    # two sprites (or two servers) booting the same image at once: one makes it
    with open(rootfs.parent / (BASE_DISK + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            _make(rootfs, out)
    return out


def _make(rootfs: Path, out: Path) -> None:
    scratch = rootfs.parent / (BASE_DISK + ".tree")
    tmp = rootfs.parent / (BASE_DISK + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    try:
        subprocess.run(["cp", "-a", "--", str(rootfs), str(scratch)], check=True,
                       capture_output=True)
        _unshift(scratch)
        size = sum(e.stat(follow_symlinks=False).st_size for e in _walk(scratch))
        mb = max(256, int(size * 1.4) >> 20)
        subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(scratch), "-L", "wisp-base",
                        "-E", "root_owner=0:0", str(tmp), f"{mb}M"],
                       check=True, capture_output=True)
        os.replace(tmp, out)
    except subprocess.CalledProcessError as e:
        raise SystemError_(f"making the VM base disk of {rootfs}: {e.stderr!r}",
                           public="preparing the base image for a VM failed") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        tmp.unlink(missing_ok=True)


def _walk(top: Path) -> list[os.DirEntry[str]]:
    out: list[os.DirEntry[str]] = []
    stack = [str(top)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for e in it:
                out.append(e)
                if e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
    return out
