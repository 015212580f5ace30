"""The services core without a server: request parsing, `needs` order, the definitions
file (wisp/services.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wisp.errors import BadRequest
from wisp.services import ServiceDef, load, needs_order, save


def test_parse_fills_defaults_and_echoes_the_request() -> None:
    """Only cmd is required; absent or null arrays are [] and env {}; dir is kept."""
    d = ServiceDef.parse("web", {"cmd": "python3", "args": None, "http_port": None})
    assert d.to_json() == {"name": "web", "cmd": "python3", "args": [], "needs": [],
                           "http_port": None, "env": {}}
    d = ServiceDef.parse("web api", {"cmd": "x", "args": ["a"], "needs": ["db"],
                                     "http_port": 8000, "env": {"K": "V"}, "dir": "/app",
                                     "unknown": 1})
    assert d.to_json() == {"name": "web api", "cmd": "x", "args": ["a"], "needs": ["db"],
                           "http_port": 8000, "env": {"K": "V"}, "dir": "/app"}


@pytest.mark.parametrize("name,body", [
    ("", {"cmd": "x"}), ("a/b", {"cmd": "x"}), ("a.b", {"cmd": "x"}), (" a", {"cmd": "x"}),
    ("x" * 64, {"cmd": "x"}), ("ok", None), ("ok", {"cmd": 1}), ("ok", {"cmd": "x", "args": [1]}),
    ("ok", {"cmd": "x", "needs": ["a/b"]}), ("ok", {"cmd": "x", "http_port": True}),
    ("ok", {"cmd": "x", "http_port": 0}), ("ok", {"cmd": "x", "env": []}),
    ("ok", {"cmd": "x", "env": {"": "v"}}), ("ok", {"cmd": "x", "args": ["a\0b"]}),
])
def test_parse_refuses(name: str, body: object) -> None:
    """Names that are not safe file names and malformed fields are BadRequest."""
    with pytest.raises(BadRequest):
        ServiceDef.parse(name, body)


def _defs(**needs: list[str]) -> dict[str, ServiceDef]:
    return {n: ServiceDef(n, "x", needs=list(v)) for n, v in needs.items()}


def test_needs_order() -> None:
    """Dependencies first; unknown needs ignored; a cycle still yields every service once."""
    order = [d.name for d in needs_order(_defs(app=["db", "cache"], db=["cache"], cache=[],
                                               worker=["ghost", "db"]))]
    assert order.index("cache") < order.index("db") < order.index("app")
    assert order.index("db") < order.index("worker") and len(order) == 4
    cyclic = [d.name for d in needs_order(_defs(a=["b"], b=["a"], c=[]))]
    assert sorted(cyclic) == ["a", "b", "c"]


def test_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    """save/load keep every field and the stopped flag; a missing, corrupt or half-valid
    file gives what it can, never an exception."""
    assert load(tmp_path) == {}
    defs = {"a": ServiceDef("a", "x", ["1"], ["b"], 80, {"K": "V"}, "/d", stopped=True),
            "b": ServiceDef("b", "y")}
    save(tmp_path, defs)
    assert load(tmp_path) == defs
    (tmp_path / "services.json").write_text("{not json")
    assert load(tmp_path) == {}
    (tmp_path / "services.json").write_text(
        '{"services": [{"name": "ok", "cmd": "x"}, {"name": "bad/name", "cmd": "x"}, 5]}')
    assert list(load(tmp_path)) == ["ok"]
