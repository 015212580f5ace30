"""The network rows of `make bench`, on a server whose uplink is the tests' fake internet
(tests/framework/internet.py: nothing leaves the machine).

* create → first exec with networking (veth, address, firewall, resolver) against the same
  on the main server (`uplink = "none"`): the cost of networking on create;
* DNS through Wisp's resolver with an egress policy (an allowed name: its answer goes into
  the sprite's allow set before the reply), repeated and always-new names, against the
  same queries sent straight to the upstream from the host: the resolver's added latency;
* TCP throughput sprite → test host through veth and NAT against host loopback, and
  against the host's own path to that test host (which crosses the test host's veth too:
  loopback has a 64 KB MTU and no hop, the test host is behind a 1500-byte veth);
* a policy change until a live connection to a newly denied address is cut.

The probes run in the bench process, with sockets made inside the sprite's network
namespace (`wisp.network.dial.in_netns`): they take the sprite's own path (its veth, the
firewall, the NAT) without an exec's overhead in the numbers.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from dnslib import DNSRecord

from tests.framework.internet import Internet
from tests.framework.server import WispServer
from wisp.network.dial import in_netns

SINK = r"""
import socket, sys, threading
def serve(c):
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    c.sendall(str(n).encode()); c.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
SINK_PORT = 5001


def _netns(sprite_id: str) -> Path:
    short = sprite_id.removeprefix("sprite-")[:24]
    for path in Path("/run/netns").iterdir():
        if path.name.startswith("wisp-") and path.name.endswith(short):
            return path
    raise RuntimeError(f"no network namespace for {sprite_id}")


def _sock(netns: Path, kind: int) -> socket.socket:
    return in_netns(netns, lambda: socket.socket(socket.AF_INET, kind))


def _gateway(netns: Path) -> str:
    out = subprocess.run(["ip", "-n", netns.name, "-4", "-o", "route", "show", "default"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[2]


def _query(sock: socket.socket, server: str, name: str) -> float:
    data = DNSRecord.question(name).pack()
    t = time.perf_counter()
    sock.sendto(data, (server, 53))
    reply = DNSRecord.parse(sock.recv(4096))
    ms = (time.perf_counter() - t) * 1000
    if reply.header.rcode != 0 or not reply.rr:
        raise RuntimeError(f"{name}: {reply}")
    return ms


def _send(sock: socket.socket, addr: tuple[str, int], size: int) -> float:
    """MB/s of `size` bytes sent to a sink, until it has counted them all."""
    chunk = b"\0" * (1 << 20)
    sock.settimeout(60)
    t = time.perf_counter()
    sock.connect(addr)
    sent = 0
    while sent < size:
        sock.sendall(chunk)
        sent += len(chunk)
    sock.shutdown(socket.SHUT_WR)
    got = int(sock.recv(64))
    rate = size / 1e6 / (time.perf_counter() - t)
    sock.close()
    if got != sent:
        raise RuntimeError(f"sink counted {got} of {sent} bytes")
    return rate


def run(bench_cls: type, base: Path, samples: int, no_network_create: list[float]
        ) -> tuple[list[tuple[str, list[float], str]], list[str]]:
    """Rows for the main table, and summary lines."""
    net = Internet()
    net.start()
    sinks = [subprocess.Popen(["ip", "netns", "exec", net.netns, sys.executable, "-c", SINK,
                               "0.0.0.0", str(SINK_PORT)]),
             subprocess.Popen([sys.executable, "-c", SINK, "127.0.0.1", str(SINK_PORT)])]
    srv = WispServer(base / "net", extra_env={"WISP_UPLINK": net.uplink,
                                              "WISP_DNS_UPSTREAM": net.GATEWAY})
    srv.start()
    try:
        b = bench_cls(srv)
        creates = []
        for _ in range(samples):
            time.sleep(1)
            n = b.name("nc")
            creates.append(b.timed(lambda n=n: (b.create(n), b.exec(n, "true"))))
            b.delete(n)
        b.record("create → first exec (1 s apart), with network", creates)

        b.create("netb")
        b.exec("netb", "true")
        netns = _netns(b.sprite_id("netb"))
        gw = _gateway(netns)
        b.http.post("/v1/sprites/netb/policy/network", json={"rules": [
            {"domain": "web.test", "action": "allow"},
            {"domain": "*.u.test", "action": "allow"}]}).raise_for_status()
        udp_in, udp_host = _sock(netns, socket.SOCK_DGRAM), socket.socket(
            socket.AF_INET, socket.SOCK_DGRAM)
        for s in (udp_in, udp_host):
            s.settimeout(5)
        rounds = max(200, samples * 20)
        via_rep, direct_rep, via_new, direct_new = [], [], [], []
        for i in range(rounds):  # interleaved: both see the same machine load
            via_rep.append(_query(udp_in, gw, "web.test"))
            direct_rep.append(_query(udp_host, net.GATEWAY, "web.test"))
            via_new.append(_query(udp_in, gw, f"v{i}.u.test"))
            direct_new.append(_query(udp_host, net.GATEWAY, f"d{i}.u.test"))
        b.record("DNS via Wisp, allowed name, repeated", via_rep)
        b.record("DNS direct to upstream, repeated", direct_rep)
        b.record("DNS via Wisp, allowed name, new each time", via_new)
        b.record("DNS direct to upstream, new each time", direct_new)

        def pct(v: list[float], q: float) -> float:
            o = sorted(v)
            return o[min(len(o) - 1, round(q * (len(o) - 1)))]

        lines = []
        for label, via, direct in (("repeated name", via_rep, direct_rep),
                                   ("new name each time", via_new, direct_new)):
            lines.append(f"Resolver added latency, allowed name, {label}: p50 "
                         f"+{pct(via, .5) - pct(direct, .5):.2f} ms, p99 "
                         f"+{pct(via, .99) - pct(direct, .99):.2f} ms")

        b.http.post("/v1/sprites/netb/policy/network",
                    json={"rules": []}).raise_for_status()
        size = 1_000_000_000
        through, loop, host = [], [], []
        for _ in range(5):
            through.append(_send(_sock(netns, socket.SOCK_STREAM), (net.PUBLIC, SINK_PORT),
                                 size))
            loop.append(_send(socket.socket(), ("127.0.0.1", SINK_PORT), size))
            host.append(_send(socket.socket(), (net.PUBLIC, SINK_PORT), size))
        b.record("TCP sprite → test host (veth + NAT), 1 GB", through, "MB/s")
        b.record("TCP host loopback, 1 GB", loop, "MB/s")
        b.record("TCP host → test host (its veth only), 1 GB", host, "MB/s")
        lines.append(f"TCP throughput sprite → test host vs host loopback: "
                     f"{statistics.median(through) / statistics.median(loop):.2f}x; vs the "
                     f"host's own path to the same test host: "
                     f"{statistics.median(through) / statistics.median(host):.2f}x")

        cuts = []
        for _ in range(samples):
            b.http.post("/v1/sprites/netb/policy/network", json={"rules": [
                {"domain": "web.test", "action": "allow"}]}).raise_for_status()
            _query(udp_in, gw, "web.test")
            conn = _sock(netns, socket.SOCK_STREAM)
            conn.settimeout(10)
            conn.connect((net.PUBLIC, net.PORT))
            conn.sendall(b"GET /drip HTTP/1.0\r\n\r\n")
            conn.recv(4096)
            t = time.perf_counter()
            b.http.post("/v1/sprites/netb/policy/network", json={"rules": [
                {"domain": "other.test", "action": "allow"}]}).raise_for_status()
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass
            cuts.append((time.perf_counter() - t) * 1000)
            conn.close()
        b.record("policy change → live connection to a denied address cut", cuts)
        udp_in.close()
        udp_host.close()
        b.delete("netb")
        lines.append(f"Networking's cost on create → first exec (1 s apart): p50 "
                     f"{statistics.median(creates):.1f} ms with, "
                     f"{statistics.median(no_network_create):.1f} ms without")
    finally:
        srv.stop()
        for p in sinks:
            p.kill()
            p.wait()
        leaked = net.leaked()
        net.stop()
    if leaked:
        raise RuntimeError(f"{leaked} packets from sprites tried to leave by the real uplink")
    return b.rows, lines
