"""Control-plane state in SQLite: sprites and their checkpoints.

The database is the record of what exists. A row is written only after the thing it names
is complete on disk (a checkpoint row after its image is renamed into place; a sprite row
moves from `creating` to `ready` only after its disk exists), so a start after a crash can
tell finished work from half-made leftovers and remove the latter.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = ["Store", "SpriteRow", "CheckpointRow", "now"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS sprites (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,               -- creating | ready | deleting
    image TEXT NOT NULL,
    image_version TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '[]',
    url_settings TEXT NOT NULL DEFAULT '{}',
    config TEXT NOT NULL DEFAULT '{}',
    environment TEXT NOT NULL DEFAULT '{}',
    next_checkpoint INTEGER NOT NULL DEFAULT 1,
    current_checkpoint TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    last_running_at TEXT,
    last_warming_at TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    sprite_id TEXT NOT NULL REFERENCES sprites(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    create_time TEXT NOT NULL,
    source_id TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    size_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sprite_id, id)
);
"""


def now() -> str:
    """RFC 3339 UTC with second precision and Z, as every SDK parses it."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class SpriteRow:
    id: str
    name: str
    state: str
    image: str
    image_version: str
    labels: list[str] = field(default_factory=list)
    url_settings: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)
    next_checkpoint: int = 1
    current_checkpoint: str | None = None
    created_at: str = ""
    updated_at: str = ""
    last_running_at: str | None = None
    last_warming_at: str | None = None


@dataclass
class CheckpointRow:
    sprite_id: str
    id: str
    seq: int
    comment: str
    create_time: str
    source_id: str | None
    history: list[str]
    size_bytes: int


_JSON_FIELDS = ("labels", "url_settings", "config", "environment")


class Store:
    """Thin, synchronous SQLite access. Every call is a short local transaction."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- sprites --------------------------------------------------------------------------
    @staticmethod
    def _sprite(row: sqlite3.Row) -> SpriteRow:
        data = dict(row)
        for key in _JSON_FIELDS:
            data[key] = json.loads(data[key])
        return SpriteRow(**data)

    def insert_sprite(self, s: SpriteRow) -> None:
        data = s.__dict__.copy()
        for key in _JSON_FIELDS:
            data[key] = json.dumps(data[key])
        cols = ", ".join(data)
        marks = ", ".join(f":{k}" for k in data)
        self.db.execute(f"INSERT INTO sprites ({cols}) VALUES ({marks})", data)

    def update_sprite(self, sprite_id: str, **fields: Any) -> None:
        for key in _JSON_FIELDS:
            if key in fields:
                fields[key] = json.dumps(fields[key])
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        self.db.execute(f"UPDATE sprites SET {sets} WHERE id = :_id", {**fields, "_id": sprite_id})

    def sprite(self, sprite_id: str) -> SpriteRow | None:
        row = self.db.execute("SELECT * FROM sprites WHERE id = ?", (sprite_id,)).fetchone()
        return self._sprite(row) if row else None

    def sprite_by_name(self, name: str) -> SpriteRow | None:
        row = self.db.execute("SELECT * FROM sprites WHERE name = ?", (name,)).fetchone()
        return self._sprite(row) if row else None

    def sprites(self, prefix: str = "", after: str = "", limit: int = -1,
                states: tuple[str, ...] = ("ready",)) -> list[SpriteRow]:
        marks = ",".join("?" for _ in states)
        rows = self.db.execute(
            f"SELECT * FROM sprites WHERE state IN ({marks}) AND name >= ? AND name > ? "
            "AND substr(name, 1, ?) = ? ORDER BY name LIMIT ?",
            (*states, prefix, after, len(prefix), prefix, limit)).fetchall()
        return [self._sprite(r) for r in rows]

    def all_sprites(self) -> list[SpriteRow]:
        return [self._sprite(r) for r in self.db.execute("SELECT * FROM sprites").fetchall()]

    def delete_sprite(self, sprite_id: str) -> None:
        self.db.execute("DELETE FROM sprites WHERE id = ?", (sprite_id,))

    # -- checkpoints ----------------------------------------------------------------------
    @staticmethod
    def _checkpoint(row: sqlite3.Row) -> CheckpointRow:
        data = dict(row)
        data["history"] = json.loads(data["history"])
        return CheckpointRow(**data)

    def insert_checkpoint(self, c: CheckpointRow, next_seq: int) -> None:
        """Record a finished checkpoint and advance the sprite's counter in one transaction."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO checkpoints (sprite_id, id, seq, comment, create_time, source_id, "
                "history, size_bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (c.sprite_id, c.id, c.seq, c.comment, c.create_time, c.source_id,
                 json.dumps(c.history), c.size_bytes))
            self.db.execute("UPDATE sprites SET next_checkpoint = ? WHERE id = ?",
                            (next_seq, c.sprite_id))

    def checkpoints(self, sprite_id: str) -> list[CheckpointRow]:
        rows = self.db.execute(
            "SELECT * FROM checkpoints WHERE sprite_id = ? ORDER BY seq DESC",
            (sprite_id,)).fetchall()
        return [self._checkpoint(r) for r in rows]

    def checkpoint(self, sprite_id: str, cp_id: str) -> CheckpointRow | None:
        row = self.db.execute("SELECT * FROM checkpoints WHERE sprite_id = ? AND id = ?",
                              (sprite_id, cp_id)).fetchone()
        return self._checkpoint(row) if row else None

    def delete_checkpoint(self, sprite_id: str, cp_id: str) -> None:
        self.db.execute("DELETE FROM checkpoints WHERE sprite_id = ? AND id = ?",
                        (sprite_id, cp_id))

    def checkpoint_bytes(self, sprite_id: str) -> int:
        row = self.db.execute("SELECT COALESCE(SUM(size_bytes), 0) FROM checkpoints "
                              "WHERE sprite_id = ?", (sprite_id,)).fetchone()
        return int(row[0])
