"""Ending the helper processes tests start (servers, Redis): politely, then for sure."""

from __future__ import annotations

import signal
import subprocess

__all__ = ["stop"]


def stop(proc: subprocess.Popen[bytes], grace: float = 10) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
