"""The README and the topic pages under docs/: every relative link resolves to a file, and every #anchor to a heading
of its target (GitHub's slugs); the README stays short and links every page; each page has a title; no table row
appears on two pages (a table lives on one page, the others link to it)."""
import collections
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FILES = [README] + PAGES
LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]*)\)")  # [text](target) and ![alt](target); text may wrap lines
FENCE = re.compile(r"^```.*?^```[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`]*`")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def prose(text):
    """The text outside code: fenced blocks and inline code spans hold commands and tables' literals, not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading):
    """GitHub's anchor for a heading: lowercase, punctuation but hyphens (and word characters) dropped, spaces to
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a markdown file (outside fenced code); a repeated slug gets -1, -2, ..."""
    seen, found = collections.Counter(), set()
    for line in FENCE.sub("", read(path)).splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            base = slug(heading.group(1))
            found.add(f"{base}-{seen[base]}" if seen[base] else base)
            seen[base] += 1
    return found


def links(path):
    """(line number, target) of every relative link in a markdown file: not http(s) nor mailto."""
    text = prose(read(path))
    for match in LINK.finditer(text):
        target = match.group(2)
        if not re.match(r"(https?:|mailto:)", target):
            yield text.count("\n", 0, match.start()) + 1, target


def broken(path):
    """What is wrong with each relative link of `path`, as 'file:line: target: why'."""
    problems = []
    for line, target in links(path):
        file_part, _, anchor = target.partition("#")
        where = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        shown = f"{os.path.relpath(path, ROOT)}:{line}: {target}"
        if not os.path.exists(where):
            problems.append(f"{shown}: no such file")
        elif anchor and not where.endswith(".md"):
            problems.append(f"{shown}: an anchor into a file that is not markdown")
        elif anchor and anchor not in anchors(where):
            problems.append(f"{shown}: no heading with that anchor")
    return problems


def test_the_pages_exist():
    assert len(PAGES) >= 10  # the topic pages the README was split into


@pytest.mark.parametrize("path", FILES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    assert broken(path) == []


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its part: one (of two)\n\n```\n[code](nowhere.md)\n```\n")
    page = tmp_path / "README.md"
    page.write_text("# Title\n\n[fine](docs/a.md#its-part-one-of-two) [fine](#title) `[code](nowhere.md)`\n"
                    "[missing](docs/b.md) [no anchor](docs/a.md#its-part) [none here](#nothing)\n"
                    "![figure](figures/x.png) [wrapped\ntext](docs/a.md#a-page) [out](https://example.com/x.md)\n")
    assert [problem.split(": ", 1)[1] for problem in broken(str(page))] == [
        "docs/b.md: no such file", "docs/a.md#its-part: no heading with that anchor",
        "#nothing: no heading with that anchor", "figures/x.png: no such file"]


def test_slugs_follow_github():
    assert slug("Engines: in-process, Flower simulation, Flower deployment") == \
        "engines-in-process-flower-simulation-flower-deployment"
    assert slug("The chapter's experiment: prop 1.0 / 0.8 / 0.5") == "the-chapters-experiment-prop-10--08--05"
    assert slug("`download_*` keys") == "download_-keys"


def test_the_readme_is_short_and_links_every_page():
    text = read(README)
    assert len(text.splitlines()) <= 300
    linked = {os.path.normpath(os.path.join(ROOT, target.partition("#")[0])) for _, target in links(README)}
    assert [os.path.relpath(page, ROOT) for page in PAGES if page not in linked] == []


def test_the_quick_start_is_on_the_first_screen():
    assert "## Quick start" in read(README).splitlines()[:15]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_page_has_a_title_and_what_it_covers(path):
    lines = read(path).splitlines()
    assert lines[0].startswith("# ") and not lines[1] and lines[2] and not lines[2].startswith(("#", "|", "```"))


def test_no_table_row_is_on_two_pages():
    pages = collections.defaultdict(set)
    for path in FILES:
        for line in FENCE.sub("", read(path)).splitlines():
            if line.startswith("|") and not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line):
                pages[line].add(os.path.relpath(path, ROOT))
    assert {row: sorted(where) for row, where in pages.items() if len(where) > 1} == {}
