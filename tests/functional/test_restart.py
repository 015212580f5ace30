"""Durability: sprites, files and checkpoints survive a server stop, a SIGKILL, and a
SIGKILL in the middle of a checkpoint or a restore; nothing half-made is left behind."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sprites import SpritesClient

from tests.framework.leaks import leaks
from tests.framework.server import WispServer


@pytest.fixture
def own_server(leak_check: Path, request) -> Iterator[WispServer]:  # type: ignore[no-untyped-def]
    import re

    marker = request.node.get_closest_marker("server_env")
    srv = WispServer(leak_check / re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:],
                     extra_env=marker.args[0] if marker else None)
    srv.start()
    yield srv
    srv.stop()


def sh(sprite, script: str) -> bytes:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output()


def _client(srv: WispServer) -> SpritesClient:
    return SpritesClient(srv.token, base_url=srv.url)


def _volume_leftovers(srv: WispServer) -> list[str]:
    vol = srv.data_dir / "mnt" / "sprites"
    return sorted(str(p) for p in vol.rglob("*") if p.name.endswith((".in-progress", ".restoring")))


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_sprites_survive_restart(own_server: WispServer, how: str) -> None:
    """After the server stops (gracefully or by SIGKILL) and starts again, every sprite is
    listed, its files are intact, its checkpoints are there, and exec works."""
    c = _client(own_server)
    a, b = c.create_sprite("keep-a"), c.create_sprite("keep-b")
    sh(a, "echo alpha > /home/sprite/f; head -c 5000000 /dev/urandom > /home/sprite/r; "
          "md5sum /home/sprite/r > /home/sprite/r.md5")
    sh(b, "echo beta > /home/sprite/f")
    list(a.create_checkpoint("before restart"))
    if how == "sigkill":
        own_server.kill()
        own_server.start()
    else:
        own_server.restart()
    c = _client(own_server)
    assert {s.name for s in c.list_sprites().sprites} >= {"keep-a", "keep-b"}
    a, b = c.sprite("keep-a"), c.sprite("keep-b")
    assert sh(a, "cat /home/sprite/f") == b"alpha\n"
    assert b"OK" in sh(a, "cd /home/sprite && md5sum -c r.md5")
    assert sh(b, "cat /home/sprite/f") == b"beta\n"
    assert [cp.id for cp in a.list_checkpoints()] == ["v1", "v0"]
    list(a.restore_checkpoint("v1"))
    assert sh(a, "cat /home/sprite/f") == b"alpha\n"


def _kill_during(srv: WispServer, method: str, path: str, after: float,
                 **kw: object) -> None:
    """Send a request from another thread and SIGKILL the server `after` seconds later."""
    import threading

    def send() -> None:
        try:
            httpx.request(method, srv.url + path, headers=srv.headers, timeout=30,
                          **kw)  # type: ignore[arg-type]
        except httpx.HTTPError:
            pass

    t = threading.Thread(target=send)
    t.start()
    time.sleep(after)
    srv.kill()
    t.join()


def _kill_mid_stream(srv: WispServer, path: str, after_lines: int = 1) -> list[str]:
    """POST `path`, read `after_lines` NDJSON lines, then SIGKILL the server."""
    lines: list[str] = []
    with httpx.stream("POST", srv.url + path, headers=srv.headers, json={},
                      timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) >= after_lines:
                srv.kill()
                break
    return lines


def test_sigkill_during_checkpoint(own_server: WispServer) -> None:
    """A checkpoint interrupted by SIGKILL is either complete and usable or absent; there
    are no partial files, and the sprite's data and exec are fine after the restart."""
    c = _client(own_server)
    s = c.create_sprite("cpkill")
    sh(s, "echo stable > /home/sprite/f; head -c 60000000 /dev/urandom > /home/sprite/big")
    _kill_mid_stream(own_server, "/v1/sprites/cpkill/checkpoint")
    own_server.start()
    c = _client(own_server)
    s = c.sprite("cpkill")
    ids = [cp.id for cp in s.list_checkpoints()]
    assert ids in (["v0"], ["v1", "v0"])
    assert _volume_leftovers(own_server) == []
    assert sh(s, "cat /home/sprite/f") == b"stable\n"
    if "v1" in ids:
        sh(s, "echo changed > /home/sprite/f")
        list(s.restore_checkpoint("v1"))
        assert sh(s, "cat /home/sprite/f") == b"stable\n"
    assert list(s.create_checkpoint())[-1].type == "complete"


def test_sigkill_during_restore(own_server: WispServer) -> None:
    """A restore interrupted by SIGKILL leaves the old disk or the restored one, never a mix
    or nothing; the checkpoint itself is not lost."""
    c = _client(own_server)
    s = c.create_sprite("rskill")
    sh(s, "echo old > /home/sprite/f")
    list(s.create_checkpoint())
    sh(s, "echo new > /home/sprite/f; head -c 30000000 /dev/urandom > /home/sprite/big")
    _kill_mid_stream(own_server, "/v1/sprites/rskill/checkpoints/v1/restore", after_lines=2)
    own_server.start()
    c = _client(own_server)
    s = c.sprite("rskill")
    assert sh(s, "cat /home/sprite/f") in (b"old\n", b"new\n")
    assert _volume_leftovers(own_server) == []
    assert [cp.id for cp in s.list_checkpoints()] == ["v1", "v0"]
    list(s.restore_checkpoint("v1"))
    assert sh(s, "cat /home/sprite/f") == b"old\n"


@pytest.mark.server_env({"WISP_STOP_GRACE": "3"})
def test_server_stop_gives_processes_sigterm_first(own_server: WispServer) -> None:
    """A server stop is a shutdown, not a power cut: every process but init gets SIGTERM
    and the grace period to finish (a trap writes its file), and one that ignores SIGTERM
    is killed once the grace period is over."""
    s = _client(own_server).create_sprite("grace")
    sh(s, "(trap 'echo bye > /home/sprite/bye; sync; exit 0' TERM; "
          "while :; do sleep 0.05; done) >/dev/null 2>&1 &")
    sh(s, "(trap '' TERM; while :; do sleep 0.05; done) >/dev/null 2>&1 &")
    started = time.monotonic()
    own_server.stop()
    assert time.monotonic() - started >= 3, "the server did not wait for the grace period"
    own_server.start()
    s = _client(own_server).sprite("grace")
    assert sh(s, "cat /home/sprite/bye") == b"bye\n"
    assert b"while" not in sh(s, "ps -o args")  # both loops ended with the old boot


@pytest.mark.server_env({"WISP_WARM_POOL": "0"})  # so that every disk on the volume is counted
def test_sigkill_during_create_leaves_nothing(own_server: WispServer) -> None:
    """A create cut short by SIGKILL leaves either a whole sprite or none at all."""
    _kill_during(own_server, "POST", "/v1/sprites", after=0.03, json={"name": "halfmade"})
    own_server.start()
    r = own_server.api("GET", "/v1/sprites/halfmade")
    if r.status_code == 200:
        assert _client(own_server).sprite("halfmade").command("echo", "ok").output() == b"ok\n"
        assert own_server.api("DELETE", "/v1/sprites/halfmade").status_code == 204
    else:
        assert r.status_code == 404
    vol = own_server.data_dir / "mnt" / "sprites"
    left = list(vol.iterdir()) if vol.exists() else []
    assert left == []


def _juicefs_mounts(server: WispServer) -> list[int]:
    return [int(p.split(":")[0]) for p in leaks(server.data_dir)["processes"]
            if "juicefs" in p and " mount " in p]


def test_storage_crash_gives_503_then_recovers(own_server: WispServer) -> None:
    """If the JuiceFS process dies, the server stops its sprites, answers 503 while the
    volume is down, remounts it, and the sprite's files are intact afterwards."""
    import os
    import signal

    c = _client(own_server)
    s = c.create_sprite("jfs")
    sh(s, "echo durable > /home/sprite/f; sync")
    list(s.create_checkpoint())
    jfs = _juicefs_mounts(own_server)
    assert len(jfs) == 1, f"juicefs should serve in one process (no self-restarting child): {jfs}"
    old_pid = jfs[0]

    # while the server notices, stops the sprite and remounts, file reads hammered from
    # four threads are served (200) or refused with 503: never a 500 EIO naming the
    # host's root path of the sprite
    import threading

    seen: list[tuple[int, str]] = []
    stop = time.monotonic() + 3

    def hammer() -> None:
        while time.monotonic() < stop:
            r = own_server.api("GET", "/v1/sprites/jfs/fs/read",
                               params={"path": "/home/sprite/f", "workingDir": "/"})
            seen.append((r.status_code, r.text))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join()
    assert seen and {status for status, _ in seen} <= {200, 503}, [
        x for x in seen if x[0] not in (200, 503)][:3]
    assert not [text for _, text in seen if str(own_server.data_dir) in text]

    # until the server has mounted again, a checkpoint is refused with 503, never a 500
    deadline = time.monotonic() + 60
    while True:
        assert time.monotonic() < deadline, "storage did not come back"
        r = own_server.api("POST", "/v1/sprites/jfs/checkpoint", json={})
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"] == "storage_unavailable"
        else:
            last = json.loads(r.text.strip().splitlines()[-1])
            if last["type"] == "complete":
                break
            # the stream had begun when the mount died
            assert last.get("code") == "storage_unavailable", r.text
        time.sleep(0.1)
    new = _juicefs_mounts(own_server)
    assert len(new) == 1 and new[0] != old_pid, new
    assert sh(c.sprite("jfs"), "cat /home/sprite/f") == b"durable\n"


def test_sigkill_during_delete_finishes_it(own_server: WispServer) -> None:
    """A delete cut short by SIGKILL is finished at the next start: the sprite is gone with
    its disk and checkpoints, and nothing of it is left mounted."""

    c = _client(own_server)
    s = c.create_sprite("delkill")
    sh(s, "head -c 20000000 /dev/urandom > /home/sprite/big")
    list(s.create_checkpoint())
    sprite_id = own_server.api("GET", "/v1/sprites/delkill").json()["id"]

    _kill_during(own_server, "DELETE", "/v1/sprites/delkill", after=0.01)
    own_server.start()
    r = own_server.api("GET", "/v1/sprites/delkill")
    if r.status_code == 200:  # the kill landed before the delete began: do it now
        assert own_server.api("DELETE", "/v1/sprites/delkill").status_code == 204
    assert own_server.api("GET", "/v1/sprites/delkill").status_code == 404
    assert not (own_server.data_dir / "mnt" / "sprites" / sprite_id).exists()
    assert [m for m in leaks(own_server.data_dir)["mounts"] if sprite_id in m] == []
