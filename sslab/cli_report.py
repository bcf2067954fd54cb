"""`sslab report ...`: each command parses, calls one library function and prints."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from sslab.cli_common import DbOption, console, handle_errors

if TYPE_CHECKING:
    from sslab.store import Store

report_app = typer.Typer(
    help="Figures, tables and HTML reports of a study, read from the results store.", no_args_is_help=True
)

StudyArgument = Annotated[str, typer.Argument(help="study name (see `sslab results --study NAME`)")]
MetricOption = Annotated[str, typer.Option("--metric", "-m", help="final metric to show")]
WhereOption = Annotated[
    list[str] | None,
    typer.Option("--where", help="keep trials with axis=value, for studies with more axes (repeatable)"),
]
ErrorOption = Annotated[str, typer.Option("--error", help="error bars over seeds: std | ci (95%) | none")]


def _store(db: str | None) -> Store:
    from sslab.store import Store

    return Store(db, create=False)


def _where(items: list[str] | None) -> dict[str, str]:
    from sslab.report.data import parse_where

    return parse_where(items or [])


@report_app.command("heatmap")
@handle_errors
def heatmap(
    study: StudyArgument,
    metric: MetricOption = "linear_top1",
    rows: Annotated[str | None, typer.Option("--rows", help="axis on the rows (default: first)")] = None,
    cols: Annotated[str | None, typer.Option("--cols", help="axis on the columns (default: second)")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help=".png, .svg or .pdf (default results/STUDY.png)")
    ] = None,
    where: WhereOption = None,
    db: DbOption = None,
) -> None:
    """Two axes as a heatmap with row averages (SimCLR Fig. 5); its numbers go to a CSV beside it."""
    from sslab.report.heatmap import render_heatmap

    result = render_heatmap(_store(db), study, metric, rows, cols, out, _where(where))
    console.print(f"wrote {result.path} and {result.csv_path}")


def _series_command(kind: str) -> Callable[..., None]:
    def command(
        study: StudyArgument,
        x: Annotated[str, typer.Option("--x", help="axis on the x axis")],
        hue: Annotated[str | None, typer.Option("--hue", help="axis drawn as separate lines/bars")] = None,
        metric: MetricOption = "linear_top1",
        error: ErrorOption = "std",
        out: Annotated[
            Path | None,
            typer.Option(
                "--out", "-o", help=".png, .svg or .pdf (default results/STUDY-curve.png or -bars.png)"
            ),
        ] = None,
        where: WhereOption = None,
        db: DbOption = None,
    ) -> None:
        from sslab.report.curves import render_series

        result = render_series(_store(db), study, x, hue, metric, kind, error, out, _where(where))
        console.print(f"wrote {result.path} and {result.csv_path}")

    return command


curve = handle_errors(_series_command("curve"))
curve.__doc__ = "A line per --hue value over --x, error bars from seeds (SimCLR Fig. 8 style)."
report_app.command("curve")(curve)
bars = handle_errors(_series_command("bars"))
bars.__doc__ = "Grouped bars: --x groups, a bar per --hue value, error bars from seeds (SimCLR Fig. 9 style)."
report_app.command("bars")(bars)


@report_app.command("training")
@handle_errors
def training(
    study: StudyArgument,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help=".png, .svg or .pdf (default results/STUDY-training.png)"),
    ] = None,
    where: WhereOption = None,
    db: DbOption = None,
) -> None:
    """Per-epoch training metrics (loss, kNN, collapse, teacher entropy...), a line per cell of the study."""
    from sslab.report.training_curves import render_training_curves

    path = render_training_curves(_store(db), study, out, _where(where))
    console.print(f"wrote {path} and {path.with_suffix('.csv')}")


@report_app.command("table")
@handle_errors
def table(
    study: StudyArgument,
    rows: Annotated[str, typer.Option("--rows", help="axis on the rows")],
    cols: Annotated[str | None, typer.Option("--cols", help="axis on the columns")] = None,
    metric: MetricOption = "linear_top1",
    format: Annotated[str, typer.Option("--format", "-f", help="table | markdown | latex | csv")] = "table",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write to this file instead")] = None,
    where: WhereOption = None,
    db: DbOption = None,
) -> None:
    """mean ± std over seeds of one metric, rows x columns of two axes (SimCLR Table 5 style)."""
    from sslab.report.tables import render_table

    rendered = render_table(_store(db), study, rows, cols, metric, format, _where(where))
    if not isinstance(rendered, str):  # a rich table: to the terminal, or as plain text to a file
        if out is None:
            console.print(rendered)
            return
        buffer = io.StringIO()
        Console(file=buffer, width=120).print(rendered)
        rendered = buffer.getvalue()
    if out is None:
        typer.echo(rendered, nl=False)
    else:
        _write(out, rendered)
        console.print(f"wrote {out}")


@report_app.command("html")
@handle_errors
def html(
    study: StudyArgument,
    metric: MetricOption = "linear_top1",
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="HTML file (default results/STUDY.html)")
    ] = None,
    db: DbOption = None,
) -> None:
    """One self-contained HTML file: figures, tables, every trial's config and provenance, failures."""
    from sslab.report.html import write_report

    console.print(f"wrote {write_report(_store(db), study, metric, out)}")


def _write(path: Path, text: str) -> None:
    from sslab.errors import SslabError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SslabError(f"cannot write '{path}': {exc.strerror or exc}") from None
