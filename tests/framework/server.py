"""A real `wisp serve` process for tests: start, stop (SIGTERM), kill (SIGKILL), restart.

Tests reach it only through its public API: the official SDK, raw HTTP, or the CLI.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.framework import processes
from tests.framework.openapi import contract

REPO = Path(__file__).resolve().parents[2]
#: Base images are built once per machine and shared by every test server.
IMAGES_DIR = Path(os.environ.get("WISP_TEST_IMAGES", "/var/cache/wisp-test/images"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WispServer:
    def __init__(self, data_dir: Path, image: str = "busybox", token: str = "test-token",
                 config_file: Path | None = None, extra_env: dict[str, str] | None = None,
                 stop_sprites: bool = True):
        self.data_dir = data_dir
        self.image = image
        self.token = token
        self.config_file = config_file
        self.port = free_port()
        self.extra_env = extra_env or {}
        #: True (tests' default): a stop ends every sprite, a start clears what a killed
        #: server left, so each test's leak check sees the host as it was. False: the
        #: product's default, sprites outlive the server (tests/functional/test_adoption.py).
        self.stop_sprites = stop_sprites
        #: With True the server generates its own token; read it from `<data>/token`.
        self.generated_token = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / f"{data_dir.name}.server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("WISP_TOKEN", None)
        if not self.generated_token:
            env["WISP_TOKEN"] = self.token
        # WISP_UPLINK=none: no test sprite reaches the machine's real uplink; network tests
        # give their own (tests/framework/internet.py)
        env.update({"WISP_IMAGE": self.image,
                    "WISP_IMAGES_DIR": str(IMAGES_DIR), "WISP_NO_CLIENT_CONFIG": "1",
                    "WISP_UPLINK": "none", "PYTHONPATH": str(REPO),
                    "WISP_STOP_SPRITES": "1" if self.stop_sprites else "0"})
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 900, poll: float = 0.1) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        code = ("import sys; from pathlib import Path; from wisp.server import serve; "
                "serve(Path(sys.argv[1]), sys.argv[2], "
                "Path(sys.argv[3]) if len(sys.argv) > 3 else None)")
        args = [sys.executable, "-c", code, str(self.data_dir), f"127.0.0.1:{self.port}"]
        if self.config_file is not None:
            args.append(str(self.config_file))
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(args, env=self.env(), stdout=logf, stderr=logf,
                                     stdin=subprocess.DEVNULL, cwd=REPO)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wisp serve exited {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            if self.generated_token and (self.data_dir / "token").exists():
                self.token = (self.data_dir / "token").read_text().strip()
            try:
                r = httpx.get(f"{self.url}/v1/sprites", headers=self.headers, timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        self.kill()
        raise RuntimeError("wisp serve did not become ready:\n" + self.log.read_text()[-3000:])

    def stop(self, timeout: float = 120) -> None:
        if self.proc is None:
            return
        processes.stop(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs; what it leaves is for the next start to clean."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.port = free_port()
        self.start()

    def api(self, method: str, path: str, headers: dict[str, str] | None = None, *,
            validate_request: bool = True, **kw: object) -> httpx.Response:
        """One HTTP call, its request and its response checked against the API document
        (tests/framework/openapi.py); a mismatch raises `ContractViolation`. A test that
        sends a malformed request on purpose passes `validate_request=False`: its response
        is still checked."""
        http = _client()
        request = http.build_request(method, self.url + path,
                                     headers={**self.headers, **(headers or {})},
                                     **kw)  # type: ignore[arg-type]
        if validate_request:
            contract().check_request(request)
        response = http.send(request)
        contract().check_response(request, response)
        return response


@functools.cache
def _client() -> httpx.Client:
    """One client for every call (making one costs ~30 ms of TLS set-up); no keep-alive,
    so a call never lands on a connection of a server that was stopped since."""
    return httpx.Client(timeout=120, limits=httpx.Limits(max_keepalive_connections=0))
