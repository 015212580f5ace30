"""The S3 object-store path: a Wisp server whose JuiceFS volume keeps its data in a real
SeaweedFS bucket (metadata stays in the default SQLite file under the data dir).

Proves that sprite data, checkpoints and restores work on S3, that a clean stop leaves the
data in the bucket (and not only in a local cache), that a restart with an empty local cache
reads it back intact, and that a wrong secret key stops `wisp serve` at start with the S3
error instead of hanging. One more test moves the metadata to a throw-away PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.leaks import leaks
from tests.framework.seaweed import SeaweedS3
from tests.framework.server import WispServer, free_port

pytestmark = pytest.mark.s3

MiB = 1 << 20


@pytest.fixture(scope="module")
def seaweed(leak_check: Path) -> Iterator[SeaweedS3]:
    s3 = SeaweedS3(leak_check / "seaweed")
    s3.start()
    try:
        yield s3
    finally:
        s3.stop()


@pytest.fixture
def postgres(leak_check: Path) -> Iterator[str]:
    """A throw-away PostgreSQL on loopback (trust auth, no unix socket); yields its URL.

    postgres refuses to run as root, so initdb and the server run as the `postgres` user."""
    pg_bin = Path(os.environ.get("WISP_TEST_PG_BIN", "/usr/local/bin"))
    if not (pg_bin / "postgres").exists():
        pytest.skip(f"no PostgreSQL server binaries in {pg_bin}")
    work = leak_check / "postgres"
    work.mkdir()
    shutil.chown(work, "postgres")
    data, log = work / "data", work / "postgres.log"
    subprocess.run([pg_bin / "initdb", "-D", data, "-U", "wisp", "--auth=trust", "--no-sync",
                    "--no-instructions"], user="postgres", cwd=work, check=True,
                   capture_output=True, timeout=60)
    port = free_port()
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [pg_bin / "postgres", "-D", data, "-p", str(port), "-c", "listen_addresses=127.0.0.1",
             "-c", "unix_socket_directories=", "-c", "fsync=off"],
            user="postgres", cwd=work, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while b"ready to accept connections" not in log.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        yield f"postgres://wisp@127.0.0.1:{port}/postgres?sslmode=disable"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: ends sessions, then exits
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _config(path: Path, s3: SeaweedS3, bucket: str, secret_key: str | None = None,
            metadata: str | None = None) -> Path:
    # JSON strings are valid TOML basic strings, so json.dumps quotes safely.
    lines = ["[storage]"]
    if metadata:
        lines.append(f"metadata = {json.dumps(metadata)}")
    lines += ['storage = "s3"',
              f"bucket = {json.dumps(s3.bucket_url(bucket))}",
              f"access_key = {json.dumps(s3.access_key)}",
              f"secret_key = {json.dumps(secret_key or s3.secret_key)}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def sh(sprite, script: str) -> bytes:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output()


def _mounted(data_dir: Path) -> list[str]:
    return leaks(data_dir)["mounts"]


def test_sprite_data_lives_in_s3_and_survives_restart(seaweed: SeaweedS3,
                                                       leak_check: Path) -> None:
    """With storage = "s3": JuiceFS creates the bucket itself; a sprite's 20 MB file
    survives checkpoint → modify → restore; after a clean stop the bucket holds at least
    that much chunk data; after deleting the local cache and starting again the file still
    verifies (so it came back from S3); deleting the sprite works."""
    bucket = "wisp-data"
    data_dir = leak_check / "s3-server"
    cfg = _config(leak_check / "s3-server.toml", seaweed, bucket)
    assert bucket not in seaweed.buckets()
    srv = WispServer(data_dir, config_file=cfg)
    try:
        srv.start()
        assert bucket in seaweed.buckets(), "juicefs format should have created the bucket"
        assert not (data_dir / "volume" / "chunks").exists(), "data went to the local store"

        c = SpritesClient(srv.token, base_url=srv.url)
        s = c.create_sprite("s3-data")
        sh(s, f"cd /home/sprite && head -c {20 * MiB} /dev/urandom > r && "
              "md5sum r > r.md5 && echo one > f")
        assert list(s.create_checkpoint("on s3"))[-1].type == "complete"
        sh(s, "cd /home/sprite && head -c 1000 /dev/urandom > r && echo two > f")
        assert b"FAILED" in sh(s, "cd /home/sprite && md5sum -c r.md5 2>&1 || true")
        list(s.restore_checkpoint("v1"))
        assert b"r: OK" in sh(s, "cd /home/sprite && md5sum -c r.md5")
        assert sh(s, "cat /home/sprite/f") == b"one\n"

        srv.stop()  # its shutdown runs `juicefs umount --flush`
        assert _mounted(data_dir) == []
        chunks = seaweed.list_objects(bucket, "wisp/chunks/")
        assert sum(o.size for o in chunks) >= 20 * MiB, chunks[:20]
        shutil.rmtree(data_dir / "cache")  # nothing may be readable only from local disk

        srv.restart()
        c = SpritesClient(srv.token, base_url=srv.url)
        s = c.sprite("s3-data")
        assert b"r: OK" in sh(s, "cd /home/sprite && md5sum -c r.md5")
        assert sh(s, "cat /home/sprite/f") == b"one\n"
        assert "v1" in [cp.id for cp in s.list_checkpoints()]
        assert srv.api("DELETE", "/v1/sprites/s3-data").status_code == 204
        assert srv.api("GET", "/v1/sprites/s3-data").status_code == 404
    finally:
        srv.stop()
    assert _mounted(data_dir) == []


def test_wrong_secret_key_fails_start(seaweed: SeaweedS3, leak_check: Path) -> None:
    """A wrong S3 secret key on a new volume makes `wisp serve` exit during start-up (after
    juicefs format's few retries) with the S3 signature error in its output; it does not
    hang, and it leaves no mount behind."""
    data_dir = leak_check / "s3-badkey"
    cfg = _config(leak_check / "s3-badkey.toml", seaweed, "wisp-badkey",
                  secret_key="not-the-secret")
    srv = WispServer(data_dir, config_file=cfg)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError) as failed:
            srv.start(timeout=60)
    finally:
        srv.kill()
    elapsed = time.monotonic() - started
    message = str(failed.value)
    assert message.startswith("wisp serve exited"), message[-1500:]
    assert "SignatureDoesNotMatch" in message, message[-1500:]
    assert elapsed < 45, f"start took {elapsed:.0f}s to fail"
    assert "wisp-badkey" not in seaweed.buckets()
    assert _mounted(data_dir) == []


def test_postgres_metadata_with_s3_data(seaweed: SeaweedS3, postgres: str,
                                        leak_check: Path) -> None:
    """With metadata = a PostgreSQL URL and data on S3, no metadata file is made under the
    data dir, the volume is described in PostgreSQL, and a sprite's file and checkpoint
    survive a server restart."""
    from wisp.storage.juicefs import juicefs_binary

    data_dir = leak_check / "s3-pg"
    cfg = _config(leak_check / "s3-pg.toml", seaweed, "wisp-pg", metadata=postgres)
    srv = WispServer(data_dir, config_file=cfg)
    try:
        srv.start()
        assert not (data_dir / "volume" / "meta.db").exists()
        c = SpritesClient(srv.token, base_url=srv.url)
        s = c.create_sprite("s3-pg")
        sh(s, "echo kept > /home/sprite/f")
        assert list(s.create_checkpoint())[-1].type == "complete"
        srv.stop()
        status = subprocess.run([juicefs_binary(), "status", postgres], capture_output=True,
                                timeout=60, check=True)
        setting = json.loads(status.stdout)["Setting"]
        assert (setting["Name"], setting["Bucket"]) == ("wisp", seaweed.bucket_url("wisp-pg"))
        assert seaweed.list_objects("wisp-pg", "wisp/chunks/")
        srv.restart()
        s = SpritesClient(srv.token, base_url=srv.url).sprite("s3-pg")
        assert sh(s, "cat /home/sprite/f") == b"kept\n"
        assert "v1" in [cp.id for cp in s.list_checkpoints()]
        assert srv.api("DELETE", "/v1/sprites/s3-pg").status_code == 204
    finally:
        srv.stop()
    assert _mounted(data_dir) == []
