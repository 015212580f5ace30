"""Task files are written by the sprite and read by the host: a sprite must not make the
host read its own files, block on a pipe, or hold itself awake with a bogus file
(docs/lifecycle.md, "Tasks")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sprites import SpritesClient

from tests.framework.server import WispServer


@pytest.fixture(scope="module")
def srv(leak_check: Path) -> Iterator[WispServer]:
    server = WispServer(leak_check / "lifecycle-sec",
                        extra_env={"WISP_WARM_AFTER": "1.5", "WISP_COLD_AFTER": "0",
                                   "WISP_WARM_POOL": "0"})
    server.start()
    yield server
    server.stop()


def test_task_files_cannot_point_the_host_at_its_own_files(srv: WispServer,
                                                           leak_check: Path) -> None:
    decoy = leak_check / "decoy"
    decoy.mkdir(exist_ok=True)
    (decoy / "evil").write_text("600\n")  # a valid duration, on the host
    client = SpritesClient(srv.token, base_url=srv.url)
    sprite = client.create_sprite("tasks-attack")
    try:
        out = sprite.command("sh", "-c", f"""
            cd /run/sprite/tasks
            ln -s {decoy}/evil evil              # a link to a host file, by absolute path
            ln -s {decoy} dir                    # and to a host directory
            mkfifo fifo                          # a pipe: a naive reader would block
            echo 600 > real                      # one real task file
            head -c 60000 /dev/zero > big        # not a duration
            echo 'rm -rf /' > junk
            umount /run/sprite/tasks 2>&1 || echo umount-refused
            ls | sort | tr '\\n' ' '
        """).output().decode()
        assert "umount-refused" in out
        assert "evil" in out and "fifo" in out
        tasks = srv.api("GET", "/v1/sprites/tasks-attack/tasks").json()
        names = {t["name"] for t in tasks}
        assert names == {"real"}, tasks
        # the one real task holds it; without it, the bogus files hold nothing
        time.sleep(3)
        assert client.get_sprite("tasks-attack").status == "running"
        sprite.command("rm", "/run/sprite/tasks/real").run()
        deadline = time.monotonic() + 10
        while client.get_sprite("tasks-attack").status != "warm":
            assert time.monotonic() < deadline, "bogus task files kept the sprite awake"
            time.sleep(0.2)
        assert (decoy / "evil").read_text() == "600\n"
    finally:
        srv.api("DELETE", "/v1/sprites/tasks-attack")
        client.close()
