"""The container runtime: each running sprite is a runc container whose PID 1 is wisp-init.

Only this module speaks runc. Every sprite gets a network namespace made by the host
(`ip netns add wisp-<id>`, loopback up): it is owned by the host user namespace, so root in
the sprite cannot reconfigure it, and the egress-policy work can later put a veth pair and
nftables in it without touching the container spec.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

from wisp.errors import SystemError_
from wisp.runtime import agent
from wisp.runtime.base import ROOT_UID_BASE, Limits, Runtime
from wisp.runtime.oci import make_spec
from wisp.system import is_mountpoint, process_running, run

__all__ = ["ContainerRuntime", "init_binary_path", "build_init"]

NETNS_DIR = Path("/run/netns")


def init_binary_path() -> Path:
    return Path(__file__).resolve().parents[2] / "build" / "wisp-init"


def _init_source() -> Path:
    return Path(__file__).resolve().parent / "init" / "wisp-init.c"


def build_init(target: Path | None = None) -> Path:
    """Compile the static init agent if it is missing or older than its source."""
    import subprocess

    target = target or init_binary_path()
    src = _init_source()
    if target.exists() and target.stat().st_mtime >= src.stat().st_mtime:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    res = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(src)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemError_(f"building wisp-init failed: {res.stderr[-1000:]}")
    os.replace(tmp, target)
    return target


class ContainerRuntime(Runtime):
    name = "container"

    def __init__(self, runc_root: Path, run_dir: Path, init_binary: Path | None = None,
                 agent_root: Path | None = None) -> None:
        self.runc_root = runc_root
        self.run_dir = run_dir
        # Unix socket paths are limited to 108 bytes, so agent sockets live under a short
        # host path (one per server, derived from its run dir) rather than the data dir.
        digest = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
        self.agent_root = agent_root or Path("/run/wisp") / digest
        self.init_binary = init_binary or init_binary_path()

    def _runc(self, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        return ["runc", "--root", self.runc_root, *args]

    @staticmethod
    def netns_name(sprite_id: str) -> str:
        return f"wisp-{sprite_id[:24]}"

    def bundle_dir(self, sprite_id: str) -> Path:
        return self.run_dir / sprite_id / "bundle"

    def agent_dir(self, sprite_id: str) -> Path:
        return self.agent_root / sprite_id.removeprefix("sprite-")

    def agent_socket(self, sprite_id: str) -> Path:
        return self.agent_dir(sprite_id) / "agent.sock"

    async def _ensure_netns(self, sprite_id: str) -> Path:
        name = self.netns_name(sprite_id)
        path = NETNS_DIR / name
        if is_mountpoint(path, "nsfs"):
            return path  # kept from the sprite's last run, lo already up
        if path.exists():  # a stale name left by a crash
            await run("ip", "netns", "delete", name, check=False)
        await run("ip", "netns", "add", name)
        await run("ip", "-n", name, "link", "set", "lo", "up")
        return path

    async def _remove_netns(self, sprite_id: str) -> None:
        name = self.netns_name(sprite_id)
        if (NETNS_DIR / name).exists():
            await run("ip", "netns", "delete", name, check=False)

    def _write_hosts(self, path: Path, hostname: str) -> None:
        # Rewritten in place: the sprite sees this inode through a bind mount.
        with open(path, "w") as f:
            f.write(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    f"127.0.1.1\t{hostname}\n")
        path.chmod(0o644)

    async def rename(self, sprite_id: str, hostname: str) -> None:
        """Give a running sprite its name: hostname (in its UTS namespace, set from the
        host, since root inside lacks CAP_SYS_ADMIN) and /etc/hosts."""
        pid = self.init_pid(sprite_id)
        if pid is None:
            raise SystemError_(f"sprite {sprite_id} is not running")
        await run("nsenter", "-t", str(pid), "-u", "hostname", hostname, timeout=10)
        self._write_hosts(self.bundle_dir(sprite_id) / "hosts", hostname)

    def init_pid(self, sprite_id: str) -> int | None:
        """Host pid of the sprite's init while it is alive (not a zombie), else None."""
        try:
            pid = int((self.bundle_dir(sprite_id) / "init.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if process_running(pid) else None

    async def start(self, sprite_id: str, hostname: str, rootfs: Path, run_dir: Path,
                    limits: Limits) -> None:
        if self.init_pid(sprite_id) is not None and await self.running(sprite_id):
            return
        await self._delete(sprite_id)  # a dead leftover with the same id blocks `runc run`
        self.runc_root.mkdir(parents=True, exist_ok=True)
        bundle = self.bundle_dir(sprite_id)
        bundle.mkdir(parents=True, exist_ok=True)
        agent_dir = self.agent_dir(sprite_id)
        if agent_dir.exists():
            shutil.rmtree(agent_dir)
        agent_dir.mkdir(parents=True, mode=0o700)
        os.chown(agent_dir, ROOT_UID_BASE, ROOT_UID_BASE)
        netns = await self._ensure_netns(sprite_id)
        hosts = bundle / "hosts"
        self._write_hosts(hosts, hostname)
        spec = make_spec(hostname=hostname, rootfs=rootfs, init_binary=self.init_binary,
                         agent_dir=agent_dir, hosts_file=hosts, netns=netns, cgroup_path=f"/wisp/{sprite_id}",
                         limits=limits)
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        log = self.run_dir / sprite_id / "init.log"
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._runc("run", "-d", "--pid-file", bundle / "init.pid", "-b", bundle,
                            sprite_id),
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd)
        finally:
            os.close(fd)
        if await proc.wait() != 0:
            tail = log.read_text(errors="replace")[-800:]
            await self.stop(sprite_id)
            raise SystemError_(f"runc run failed for sprite {sprite_id}: {tail}")
        try:
            await agent.wait_ready(self.agent_socket(sprite_id), timeout=10)
        except BaseException:
            await self.stop(sprite_id)
            raise

    async def _state(self, sprite_id: str) -> dict[str, object] | None:
        res = await run(*self._runc("state", sprite_id), check=False, timeout=30)
        if res.returncode != 0:
            return None
        try:
            state: dict[str, object] = json.loads(res.stdout)
        except ValueError:
            return None
        return state

    async def running(self, sprite_id: str) -> bool:
        state = await self._state(sprite_id)
        return state is not None and state.get("status") in ("running", "paused")

    def _freezer(self, sprite_id: str) -> tuple[Path, str, str] | None:
        """(control file, freeze value, thaw value) of the sprite's cgroup freezer."""
        v1 = Path("/sys/fs/cgroup/freezer/wisp") / sprite_id / "freezer.state"
        if v1.exists():
            return v1, "FROZEN", "THAWED"
        v2 = Path("/sys/fs/cgroup/wisp") / sprite_id / "cgroup.freeze"
        if v2.exists():
            return v2, "1", "0"
        return None

    @staticmethod
    def _frozen(control: Path) -> bool:
        if control.name == "freezer.state":
            return control.read_text().strip() == "FROZEN"
        events = (control.parent / "cgroup.events").read_text()
        return "frozen 1" in events

    async def terminate(self, sprite_ids: list[str], grace: float) -> None:
        # Signalled from the host through the cgroup: init (the agent) stays to the end,
        # and a pid namespace's init would ignore a SIGTERM from outside anyway.
        inits = {i: self.init_pid(i) for i in sprite_ids}
        pending = [i for i in sprite_ids if inits[i] is not None]
        for sprite_id in pending:
            for pid in self._cgroup_pids(sprite_id):
                if pid != inits[sprite_id]:
                    self._signal_member(sprite_id, pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pending and time.monotonic() < deadline:
            pending = [i for i in pending
                       if set(self._cgroup_pids(i)) - {inits[i]}]
            if pending:
                await asyncio.sleep(0.02)

    @staticmethod
    def _signal_member(sprite_id: str, pid: int, sig: signal.Signals) -> None:
        """Signal `pid` only while it is still a process of this sprite: through a pidfd,
        checked against the sprite's cgroup, so a pid reused by a host process in the
        meantime is never hit."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            if f"/wisp/{sprite_id}\n" in cgroups:
                signal.pidfd_send_signal(fd, sig)
        except (ProcessLookupError, FileNotFoundError):
            pass
        finally:
            os.close(fd)

    @staticmethod
    def _cgroup_pids(sprite_id: str) -> list[int]:
        for procs in (Path("/sys/fs/cgroup/pids/wisp") / sprite_id / "cgroup.procs",
                      Path("/sys/fs/cgroup/wisp") / sprite_id / "cgroup.procs"):
            try:
                return [int(p) for p in procs.read_text().split()]
            except OSError:
                continue
        return []

    async def pause(self, sprite_id: str) -> None:
        """Freeze every process of the sprite through its cgroup freezer.

        Writing the freezer directly costs well under a millisecond, where `runc pause`
        spends ~20 ms starting runc; runc still sees the state (`runc state` says paused).
        """
        freezer = self._freezer(sprite_id)
        if freezer is None:
            await run(*self._runc("pause", sprite_id), timeout=30)
            return
        control, frozen, _ = freezer
        control.write_text(frozen)
        for _ in range(2000):
            if self._frozen(control):
                return
            await asyncio.sleep(0.001)
        control.write_text(freezer[2])
        raise SystemError_(f"sprite {sprite_id} did not freeze within 2 s")

    async def resume(self, sprite_id: str) -> None:
        freezer = self._freezer(sprite_id)
        if freezer is None:
            await run(*self._runc("resume", sprite_id), timeout=30)
            return
        freezer[0].write_text(freezer[2])

    async def _delete(self, sprite_id: str) -> None:
        """`runc delete --force` kills and removes in one call; a frozen sprite is thawed
        first so its processes can die. Checked afterwards with `runc state`."""
        if not (self.runc_root / sprite_id).exists():
            return
        freezer = self._freezer(sprite_id)
        if freezer is not None:
            freezer[0].write_text(freezer[2])
        # Killing init ends the whole pid namespace; waiting for that here is much faster
        # than `runc delete --force`, which polls in 100 ms steps.
        pid = self.init_pid(sprite_id)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            for _ in range(2000):
                if self.init_pid(sprite_id) is None and not self._cgroup_pids(sprite_id):
                    break
                await asyncio.sleep(0.001)
        res = await run(*self._runc("delete", "--force", sprite_id), check=False, timeout=60)
        if res.returncode != 0 and await self._state(sprite_id) is not None:
            raise SystemError_(f"runc delete {sprite_id} failed: "
                               f"{res.stderr.decode(errors='replace')[-300:]}")

    async def stop(self, sprite_id: str, *, keep_network: bool = False) -> None:
        await self._delete(sprite_id)
        if not keep_network:
            await self._remove_netns(sprite_id)
        sprite_run = self.run_dir / sprite_id
        shutil.rmtree(sprite_run / "bundle", ignore_errors=True)
        shutil.rmtree(self.agent_dir(sprite_id), ignore_errors=True)

    async def list_ids(self) -> list[str]:
        ids: set[str] = set()
        if self.runc_root.exists():
            res = await run(*self._runc("list", "-q"), check=False, timeout=30)
            ids.update(line.strip() for line in res.stdout.decode().splitlines() if line.strip())
        return sorted(ids)

    def release_agent_root(self) -> None:
        """Remove this server's (empty) socket directory under /run/wisp."""
        try:
            self.agent_root.rmdir()
        except OSError:
            pass
