"""Writing the report: Markdown, HTML, and machine-readable ``summary.json`` / ``runs.csv``."""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_hessian.report.figures import FigureFile
from lightning_hessian.report.runs import Run
from lightning_hessian.report.tables import VariantTable, format_cell

__all__ = ["ReportContent", "render_html", "render_markdown", "write_runs_csv", "write_summary_json"]


@dataclass
class ReportContent:
    """Everything a rendered report shows."""

    title: str
    command: str
    runs: list[Run]
    tables: list[VariantTable]
    figures: list[FigureFile]
    missing: list[str] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    #: damaged event files of the reported runs (the numbers come from what could be read)
    damaged: list[str] = field(default_factory=list)


def _table_cells(table: VariantTable) -> tuple[list[str], list[list[str]]]:
    header = ["batch size", "runs (seeds)", *(column.title for column in table.columns)]
    rows = []
    for row in table.rows:
        seeds = ", ".join("?" if seed is None else str(seed) for seed in row.seeds)
        cells = [
            "?" if row.batch_size is None else str(row.batch_size),
            f"{len(row.runs)} ({seeds})",
            *(format_cell(row.cells.get(column.key), column) for column in table.columns),
        ]
        rows.append(cells)
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *(line(row) for row in rows)]


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it, so reports can be shared."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _run_rows(content: ReportContent) -> tuple[list[str], list[list[str]]]:
    header = ["run", "variant", "batch size", "seed", "metadata from"]
    rows = []
    for run in content.runs:
        sources = ", ".join(f"{key}: {source}" for key, source in sorted(run.metadata_source.items()))
        rows.append(
            [
                _display_path(run.path),
                run.variant,
                "?" if run.batch_size is None else str(run.batch_size),
                "?" if run.seed is None else str(run.seed),
                sources,
            ]
        )
    return header, rows


_METHOD_NOTE = (
    "Each value is the last value logged under its tag in the run: after `hessian-train test` "
    "(as `hessian-sweep` runs it) the test accuracy and the callbacks' analyses on the test split, "
    "else the last analysis during training. Mean ± sample std (ddof=1) over the runs of a row, "
    "NaN values (cut by a time budget) left out; accuracies in percent."
)


def render_markdown(content: ReportContent) -> str:
    """The report as Markdown; figures are linked by their file names (PNG files beside it)."""
    lines = [f"# {content.title}", "", f"Made by `{content.command}` from {len(content.runs)} runs.", ""]
    lines += ["## Final metrics", "", _METHOD_NOTE, ""]
    for table in content.tables:
        lines += [f"### Training: {table.variant}", ""]
        lines += _markdown_table(*_table_cells(table))
        lines += [""] + [f"{note}  " for note in table.notes] + ([""] if table.notes else [])
    if content.figures:
        lines += ["## Figures", ""]
        for figure in content.figures:
            lines += [f"### {figure.title}", "", f"![{figure.title}]({figure.file_name})", "", figure.caption, ""]
    if content.missing:
        lines += ["## Not in this report", ""] + [f"- {item}" for item in content.missing] + [""]
    lines += ["## Runs", ""]
    lines += _markdown_table(*_run_rows(content))
    if content.skipped:
        lines += ["", "Skipped:", ""] + [f"- `{_display_path(path)}`: {why}" for path, why in content.skipped]
    if content.damaged:
        lines += ["", "Damaged event files (read up to the damage):", ""] + [f"- {item}" for item in content.damaged]
    return "\n".join(lines) + "\n"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th { background: #eee; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
"""


def render_html(content: ReportContent) -> str:
    """The report as a self-contained HTML page (figures referenced by file name)."""
    escape = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{escape(content.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(content.title)}</h1>",
        f"<p>Made by <code>{escape(content.command)}</code> from {len(content.runs)} runs.</p>",
        "<h2>Final metrics</h2>",
        f'<p class="note">{escape(_METHOD_NOTE)}</p>',
    ]
    for table in content.tables:
        parts.append(f"<h3>Training: {escape(table.variant)}</h3>")
        parts.append(_html_table(*_table_cells(table)))
        parts += [f'<p class="note">{escape(note)}</p>' for note in table.notes]
    if content.figures:
        parts.append("<h2>Figures</h2>")
        for figure in content.figures:
            parts.append(
                f"<figure><h3>{escape(figure.title)}</h3>"
                f'<img src="{escape(figure.file_name)}" alt="{escape(figure.title)}">'
                f"<figcaption>{escape(figure.caption)}</figcaption></figure>"
            )
    if content.missing:
        parts.append("<h2>Not in this report</h2><ul>")
        parts += [f"<li>{escape(item)}</li>" for item in content.missing]
        parts.append("</ul>")
    parts.append("<h2>Runs</h2>")
    parts.append(_html_table(*_run_rows(content)))
    if content.skipped:
        parts.append("<p>Skipped:</p><ul>")
        parts += [f"<li><code>{escape(_display_path(path))}</code>: {escape(why)}</li>" for path, why in content.skipped]
        parts.append("</ul>")
    if content.damaged:
        parts.append("<p>Damaged event files (read up to the damage):</p><ul>")
        parts += [f"<li>{escape(item)}</li>" for item in content.damaged]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_summary_json(content: ReportContent, path: Path) -> None:
    """The table's numbers, unrounded: per variant and batch size, each column's values/mean/std."""
    summary = []
    for table in content.tables:
        rows = []
        for row in table.rows:
            cells = {}
            for column in table.columns:
                cell = row.cells.get(column.key)
                if cell is not None and cell.n:
                    cells[column.key] = {
                        "title": column.title,
                        "values": list(cell.values),
                        "mean": cell.mean,
                        "std": cell.std,
                        "n": cell.n,
                    }
            rows.append(
                {
                    "batch_size": row.batch_size,
                    "seeds": row.seeds,
                    "runs": [_display_path(run.path) for run in row.runs],
                    "metrics": cells,
                }
            )
        summary.append({"variant": table.variant, "notes": table.notes, "rows": rows})
    path.write_text(json.dumps({"tables": summary}, indent=2) + "\n")


def write_runs_csv(runs: Sequence[Run], path: Path) -> None:
    """One row per run: metadata and the final value of every scalar tag."""
    tags = sorted({tag for run in runs for tag in run.events.scalars})
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", "variant", "batch_size", "seed", *tags])
        for run in runs:
            finals = run.events.final_scalars()
            writer.writerow(
                [
                    _display_path(run.path),
                    run.variant,
                    "" if run.batch_size is None else run.batch_size,
                    "" if run.seed is None else run.seed,
                    *(repr(finals[tag]) if tag in finals else "" for tag in tags),
                ]
            )
