"""A server restart kills nothing (docs/lifecycle.md, "Server restarts"): after a SIGTERM or
a SIGKILL of `wisp serve`, a sprite's processes run on, its detached exec session keeps
its output, and the next server adopts all of it; `stop_sprites` keeps the old full stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from sprites import SpritesClient

from tests.framework.internet import Internet, lookup, sh
from tests.framework.internet import curl_ip as fetch
from tests.framework.server import WispServer
from tests.functional.test_restart import _kill_mid_stream, _volume_leftovers

PORT = Internet.PORT


@pytest.fixture
def keeping(leak_check: Path, request: pytest.FixtureRequest) -> Iterator[WispServer]:
    """A server with the product's default: sprites outlive it. At the end one more start
    with `stop_sprites` adopts what is left and stops it all, for the leak check."""
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[-40:]
    srv = WispServer(leak_check / name, stop_sprites=False)
    srv.start()
    yield srv
    srv.stop()
    srv.stop_sprites = True
    srv.start()
    srv.stop()


def _client(srv: WispServer) -> SpritesClient:
    return SpritesClient(srv.token, base_url=srv.url)


def _sh(sprite, script: str) -> bytes:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output()


def _host_pids(marker: str) -> set[int]:
    """Host pids of processes whose command line contains `marker`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if marker.encode() in cmd:
                found.add(int(entry.name))
    return found


async def _start_detached(srv: WispServer, name: str, script: str) -> str:
    """Start `sh -c script` over the exec WebSocket and leave it running; its session id."""
    from websockets.asyncio.client import connect

    query = urlencode([("cmd", "sh"), ("cmd", "-c"), ("cmd", script), ("stdin", "false")])
    url = srv.url.replace("http://", "ws://") + f"/v1/sprites/{name}/exec?{query}"
    async with connect(url, additional_headers=srv.headers, close_timeout=0) as ws:
        info = json.loads(await ws.recv())
    return str(info["session_id"])


def _session_ids(srv: WispServer, name: str) -> set[str]:
    r = httpx.get(f"{srv.url}/v1/sprites/{name}/exec", headers=srv.headers, timeout=30)
    assert r.status_code == 200, r.text
    return {s["id"] for s in r.json()["sessions"] if s["is_active"]}


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_processes_and_sessions_survive_the_server(keeping: WispServer, how: str) -> None:
    """A background `sleep` and a detached session printing a counter run on while the
    server is down, keep their pids, and after the next start the session is listed and
    an attach replays what it printed before, during and after the restart."""
    c = _client(keeping)
    name = f"adopt-{how}"
    sp = c.create_sprite(name)
    _sh(sp, "setsid sleep 31337 </dev/null >/dev/null 2>&1 &")
    inside = _sh(sp, "pidof sleep").split()
    sid = asyncio.run(_start_detached(
        keeping, name, "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); "
                       "sleep 0.05; done; echo done"))
    host = _host_pids("sleep 31337")
    assert len(host) == 1 and len(inside) == 1
    time.sleep(0.5)  # some ticks before the restart, the rest during and after it
    if how == "sigkill":
        keeping.kill()
    else:
        keeping.stop()
    # Server gone: the processes run on.
    time.sleep(1.0)
    assert _host_pids("sleep 31337") == host
    keeping.start()
    c = _client(keeping)
    sp = c.sprite(name)
    assert c.get_sprite(name).status == "running"
    assert b"31337" in _sh(sp, f"cat /proc/{inside[0].decode()}/cmdline")
    assert sid in _session_ids(keeping, name)
    out = sp.attach_session(sid, timeout=120).output().decode()
    ticks = [int(n) for n in re.findall(r"tick (\d+)", out)]
    assert out.endswith("done\n") and ticks[-1] == 599
    # The replay is the session's newest output, contiguous: nothing lost across the restart
    assert ticks == list(range(ticks[0], 600))
    assert ticks[0] == 0  # 600 short lines fit the ring: all of it, from the very first
    assert _host_pids("sleep 31337") == host


def test_api_tasks_survive_the_server(keeping: WispServer) -> None:
    """A keep-awake task set through the API still holds the sprite after a SIGKILL and a
    start; one released before the restart does not come back."""
    c = _client(keeping)
    c.create_sprite("adopt-tasks")
    base = f"{keeping.url}/v1/sprites/adopt-tasks/tasks"
    for task in ("build", "gone"):
        r = httpx.put(f"{base}/{task}", json={"ttl": 600}, headers=keeping.headers, timeout=30)
        assert r.status_code == 200, r.text
    assert httpx.delete(f"{base}/gone", headers=keeping.headers, timeout=30).status_code == 204
    keeping.kill()
    keeping.start()
    r = httpx.get(base, headers=keeping.headers, timeout=30)
    assert r.status_code == 200, r.text
    assert [t["name"] for t in r.json()] == ["build"]


def test_stop_sprites_keeps_the_full_stop(keeping: WispServer) -> None:
    """With `stop_sprites` a start clears what the server before it left running, and a
    stop ends every process of every sprite, as before sprites outlived their server."""
    c = _client(keeping)
    sp = c.create_sprite("adopt-full-stop")
    _sh(sp, "setsid sleep 31338 </dev/null >/dev/null 2>&1 &")
    assert len(_host_pids("sleep 31338")) == 1
    keeping.stop()
    assert len(_host_pids("sleep 31338")) == 1
    keeping.stop_sprites = True
    keeping.start()
    assert _host_pids("sleep 31338") == set()
    c = _client(keeping)
    assert c.get_sprite("adopt-full-stop").status == "cold"
    _sh(c.sprite("adopt-full-stop"), "setsid sleep 31338 </dev/null >/dev/null 2>&1 &")
    assert len(_host_pids("sleep 31338")) == 1
    keeping.stop()
    assert _host_pids("sleep 31338") == set()
    keeping.stop_sprites = False
    keeping.start()


def test_a_sprite_whose_processes_died_starts_again(keeping: WispServer) -> None:
    """A sprite whose init died while the server was down is not adopted: it is cold, and
    its next exec starts it again with its disk intact."""
    c = _client(keeping)
    sp = c.create_sprite("adopt-dead")
    _sh(sp, "echo kept > /home/sprite/f")
    keeping.kill()
    run = keeping.data_dir / "run"
    pids = [int(p.read_text()) for p in run.glob("sprites/sprite-*/bundle/init.pid")]
    assert pids
    for pid in pids:
        os.kill(pid, 9)
    keeping.start()
    c = _client(keeping)
    assert c.get_sprite("adopt-dead").status == "cold"
    assert _sh(c.sprite("adopt-dead"), "cat /home/sprite/f") == b"kept\n"


@pytest.mark.debian
def test_egress_policy_holds_across_a_restart(leak_check: Path, internet: Internet) -> None:
    """The firewall is adopted, not reloaded: a sprite's egress policy is enforced at every
    moment (a SIGKILL and a start never open its egress), what it looked up before the
    restart stays reachable, a live connection goes on, and lookups work after it."""
    from sprites import NetworkPolicy, PolicyRule

    srv = WispServer(leak_check / "adopt-policy", image="debian", stop_sprites=False,
                     extra_env={"WISP_UPLINK": internet.uplink,
                                "WISP_DNS_UPSTREAM": internet.GATEWAY})
    srv.start()
    try:
        s = _client(srv).create_sprite("adopt-pol")
        s.update_network_policy(NetworkPolicy(rules=[PolicyRule(domain="web.test",
                                                                action="allow")]))
        assert lookup(s, "web.test") == internet.PUBLIC
        sh(s, f"setsid sh -c 'curl -sSN http://web.test:{PORT}/drip > /tmp/drip.out 2>&1' "
              "</dev/null >/dev/null 2>&1 &")
        assert fetch(s, internet.OTHER) == "FAILED\n"
        deadline = time.monotonic() + 10  # the connection is up before the server dies
        while "drip 3" not in sh(s, "cat /tmp/drip.out"):
            assert time.monotonic() < deadline, sh(s, "cat /tmp/drip.out")
            time.sleep(0.1)
        srv.kill()
        srv.start()
        s = _client(srv).sprite("adopt-pol")
        assert _client(srv).get_sprite("adopt-pol").status == "running"
        before = sh(s, "grep -c drip /tmp/drip.out").strip()
        assert fetch(s, internet.PUBLIC).startswith("hello")  # its allow set was kept
        assert fetch(s, internet.OTHER) == "FAILED\n"  # and its policy enforced
        assert lookup(s, "other.test") == "REFUSED"
        assert lookup(s, "web.test") == internet.PUBLIC  # the resolver is back
        time.sleep(0.5)
        after = sh(s, "cat /tmp/drip.out")
        assert "curl:" not in after and after.count("drip") > int(before), after
    finally:
        srv.stop()
        srv.stop_sprites = True
        srv.start()
        srv.stop()


@pytest.mark.parametrize("op", ["checkpoint", "restore"])
def test_sigkill_inside_a_checkpoint_or_restore(keeping: WispServer, op: str) -> None:
    """A server killed while a checkpoint has the sprite frozen (processes and ext4), or
    in the middle of a restore's disk swap: the next server adopts or restarts the sprite,
    never leaves it frozen, and its data is the old or the new, whole."""
    c = _client(keeping)
    s = c.create_sprite(f"adopt-{op}")
    _sh(s, "echo old > /home/sprite/f")
    list(s.create_checkpoint())
    _sh(s, "echo new > /home/sprite/f; head -c 60000000 /dev/urandom > /home/sprite/big")
    path = (f"/v1/sprites/adopt-{op}/checkpoint" if op == "checkpoint"
            else f"/v1/sprites/adopt-{op}/checkpoints/v1/restore")
    _kill_mid_stream(keeping, path, after_lines=1 if op == "checkpoint" else 2)
    keeping.start()
    s = _client(keeping).sprite(f"adopt-{op}")
    # writes go through: neither the processes nor the disk stayed frozen
    assert s.command("sh", "-c", "echo w > /home/sprite/w; cat /home/sprite/w",
                     timeout=30).output() == b"w\n"
    assert _sh(s, "cat /home/sprite/f") in ((b"new\n",) if op == "checkpoint"
                                             else (b"old\n", b"new\n"))
    assert _volume_leftovers(keeping) == []
    ids = [cp.id for cp in s.list_checkpoints()]
    assert ids in (["v1", "v0"], ["v2", "v1", "v0"])
    list(s.restore_checkpoint("v1"))
    assert _sh(s, "cat /home/sprite/f") == b"old\n"


def test_a_server_killed_inside_a_clone_leaves_nothing_frozen(keeping: WispServer) -> None:
    """The state a SIGKILL inside a checkpoint's clone window leaves, made exactly: the
    sprite's processes frozen by the cgroup freezer and its ext4 frozen by fsfreeze. The
    next server thaws both (a write inside would hang forever otherwise)."""
    import subprocess

    c = _client(keeping)
    s = c.create_sprite("adopt-frozen")
    _sh(s, "setsid sleep 31339 </dev/null >/dev/null 2>&1 &")
    sprite_id = c.get_sprite("adopt-frozen").id
    keeping.kill()
    disk_dir = keeping.data_dir / "run" / "sprites" / sprite_id / "disk"
    freezer = Path("/sys/fs/cgroup/freezer/wisp") / sprite_id / "freezer.state"
    subprocess.run(["fsfreeze", "-f", str(disk_dir)], check=True, timeout=30)
    freezer.write_text("FROZEN")
    try:
        keeping.start()
        s = _client(keeping).sprite("adopt-frozen")
        assert s.command("sh", "-c", "echo w > /home/sprite/w; cat /home/sprite/w",
                         timeout=30).output() == b"w\n"
        assert freezer.read_text().strip() == "THAWED"
        assert len(_host_pids("sleep 31339")) == 1
    finally:
        subprocess.run(["fsfreeze", "-u", str(disk_dir)], capture_output=True, timeout=30)
        freezer.write_text("THAWED")
