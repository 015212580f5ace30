"""The microVM driver: each running VM sprite is a QEMU `-M microvm` process.

Only this package speaks QEMU. A VM sprite boots Debian's cloud kernel with Wisp's
initramfs (`guest/init.sh`), three virtio-mmio disks - the guest's Python (read-only), the
base image (read-only) and the sprite's own disk image on JuiceFS, the same sparse ext4
file a container sprite has - and one user-mode NIC that carries only the agent channel:
`restrict=on` gives the guest no way out, and QEMU runs in the sprite's network namespace,
so the forwarded port is on that namespace's loopback.

A checkpoint with memory (`snapshot`) pauses the guest, lets the caller clone the disk
image at that instant (QEMU flushes the disks when it stops), writes RAM and device state
to a file with a migration, and resumes; `boot(..., memory=FILE)` starts QEMU from such a
file instead of booting, and the guest's processes go on where they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from wisp.errors import SystemError_
from wisp.network.dial import DialError, target
from wisp.runtime import agent
from wisp.runtime.base import Limits, Runtime, SpriteHandle
from wisp.runtime.vm import relay as guest
from wisp.runtime.vm.disks import base_disk
from wisp.runtime.vm.qmp import QMP, QMPError, query_status
from wisp.runtime.vm.relay import AGENT_PORT, HostRelay, open_fs, probe, sync
from wisp.system import run

__all__ = ["VMRuntime", "Assets", "BOOT_TIMEOUT"]

log = logging.getLogger("wisp.runtime.vm")

#: Booting under TCG takes a few seconds; leave room for a loaded CI machine.
BOOT_TIMEOUT = 90.0
_GUEST_IP = "10.0.2.15"
#: The agent link's NIC, told apart from the sprite's own by this address (guest/init.sh).
AGENT_MAC = "02:00:00:00:00:01"
#: How memory snapshots are written: the migration stream through zstd's fastest level.
#: Under TCG QEMU produces the stream at ~120 MB/s whether or not it is compressed, so this
#: costs no time and makes the files 3-14x smaller on the volume (and in object storage);
#: measured in docs/performance.md ("Memory snapshot compression").
COMPRESS = "zstd -1 -T2 -qc"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: The QEMU machine and device layout: a memory snapshot loads only into the same one.
#: Change it with `_argv`'s devices.
LAYOUT = "microvm-2"
#: The tap in the sprite's namespace that is the guest's NIC on the sprite's network.
TAP = "wisp0"
#: Where the guest's init mounts the sprite's root (guest/init.sh), as its fs agent sees it.
GUEST_ROOT = "/root"


@dataclass(frozen=True)
class Assets:
    """What every VM boots from (made by `wisp.runtime.vm.assets`)."""

    kernel: Path
    initrd: Path
    python: Path
    #: "kvm" or "tcg": chosen once per host by booting a probe guest.
    accel: str = "tcg"
    #: Extra kernel command-line words (under TCG, the TSC rate: see `assets.tcg_kernel_args`).
    kernel_args: str = ""


class VMRuntime(Runtime):
    name = "vm"
    memory_snapshots = True
    host_rootfs = False

    def __init__(self, run_dir: Path, host_dir: Path, assets: Assets | None = None,
                 tag: str = "") -> None:
        self.run_dir = run_dir
        self.host_dir = host_dir
        self.tag = tag
        self._assets = assets
        self._assets_lock = asyncio.Lock()
        self._relays: dict[str, HostRelay] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._netns: dict[str, Path] = {}

    # -- the Runtime interface ----------------------------------------------------------------
    async def start(self, sprite_id: str, hostname: str, rootfs: Path, run_dir: Path,
                    limits: Limits, netns: Path, resolv_conf: str | None = None,
                    info_dir: Path | None = None, *, disk_image: Path | None = None,
                    base_rootfs: Path | None = None, memory: Path | None = None) -> None:
        # `rootfs`, `resolv_conf` and `info_dir` are host paths of a container sprite; a
        # VM assembles its root in the guest from the disks (guest/init.sh).
        if disk_image is None or base_rootfs is None:
            raise ValueError("a VM boots from disk_image over base_rootfs")
        if await self.running(sprite_id):
            return
        base = await asyncio.to_thread(base_disk, base_rootfs)
        await self.boot(sprite_id, hostname, disk_image, base, limits, netns, memory,
                        resolv_conf)

    async def adopt(self, sprite_id: str, netns: Path) -> None:
        """QEMU outlived the server that started it (its own session); the relay to its
        agent did not: listen again, and check the guest answers."""
        self._netns[sprite_id] = netns
        if not await probe(netns):
            raise SystemError_(f"VM {sprite_id} does not answer", public="the sprite's VM "
                               "does not answer")
        relay = HostRelay(self.agent_socket(sprite_id), netns)
        await relay.start()
        self._relays[sprite_id] = relay

    def handle(self, sprite_id: str, handle: SpriteHandle) -> SpriteHandle:
        """Files are reached through the guest's own fs agent, on the guest's paths and
        ids (a VM's disks hold the ids the guest sees: `disks.base_disk`)."""
        netns = self._netns.get(sprite_id)
        if netns is None:
            return handle

        async def fs_connect(setup: bytes) -> tuple[asyncio.StreamReader,
                                                    asyncio.StreamWriter]:
            return await open_fs(netns, setup)

        return replace(handle, rootfs=Path(GUEST_ROOT), uid_base=0, fs_connect=fs_connect)

    async def terminate(self, sprite_ids: list[str], grace: float) -> None:
        """SIGTERM to every process of each sprite but its init, from inside (the host sees
        only QEMU); then up to `grace` seconds for them to go."""
        async def one(sprite_id: str) -> None:
            script = (f"kill -TERM -1 2>/dev/null; i=0; while [ $i -lt {int(grace * 10)} ]; do "
                      "n=0; for p in /proc/[0-9]*; do n=$((n+1)); done; "
                      "[ $n -le 4 ] && break; sleep 0.1; i=$((i+1)); done")
            with contextlib.suppress(Exception):
                proc = await agent.spawn(self.agent_socket(sprite_id), ["/bin/sh", "-c", script],
                                         {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, "/", 0, 0,
                                         [0], False, stdin=False)
                try:
                    await asyncio.wait_for(proc.wait(), grace + 5.0)
                finally:
                    proc.close()

        await asyncio.gather(*(one(i) for i in sprite_ids if self.init_pid(i) is not None))

    async def set_limits(self, sprite_id: str, limits: Limits) -> bool:
        """A running VM keeps the memory and CPUs it booted with; new limits apply at its
        next start (there is no balloon driver yet: docs/vm.md)."""
        return False

    @contextlib.asynccontextmanager
    async def quiesced(self, sprite_id: str, disk_dir: Path) -> AsyncIterator[None]:
        """The guest paused: QEMU flushes its disks when it stops the guest, so the disk
        image is a point in time, as after a power cut (ext4's journal covers that)."""
        was_running = await self._status(sprite_id) == "running"
        if was_running:
            await self._sync(sprite_id)
            await self.pause(sprite_id)
        try:
            yield
        finally:
            if was_running:
                await asyncio.shield(self.resume(sprite_id))

    async def _sync(self, sprite_id: str) -> None:
        """The guest's page cache to its disk first, so that a copy of the disk image alone
        (a filesystem-only restore, a fork) has what the sprite wrote, not just what a
        power cut would have left."""
        netns = self._netns.get(sprite_id)
        if netns is not None and not await sync(netns):
            log.warning("VM %s did not sync its disks before a snapshot", sprite_id)

    def frozen(self, sprite_id: str) -> bool:
        return query_status(self.qmp_socket(sprite_id)) in ("paused", "postmigrate")

    async def _status(self, sprite_id: str) -> str | None:
        return await asyncio.to_thread(query_status, self.qmp_socket(sprite_id))

    def sprite_path(self, sprite_id: str, path: str) -> Path | None:
        return None  # the guest's files are not on the host

    async def list_ids(self) -> list[str]:
        if not self.run_dir.exists():
            return []
        return sorted(d.name for d in self.run_dir.iterdir()
                      if d.name.startswith("sprite-") and (d / "vm").exists())

    async def rename(self, sprite_id: str, hostname: str) -> None:
        hosts = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                 f"127.0.1.1\t{hostname}\n")
        proc = await agent.spawn(self.agent_socket(sprite_id), [
            "/bin/sh", "-c", 'hostname "$1" && printf "%s" "$2" > /.wisp/hosts', "sh",
            hostname, hosts], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, "/", 0, 0, [0],
            False, stdin=False)
        try:
            code = await asyncio.wait_for(proc.wait(), 30.0)
        finally:
            proc.close()
        if code != 0:
            raise SystemError_(f"renaming VM {sprite_id} failed ({code})",
                               public="naming the sprite failed")

    def release(self) -> None:
        shutil.rmtree(self.host_dir, ignore_errors=True)

    @property
    def accelerator(self) -> str | None:
        """"kvm" or "tcg" once known (the first VM start probes), else None."""
        return self._assets.accel if self._assets is not None else None

    async def ensure_assets(self) -> Assets:
        """Kernel, initramfs and guest Python: made by `make vm`, else here on first use."""
        async with self._assets_lock:
            if self._assets is None:
                self._assets = await asyncio.to_thread(prepare_assets)
                log.info("VM sprites run under %s", self._assets.accel.upper())
            return self._assets

    async def dial(self, sprite_id: str, host: str, port: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        """A connection made inside the guest's sprite namespace (its `localhost` is not
        the host namespace's): through the relay. Raises `DialError`."""
        family, ip = target(host, port)
        shown = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
        netns = self._netns.get(sprite_id)
        if netns is None:
            raise DialError("the sprite's network is not available")
        try:
            reader, writer, error = await guest.dial(netns, ip, port)
        except (OSError, TimeoutError):
            raise DialError("the sprite's VM did not answer") from None
        if error is not None:
            raise DialError(f"dial tcp {shown}: {error}")
        return reader, writer, shown

    async def proc_net(self, sprite_id: str) -> dict[str, str] | None:
        netns = self._netns.get(sprite_id)
        if netns is None:
            raise OSError("the sprite's VM is not running")
        tables = await guest.proc_net(netns)
        if tables is None:
            raise OSError("the sprite's VM did not answer")
        return tables

    async def snapshot_key(self, limits: Limits, image_version: str) -> str:
        """What a memory snapshot can be resumed by: one booted from the same kernel,
        initramfs, guest Python and base image, on the same accelerator, RAM size, CPU
        count and device layout (`LAYOUT`). Names a base snapshot (`wisp.base_snapshots`)."""
        a = await self.ensure_assets()

        def digest() -> str:
            h = hashlib.sha256(f"{LAYOUT}|{a.accel}|{a.kernel_args}|{limits.memory_mb}|"
                               f"{max(1, int(limits.cpus))}|{image_version}".encode())
            h.update((a.initrd.parent / (a.initrd.name + ".manifest.json")).read_bytes())
            for f in (a.kernel, a.python):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            return h.hexdigest()[:20]

        return await asyncio.to_thread(digest)

    # -- where things are ---------------------------------------------------------------------
    def vm_dir(self, sprite_id: str) -> Path:
        return self.run_dir / sprite_id / "vm"

    def _short(self, sprite_id: str) -> Path:
        # Unix socket paths are limited to 108 bytes: sockets live under the short host dir.
        return self.host_dir / sprite_id.removeprefix("sprite-")

    def agent_socket(self, sprite_id: str) -> Path:
        return self._short(sprite_id) / "agent.sock"

    def qmp_socket(self, sprite_id: str) -> Path:
        return self._short(sprite_id) / "qmp.sock"

    def init_pid(self, sprite_id: str) -> int | None:
        """QEMU's pid while it runs (from its pidfile, checked against /proc)."""
        try:
            pid = int((self.vm_dir(sprite_id) / "qemu.pid").read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(self.qmp_socket(sprite_id)).encode() in cmdline else None

    async def running(self, sprite_id: str) -> bool:
        return self.init_pid(sprite_id) is not None

    # -- life -------------------------------------------------------------------------------
    def _argv(self, sprite_id: str, hostname: str, disk: Path, base: Path, limits: Limits,
              memory: Path | None, mac: str) -> list[str]:
        a = self._assets
        if a is None:
            raise RuntimeError("ensure_assets() first")
        vm = self.vm_dir(sprite_id)
        argv = [
            "qemu-system-x86_64", "-M", "microvm,rtc=on", "-accel", a.accel,
            "-cpu", "max" if a.accel == "tcg" else "host",
            "-smp", str(max(1, int(limits.cpus))), "-m", str(limits.memory_mb),
            "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-serial", f"file:{vm / 'console.log'}",
            "-kernel", str(a.kernel), "-initrd", str(a.initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {a.kernel_args} wisp.hostname={hostname} "
                       f"wisp.agent_mac={AGENT_MAC}"
                       + (" wisp.debug" if os.environ.get("WISP_VM_DEBUG") else ""),
        ]
        for name, path, ro in (("python", a.python, True), ("base", base, True),
                               ("sprite", disk, False)):
            # locking=off: QEMU drops and takes back its image locks around a migration
            # (a memory snapshot), and on JuiceFS taking them back failed now and then
            # ("Failed to get shared write lock"), leaving the guest paused. One QEMU per
            # sprite is Wisp's own rule; the lock adds nothing to it.
            opts = f"file={path},if=none,id={name},format=raw,file.locking=off"
            opts += ",readonly=on" if ro else ",discard=unmap"
            argv += ["-drive", opts, "-device", f"virtio-blk-device,drive={name},serial={name}"]
        argv += [
            "-netdev", f"user,id=agent,restrict=on,"
                       f"hostfwd=tcp:127.0.0.1:{AGENT_PORT}-{_GUEST_IP}:{AGENT_PORT}",
            "-device", f"virtio-net-device,netdev=agent,mac={AGENT_MAC}",
            # the sprite's own NIC: the tap `_plumb` made (always there, so that a memory
            # snapshot loads whether or not the server has an uplink)
            "-netdev", f"tap,id=net,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device", f"virtio-net-device,netdev=net,mac={mac}",
            "-device", "virtio-rng-device",
            # the guest hands back the pages it frees (free page reporting): QEMU discards
            # them, so the host gets its memory back and a memory snapshot skips them
            "-device", "virtio-balloon-device,free-page-reporting=on,deflate-on-oom=on",
            "-qmp", f"unix:{self.qmp_socket(sprite_id)},server=on,wait=off",
            "-pidfile", str(vm / "qemu.pid"),
        ]
        if memory is not None:
            argv += ["-incoming", f"exec:{_decompressor(memory)} {_quote(memory)}"]
        return argv

    async def boot(self, sprite_id: str, hostname: str, disk: Path, base: Path,
                   limits: Limits, netns: Path, memory: Path | None = None,
                   resolv_conf: str | None = None) -> None:
        """Start the sprite's VM in `netns` and return once its agent answers and it knows
        who it is (`_identity`); from the memory snapshot `memory` (taken with the same
        disks, maybe of another sprite: a fork) instead of booting."""
        await self.ensure_assets()
        net = await _plumb(netns)
        vm = self.vm_dir(sprite_id)
        vm.mkdir(parents=True, exist_ok=True)
        self._short(sprite_id).mkdir(parents=True, exist_ok=True)
        for stale in (self.qmp_socket(sprite_id), vm / "qemu.pid"):
            stale.unlink(missing_ok=True)
        argv = ["nsenter", f"--net={netns}", *self._argv(sprite_id, hostname, disk, base,
                                                           limits, memory, net.mac)]
        with open(vm / "qemu.log", "ab") as logf:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                    start_new_session=True, close_fds=True)
        self._procs[sprite_id] = proc
        self._netns[sprite_id] = netns
        try:
            relay = HostRelay(self.agent_socket(sprite_id), netns)
            await relay.start()
            self._relays[sprite_id] = relay
            if memory is not None:
                await self._resume_incoming(sprite_id, proc)
            await self._wait_agent(sprite_id, proc)
            spec = {**asdict(net), "hostname": hostname, "resolv": resolv_conf,
                    "entropy": os.urandom(32).hex(), "time": time.time()}
            if not await guest.identity(netns, spec):
                raise SystemError_(f"VM {sprite_id} did not take its identity",
                                   public="the sprite's VM failed to start")
        except BaseException:
            await asyncio.shield(self.stop(sprite_id))
            raise

    async def _resume_incoming(self, sprite_id: str, proc: subprocess.Popen[bytes]) -> None:
        """Wait for QEMU to load the memory snapshot, then run the guest: a snapshot is
        taken paused, and QEMU keeps the state the stream recorded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOOT_TIMEOUT
        qmp: QMP | None = None
        try:
            while True:
                if proc.poll() is not None:
                    raise SystemError_(f"QEMU exited ({proc.returncode}) loading the memory "
                                       f"of {sprite_id}", public="the sprite's VM failed to start")
                if loop.time() > deadline:
                    raise SystemError_(f"VM {sprite_id} did not load its memory in "
                                       f"{BOOT_TIMEOUT:g} s", public="the sprite's VM did not start")
                try:
                    if qmp is None:
                        qmp = await self._qmp(sprite_id)
                    status = (await qmp.execute("query-status"))["status"]
                except (OSError, QMPError):
                    await asyncio.sleep(0.01)
                    continue
                if status in ("paused", "postmigrate"):
                    migration = await qmp.execute("query-migrate")
                    if migration.get("status", "completed") == "completed":
                        await qmp.execute("cont")
                        return
                elif status == "running":
                    return
                elif (await qmp.execute("query-migrate")).get("status") == "failed":
                    # a stream QEMU cannot load (damaged, another device layout): it
                    # may wait on instead of exiting
                    raise SystemError_(f"QEMU could not load the memory of {sprite_id}",
                                       public="the sprite's VM failed to start")
                await asyncio.sleep(0.005)
        finally:
            if qmp is not None:
                qmp.close()

    async def _wait_agent(self, sprite_id: str, proc: subprocess.Popen[bytes]) -> None:
        """Until the guest's relay answers and wisp-init accepts behind it (`probe`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOOT_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise SystemError_(f"QEMU exited ({proc.returncode}) while booting "
                                   f"{sprite_id}; see {self.vm_dir(sprite_id)}",
                                   public="the sprite's VM failed to start")
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(probe(self._netns[sprite_id]), 2.0):
                    return
            if loop.time() > deadline:
                raise SystemError_(f"VM {sprite_id} did not answer in {BOOT_TIMEOUT:g} s",
                                   public="the sprite's VM did not start")
            await asyncio.sleep(0.1)

    async def stop(self, sprite_id: str) -> None:
        """End QEMU (the guest with it) and the relay; idempotent. A running guest first
        writes its page cache to its disk (as unmounting a container's disk does), for at
        most a few seconds: a wedged guest is then ended as by a power cut."""
        netns = self._netns.pop(sprite_id, None)
        if netns is not None and await self._status(sprite_id) == "running":
            await sync(netns, timeout=5.0)
        if os.environ.get("WISP_VM_DEBUG"):
            with contextlib.suppress(OSError):
                shutil.copy(self.vm_dir(sprite_id) / "console.log", f"/tmp/console-{sprite_id}.log")
        relay = self._relays.pop(sprite_id, None)
        if relay is not None:
            await relay.stop()
        pid = self.init_pid(sprite_id)
        proc = self._procs.pop(sprite_id, None)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.to_thread(proc.wait)
        elif pid is not None:
            await _wait_gone(pid)
        for path in (self.qmp_socket(sprite_id), self.agent_socket(sprite_id),
                     self.vm_dir(sprite_id) / "qemu.pid"):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self._short(sprite_id).rmdir()

    async def _qmp(self, sprite_id: str) -> QMP:
        return await QMP.connect(self.qmp_socket(sprite_id))

    async def _command(self, sprite_id: str, command: str) -> None:
        qmp = await self._qmp(sprite_id)
        try:
            await qmp.execute(command)
        finally:
            qmp.close()

    async def pause(self, sprite_id: str) -> None:
        await self._command(sprite_id, "stop")

    async def resume(self, sprite_id: str) -> None:
        await self._command(sprite_id, "cont")

    async def snapshot(self, sprite_id: str, memory: Path,
                       copy_disk: Callable[[], Awaitable[None]], resume: bool = True) -> None:
        """Pause the guest, run `copy_disk` (the disk image is consistent with the memory
        while paused), write memory + device state to `memory`, resume (unless `resume`
        is False, or it was paused already: a warm sprite stays warm)."""
        tmp = memory.with_name(memory.name + ".tmp")
        tmp.unlink(missing_ok=True)
        was_running = await self._status(sprite_id) == "running"
        if was_running:  # a paused guest cannot sync; its memory holds what it wrote
            await self._sync(sprite_id)
        resume = resume and was_running
        qmp = await self._qmp(sprite_id)
        try:
            await qmp.execute("stop")
            try:
                await copy_disk()
                await qmp.execute("migrate", uri=f"exec:{COMPRESS} > {_quote(tmp)}")
                while True:
                    info = await qmp.execute("query-migrate")
                    status = info.get("status")
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled"):
                        raise SystemError_(f"memory snapshot of {sprite_id}: {info}",
                                           public="the memory snapshot failed")
                    await asyncio.sleep(0.01)
            finally:
                if resume:
                    await qmp.execute("cont")
        except QMPError as e:
            tmp.unlink(missing_ok=True)
            raise SystemError_(f"memory snapshot of {sprite_id}: {e}",
                               public="the memory snapshot failed") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            qmp.close()
        os.replace(tmp, memory)


@dataclass(frozen=True)
class _Nic:
    """The guest's NIC on the sprite's network, as the guest is to configure it."""

    mac: str
    address: str | None = None  # "IP/prefix"; None without an uplink
    gateway: str | None = None


async def _plumb(netns: Path) -> _Nic:
    """The tap that is the guest's NIC, made afresh in the sprite's namespace and, when
    the namespace has a veth (an uplink), joined to it: every frame arriving on eth0 is
    sent out of the tap and back (tc mirred, as Kata Containers does), so the guest owns
    the sprite's address and the per-sprite network code (firewall, egress policy, DNS,
    URLs) is the same for both drivers. The guest takes eth0's MAC and address; its
    gateway is the other end of the /31 (`addresses.Pair`)."""
    name = netns.name
    await run("ip", "-n", name, "link", "del", TAP, check=False, timeout=30)
    await run("ip", "-n", name, "-batch", "-", timeout=30,
              input=f"tuntap add dev {TAP} mode tap\nlink set {TAP} up\n".encode())
    res = await run("ip", "-n", name, "-j", "addr", "show", "dev", "eth0", check=False,
                    timeout=30)
    links = json.loads(res.stdout or b"[]") if res.returncode == 0 else []
    if not links:  # no uplink: the guest's NIC leads nowhere
        return _Nic(_local_mac(name))
    addr = next((a for a in links[0].get("addr_info", []) if a.get("family") == "inet"),
                None)
    await run("tc", "-n", name, "qdisc", "del", "dev", "eth0", "ingress", check=False,
              timeout=30)
    redirect = "protocol all u32 match u8 0 0 action mirred egress redirect dev"
    await run("tc", "-n", name, "-batch", "-", timeout=30, input=(
        f"qdisc add dev eth0 ingress\n"
        f"filter add dev eth0 parent ffff: {redirect} {TAP}\n"
        f"qdisc add dev {TAP} ingress\n"
        f"filter add dev {TAP} parent ffff: {redirect} eth0\n").encode())
    if addr is None:
        return _Nic(links[0]["address"])
    local = ipaddress.IPv4Address(addr["local"])
    return _Nic(links[0]["address"], f"{local}/{addr['prefixlen']}",
                str(ipaddress.IPv4Address(int(local) ^ 1)))


def _local_mac(netns_name: str) -> str:
    """A MAC of the namespace's own (so the same at each start: the guest then has
    nothing to change after a wake or a restore)."""
    raw = bytearray(hashlib.sha256(netns_name.encode()).digest()[:6])
    raw[0] = (raw[0] & 0xFE) | 0x02  # unicast, locally administered
    return ":".join(f"{b:02x}" for b in raw)


def _decompressor(path: Path) -> str:
    """What reads a memory file back: zstd's (`COMPRESS`), or `cat` for one written
    uncompressed (before snapshots were compressed)."""
    with open(path, "rb") as f:
        return "zstd -dcq" if f.read(4) == ZSTD_MAGIC else "cat"


def _quote(path: Path) -> str:
    s = str(path)
    if any(c in s for c in " '\"\\$`;&|<>"):
        raise ValueError(f"unsafe path for a QEMU exec: migration: {s!r}")
    return s


async def _wait_gone(pid: int, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if not Path(f"/proc/{pid}").exists():
            return
        await asyncio.sleep(0.01)


def guest_files() -> dict[str, Path | bytes]:
    """The initramfs's own files (beside busybox and the kernel modules)."""
    from wisp.runtime.container import build_init

    here = Path(__file__).resolve().parent
    return {
        "init": here / "guest" / "init.sh",
        "bin/wisp-start": here / "guest" / "start.sh",
        "bin/wisp-sprite": here / "guest" / "sprite.sh",
        "bin/wisp-relay": here / "guest" / "relay.sh",
        "wisp/relay.py": here / "guest" / "relay.py",
        "wisp/fs_agent.py": here.parents[1] / "fs_agent.py",
        "wisp/channel.py": here / "channel.py",
        "wisp/init": build_init(),
    }


def prepare_assets(out: Path | None = None) -> Assets:
    """Kernel, guest Python and initramfs, made where missing (`wisp.runtime.vm.assets`);
    the accelerator is the probe guest's verdict."""
    from wisp.runtime.vm import assets as a

    out = out or a.build_dir()
    kernel, modules = a.ensure_kernel(out)
    python = a.ensure_python(out)
    initrd = a.build_initrd(out, guest_files(), modules)
    if a.probe_kvm(kernel, out):
        return Assets(kernel, initrd, python, "kvm")
    return Assets(kernel, initrd, python, "tcg", a.tcg_kernel_args())
