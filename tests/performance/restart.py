"""Server restart rows of `make bench` (docs/lifecycle.md, "Server restarts"): how long a
new `wisp serve` takes to answer its API when the one before it left `COUNT` sprites
running, each with a background process and a detached exec session, and how many of
their processes were lost on the way (the goal: none).

The time runs from the new server process's start (Python's own start-up included) to the
first 200 of `GET /v1/sprites`, polled every 5 ms; the bench's long-lived processes
(2 per sprite) are counted on the host, in the sprites' cgroups, before the stop and
after the start. Done after a SIGTERM (an
upgrade) and after a SIGKILL (a crash), on a server with the product's default
(`stop_sprites = false`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import websockets.sync.client as ws_client

from tests.framework.server import WispServer

__all__ = ["run"]

COUNT = 20


def _processes(srv: WispServer) -> int:
    """The long-lived processes the bench started in the sprites (each sprite's `sleep` and
    its session's shell), found in the sprites' cgroups: the loops' short `sleep 1`
    children come and go, so they are not counted."""
    total = 0
    root = Path("/sys/fs/cgroup/pids/wisp")
    if not root.is_dir():
        root = Path("/sys/fs/cgroup/wisp")
    for sprite in (srv.data_dir / "run" / "sprites").glob("sprite-*"):
        for procs in (root / sprite.name).rglob("cgroup.procs"):
            try:
                pids = procs.read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                total += cmd.startswith(b"sleep\x001000000") or b"echo tick" in cmd
    return total


def _ready_ms(srv: WispServer) -> float:
    """Start the server and time it to its first good answer."""
    t = time.perf_counter()
    srv.start(poll=0.005)
    return (time.perf_counter() - t) * 1000


def run(bench_cls: Any, base: Path, samples: int) -> list[tuple[str, list[float], str]]:
    srv = WispServer(base / "restart", stop_sprites=False)
    srv.start()
    b = bench_cls(srv)
    rows: list[tuple[str, list[float], str]] = []
    try:
        names = [b.name("r") for _ in range(COUNT)]
        for n in names:
            b.create(n)
            b.sh(n, "setsid sleep 1000000 </dev/null >/dev/null 2>&1 &")
        for n in names:  # a detached exec session each, printing now and then
            url = srv.url.replace("http", "ws") + f"/v1/sprites/{n}/exec?cmd=sh&cmd=-c&" \
                "cmd=while%20true;%20do%20echo%20tick;%20sleep%201;%20done&stdin=false"
            with ws_client.connect(url, additional_headers=srv.headers, close_timeout=0) as ws:
                ws.recv()
        for how in ("SIGTERM", "SIGKILL"):
            ready, lost = [], []
            for _ in range(max(1, samples // 2)):
                before = _processes(srv)
                if before != 2 * COUNT:  # the count must see what the bench started
                    raise RuntimeError(f"{before} bench processes before the restart")
                if how == "SIGTERM":
                    srv.stop()
                else:
                    srv.kill()
                ready.append(_ready_ms(srv))
                running = [s["status"] for s in httpx.get(
                    f"{srv.url}/v1/sprites", headers=srv.headers, timeout=60).json()["sprites"]
                    if s["name"] in names]
                if running.count("running") != COUNT:
                    raise RuntimeError(f"after a {how}: {running}")
                lost.append(float(max(0, before - _processes(srv))))
            rows.append((f"server restart ({how}) → API ready, {COUNT} sprites adopted",
                         ready, "ms"))
            rows.append((f"processes lost across a server restart ({how}), {COUNT} sprites",
                         lost, "count"))
            for label, values, unit in rows[-2:]:
                b.record(label, values, unit)
    finally:
        srv.stop()
        srv.stop_sprites = True  # adopt what is left and stop it all
        srv.start()
        srv.stop()
    return rows
