"""Parsing of exec request parameters: query strings, signal names and durations.

The SDKs disagree on spelling (contract §2.9, §3.1): signals come as `TERM`, `SIGTERM`,
`sigterm` or `15`; durations as Go strings (`10s`, `1.5s`, `500ms`, `1m30s`) or bare
seconds (`10`, `2.5`). One lenient parser for each, raising `BadRequest` on anything else.
"""

from __future__ import annotations

import re
import signal as _signal
from typing import Protocol

from wisp.errors import BadRequest
from wisp.exec.sessions import ExecSpec

__all__ = [
    "parse_signal", "signal_name", "parse_duration", "parse_env", "parse_exec_query", "QueryLike",
]

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


class QueryLike(Protocol):
    """What `parse_exec_query` needs of Starlette's `QueryParams` (get + getlist)."""

    def get(self, key: str, /) -> str | None: ...

    def getlist(self, key: str) -> list[str]: ...


def parse_signal(value: str | int | None, default: str = "SIGTERM") -> int:
    """Signal number from a name with or without `SIG` (any case) or a number."""
    if value is None or value == "":
        value = default
    if isinstance(value, bool):
        raise BadRequest(f"invalid signal {value!r}")
    if isinstance(value, int):
        num = value
    else:
        text = str(value).strip()
        if text.isascii() and text.isdigit():  # str.isdigit() is true of "²" too
            num = int(text)
        else:
            name = text.upper()
            if not name.startswith("SIG"):
                name = "SIG" + name
            try:
                num = int(_signal.Signals[name])
            except KeyError:
                raise BadRequest(f"invalid signal {value!r}") from None
    if not 1 <= num < _signal.NSIG:
        raise BadRequest(f"invalid signal {value!r}")
    return num


def signal_name(num: int) -> str:
    try:
        return _signal.Signals(num).name
    except ValueError:
        return f"SIG{num}"


def parse_duration(value: str | int | float | None, default: float) -> float:
    """Seconds from a Go duration string or a bare number of seconds."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise BadRequest(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # a JSON integer past a float's range
            raise BadRequest(f"invalid duration {value!r}") from None
    else:
        text = str(value).strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text)
        else:
            pos, seconds = 0, 0.0
            for m in _DURATION_PART.finditer(text):
                if m.start() != pos:
                    break
                seconds += float(m.group(1)) * _UNITS[m.group(2)]
                pos = m.end()
            if pos != len(text) or not text:
                raise BadRequest(f"invalid duration {value!r}")
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise BadRequest(f"invalid duration {value!r}")
    return seconds


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    low = value.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", ""):
        return False
    raise BadRequest(f"invalid boolean {value!r}")


def _size(value: str | None, name: str) -> int:
    if value is None or value == "":
        return 24 if name == "rows" else 80
    try:
        n = int(value)
    except ValueError:
        raise BadRequest(f"invalid {name} {value!r}") from None
    if not 1 <= n <= 65535:
        raise BadRequest(f"{name} must be between 1 and 65535")
    return n


def parse_env(entries: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for entry in entries:
        key, sep, val = entry.partition("=")
        if not sep or not key:
            raise BadRequest(f"invalid env entry {entry!r}: expected KEY=VALUE")
        env[key] = val
    return env


def parse_exec_query(q: QueryLike, *, force_tty: bool | None = None) -> ExecSpec:
    """An `ExecSpec` from the exec query (contract §3.1): cmd, path, env, dir, tty, rows,
    cols, stdin, max_run_after_disconnect; `cc` and `detachable` are accepted and ignored."""
    argv = tuple(q.getlist("cmd"))
    path = q.get("path") or None
    if not argv:
        argv = (path or "bash",)
    if not (path or argv[0]):
        raise BadRequest("the program to run is empty: give cmd (or path) a name")
    tty = _bool(q.get("tty")) or False
    if force_tty is not None:
        tty = force_tty
    stdin = _bool(q.get("stdin"))
    limit = q.get("max_run_after_disconnect")
    return ExecSpec(
        argv=argv,
        path=path,
        env=parse_env(q.getlist("env")),
        cwd=q.get("dir") or None,
        tty=tty,
        rows=_size(q.get("rows"), "rows"),
        cols=_size(q.get("cols"), "cols"),
        stdin=True if stdin is None else stdin,
        max_run_after_disconnect=parse_duration(limit, 0.0) if limit else None,
    )
