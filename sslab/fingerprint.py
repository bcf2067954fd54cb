"""A fingerprint of a dataset folder's content, so that a changed folder is a new trial, not an old result.

It covers every file's path, size and modification time (not the bytes: reading a large folder twice would
cost more than the check is worth); an archive is fingerprinted by its own size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

REUSE_SECONDS = 5.0  # a study's cells, built within moments, share one scan of their folder
_recent: dict[str, tuple[float, str | None]] = {}


def folder_fingerprint(path: str) -> str | None:
    """16 hex digits for the content under `path`, or None when there is nothing there."""
    now = time.monotonic()
    if path in _recent and now - _recent[path][0] < REUSE_SECONDS:
        return _recent[path][1]
    _recent[path] = (now, _scan(Path(path).expanduser()))
    return _recent[path][1]


def forget() -> None:
    """Scan again on the next call (for a process that changes a folder and builds configs at once)."""
    _recent.clear()


def _scan(root: Path) -> str | None:
    digest = hashlib.sha256()
    if root.is_file():
        stat = root.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()[:16]
    if not root.is_dir():
        return None
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            file = Path(folder) / name
            stat = file.stat()
            digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
