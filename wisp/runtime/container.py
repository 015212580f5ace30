"""The container runtime: each running sprite is a runc container whose PID 1 is wisp-init.

Only this module speaks runc. The sprite runs in the network namespace `wisp.network`
made for it (given to `start`); runc joins it and never creates or removes one.

What the host lends a sprite (the init binary, /etc/hosts, the agent's socket directory)
lives on a small tmpfs of its own, its "boot" dir (`/run/wisp/<server tag>/<id>`): bound
into the sprite from there, the sprite's /proc/self/mountinfo names only `/init`, `/hosts`
and `/run`, never a host path, and root in the sprite can fill its socket directory only up
to the tmpfs's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

from wisp.errors import Conflict, SystemError_
from wisp.runtime import agent, supervisor
from wisp.runtime.base import ROOT_UID_BASE, Limits, Runtime
from wisp.runtime.oci import make_spec
from wisp.storage import disk
from wisp.system import mount_tmpfs, mounts_under, process_running, run, unmount

__all__ = ["ContainerRuntime", "init_binary_path", "build_init"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The cgroup, below the sprite's own, that every process the agent starts is in (forked
#: there by the agent's zygote, see wisp-init.c). The sprite's cgroup holds the agent and is
#: the workload's limits plus these reserves, so a sprite whose processes exhausted their
#: pids or memory can still be reached: the agent forks in the reserve and the child moves
#: into the full workload cgroup (the kernel charges a migration past the limit), e.g. to
#: run `kill -9 -1`.
WORKLOAD = "workload"
RESERVE_PIDS = 32
RESERVE_MEMORY_MB = 64


def _usage_mb(cgroup: Path) -> int | None:
    """A v1 memory cgroup's usage in MB, None when unreadable."""
    try:
        return int((cgroup / "memory.usage_in_bytes").read_text()) >> 20
    except (OSError, ValueError):
        return None


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
        #: Names this server's host objects (boot dirs, network namespaces) apart from
        #: another server's on the same host.
        self.tag = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]
        self.agent_root = agent_root or Path("/run/wisp") / self.tag
        self.host_dir = self.agent_root
        self.init_binary = init_binary or init_binary_path()

    def _runc(self, *args: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
        return ["runc", "--root", self.runc_root, *args]

    def bundle_dir(self, sprite_id: str) -> Path:
        return self.run_dir / sprite_id / "bundle"

    def boot_dir(self, sprite_id: str) -> Path:
        """The sprite's tmpfs: `init`, `hosts` and `run/` (the agent's socket dir)."""
        return self.agent_root / sprite_id.removeprefix("sprite-")

    def agent_socket(self, sprite_id: str) -> Path:
        return self.boot_dir(sprite_id) / "run" / "agent.sock"

    def _make_boot(self, sprite_id: str, hostname: str) -> Path:
        boot = self.boot_dir(sprite_id)
        self._remove_boot(sprite_id)
        boot.mkdir(parents=True)
        # 2 MiB: the init binary (~0.8 MiB) and what the agent's socket dir may hold.
        mount_tmpfs(boot, "size=2m,nr_inodes=64,mode=0755")
        shutil.copyfile(self.init_binary, boot / "init")
        (boot / "init").chmod(0o555)
        self._write_hosts(boot / "hosts", hostname)
        (boot / "run").mkdir(mode=0o700)
        os.chown(boot / "run", ROOT_UID_BASE, ROOT_UID_BASE)
        return boot

    def _remove_boot(self, sprite_id: str) -> None:
        boot = self.boot_dir(sprite_id)
        unmount(boot)
        shutil.rmtree(boot, ignore_errors=True)

    def _write_hosts(self, path: Path, hostname: str) -> None:
        # Rewritten in place: the sprite sees this inode through a bind mount.
        with open(path, "w") as f:
            f.write(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    f"127.0.1.1\t{hostname}\n")
        path.chmod(0o644)

    async def adopt(self, sprite_id: str, netns: Path) -> None:
        """Nothing of a container lives in the server process: its agent's socket is on
        the host, its state in the kernel; `Sprites.adopt` checks and thaws the rest."""

    async def rename(self, sprite_id: str, hostname: str) -> None:
        """Give a running sprite its name: hostname (in its UTS namespace, set from the
        host, since root inside lacks CAP_SYS_ADMIN) and /etc/hosts."""
        pid = self.init_pid(sprite_id)
        if pid is None:
            raise SystemError_(f"sprite {sprite_id} is not running")
        await run("nsenter", "-t", str(pid), "-u", "hostname", hostname, timeout=10)
        self._write_hosts(self.boot_dir(sprite_id) / "hosts", hostname)

    def init_pid(self, sprite_id: str) -> int | None:
        """Host pid of the sprite's init while it is alive (not a zombie), else None."""
        try:
            pid = int((self.bundle_dir(sprite_id) / "init.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if process_running(pid) else None

    def sprite_path(self, sprite_id: str, path: str) -> Path | None:
        # Through the init's root, which shows the sprite's own mounts (its tmpfs). An
        # absolute link inside would resolve against the host's root: readers open each
        # component without following links (wisp.lifecycle.read_task_files).
        pid = self.init_pid(sprite_id)
        return Path(f"/proc/{pid}/root") / path.lstrip("/") if pid is not None else None

    async def start(self, sprite_id: str, hostname: str, rootfs: Path, run_dir: Path,
                    limits: Limits, netns: Path, resolv_conf: str | None = None,
                    info_dir: Path | None = None, *, disk_image: Path | None = None,
                    base_rootfs: Path | None = None, memory: Path | None = None) -> None:
        # `rootfs` is mounted by the caller (host_rootfs); containers hold no memory
        # snapshots, so `disk_image`, `base_rootfs` and `memory` are not theirs to use.
        if self.init_pid(sprite_id) is not None and await self.running(sprite_id):
            return
        await self._delete(sprite_id)  # a dead leftover with the same id blocks `runc run`
        self.runc_root.mkdir(parents=True, exist_ok=True)
        bundle = self.bundle_dir(sprite_id)
        bundle.mkdir(parents=True, exist_ok=True)
        boot = self._make_boot(sprite_id, hostname)
        if resolv_conf is not None:
            (boot / "resolv.conf").write_text(resolv_conf)
        # cgroup v1 (this project's test hosts): a workload cgroup below the sprite's, see
        # WORKLOAD. On a pure cgroup v2 host the sprite's cgroup could not hold the agent
        # beside a child cgroup ("no internal processes"), so there the limits apply to
        # the agent too and a full sprite needs the restart endpoint.
        if info_dir is not None:  # the source of /.sprite/logs, writable by the sprite's root
            logs = info_dir / "logs"
            logs.mkdir(mode=0o755, exist_ok=True)
            os.chown(logs, ROOT_UID_BASE, ROOT_UID_BASE, follow_symlinks=False)
        reserve = (CGROUP_ROOT / "pids").is_dir()
        outer = Limits(limits.memory_mb + RESERVE_MEMORY_MB, limits.cpus,
                       limits.pids + RESERVE_PIDS) if reserve else limits
        spec = make_spec(hostname=hostname, rootfs=rootfs, init_binary=boot / "init",
                         agent_dir=boot / "run", hosts_file=boot / "hosts", netns=netns,
                         cgroup_path=f"/wisp/{sprite_id}", limits=outer,
                         resolv_conf=boot / "resolv.conf" if resolv_conf is not None else None,
                         info_dir=info_dir)
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
            if reserve:
                await agent.join_cgroups(self.agent_socket(sprite_id),
                                         self._make_workload(sprite_id, limits))
        except BaseException:
            await self.stop(sprite_id)
            raise

    @staticmethod
    def _make_workload(sprite_id: str, limits: Limits) -> list[Path]:
        """Create the workload cgroup in each v1 hierarchy that limits the sprite (runc made
        the sprite's own); return their `cgroup.procs` files."""
        settings = {"pids": {"pids.max": str(limits.pids)},
                    "memory": {"memory.limit_in_bytes": str(limits.memory_mb << 20)},
                    "cpu": {}}  # CPU: the quota stays on the sprite; this only shares it
        procs: list[Path] = []
        for controller, values in settings.items():
            sprite_cgroup = CGROUP_ROOT / controller / "wisp" / sprite_id
            if not sprite_cgroup.is_dir():
                continue
            workload = sprite_cgroup / WORKLOAD
            workload.mkdir(exist_ok=True)
            for key, value in values.items():
                (workload / key).write_text(value)
            procs.append(workload / "cgroup.procs")
        return procs

    async def set_limits(self, sprite_id: str, limits: Limits) -> bool:
        # A write that lowers memory.limit_in_bytes makes the kernel reclaim first, which
        # can take a while: off the event loop.
        return await asyncio.to_thread(self._set_limits, sprite_id, limits)

    @staticmethod
    def _set_limits(sprite_id: str, limits: Limits) -> bool:
        """cgroup v1: the sprite's cgroup keeps the workload's limit plus the reserve (as
        `start` made it), the workload cgroup gets the limit, the CPU quota stays on the
        sprite's cgroup. Writes go in the order that keeps the sprite's cgroup at least the
        workload's size, and a refused write undoes the one before it."""
        v1 = CGROUP_ROOT / "memory" / "wisp" / sprite_id
        if v1.is_dir():
            memory = [(v1 / "memory.limit_in_bytes",
                       str((limits.memory_mb + RESERVE_MEMORY_MB) << 20)),
                      (v1 / WORKLOAD / "memory.limit_in_bytes", str(limits.memory_mb << 20))]
            cpu_dir = CGROUP_ROOT / "cpu" / "wisp" / sprite_id
            period = int((cpu_dir / "cpu.cfs_period_us").read_text())
            cpu = [(cpu_dir / "cpu.cfs_quota_us", str(int(limits.cpus * period)))]
            current = int(memory[0][0].read_text())
            if int(memory[0][1]) < current:  # lowering: the workload first
                memory.reverse()
        else:  # cgroup v2 (no workload cgroup; untested on the v1 hosts we run on)
            v2 = CGROUP_ROOT / "wisp" / sprite_id
            if not v2.is_dir():
                return False
            memory = [(v2 / "memory.max", str(limits.memory_mb << 20))]
            period = int((v2 / "cpu.max").read_text().split()[1])
            cpu = [(v2 / "cpu.max", f"{int(limits.cpus * period)} {period}")]
        done: list[tuple[Path, str]] = []
        try:
            for path, value in [*memory, *cpu]:
                before = path.read_text().strip()
                path.write_text(value)
                done.append((path, before))
        except FileNotFoundError:
            return False  # stopped meanwhile: the next start applies the limits
        except OSError as exc:
            for path, before in reversed(done):
                with contextlib.suppress(OSError):
                    path.write_text(before)
            if exc.errno == errno.EBUSY:
                usage = _usage_mb(v1 / WORKLOAD) if v1.is_dir() else None
                raise Conflict(
                    f"the sprite uses {usage if usage is not None else 'more'} MB, more than "
                    f"the new memory limit of {limits.memory_mb} MB, and the kernel could "
                    "not reclaim enough; nothing changed. End processes or free tmpfs "
                    "files in the sprite (or restart it), then set the limit again"
                ) from None
            raise SystemError_(f"setting cgroup limit {path} failed: {exc}") from None
        return True

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

    @contextlib.asynccontextmanager
    async def quiesced(self, sprite_id: str, disk_dir: Path) -> AsyncIterator[None]:
        # Synced first, while it runs (most dirty data leaves then); then the processes
        # by the cgroup freezer and the ext4 by fsfreeze, for the copy alone.
        await disk.sync(disk_dir)
        paused = self.frozen(sprite_id)
        if not paused:
            await self.pause(sprite_id)
        try:
            await disk.freeze(disk_dir)
            try:
                yield
            finally:
                await disk.thaw(disk_dir)
        finally:
            if not paused:
                await self.resume(sprite_id)

    def frozen(self, sprite_id: str) -> bool:
        """Whether the sprite's processes are frozen (paused, a warm sprite)."""
        freezer = self._freezer(sprite_id)
        return freezer is not None and self._frozen(freezer[0])

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
        # services exit on this SIGTERM: their supervisor must not start them again
        await asyncio.gather(*(self._quiesce(i) for i in pending))
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

    async def _quiesce(self, sprite_id: str) -> None:
        """Best effort, briefly: a wedged agent must not hold up a stop."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(supervisor.quiesce(self.agent_socket(sprite_id)), 1.0)

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
            if f"/wisp/{sprite_id}\n" in cgroups or f"/wisp/{sprite_id}/" in cgroups:
                signal.pidfd_send_signal(fd, sig)
        except (ProcessLookupError, FileNotFoundError):
            pass
        finally:
            os.close(fd)

    @staticmethod
    def _cgroup_pids(sprite_id: str) -> list[int]:
        """Every process of the sprite: its cgroup's and its workload cgroup's."""
        for base in (CGROUP_ROOT / "pids" / "wisp" / sprite_id,
                     CGROUP_ROOT / "wisp" / sprite_id):
            try:
                pids = [int(p) for p in (base / "cgroup.procs").read_text().split()]
            except OSError:
                continue
            try:
                pids += [int(p) for p in (base / WORKLOAD / "cgroup.procs").read_text().split()]
            except OSError:
                pass
            return pids
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

    async def stop(self, sprite_id: str) -> None:
        await self._delete(sprite_id)
        sprite_run = self.run_dir / sprite_id
        shutil.rmtree(sprite_run / "bundle", ignore_errors=True)
        self._remove_boot(sprite_id)

    async def list_ids(self) -> list[str]:
        ids: set[str] = set()
        if self.runc_root.exists():
            res = await run(*self._runc("list", "-q"), check=False, timeout=30)
            ids.update(line.strip() for line in res.stdout.decode().splitlines() if line.strip())
        return sorted(ids)

    def release(self) -> None:
        """Remove this server's directory under /run/wisp, with any boot tmpfs a crash
        left mounted there (call after every sprite is stopped)."""
        for point, _ in mounts_under(self.agent_root):
            unmount(Path(point))
        shutil.rmtree(self.agent_root, ignore_errors=True)
