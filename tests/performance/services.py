"""Service rows of `make bench` (docs/services.md): how soon a crashed service runs again,
and how long a PUT takes to answer with `started`.

A crash is a SIGKILL through `POST …/services/signal`; the time is from that call until the
service's state shows a new pid running (polled every 2 ms through the API, so the figure
includes one poll's round trip). `start` before each sample resets the backoff, so every
sample is a first crash (restarted at once by wisp-init).
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["run"]


def run(b: Any, samples: int) -> None:
    """Add the rows to `b` (a `tests.performance.bench.Bench`)."""
    name = b.name("svc")
    b.create(name)
    base = f"/v1/sprites/{name}/services"
    body = {"cmd": "sleep", "args": ["100000"]}
    puts = [b.timed(lambda: b.http.put(f"{base}/s?duration=0", json=body).raise_for_status())
            for _ in range(samples)]
    b.record("service create → started (PUT, duration=0)", puts)

    def pid() -> int:
        state = b.http.get(f"{base}/s").json()["state"]
        return int(state.get("pid") or 0) if state["status"] == "running" else 0

    restarts = []
    for _ in range(samples):
        b.http.post(f"{base}/s/start?duration=0").raise_for_status()
        before = pid()
        t = time.perf_counter()
        b.http.post(f"{base}/signal", json={"name": "s", "signal": "KILL"}).raise_for_status()
        while pid() in (0, before):
            time.sleep(0.002)
        restarts.append((time.perf_counter() - t) * 1000)
    b.record("service restart after a crash (SIGKILL → running again)", restarts)
    b.delete(name)
