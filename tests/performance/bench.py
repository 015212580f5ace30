"""`make bench`: latency and throughput of a real Wisp server, as a Markdown table.

Measures p50/p95 over several samples for: create → first exec, exec round trip, exec
output throughput over the WebSocket (one stream, four at once),
checkpoint (idle, after 100 MB and after 1 GB written), restore, fork, delete, disk
write throughput inside a sprite versus raw JuiceFS on the same volume, HTTP through a
sprite URL versus straight into the sprite, services (tests/performance/services.py) and
server restarts with running sprites adopted (tests/performance/restart.py).
In the same run it measures a naive baseline (checkpoint = copy the overlay upper directory, restore = copy it
back) and reports Wisp's speed-up over it. Then the network rows, on a second server
whose uplink is the tests' fake internet (tests/performance/network.py). Asserts nothing:
numbers are for comparing runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import websockets.sync.client as ws_client

from tests.framework.server import WispServer

SAMPLES = int(os.environ.get("WISP_BENCH_SAMPLES", "10"))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q * (len(ordered) - 1))))
    return ordered[k]


class Bench:
    def __init__(self, srv: WispServer) -> None:
        self.srv = srv
        self.http = httpx.Client(base_url=srv.url, headers=srv.headers, timeout=600)
        self.rows: list[tuple[str, list[float], str]] = []
        self.counter = 0

    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def exec(self, sprite: str, *cmd: str) -> bytes:
        """One exec over the WebSocket (non-TTY framing), returning stdout."""
        query = "&".join([f"cmd={c}" for c in cmd] + ["stdin=false"])
        url = self.srv.url.replace("http", "ws") + f"/v1/sprites/{sprite}/exec?{query}"
        out = b""
        with ws_client.connect(url, additional_headers=self.srv.headers,
                               max_size=None) as ws:
            while True:
                msg = ws.recv()
                if isinstance(msg, str):
                    continue
                if msg[:1] == b"\x01":
                    out += msg[1:]
                elif msg[:1] == b"\x03":
                    if msg[1:2] not in (b"", b"\x00"):
                        raise RuntimeError(f"{cmd} exited {msg[1]}")
                    return out

    def sh(self, sprite: str, script: str) -> bytes:
        from urllib.parse import quote

        return self.exec(sprite, "sh", "-c", quote(script, safe=""))

    def create(self, name: str) -> None:
        r = self.http.post("/v1/sprites", json={"name": name})
        r.raise_for_status()

    def delete(self, name: str) -> None:
        self.http.delete(f"/v1/sprites/{name}").raise_for_status()

    def checkpoint(self, name: str) -> str:
        r = self.http.post(f"/v1/sprites/{name}/checkpoint", json={})
        last = json.loads(r.text.strip().splitlines()[-1])
        if last["type"] != "complete":
            raise RuntimeError(last)
        return str(last["id"])

    def restore(self, name: str, cp: str) -> None:
        r = self.http.post(f"/v1/sprites/{name}/checkpoints/{cp}/restore")
        last = json.loads(r.text.strip().splitlines()[-1])
        if last["type"] != "complete":
            raise RuntimeError(last)

    def timed(self, fn: Callable[[], object]) -> float:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000

    def record(self, label: str, values: list[float], unit: str = "ms") -> None:
        self.rows.append((label, values, unit))
        print(f"  {label}: p50 {statistics.median(values):.1f} {unit}", file=sys.stderr,
              flush=True)

    def sprite_id(self, name: str) -> str:
        return str(self.http.get(f"/v1/sprites/{name}").json()["id"])

    def upper(self, name: str) -> Path:
        return self.srv.data_dir / "run" / "sprites" / self.sprite_id(name) / "disk" / "upper"

    def sleep(self, name: str, state: str) -> None:
        r = self.http.post(f"/v1/sprites/{name}/sleep", json={"state": state})
        r.raise_for_status()
        if r.json()["status"] != state:
            raise RuntimeError(f"{name} is {r.json()['status']}, not {state}")

    def wake(self) -> None:
        """Wake to first exec from warm (thaw) and from cold (mount + boot), docs/lifecycle.md."""
        n = self.name("wake")
        self.create(n)
        self.exec(n, "true")
        warm, cold = [], []
        for _ in range(SAMPLES):
            self.sleep(n, "warm")
            warm.append(self.timed(lambda: self.exec(n, "true")))
        self.record("wake from warm → first exec", warm)
        for _ in range(SAMPLES):
            self.sleep(n, "cold")
            cold.append(self.timed(lambda: self.exec(n, "true")))
        self.record("wake from cold → first exec", cold)
        self.delete(n)

    def density(self, warm_count: int = 100, cold_count: int = 500) -> None:
        """Host RAM per idle sprite: `warm_count` frozen ones, then `cold_count` cold ones
        (MemAvailable before and after, page cache dropped first both times)."""
        def available() -> float:
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            time.sleep(1)
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
            raise RuntimeError("no MemAvailable")

        before = available()
        names = [self.name("dw") for _ in range(warm_count)]
        for n in names:
            self.create(n)
            self.exec(n, "true")
            self.sleep(n, "warm")
        warm_mb = (before - available()) / warm_count
        self.record(f"host RAM per warm idle sprite ({warm_count} warm)", [warm_mb], "MB")
        for n in names:
            self.delete(n)
        before = available()
        names = [self.name("dc") for _ in range(cold_count)]
        for n in names:
            self.create(n)
            self.sleep(n, "cold")
        cold_mb = (before - available()) / cold_count
        self.record(f"host RAM per cold sprite ({cold_count} cold)", [cold_mb], "MB")
        for n in names:
            self.delete(n)

    def exec_stream(self, sprite: str, size: int = 100_000_000) -> None:
        """Exec stdout over the WebSocket with the `websockets` client's defaults (it offers
        permessage-deflate, as sprites-py does): MB/s of one stream, and of each of four
        streams at once. The data is random (incompressible, like tar or image output),
        read from the sprite's page cache, so the API path is what is measured."""
        from concurrent.futures import ThreadPoolExecutor

        self.sh(sprite, f"head -c {size} /dev/urandom > /tmp/stream")
        url = (self.srv.url.replace("http", "ws")
               + f"/v1/sprites/{sprite}/exec?cmd=cat&cmd=/tmp/stream&stdin=false")

        def one(_: int = 0) -> float:
            got = 0
            t = time.perf_counter()
            with ws_client.connect(url, additional_headers=self.srv.headers,
                                   max_size=None) as ws:
                for msg in ws:
                    if isinstance(msg, bytes) and msg[:1] == b"\x01":
                        got += len(msg) - 1
                    elif isinstance(msg, bytes) and msg[:1] == b"\x03":
                        break
            if got != size:
                raise RuntimeError(f"exec stream got {got} of {size} bytes")
            return size / 1e6 / (time.perf_counter() - t)

        rounds = max(3, SAMPLES // 2)
        self.record("exec stream over WebSocket, client defaults, 1 stream",
                    [one() for _ in range(rounds)], "MB/s")
        with ThreadPoolExecutor(4) as pool:
            each = [rate for _ in range(rounds) for rate in pool.map(one, range(4))]
        self.record("exec stream over WebSocket, client defaults, 4 at once (each)", each,
                    "MB/s")
        self.sh(sprite, "rm /tmp/stream")

    def sprite_url(self, requests: int = 1000, seconds: float = 5.0, clients: int = 4) -> None:
        """HTTP through the sprite URL against the same server reached directly.

        The server is busybox httpd on port 8080 in a fresh sprite, answering a 1 KB file
        (HTTP/1.0: it closes each connection). Direct: a socket the bench opens inside the
        sprite's network namespace, as the proxy does, one per request. Through the URL:
        the same request with `Host: NAME.localhost` and the bearer token to the server,
        on a keep-alive connection. Both use `http.client`: p50 of `requests` sequential
        requests, then requests/s of `clients` threads for `seconds`. Their ratio is the
        row the goal (≥ 0.7 of direct) is about."""
        import http.client
        import socket
        from concurrent.futures import ThreadPoolExecutor

        from wisp.network.dial import in_netns
        from wisp.network.links import netns_name

        name = self.name("url")
        self.create(name)
        self.sh(name, "mkdir -p /tmp/www && head -c 1024 /dev/zero | tr '\\0' x > "
                      "/tmp/www/f && setsid busybox httpd -p 127.0.0.1:8080 -h /tmp/www "
                      "</dev/null >/dev/null 2>&1 &")
        tag = hashlib.sha1(str((self.srv.data_dir / "run" / "sprites").resolve()).encode()
                           ).hexdigest()[:10]
        netns = Path("/run/netns") / netns_name(tag, self.sprite_id(name))
        url_host = f"{name}.localhost:{self.srv.port}"

        def direct() -> http.client.HTTPConnection:
            sock = in_netns(netns, lambda: socket.create_connection(("127.0.0.1", 8080)))
            conn = http.client.HTTPConnection("127.0.0.1", 8080)
            conn.sock = sock
            return conn

        def fetch(conn: http.client.HTTPConnection, headers: dict[str, str]) -> None:
            conn.request("GET", "/f", headers=headers)
            resp = conn.getresponse()
            if resp.status != 200 or len(resp.read()) != 1024:
                raise RuntimeError(f"sprite URL bench: status {resp.status}")

        def one_direct(conn: object = None) -> object:
            c = direct()
            fetch(c, {"Host": "127.0.0.1:8080"})
            c.close()
            return None

        def one_url(conn: http.client.HTTPConnection) -> http.client.HTTPConnection:
            fetch(conn, {"Host": url_host, **self.srv.headers})
            return conn

        def url_conn() -> http.client.HTTPConnection:
            return http.client.HTTPConnection("127.0.0.1", self.srv.port)

        one_url(url_conn())  # wakes nothing (it runs), but warms the server's pool
        for label, make, one in (("direct into the sprite", lambda: None, one_direct),
                                 ("through the sprite URL", url_conn, one_url)):
            conn = make()
            lat = []
            for _ in range(requests):
                t = time.perf_counter()
                one(conn)
                lat.append((time.perf_counter() - t) * 1000)
            self.record(f"HTTP GET 1 KB, {label}, latency", lat)

            def loop(_: int, make=make, one=one) -> int:  # type: ignore[no-untyped-def]
                c, n, end = make(), 0, time.perf_counter() + seconds
                while time.perf_counter() < end:
                    one(c)
                    n += 1
                return n

            with ThreadPoolExecutor(clients) as pool:
                rates = [sum(pool.map(loop, range(clients))) / seconds for _ in range(3)]
            self.record(f"HTTP GET 1 KB, {label}, {clients} clients", rates, "req/s")
        self.delete(name)

    def disk_space(self, size: int = 1_000_000_000, wait: float = 60.0) -> None:
        """Host disk MB per GB written in a fresh sprite, and per GB deleted there `wait`
        seconds after the delete, plus how long until the deleted space was back (to within
        100 MB per GB). Host usage is `du -x` of the data dir: chunk store, cache and
        staging, metadata. A first 8 MB write and delete comes before, so that the one-off
        rewrite of a new disk's ext4 metadata chunks (docs/storage.md) is not counted."""
        def host() -> int:
            # du exits 1 when a chunk file goes while it walks (JuiceFS deleting what a
            # compaction freed); its total is still right, so only the output counts
            out = subprocess.run(["du", "-sxB1", str(self.srv.data_dir)],
                                 capture_output=True, text=True).stdout
            return int(out.split()[0])

        name = self.name("space")
        self.create(name)
        self.sh(name, "head -c 8000000 /dev/urandom > /home/sprite/w && sync && "
                      "rm /home/sprite/w && sync")
        time.sleep(20)
        before = host()
        self.sh(name, f"head -c {size} /dev/urandom > /home/sprite/g && sync")
        time.sleep(5)
        self.record("host disk per GB written in a sprite", [(host() - before) / size * 1000],
                    "MB/GB")
        self.sh(name, "rm /home/sprite/g && sync")
        start = time.monotonic()
        back = float("inf")
        while time.monotonic() - start < wait:
            if back == float("inf") and host() - before <= size / 10:
                back = time.monotonic() - start
            time.sleep(1)
        self.record(f"host disk per GB deleted, {wait:.0f} s later",
                    [(host() - before) / size * 1000], "MB/GB")
        self.record("deleted space back on the host (≤ 100 MB/GB) after", [back], "s")
        self.delete(name)


def run(bench: Bench) -> dict[str, float]:
    b = bench
    # create -> first exec (the sprite starts on demand or in the background after create)
    samples, names = [], []
    for _ in range(SAMPLES):
        time.sleep(1)  # steady use: the warm pool refills between creates
        n = b.name("c")
        names.append(n)
        samples.append(b.timed(lambda n=n: (b.create(n), b.exec(n, "true"))))
    b.record("create → first exec (1 s apart)", samples)
    burst = []
    for _ in range(SAMPLES):
        n = b.name("c")
        names.append(n)
        burst.append(b.timed(lambda n=n: (b.create(n), b.exec(n, "true"))))
    b.record("create → first exec (back to back)", burst)
    # measure everything else on a quiet server: only the target sprite stays
    target = names[0]
    deletes = [b.timed(lambda n=n: b.delete(n)) for n in names[1:]]
    names = [target]
    time.sleep(3)

    samples = [b.timed(lambda: b.exec(target, "true")) for _ in range(SAMPLES * 3)]
    b.record("exec round trip (`true`)", samples)

    samples = [b.timed(lambda: b.checkpoint(target)) for _ in range(SAMPLES)]
    b.record("checkpoint, idle", samples)

    after100 = []
    for _ in range(SAMPLES):
        b.sh(target, "head -c 100000000 /dev/urandom > /home/sprite/f100")
        after100.append(b.timed(lambda: b.checkpoint(target)))
    b.record("checkpoint after 100 MB written", after100)

    cp = b.checkpoint(target)
    restores = [b.timed(lambda: b.restore(target, cp)) for _ in range(SAMPLES)]
    b.record("restore (100 MB on disk)", restores)

    # a restore after work that was never synced: the old disk's dirty pages are dropped
    dirty = []
    for _ in range(SAMPLES):
        b.sh(target, "head -c 30000000 /dev/urandom > /home/sprite/unsynced")
        dirty.append(b.timed(lambda: b.restore(target, cp)))
    b.record("restore after 30 MB unsynced writes", dirty)

    forks = []
    for i in range(SAMPLES):
        n = f"{target}-fork{i}"
        forks.append(b.timed(lambda n=n: b.http.post(f"/v1/sprites/{target}/fork",
                                                     json={"name": n}).raise_for_status()))
        names.append(n)
    b.record("fork (live state)", forks)

    deletes += [b.timed(lambda n=n: b.delete(n)) for n in names[1:]]
    b.record("delete", deletes)
    # after the checkpoint rows: its 100 MB file (written, then deleted) would otherwise be
    # flushed and reclaimed inside "checkpoint, idle"
    b.exec_stream(target)

    # disk write throughput inside a sprite vs raw JuiceFS on the same volume (1 GB, fsync)
    size_mb = 1000
    inside = []
    for _ in range(3):
        t = time.perf_counter()
        b.sh(target, f"dd if=/dev/zero of=/home/sprite/tp bs=1M count={size_mb} conv=fsync "
                     "2>/dev/null; rm /home/sprite/tp")
        inside.append(size_mb / (time.perf_counter() - t))
    b.record("write throughput inside sprite", inside, "MB/s")
    raw_dir = b.srv.data_dir / "mnt" / "bench-raw"
    raw_dir.mkdir(exist_ok=True)
    raw = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(["dd", "if=/dev/zero", f"of={raw_dir}/tp", "bs=1M", f"count={size_mb}",
                        "conv=fsync"], check=True, capture_output=True)
        raw.append(size_mb / (time.perf_counter() - t))
        (raw_dir / "tp").unlink()
    b.record("write throughput raw JuiceFS", raw, "MB/s")
    shutil.rmtree(raw_dir, ignore_errors=True)

    after1g = []
    for _ in range(3):
        b.sh(target, "head -c 1000000000 /dev/urandom > /home/sprite/f1g")
        after1g.append(b.timed(lambda: b.checkpoint(target)))
    b.record("checkpoint after 1 GB written", after1g)

    # A sprite holding ~1.1 GB that has settled (flushed): Wisp against the naive baseline
    # (checkpoint = copy the overlay upper dir out, restore = copy it back), same data.
    b.sh(target, "sync")
    settled_cp = [b.timed(lambda: b.checkpoint(target)) for _ in range(SAMPLES)]
    b.record("checkpoint, 1.1 GB on disk (settled)", settled_cp)
    cp = b.checkpoint(target)
    settled_rs = [b.timed(lambda: b.restore(target, cp)) for _ in range(SAMPLES)]
    b.record("restore, 1.1 GB on disk", settled_rs)
    upper = b.upper(target)
    store = b.srv.data_dir / "mnt" / "bench-naive"
    naive_cp, naive_rs = [], []
    for i in range(3):
        dst = store / str(i)

        def checkpoint_naive(dst: Path = dst) -> None:
            dst.mkdir(parents=True)
            subprocess.run(["cp", "-a", f"{upper}/.", str(dst)], check=True)
            subprocess.run(["sync", "-f", str(dst)], check=True)

        def restore_naive(dst: Path = dst) -> None:
            for child in upper.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            subprocess.run(["cp", "-a", f"{dst}/.", str(upper)], check=True)
            subprocess.run(["sync", "-f", str(upper)], check=True)

        naive_cp.append(b.timed(checkpoint_naive))
        naive_rs.append(b.timed(restore_naive))
    b.record("naive checkpoint (cp -a upper, 1.1 GB)", naive_cp)
    b.record("naive restore (cp -a back, 1.1 GB)", naive_rs)
    shutil.rmtree(store, ignore_errors=True)
    b.delete(target)
    b.sprite_url()
    b.disk_space()
    b.wake()
    b.density()
    return {
        "checkpoint_speedup": statistics.median(naive_cp) / statistics.median(settled_cp),
        "restore_speedup": statistics.median(naive_rs) / statistics.median(settled_rs),
    }


def host_facts() -> str:
    cgroup = "v2" if Path("/sys/fs/cgroup/cgroup.controllers").exists() else "v1 (hybrid)"
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"kernel {platform.release()}, {os.cpu_count()} CPUs ({cpu}), cgroup {cgroup}, "
            f"runtime: runc container (VM rows: QEMU microvm, accelerator in the label), "
            f"samples: {SAMPLES}")


def main() -> None:
    base = Path(os.environ.get("WISP_BENCH_DIR", "/var/tmp/wisp-bench"))
    if base.exists():
        shutil.rmtree(base)
    srv = WispServer(base / "data")
    srv.start()
    try:
        bench = Bench(srv)
        speedups = run(bench)
        from tests.performance import services

        services.run(bench, SAMPLES)
    finally:
        srv.stop()
    from tests.performance import network

    net_rows, net_lines = network.run(Bench, base, SAMPLES, no_network_create=bench.rows[0][1])
    from tests.performance import restart

    net_rows += restart.run(Bench, base, SAMPLES)
    from tests.performance import vm

    net_rows += vm.run(Bench, base, SAMPLES)
    print(f"\nHost: {host_facts()}\n")
    print("| metric | p50 | p95 | unit |\n|---|---|---|---|")
    for label, values, unit in bench.rows + net_rows:
        print(f"| {label} | {statistics.median(values):.1f} | {pct(values, 0.95):.1f} | {unit} |")
    print(f"\nWisp vs naive copy baseline (p50 ratio, same 1.1 GB sprite): checkpoint "
          f"{speedups['checkpoint_speedup']:.1f}x faster, restore "
          f"{speedups['restore_speedup']:.1f}x faster")
    for line in net_lines:
        print(line)
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
