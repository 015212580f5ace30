"""Checkpoints through the SDK: create (NDJSON), list, get, restore, delete, quota, fork."""

from __future__ import annotations

import json

import pytest
from sprites import NotFoundError

from tests.framework.server import WispServer


def sh(sprite, script: str) -> bytes:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output()


def test_create_list_get(sprite) -> None:
    """A checkpoint streams info…complete, then is listed (newest first, after v0) and got."""
    sh(sprite, "echo one > /home/sprite/a")
    messages = list(sprite.create_checkpoint("first"))
    assert messages[-1].type == "complete" and "v1" in messages[-1].data
    assert all(m.type in ("info", "complete") for m in messages)
    ids = [c.id for c in sprite.list_checkpoints()]
    assert ids[:2] == ["v1", "v0"]
    cp = sprite.get_checkpoint("v1")
    assert cp.id == "v1" and cp.comment == "first" and cp.create_time is not None
    with pytest.raises(NotFoundError):
        sprite.get_checkpoint("v42")


def test_restore_rewinds_disk_and_ends_processes(sprite, server: WispServer) -> None:
    """Restore puts files back as they were at the checkpoint, removes later files, and ends
    every process of the sprite."""
    sh(sprite, "echo before > /home/sprite/a; mkdir -p /home/sprite/d; echo x > /home/sprite/d/x")
    list(sprite.create_checkpoint("base"))
    sh(sprite, "echo after > /home/sprite/a; echo new > /home/sprite/b; rm -r /home/sprite/d")
    sh(sprite, "(sleep 1000 &) ; true")
    assert b"sleep 1000" in sh(sprite, "ps")
    messages = list(sprite.restore_checkpoint("v1"))
    assert messages[-1].type == "complete" and "v1" in messages[-1].data
    assert sh(sprite, "cat /home/sprite/a") == b"before\n"
    assert sh(sprite, "cat /home/sprite/d/x") == b"x\n"
    assert sh(sprite, "test -e /home/sprite/b && echo yes || echo no") == b"no\n"
    assert b"sleep 1000" not in sh(sprite, "ps")


def test_restore_drops_unwritten_pages_and_keeps_network(sprite, server: WispServer) -> None:
    """A restore throws the old disk away unflushed: 30 MB written but not synced leave
    nothing behind (no loop device on the replaced image, no pages in the restored one),
    and the sprite keeps its network namespace across the restart."""
    import os
    import subprocess

    list(sprite.create_checkpoint())
    sprite_id = server.api("GET", f"/v1/sprites/{sprite.name}").json()["id"]
    uid = sprite_id.removeprefix("sprite-")[:24]
    netns = next(n for n in os.listdir("/run/netns") if n.startswith("wisp-") and n.endswith(uid))
    # what the host set up in the sprite's namespace (as egress rules will be) stays
    subprocess.run(["ip", "-n", netns, "addr", "add", "10.254.0.1/32", "dev", "lo"], check=True)
    sh(sprite, "head -c 30000000 /dev/urandom > /home/sprite/unsynced")
    list(sprite.restore_checkpoint("v1"))
    assert sh(sprite, "ls /home/sprite") == b""
    addrs = subprocess.run(["ip", "-n", netns, "addr", "show", "lo"], capture_output=True,
                           text=True, check=True).stdout
    assert "10.254.0.1/32" in addrs
    loops = [line for line in os.popen("losetup -a").read().splitlines() if sprite_id in line]
    assert len(loops) == 1 and "(deleted)" not in loops[0], loops
    sh(sprite, "echo again > /home/sprite/f")  # the fresh disk is writable
    list(sprite.restore_checkpoint("v1"))
    assert sh(sprite, "ls /home/sprite") == b""


def test_restore_v0_is_factory_reset(sprite) -> None:
    """v0 is the empty disk: restoring it drops everything written since create."""
    sh(sprite, "echo data > /home/sprite/file")
    list(sprite.restore_checkpoint("v0"))
    assert sh(sprite, "ls /home/sprite") == b""


def test_checkpoint_of_written_data_is_consistent(sprite) -> None:
    """Data written just before a checkpoint (still dirty in caches) is in the checkpoint."""
    sh(sprite, "head -c 20000000 /dev/urandom > /home/sprite/big; md5sum /home/sprite/big "
               "> /home/sprite/big.md5")
    list(sprite.create_checkpoint())
    sh(sprite, "rm /home/sprite/big")
    list(sprite.restore_checkpoint("v1"))
    assert b"OK" in sh(sprite, "cd /home/sprite && md5sum -c big.md5")


def test_delete_checkpoint(sprite, server: WispServer) -> None:
    """DELETE removes a checkpoint (extension endpoint); v0 and the current one stay."""
    list(sprite.create_checkpoint())
    list(sprite.create_checkpoint())
    base = f"/v1/sprites/{sprite.name}/checkpoints"
    assert server.api("DELETE", f"{base}/v1").status_code == 204
    assert server.api("GET", f"{base}/v1").status_code == 404
    assert server.api("DELETE", f"{base}/v1").status_code == 404
    assert server.api("DELETE", f"{base}/v0").status_code == 409
    assert server.api("DELETE", f"{base}/v2").status_code == 409  # the current one
    assert [c["id"] for c in server.api("GET", base).json()] == ["v2", "v0"]


def test_checkpoint_history(sprite, server: WispServer) -> None:
    """Each checkpoint names its parent and lineage; restore changes who the next parent is."""
    list(sprite.create_checkpoint())
    list(sprite.create_checkpoint())
    list(sprite.restore_checkpoint("v1"))
    list(sprite.create_checkpoint())
    cps = {c["id"]: c for c in server.api("GET", f"/v1/sprites/{sprite.name}/checkpoints").json()}
    assert cps["v2"]["source_id"] == "v1" and cps["v2"]["history"] == ["v1"]
    assert cps["v3"]["source_id"] == "v1"
    assert isinstance(cps["v0"]["history"], list)


def test_fork_from_live_state_and_checkpoint(sprite, server: WispServer, client,
                                             sprite_factory) -> None:
    """Fork makes an independent sprite from another's live disk or from any checkpoint."""
    sh(sprite, "echo v1-data > /home/sprite/f")
    list(sprite.create_checkpoint())
    sh(sprite, "echo live-data > /home/sprite/f")
    base = f"/v1/sprites/{sprite.name}/fork"
    live_name, cp_name = f"{sprite.name}-live", f"{sprite.name}-cp"
    try:
        r = server.api("POST", base, json={"name": live_name})
        assert r.status_code == 201 and r.json()["name"] == live_name
        r = server.api("POST", base, json={"name": cp_name, "checkpoint": "v1"})
        assert r.status_code == 201
        live, from_cp = client.sprite(live_name), client.sprite(cp_name)
        assert sh(live, "cat /home/sprite/f") == b"live-data\n"
        assert sh(from_cp, "cat /home/sprite/f") == b"v1-data\n"
        sh(live, "echo changed > /home/sprite/f")
        assert sh(sprite, "cat /home/sprite/f") == b"live-data\n"
        assert server.api("POST", base, json={"name": "bad-cp", "checkpoint": "v9"}).status_code == 404
        assert server.api("POST", base, json={"name": live_name}).status_code == 400
    finally:
        server.api("DELETE", f"/v1/sprites/{live_name}")
        server.api("DELETE", f"/v1/sprites/{cp_name}")


def test_checkpoint_quota(tmp_path, leak_check) -> None:
    """Past the configured byte budget a checkpoint is refused with a clear error (507), and
    deleting an old checkpoint makes room again."""
    from sprites import SpritesClient

    srv = WispServer(leak_check / "quota", extra_env={"WISP_CHECKPOINT_MAX_BYTES": str(40 << 20)})
    srv.start()
    try:
        c = SpritesClient(srv.token, base_url=srv.url)
        s = c.create_sprite("quota")
        sh(s, "head -c 25000000 /dev/urandom > /home/sprite/a")
        assert list(s.create_checkpoint())[-1].type == "complete"
        r = srv.api("POST", "/v1/sprites/quota/checkpoint", json={})
        assert r.status_code == 507, r.text
        assert r.json()["error"] == "checkpoint_quota_exceeded"
        assert "limit" in r.json()["message"]
        assert srv.api("DELETE", "/v1/sprites/quota/checkpoints/v1").status_code == 409
        list(s.restore_checkpoint("v0"))
        assert srv.api("DELETE", "/v1/sprites/quota/checkpoints/v1").status_code == 204
        r = srv.api("POST", "/v1/sprites/quota/checkpoint", json={})
        assert r.status_code == 200
        assert json.loads(r.text.strip().splitlines()[-1])["type"] == "complete"
        c.delete_sprite("quota")
    finally:
        srv.stop()


def test_restore_and_checkpoint_queued_behind_a_delete_are_404(server: WispServer,
                                                               sprite_factory) -> None:
    """A restore and a checkpoint that wait for the sprite's lock behind a delete of the
    same sprite answer 404 sprite_not_found once they get it: no 200 stream with an error
    line (which named the deleted disk's host path)."""
    import threading
    import time

    import httpx

    s = sprite_factory("queued")
    list(s.create_checkpoint())
    # 300 MB of unwritten pages: the next checkpoint holds the lock while it syncs them
    sh(s, "dd if=/dev/zero of=/home/sprite/big bs=1M count=300 2>/dev/null")
    replies: dict[str, tuple[int, bytes, float]] = {}

    def call(key: str, method: str, path: str) -> None:
        r = httpx.request(method, server.url + path, headers=server.headers, timeout=120,
                          json={} if method == "POST" else None)
        replies[key] = (r.status_code, r.content, time.monotonic())

    base = f"/v1/sprites/{s.name}"
    with httpx.stream("POST", server.url + base + "/checkpoint", headers=server.headers,
                      json={}, timeout=120) as holder:
        lines = holder.iter_lines()
        first = next(lines)  # the lock is held from here until the stream ends
        assert json.loads(first)["type"] == "info"
        threads = [threading.Thread(target=call, args=("delete", "DELETE", base))]
        threads[0].start()
        time.sleep(0.3)  # the delete queues first
        for key, path in (("restore", base + "/checkpoints/v1/restore"),
                          ("checkpoint", base + "/checkpoint")):
            threads.append(threading.Thread(target=call, args=(key, "POST", path)))
            threads[-1].start()
        time.sleep(0.3)
        assert not replies, f"the checkpoint ended before the others queued: {replies}"
        assert json.loads(list(lines)[-1])["type"] == "complete"
    for t in threads:
        t.join()
    assert replies["delete"][0] == 204
    for key in ("restore", "checkpoint"):  # both waited: nothing answered while the lock was held
        status, body, _ = replies[key]
        assert status == 404, (key, status, body)
        assert json.loads(body)["error"] == "sprite_not_found"
