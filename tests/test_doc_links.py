"""Every relative link in README.md, docs/ and results/ reaches a file, and its #anchor a heading.

Reports move between folders (docs/ → results/) and sections between pages; a reader following a
link from the README should never land on a 404 or the top of the wrong page.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
         *sorted((REPO / "results").glob("*.md"))]

# [text](target) and ![alt](target); the target ends at whitespace (a "title") or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s[^)]*)?\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def _prose(markdown: str) -> str:
    """The text outside code: links in fenced blocks and `inline code` are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, -1, -2 on
    repeats."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", markdown),
                              re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def _broken(page: Path, root: Path = REPO) -> list[str]:
    """One line per link in ``page`` that reaches no file or no heading."""
    text = page.read_text()
    problems = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(root)}: ({target})"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest.read_text()):
            problems.append(f"{where}: no heading with that anchor in {dest.name}")
    return problems


def test_pages_are_found():
    # The glob must see the pages, or the link test below would pass on nothing.
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    assert {"README.md", "docs/results.md", "results/README.md"} <= names


def test_every_relative_link_resolves():
    problems = [problem for page in PAGES for problem in _broken(page)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_anchor_rule_matches_github(tmp_path):
    # The slug rule decides which anchors count as broken: check it on headings of this repo's kind.
    page = tmp_path / "p.md"
    page.write_text("# Depth × training-set size: the grid\n"
                    "## Parallel imitation (`imitate.schedule: parallel`, issue 15)\n"
                    "## Notes\n## Notes\n"
                    "```\n# not a heading\n```\n")
    assert _anchors(page.read_text()) == {
        "depth--training-set-size-the-grid",
        "parallel-imitation-imitateschedule-parallel-issue-15",
        "notes", "notes-1"}
    links = tmp_path / "q.md"
    links.write_text("[a](p.md#notes-1) [b](p.md#nowhere) [c](gone.md) `[d](code.md)` "
                     "[e](https://x.org)\n```\n[f](fenced.md)\n```\n")
    assert _broken(links, tmp_path) == [
        "q.md: (p.md#nowhere): no heading with that anchor in p.md",
        "q.md: (gone.md): no such file"]

