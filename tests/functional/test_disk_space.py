"""Disk space on the host: what writing and deleting files inside a sprite costs there.

A sprite's disk is an ext4 image on JuiceFS. Writing N MB in a sprite may cost the host
about N MB (one copy of each block, not a cache copy beside the chunk store), and deleting
the file inside the sprite must give that space back while the sprite keeps running: ext4
discards the freed blocks, the loop device punches holes in the image, and the server
compacts the image so that JuiceFS frees the chunks (docs/storage.md, "Disk space").

Host usage is measured as the disk really holds it (`du -x`: allocated blocks, on the
data dir's filesystem only, so neither the JuiceFS mount nor the sprites' disks mounted
below it count twice): chunk store, cache and staging, metadata, logs. With S3 the chunks
are counted in the bucket instead.

Each measurement starts after a first small write and delete in the sprite: the first
compaction of a new disk (ours, or JuiceFS's own, which comes a little later) rewrites
the ext4 metadata chunks it shares with the template into dense copies of its own, tens of
MB once per disk whatever is written (docs/storage.md, Known issues).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.seaweed import SeaweedS3
from tests.framework.server import WispServer

MiB = 1 << 20
N = 200 * MiB        # written and deleted per test: big next to ext4's own metadata writes
WAIT = 60.0          # deleted space must be back within a minute


def host_bytes(data_dir: Path) -> int:
    """Bytes allocated under `data_dir` on its own filesystem (st_blocks, like du)."""
    out = subprocess.run(["du", "-sxB1", str(data_dir)], capture_output=True, text=True,
                         timeout=60)
    return int(out.stdout.split()[0])


def settled(measure: Callable[[], int], timeout: float = 30.0) -> int:
    """`measure()` once two readings a second apart agree within 1 MiB (uploads done)."""
    deadline = time.monotonic() + timeout
    last = measure()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = measure()
        if abs(now - last) <= MiB:
            return now
        last = now
    return last


def wait_below(measure: Callable[[], int], limit: int, timeout: float = WAIT) -> int:
    """Poll `measure()` until it is at most `limit` or `timeout` passes; return the last."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if value <= limit or time.monotonic() > deadline:
            return value
        time.sleep(1)


def sh(sprite, script: str) -> bytes:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output()


def warm_up(sprite, measure: Callable[[], int]) -> int:  # type: ignore[no-untyped-def]
    """A first 8 MB write and delete, then host usage once it stops changing: the one-off
    metadata rewrite of a new disk is behind us (see the module docstring)."""
    sh(sprite, "head -c 8000000 /dev/urandom > /home/sprite/w && sync && rm /home/sprite/w "
               "&& sync")
    time.sleep(20)  # a journal commit (5 s) and a pass of the reclaimer (10 s)
    return settled(measure)


def write(sprite, name: str, size: int) -> None:  # type: ignore[no-untyped-def]
    """`size` random bytes (no compression or zero detection can shrink them), synced."""
    sh(sprite, f"head -c {size} /dev/urandom > /home/sprite/{name} && sync")


@pytest.fixture(scope="module")
def space_server(leak_check: Path) -> Iterator[WispServer]:
    """A server of its own with the embedded default storage and no warm pool, so that
    nothing but the test writes to the host's disk while it measures."""
    srv = WispServer(leak_check / "space", extra_env={"WISP_WARM_POOL": "0"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_write_costs_one_copy_and_delete_gives_it_back(space_server: WispServer) -> None:
    """Embedded default (SQLite + local chunk directory): writing 200 MB in a sprite grows
    the host's disk by at most 1.1x that (no second copy in a JuiceFS cache), and deleting
    the file inside the running sprite brings host usage back to within 0.1x of where it
    started in under a minute."""
    data_dir = space_server.data_dir
    c = SpritesClient(space_server.token, base_url=space_server.url)
    s = c.create_sprite("space-default")
    try:
        before = warm_up(s, lambda: host_bytes(data_dir))
        write(s, "big", N)
        grown = settled(lambda: host_bytes(data_dir)) - before
        assert grown <= 1.1 * N, f"writing {N / MiB:.0f} MiB grew the host by " \
                                 f"{grown / MiB:.0f} MiB"
        sh(s, "rm /home/sprite/big && sync")
        left = wait_below(lambda: host_bytes(data_dir), before + N // 10) - before
        assert left <= 0.1 * N, f"{left / MiB:.0f} MiB of the deleted {N / MiB:.0f} MiB " \
                                f"still held on the host after {WAIT:.0f}s"
    finally:
        space_server.api("DELETE", "/v1/sprites/space-default")


def test_checkpoint_keeps_data_that_deletes_give_back(space_server: WispServer) -> None:
    """Reclaiming space never takes data a checkpoint still holds: a file in checkpoint v1
    is deleted together with a 200 MB file written after v1; at least half of the later
    file's space comes back within a minute (so the server did compact the disk), and
    restoring v1 still gives the first file intact, byte for byte.

    Not all of it comes back: compacting rewrites each 64 MB chunk the sprite wrote after
    the checkpoint (ext4's bitmaps, inode tables, journal) while v1 keeps the old version
    of it (docs/storage.md, Known issues)."""
    data_dir = space_server.data_dir
    c = SpritesClient(space_server.token, base_url=space_server.url)
    s = c.create_sprite("space-checkpoint")
    try:
        warm_up(s, lambda: host_bytes(data_dir))
        write(s, "kept", 70 * MiB)  # more than one 64 MiB JuiceFS chunk
        sh(s, "cd /home/sprite && md5sum kept > kept.md5")
        assert list(s.create_checkpoint("before delete"))[-1].type == "complete"
        write(s, "later", N)
        peak = settled(lambda: host_bytes(data_dir))
        sh(s, "rm /home/sprite/kept /home/sprite/later && sync")
        freed = peak - wait_below(lambda: host_bytes(data_dir), peak - N // 2)
        assert freed >= N // 2, f"only {freed / MiB:.0f} MiB of a deleted {N / MiB:.0f} MiB " \
                                f"file written after the checkpoint came back in {WAIT:.0f}s"
        list(s.restore_checkpoint("v1"))
        assert b"kept: OK" in sh(s, "cd /home/sprite && md5sum -c kept.md5")
    finally:
        space_server.api("DELETE", "/v1/sprites/space-checkpoint")


@pytest.mark.s3
def test_s3_delete_frees_bucket_objects(leak_check: Path) -> None:
    """With storage = "s3" (writeback and a local cache on, as that default keeps them):
    the host holds at most one local copy of what a sprite writes (1.1x), and deleting the
    file inside the sprite frees its objects in the bucket and its cached copy on the host,
    both back to within 0.1x of where they started in under a minute."""
    s3 = SeaweedS3(leak_check / "space-seaweed")
    s3.start()
    bucket = "wisp-space"
    cfg = leak_check / "space-s3.toml"
    cfg.write_text("[storage]\nstorage = \"s3\"\n"
                   f"bucket = {json.dumps(s3.bucket_url(bucket))}\n"
                   f"access_key = {json.dumps(s3.access_key)}\n"
                   f"secret_key = {json.dumps(s3.secret_key)}\n")
    srv = WispServer(leak_check / "space-s3", config_file=cfg,
                     extra_env={"WISP_WARM_POOL": "0"})
    try:
        srv.start()

        def in_bucket() -> int:
            return sum(o.size for o in s3.list_objects(bucket, "wisp/chunks/"))

        s = SpritesClient(srv.token, base_url=srv.url).create_sprite("space-s3")
        bucket0 = warm_up(s, in_bucket)
        local0 = settled(lambda: host_bytes(srv.data_dir))
        write(s, "big", N)
        assert settled(in_bucket) - bucket0 >= 0.9 * N, "the data never reached the bucket"
        grown = settled(lambda: host_bytes(srv.data_dir)) - local0
        assert grown <= 1.1 * N, f"host grew by {grown / MiB:.0f} MiB for {N / MiB:.0f} MiB"
        sh(s, "rm /home/sprite/big && sync")
        left = wait_below(in_bucket, bucket0 + N // 10) - bucket0
        assert left <= 0.1 * N, f"{left / MiB:.0f} MiB of deleted data still in the bucket"
        left = wait_below(lambda: host_bytes(srv.data_dir), local0 + N // 10) - local0
        assert left <= 0.1 * N, f"{left / MiB:.0f} MiB of deleted data still cached locally"
        assert srv.api("DELETE", "/v1/sprites/space-s3").status_code == 204
    finally:
        srv.stop()
        s3.stop()


def test_blocks_staged_by_a_write_back_mount_survive(leak_check: Path) -> None:
    """A volume last mounted with write-back whose JuiceFS died before uploading (staged
    blocks left in the cache dir, as after a host crash) keeps its data when the server
    starts with the default no-cache mount: the server mounts with a cache this once, so
    JuiceFS uploads the staged blocks, and the file reads back intact (without, EIO). The
    next start, with nothing staged, clears the cache dir."""
    from wisp.storage.juicefs import juicefs_binary

    data_dir = leak_check / "space-staged"
    srv = WispServer(data_dir, extra_env={"WISP_WARM_POOL": "0"})
    srv.start()  # formats the volume the way the server does
    srv.stop()
    mnt, cache = data_dir / "mnt", data_dir / "cache"
    meta = f"sqlite3://{data_dir / 'volume' / 'meta.db'}"
    mount = subprocess.Popen(
        [juicefs_binary(), "mount", "--no-usage-report", "--cache-dir", str(cache),
         "--writeback", "--upload-delay", "1h", meta, str(mnt)],
        env={**os.environ, "JFS_SUPERVISOR": "1"}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mnt):
            assert mount.poll() is None and time.monotonic() < deadline, "juicefs mount failed"
            time.sleep(0.05)
        data = os.urandom(20 * MiB)
        with open(mnt / "staged", "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        assert list(cache.glob("*/rawstaging/**/*_*")), "nothing was staged"
    finally:
        mount.kill()  # a crash: the staged blocks are never uploaded
        mount.wait()
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    try:
        srv.start()
        assert (mnt / "staged").read_bytes() == data
        srv.restart()
        assert not list(cache.iterdir()), "the cache dir of a no-cache mount was kept"
        assert (mnt / "staged").read_bytes() == data
    finally:
        srv.stop()
