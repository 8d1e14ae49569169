"""The documentation's links resolve: every relative link of README.md, the guide
(``backend/tests/ML_MODEL_OPTIMIZATION.md``) and its reference pages (``backend/tests/docs/``) names a
file that exists, and every anchor (``page.md#section``, ``#section``) a heading of its target, by
GitHub's rules, or an explicit ``<a id=...>``. Links in code (fenced blocks, inline code) are not
links; external ones (``https:``, ``mailto:``, …) are not fetched. Pure Python: nothing is imported
that the suite does not import already.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

from selftests.conftest import REPO

GUIDE = REPO / "backend" / "tests" / "ML_MODEL_OPTIMIZATION.md"
DOCS = GUIDE.parent / "docs"
GUIDE_MAX_LINES = 450

_FENCE = re.compile(r"(`{3,}|~{3,})(.*)$")
_CODE_SPAN = re.compile(r"(`+)(?!`)((?:(?!\n[ \t]*\n).)+?)(?<!`)\1(?!`)", re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*<?([^\s>]+)>?", re.MULTILINE)
_HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?\b(?:href|src)\s*=\s*[\"']([^\"']*)[\"']", re.IGNORECASE)
_HTML_ANCHOR = re.compile(r"<a\s[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def masked(text: str) -> str:
    """The page with its fenced code blocks and inline code blanked out: same length, same lines."""
    lines = text.split("\n")
    fence = ""
    for index, line in enumerate(lines):
        marker = _FENCE.match(line.lstrip())
        if fence:
            if marker and marker.group(1)[0] == fence[0] and len(marker.group(1)) >= len(fence) \
                    and not marker.group(2).strip():
                fence = ""
            lines[index] = " " * len(line)
        elif marker and not (marker.group(1)[0] == "`" and "`" in marker.group(2)):
            fence = marker.group(1)
            lines[index] = " " * len(line)
    return _CODE_SPAN.sub(lambda span: re.sub(r"[^\n]", " ", span.group(0)), "\n".join(lines))


def heading_text(source: str) -> str:
    """What GitHub renders of a heading's source: code without backticks, links and images as their text."""
    text = _CODE_SPAN.sub(lambda span: span.group(2).strip(), source)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    return re.sub(r"(?<![\w*])([*_]{1,3})(\S(?:.*?\S)?)\1(?![\w*])", r"\2", text)


def slug(text: str) -> str:
    """GitHub's anchor of a heading's rendered text (github-slugger): lower case, every character
    but letters, marks, numbers, connector punctuation (``_``), spaces and ``-`` removed, spaces to ``-``."""
    kept = "".join(
        char for char in text.lower()
        if char in " -" or unicodedata.category(char)[0] in "LMN" or unicodedata.category(char) == "Pc"
    )
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown page: its headings' slugs (repeats get ``-1``, ``-2``, …) and ``<a id|name>``."""
    found: set[str] = set()
    seen: dict[str, int] = {}

    def heading(source: str) -> None:
        base = name = slug(heading_text(source.strip()))
        while name in seen:
            seen[base] += 1
            name = f"{base}-{seen[base]}"
        seen[name] = 0
        found.add(name)

    paragraph = ""  # the line before, where it can be a setext heading's text
    for raw, prose in zip(text.split("\n"), masked(text).split("\n")):
        found.update(_HTML_ANCHOR.findall(prose))
        atx = _ATX_HEADING.match(prose)
        underline = _SETEXT_UNDERLINE.match(prose)
        if atx:
            heading(_ATX_HEADING.match(raw).group(2) or "")
            paragraph = ""
        elif underline and paragraph:
            heading(paragraph)
            paragraph = ""
        elif prose.strip() and not prose.lstrip().startswith(("|", "-", "*", "+", ">")):
            paragraph = raw
        else:
            paragraph = ""
    return found


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code: inline, reference definitions, HTML."""
    prose = masked(text)
    found = [
        (prose.count("\n", 0, match.start()) + 1, match.group(1))
        for pattern in (_INLINE_LINK, _REFERENCE_DEFINITION, _HTML_LINK)
        for match in pattern.finditer(prose)
    ]
    return sorted(found, key=lambda link: link[0])


def broken_links(page: Path, root: Path) -> list[str]:
    """What does not resolve among ``page``'s relative links: ``page:line: target: why``."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        path_part, _, fragment = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        if not path_part:
            resolved = page
        elif path_part.startswith("/"):
            resolved = root / path_part.lstrip("/")
        else:
            resolved = page.parent / path_part
        where = f"{page.relative_to(root)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where}: no such file {os.path.relpath(resolved, root)}")
        elif fragment and resolved.is_file() and resolved.suffix.lower() in {".md", ".markdown"}:
            if unquote(fragment) not in anchors(resolved.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading or <a id> '{unquote(fragment)}' in {resolved.name}")
    return problems


def documentation() -> list[Path]:
    return [REPO / "README.md", GUIDE, *sorted(DOCS.glob("*.md"))]


def test_every_relative_link_and_anchor_resolves():
    pages = documentation()
    assert len(pages) > 3 and all(page.is_file() for page in pages)
    problems = [problem for page in pages for problem in broken_links(page, REPO)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_finds_a_broken_file_link_and_a_broken_anchor(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text(
        "# Page B\n\n## Warm runs (`--ml-warm`)\n\n## At the seed's scale\n\n## Again\n\n## Again\n\n"
        'Setext\n------\n\n<a id="kept-here"></a>\n',
        encoding="utf-8",
    )
    (tmp_path / "a.md").write_text(
        "# Title\n\n"
        "[fine](docs/b.md#warm-runs---ml-warm), [fine](docs/b.md#at-the-seeds-scale), [fine](docs/b.md#again-1),\n"
        "[fine](docs/b.md#setext), [fine](docs/b.md#kept-here), [fine](#title), [fine](docs/),\n"
        "[external](https://example.org/nowhere.md#x), [mail](mailto:someone@example.org), `[code](gone.md)`\n\n"
        "[missing file](docs/gone.md) and [missing anchor](docs/b.md#again-2), [missing here](#nope),\n"
        "![missing image](img/chart.png)\n\n"
        "```md\n[in a fence](fenced.md)\n```\n\n"
        "  ~~~\n  [in an indented fence](fenced.md)\n  ~~~\n",
        encoding="utf-8",
    )
    problems = broken_links(tmp_path / "a.md", tmp_path)
    assert [problem.split(": ")[1] for problem in problems] == [
        "docs/gone.md", "docs/b.md#again-2", "#nope", "img/chart.png",
    ], problems
    assert "no such file docs/gone.md" in problems[0] and "no heading or <a id> 'again-2' in b.md" in problems[1]


@pytest.mark.parametrize(("heading", "anchor"), [
    ("Warm runs (`--ml-warm`)", "warm-runs---ml-warm"),
    ("At the seed's scale", "at-the-seeds-scale"),
    ("A memory-aware `-n auto`", "a-memory-aware--n-auto"),
    ("`test_db`'s databases", "test_dbs-databases"),
    ("Parallel runs and CI", "parallel-runs-and-ci"),
    ("What is checked?", "what-is-checked"),
    ("**Bold** and [a link](x.md)", "bold-and-a-link"),
    ("Ünïcode — café", "ünïcode--café"),
])
def test_slugs_follow_githubs_rules(heading, anchor):
    assert slug(heading_text(heading)) == anchor


def test_the_guide_stays_short():
    lines = GUIDE.read_text(encoding="utf-8").count("\n")
    assert lines <= GUIDE_MAX_LINES, f"the guide has {lines} lines: move details to a page of docs/"


def test_each_reference_page_is_linked_from_the_guide_and_links_back():
    guide_targets = {target.partition("#")[0] for _, target in links(GUIDE.read_text(encoding="utf-8"))}
    index_targets = {target.partition("#")[0] for _, target in links((DOCS / "README.md").read_text(encoding="utf-8"))}
    for page in sorted(DOCS.glob("*.md")):
        if page.name == "README.md":
            continue
        assert f"docs/{page.name}" in guide_targets, f"the guide does not link to docs/{page.name}"
        assert page.name in index_targets, f"docs/README.md does not list {page.name}"
        opening = page.read_text(encoding="utf-8").splitlines()[:3]
        assert any("(../ML_MODEL_OPTIMIZATION.md)" in line for line in opening), f"{page.name} does not link back first"
