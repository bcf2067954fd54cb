"""Where datasets and caches live: environment variables, default folders and found sources."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "SSLAB_DATA"
CACHE_ENV = "SSLAB_CACHE"

TARBALL_SUFFIXES = (".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Found:
    """A dataset source on disk: its path and how it is laid out (e.g. "batches", "tree", "tarball")."""

    path: Path
    layout: str


def env_path(var: str) -> Path | None:
    """The path in environment variable `var`, or None when it is unset or empty."""
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else None


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """The cache root: `cache_dir`, else $SSLAB_CACHE, else ~/.cache/sslab."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return env_path(CACHE_ENV) or Path.home() / ".cache" / "sslab"


def squash(name: str) -> str:
    """Lower-case `name` with everything but letters and digits removed ("CIFAR-10_x" -> "cifar10x")."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_tarball(path: Path) -> bool:
    """Whether `path` is a file named like a (gzipped) tar archive."""
    return path.is_file() and path.name.lower().endswith(TARBALL_SUFFIXES)


def child_entries(folder: Path) -> list[Path]:
    """Sorted entries of `folder`, or [] when it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []
