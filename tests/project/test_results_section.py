"""The README's Results section shows what the study's report says: its tables are rows of the
report that ``hessian-report`` wrote, its numbers are in the study's outputs, and its wall times are
those the study script logged."""

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


# A decimal number as the README writes it: 0.1586, -66.46, 84.95 (%), 1,553, 2.6e+02, -8.22e-14.
_DECIMAL = re.compile(r"(?<![\w.])-?\d[\d,]*\.\d+(?:e[+-]?\d+)?")


def _spellings(value: float) -> set[str]:
    """How a number of a study's output may be written in the README: rounded to 0-4 decimals, to
    1-6 significant digits (also in e-notation), and a fraction (accuracy) as a percentage."""
    spellings = set()
    for scaled in (value, 100 * value) if 0 <= value <= 1 else (value,):
        for digits in range(5):
            spellings.add(f"{scaled:.{digits}f}")
        for digits in range(1, 7):
            spellings.add(f"{scaled:.{digits}g}")
            spellings.add(f"{scaled:.{digits - 1}e}")
    return spellings


def test_every_decimal_number_of_the_results_section_is_in_a_study_output() -> None:
    """The prose quotes the report too: a number typed by hand, or left from runs that are no longer
    there, is one that no report.md, runs.csv, wall_times.log or other table of a study holds (its
    per-run values and the tables that summarise them; summary.json repeats them). A wrong number
    passes only when it happens to spell another of the study's thousands of values: measured, a
    random 4-digit number does so 15-40 % of the time, so a typo is caught more often than not."""
    outputs = [
        path for path in RESULTS.glob("paper_study_*/*") if path.is_file() and path.suffix in {".md", ".csv", ".log"}
    ]
    assert any(path.name == "runs.csv" for path in outputs)
    text = "\n".join(path.read_text() for path in outputs)
    known: set[str] = set()
    for number in re.findall(r"-?\d+\.\d+(?:e[+-]?\d+)?", text):
        known |= _spellings(float(number))
    quoted = set(_DECIMAL.findall(_results_section()))
    assert len(quoted) > 100
    unknown = sorted(number for number in quoted if number.replace(",", "") not in known)
    assert not unknown, f"numbers in the Results section that no study output holds (quote the report): {unknown}"


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
