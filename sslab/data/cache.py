"""On-disk cache of decoded datasets as uint8 tensors, written atomically and keyed by the source's state."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from sslab.data.dataset import DatasetWarning, ImageDataset

# Bump when the stored layout or any decoder's output changes, so old cache files are not reused.
CACHE_FORMAT = 2  # 2: the unlabelled split (STL-10's) is kept too
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def fingerprint(path: Path) -> dict[str, int]:
    """Size and mtime of a file, or file count, total size and newest mtime (files and folders) of a tree."""
    info = path.stat()
    if not path.is_dir():
        return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    count, total, newest = 0, 0, info.st_mtime_ns
    stack = [path]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                try:
                    stat = entry.stat()
                except OSError:  # e.g. a dangling symlink: the decoder skips it as well
                    continue
                newest = max(newest, stat.st_mtime_ns)
                if entry.is_dir():
                    stack.append(Path(entry.path))
                else:
                    count, total = count + 1, total + stat.st_size
    return {"files": count, "size": total, "mtime_ns": newest}


def cache_file(cache_root: Path, name: str, image_size: int | None, source: Path) -> Path:
    """The cache file for `name` at `image_size` decoded from `source` in its current state."""
    resolved = source.resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40]
    size_tag = "native" if image_size is None else str(image_size)
    key = {"format": CACHE_FORMAT, "name": name, "image_size": image_size, "source": str(resolved)}
    source_hash = _digest(key)[:10]
    state_hash = _digest({**key, "state": fingerprint(resolved)})[:12]
    return cache_root / "datasets" / f"{slug}-{size_tag}-{source_hash}-{state_hash}.pt"


def load_cache(path: Path) -> ImageDataset | None:
    """The dataset stored at `path`; None when absent, or (with a warning) when unreadable or malformed."""
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # paged in on use
        return ImageDataset(
            name=str(blob["name"]),
            **{key: _tensor(blob[key]) for key in _KEYS},
            classes=tuple(str(c) for c in blob["classes"]),
            unlabelled_images=None
            if blob.get("unlabelled_images") is None
            else _tensor(blob["unlabelled_images"]),
        )
    except Exception as exc:  # whatever the failure, the file cannot be trusted
        warnings.warn(
            f"ignoring unreadable dataset cache {path} ({type(exc).__name__}); decoding the source again",
            DatasetWarning,
            stacklevel=3,
        )
        return None


def save_cache(path: Path, dataset: ImageDataset) -> None:
    """Write `dataset` to `path` atomically and drop older cache files of the same source and size."""
    blob: dict[str, Any] = {key: getattr(dataset, key) for key in _KEYS}
    blob.update(name=dataset.name, classes=list(dataset.classes), format=CACHE_FORMAT)
    blob["unlabelled_images"] = dataset.unlabelled_images
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
            tmp_name = tmp.name
            torch.save(blob, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # temp files start private; the data in them is not
        os.replace(tmp_name, path)
        tmp_name = None
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
        warnings.warn(
            f"could not write dataset cache {path} ({exc}); the next load will decode the source again",
            DatasetWarning,
            stacklevel=3,
        )
        return
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
    _remove_stale(path)


def _remove_stale(path: Path) -> None:
    """Delete cache files for the same source and size whose state hash differs from `path`'s."""
    stem_prefix = path.name.rsplit("-", 1)[0] + "-"  # the slug contains no glob metacharacters
    for other in path.parent.glob(f"{stem_prefix}*.pt"):
        if other != path:
            with contextlib.suppress(OSError):  # a stale file left behind only costs disk space
                other.unlink(missing_ok=True)


def _tensor(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(value).__name__}")
    return value


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
