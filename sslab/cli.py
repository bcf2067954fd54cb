"""The `sslab` command line: each command parses, calls one library function and prints."""

from __future__ import annotations

import inspect
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from sslab.cli_common import DbOption, console, err_console, handle_errors
from sslab.cli_report import report_app
from sslab.cli_store import store_app
from sslab.cli_study import compare, study_app
from sslab.config import FIELD_NAMES, SET_BY_SSLAB, TrialConfig, field_help, field_type, from_sources
from sslab.errors import SslabError
from sslab.methods.catalog import method_info, methods
from sslab.settings import Setting

app = typer.Typer(
    help="sslab: self-supervised learning ablation studies on images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Datasets: where they are looked for and whether they are present.", no_args_is_help=True
)
augment_app = typer.Typer(help="Augmentation ops that views are built from.", no_args_is_help=True)


def _show_version(value: bool) -> None:
    if value:
        import sslab

        console.print(f"sslab {sslab.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="print the version and exit"),
    ] = False,
) -> None:
    """sslab: self-supervised learning ablation studies on images."""


app.add_typer(data_app, name="data")
app.add_typer(augment_app, name="augment")
app.add_typer(report_app, name="report")

# --- sslab run -------------------------------------------------------------------------------------------

_OPTION_NAMES = {"aug1": "--aug1", "aug2": "--aug2"}
_MORE_HELP = {
    "dataset": (
        ". imagefolder:PATH reads class subfolders; PATH/train/ and PATH/test/ subfolders are the splits, "
        "otherwise 20% of each class (chosen by a hash of the file path) is held out for test"
    )
}


def _option(name: str, kind: type, help_text: str, panel: str) -> inspect.Parameter:
    flag = _OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
    if kind is bool:
        option = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=help_text, rich_help_panel=panel)
    else:
        option = typer.Option(None, flag, help=help_text, rich_help_panel=panel)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind | None)


def _run_parameters() -> list[inspect.Parameter]:
    """One CLI option per shared config field, then one per method setting name (applied to the chosen
    method), all defaulting to None = 'not given on the command line'."""
    help_texts = field_help()
    parameters = []
    for name in FIELD_NAMES:
        if name in SET_BY_SSLAB:
            continue
        kind = field_type(name)[0]
        default = TrialConfig.__dataclass_fields__[name].default
        help_text = f"{help_texts.get(name, '')}{_MORE_HELP.get(name, '')} \\[default: {default}]"
        parameters.append(_option(name, kind, help_text, "Trial"))
    by_name: dict[str, list[tuple[str, Setting]]] = {}
    for method, info in methods().items():
        for name, setting in info.settings.items():
            by_name.setdefault(name, []).append((method, setting))
    for name, owners in by_name.items():
        kinds = {setting.type for _, setting in owners}
        if name in FIELD_NAMES or len(kinds) != 1:
            continue  # a name with two meanings across methods: --set METHOD.NAME=VALUE only
        method, setting = owners[0]
        defaults = ", ".join(f"{m} {s.default}" for m, s in owners)
        help_text = f"{setting.help}; a setting of {', '.join(m for m, _ in owners)} \\[default: {defaults}]"
        parameters.append(_option(name, kinds.pop(), help_text, "Method settings (see `sslab methods NAME`)"))
    return parameters


def run(
    config_file: Path | None = None,
    sets: list[str] | None = None,
    resume: bool = False,
    force: bool = False,
    db: str | None = None,
    quiet: bool = False,
    log: list[str] | None = None,
    **options: Any,
) -> None:
    """Pretrain one configuration and evaluate it with a linear probe and kNN on frozen features."""
    from sslab.tracking import check_trackers

    check_trackers(log or [])
    config = from_sources(config_file, sets, options)
    if not force and "teacher" not in config.settings and _answer_from_store(config, db, quiet):
        return
    from sslab.store import Store
    from sslab.teachers import with_teacher

    store = Store(db)
    config = with_teacher(config, store)  # a distillation method's teacher named by its pretraining hash
    if not quiet:
        _announce(config)
    done = store.find(config.hash())
    if done is not None and done.status == "done" and not force:  # answered from the store, without torch
        err_console.print(f"already done as trial {done.id} in {store.url} (use --force to train it again)")
        metrics = store.final_metrics(done.id)
        _print_trial(done.id, done.config_hash, metrics, done.collapsed, done.wall_time_s, store.url)
        return

    from sslab.claims import holding
    from sslab.progress import RichReporter
    from sslab.runner import run_trial
    from sslab.signals import sigterm_as_interrupt

    reporter = None if quiet else RichReporter(err_console)
    restore_sigterm = sigterm_as_interrupt()  # `kill`, `timeout`, a scheduler: recorded as interrupted
    try:
        # Under torchrun, the main process (rank 0) holds the trial for all of them.
        claim = holding(store, config.hash()) if os.environ.get("RANK", "0") == "0" else nullcontext()
        with claim:
            outcome = run_trial(
                config, store, force=force, resume=resume, reporter=reporter, log=check_trackers(log or [])
            )
    finally:
        restore_sigterm()
    if outcome.status == "cached":  # finished by another process meanwhile
        err_console.print(
            f"already done as trial {outcome.trial_id} in {store.url} (use --force to train it again)"
        )
    _print_trial(
        outcome.trial_id,
        outcome.config_hash,
        outcome.metrics,
        outcome.collapsed,
        outcome.wall_time_s,
        store.url,
    )


def _answer_from_store(config: TrialConfig, db: str | None, quiet: bool) -> bool:
    """Print the trial's result if a SQLite store holds it done, read without SQLAlchemy or torch."""
    from sslab.store_lookup import done_trial, resolve_url

    url = resolve_url(db)
    done = done_trial(url, config.hash())
    if done is None:
        return False
    if not quiet:
        _announce(config)
    err_console.print(f"already done as trial {done.id} in {url} (use --force to train it again)")
    _print_trial(done.id, done.config_hash, done.metrics, done.collapsed, done.wall_time_s, url)
    return True


def _announce(config: TrialConfig) -> None:
    err_console.print(
        f"trial {config.hash()}: {config.method} / {config.backbone} on {config.dataset}, "
        f"{config.epochs} epochs, batch {config.batch_size}"
    )


def _print_trial(
    trial_id: int,
    config_hash: str,
    metrics: dict[str, float],
    collapsed: bool | None,
    wall_time_s: float | None,
    url: str,
) -> None:
    table = Table(title=f"trial {trial_id} ({config_hash})", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        value = metrics[name]
        shown = f"{value:.4f}" if "top1" in name else f"{value:,.2f}"
        table.add_row(name, shown)
    table.add_row("collapsed", str(collapsed))
    if wall_time_s is not None:
        table.add_row("wall time (s)", f"{wall_time_s:,.1f}")
    console.print(table)
    console.print(f"recorded in {url}")


def _install_run_command() -> None:
    extra = [
        inspect.Parameter(
            "config_file",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--config",
                help="TOML file with any of the fields below \\[default: none]",
                exists=False,
            ),
            annotation=Path | None,
        ),
        inspect.Parameter(
            "sets",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None,
                "--set",
                help="override any field or method setting: --set key=value, --set dino.teacher_temp=0.07 "
                "(repeatable) \\[default: none]",
            ),
            annotation=list[str] | None,
        ),
        inspect.Parameter(
            "resume",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                False, "--resume", help="continue from this trial's last epoch checkpoint \\[default: off]"
            ),
            annotation=bool,
        ),
        inspect.Parameter(
            "force",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                False, "--force", help="train again even if this config is already done \\[default: off]"
            ),
            annotation=bool,
        ),
        inspect.Parameter(
            "db",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, "--db", help="results store URL \\[default: $SSLAB_DB, else sqlite:///results/sslab.db]"
            ),
            annotation=str | None,
        ),
        inspect.Parameter(
            "quiet",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(False, "--quiet", "-q", help="no progress output \\[default: off]"),
            annotation=bool,
        ),
        inspect.Parameter(
            "log",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                None, "--log", help="training curves to tensorboard and/or wandb (offline) \\[default: none]"
            ),
            annotation=list[str] | None,
        ),
    ]

    @handle_errors
    def run_command(**kwargs: Any) -> None:
        run(**kwargs)

    parameters = extra + _run_parameters()
    run_command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    run_command.__annotations__ = {p.name: p.annotation for p in parameters}
    run_command.__doc__ = run.__doc__
    app.command("run")(run_command)


_install_run_command()


# --- sslab results ---------------------------------------------------------------------------------------

FLOAT_FORMAT = "%.7g"  # metrics are float32: more digits would only show its rounding (0.77499998 for 0.775)
SUMMARY_COLUMNS = [
    "id",
    "hash",
    "method",
    "dataset",
    "data_fingerprint",
    "backbone",
    "epochs",
    "batch_size",
    "status",
    "linear_top1",
    "knn_top1",
    "baseline_linear_top1",
    "collapsed",
    "wall_time_s",
]


@app.command("results")
@handle_errors
def results(
    format: Annotated[
        str, typer.Option("--format", "-f", help="table | csv | json | markdown | latex")
    ] = "table",
    all_columns: Annotated[bool, typer.Option("--all", help="every config field and metric")] = False,
    study: Annotated[str | None, typer.Option("--study", help="only this study's trials")] = None,
    db: DbOption = None,
) -> None:
    """List recorded trials with their status and final metrics."""
    from sslab.report.data import study_trials
    from sslab.report.tables import frame_latex, frame_markdown, summary_view
    from sslab.store import Store

    if format not in ("table", "csv", "json", "markdown", "latex"):
        raise SslabError(f"unknown format {format!r}; use table, csv, json, markdown or latex")
    store = Store(db, create=False)
    frame = study_trials(store, study) if study else store.results_frame()
    if frame.empty:
        raise SslabError("the results store has no trials yet; run `sslab run` first")
    if not all_columns:
        frame = summary_view(frame, SUMMARY_COLUMNS)
        if "data_fingerprint" in frame and frame["data_fingerprint"].isna().all():  # no image folders
            frame = frame.drop(columns="data_fingerprint")
    if format == "csv":
        sys.stdout.write(frame.to_csv(index=False, float_format=FLOAT_FORMAT))
    elif format == "json":
        sys.stdout.write(frame.to_json(orient="records", indent=2, double_precision=7) + "\n")
    elif format in ("markdown", "latex"):
        sys.stdout.write(frame_markdown(frame) if format == "markdown" else frame_latex(frame))
    else:
        table = Table(show_header=True)
        for column in frame.columns:
            table.add_column(str(column), justify="right" if frame[column].dtype.kind in "if" else "left")
        for _, row in frame.iterrows():
            table.add_row(*(_cell(row[c]) for c in frame.columns))
        console.print(table)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) <= 1 else f"{value:,.1f}"
    return str(value)


# --- sslab data / augment ----------------------------------------------------------------------------------


@data_app.command("list")
@handle_errors
def data_list(
    data_dir: Annotated[str | None, typer.Option("--data-dir", help="also look here first")] = None,
) -> None:
    """Datasets, where each is looked for, and whether it is present."""
    from sslab.data import dataset_status

    table = Table(show_header=True)
    for column in ("dataset", "present", "found at / searched", "description"):
        table.add_column(column)
    for status in dataset_status(data_dir):
        if status.present:
            where = str(status.path) if status.path else "built in"
        else:
            where = "; ".join(str(p) for p in status.searched) or "pass imagefolder:PATH"
        table.add_row(status.name, "yes" if status.present else "no", where, status.description)
    console.print(table)


@augment_app.command("list")
@handle_errors
def augment_list() -> None:
    """Augmentation ops with their parameters and defaults."""
    from sslab.augment import describe_ops

    console.print(describe_ops(), highlight=False)


app.add_typer(study_app, name="study")
app.add_typer(store_app, name="store")
app.command("compare")(compare)


@app.command("methods")
@handle_errors
def methods_command(
    name: Annotated[str | None, typer.Argument(help="a method: list its settings")] = None,
) -> None:
    """Methods with their papers; `sslab methods NAME` lists that method's settings and defaults."""
    if name is None:
        table = Table(show_header=True)
        for column in ("method", "paper", "settings (sslab methods NAME for defaults)"):
            table.add_column(column)
        for method, info in methods().items():
            settings = ", ".join(info.settings) or "-"
            if info.multicrop:
                settings += " (multi-crop)"
            table.add_row(method, info.paper, settings)
        console.print(table)
        return
    info = method_info(name)
    console.print(
        f"[bold]{info.name}[/]: {info.paper}"
        + (f" (behaviour version {info.version})" if info.version > 1 else ""),
        highlight=False,
    )
    table = Table(show_header=True, title="settings: --set NAME.SETTING=VALUE, or a [NAME] table in TOML")
    for column in ("setting", "type", "default", "valid", "what it does", "default from"):
        table.add_column(column)
    for key, setting in info.settings.items():
        note = setting.help + (f" (read when {setting.needs} is true)" if setting.needs else "")
        table.add_row(
            f"{name}.{key}",
            setting.type.__name__,
            str(setting.default),
            setting.describe_range(),
            note,
            setting.source,
        )
    console.print(table)
    if info.shared_defaults:
        shared = ", ".join(f"{key}={value}" for key, value in info.shared_defaults.items())
        console.print(f"shared fields it sets differently from `sslab run --help`: {shared}", highlight=False)
    if info.ignores:
        console.print(f"shared fields it does not read: {', '.join(info.ignores)}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
