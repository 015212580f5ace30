"""The documentation's internal links: every relative Markdown link in README.md,
CHANGELOG.md and docs/*.md must name a file that exists, and a `#anchor` into a Markdown
file must name one of its headings (GitHub's slug rules). External links (`https:`,
`mailto:` ...) are not followed. Also pins the fixed sections of each feature page.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted({REPO / "README.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")})
DOCS = [p for p in DOCS if p.exists()]

#: Pages that follow the feature template (style guide §7).
FEATURE_PAGES = ["sprites", "exec", "filesystem", "checkpoints", "images", "storage",
                 "security", "cli", "proxy", "lifecycle", "resources", "services"]
FEATURE_SECTIONS = ["Overview", "API", "Performance", "Limitations", "Known issues"]

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
                          r"\(\s*(<[^>]*>|[^)\s]+)(?:\s+[\"'(][^)]*)?\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked out."""
    out: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, _INLINE_CODE.sub("", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: inline markup dropped, lower case, every character
    that is not a letter, digit, space, `-` or `_` removed, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> their text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    text = path.read_text(encoding="utf-8")
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition."""
    found: list[tuple[int, str]] = []
    for number, line in _prose_lines(text):
        targets = [m.group(1) for m in _INLINE_LINK.finditer(line)]
        ref = _REF_DEF.match(line)
        if ref:
            targets.append(ref.group(1))
        found += [(number, t.strip("<>")) for t in targets]
    return found


def broken_links(path: Path) -> list[str]:
    problems: list[str] = []
    for number, target in links(path.read_text(encoding="utf-8")):
        if _SCHEME.match(target) or target.startswith("//"):
            continue  # external: not checked here
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO)}:{number}: {target}"
        if not dest.exists():
            problems.append(f"{where} -> no such file {dest}")
            continue
        if anchor and dest.suffix == ".md" and dest.is_file():
            if unquote(anchor).lower() not in anchors(dest):
                problems.append(f"{where} -> no heading #{anchor} in {dest.name}")
    return problems


def test_there_are_docs_to_check() -> None:
    """The scan sees README.md and the docs folder (a moved file would silently skip it)."""
    names = {p.relative_to(REPO).as_posix() for p in DOCS}
    assert "README.md" in names
    assert "docs/sprites-api.md" in names
    assert "docs/architecture.md" in names


def test_slug_follows_github_rules() -> None:
    """Anchors are computed the way GitHub renders them, so a passing link works online."""
    assert slug("2.10 Checkpoints") == "210-checkpoints"
    assert slug("3.1 `WS /v1/sprites/{name}/exec` — run a command") == \
        "31-ws-v1spritesnameexec--run-a-command"
    assert slug("Known issues") == "known-issues"
    assert slug("The [contract](sprites-api.md) copy") == "the-contract-copy"


def test_link_parser_skips_code() -> None:
    """Links inside code spans and fenced blocks are not links, so they are not checked;
    reference definitions and titled links are."""
    text = ('[a](x.md) `[b](y.md)`\n```\n[c](z.md)\n```\n[d]: w.md\n'
            '[e](v.md "title") ![i](<img one.png>)\n')
    assert [t for _, t in links(text)] == ["x.md", "w.md", "v.md", "img one.png"]


@pytest.mark.parametrize("doc", DOCS, ids=[p.relative_to(REPO).as_posix() for p in DOCS])
def test_relative_links_resolve(doc: Path) -> None:
    """Every relative link in this page names an existing file (and heading, for .md)."""
    problems = broken_links(doc)
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", FEATURE_PAGES)
def test_feature_page_has_the_fixed_sections(page: str) -> None:
    """Each feature page has Overview, API, Performance, Limitations and Known issues, in
    that order, as second-level headings."""
    path = REPO / "docs" / f"{page}.md"
    level2 = [m.group(2) for _, line in _prose_lines(path.read_text(encoding="utf-8"))
              if (m := _HEADING.match(line)) and len(m.group(1)) == 2]
    assert [h for h in level2 if h in FEATURE_SECTIONS] == FEATURE_SECTIONS
