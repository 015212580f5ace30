"""The init agent (wisp-init) and its asyncio client, against a real runc container."""

from __future__ import annotations

import array
import asyncio
import os
import re
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.container import BusyboxSprite, build_init, busybox_sprite
from wisp.errors import BadRequest, SpriteUnresponsive, SystemError_
from wisp.runtime import agent
from wisp.runtime.agent import AgentProcess
from wisp.runtime.base import ROOT_UID_BASE, SpriteHandle

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/sprite", "LANG": "C.UTF-8"}


@pytest.fixture(scope="module")
def init_bin() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wisp-init-") as d:
        yield build_init(Path(d) / "wisp-init")


@pytest.fixture(scope="module")
def sprite(init_bin: Path) -> Iterator[BusyboxSprite]:
    with busybox_sprite(init=init_bin) as s:
        yield s


@pytest.fixture
def handle(sprite: BusyboxSprite) -> SpriteHandle:
    return sprite.handle


async def _spawn(h: SpriteHandle, argv: list[str], *, tty: bool = False, uid: int = 1000,
                 cwd: str = "/home/sprite", env: dict[str, str] | None = None,
                 **kw: object) -> AgentProcess:
    return await agent.spawn(h.agent_socket, argv, env or ENV, cwd, uid, uid, [uid], tty,
                             **kw)  # type: ignore[arg-type]


async def _collect(proc: AgentProcess) -> tuple[bytes, bytes, int]:
    async def drain(r: agent.FdReader | None) -> bytes:
        out = b""
        while r is not None:
            chunk = await r.read(65536)
            if not chunk:
                break
            out += chunk
        return out

    out, err = await asyncio.gather(drain(proc.stdout), drain(proc.stderr))
    code = await asyncio.wait_for(proc.wait(), 10)
    proc.close()
    return out, err, code


async def _run(h: SpriteHandle, argv: list[str], **kw: object) -> tuple[bytes, bytes, int]:
    return await _collect(await _spawn(h, argv, **kw))


def _states(h: SpriteHandle) -> list[str]:
    """State letters of every process in the sprite (read from /proc inside it)."""
    out, _, _ = asyncio.run(_run(h, ["sh", "-c", "cat /proc/[0-9]*/stat 2>/dev/null"], uid=0,
                                 cwd="/"))
    return [line.rsplit(")", 1)[1].split()[0] for line in out.decode().splitlines() if ")" in line]


def test_spawn_separates_streams_and_reports_exit(handle: SpriteHandle) -> None:
    """stdout and stderr arrive on their own pipes and the exit code comes back as is."""
    out, err, code = asyncio.run(_run(handle, ["sh", "-c", "echo out; echo err >&2; exit 3"]))
    assert (out, err, code) == (b"out\n", b"err\n", 3)


def test_spawn_uses_requested_user_cwd_and_env(handle: SpriteHandle) -> None:
    """The child runs with the requested ids, directory and exactly the requested env,
    and PATH from that env is used to find the program."""
    env = {"PATH": "/bin", "FOO": "bar baz"}
    out, _, code = asyncio.run(_run(handle, ["sh", "-c", "id -u; id -g; id -G; pwd; env"],
                                    cwd="/tmp", env=env))
    lines = out.decode().splitlines()
    assert code == 0
    assert lines[:4] == ["1000", "1000", "1000", "/tmp"]
    assert {"PATH=/bin", "FOO=bar baz"} <= set(lines[4:])
    assert not any(line.startswith("HOME=") for line in lines[4:])


def test_path_overrides_program(handle: SpriteHandle) -> None:
    """`path` names the program to run; argv (after argv[0]) is passed unchanged."""
    script = "printf '#!/bin/sh\\necho \"$0 $1\"\\n' > /tmp/prog && chmod +x /tmp/prog"
    assert asyncio.run(_run(handle, ["sh", "-c", script]))[2] == 0
    out, _, code = asyncio.run(_run(handle, ["not-a-program", "arg1"], path="/tmp/prog"))
    assert (out, code) == (b"/tmp/prog arg1\n", 0)


def test_tty_gets_size_before_exec_and_a_controlling_terminal(handle: SpriteHandle) -> None:
    """A TTY child sees its window size from the first instruction and owns /dev/tty."""
    out, err, code = asyncio.run(_run(
        handle, ["sh", "-c", "tty; stty size; echo via-dev-tty > /dev/tty"], tty=True,
        rows=33, cols=99))
    assert code == 0 and err == b""
    assert re.match(rb"/dev/pts/\d+\r\n33 99\r\nvia-dev-tty\r\n$", out), out


def test_resize_reaches_the_terminal(handle: SpriteHandle) -> None:
    """resize() sets the window size on the master; the running program sees it."""
    async def go() -> bytes:
        proc = await _spawn(handle, ["sh", "-c", "read x; stty size"], tty=True)
        proc.resize(40, 120)
        await proc.write(b"go\n")
        out, _, code = await _collect(proc)
        assert code == 0
        return out

    assert asyncio.run(go()).endswith(b"40 120\r\n")


def test_stdin_pipe_and_eof(handle: SpriteHandle) -> None:
    """Bytes written go to the child's stdin; close_stdin() gives it EOF."""
    async def go() -> tuple[bytes, bytes, int]:
        proc = await _spawn(handle, ["cat"])
        await proc.write(b"hello from pipe\n" * 1000)
        proc.close_stdin()
        return await _collect(proc)

    assert asyncio.run(go()) == (b"hello from pipe\n" * 1000, b"", 0)


def test_no_stdin_is_dev_null(handle: SpriteHandle) -> None:
    """stdin=False gives the child an already-ended stdin: cat returns at once."""
    out, _, code = asyncio.run(_run(handle, ["cat"], stdin=False))
    assert (out, code) == (b"", 0)


@pytest.mark.parametrize("argv,cwd,code,message", [
    (["no-such-command"], "/", 127, b"no-such-command: command not found"),
    (["/no/such/file"], "/", 127, b"/no/such/file: No such file or directory"),
    (["/etc/passwd"], "/", 126, b"/etc/passwd: Permission denied"),
    (["pwd"], "/no/such/dir", 1, b"cd: /no/such/dir: No such file or directory"),
])
def test_spawn_failures_exit_like_a_shell(handle: SpriteHandle, argv: list[str], cwd: str,
                                          code: int, message: bytes) -> None:
    """Unknown program 127, not executable 126, bad cwd 1, each with a message on stderr."""
    out, err, got = asyncio.run(_run(handle, argv, cwd=cwd))
    assert got == code
    assert message in err and out == b""


def test_tty_spawn_failure_is_printed_on_the_terminal(handle: SpriteHandle) -> None:
    """With a TTY the failure message goes to the terminal."""
    out, _, code = asyncio.run(_run(handle, ["no-such-command"], tty=True))
    assert code == 127 and b"command not found" in out


def test_signal_goes_to_the_process_group(handle: SpriteHandle) -> None:
    """signal() reaches the whole group: a background child dies with its shell."""
    async def go() -> int:
        proc = await _spawn(handle, ["sh", "-c", "sleep 31 & sleep 32; wait"])
        await asyncio.sleep(0.2)
        await proc.signal(15)
        return (await _collect(proc))[2]

    assert asyncio.run(go()) == 143
    time.sleep(0.1)
    out, _, _ = asyncio.run(_run(handle, ["ps"]))
    assert b"sleep 31" not in out and b"sleep 32" not in out


def test_detached_process_keeps_running_and_orphans_are_reaped(handle: SpriteHandle) -> None:
    """Closing the connection detaches: the process finishes its work; PID 1 reaps it and
    any orphan, so no zombie is left."""
    async def go() -> None:
        proc = await _spawn(handle, ["sh", "-c", "sleep 0.3; echo done > /tmp/detached"])
        proc.close()
        orphan = await _spawn(handle, ["sh", "-c", "sleep 0.2 & exit 0"])
        await _collect(orphan)
        await asyncio.sleep(0.8)

    asyncio.run(go())
    out, _, code = asyncio.run(_run(handle, ["cat", "/tmp/detached"]))
    assert (out, code) == (b"done\n", 0)
    assert "Z" not in _states(handle)


def test_many_concurrent_spawns(handle: SpriteHandle) -> None:
    """The single-threaded agent serves many connections at once without mixing them."""
    async def go() -> list[tuple[bytes, bytes, int]]:
        return await asyncio.gather(*(_run(handle, ["sh", "-c", f"echo {i}; exit {i % 7}"])
                                      for i in range(60)))

    for i, (out, _, code) in enumerate(asyncio.run(go())):
        assert (out, code) == (f"{i}\n".encode(), i % 7)


def _raw(handle: SpriteHandle, payload: bytes, fds: list[int] | None = None,
         sndbuf: int | None = None) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(5)
        if sndbuf:
            s.setsockopt(socket.SOL_SOCKET, 32, sndbuf)  # SO_SNDBUFFORCE
        s.connect(str(handle.agent_socket))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([payload], anc)
        try:
            return s.recv(4096)
        except ConnectionResetError:
            return b""
    finally:
        s.close()


def test_bad_requests_are_refused_and_the_agent_survives(handle: SpriteHandle) -> None:
    """Garbage, missing fields, wrong fd counts and oversized requests get an error reply;
    the agent keeps serving afterwards."""
    ok = b"spawn\0arg=true\0uid=1000\0gid=1000\0tty=0\0"
    r, w = os.pipe()
    try:
        assert _raw(handle, b"\xff\xfe garbage").startswith(b"error ")
        assert _raw(handle, b"spawn\0").startswith(b"error ")
        assert _raw(handle, b"spawn\0arg=x\0uid=-1\0gid=0\0").startswith(b"error ")
        assert _raw(handle, b"spawn\0arg=x\0uid=0\0gid=0\0rows=0\0").startswith(b"error ")
        assert _raw(handle, b"spawn\0arg=x\0uid=0\0gid=0\0bogus=1\0").startswith(b"error ")
        assert _raw(handle, ok).startswith(b"error ")  # no fds for a non-TTY spawn
        assert _raw(handle, ok, fds=[r, w]).startswith(b"error ")
        assert _raw(handle, b"spawn\0arg=x\0uid=0\0gid=0\0tty=1\0", fds=[r]).startswith(
            b"error ")
        big = b"spawn\0arg=x\0uid=0\0gid=0\0arg=" + b"a" * (2 << 20) + b"\0"
        assert _raw(handle, big, sndbuf=len(big) + 65536).startswith(b"error ")
    finally:
        os.close(r)
        os.close(w)
    out, _, code = asyncio.run(_run(handle, ["echo", "still alive"]))
    assert (out, code) == (b"still alive\n", 0)


def test_fuzzed_requests_never_kill_the_agent(handle: SpriteHandle) -> None:
    """Hundreds of random and half-valid packets (some with fds) leave the agent serving."""
    import random

    rng = random.Random(1234)
    keys = [b"arg", b"env", b"path", b"cwd", b"uid", b"gid", b"groups", b"tty", b"rows",
            b"cols", b"x", b""]
    values = [b"", b"0", b"1", b"-1", b"65536", b"99999999999999999999", b"1,2,,3", b"a=b",
              b"no-such-prog", b"/", b"\xff\xfe"]
    r, w = os.pipe()
    try:
        for i in range(300):
            if i % 3 == 0:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
            else:
                fields = [b"spawn"] + [rng.choice(keys) + b"=" + rng.choice(values)
                                       for _ in range(rng.randrange(0, 12))]
                payload = b"\0".join(fields) + (b"\0" if rng.random() < 0.8 else b"")
            fds = rng.choice([None, [r], [r, w, w], [r, w, w, r]])
            _raw(handle, payload, fds=fds)
    finally:
        os.close(r)
        os.close(w)
    out, _, code = asyncio.run(_run(handle, ["echo", "still alive"]))
    assert (out, code) == (b"still alive\n", 0)


def test_client_refuses_oversized_and_malformed_requests(handle: SpriteHandle) -> None:
    """The client rejects what the agent would refuse, with a 400-class error."""
    with pytest.raises(BadRequest):
        asyncio.run(_run(handle, ["echo", "x" * (1 << 20)]))
    with pytest.raises(BadRequest):
        asyncio.run(_run(handle, ["echo", "nul\0byte"]))
    with pytest.raises(BadRequest):
        asyncio.run(_run(handle, ["echo"], env={"BAD=KEY": "v"}))


def test_socket_is_private(sprite: BusyboxSprite) -> None:
    """The agent socket is mode 0600 and owned by the sprite's root."""
    st = os.stat(sprite.handle.agent_socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == ROOT_UID_BASE


def test_wait_ready(sprite: BusyboxSprite, tmp_path: Path) -> None:
    """wait_ready returns for a live agent and raises SystemError_ after its timeout."""
    asyncio.run(agent.wait_ready(sprite.handle.agent_socket, 1.0))
    start = time.monotonic()
    with pytest.raises(SystemError_):
        asyncio.run(agent.wait_ready(tmp_path / "none.sock", 0.2))
    assert time.monotonic() - start < 2


def test_spawn_on_a_dead_socket_is_sprite_unresponsive(tmp_path: Path) -> None:
    """No agent behind the path: SpriteUnresponsive (503, the reply names the restart
    endpoint and no host path), not a traceback."""
    bogus = SpriteHandle(name="x", rootfs=tmp_path, agent_socket=tmp_path / "agent.sock")
    with pytest.raises(SpriteUnresponsive) as err:
        asyncio.run(_run(bogus, ["true"]))
    assert err.value.status == 503 and "restart" in err.value.public_message
    assert str(tmp_path) not in err.value.public_message


def test_sigterm_stops_everything_and_lost_agent_reports_137(init_bin: Path) -> None:
    """SIGTERM to PID 1: processes get SIGTERM (exit 143), those ignoring it SIGKILL
    after the grace period (137); then init exits and the container stops."""
    with busybox_sprite("t2", init=init_bin) as s:
        async def go() -> tuple[int, int, float]:
            polite = await _spawn(s.handle, ["sleep", "100"])
            stubborn = await _spawn(s.handle, ["sh", "-c", "trap '' TERM; sleep 100; :"])
            await asyncio.sleep(0.2)
            start = time.monotonic()
            assert s.runc("kill", s.container_id, "TERM").returncode == 0
            a = await asyncio.wait_for(polite.wait(), 10)
            b = await asyncio.wait_for(stubborn.wait(), 10)
            return a, b, time.monotonic() - start

        polite, stubborn, took = asyncio.run(go())
        assert polite == 143
        assert stubborn == 137
        assert 1.5 < took < 5
        deadline = time.monotonic() + 5
        while b'"status": "stopped"' not in s.runc("state", s.container_id).stdout:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_killed_sprite_reports_137(init_bin: Path) -> None:
    """When the whole sprite dies (SIGKILL to init), waiters learn exit 137."""
    with busybox_sprite("t3", init=init_bin) as s:
        async def go() -> int:
            proc = await _spawn(s.handle, ["sleep", "100"])
            assert s.runc("kill", s.container_id, "KILL").returncode == 0
            code = await asyncio.wait_for(proc.wait(), 10)
            proc.close()
            return code

        assert asyncio.run(go()) == 137
