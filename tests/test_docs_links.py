"""The README and docs/ stay navigable: every relative link resolves, the README stays short, nothing points outside
the repository."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest


ROOT = Path(__file__).resolve().parent.parent
MARKDOWN_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 300
FORBIDDEN = ("shared/DESIGN", "DESIGN §")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# `[text](target)` and `![alt](target)`, with an optional title; `<target>` allows spaces
INLINE_LINK = re.compile(r"\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_links(text: str) -> list[str]:
    """Link and image targets of a Markdown text, outside fenced code blocks and code spans."""
    targets, fence = [], None
    for line in text.splitlines():
        opening = FENCE.match(line)
        if fence is not None:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        line = CODE_SPAN.sub("", line)
        targets += [m.group(1) for m in INLINE_LINK.finditer(line)]
        targets += [m.group(1) for m in REFERENCE_DEFINITION.finditer(line)]
    return [target.strip("<>") for target in targets]


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Relative link targets of `path` whose file is missing or lies outside the repository `root`."""
    broken = []
    for target in markdown_links(path.read_text(encoding="utf-8")):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked offline
        file_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not file_part:
            continue  # an anchor in the same page
        resolved = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
        resolved = resolved.resolve()
        if not resolved.is_relative_to(root) or not resolved.exists():
            broken.append(target)
    return broken


def test_link_parser():
    text = (
        "See [the method](docs/method.md#steps), ![plot](plots/a.png 'title'), [site](https://example.com)\n"
        "and [a](<docs/with space.md>). `[not](code.md)`\n"
        "```bash\n[not](in-a-fence.md)\n```\n"
        "[ref]: docs/ref.md\n"
    )
    assert markdown_links(text) == [
        "docs/method.md#steps",
        "plots/a.png",
        "https://example.com",
        "docs/with space.md",
        "docs/ref.md",
    ]


def test_broken_link_is_found(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "there.md").write_text("x")
    (tmp_path / "elsewhere.md").write_text("x")  # exists, but outside the repository
    page = root / "page.md"
    page.write_text("[ok](there.md#top) [missing](not-there.md) [outside](../elsewhere.md) [web](http://x.org)")
    assert broken_links(page, root) == ["not-there.md", "../elsewhere.md"]


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == [], f"{path.relative_to(ROOT)} links to files that do not exist"


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it within {README_MAX_LINES} (move to docs/)"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_outside_the_repository(path):
    text = path.read_text(encoding="utf-8")
    assert not [word for word in FORBIDDEN if word in text], f"{path.relative_to(ROOT)} refers to a design file"
