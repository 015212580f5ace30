"""The service supervisor inside wisp-init (`svc-*` requests) and its client
(`wisp/runtime/supervisor.py`), against a real runc container with wisp-init as PID 1."""

from __future__ import annotations

import asyncio
import random
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.framework.container import BusyboxSprite, build_init, busybox_sprite
from tests.framework.poll import wait_for
from wisp.runtime import agent, supervisor
from wisp.runtime.base import SpriteHandle

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/sprite"}
LOGDIR = "/tmp/svclogs"


@pytest.fixture(scope="module")
def sprite() -> Iterator[BusyboxSprite]:
    with tempfile.TemporaryDirectory(prefix="wisp-init-") as d:
        with busybox_sprite(init=build_init(Path(d) / "wisp-init")) as s:
            yield s


@pytest.fixture
def handle(sprite: BusyboxSprite) -> SpriteHandle:
    return sprite.handle


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def define(h: SpriteHandle, name: str, script: str, *, start: bool = True,
           log_max: int = 1 << 20, uid: int = 1000) -> None:
    run(_define(h, name, script, start, log_max, uid))


async def _define(h: SpriteHandle, name: str, script: str, start: bool, log_max: int,
                  uid: int) -> None:
    # the test container has no /.sprite: logs go where the sprite's root may write
    orig = supervisor.LOG_DIR
    supervisor.LOG_DIR = LOGDIR
    try:
        await supervisor.define(h.agent_socket, supervisor.define_request(
            name, ["sh", "-c", script], ENV, "/tmp", uid, uid, [uid], start=start,
            log_max=log_max))
    finally:
        supervisor.LOG_DIR = orig


def status(h: SpriteHandle, name: str) -> supervisor.ServiceStatus | None:
    return run(supervisor.status(h.agent_socket)).get(name)  # type: ignore[no-any-return]




def log(h: SpriteHandle, file: str) -> bytes:
    path = h.rootfs / LOGDIR.lstrip("/") / file
    return path.read_bytes() if path.exists() else b""


def forget(h: SpriteHandle, name: str) -> None:
    run(supervisor.delete(h.agent_socket, name, 1.0))
    wait_for(lambda: status(h, name) is None)


def test_runs_restarts_with_backoff_and_logs(handle: SpriteHandle) -> None:
    """A dying service is restarted by the agent, restart_count counting, at once the first
    time and then with a delay that grows (250 ms, 500 ms); each run's output is in the
    logs."""
    define(handle, "crash", "echo run; echo err >&2; exit 7")
    stamps: list[float] = []
    seen = -1
    deadline = time.monotonic() + 10
    while len(stamps) < 5 and time.monotonic() < deadline:
        st = status(handle, "crash")
        assert st is not None
        if st.restart_count != seen:
            seen = st.restart_count
            stamps.append(time.monotonic())
        time.sleep(0.01)
    assert len(stamps) == 5, stamps
    st = status(handle, "crash")
    assert st is not None and st.last_exit == 7 and "exited with code 7" in st.error
    assert stamps[4] - stamps[3] > (stamps[3] - stamps[2]) * 1.3 > 0.3
    assert log(handle, "crash.log").count(b"run\n") >= 2
    assert b"err" in log(handle, "crash.stderr.log")
    assert b"err" not in log(handle, "crash.stdout.log")
    forget(handle, "crash")


def test_stop_start_signal(handle: SpriteHandle) -> None:
    """stop ends the group with SIGTERM and it stays down; start runs it again; a signal to
    a running service is a crash (restarted); stop escalates to SIGKILL after its timeout."""
    define(handle, "sleeper", "exec sleep 1000")
    st = wait_for(lambda: (s := status(handle, "sleeper")) and s.pid > 0 and s)
    run(supervisor.stop(handle.agent_socket, "sleeper", 5.0))
    st = wait_for(lambda: (s := status(handle, "sleeper")) and s.status == "stopped" and s)
    assert st.pid == 0 and st.last_exit == 128 + 15
    time.sleep(0.5)
    assert status(handle, "sleeper").status == "stopped"  # type: ignore[union-attr]
    with pytest.raises(supervisor.SupervisorError, match="not running"):
        run(supervisor.signal(handle.agent_socket, "sleeper", 15))
    run(supervisor.start(handle.agent_socket, "sleeper"))
    first = wait_for(lambda: (s := status(handle, "sleeper")) and s.pid > 0 and s)
    run(supervisor.signal(handle.agent_socket, "sleeper", 9))
    again = wait_for(lambda: (s := status(handle, "sleeper")) and s.pid not in (0, first.pid)
                     and s)
    assert again.restart_count == 1 and again.status == "running"
    define(handle, "stubborn", "trap '' TERM; while :; do sleep 0.05; done")
    wait_for(lambda: (s := status(handle, "stubborn")) and s.pid > 0)
    time.sleep(0.2)  # the trap is set
    t0 = time.monotonic()
    run(supervisor.stop(handle.agent_socket, "stubborn", 0.5))
    st = wait_for(lambda: (s := status(handle, "stubborn")) and s.status == "stopped" and s)
    assert st.last_exit == 128 + 9 and time.monotonic() - t0 >= 0.4
    forget(handle, "sleeper")
    forget(handle, "stubborn")


def test_define_replaces_a_running_service(handle: SpriteHandle) -> None:
    """A new definition with start=1 ends the old process and starts the new command; with
    start=0 it is only remembered."""
    define(handle, "web", "echo v1; exec sleep 1000")
    old = wait_for(lambda: (s := status(handle, "web")) and s.pid > 0 and s)
    define(handle, "web", "echo v2; exec sleep 1000")
    new = wait_for(lambda: (s := status(handle, "web")) and s.pid not in (0, old.pid) and s)
    assert new.restart_count == 0
    wait_for(lambda: b"v2" in log(handle, "web.log"))
    define(handle, "idle", "exec sleep 1000", start=False)
    assert status(handle, "idle").status == "stopped"  # type: ignore[union-attr]
    forget(handle, "web")
    forget(handle, "idle")


def test_quiesce_stops_restarts(handle: SpriteHandle) -> None:
    """After svc-quiesce (the sprite is stopping) a service that exits stays down."""
    define(handle, "q", "exec sleep 1000")
    st = wait_for(lambda: (s := status(handle, "q")) and s.pid > 0 and s)
    run(supervisor.quiesce(handle.agent_socket))
    assert run(_sh(handle, f"kill {st.pid}")) == b""
    wait_for(lambda: (s := status(handle, "q")) and s.status == "stopped")
    time.sleep(0.5)
    assert status(handle, "q").pid == 0  # type: ignore[union-attr]
    forget(handle, "q")


def test_logs_rotate_at_the_cap(handle: SpriteHandle) -> None:
    """Past logmax a file is renamed to FILE.1 and a new one starts: neither passes it."""
    define(handle, "big", "head -c 30000 /dev/zero | tr '\\0' x; exec sleep 1000",
           log_max=8192)
    wait_for(lambda: log(handle, "big.log.1"))
    time.sleep(0.3)
    for f in ("big.log", "big.log.1", "big.stdout.log", "big.stdout.log.1"):
        assert 0 < len(log(handle, f)) <= 8192, f
    forget(handle, "big")


def test_oversized_definition_is_refused(handle: SpriteHandle) -> None:
    """The client refuses a definition past MAX_DEFINITION; the agent refuses one sent
    anyway."""
    from wisp.errors import BadRequest

    big = "x" * supervisor.MAX_DEFINITION
    with pytest.raises(BadRequest):
        supervisor.define_request("big", ["sh", big], ENV, "/", 1000, 1000, [1000],
                                  start=False, log_max=1 << 20)
    payload = (b"svc-define\0name=big\0start=0\0logdir=/tmp/x\0logmax=65536\0spawn\0"
               b"uid=1000\0gid=1000\0arg=" + big.encode() + b"\0")
    assert _raw(handle, payload) == b"error definition too large"
    assert status(handle, "big") is None


def test_runs_as_the_user_in_the_workload(handle: SpriteHandle) -> None:
    """A service has the requested uid, cwd and environment, and no stdin."""
    define(handle, "who", "id -u; pwd; echo $HOME; cat; exec sleep 1000")
    wait_for(lambda: log(handle, "who.stdout.log").count(b"\n") >= 3)
    assert log(handle, "who.stdout.log").split() == [b"1000", b"/tmp", b"/home/sprite"]
    forget(handle, "who")


def _raw(handle: SpriteHandle, payload: bytes) -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.settimeout(5)
        s.connect(str(handle.agent_socket))
        s.sendmsg([payload])
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""
    finally:
        s.close()


def test_bad_and_fuzzed_requests_never_kill_the_agent(handle: SpriteHandle) -> None:
    """Malformed svc-* requests are refused with `error …`; hundreds of random ones leave
    the agent serving, with no service defined by them that should not be."""
    spawn = b"spawn\0arg=true\0uid=1000\0gid=1000\0"
    head = b"svc-define\0name=ok\0start=0\0logdir=/tmp/x\0logmax=65536\0"
    for bad in [b"svc-define\0", head.replace(b"name=ok", b"name=a/b") + spawn,
                head.replace(b"name=ok", b"name=.x") + spawn,
                head.replace(b"start=0", b"start=2") + spawn,
                head.replace(b"logdir=/tmp/x", b"logdir=rel") + spawn,
                head.replace(b"logmax=65536", b"logmax=1") + spawn,
                head, head + b"spawn\0arg=true\0", head + spawn.replace(b"spawn\0", b"spawn\0tty=1\0"),
                b"svc-start\0name=nope\0", b"svc-stop\0name=nope\0timeout=1\0",
                b"svc-signal\0name=nope\0sig=9\0", b"svc-bogus\0", b"svc-list"]:
        assert _raw(handle, bad).startswith(b"error "), bad
    rng = random.Random(7)
    keys = [b"name", b"start", b"logdir", b"logmax", b"timeout", b"sig", b"arg", b"uid",
            b"gid", b"x", b""]
    values = [b"", b"0", b"1", b"-1", b"fz", b"/tmp/fz", b"99999999999999999999", b"\xff"]
    verbs = [b"svc-define", b"svc-start", b"svc-stop", b"svc-delete", b"svc-signal",
             b"svc-list", b"svc-"]
    for _ in range(300):
        fields = [rng.choice(verbs)] + [rng.choice(keys) + b"=" + rng.choice(values)
                                        for _i in range(rng.randrange(0, 8))]
        if rng.random() < 0.3:
            fields.append(b"spawn")
        payload = b"\0".join(fields) + (b"\0" if rng.random() < 0.8 else b"")
        _raw(handle, payload)
    for name in list(run(supervisor.status(handle.agent_socket))):
        forget(handle, name)
    out = run(_echo(handle))
    assert out == b"still alive\n"


async def _echo(h: SpriteHandle) -> bytes:
    return await _sh(h, "echo still alive")


async def _sh(h: SpriteHandle, script: str) -> bytes:
    proc = await agent.spawn(h.agent_socket, ["sh", "-c", script], ENV, "/", 1000, 1000,
                             [1000], False)
    out = await proc.stdout.read(100)
    await proc.wait()
    proc.close()
    return out
