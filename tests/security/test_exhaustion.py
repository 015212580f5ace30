"""A sprite that exhausts itself (a fork bomb, a stopped init agent) can always be reached:
exec still starts a process in it, every failure is a proper reply, and
`POST /v1/sprites/NAME/restart` ends every process while keeping the disk."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets.sync.client as ws_client
from sprites import SpritesClient
from websockets.exceptions import InvalidStatus

from tests.framework.server import WispServer

PIDS = 48
#: Forks until the pids limit refuses, then keeps retrying (spinning on a CPU): a shell
#: loop would exit at its first failed fork and free a slot.
BOMB_C = r"""
#include <unistd.h>
int main(void) {
    for (;;) {
        pid_t p = fork();
        if (p == 0) { for (;;) pause(); }
    }
}
"""


@pytest.fixture(scope="module")
def small(leak_check: Path) -> Iterator[WispServer]:
    """A server whose sprites may hold only PIDS processes, with a short stop grace."""
    cfg = leak_check / "small.toml"
    cfg.write_text(f"[sprites]\npids = {PIDS}\nstop_grace = 1.0\nwarm_pool = 0\n")
    srv = WispServer(leak_check / "small", config_file=cfg)
    srv.start()
    yield srv
    srv.stop()


def _pids(srv: WispServer, name: str, cgroup: str = "workload") -> int:
    sprite_id = srv.api("GET", f"/v1/sprites/{name}").json()["id"]
    base = Path("/sys/fs/cgroup/pids/wisp") / sprite_id
    if not base.exists():
        pytest.skip("needs cgroup v1 (the workload reserve is v1 only)")
    if (base / cgroup).exists():
        base = base / cgroup
    return int((base / "pids.current").read_text())


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A static fork bomb, built with the host's gcc."""
    import subprocess

    work = tmp_path_factory.mktemp("bomb")
    (work / "bomb.c").write_text(BOMB_C)
    subprocess.run(["gcc", "-static", "-O2", "-o", str(work / "bomb"), str(work / "bomb.c")],
                   check=True, timeout=120)
    return (work / "bomb").read_bytes()


def _bomb(srv: WispServer, sprite, binary: bytes) -> None:  # type: ignore[no-untyped-def]
    """Fill the sprite's pids limit with a fork bomb and wait until it is full."""
    r = srv.api("PUT", f"/v1/sprites/{sprite.name}/fs/write",
                params={"path": "/home/sprite/bomb", "mode": "0755"}, content=binary,
                headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    sprite.command("sh", "-c", "/home/sprite/bomb >/dev/null 2>&1 &").run()
    deadline = time.monotonic() + 30
    while _pids(srv, sprite.name) < PIDS:
        assert time.monotonic() < deadline, "the fork bomb did not fill the sprite"
        time.sleep(0.1)


def test_full_sprite_still_runs_kill(small: WispServer, bomb: bytes) -> None:
    """With its pids limit full, the sprite still runs new commands over WebSocket and HTTP
    exec (the agent forks in its reserve, the child joins the full workload cgroup), so
    `kill -9 -1` clears it; afterwards the sprite works as before."""
    c = SpritesClient(small.token, base_url=small.url)
    s = c.create_sprite("bomb-kill")
    s.command("sh", "-c", "echo kept > /home/sprite/f").run()
    _bomb(small, s, bomb)
    started = time.monotonic()
    assert s.command("echo", "alive").output() == b"alive\n"
    r = small.api("POST", "/v1/sprites/bomb-kill/exec",
                  params=[("cmd", "echo"), ("cmd", "http")], timeout=30)
    assert r.status_code == 200 and b"\x01http\n" in r.content, r.content
    s.command("sh", "-c", "kill -9 -1").run()
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 10
    while _pids(small, "bomb-kill") > 3:  # the exec, its zygote, and the shell
        assert time.monotonic() < deadline, "kill -9 -1 did not clear the sprite"
        time.sleep(0.1)
    assert s.command("cat", "/home/sprite/f").output() == b"kept\n"
    small.api("DELETE", "/v1/sprites/bomb-kill")


def test_restart_ends_every_process_and_keeps_the_disk(small: WispServer, bomb: bytes) -> None:
    """`POST /v1/sprites/NAME/restart` on a fork-bombed sprite answers 200 with the
    contract's JSON, ends every process (the workload cgroup is empty again), keeps the
    disk, and the sprite runs commands after it."""
    c = SpritesClient(small.token, base_url=small.url)
    s = c.create_sprite("bomb-restart")
    s.command("sh", "-c", "echo kept > /home/sprite/f").run()
    sprite_id = small.api("GET", "/v1/sprites/bomb-restart").json()["id"]
    _bomb(small, s, bomb)
    r = small.api("POST", "/v1/sprites/bomb-restart/restart", timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["sprite_name"] == "bomb-restart" and body["machine_id"] == sprite_id
    assert isinstance(body["message"], str)
    assert _pids(small, "bomb-restart") <= 1  # at most wisp-init's zygote, nothing of before
    assert s.command("cat", "/home/sprite/f").output() == b"kept\n"
    assert small.api("POST", "/v1/sprites/no-such/restart").status_code == 404
    small.api("DELETE", "/v1/sprites/bomb-restart")


def test_unresponsive_agent_gets_503_in_time(small: WispServer) -> None:
    """When the init agent does not answer (stopped from the host), HTTP exec answers 503
    sprite_unresponsive and WebSocket exec is refused with a 503 and the same JSON body,
    both well before a client's 10 s handshake timeout; restart brings the sprite back."""
    c = SpritesClient(small.token, base_url=small.url)
    s = c.create_sprite("stuck")
    s.command("true").run()
    sprite_id = small.api("GET", "/v1/sprites/stuck").json()["id"]
    procs = Path("/sys/fs/cgroup/pids/wisp") / sprite_id / "cgroup.procs"
    if not procs.exists():
        pytest.skip("needs cgroup v1")
    agent = int(procs.read_text().split()[0])
    os.kill(agent, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        r = small.api("POST", "/v1/sprites/stuck/exec", params=[("cmd", "true")], timeout=30)
        assert r.status_code == 503 and r.json()["error"] == "sprite_unresponsive", r.text
        assert "restart" in r.json()["message"]
        assert time.monotonic() - t0 < 9
        t0 = time.monotonic()
        url = small.url.replace("http", "ws") + "/v1/sprites/stuck/exec?cmd=true"
        with pytest.raises(InvalidStatus) as refused:
            ws_client.connect(url, additional_headers=small.headers, open_timeout=10).close()
        assert refused.value.response.status_code == 503
        assert b"sprite_unresponsive" in refused.value.response.body
        assert time.monotonic() - t0 < 9
    finally:
        try:
            os.kill(agent, signal.SIGCONT)
        except ProcessLookupError:
            pass
    r = small.api("POST", "/v1/sprites/stuck/restart", timeout=60)
    assert r.status_code == 200, r.text
    assert s.command("echo", "back").output() == b"back\n"
    small.api("DELETE", "/v1/sprites/stuck")
