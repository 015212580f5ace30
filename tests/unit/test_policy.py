"""Policy rules (wisp.network.policy): parsing, precedence, storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wisp.errors import BadRequest
from wisp.network.policy import DEFAULTS, Policy, load, save


def p(*rules: tuple[str, str] | str) -> Policy:
    return Policy.parse({"rules": [{"include": r} if isinstance(r, str) else
                                   {"domain": r[0], "action": r[1]} for r in rules]})


def test_no_rules_is_open() -> None:
    assert p().open and p().allows("anything.example")
    assert Policy.parse({"rules": None}).open


def test_precedence_exact_then_longest_suffix_then_star() -> None:
    pol = p(("*", "allow"), ("*.example.com", "deny"), ("*.api.example.com", "allow"),
            ("bad.api.example.com", "deny"), ("example.com", "deny"))
    assert pol.allows("other.org")
    assert not pol.allows("example.com")
    assert not pol.allows("www.example.com")
    assert pol.allows("v1.api.example.com")
    assert not pol.allows("bad.api.example.com")
    assert pol.allows("x.bad.api.example.com")  # exact is exact
    assert not pol.allows("api.example.com")  # *.api.example.com is below it only


def test_unmatched_is_denied_without_star_and_deny_wins_ties() -> None:
    assert not p(("a.test", "allow")).allows("b.test")
    assert not p(("a.test", "allow"), ("a.test", "deny")).allows("a.test")
    assert not p(("*", "allow"), ("*", "deny")).allows("x.test")


def test_names_compare_without_case_and_trailing_dot() -> None:
    pol = p(("Web.Test", "allow"))
    assert pol.allows("web.test.") and pol.allows("WEB.test")


def test_defaults_preset() -> None:
    pol = p("defaults")
    assert pol.allows("pypi.org") and pol.allows("files.pythonhosted.org")
    assert pol.allows("api.github.com") and pol.allows("registry.npmjs.org")
    assert not pol.allows("example.com")
    assert len(DEFAULTS) == len(set(DEFAULTS))
    assert pol.to_json() == {"rules": [{"include": "defaults"}]}


@pytest.mark.parametrize("body", [
    None, [], {"rules": {}}, {"rules": [{"domain": "a.test", "action": "ALLOW"}]},
    {"rules": [{"domain": "-a.test", "action": "allow"}]},
    {"rules": [{"domain": "a" * 64 + ".test", "action": "allow"}]},
    {"rules": [{"domain": "*.", "action": "allow"}]},
    {"rules": [{"domain": "**", "action": "allow"}]},
    {"rules": [{"domain": 5, "action": "allow"}]},
    {"rules": [{"domain": "a.test", "action": "allow"}] * 1001},
])
def test_bad_rules(body: object) -> None:
    with pytest.raises(BadRequest):
        Policy.parse(body)


def test_save_and_load(tmp_path: Path) -> None:
    assert load(tmp_path).open
    pol = p(("a.test", "allow"), "defaults")
    save(tmp_path, pol)
    assert load(tmp_path) == pol
    assert json.loads((tmp_path / "policy/network.json").read_text()) == pol.to_json()
    assert not list((tmp_path / "policy").glob("*.tmp"))
    (tmp_path / "policy/network.json").write_text("{broken")
    broken = load(tmp_path)
    assert not broken.open and not broken.allows("a.test")
