"""Image tensors backed by unlinked files, so that decoding a set larger than RAM never holds it in memory."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from sslab.errors import DatasetError


def image_buffer(count: int, size: int, scratch: Path | None) -> torch.Tensor:
    """An uninitialised uint8 (count, 3, size, size) tensor: in a file in `scratch` (unlinked at once, so
    paged out rather than held in RAM, and its space freed with it), or in memory without one."""
    shape = (count, 3, size, size)
    if scratch is None or count == 0:
        return torch.empty(shape, dtype=torch.uint8)
    try:
        scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=scratch, prefix="images-", delete=False) as handle:
            name = handle.name
        try:
            flat = torch.from_file(name, shared=True, size=count * 3 * size * size, dtype=torch.uint8)
        finally:
            os.unlink(name)  # the mapping keeps the data; the disk space goes with it
    except (OSError, RuntimeError) as exc:
        raise DatasetError(f"cannot make room for {count} images of {size} px in {scratch} ({exc})") from exc
    return flat.view(shape)
