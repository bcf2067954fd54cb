"""Running torchvision's dataset downloaders with failures turned into one-line DatasetErrors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sslab.errors import DatasetError


def fetch(name: str, dest: Path, download: Callable[[Path], object]) -> None:
    """Call `download(dest)` (a torchvision dataset constructor with download=True) for dataset `name`."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        download(dest)
    except Exception as exc:  # network, checksum and disk errors all arrive as different types
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DatasetError(
            f"downloading {name} into {dest} failed ({detail}); check the network connection, "
            "or pass --data-dir pointing at a local copy"
        ) from exc
