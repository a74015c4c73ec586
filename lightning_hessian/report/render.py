"""Writing the report: Markdown, HTML, and machine-readable ``summary.json`` / ``runs.csv``."""

from __future__ import annotations

import csv
import html
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightning_hessian.report.artifacts import Interpolation, interpolation_title
from lightning_hessian.report.claims import RULE, Claim
from lightning_hessian.report.figures import FigureFile
from lightning_hessian.report.runs import Run
from lightning_hessian.report.tables import SECTIONS, Column, VariantTable, format_cell

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
    #: the columns over all runs (the tables render the shown ones, one table per section)
    columns: list[Column] = field(default_factory=list)
    #: the paper's claims, decided from the numbers
    claims: list[Claim] = field(default_factory=list)
    #: model interpolations found below the report's paths
    interpolations: list[Interpolation] = field(default_factory=list)


def _table_cells(table: VariantTable) -> tuple[list[str], list[list[str]]]:
    """One variant's table with all its shown columns (the HTML report and earlier callers)."""
    shown = [column for column in table.columns if column.shown]
    header = ["batch size", "runs (seeds)", *(column.title for column in shown)]
    rows = []
    for row in table.rows:
        seeds = ", ".join("?" if seed is None else str(seed) for seed in row.seeds)
        cells = [
            "?" if row.batch_size is None else str(row.batch_size),
            f"{len(row.runs)} ({seeds})",
            *(format_cell(row.cells.get(column.key), column) for column in shown),
        ]
        rows.append(cells)
    return header, rows


def _section_cells(content: ReportContent, section: str) -> tuple[list[str], list[list[str]]] | None:
    """One section's table over all variants: a row per (variant, batch size), the section's
    shown columns that some row has a value for.

    Returns:
        ``(header, rows)`` of the table, or ``None`` when no row has a value for any of the
        section's shown columns.
    """
    columns = [c for c in content.columns if c.section == section and c.shown]
    present = {column.key for table in content.tables for column in table.columns}
    columns = [c for c in columns if c.key in present]
    if not columns:
        return None
    header = ["training", "batch size", "seeds", *(c.title for c in columns)]
    rows = []
    for table in content.tables:
        titles = {c.key: c for c in table.columns}
        for row in table.rows:
            seeds = ", ".join("?" if seed is None else str(seed) for seed in row.seeds)
            rows.append([
                table.variant,
                "?" if row.batch_size is None else str(row.batch_size),
                seeds,
                *(format_cell(row.cells.get(c.key), titles.get(c.key, c)) for c in columns),
            ])  # fmt: skip
    return header, rows


def _claim_rows(content: ReportContent) -> tuple[list[str], list[list[str]]]:
    header = ["claim of the paper", "runs", "deciding numbers (mean ± std over seeds)", "verdict"]
    return header, [[claim.claim, claim.setting, claim.evidence, claim.verdict] for claim in content.claims]


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
    header = ["run", "variant", "batch size", "seed", "epochs", "steps", "wall time (s)", "metadata from"]
    rows = []
    for run in content.runs:
        sources = ", ".join(f"{key}: {source}" for key, source in sorted(run.metadata_source.items()))
        rows.append(
            [
                _display_path(run.path),
                run.variant,
                "?" if run.batch_size is None else str(run.batch_size),
                "?" if run.seed is None else str(run.seed),
                "?" if run.epochs is None else str(run.epochs),
                "?" if run.global_step is None else str(run.global_step),
                "?" if run.wall_seconds is None else f"{run.wall_seconds:.0f}",
                sources,
            ]
        )
    return header, rows


def _wall_time_line(content: ReportContent) -> str | None:
    times = [run.wall_seconds for run in content.runs if run.wall_seconds is not None]
    if not times:
        return None
    return (
        f"Run time (fit and test, from `sweep.json`): {sum(times):.0f} s in all over {len(times)} runs, "
        f"{min(times):.0f}-{max(times):.0f} s per run."
    )


def _machines_line(content: ReportContent) -> str | None:
    # which machines made the runs: bit for bit, a run depends on the CPU's instructions, the thread
    # count and the torch build as well as on its config and seeds
    counts = Counter(" then ".join(run.machines) for run in content.runs if run.machines)
    if not counts:
        return None
    made = "; ".join(f"{count} run{'s' if count > 1 else ''} on {machines}" for machines, count in counts.most_common())
    unknown = sum(1 for run in content.runs if not run.machines)
    line = f"Machines (`sweep.json`): {made}" + (f"; {unknown} without a record" if unknown else "") + "."
    if len(counts) > 1 or unknown:
        line += (
            " Runs made on machines with other CPU instructions, thread counts or torch builds round "
            "differently, so a rerun elsewhere is another sample of the same seed, not the same run."
        )
    return line


_METHOD_NOTE = (
    "Each value is the last value logged under its tag in the run, and every column names the split of the "
    "samples it was computed on: *train* for the analyses at the end of `fit` (the paper's Hessian is that of "
    "the training loss), *test* for `hessian-train test` on the last checkpoint (as `hessian-sweep` runs it; "
    "split-qualified tags such as `hessian/test/eig_1`). Mean ± sample std (ddof=1) over the runs of a row, "
    "NaN values (cut by a time budget) left out; accuracies in percent. `train loss`/`train acc` are epoch "
    "means over the last epoch's training batches in train mode (perturbed batches under robust training). "
    "All numbers, including each eigenvalue index λ₁ … λ_k, are in `summary.json`; every tag of every run in "
    "`runs.csv`."
)


def render_markdown(content: ReportContent) -> str:
    """The report as Markdown; figures are linked by their file names (PNG files beside it)."""
    lines = [f"# {content.title}", "", f"Made by `{content.command}` from {len(content.runs)} runs.", ""]
    if (wall := _wall_time_line(content)) is not None:
        lines += [wall, ""]
    if (machines := _machines_line(content)) is not None:
        lines += [machines, ""]
    if content.claims:
        lines += ["## Which of the paper's claims hold here", "", RULE, ""]
        lines += _markdown_table(*_claim_rows(content))
        lines += [""]
    lines += ["## Final metrics", "", _METHOD_NOTE, ""]
    for section, heading in SECTIONS.items():
        cells = _section_cells(content, section)
        if cells is None:
            continue
        lines += [f"### {heading}", ""]
        lines += _markdown_table(*cells)
        lines += [""]
    notes = [f"{table.variant}: {note}" for table in content.tables for note in table.notes]
    lines += [f"{note}  " for note in notes] + ([""] if notes else [])
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
    ]
    if (wall := _wall_time_line(content)) is not None:
        parts.append(f"<p>{escape(wall)}</p>")
    if (machines := _machines_line(content)) is not None:
        parts.append(f"<p>{escape(machines.replace('`', ''))}</p>")
    if content.claims:
        parts.append("<h2>Which of the paper's claims hold here</h2>")
        parts.append(f'<p class="note">{escape(RULE)}</p>')
        parts.append(_html_table(*_claim_rows(content)))
    parts += ["<h2>Final metrics</h2>", f'<p class="note">{escape(_METHOD_NOTE)}</p>']
    for section, heading in SECTIONS.items():
        cells = _section_cells(content, section)
        if cells is None:
            continue
        parts.append(f"<h3>{escape(heading)}</h3>")
        parts.append(_html_table(*cells))
    for table in content.tables:
        parts += [f'<p class="note">{escape(table.variant)}: {escape(note)}</p>' for note in table.notes]
    for table in content.tables:
        parts.append(f"<h3>Training: {escape(table.variant)}</h3>")
        parts.append(_html_table(*_table_cells(table)))
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
        parts += [
            f"<li><code>{escape(_display_path(path))}</code>: {escape(why)}</li>" for path, why in content.skipped
        ]
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
    columns = [
        {"key": c.key, "title": c.title, "section": c.section, "split": c.split, "percent": c.percent, "shown": c.shown}
        for c in content.columns
    ]
    interpolations = [
        {
            "pair": interpolation_title(item),
            "path": _display_path(item.path),
            "labels": list(item.labels),
            "runs": [None if run is None else _display_path(run.path) for run in (item.run_a, item.run_b)],
            "eigenvalue_split": item.eigenvalue_split,
            "batch_norm": item.batch_norm,
            "batch_norm_samples": item.batch_norm_samples,
            "top_eigenvalue_alpha_0": item.at(item.top_eigenvalue, 0.0),
            "top_eigenvalue_alpha_1": item.at(item.top_eigenvalue, 1.0),
        }
        for item in content.interpolations
    ]
    document = {
        "tables": summary,
        "claims": [claim.as_dict() for claim in content.claims],
        "claims_rule": RULE,
        "columns": columns,
        "interpolations": interpolations,
    }
    path.write_text(json.dumps(document, indent=2, default=_json_default) + "\n")


def _json_default(value: object) -> object:
    """NumPy scalars and arrays in ``summary.json`` as plain numbers and lists."""
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_runs_csv(runs: Sequence[Run], path: Path) -> None:
    """One row per run: metadata (epochs and steps of the saved model, wall time, the machines that
    made it) and the final value of every scalar tag."""
    tags = sorted({tag for run in runs for tag in run.events.scalars})
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        header = ["run", "variant", "batch_size", "seed", "epochs", "steps", "wall_seconds", "machine", *tags]
        writer.writerow(header)
        for run in runs:
            finals = run.events.final_scalars()
            writer.writerow(
                [
                    _display_path(run.path),
                    run.variant,
                    "" if run.batch_size is None else run.batch_size,
                    "" if run.seed is None else run.seed,
                    "" if run.epochs is None else run.epochs,
                    "" if run.global_step is None else run.global_step,
                    "" if run.wall_seconds is None else repr(run.wall_seconds),
                    " then ".join(run.machines),
                    *(repr(finals[tag]) if tag in finals else "" for tag in tags),
                ]
            )
