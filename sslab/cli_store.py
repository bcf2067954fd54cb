"""`sslab store backup|export|import`: copies of the results store, and merging stores by trial identity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sslab.cli_common import DbOption, console, handle_errors

store_app = typer.Typer(help="Copies of the results store: backups, and trials moved between stores.")
FileArgument = Annotated[Path, typer.Argument(help="the file to write or read")]


@store_app.command("backup")
@handle_errors
def backup(target: FileArgument, db: DbOption = None) -> None:
    """Copy a SQLite store to a new FILE, consistently, even while studies write to it."""
    from sslab.store import Store
    from sslab.store_transfer import backup as copy

    store = Store(db, create=False)
    console.print(f"backed up {store.url} to {copy(store, target)}", highlight=False)


@store_app.command("export")
@handle_errors
def export(
    target: FileArgument,
    study: Annotated[str | None, typer.Option("--study", help="only this study's trials")] = None,
    db: DbOption = None,
) -> None:
    """Write the store's trials, metrics and studies to a new FILE (JSON lines) for `sslab store import`."""
    from sslab.store import Store
    from sslab.store_transfer import export_trials

    count = export_trials(Store(db, create=False), target, study)
    console.print(f"exported {count} trial(s) to {target}", highlight=False)


@store_app.command("import")
@handle_errors
def import_(source: FileArgument, db: DbOption = None) -> None:
    """Add the trials of an exported FILE that this store lacks, by identity: nothing is duplicated."""
    from sslab.store import Store
    from sslab.store_transfer import import_trials

    result = import_trials(Store(db), source)
    console.print(
        f"imported {result.added} new trial(s), replaced {result.replaced} unfinished one(s) by finished "
        f"ones, kept {result.kept} already here, skipped {result.skipped} still running; "
        f"{result.studies} new study record(s)",
        highlight=False,
        soft_wrap=True,
    )
