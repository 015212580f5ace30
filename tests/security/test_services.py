"""Service logs are written by the sprite's root into a directory the host reads for the
API: the host must never follow a link out of it, block on a FIFO, or read a device."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

from wisp import services
from wisp.runtime.base import SpriteHandle


def _reader(info_dir: Path) -> services.Logs:
    """The logs of a container sprite whose info dir (its disk's /.sprite) is `info_dir`."""
    return services.Logs(info_dir, SpriteHandle("t", info_dir, info_dir / "agent.sock"))


def _last(info_dir: Path, filename: str) -> list[str]:
    return asyncio.run(_reader(info_dir).last_lines(filename, 10))


def _logs(tmp_path: Path) -> Path:
    d = tmp_path / "logs" / "services"
    d.mkdir(parents=True)
    return d


def test_links_fifos_and_devices_are_not_read(tmp_path: Path) -> None:
    """A symlinked log file, a symlinked services dir, a FIFO and a device node all read as
    no log; a regular file reads."""
    d = _logs(tmp_path)
    secret = tmp_path / "host-secret"
    secret.write_text("host data\n")
    os.symlink(secret, d / "a.stdout.log")
    os.mkfifo(d / "b.stdout.log")
    os.symlink("/dev/zero", d / "c.stdout.log")
    (d / "ok.stdout.log").write_text("line\n")
    result: dict[str, object] = {}

    def read() -> None:  # a FIFO must not block: run it where a hang fails the test
        for key in ("a", "b", "c", "ok"):
            result[key] = _last(tmp_path, f"{key}.stdout.log")

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "reading a service log blocked"
    assert result == {"a": [], "b": [], "c": [], "ok": ["line\n"]}


def test_linked_services_dir_is_not_followed(tmp_path: Path) -> None:
    """`logs/services` replaced by a link to a host directory: nothing is read there."""
    (tmp_path / "logs").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.stdout.log").write_text("host file\n")
    os.symlink(elsewhere, tmp_path / "logs" / "services")
    assert _last(tmp_path, "x.stdout.log") == []
    assert asyncio.run(_reader(tmp_path).sizes("x")) == {"stdout": 0, "stderr": 0}
