"""Reader for the IDX format of (Fashion-)MNIST: big-endian header, then raw unsigned bytes."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from sslab.errors import DatasetError

_UBYTE = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzip-compressed) into a uint8 array."""
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}; replace it with an intact copy") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] < 1:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes; replace it with an original copy")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) != header + int(np.prod(shape)):
        raise DatasetError(f"{path} is truncated (header says {shape}); replace it with an intact copy")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
