"""Idle sleep: when a running sprite goes warm, then cold, and what keeps it awake.

Why a sprite sleeps: a frozen sprite costs only its pages, a cold one nothing but its
record, and any call that needs it wakes it (docs/lifecycle.md). What counts as activity,
decided with the contract's §5.6 and the Sprites docs: every call that needs the sprite
(exec, fs, checkpoints, policy, proxied connections: they all go through
`Sprites.handle`), a connection held open into it (`Activity.hold`), a running exec
session (attached or detached: "a short script: just run it"), and a live task — a
named keep-awake hold with an expiry, set through the API or from inside the sprite by a
file in `/run/sprite/tasks/` (docs/lifecycle.md, "Tasks").

The decision runs on one loop per server (`Sleeper`); the transitions themselves are the
sprite state machine's (`Sprites.sleep`), under the sprite's lock, which re-checks that
nothing happened since the decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from wisp.errors import BadRequest, NotFound

if TYPE_CHECKING:
    from wisp.sprites import Sprites

__all__ = ["Activity", "Sleeper", "Task", "TASKS_DIR", "MAX_TASK_SECONDS", "parse_ttl",
           "read_task_files", "validate_task_name"]

log = logging.getLogger("wisp.lifecycle")

#: Inside every sprite: a small tmpfs where any process may hold the sprite awake with a
#: file named after its task, holding how long the hold lasts from the file's last write.
TASKS_DIR = "/run/sprite/tasks"
#: A task lasts at most an hour per write (as Sprites' tasks do): a forgotten one expires;
#: longer work renews it.
MAX_TASK_SECONDS = 3600.0
#: Task files read per sprite at most; more are ignored.
MAX_TASK_FILES = 256

TASK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def validate_task_name(name: str) -> str:
    if not TASK_NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid task name {name!r}: use 1-64 letters, digits, '.', '_' "
                         "or '-', starting with a letter or digit")
    return name


def parse_ttl(value: object) -> float:
    """A task's duration: seconds as a number, or a string like `90`, `500ms`, `30s`,
    `10m`, `1h`; more than 0 and at most an hour."""
    if isinstance(value, bool):
        raise BadRequest("ttl must be a number of seconds or a duration like '10m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise BadRequest("ttl must be a number of seconds or a duration like '10m'")
    if not 0 < seconds <= MAX_TASK_SECONDS:
        raise BadRequest(f"ttl must be more than 0 and at most {int(MAX_TASK_SECONDS)} "
                         "seconds (renew a task to hold longer)")
    return seconds


@dataclass(frozen=True)
class Task:
    name: str
    expires_at: float  # Unix time
    source: str  # "api" or "sprite"


def read_task_files(root: Path, directory: str = TASKS_DIR) -> list[Task]:
    """The live tasks a sprite's processes hold through files in `directory` under the
    sprite's root as the host sees it (`/proc/PID/root`). Every component is opened
    without following links (an absolute link in a sprite would resolve against the
    host's root), only regular files count, and a file whose content is not a duration is
    ignored."""
    tasks: list[Task] = []
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return tasks
    try:
        for part in [p for p in directory.split("/") if p]:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        names = [n for n in os.listdir(fd)[:MAX_TASK_FILES] if TASK_NAME_RE.fullmatch(n)]
        now = time.time()
        for name in names:
            task = _read_task(fd, name)
            if task is not None and task.expires_at > now:
                tasks.append(task)
    except OSError:
        pass
    finally:
        os.close(fd)
    return tasks


def _read_task(dir_fd: int, name: str) -> Task | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        text = os.read(fd, 64).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        seconds = parse_ttl(text.strip() or "0")
    except BadRequest:
        return None
    return Task(name, st.st_mtime + seconds, "sprite")


class Activity:
    """When each sprite was last used, what holds it open, and its API tasks.

    Times are monotonic; only task expiries are wall-clock (they are shown to clients).
    With `state_dir`, each sprite's API tasks are also kept in `<state_dir>/<id>.json`, so
    that a server adopting the sprite after a restart (`load`) keeps holding it.
    """

    def __init__(self, state_dir: Path | None = None) -> None:
        self._last: dict[str, float] = {}
        self._holds: dict[str, int] = {}
        self._tasks: dict[str, dict[str, float]] = {}
        self.state_dir = state_dir

    def touch(self, sprite_id: str) -> None:
        self._last[sprite_id] = time.monotonic()

    def idle_for(self, sprite_id: str) -> float:
        """Seconds since the sprite's last activity (0 while a connection holds it)."""
        if self._holds.get(sprite_id):
            return 0.0
        last = self._last.get(sprite_id)
        if last is None:
            self.touch(sprite_id)
            return 0.0
        return time.monotonic() - last

    @contextlib.contextmanager
    def hold(self, sprite_id: str) -> Iterator[None]:
        """Activity for as long as the block runs (a proxied connection, say)."""
        self._holds[sprite_id] = self._holds.get(sprite_id, 0) + 1
        self.touch(sprite_id)
        try:
            yield
        finally:
            left = self._holds.get(sprite_id, 1) - 1
            if left > 0:
                self._holds[sprite_id] = left
            else:
                self._holds.pop(sprite_id, None)
            self.touch(sprite_id)

    # -- tasks set through the API ---------------------------------------------------------
    def set_task(self, sprite_id: str, name: str, seconds: float) -> Task:
        expires = time.time() + seconds
        self._tasks.setdefault(sprite_id, {})[name] = expires
        self.touch(sprite_id)
        self._save(sprite_id)
        return Task(name, expires, "api")

    def tasks(self, sprite_id: str) -> list[Task]:
        """Live API tasks; expired ones are dropped as they are found."""
        held = self._tasks.get(sprite_id)
        if not held:
            return []
        now = time.time()
        for name in [n for n, t in held.items() if t <= now]:
            del held[name]
        return [Task(n, t, "api") for n, t in sorted(held.items())]

    def drop_task(self, sprite_id: str, name: str) -> None:
        held = self._tasks.get(sprite_id, {})
        if held.pop(name, None) is None:
            raise NotFound(f"task '{name}' not found")
        self.touch(sprite_id)
        self._save(sprite_id)

    def forget(self, sprite_id: str) -> None:
        """The sprite went cold or was deleted: its run, and the holds on it, are over."""
        self._tasks.pop(sprite_id, None)
        self._last.pop(sprite_id, None)
        if self.state_dir is not None:
            (self.state_dir / f"{sprite_id}.json").unlink(missing_ok=True)

    def load(self, sprite_id: str) -> None:
        """Take back the API tasks an earlier server process held for this (adopted)
        sprite; a missing or unreadable file holds none."""
        if self.state_dir is None:
            return
        try:
            saved = json.loads((self.state_dir / f"{sprite_id}.json").read_text())
            held = {str(n): float(t) for n, t in saved.items() if TASK_NAME_RE.fullmatch(n)}
        except (OSError, ValueError, TypeError, AttributeError):
            return
        now = time.time()
        live = {n: t for n, t in held.items() if now < t <= now + MAX_TASK_SECONDS}
        if live:
            self._tasks[sprite_id] = live

    def _save(self, sprite_id: str) -> None:
        if self.state_dir is None:
            return
        path = self.state_dir / f"{sprite_id}.json"
        held = self._tasks.get(sprite_id)
        try:
            if not held:
                path.unlink(missing_ok=True)
                return
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(held))
            os.replace(tmp, path)
        except OSError as exc:  # the hold works for this process regardless
            log.warning("saving the tasks of %s failed: %s", sprite_id, exc)


class Sleeper:
    """The per-server loop that puts idle sprites to sleep.

    Every `tick` seconds each live sprite's idle time is compared with its timers; a
    sprite past one is handed to `Sprites.sleep`, which checks again under the lock.
    """

    def __init__(self, sprites: Sprites, tick: float = 0.5) -> None:
        self.sprites = sprites
        self.tick = tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name="wisp-sleeper")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            for sprite_id, target in self.sprites.sleep_candidates():
                try:
                    await self.sprites.sleep_if_idle(sprite_id, target)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("putting sprite %s to sleep (%s) failed: %s", sprite_id,
                                target, exc)
