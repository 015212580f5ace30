"""Exec: running commands in sprites, detachable sessions, and the Sprites exec API.

`exec_routes(resolve, registry)` gives the Starlette routes; `SessionRegistry` owns every
session and is what the rest of the server calls (`close_sprite`, `active`, `close_all`).
"""

from __future__ import annotations

from wisp.exec.routes import Resolve, exec_routes
from wisp.exec.sessions import ExecSpec, Session, SessionRegistry

__all__ = ["exec_routes", "Resolve", "SessionRegistry", "Session", "ExecSpec"]
