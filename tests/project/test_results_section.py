"""The README's Results section shows what the study's report says: its tables are rows of the
report that ``hessian-report`` wrote, and its wall times are those the study script logged."""

from __future__ import annotations

import re

from helpers import REPO_ROOT as ROOT

README = ROOT / "README.md"
RESULTS = ROOT / "docs" / "results"


def _results_section() -> str:
    text = README.read_text()
    start = text.index("<!-- section: results")
    return text[start : text.index("<!-- section:", start + 1)]


def test_every_table_row_of_the_results_section_is_a_row_of_a_study_report() -> None:
    reports = [path.read_text() for path in sorted(RESULTS.glob("paper_study_*/report.md"))]
    assert reports, "no docs/results/paper_study_*/report.md"
    report_rows = {line for text in reports for line in text.splitlines() if line.startswith("|")}
    rows = [line for line in _results_section().splitlines() if line.startswith("|")]
    assert len(rows) > 10  # the claims and the under-training tables
    typed = [row for row in rows if row not in report_rows]
    assert not typed, f"README rows that no study report has (copy them from the report): {typed}"


def test_the_wall_times_are_the_logged_ones() -> None:
    section = _results_section()
    logged = {}
    for log in RESULTS.glob("paper_study_*/wall_times.log"):
        for match in re.finditer(r"== (\w+) (\w+): done in (\d+) s", log.read_text()):
            logged.setdefault(match.group(2), set()).add(int(match.group(3)))
    quoted = re.findall(r"`(\w+)` ([\d,]+) s\b", section)
    assert quoted, "the Results section quotes no stage wall times"
    for stage, seconds in quoted:
        assert int(seconds.replace(",", "")) in logged.get(stage, set()), (stage, seconds, logged)


def test_every_table_of_the_results_section_has_its_header() -> None:
    """A block of table rows without a header and a ``| --- |`` line renders as plain text."""
    blocks: list[list[str]] = [[]]
    for line in _results_section().splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    tables = [block for block in blocks if block]
    assert tables
    for block in tables:
        assert len(block) >= 3 and set(block[1].replace("|", "").split()) == {"---"}, block[0]
        assert block[1].count("|") == block[0].count("|"), block[0]
