"""The repository's citations resolve inside it: nothing points at papers.md, a file outside the
repository, and every `docs/algorithms.md, "..."` citation names a `## ` heading of that page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pipeline", "stages", "workflows", "tests", "docs", "infra", "README.md")
SKIPPED_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache"}
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()  # it names both on purpose
PAGE = ROOT / "docs" / "algorithms.md"
OUTSIDE = "papers.md"
# One citation, possibly of several sections: `docs/algorithms.md, "A", "B" and "C"`, also across the
# line breaks of a comment or docstring; `[algorithms.md](algorithms.md), "A"` in the docs.
CITATION = re.compile(r'algorithms\.md\)?,\s+(#\s*)?("[^"]{1,80}"(?:(?:,|\s+and|\s+to|\s+or)\s*(?:#\s*)?"[^"]{1,80}")*)')
QUOTED = re.compile(r'"([^"]{1,80})"')
LINE_BREAK = re.compile(r"\s*\n\s*(?:#\s*)?")  # inside a name: a wrapped line, and a comment's "#"


def _files(top: Path) -> list[Path]:
    if top.is_file():
        return [top]
    return [p for p in top.rglob("*") if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(ROOT).parts)]


@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    """Path (from the repository root) -> text of every text file under SCANNED but this one."""
    found = {}
    for path in (p for top in SCANNED if (ROOT / top).exists() for p in _files(ROOT / top)):
        name = path.relative_to(ROOT).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # pictures and other binary files
            continue
        if name != THIS_FILE:
            found[name] = text
    return found


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line, section) for each section each docs/algorithms.md citation in `text` names."""
    return [(text.count("\n", 0, m.start()) + 1, LINE_BREAK.sub(" ", name))
            for m in CITATION.finditer(text) for name in QUOTED.findall(m.group(2))]


def page_sections() -> list[str]:
    return [line[3:].strip() for line in PAGE.read_text(encoding="utf-8").splitlines() if line.startswith("## ")]


def test_a_citation_names_each_of_its_sections() -> None:
    text = ('x = 1  # docs/algorithms.md, "Heun sampler": t_i\n'
            '"""(docs/algorithms.md, "Fake score", "Guidance" and\n    "Fréchet distance")."""\n'
            '# docs/algorithms.md, "One-step generator" to\n# "Latent encoding"\n'
            'see [algorithms.md](algorithms.md), "Precision and recall"; also "not a citation"\n'
            '"""(docs/algorithms.md, "EDM2 loss\nand learned uncertainty"), and # docs/algorithms.md,\n# "Guidance"\n')
    assert cited_sections(text) == [(1, "Heun sampler"), (2, "Fake score"), (2, "Guidance"),
                                    (2, "Fréchet distance"), (4, "One-step generator"), (4, "Latent encoding"),
                                    (6, "Precision and recall"), (7, "EDM2 loss and learned uncertainty"),
                                    (8, "Guidance")]


def test_the_page_has_each_section_once() -> None:
    sections = page_sections()
    assert len(sections) > 10 and len(set(sections)) == len(sections), sections


def test_no_file_cites_papers_md(texts: dict[str, str]) -> None:
    found = [f"{name}:{n}" for name, text in sorted(texts.items())
             for n, line in enumerate(text.splitlines(), 1) if OUTSIDE in line]
    assert not found, f"{OUTSIDE} is not in the repository: cite docs/algorithms.md or the paper in {found}"


def test_every_cited_section_is_on_the_page(texts: dict[str, str]) -> None:
    sections = set(page_sections())
    missing = [f"{name}:{line}: {section!r}" for name, text in sorted(texts.items())
               for line, section in cited_sections(text) if section not in sections]
    assert not missing, f"docs/algorithms.md has no such `## ` heading: {missing}"
