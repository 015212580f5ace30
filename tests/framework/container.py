"""A real sprite-shaped runc container for tests: busybox rootfs, wisp-init as PID 1.

`busybox_sprite()` builds everything under one temporary directory (rootfs, run dir,
bundle, runc state), compiles `wisp-init` from the tree's source, starts the container the
way the runtime does (user namespace 0 -> 100000, the agent's run dir bind-mounted at
`/.wisp/run`, the init binary read-only at `/.wisp/init`), waits for the agent socket, and
on exit deletes the container and removes every file it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from wisp.runtime.base import ROOT_UID_BASE, SPRITE_UID, SpriteHandle

__all__ = ["BusyboxSprite", "busybox_sprite", "build_init", "INIT_SOURCE"]

REPO = Path(__file__).resolve().parents[2]
INIT_SOURCE = REPO / "wisp" / "runtime" / "init" / "wisp-init.c"
_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
         "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
         "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


@dataclass(frozen=True)
class BusyboxSprite:
    """A running test container and the handle exec code needs to reach it."""

    container_id: str
    root: Path
    runc_root: Path
    handle: SpriteHandle

    def runc(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["runc", "--root", str(self.runc_root), *args],
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def init_pid(self) -> int:
        state = json.loads(self.runc("state", self.container_id).stdout)
        return int(state["pid"])


def build_init(out: Path) -> Path:
    """Compile wisp-init statically, exactly as the runtime's build does."""
    subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out),
                    str(INIT_SOURCE)], check=True, capture_output=True, timeout=120)
    return out


def _make_rootfs(rootfs: Path) -> None:
    for d in ("bin", "dev", "etc", "home/sprite", "proc", "root", "run", "sys", "tmp",
              "usr/bin", "usr/sbin", "sbin", "var", ".wisp/run"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / ".wisp" / "init").touch()
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2("/bin/busybox", rootfs / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.split()
    for applet in applets:
        link = rootfs / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\n"
        f"sprite:x:{SPRITE_UID}:{SPRITE_UID}::/home/sprite:/bin/sh\n")
    (rootfs / "etc" / "group").write_text(
        f"root:x:0:\ntty:x:5:\nsprite:x:{SPRITE_UID}:\n")
    subprocess.run(["chown", "-R", f"{ROOT_UID_BASE}:{ROOT_UID_BASE}", str(rootfs)],
                   check=True, timeout=30)
    host_sprite = ROOT_UID_BASE + SPRITE_UID
    os.chown(rootfs / "home" / "sprite", host_sprite, host_sprite)


def _config(rootfs: Path, init: Path, run_dir: Path, cid: str) -> dict[str, object]:
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/.wisp/init"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {k: _CAPS for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": cid[:63],
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/.wisp/init", "type": "bind", "source": str(init),
             "options": ["rbind", "ro"]},
            {"destination": "/.wisp/run", "type": "bind", "source": str(run_dir),
             "options": ["rbind", "rw"]},
        ],
        "linux": {
            "uidMappings": [{"containerID": 0, "hostID": ROOT_UID_BASE, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": ROOT_UID_BASE, "size": 65536}],
            "namespaces": [{"type": t} for t in
                           ("pid", "ipc", "uts", "mount", "network", "user", "cgroup")],
            "cgroupsPath": f"/{cid}",
            "resources": {"memory": {"limit": 536870912}, "pids": {"limit": 1024}},
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


def _wait_socket(path: Path, timeout: float) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(str(path))
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        finally:
            s.close()


@contextlib.contextmanager
def busybox_sprite(name: str = "t1", init: Path | None = None) -> Iterator[BusyboxSprite]:
    """Build and start a busybox sprite; delete the container and every file on exit."""
    root = Path(tempfile.mkdtemp(prefix="wisp-ct-"))
    root.chmod(0o755)
    cid = f"wisp-test-{uuid.uuid4().hex[:12]}"
    runc_root = root / "runc"
    sprite: BusyboxSprite | None = None
    try:
        rootfs, run_dir, bundle = root / "rootfs", root / "run", root / "bundle"
        for d in (rootfs, bundle, runc_root):
            d.mkdir()
        run_dir.mkdir(mode=0o700)
        os.chown(run_dir, ROOT_UID_BASE, ROOT_UID_BASE)
        _make_rootfs(rootfs)
        init_bin = init or build_init(root / "wisp-init")
        (bundle / "config.json").write_text(json.dumps(_config(rootfs, init_bin, run_dir, cid)))
        sprite = BusyboxSprite(
            container_id=cid, root=root, runc_root=runc_root,
            handle=SpriteHandle(name=name, rootfs=rootfs, agent_socket=run_dir / "agent.sock"))
        with open(root / "runc.log", "wb") as log:
            subprocess.run(["runc", "--root", str(runc_root), "run", "-d", "-b", str(bundle), cid],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                           check=True, timeout=30)
        _wait_socket(run_dir / "agent.sock", 10.0)
        yield sprite
    finally:
        if runc_root.exists():
            subprocess.run(["runc", "--root", str(runc_root), "delete", "-f", cid],
                           capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)
