"""The README and the pages under docs/: the README stays short, every relative link leads somewhere, the README
keeps the test line CI runs, and the worked example of a new task shows the config that is tested."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_LINES = 200
# .ci/run runs this line; the README must show it as is
TEST_LINE = "python -m pytest tests -q -n 2 --dist worksteal"

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s)]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)", re.M)
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def strip_code(text: str) -> str:
    """Markdown without fenced blocks and inline code spans: what they hold is text, not links or headings."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def links(text: str) -> list[str]:
    """The targets of inline links, images and reference definitions outside code."""
    prose = strip_code(text)
    found = INLINE_LINK.findall(prose) + REFERENCE_DEF.findall(prose)
    return [t[1:-1] if t.startswith("<") else t for t in found]


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file (lower case, punctuation dropped, spaces to hyphens,
    repeated headings numbered)."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link in a heading: its text
        title = re.sub(r"<[^>]+>", "", title).replace("`", "").replace("*", "")
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def broken_links(path: Path) -> list[str]:
    """Each relative link of `path` whose file or folder does not exist, or whose #anchor names no heading of
    the markdown file it points to."""
    problems = []
    for target in links(path.read_text(encoding="utf-8")):
        if EXTERNAL.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = file_part.split("?", 1)[0]
        resolved = (path.parent / file_part).resolve() if file_part else path
        rel = path.relative_to(REPO)
        if not resolved.exists():
            problems.append(f"{rel}: {target} -> {resolved} does not exist")
        elif REPO not in resolved.parents and resolved != REPO:
            problems.append(f"{rel}: {target} leaves the repository")
        elif anchor and resolved.suffix == ".md" and anchor.lower() not in heading_anchors(resolved):
            problems.append(f"{rel}: {target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    return problems


def test_readme_is_at_most_200_lines():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path):
    assert not broken_links(path), "\n".join(broken_links(path))


def test_link_finder_sees_what_it_should():
    text = textwrap.dedent("""\
        [a](docs/pipeline.md) and ![img](docs/results/cpu-study/summary.png "plot") and [b](<docs/x y.md>)
        [c](https://example.com) [d](mailto:x@example.com) [e](#start) `[not](a-link.md)`
        ```
        [not](inside-a-fence.md)
        ```
        [ref]: docs/methods.md
        """)
    assert links(text) == ["docs/pipeline.md", "docs/results/cpu-study/summary.png", "docs/x y.md",
                           "https://example.com", "mailto:x@example.com", "#start", "docs/methods.md"]


def test_readme_shows_the_test_line():
    """A line of its own (in the Start block), alone or after `bash setup.sh &&`, as .ci/run runs it."""
    command = re.compile(r"^(?:bash setup\.sh && )?" + re.escape(TEST_LINE) + r"(?:\s+#.*)?$")
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    assert any(command.match(line) for line in lines), f"README.md has no line that runs `{TEST_LINE}`"


def test_worked_example_is_the_tested_config():
    """docs/adding-a-task.md shows the key room's config as tests/newtask/keyroom.yaml has it."""
    page = (DOCS / "adding-a-task.md").read_text(encoding="utf-8")
    shown = textwrap.dedent(page.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert shown in (REPO / "tests" / "newtask" / "keyroom.yaml").read_text(encoding="utf-8")
