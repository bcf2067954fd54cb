"""What every `sslab` command module shares: the consoles, the --db option and one-line error handling."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from sslab.errors import SslabError

console = Console()
err_console = Console(stderr=True)

DbOption = Annotated[
    str | None,
    typer.Option("--db", help="results store URL (default $SSLAB_DB or sqlite:///results/sslab.db)"),
]


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """sslab's own warnings, as one line each when they happen (e.g. skipped files, before training)."""
    if issubclass(category, UserWarning) and category.__module__.startswith("sslab"):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def handle_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing errors into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = _show_warning  # restored when the block ends
                return command(*args, **kwargs)
        except SslabError as exc:
            err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper
