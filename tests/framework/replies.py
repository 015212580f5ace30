"""The audit of every error reply the suite provoked: no host path, no traceback.

Each test server logs every error reply it sends, as the client got it (`wisp.replies`:
bodies of 4xx/5xx responses, NDJSON `error` lines, refused WebSocket handshakes, WebSocket
closes). After the session, every such line of every server log under the test base dir is
checked for what must never reach a client: the host paths the servers used (data dirs,
the repository, the shared images, the venv, /run/wisp, cgroupfs) and Python tracebacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.framework.server import IMAGES_DIR, REPO

MARKER = " wisp.replies: "


def forbidden(base: Path) -> list[str]:
    """Strings no reply may contain."""
    return [os.path.realpath(base), str(REPO), os.path.realpath(IMAGES_DIR), sys.prefix,
            "/run/wisp", "/sys/fs/cgroup", "/var/lib/wisp", "Traceback", 'File "']


def server_logs(base: Path) -> list[Path]:
    logs = list(base.glob("*.server.log"))
    for d in base.iterdir() if base.is_dir() else ():
        if d.is_dir() and not os.path.ismount(d):
            logs += d.glob("*.server.log")
    return sorted(logs)


def audit(base: Path) -> tuple[int, list[str]]:
    """(error replies seen, the offending log lines)."""
    bad = forbidden(base)
    seen, offending = 0, []
    for log in server_logs(base):
        for line in log.read_text(errors="replace").splitlines():
            if MARKER not in line:
                continue
            seen += 1
            reply = line.split(MARKER, 1)[1]
            if any(b in reply for b in bad):
                offending.append(f"{log.name}: {reply[:300]}")
    return seen, offending
