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


def _assert_still_serving(handle: SpriteHandle) -> None:
    """The agent survived what the test threw at it: it still runs a command."""
    out, _, code = asyncio.run(_run(handle, ["echo", "still alive"]))
    assert (out, code) == (b"still alive\n", 0)


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
    _assert_still_serving(handle)


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
    _assert_still_serving(handle)


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


# ---- orphans: processes that outlive their connection (the server) ----------------------

async def _read_until(reader: agent.FdReader, want: bytes, timeout: float = 10) -> bytes:
    out = b""
    async def go() -> None:
        nonlocal out
        while want not in out:
            chunk = await reader.read(65536)
            assert chunk, f"EOF before {want!r}: {out!r}"
            out += chunk
    await asyncio.wait_for(go(), timeout)
    return out


def test_orphan_keeps_its_output_and_is_adopted(handle: SpriteHandle) -> None:
    """A process whose connection closes runs on with its pipes intact (no EPIPE, no EOF on
    stdin); what it writes meanwhile is read after `adopt`, which also feeds its stdin, gives
    it EOF (stdin-close) and delivers its exit."""
    async def go() -> tuple[list[tuple[int, bool, int | None]], bytes, bytes, int]:
        proc = await _spawn(handle, ["sh", "-c",
                                     "echo one; sleep 0.3; echo two; echo err2 >&2; "
                                     "read x; echo got-$x; cat; exit 7"])
        await _read_until(proc.stdout, b"one\n")
        pid = proc.pid
        proc.close()  # the server goes away
        await asyncio.sleep(0.8)
        listed = await agent.list_orphans(handle.agent_socket)
        adopted = await agent.adopt(handle.agent_socket, pid)
        assert adopted is not None and adopted.pid == pid and adopted.stdin_open
        await adopted.write(b"hi\nrest\n")
        adopted.close_stdin()
        out, err, code = await _collect(adopted)
        return listed, out, err, code

    listed, out, err, code = asyncio.run(go())
    assert any(running and code is None for _, running, code in listed)
    assert (out, err, code) == (b"two\ngot-hi\nrest\n", b"err2\n", 7)


def test_adopt_of_an_exited_orphan_gives_its_output_then_its_exit(handle: SpriteHandle) -> None:
    """An orphan that exits keeps its exit code and its unread output until adopted; after
    that its record is gone."""
    async def go() -> tuple[tuple[int, bool, int | None], bytes, int, object]:
        proc = await _spawn(handle, ["sh", "-c", "sleep 0.2; echo bye; exit 3"])
        pid = proc.pid
        proc.close()
        await asyncio.sleep(0.8)
        entry = next(e for e in await agent.list_orphans(handle.agent_socket) if e[0] == pid)
        adopted = await agent.adopt(handle.agent_socket, pid)
        assert adopted is not None
        out, _, code = await _collect(adopted)
        again = await agent.adopt(handle.agent_socket, pid)
        return entry, out, code, again

    entry, out, code, again = asyncio.run(go())
    assert entry[1:] == (False, 3)
    assert (out, code, again) == (b"bye\n", 3, None)


def test_tty_orphan_survives_and_is_adopted(handle: SpriteHandle) -> None:
    """The agent keeps its PTY master: a detached TTY process gets no SIGHUP, and the
    adopting side types into it and reads its answer."""
    async def go() -> tuple[bytes, int]:
        proc = await _spawn(handle, ["sh", "-c", "read x; echo got-$x; exit 4"], tty=True)
        pid = proc.pid
        proc.close()
        await asyncio.sleep(0.3)
        adopted = await agent.adopt(handle.agent_socket, pid)
        assert adopted is not None and adopted.tty
        await adopted.write(b"hey\n")
        out, _, code = await _collect(adopted)
        return out, code

    out, code = asyncio.run(go())
    assert b"got-hey" in out and code == 4


def test_no_stdin_orphan_adopts_without_stdin(handle: SpriteHandle) -> None:
    """stdin=False (and a stdin already closed) comes back as no stdin."""
    async def go() -> tuple[bool, bool, bytes, int]:
        a = await _spawn(handle, ["sh", "-c", "sleep 0.3; echo a"], stdin=False)
        b = await _spawn(handle, ["sh", "-c", "cat; sleep 0.3; echo b"])
        b.close_stdin()
        await asyncio.sleep(0.1)
        a.close()
        b.close()
        pa = await agent.adopt(handle.agent_socket, a.pid)
        pb = await agent.adopt(handle.agent_socket, b.pid)
        assert pa is not None and pb is not None
        (oa, _, ca), (ob, _, cb) = await asyncio.gather(_collect(pa), _collect(pb))
        return pa.stdin_open, pb.stdin_open, oa + ob, ca + cb

    assert asyncio.run(go()) == (False, False, b"a\nb\n", 0)


def test_bad_adopt_requests_are_refused(handle: SpriteHandle) -> None:
    """Malformed adopts, unknown and attached pids get an error reply and no fds; the agent
    keeps serving, and the attached process is untouched."""
    async def attached() -> AgentProcess:
        return await _spawn(handle, ["sh", "-c", "read x; echo $x"])

    loop = asyncio.new_event_loop()
    try:
        proc = loop.run_until_complete(attached())
        for payload in [b"adopt", b"adopt\0", b"adopt\0pid=\0", b"adopt\0pid=abc\0",
                        b"adopt\0pid=0\0", b"adopt\0pid=-5\0", b"adopt\0pid=1\0extra\0",
                        b"adopt\0pid=99999999999999\0", b"adopt\0pid=1", b"adopt\0xid=1\0",
                        b"adopt\0pid=4000000\0", b"sessions", b"sessions\0x\0"]:
            reply = _raw(handle, payload)
            assert reply.startswith(b"error "), (payload, reply)
        assert _raw(handle, b"adopt\0pid=%d\0" % proc.pid) == b"error process is attached"
        assert _raw(handle, b"adopt\0pid=4000000\0") == b"error no such process"
        loop.run_until_complete(proc.write(b"fine\n"))
        out, _, code = loop.run_until_complete(_collect(proc))
        assert (out, code) == (b"fine\n", 0)
    finally:
        loop.close()
    assert _raw(handle, b"sessions\0").endswith(b"\n")
    import random

    rng = random.Random(99)
    r, w = os.pipe()
    try:
        for _ in range(200):
            tail = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 30)))
            payload = rng.choice([b"adopt\0", b"adopt\0pid=", b"sessions\0"]) + tail
            _raw(handle, payload, fds=rng.choice([None, [r], [r, w, w, r, w, r]]))
    finally:
        os.close(r)
        os.close(w)
    _assert_still_serving(handle)


def test_a_close_after_the_exit_keeps_nothing(handle: SpriteHandle) -> None:
    """The normal end (exit read, then the connection closed) leaves no orphan record."""
    async def go() -> tuple[int, list[int]]:
        proc = await _spawn(handle, ["sh", "-c", "echo x"])
        await _collect(proc)
        return proc.pid, [pid for pid, _, _ in await agent.list_orphans(handle.agent_socket)]

    pid, pids = asyncio.run(go())
    assert pid not in pids


def test_exited_orphans_are_bounded(handle: SpriteHandle) -> None:
    """At most 64 exited orphans are kept (the one that exited first goes); a normal close
    after the exit keeps nothing."""
    async def go() -> list[tuple[int, bool, int | None]]:
        await _run(handle, ["true"])
        procs = await asyncio.gather(*(_spawn(handle, ["sh", "-c", f"sleep 0.3; exit {i}"])
                                       for i in range(80)))
        for p in procs:
            p.close()
        await asyncio.sleep(1.5)
        return await agent.list_orphans(handle.agent_socket)

    listed = asyncio.run(go())
    assert len([e for e in listed if not e[1]]) == 64
    # The agent keeps working, and its orphans can still be adopted one by one.
    out, _, code = asyncio.run(_run(handle, ["echo", "ok"]))
    assert (out, code) == (b"ok\n", 0)
