"""The guest end of the agent channel: each TCP connection the host opens (QEMU forwards
it from the host into the guest) becomes one connection to wisp-init's socket, relayed by
`channel.Link` (see channel.py), or, when its first frame is `F`, is handed to a worker of
the guest's fs agent (the same `wisp/fs_agent.py` the host runs for container sprites).
Standard library only: it runs on the guest's Python."""

import asyncio
import os
import socket
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from channel import GUEST_IDS, Link, read_frame  # type: ignore[import-not-found]  # noqa: E402

DEBUG = "wisp.debug" in open("/proc/cmdline").read()
FS_AGENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fs_agent.py")


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
