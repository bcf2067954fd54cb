"""Figure plumbing shared by the report modules: Agg-backed figures, saving by extension, embedding."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pandas as pd
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, FigureBase
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sslab.errors import ConfigError

FORMATS = (".png", ".svg", ".pdf")


def new_figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, independent of pyplot's global state."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def check_output(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"cannot write a figure to '{path}': use a .png, .svg or .pdf file name")
    return path


def save_figure(figure: Figure, path: str | Path, data: pd.DataFrame | None = None) -> Path:
    """Write the figure (format from the extension) and, if given, its plotted numbers as CSV beside it."""
    path = check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=150)
        if data is not None:
            data.to_csv(path.with_suffix(".csv"), index=False, float_format="%.7g")  # float32 metrics
    except OSError as exc:
        raise ConfigError(f"cannot write '{path}': {exc.strerror or exc}") from None
    return path


def png_data_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def add_notes(figure: FigureBase, notes: list[str], missing: bool = False) -> None:
    """A legend under the figure: the hatched 'no finished trial' swatch (if any are missing) and notes."""
    handles: list[Artist] = []
    labels = []
    if missing:
        handles.append(Patch(facecolor="white", edgecolor="0.6", hatch="///"))
        labels.append("no finished trial (blank, not zero)")
    for note in notes:
        handles.append(Line2D([], [], linestyle="none"))
        labels.append(note)
    if handles:
        figure.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=min(len(handles), 2),
            fontsize=7,
            frameon=False,
            handlelength=1.2 if missing else 0,
            handletextpad=0.5,
            labelcolor="0.3",
        )
