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

from wisp.images import ImageStore
from wisp.runtime.base import ROOT_UID_BASE, Limits, SpriteHandle
from wisp.runtime.oci import make_spec

__all__ = ["BusyboxSprite", "busybox_sprite", "build_init", "INIT_SOURCE"]

REPO = Path(__file__).resolve().parents[2]
INIT_SOURCE = REPO / "wisp" / "runtime" / "init" / "wisp-init.c"


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
    netns_made = False
    try:
        run_dir, bundle = root / "run", root / "bundle"
        for d in (bundle, runc_root):
            d.mkdir()
        run_dir.mkdir(mode=0o700)
        os.chown(run_dir, ROOT_UID_BASE, ROOT_UID_BASE)
        # The real busybox image and the real OCI spec (seccomp, caps, mounts) of sprites.
        rootfs = ImageStore(root / "images").build_busybox("busybox").rootfs
        init_bin = init or build_init(root / "wisp-init")
        subprocess.run(["ip", "netns", "add", cid], check=True, timeout=10)
        netns_made = True
        subprocess.run(["ip", "-n", cid, "link", "set", "lo", "up"], check=True, timeout=10)
        hosts = bundle / "hosts"
        hosts.write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n")
        spec = make_spec(hostname=name, rootfs=rootfs, init_binary=init_bin, agent_dir=run_dir,
                         hosts_file=hosts, netns=Path("/run/netns") / cid,
                         cgroup_path=f"/{cid}", limits=Limits(memory_mb=512, pids=1024))
        (bundle / "config.json").write_text(json.dumps(spec))
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
        if netns_made:
            subprocess.run(["ip", "netns", "delete", cid], capture_output=True, timeout=10)
        shutil.rmtree(root, ignore_errors=True)
