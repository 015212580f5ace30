"""A sprite's egress policy: which names it may look up, and so which addresses it may reach.

Rules per the contract (§5.3): `{"domain": D, "action": "allow"|"deny"}` with D an exact
name, `*.suffix` (names under the suffix, not the suffix itself) or `*`; and
`{"include": "defaults"}`, the preset below. The most specific rule wins: an exact name
beats any wildcard, a longer `*.suffix` beats a shorter one, and `*` comes last; between
two rules for the same pattern, deny wins. A name no rule matches is denied: a policy is an
allow list unless it says `{"domain": "*", "action": "allow"}`. `{"rules": []}` is no
policy at all (open egress).

The policy lives on the sprite's own disk (`/.sprite/policy/network.json` inside it, read
only there), so a checkpoint holds the policy of its moment: a restore rewinds it and a
fork copies it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wisp.errors import BadRequest

__all__ = ["Policy", "DEFAULTS", "load", "save", "FILE"]

#: Where the policy lives, relative to the sprite's info directory (`/.sprite` inside).
FILE = Path("policy/network.json")
MAX_RULES = 1000

#: `{"include": "defaults"}`: what a developer's sprite needs to install and build things
#: and to call the major AI APIs. Allowed, each with its subdomains.
DEFAULTS: tuple[str, ...] = (
    # GitHub
    "github.com", "*.github.com", "*.githubusercontent.com", "ghcr.io", "*.ghcr.io",
    "github.io", "*.github.io",
    # npm, Yarn
    "npmjs.org", "*.npmjs.org", "npmjs.com", "*.npmjs.com", "registry.yarnpkg.com",
    # PyPI
    "pypi.org", "*.pypi.org", "pythonhosted.org", "*.pythonhosted.org",
    # Docker Hub
    "docker.io", "*.docker.io", "docker.com", "*.docker.com",
    # Debian and Ubuntu packages (the base image's apt)
    "deb.debian.org", "security.debian.org", "*.ubuntu.com",
    # Go, Rust
    "proxy.golang.org", "sum.golang.org", "crates.io", "*.crates.io",
    # AI APIs
    "api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com",
    "api.mistral.ai", "api.groq.com", "api.together.xyz", "openrouter.ai",
    "api.deepseek.com", "api.x.ai",
)

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")


def _check_name(name: str, field: str) -> str:
    name = name.lower().removesuffix(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(x) for x in labels):
        raise BadRequest(f"{field}: {name!r} is not a host name")
    return name


@dataclass(frozen=True)
class Policy:
    #: the rules as given (what GET returns)
    rules: tuple[dict[str, str], ...]
    #: exact name -> allowed?
    exact: dict[str, bool]
    #: suffix (".example.com") -> allowed?, tried longest first
    suffixes: dict[str, bool]
    #: the `*` rule, if any
    star: bool | None

    @property
    def open(self) -> bool:
        """No rules: egress is not restricted at all."""
        return not self.rules

    @classmethod
    def parse(cls, body: object) -> Policy:
        """The policy of a request body `{"rules": [...]}` (`null` rules = none); raises
        BadRequest saying which rule is wrong."""
        if not isinstance(body, dict) or "rules" not in body:
            raise BadRequest("body must be an object with a \"rules\" array")
        rules = body["rules"]
        if rules is None:
            rules = []
        if not isinstance(rules, list):
            raise BadRequest("rules must be an array")
        if len(rules) > MAX_RULES:
            raise BadRequest(f"at most {MAX_RULES} rules")
        exact: dict[str, bool] = {}
        suffixes: dict[str, bool] = {}
        star: bool | None = None
        kept: list[dict[str, str]] = []

        def add(pattern: str, allow: bool) -> None:
            nonlocal star
            if pattern == "*":
                star = allow if star is None else star and allow
            elif pattern.startswith("*."):
                key = "." + _check_name(pattern[2:], f"rules[{i}].domain")
                suffixes[key] = suffixes.get(key, True) and allow
            else:
                key = _check_name(pattern, f"rules[{i}].domain")
                exact[key] = exact.get(key, True) and allow

        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise BadRequest(f"rules[{i}] must be an object")
            extra = set(rule) - {"domain", "action", "include"}
            if extra:
                raise BadRequest(f"rules[{i}]: unknown field {sorted(extra)[0]!r}")
            if "include" in rule:
                if set(rule) != {"include"}:
                    raise BadRequest(f"rules[{i}]: include stands alone")
                if rule["include"] != "defaults":
                    raise BadRequest(f"rules[{i}]: unknown preset {rule['include']!r}; "
                                     "known: \"defaults\"")
                for pattern in DEFAULTS:
                    add(pattern, True)
                kept.append({"include": "defaults"})
                continue
            domain, action = rule.get("domain"), rule.get("action")
            if not isinstance(domain, str) or not domain:
                raise BadRequest(f"rules[{i}].domain must be a non-empty string")
            if action not in ("allow", "deny"):
                raise BadRequest(f"rules[{i}].action must be \"allow\" or \"deny\"")
            if "*" in domain[1:] or (domain.startswith("*") and domain != "*"
                                     and not domain.startswith("*.")):
                raise BadRequest(f"rules[{i}].domain: a wildcard is \"*\" or \"*.suffix\"")
            add(domain, action == "allow")
            kept.append({"domain": domain, "action": action})
        ordered = dict(sorted(suffixes.items(), key=lambda kv: -len(kv[0])))
        return cls(tuple(kept), exact, ordered, star)

    def allows(self, name: str) -> bool:
        """Whether a lookup of `name` is answered (always, with no rules)."""
        if self.open:
            return True
        name = name.lower().removesuffix(".")
        if name in self.exact:
            return self.exact[name]
        for suffix, allow in self.suffixes.items():
            if name.endswith(suffix):
                return allow
        return bool(self.star)

    def to_json(self) -> dict[str, Any]:
        return {"rules": [dict(r) for r in self.rules]}


OPEN = Policy.parse({"rules": []})


def load(info_dir: Path) -> Policy:
    """The policy stored under a sprite's info directory; none stored is the open one. A
    file that does not parse (written by hand on the host) is treated as deny-all rather
    than open: a broken policy must not open egress."""
    try:
        text = (info_dir / FILE).read_text()
    except FileNotFoundError:
        return OPEN
    try:
        return Policy.parse(json.loads(text))
    except (ValueError, BadRequest):
        return Policy.parse({"rules": [{"domain": "*", "action": "deny"}]})


def save(info_dir: Path, policy: Policy) -> None:
    """Write the policy atomically (write, fsync, rename): a crash leaves the old or the
    new one, never half of one."""
    path = info_dir / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(info_dir, 0o755)
    os.chmod(path.parent, 0o755)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(policy.to_json(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
