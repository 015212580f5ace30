"""The guest end of the agent channel: each TCP connection the host opens (QEMU forwards
it from the host into the guest) becomes one connection to wisp-init's socket, relayed by
`channel.Link` (see channel.py), or, when its first frame is `F`, is handed to a worker of
the guest's fs agent (the same `wisp/fs_agent.py` the host runs for container sprites).
Standard library only: it runs on the guest's Python."""

import asyncio
import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from channel import GUEST_IDS, Link, read_frame  # type: ignore[import-not-found]  # noqa: E402

DEBUG = "wisp.debug" in open("/proc/cmdline").read()
FS_AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fs_agent.py")
#: The process holding the sprite's network namespace (start.sh).
NET_PID = "/run/wisp-net.pid"
CLONE_NEWNET = 0x40000000
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
_libc = ctypes.CDLL(None, use_errno=True)


def sprite_netns() -> str:
    with open(NET_PID) as f:
        return f"/proc/{int(f.read())}/ns/net"


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in_sprite(family: int) -> socket.socket:
    """A socket of the sprite's network namespace (a socket keeps the namespace it was
    made in): this thread enters it, makes the socket, and returns at once."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(sprite_netns(), os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return socket.socket(family, socket.SOCK_STREAM)
        finally:
            try:
                _setns(home)
            except OSError:
                os._exit(70)  # never serve on from the sprite's namespace
    finally:
        os.close(home)


def sprite_init_pid() -> int | None:
    """The sprite's wisp-init as the guest sees it: the first process in another pid
    namespace than the relay's."""
    own = os.readlink("/proc/self/ns/pid")
    for name in sorted((n for n in os.listdir("/proc") if n.isdigit()), key=int):
        try:
            if os.readlink(f"/proc/{name}/ns/pid") != own:
                return int(name)
        except OSError:
            continue
    return None


def _sh(script: str, *args: str, ns: list[str] | None = None) -> None:
    argv = ["/bin/sh", "-c", script, "sh", *args]
    if ns:
        argv = ["/bin/nsenter", *ns, *argv]
    subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, timeout=30)


#: What `identity` last applied: it lives in the guest's memory, so a snapshot resumed by
#: the sprite it was taken of (a wake, a restore) finds its identity applied already and
#: skips the commands, which cost ~0.3 s under TCG.
APPLIED: dict[str, Any] = {}


def identity(spec: dict[str, Any]) -> None:
    """Who the sprite is: the host sends it after every start (a boot, a wake, a restore,
    a fork of another sprite's memory). Fresh entropy first: a snapshot restored twice
    must not give two sprites one random stream."""
    if spec.get("time"):  # a snapshot's clock stopped when it was taken
        time.clock_settime(time.CLOCK_REALTIME, float(spec["time"]))
    entropy = bytes.fromhex(spec.get("entropy", ""))
    if entropy:
        fd = os.open("/dev/urandom", os.O_WRONLY)
        try:
            fcntl.ioctl(fd, RNDADDENTROPY,
                        struct.pack("ii", 8 * len(entropy), len(entropy)) + entropy)
            # credited entropy alone reaches the output only at the kernel's next timed
            # reseed (up to 60 s later): two forks of one snapshot read the same bytes
            # until then (CI run 219). Reseed now, as vmgenid makes the kernel do.
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        finally:
            os.close(fd)
    net = [spec.get("mac") or "", spec.get("address") or "", spec.get("gateway") or ""]
    if APPLIED.get("net") != net:
        with open(NET_PID) as f:
            ns = ["-t", f.read().strip(), "-n"]
        script = "ip addr flush dev eth0 2>/dev/null; "
        if net[0]:
            script += 'ip link set eth0 down && ip link set eth0 address "$1" && '
        if net[1]:
            script += 'ip addr add "$2" dev eth0 && ip link set eth0 up && '
            script += 'ip route replace default via "$3" dev eth0 && '
        APPLIED.pop("net", None)
        _sh(script + "true", *net, ns=ns)
        APPLIED["net"] = net
    if spec.get("resolv") is not None and APPLIED.get("resolv") != spec["resolv"]:
        with open("/root/.wisp/resolv.conf", "w") as f:  # in place: it is bind-mounted
            f.write(spec["resolv"])
        APPLIED["resolv"] = spec["resolv"]
    hostname = spec.get("hostname")
    if hostname and APPLIED.get("hostname") != hostname:
        pid = sprite_init_pid()
        if pid is None:
            return
        _sh('hostname "$1"', hostname, ns=["-t", str(pid), "-u"])
        with open("/root/.wisp/hostname", "w") as f:
            f.write(hostname + "\n")
        with open("/root/.wisp/hosts", "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                    f"127.0.1.1\t{hostname}\n")
        APPLIED["hostname"] = hostname


def proc_net() -> dict[str, str]:
    """The sprite's /proc/net/tcp and tcp6 (its listening ports)."""
    with open(NET_PID) as f:
        pid = f.read().strip()
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                out[name] = f.read()
        except FileNotFoundError:
            out[name] = ""
    return out


async def dial(payload: bytes, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter) -> None:
    """A TCP connection inside the sprite's namespace (the URL and port proxies: the
    sprite's `localhost` is only there), then bytes both ways."""
    loop = asyncio.get_running_loop()
    try:
        spec = json.loads(payload)
        host, port = str(spec["host"]), int(spec["port"])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket_in_sprite(family)
    except (ValueError, KeyError, OSError) as e:
        writer.write(_frame(b"C", str(e).encode()))
        writer.close()
        return
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 5.0)
    except (TimeoutError, OSError) as e:
        sock.close()
        reason = "timed out" if isinstance(e, asyncio.TimeoutError) else (
            os.strerror(e.errno) if e.errno else "failed")
        writer.write(_frame(b"C", reason.lower().encode()))
        writer.close()
        return
    writer.write(_frame(b"C", b""))
    r2, w2 = await asyncio.open_connection(sock=sock)

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (ConnectionError, OSError):
            pass

    await asyncio.gather(pump(reader, w2), pump(r2, writer))
    w2.close()
    writer.close()


def _frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">BBI", kind[0], 0, len(payload)) + payload


class FsAgent:
    """The fs agent's zygote, started on first use and again if it died."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: socket.socket | None = None

    def control(self) -> socket.socket:
        if self.proc is None or self.proc.poll() is not None or self.ctl is None:
            if self.ctl is not None:
                self.ctl.close()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", FS_AGENT,
                                          str(theirs.fileno())], pass_fds=[theirs.fileno()])
            theirs.close()
            self.ctl = ours
        return self.ctl

    def hand(self, setup: bytes, fd: int) -> None:
        for attempt in (1, 2):
            try:
                socket.send_fds(self.control(), [setup], [fd])
                return
            except OSError:
                if attempt == 2:
                    raise
                self.proc = None


async def main(agent: str, port: int) -> None:
    fs = FsAgent()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await read_frame(reader)
        if first is None:
            writer.close()
            return
        if first[0] == ord("S"):  # the host's checkpoint: the guest's dirty pages to disk
            await asyncio.get_running_loop().run_in_executor(None, os.sync)
            writer.write(b"S\0\0\0\0\0")
            await writer.drain()
            writer.close()
            return
        if first[0] in (ord("N"), ord("T")):  # identity / listening ports
            try:
                if first[0] == ord("N"):
                    await asyncio.get_running_loop().run_in_executor(
                        None, identity, json.loads(first[2]))
                    reply = b""
                else:
                    reply = json.dumps(proc_net()).encode()
                writer.write(_frame(bytes([first[0]]), reply))
            except (OSError, ValueError, subprocess.SubprocessError) as e:
                print(f"wisp relay: {chr(first[0])}: {e}", file=sys.stderr, flush=True)
                writer.write(_frame(b"E", str(e).encode()))
            await writer.drain()
            writer.close()
            return
        if first[0] == ord("C"):
            await dial(first[2], reader, writer)
            return
        if first[0] == ord("F"):
            sock = writer.get_extra_info("socket")
            fd = os.dup(sock.fileno())
            os.set_blocking(fd, True)  # shared with asyncio's copy, which closes unused
            try:
                fs.hand(first[2], fd)
                os.write(fd, b"K")
            except OSError as e:
                print(f"wisp relay: fs agent: {e}", file=sys.stderr, flush=True)
            finally:
                os.close(fd)
                writer.close()
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, agent)
        except OSError as e:
            if DEBUG:
                print(f"wisp relay: agent socket: {e}", file=sys.stderr, flush=True)
            sock.close()
            writer.close()  # wisp-init is not up yet: the host tries again
            return
        if first[0] == ord("H"):  # the host's readiness probe: wisp-init accepts
            sock.close()
            writer.write(b"H\0\0\0\0\0")  # an H frame, empty
            await writer.drain()
            writer.close()
            return
        await Link(sock, reader, writer, GUEST_IDS).run(first)
        if DEBUG:
            print(f"wisp relay: link ended {first[2][:20]!r}", file=sys.stderr, flush=True)

    server = await asyncio.start_server(handle, "0.0.0.0", port)
    print("wisp relay: listening", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
