"""CIFAR-10 / CIFAR-100 from the official python batches, an ImageFolder tree, or a tarball of either."""

from __future__ import annotations

import pickle
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslab.data.dataset import ImageDataset
from sslab.data.download import fetch
from sslab.data.imagefolder import decode_split_tree
from sslab.data.locations import Found, child_entries, is_tarball, squash
from sslab.data.tree import Tree, is_image_name, is_split_tree, list_folder_tree, read_tar, tree_from_members
from sslab.errors import DatasetError

NATIVE_SIZE = 32


@dataclass(frozen=True)
class CifarVariant:
    """What tells CIFAR-10 and CIFAR-100 apart on disk."""

    name: str
    num_classes: int
    batches_folder: str  # the folder inside the official archive
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str

    @property
    def batch_files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)

    def matches(self, file_name: str) -> bool:
        """Whether a file or folder name refers to this variant ("cifar-10-batches-py", "CIFAR100", ...)."""
        squashed = squash(file_name)
        other = "cifar100" if self.name == "cifar10" else None
        return squashed.startswith(self.name) and not (other and squashed.startswith(other))


CIFAR10 = CifarVariant(
    "cifar10", 10, "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch", "batches.meta", "labels", "label_names",
)  # fmt: skip
CIFAR100 = CifarVariant(
    "cifar100", 100, "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names"
)
VARIANTS = {variant.name: variant for variant in (CIFAR10, CIFAR100)}


def probe(variant: CifarVariant, root: Path, loose: bool = False) -> Found | None:
    """Find `variant` at `root`: a batches folder, a tree, a tarball, or one of those below it.

    Below `root` only entries named like the variant count ("cifar-10-batches-py", "cifar10-jpeg.tar.gz");
    with `loose` (an explicitly given folder) a single unnamed candidate is accepted too.
    """
    if is_tarball(root):
        return Found(root, "tarball")
    found = _probe_folder(variant, root)
    if found is not None or not root.is_dir():
        return found
    children = child_entries(root)
    named = [child for child in children if variant.matches(child.name)]
    # Folders first: they read faster than archives.
    for child in sorted(named, key=lambda path: not path.is_dir()):
        found = _probe_folder(variant, child) or (Found(child, "tarball") if is_tarball(child) else None)
        if found is not None:
            return found
    if loose:  # an unnamed candidate, but never one named for the other variant (cifar10-jpeg.tar.gz)
        others = [other for other in VARIANTS.values() if other is not variant]
        candidates = [
            found
            for child in children
            if not any(other.matches(child.name) for other in others)
            and (
                found := _probe_folder(variant, child)
                or (Found(child, "tarball") if is_tarball(child) else None)
            )
        ]
        if len(candidates) == 1:
            return candidates[0]
    return None


def decode(variant: CifarVariant, found: Found) -> ImageDataset:
    """Decode the CIFAR source `found` at its native 32x32."""
    if found.layout == "batches":
        blobs = {}
        for name in variant.batch_files:
            try:
                blobs[name] = (found.path / name).read_bytes()
            except OSError as exc:
                raise DatasetError(
                    f"cannot read {found.path / name} ({exc}); restore the batch files"
                ) from exc
        return _from_batches(variant, blobs, str(found.path))
    if found.layout == "tree":
        return _from_tree(variant, list_folder_tree(found.path), str(found.path))
    wanted = set(variant.batch_files)
    members = read_tar(found.path, lambda name: is_image_name(name) or posixpath.basename(name) in wanted)
    batches = {posixpath.basename(name): data for name, data in members.items() if not is_image_name(name)}
    if wanted <= batches.keys():
        return _from_batches(variant, batches, str(found.path))
    return _from_tree(variant, tree_from_members(members), str(found.path))


def download(variant: CifarVariant, dest: Path) -> None:
    """Download the official python batches with torchvision into `dest`."""
    from torchvision.datasets import CIFAR10 as TvCifar10
    from torchvision.datasets import CIFAR100 as TvCifar100

    dataset = TvCifar10 if variant is CIFAR10 else TvCifar100
    fetch(variant.name, dest, lambda root: dataset(str(root), train=True, download=True))


def _probe_folder(variant: CifarVariant, folder: Path) -> Found | None:
    if not folder.is_dir():
        return None
    for candidate in (folder, folder / variant.batches_folder):
        if all((candidate / name).is_file() for name in variant.batch_files):
            return Found(candidate, "batches")
    return Found(folder, "tree") if is_split_tree(folder) else None


def _from_batches(variant: CifarVariant, blobs: dict[str, bytes], where: str) -> ImageDataset:
    """Build the dataset from the pickled batch files' bytes (keys: file names)."""
    meta = _unpickle(blobs[variant.meta_file], variant.meta_file, where)
    classes = tuple(_text(name) for name in _field(meta, variant.names_key, variant.meta_file, where))
    parts = [_batch(variant, blobs[name], name, where) for name in variant.train_files]
    train_images = torch.cat([images for images, _ in parts])
    train_labels = torch.cat([labels for _, labels in parts])
    test_images, test_labels = _batch(variant, blobs[variant.test_file], variant.test_file, where)
    return ImageDataset(variant.name, train_images, train_labels, test_images, test_labels, classes)


def _batch(variant: CifarVariant, blob: bytes, name: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(blob, name, where)
    data = np.asarray(_field(batch, "data", name, where), dtype=np.uint8)
    labels = np.asarray(_field(batch, variant.label_key, name, where), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * NATIVE_SIZE * NATIVE_SIZE or len(data) != len(labels):
        raise DatasetError(
            f"{where}/{name} holds malformed data {data.shape}; replace it with the original file"
        )
    images = torch.from_numpy(data.reshape(-1, 3, NATIVE_SIZE, NATIVE_SIZE).copy())
    return images, torch.from_numpy(labels)


def _from_tree(variant: CifarVariant, tree: Tree, where: str) -> ImageDataset:
    if not tree.entries:
        raise DatasetError(
            f"{where} holds neither {variant.name} python batches nor an ImageFolder tree of images; "
            f"point --data-dir at {variant.batches_folder} or at a tree with train/<class>/ and test/<class>/"
        )
    if not tree.has_splits:
        raise DatasetError(
            f"{where} has no train/ and test/ folders; {variant.name} needs train/<class>/ and test/<class>/"
        )
    if len(tree.classes) != variant.num_classes:
        raise DatasetError(
            f"{variant.name} needs {variant.num_classes} class folders but {where} has {len(tree.classes)}; "
            f"point --data-dir at a {variant.name} tree (or load it as imagefolder:PATH)"
        )
    return decode_split_tree(tree, variant.name, where, NATIVE_SIZE)


def _unpickle(blob: bytes, name: str, where: str) -> Any:
    try:
        return pickle.loads(blob, encoding="bytes")  # the official files are Python 2 pickles
    except Exception as exc:  # unpickling garbage raises almost any type
        raise DatasetError(
            f"{where}/{name} is not a readable CIFAR batch ({type(exc).__name__}); replace it"
        ) from exc


def _field(mapping: Any, key: str, name: str, where: str) -> Any:
    """`mapping[key]`, accepting bytes or str keys (Python 2 pickles load with bytes keys)."""
    if isinstance(mapping, dict):
        for candidate in (key.encode(), key):
            if candidate in mapping:
                return mapping[candidate]
    raise DatasetError(f"{where}/{name} lacks the '{key}' entry; replace it with the original file")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
