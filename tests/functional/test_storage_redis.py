"""JuiceFS metadata in a real Redis (password-protected), chunks in the local directory."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.processes import stop
from tests.framework.server import WispServer, free_port

PASSWORD = "redis-test-secret-4242"


def _cli(port: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {"REDISCLI_AUTH": PASSWORD, "PATH": "/usr/bin:/bin"}
    return subprocess.run(["redis-cli", "-p", port, *args], capture_output=True, timeout=10,
                          env=env)


@pytest.fixture
def redis_url(leak_check: Path) -> Iterator[str]:
    """A throw-away redis-server on loopback with a password; yields the metadata URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (make installs it)")
    port = free_port()
    work = leak_check / f"redis-{port}"  # one per test: several tests use a Redis
    work.mkdir()
    conf = work / "redis.conf"  # the password in a file, not on the command line
    conf.write_text(f"port {port}\nbind 127.0.0.1\nrequirepass {PASSWORD}\ndir {work}\n"
                    'save ""\nappendonly yes\n')
    proc = subprocess.Popen([binary, str(conf)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            ping = _cli(str(port), "ping")
            if ping.stdout.strip() == b"PONG":
                break
            assert proc.poll() is None and time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)
        yield f"redis://:{PASSWORD}@127.0.0.1:{port}/1"
    finally:
        stop(proc)


def _cmdlines() -> list[str]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                out.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"))
            except OSError:
                pass
    return out


def test_redis_metadata(redis_url: str, leak_check: Path) -> None:
    """With `metadata` a Redis URL, no SQLite metadata file is made, the volume's metadata
    lands in Redis, the Redis password never appears on a command line, and a sprite's
    file and checkpoint survive a server restart."""
    data_dir = leak_check / "redis-meta"
    cfg = leak_check / "redis-meta.toml"
    cfg.write_text(f'[storage]\nmetadata = "{redis_url}"\n')
    srv = WispServer(data_dir, config_file=cfg)
    try:
        srv.start()
        assert not (data_dir / "volume" / "meta.db").exists()
        cmdlines = _cmdlines()
        assert any("juicefs" in c and "redis://127.0.0.1" in c for c in cmdlines)
        assert not any(PASSWORD in c for c in cmdlines), "the Redis password is on a command line"
        s = SpritesClient(srv.token, base_url=srv.url).create_sprite("redis-meta")
        assert s.command("sh", "-c", "echo kept > /home/sprite/f").output() == b""
        assert list(s.create_checkpoint())[-1].type == "complete"
        port = redis_url.rsplit(":", 1)[1].split("/")[0]
        keys = _cli(port, "-n", "1", "dbsize")
        assert int(keys.stdout) > 10
        srv.restart()
        s = SpritesClient(srv.token, base_url=srv.url).sprite("redis-meta")
        assert s.command("cat", "/home/sprite/f").output() == b"kept\n"
        assert [cp.id for cp in s.list_checkpoints()] == ["v1", "v0"]
        assert srv.api("DELETE", "/v1/sprites/redis-meta").status_code == 204
    finally:
        srv.stop()


def test_template_clones_survive_background_compaction(redis_url: str, leak_check: Path) -> None:
    """Every sprite disk is a clone of the template. With Redis metadata, JuiceFS 1.4's
    clone does not watch the source's chunk lists, so a background compaction of the
    template (triggered by its first read) that commits during a clone leaves the clone
    pointing at slices the compaction deletes: the disk reads EIO ("can't read superblock",
    the flaky `make test` of the hardening issue). A template made by `make_template` is
    compacted before it is published, so reading it while cloning it in a burst leaves
    every clone readable. Fails when `make_template` skips the compaction."""
    import asyncio

    from wisp.config import load_config
    from wisp.storage import disk
    from wisp.storage.juicefs import Volume

    cfg = load_config(data_dir=leak_check / "redis-compact")
    cfg.storage.metadata = redis_url
    volume = Volume(cfg)

    async def scenario() -> list[str]:
        broken: list[str] = []
        await volume.start()
        try:
            volume.path("t").mkdir()
            for round_ in range(4):
                template = volume.path("t", f"template-{round_}.img")
                await disk.make_template(template, volume.compact)

                def first_read(path: Path = template) -> None:
                    with open(path, "rb") as f:  # the read that triggers a compaction
                        f.read(1 << 20)

                reader = asyncio.create_task(asyncio.to_thread(first_read))
                clones = [volume.path("t", f"clone-{round_}-{i}.img") for i in range(8)]
                for clone in clones:
                    await volume.clone(template, clone)
                await reader
                await asyncio.sleep(1.0)  # let any compaction finish and delete
                for clone in clones:
                    try:
                        with open(clone, "rb") as f:
                            f.read(5 << 20)  # the first chunk: superblock, descriptors
                    except OSError as exc:
                        broken.append(f"{clone.name}: {exc}")
        finally:
            await volume.stop()
        return broken

    broken = asyncio.run(scenario())
    assert not broken, f"clones of the template lost data: {broken}"
