"""Build sslab/data/embedded/fashion_mnist_mini.npz: a seeded, class-balanced subset of Fashion-MNIST.

Reads the four original IDX files (default: /usr/share/datasets/fashion-mnist, as installed by Debian's
dataset-fashion-mnist package) and keeps 1,000 train and 200 test images per class. The output is
byte-for-byte reproducible: same seed and source files, same file.

    .venv/bin/python scripts/make_embedded_dataset.py [--source DIR] [--output FILE] [--seed N]
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from sslab.data.fashion_mnist import CLASSES, idx_files  # noqa: E402
from sslab.data.idx import read_idx  # noqa: E402

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUTPUT = REPO / "sslab" / "data" / "embedded" / "fashion_mnist_mini.npz"
TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` random indices of every class, returned in their original order."""
    picks = [
        rng.choice(np.flatnonzero(labels == c), size=per_class, replace=False) for c in range(len(CLASSES))
    ]
    return np.sort(np.concatenate(picks))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed timestamps and maximum compression, so reruns match."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="folder with the 4 IDX files")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    files = idx_files(args.source)
    if files is None:
        print(
            f"error: {args.source} lacks the Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)"
        )
        return 1
    data = {key: read_idx(path) for key, path in files.items()}
    rng = np.random.default_rng(args.seed)
    train = balanced_indices(data["train_labels"], TRAIN_PER_CLASS, rng)
    test = balanced_indices(data["test_labels"], TEST_PER_CLASS, rng)
    write_npz(
        args.output,
        {
            "train_images": data["train_images"][train],
            "train_labels": data["train_labels"][train],
            "test_images": data["test_images"][test],
            "test_labels": data["test_labels"][test],
            "classes": np.array(CLASSES),
            # Positions in the official files, so the subset can be traced back to its source.
            "train_indices": train.astype(np.int32),
            "test_indices": test.astype(np.int32),
        },
    )
    size_mb = args.output.stat().st_size / 1e6
    print(f"wrote {args.output} ({len(train)} train, {len(test)} test, {size_mb:.2f} MB, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
