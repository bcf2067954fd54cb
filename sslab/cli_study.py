"""`sslab study list|show|run|status` and `sslab compare`: each command parses, calls the study library and
prints."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from sslab import slurm
from sslab.cli_common import DbOption, console, err_console, handle_errors
from sslab.errors import ConfigError, SslabError
from sslab.signals import Terminated

study_app = typer.Typer(
    help="Studies: sets of trials that differ along named axes (studies/*.toml and the presets).",
    no_args_is_help=True,
)

NameArg = Annotated[
    str, typer.Argument(help="a study name (see `sslab study list`) or a path to a .toml file")
]
MethodOption = Annotated[str | None, typer.Option("--method", help="override the base config's method")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="override a base config field: --set key=value (repeatable)")
]

WorkersOption = Annotated[
    int | None, typer.Option("--workers", help="local worker processes (default: one per GPU, or 1)")
]
LogOption = Annotated[
    list[str] | None, typer.Option("--log", help="each trial's curves: tensorboard, wandb (offline)")
]
SeedsOption = Annotated[
    str | None, typer.Option("--seeds", help="replicate seeds instead of the file's, e.g. --seeds 0,1,2")
]


def _overrides(method: str | None, sets: list[str] | None, db: str | None) -> dict[str, str]:
    """`--method` and `--set`, a distillation teacher named by its pretraining hash (looked up in `db`)."""
    from sslab.config import parse_assignments
    from sslab.teachers import resolve_overrides

    overrides = parse_assignments(sets or [])
    if method is not None:
        overrides["method"] = method
    return resolve_overrides(overrides, db)


def _seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: give integers separated by commas, e.g. --seeds 0,1,2"
        ) from None


def _compare_seeds(text: str) -> list[int]:
    """`--seeds` of compare: a list like study run's. A lone number N used to mean seeds 0..N-1: refuse it
    rather than silently run seed N alone."""
    seeds = _seeds(text) or []
    if len(seeds) == 1 and "," not in text and seeds[0] >= 1:
        n = seeds[0]
        listed = ",".join(map(str, range(n)))
        raise ConfigError(
            f"--seeds lists the seeds, as for `study run`: --seeds {listed} for {n} seed(s); "
            f"--seeds {n}, for seed {n} alone"
        )
    return seeds


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "-"


@study_app.command("list")
@handle_errors
def study_list(db: DbOption = None) -> None:
    """Presets and files in studies/: trials, and done/running/failed from the results store."""
    from sslab.store import Store, StoreMissing
    from sslab.study import load_plan, study_files
    from sslab.study.status import counts_by_study

    try:
        recorded = counts_by_study(Store(db, create=False))
    except StoreMissing:  # no store yet: nothing recorded
        recorded = {}
    table = Table(show_header=True)
    table.add_column("study", no_wrap=True)
    for column in ("trials", "sampler", "in the store", "description"):
        table.add_column(column)
    for name, path in study_files().items():
        try:
            plan = load_plan(str(path))
            trials, sampler, description = str(plan.total), plan.spec.sampler, plan.spec.description
            stored = _counts_text(recorded.get(plan.name, {}))
        except SslabError as exc:
            trials, sampler, stored = "-", "-", "-"
            description = f"[red]invalid:[/] {str(exc).splitlines()[-1].strip()}"
        table.add_row(name, trials, sampler, stored, description)
    console.print(table)


@study_app.command("show")
@handle_errors
def study_show(
    name: NameArg,
    method: MethodOption = None,
    sets: SetOption = None,
    seeds: SeedsOption = None,
    db: DbOption = None,
) -> None:
    """Axes, trial count and the estimated time from throughput measured on finished trials."""
    from sslab.store import Store, StoreMissing
    from sslab.study import load_plan
    from sslab.study.progress import format_duration
    from sslab.study.status import estimate

    plan = load_plan(name, _overrides(method, sets, db), seeds=_seeds(seeds))
    spec = plan.spec
    console.print(f"[bold]{plan.name}[/]: {spec.description}  ({spec.path})", highlight=False)
    size = " x ".join(str(len(a.values)) for a in spec.axes if a.discrete)
    if plan.is_grid:
        excluded = f", {plan.excluded} excluded" if plan.excluded else ""
        console.print(f"sampler grid: {plan.total} trials ({size} x {len(spec.seeds)} seed(s){excluded})")
    else:
        console.print(f"sampler {spec.sampler}: {plan.total} trials, seed {spec.seeds[0]}")
    console.print(f"metric: {spec.metric} ({spec.direction})", highlight=False)
    if spec.protocol == "asymmetric":
        console.print("protocol asymmetric: aug1 = the studied ops (first, second), aug2 = identity")
    elif spec.protocol == "symmetric":
        console.print("protocol symmetric: both views use the studied ops (first, second)")
    if spec.pruner is not None:
        p = spec.pruner
        console.print(
            f"pruner: median on per-epoch {p.metric} after {p.startup_trials} trials, {p.warmup_epochs} "
            "warm-up epoch(s)"
        )
    base = {**spec.base, **plan.overrides}
    console.print("base: " + " ".join(f"{k}={v}" for k, v in base.items()), highlight=False)
    table = Table(show_header=True)
    table.add_column("axis")
    table.add_column("values")
    for axis in spec.axes:
        values = ", ".join(map(str, axis.values)) if axis.discrete else str(axis.describe())
        if axis.name in ("first", "second"):
            values = ", ".join(f"{op} = {spec.op_spec(op)}" for op in axis.values)
        table.add_row(axis.name, values)
    table.add_row("seed", ", ".join(map(str, spec.seeds)))
    console.print(table)
    for entry in spec.exclude:
        console.print("exclude: " + " ".join(f"{k} in {list(v)}" for k, v in entry.items()), highlight=False)
    try:
        store = Store(db, create=False)
    except StoreMissing:  # no store yet: nothing recorded
        console.print("estimated time: unknown (no results store yet to measure throughput from)")
        return
    guess = estimate(plan, store) if plan.is_grid else None
    if guess is not None and guess.remaining == 0:
        console.print("estimated time: none; every trial is finished in the store")
    elif guess is None:
        console.print("estimated time: unknown (no finished trial of this backbone and dataset in the store)")
    else:
        console.print(
            f"estimated time for the {guess.remaining} unfinished trials: {format_duration(guess.seconds)} "
            f"on one worker ({guess.basis})"
        )


@study_app.command("run")
@handle_errors
def study_run(
    name: NameArg,
    method: MethodOption = None,
    sets: SetOption = None,
    seeds: SeedsOption = None,
    workers: WorkersOption = None,
    devices: Annotated[
        str | None,
        typer.Option("--devices", help="comma-separated devices for the workers, e.g. cuda:0,cuda:1"),
    ] = None,
    db: DbOption = None,
    store_name: Annotated[
        str | None, typer.Option("--name", help="record the study under this name (default: the file's)")
    ] = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="re-point a recorded study at a changed base config")
    ] = False,
    heartbeat_timeout: Annotated[
        float,
        typer.Option("--heartbeat-timeout", help="seconds of silence after which a worker is presumed dead"),
    ] = 60.0,
    checkpoint_dir: Annotated[
        Path, typer.Option("--checkpoint-dir", help="where per-epoch checkpoints are kept for resuming")
    ] = Path("results/checkpoints"),
    log: LogOption = None,
) -> None:
    """Run the study's trials that are not done yet (resuming interrupted ones); Ctrl-C stops cleanly."""
    from sslab.study import load_plan
    from sslab.study.progress import format_duration
    from sslab.study.scheduler import RunOptions, run_study

    plan = load_plan(name, _overrides(method, sets, db), store_name, _seeds(seeds))
    if heartbeat_timeout <= 0:
        raise SslabError("--heartbeat-timeout must be > 0 seconds")
    device_list = tuple(d.strip() for d in devices.split(",") if d.strip()) if devices else None
    options = RunOptions(
        workers, device_list, heartbeat_timeout, replace, checkpoint_dir, log=tuple(log or ())
    )
    try:
        result = run_study(plan, db, options, err_console)
    except Terminated as exc:
        if exc.signum == signal.SIGUSR1:  # SLURM's warning before the time limit: come back and go on
            slurm.requeue_self()
        raise
    console.print(
        f"study {result.name}: {result.total} trials: {_counts_text(result.counts)}; "
        f"trained {result.trained} here in {format_duration(result.seconds)}",
        highlight=False,
    )
    for label, reason in result.failures:
        console.print(f"  failed: {label}: {reason}", highlight=False)


@study_app.command("status")
@handle_errors
def study_status(name: NameArg, db: DbOption = None) -> None:
    """Progress of a recorded study: one row per trial, failed trials with their reasons, live workers."""
    import pandas as pd

    from sslab.store import Store
    from sslab.study.status import study_status as read_status

    if name.endswith(".toml") or "/" in name:
        from sslab.study import load_spec

        name = load_spec(name).name
    status = read_status(Store(db, create=False), name)
    frame = status.frame
    metric = status.record.get("metric", "linear_top1")
    total = len(frame) if status.record.get("sampler", "grid") == "grid" else status.record.get("n_trials")
    console.print(f"[bold]{status.name}[/]: {total} trials: {_counts_text(status.counts)}", highlight=False)
    if not frame.empty:
        axes = [c for c in frame.columns if str(c).startswith("axis.")]
        table = Table(show_header=True)
        for column in [*(c[5:] for c in axes), "status", metric, "wall time (s)", "hash"]:
            table.add_column(column)
        for _, row in frame.iterrows():
            value = row.get(metric)
            wall = row.get("wall_time_s")
            table.add_row(
                *(str(row[c]) for c in axes),
                str(row["status"]),
                f"{value:.4f}" if isinstance(value, float) and not pd.isna(value) else "-",
                f"{wall:,.1f}" if isinstance(wall, float) and not pd.isna(wall) else "-",
                str(row["hash"]),
            )
        console.print(table)
        for _, row in frame[frame["status"].isin(["failed", "pruned"])].iterrows():
            label = " ".join(f"{c[5:]}={row[c]}" for c in axes)
            console.print(f"{row['status']}: {label}: {row.get('reason') or '-'}", highlight=False)
    if status.workers:
        table = Table(show_header=True, title="workers")
        for column in ("worker", "host", "job", "trial", "last heartbeat"):
            table.add_column(column)
        for worker, host, job, config_hash, age in status.workers:
            table.add_row(worker, host, job or "-", config_hash or "-", f"{age:.0f} s ago")
        console.print(table)


@handle_errors
def compare(
    methods: Annotated[list[str], typer.Argument(help="two or more method names, e.g. simclr byol")],
    seeds: Annotated[
        str, typer.Option("--seeds", help="replicate seeds, as for `study run`: e.g. --seeds 0,1,2")
    ] = "0,1,2",
    sets: Annotated[
        list[str] | None,
        typer.Option("--set", help="matched budget for every method: --set key=value (repeatable)"),
    ] = None,
    no_run: Annotated[bool, typer.Option("--no-run", help="only report trials already in the store")] = False,
    study: Annotated[
        str | None, typer.Option("--study", help="study name (default compare-METHOD1-METHOD2...)")
    ] = None,
    workers: WorkersOption = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="re-point a recorded comparison at a changed --set")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="learning-curve figure (default results/STUDY-curves.png)"),
    ] = None,
    db: DbOption = None,
) -> None:
    """Compare methods on one budget: a method x seed study, then mean ± std, paired differences, curves."""
    from sslab.config import parse_assignments
    from sslab.report.compare import load_comparison, pairs_table, render_curves, summary_table
    from sslab.report.figures import check_output
    from sslab.store import Store
    from sslab.study.compare import compare_plan
    from sslab.teachers import resolve_overrides

    if out is not None:
        check_output(out)  # before any training, not after
    overrides = resolve_overrides(parse_assignments(sets or []), db)
    plan = compare_plan(methods, _compare_seeds(seeds), overrides, study)
    store = Store(db)
    if no_run:
        from sslab.study.scheduler import prepare

        statuses = store.statuses(cell.hash for cell in plan.cells)
        if store.study(plan.name) is None and "done" not in statuses.values():
            raise SslabError(
                f"none of the {len(plan.cells)} trials of {plan.name} has finished; run it without --no-run"
            )
        prepare(plan, store, replace, "--study")
    else:
        from sslab.study.progress import format_duration
        from sslab.study.scheduler import RunOptions, run_study

        options = RunOptions(workers=workers, replace=replace, name_option="--study")
        result = run_study(plan, store.url, options, err_console)
        console.print(
            f"study {result.name}: {result.total} trials: {_counts_text(result.counts)}; "
            f"trained {result.trained} here in {format_duration(result.seconds)}",
            highlight=False,
        )
        for label, reason in result.failures:
            err_console.print(f"[red]failed:[/] {label}: {reason}", highlight=False)
    comparison = load_comparison(store, plan.name)
    console.print(summary_table(comparison))
    console.print(pairs_table(comparison))
    figure = render_curves(store, comparison, out)
    console.print(f"study {comparison.study}; learning curves: {figure or 'no per-epoch metrics recorded'}")


@study_app.command("submit")
@handle_errors
def study_submit(
    name: NameArg,
    slurm_backend: Annotated[bool, typer.Option("--slurm", help="submit to SLURM (the one backend)")] = False,
    jobs: Annotated[int, typer.Option("--jobs", help="array tasks, one worker each")] = 2,
    partition: Annotated[str | None, typer.Option("--partition", help="SLURM partition")] = None,
    gpus_per_job: Annotated[int, typer.Option("--gpus-per-job", help="GPUs per task")] = 0,
    time_limit: Annotated[
        str | None, typer.Option("--time", help="time limit per task, e.g. 4:00:00")
    ] = None,
    account: Annotated[str | None, typer.Option("--account", help="SLURM account")] = None,
    cpus_per_job: Annotated[int | None, typer.Option("--cpus-per-job", help="CPUs per task")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the sbatch script, submit nothing")
    ] = False,
    method: MethodOption = None,
    sets: SetOption = None,
    seeds: SeedsOption = None,
    store_name: Annotated[
        str | None, typer.Option("--name", help="record the study under this name (default: the file's)")
    ] = None,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir",
            help="checkpoints, on a path every node reads [default: beside a SQLite store]",
        ),
    ] = None,
    log_dir: Annotated[Path, typer.Option("--log-dir", help="where the tasks write their logs")] = Path(
        "results/slurm"
    ),
    log: LogOption = None,
    db: DbOption = None,
) -> None:
    """Run the study's workers as a SLURM job array sharing the study's store; prints the sbatch script with
    --dry-run."""
    from sslab.store import resolve_url
    from sslab.study import find_study, load_plan
    from sslab.tracking import check_trackers

    if not slurm_backend:
        raise SslabError("say where to submit: --slurm (the one backend so far)")
    options = slurm.SlurmOptions(jobs, partition, gpus_per_job, time_limit, account, cpus_per_job)
    overrides = _overrides(method, sets, db)
    plan = load_plan(name, overrides, store_name, _seeds(seeds))  # every problem before anything is queued
    url = resolve_url(db)
    slurm.check_store(url, jobs)
    checkpoints = slurm.checkpoint_dir(url, checkpoint_dir)
    sslab = Path(sys.argv[0]).resolve() if Path(sys.argv[0]).name == "sslab" else None
    command = [str(sslab)] if sslab else [sys.executable, "-m", "sslab.cli"]
    command += ["study", "run", str(find_study(name).resolve()), "--db", url, "--name", plan.name]
    command += ["--checkpoint-dir", str(checkpoints), "--workers", "1"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    if seeds:
        command += ["--seeds", seeds]
    for tracker in check_trackers(log or []):
        command += ["--log", tracker]
    script = slurm.sbatch_script(command, plan.name, options, log_dir.resolve(), Path.cwd())
    if dry_run:
        sys.stdout.write(script)
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    job = slurm.submit(script)
    console.print(
        f"submitted job array {job} ({jobs} task(s)) for study {plan.name}; logs in {log_dir}; "
        f"follow it with: sslab study status {plan.name} --db {url}",
        highlight=False,
        soft_wrap=True,
    )
