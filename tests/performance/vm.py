"""VM sprite rows of `make bench` (docs/vm.md), the accelerator named in each label, with
the same operations on a container sprite of the same server for comparison.

Memory checkpoints are measured with 64 MB, 256 MB and 1 GB touched: a file of that size
on the guest's /dev/shm (a tmpfs, so memory), filled with non-zero bytes (QEMU sends a
zero page as a flag, so zeros would measure nothing). The guest has 1536 MB.

`python -m tests.performance.vm` runs these rows alone.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tests.framework.server import WispServer

__all__ = ["run"]

TOUCHED_MB = (64, 256, 1024)


def _fill(b: Any, name: str, mb: int) -> None:
    b.sh(name, f"rm -f /dev/shm/fill; yes xxxxxxxxxxxxxxx | head -c {mb << 20} > /dev/shm/fill")


def run(bench_cls: Any, base: Path, samples: int) -> list[tuple[str, list[float], str]]:
    cfg = base / "vm.toml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text("[sprites]\nmemory_mb = 1536\nwarm_after = 0\ncold_after = 0\n")
    srv = WispServer(base / "vm", config_file=cfg, extra_env={"WISP_RUNTIME": "vm"})
    srv.start()
    b = bench_cls(srv)
    rows: list[tuple[str, list[float], str]] = []

    def record(label: str, values: list[float], unit: str = "ms") -> None:
        rows.append((label, values, unit))
        b.record(label, values, unit)

    try:
        n = max(2, samples // 4)
        first = b.name("v")
        b.create(first)  # the first start also prepares the image's VM base disk
        deadline = time.monotonic() + 300
        while b.http.get(f"/v1/sprites/{first}").json()["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the first VM sprite did not start")
            time.sleep(0.2)
        b.exec(first, "true")
        accel = b.http.get(f"/v1/sprites/{first}").json()["accelerator"].upper()
        # the first create of this kind boots, and has the base snapshot made meanwhile
        bases = srv.data_dir / "mnt" / "vm-bases"
        while not any(bases.glob("*/meta.json")):
            if time.monotonic() > deadline:
                raise RuntimeError("no VM base snapshot was made")
            time.sleep(0.5)
        created: list[float] = []
        for _ in range(n):
            name = b.name("v")

            def create_exec(name: str = name) -> None:
                b.create(name)
                b.exec(name, "true")

            created.append(b.timed(create_exec))
            b.delete(name)
        record(f"VM ({accel}) create → first exec (resumes the base snapshot)", created)

        def restart_exec() -> None:
            b.http.post(f"/v1/sprites/{first}/restart").raise_for_status()
            b.exec(first, "true")

        record(f"VM ({accel}) restart → first exec (boots a kernel)",
               [b.timed(restart_exec) for _ in range(n)])
        box = b.name("c")
        b.http.post("/v1/sprites", json={"name": box, "runtime": "container"}
                    ).raise_for_status()
        b.exec(box, "true")
        record(f"VM ({accel}) exec round trip (`true`)",
               [b.timed(lambda: b.exec(first, "true")) for _ in range(samples)])
        record("container exec round trip (`true`), same server",
               [b.timed(lambda: b.exec(box, "true")) for _ in range(samples)])
        for mb in TOUCHED_MB:
            _fill(b, first, mb)
            cps: list[float] = []
            restores: list[float] = []
            for _ in range(n):
                cp: list[str] = []
                cps.append(b.timed(lambda cp=cp: cp.append(b.checkpoint(first))))
                restores.append(b.timed(lambda cp=cp: b.restore(first, cp[0])))
            record(f"VM ({accel}) checkpoint with memory, {mb} MB touched", cps)
            record(f"VM ({accel}) restore from memory → running, {mb} MB touched", restores)
        b.sh(first, "rm -f /dev/shm/fill")
        cps, restores = [], []
        for _ in range(n):
            cp2: list[str] = []
            cps.append(b.timed(lambda cp2=cp2: cp2.append(b.checkpoint(box))))
            restores.append(b.timed(lambda cp2=cp2: b.restore(box, cp2[0])))
        record("container checkpoint (disk only), same server", cps)
        record("container restore (disk only), same server", restores)
        _fill(b, first, 64)
        sleeps: list[float] = []
        wakes: list[float] = []
        for _ in range(n):
            sleeps.append(b.timed(lambda: b.http.post(
                f"/v1/sprites/{first}/sleep", json={"state": "cold"}).raise_for_status()))
            wakes.append(b.timed(lambda: b.exec(first, "true")))
        record(f"VM ({accel}) hibernate (cold sleep: memory to the volume), 64 MB touched",
               sleeps)
        record(f"VM ({accel}) wake from hibernation → first exec, 64 MB touched", wakes)
        live: list[float] = []
        from_cp: list[float] = []
        cp_id = b.checkpoint(first)
        for forks, body in ((live, {}), (from_cp, {"checkpoint": cp_id})):
            for _ in range(n):
                child = b.name("f")

                def fork(child: str = child, body: dict[str, str] = body) -> None:
                    b.http.post(f"/v1/sprites/{first}/fork",
                                json={"name": child, **body}).raise_for_status()
                    b.exec(child, "true")

                forks.append(b.timed(fork))
                b.delete(child)
        record(f"VM ({accel}) fork of a running sprite (its live memory) → first exec, "
               "64 MB touched", live)
        record(f"VM ({accel}) fork from a checkpoint (its memory) → first exec, "
               "64 MB touched", from_cp)
    finally:
        srv.stop()
    return rows


def main() -> None:
    from tests.performance.bench import SAMPLES, Bench, pct

    base = Path(os.environ.get("WISP_BENCH_DIR", "/var/tmp/wisp-bench-vm"))
    shutil.rmtree(base, ignore_errors=True)
    rows = run(Bench, base, SAMPLES)
    print("| metric | p50 | p95 | unit |\n|---|---|---|---|")
    for label, values, unit in rows:
        print(f"| {label} | {statistics.median(values):.1f} | {pct(values, 0.95):.1f} | {unit} |")
    shutil.rmtree(base, ignore_errors=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
