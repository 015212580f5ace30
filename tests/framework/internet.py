"""A fake internet inside network namespaces the test builds, so no packet leaves the host.

    host ── <uplink> ═══ veth ═══ inet0 ── [netns "wti-<n>"]
            198.51.100.254/24     198.51.100.1/24   an HTTP server on port 8080 of every
                                                    address: 198.51.100.1, 203.0.113.1-4,
                                                    10.99.0.1, 169.254.169.254 (lo);
                                                    authoritative DNS on 198.51.100.1:53
                                                    for web.test (203.0.113.1), www.web.test
                                                    (CNAME web.test), other.test (.2),
                                                    api.web.test (.3), pypi.org (.4),
                                                    private.test (10.99.0.1) and any
                                                    name under u.test (.1)

The host end is the uplink handed to Wisp (`WISP_UPLINK`). 203.0.113.0/24 (a public-style
test range), 10.99.0.0/16 (private) and 169.254.169.254 (cloud metadata) are routed to the
namespace through it, so a sprite that reached a private or metadata address would get an
answer: only Wisp's rules stop it. A guard table counts (and drops) every packet from a
sprite subnet that would leave by any other interface than the uplink, a sprite veth or
loopback: `leaked()` must stay 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["Internet", "sh", "fetch", "address", "gateway", "host_veth", "curl", "curl_ip",
           "lookup"]

#: One server for every address of the namespace. GET / names the address it was reached
#: on and the client's; GET /drip sends a line every 0.1 s for 30 s (a live connection).
HTTP_SERVER = r"""
import http.server, socketserver, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        here = self.request.getsockname()[0]
        if self.path == "/drip":
            self.send_response(200); self.end_headers()
            for i in range(300):
                self.wfile.write(f"drip {i}\n".encode()); self.wfile.flush(); time.sleep(0.1)
            return
        body = f"hello from {here} to {self.client_address[0]}\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


#: The fake internet's authoritative DNS for the zone `test.` (on the gateway, port 53).
DNS_SERVER = r"""
import socket, socketserver, struct, sys
from dnslib import A, CNAME, QTYPE, RCODE, RR, DNSRecord
ZONE = {"web.test.": ("A", "203.0.113.1"), "www.web.test.": ("CNAME", "web.test."),
        "api.web.test.": ("A", "203.0.113.3"), "other.test.": ("A", "203.0.113.2"),
        "pypi.org.": ("A", "203.0.113.4"), "private.test.": ("A", "10.99.0.1")}
def answer(data):
    q = DNSRecord.parse(data); r = q.reply(); name = str(q.q.qname).lower()
    if name.endswith(".u.test.") and q.q.qtype == QTYPE.A:  # any name: lookups never cached
        r.add_answer(RR(name, QTYPE.A, ttl=60, rdata=A("203.0.113.1"))); return r.pack()
    if name not in ZONE:
        r.header.rcode = RCODE.NXDOMAIN; return r.pack()
    while name in ZONE:
        kind, value = ZONE[name]
        if kind == "CNAME":
            r.add_answer(RR(name, QTYPE.CNAME, ttl=60, rdata=CNAME(value))); name = value
        else:
            if q.q.qtype == QTYPE.A:
                r.add_answer(RR(name, QTYPE.A, ttl=60, rdata=A(value)))
            break
    return r.pack()
class U(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request; sock.sendto(answer(data), self.client_address)
class T(socketserver.BaseRequestHandler):
    def handle(self):
        n = struct.unpack("!H", self.request.recv(2))[0]; data = b""
        while len(data) < n: data += self.request.recv(n - len(data))
        out = answer(data); self.request.sendall(struct.pack("!H", len(out)) + out)
import threading
socketserver.ThreadingUDPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.allow_reuse_address = True
t = socketserver.ThreadingTCPServer((sys.argv[1], 53), T)
threading.Thread(target=t.serve_forever, daemon=True).start()
socketserver.ThreadingUDPServer((sys.argv[1], 53), U).serve_forever()
"""


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=30)


class Internet:
    PORT = 8080
    GATEWAY = "198.51.100.1"
    UPLINK_ADDR = "198.51.100.254"
    PUBLIC = "203.0.113.1"      # web.test, www.web.test (CNAME)
    OTHER = "203.0.113.2"       # other.test
    API = "203.0.113.3"         # api.web.test
    PYPI = "203.0.113.4"        # pypi.org (in the `defaults` preset)
    PRIVATE = "10.99.0.1"
    METADATA = "169.254.169.254"
    PUBLICS = (PUBLIC, OTHER, API, PYPI)

    def __init__(self) -> None:
        n = os.getpid() % 100000
        self.netns = f"wti-{n}"
        self.uplink = f"wtu{n}"
        self.guard = f"wtguard_{n}"
        self.servers: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.stop()
        # one fake internet per host at a time: its routes would shadow another's
        taken = subprocess.run(["ip", "-4", "route", "show", "to", "match", self.GATEWAY],
                               capture_output=True, text=True, check=True).stdout
        taken += subprocess.run(["ip", "-4", "route", "show", "to", "match", self.PUBLIC],
                                capture_output=True, text=True, check=True).stdout
        if any(not line.startswith("default") for line in taken.splitlines()):
            raise RuntimeError(f"the test addresses are routed already (another test run?):"
                               f"\n{taken}")
        _ip("netns", "add", self.netns)
        _ip("link", "set", "lo", "up", netns=self.netns)
        _ip("link", "add", self.uplink, "type", "veth", "peer", "name", "inet0", "netns",
            self.netns)
        _ip("addr", "add", f"{self.UPLINK_ADDR}/24", "dev", self.uplink)
        _ip("link", "set", self.uplink, "up")
        _ip("addr", "add", f"{self.GATEWAY}/24", "dev", "inet0", netns=self.netns)
        _ip("link", "set", "inet0", "up", netns=self.netns)
        for addr in (*self.PUBLICS, self.PRIVATE, self.METADATA):
            _ip("addr", "add", f"{addr}/32", "dev", "lo", netns=self.netns)
        _ip("route", "add", "default", "via", self.UPLINK_ADDR, netns=self.netns)
        for net in ("203.0.113.0/24", "10.99.0.0/16", f"{self.METADATA}/32"):
            _ip("route", "add", net, "via", self.GATEWAY, "dev", self.uplink)
        subprocess.run(["nft", "-f", "-"], check=True, capture_output=True, timeout=30,
                       input=f"""table inet {self.guard} {{
    chain post {{
        type filter hook postrouting priority -400; policy accept;
        oifname {{ "lo", "{self.uplink}" }} return
        oifname "w*" return
        ip saddr 10.0.0.0/8 counter drop
    }}
}}
""".encode())
        self.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", DNS_SERVER,
             self.GATEWAY], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.servers.append(subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", HTTP_SERVER,
             str(self.PORT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 10
        for addr in (self.GATEWAY, *self.PUBLICS, self.PRIVATE, self.METADATA):
            while subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c",
                                  f"import socket; socket.create_connection(('{addr}', "
                                  f"{self.PORT}), 1)"], capture_output=True).returncode:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"test HTTP server on {addr} did not start")
                time.sleep(0.05)

    def leaked(self) -> int:
        """Packets from a sprite subnet that tried to leave by another interface."""
        out = subprocess.run(["nft", "list", "table", "inet", self.guard], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        for line in out.splitlines():
            if "counter packets" in line:
                return int(line.split("counter packets")[1].split()[0])
        raise RuntimeError("the guard's counter is missing")

    def stop(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
        self.servers.clear()
        subprocess.run(["nft", "delete", "table", "inet", self.guard], capture_output=True)
        if Path("/sys/class/net", self.uplink).exists():
            subprocess.run(["ip", "link", "delete", self.uplink], capture_output=True)
        if Path("/run/netns", self.netns).exists():
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True)


# -- probes run inside a sprite (busybox tools) ------------------------------------------
def sh(sprite, script: str) -> str:  # type: ignore[no-untyped-def]
    return sprite.command("sh", "-c", script).output().decode()


def fetch(sprite, addr: str) -> str:  # type: ignore[no-untyped-def]
    """The body of GET / on the test servers' port, or "FAILED\n" when no connection could
    be made within 2 s, or no answer within 5 s (raw HTTP over busybox nc: the static
    busybox's wget crashes)."""
    out = sh(sprite, f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 5 nc -w 2 {addr} "
                     f"{Internet.PORT} 2>/dev/null || echo FAILED")
    return out.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in out else out


def address(sprite) -> str:  # type: ignore[no-untyped-def]
    out = sh(sprite, "ip -4 -o addr show dev eth0")
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/31", out)
    assert m, out
    return m.group(1)


def gateway(sprite) -> str:  # type: ignore[no-untyped-def]
    out = sh(sprite, "ip -4 route show default")
    m = re.search(r"default via (\d+\.\d+\.\d+\.\d+)", out)
    assert m, out
    return m.group(1)


def host_veth(sprite) -> str | None:  # type: ignore[no-untyped-def]
    """The host-side name of the sprite's eth0 (`eth0@ifN`: N is the host's ifindex)."""
    m = re.search(r"eth0@if(\d+)", sh(sprite, "ip -o link show dev eth0"))
    assert m
    for d in Path("/sys/class/net").iterdir():
        if (d / "ifindex").read_text().strip() == m.group(1):
            return d.name
    return None


# -- probes for the Debian image (curl, python3) --------------------------------------
#: The rcode of a lookup of argv[1] (any resolver in argv[2], else resolv.conf's), and
#: with NOERROR its first address (through the C library, as programs resolve).
DIG = r"""
import socket, struct, sys
name = sys.argv[1]
server = sys.argv[2] if len(sys.argv) > 2 else open("/etc/resolv.conf").read().split()[1]
q = struct.pack("!6H", 0x1234, 0x0100, 1, 0, 0, 0) + b"".join(
    bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!2H", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.sendto(q, (server, 53)); rcode = s.recv(4096)[3] & 15
if rcode:
    print({3: "NXDOMAIN", 5: "REFUSED", 2: "SERVFAIL"}.get(rcode, rcode))
else:
    print(socket.gethostbyname(name))
"""


def curl_ip(sprite, addr: str) -> str:  # type: ignore[no-untyped-def]
    """GET / of a test host by address: its body, or "FAILED\n"."""
    out = curl(sprite, f"http://{addr}:{Internet.PORT}/")
    return "FAILED\n" if out.startswith("exit ") else out


def lookup(sprite, name: str, server: str = "") -> str:  # type: ignore[no-untyped-def]
    """The address `name` resolves to in the sprite, or REFUSED / NXDOMAIN / SERVFAIL."""
    return sh(sprite, f"python3 -c '{DIG}' {name} {server} 2>&1").strip()


def curl(sprite, url: str) -> str:  # type: ignore[no-untyped-def]
    """The body, or `exit N` (6: name not resolved, 7: refused/reset, 28: timed out)."""
    out = sh(sprite, f"curl -sS --connect-timeout 2 -m 4 {url} 2>/dev/null; echo \"exit $?\"")
    body, _, code = out.rpartition("exit ")
    return body if code.strip() == "0" else f"exit {code.strip()}"
