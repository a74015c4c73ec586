"""Every document the project refers to is in the repository, and every link in its Markdown
resolves (file and heading anchor), so a fresh clone has all it points a reader to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO_ROOT as ROOT

MARKDOWN = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "results").glob("*/README.md")),
    *sorted((ROOT / "benchmarks").glob("*.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MD_REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Za-z][\w.-]*\.md)\b")
TEST_REFERENCE = re.compile(r"(?<![\w/.-])(tests/(?:[\w.-]+/)*[\w.-]+\.py)\b")


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("document", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_links_resolve(document: Path) -> None:
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web links; in-page anchors are checked below for this document
        file_part, _, anchor = target.partition("#")
        resolved = (document.parent / file_part).resolve()
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)} links to missing files or headings: {broken}"


def test_documents_named_in_the_code_exist() -> None:
    """Docstrings and comments cite documents by path (e.g. ``docs/design.md``); a user who
    clones the project must find each one."""
    missing = []
    for source in sorted((ROOT / "lightning_hessian").rglob("*.py")):
        for name in MD_REFERENCE.findall(source.read_text()):
            if "/" in name and not (ROOT / name).exists():
                missing.append(f"{source.relative_to(ROOT)}: {name}")
            elif "/" not in name and not any(ROOT.rglob(name)):
                missing.append(f"{source.relative_to(ROOT)}: {name}")
    assert not missing, missing


def test_test_files_named_anywhere_exist() -> None:
    """The README, the documents, the benchmarks, the configs, the CI script, the package and the tests
    name test files by path (``tests/curvature/test_lanczos.py``); each must be there, also after
    the tests move."""
    sources = [
        ROOT / "README.md",
        ROOT / ".ci" / "run",
        *(path for folder in ("docs", "benchmarks", "configs") for path in sorted((ROOT / folder).rglob("*.*"))),
        *sorted((ROOT / "lightning_hessian").rglob("*.py")),
        *sorted((ROOT / "tests").rglob("*.py")),
    ]
    missing = [
        f"{source.relative_to(ROOT)}: {name}"
        for source in sources
        if source.suffix in {"", ".md", ".py", ".sh", ".yaml", ".yml", ".toml", ".txt"} and source.is_file()
        for name in TEST_REFERENCE.findall(source.read_text(errors="replace"))
        if not (ROOT / name).is_file()
    ]
    assert not missing, missing


def test_the_design_document_is_the_projects_own() -> None:
    design = ROOT / "docs" / "design.md"
    assert design.is_file() and "## Layers" in design.read_text()
    mentions = [
        str(path.relative_to(ROOT))
        for path in [*MARKDOWN, *(ROOT / "lightning_hessian").rglob("*.py")]
        if "DESIGN.md" in path.read_text()
    ]
    assert not mentions, f"these cite a DESIGN.md that is not in the repository: {mentions}"
