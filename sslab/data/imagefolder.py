"""Decoding ImageFolder trees: user folders (`imagefolder:PATH`) and CIFAR trees."""

from __future__ import annotations

import hashlib
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sslab.data.dataset import DatasetWarning, ImageDataset
from sslab.data.decode import decode_fit, decode_native, header_size
from sslab.data.locations import is_tarball
from sslab.data.scratch import image_buffer
from sslab.data.tree import Tree, TreeEntry, is_image_name, list_folder_tree, read_tar, tree_from_members
from sslab.errors import DatasetError

TEST_FRACTION = 0.2
MAX_AUTO_SIZE = 64
_COPY_CHUNK = 1024  # images copied into a split per step: bounds the memory a large set needs


def load_imagefolder(
    path: Path, image_size: int | None, name: str, scratch: Path | None = None
) -> ImageDataset:
    """Load a folder (or .tar/.tar.gz) of class subfolders as RGB images of image_size x image_size.

    Layout: `PATH/<class>/**/<image>`, or `PATH/train/<class>/...` plus `PATH/test/<class>/...`, which
    are then used as the splits. Without them, each class is split 80/20 into train/test: its files are
    ordered by a hash of their path relative to PATH and the first 20% (at least one image of a class
    with two or more) go to test, so the split is deterministic, stratified, and stable when files are
    added. Every image is converted to RGB (transparency composited onto white), its short side resized
    to image_size (antialiased) and center-cropped to a square. With image_size None it is the most
    common short side among the images (the smaller on ties), capped at 64. Unreadable files are skipped
    with one DatasetWarning that counts them.

    With `scratch`, each image is decoded straight into a file there (unlinked at once: the mapping holds
    it, and the operating system pages it out), so that a set larger than RAM (ImageNet-100 at 224 px,
    19 GB) is decoded without holding it in memory; the splits are then copied chunk by chunk into files
    of their own. Without it, the images are held in memory.
    """
    if is_tarball(path):
        tree = tree_from_members(read_tar(path, is_image_name))
    elif path.is_dir():
        tree = list_folder_tree(path)
    else:
        raise DatasetError(
            f"imagefolder path {path} does not exist; pass imagefolder:PATH with a folder of class folders"
        )
    if not tree.entries:
        raise DatasetError(
            f"{path} holds no images in class subfolders; expected PATH/<class>/<image> "
            "or PATH/train/<class>/<image> and PATH/test/<class>/<image>"
        )
    failed: dict[str, str] = {}
    size = image_size or _auto_size(tree.entries, failed)
    images = image_buffer(len(tree.entries), size, scratch)
    decoded = [False] * len(tree.entries)
    for i, entry in enumerate(tree.entries):
        if entry.key in failed:
            continue
        try:
            images[i] = torch.from_numpy(decode_fit(entry.data, size)).permute(2, 0, 1)
            decoded[i] = True
        except Exception as exc:  # PIL raises many types for corrupt data
            failed[entry.key] = _reason(exc)
    return _assemble(name, tree, images, decoded, failed, str(path), size, scratch)


def decode_split_tree(tree: Tree, name: str, where: str, size: int) -> ImageDataset:
    """Decode a train/test tree whose images should all be size x size (others are fitted)."""
    decoded = decode_native([entry.data for entry in tree.entries], size)
    failed = {
        entry.key: "cannot decode"
        for entry, image in zip(tree.entries, decoded, strict=True)
        if image is None
    }
    images = image_buffer(len(decoded), size, None)
    for i, image in enumerate(decoded):
        if image is not None:
            images[i] = image
    ok = [image is not None for image in decoded]
    return _assemble(name, tree, images, ok, failed, where, size, None)


def stratified_test_mask(
    keys: Sequence[str], labels: Sequence[str], fraction: float = TEST_FRACTION
) -> list[bool]:
    """Which items go to test: per class, the first `fraction` (>= 1 of >= 2) ordered by a hash of the key."""
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    mask = [False] * len(keys)
    for members in by_class.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda i: hashlib.sha256(keys[i].encode()).digest())
        for i in members[: max(1, round(len(members) * fraction))]:
            mask[i] = True
    return mask


def _auto_size(entries: Sequence[TreeEntry], failed: dict[str, str]) -> int:
    """The most common short side among readable images (smaller on ties), capped at MAX_AUTO_SIZE."""
    sides: Counter[int] = Counter()
    for entry in entries:
        try:
            sides[min(header_size(entry.data))] += 1
        except Exception as exc:  # PIL raises many types for corrupt data
            failed[entry.key] = _reason(exc)
    if not sides:
        return MAX_AUTO_SIZE
    most = max(sides.values())
    return min(MAX_AUTO_SIZE, min(side for side, count in sides.items() if count == most))


def _assemble(
    name: str,
    tree: Tree,
    images: torch.Tensor,
    decoded: list[bool],
    failed: dict[str, str],
    where: str,
    size: int,
    scratch: Path | None,
) -> ImageDataset:
    """Copy the decoded images (the rows of `images` marked `decoded`) into train/test splits, warning once
    about the skipped files."""
    keep = [i for i, ok in enumerate(decoded) if ok]
    if not keep:
        raise DatasetError(f"none of the {len(images)} image files in {where} could be read; check the files")
    if failed:
        example, reason = min(failed.items())
        count = len(failed)
        warnings.warn(
            f"skipped {count} unreadable image file{'s' if count != 1 else ''} in {where} "
            f"(e.g. {example}: {reason})",
            DatasetWarning,
            stacklevel=4,
        )
    entries = [tree.entries[i] for i in keep]
    if tree.has_splits:
        _check_split_classes(tree, where)
        is_test = [entry.split == "test" for entry in entries]
    else:
        is_test = stratified_test_mask([e.key for e in entries], [e.label for e in entries])
    index = {label: i for i, label in enumerate(tree.classes)}
    splits = {}
    for test in (False, True):
        chosen = [i for i, flag in zip(keep, is_test, strict=True) if flag == test]
        split = image_buffer(len(chosen), size, scratch)
        for start in range(0, len(chosen), _COPY_CHUNK):
            split[start : start + _COPY_CHUNK] = images[torch.tensor(chosen[start : start + _COPY_CHUNK])]
        labels = np.array([index[tree.entries[i].label] for i in chosen], dtype=np.int64)
        splits[test] = (split, torch.from_numpy(labels))
    return ImageDataset(name, *splits[False], *splits[True], tree.classes)


def _check_split_classes(tree: Tree, where: str) -> None:
    """A class in test/ that train/ lacks (e.g. `Ship` beside `ship`) would be scored but never learned."""
    train = {entry.label for entry in tree.entries if entry.split == "train"}
    test = {entry.label for entry in tree.entries if entry.split == "test"}
    missing = sorted(test - train)
    if missing:
        raise DatasetError(
            f"{where}: test/ has class folder(s) {', '.join(missing)} that train/ lacks (train/ has "
            f"{', '.join(sorted(train))}); rename them to match (class names are case-sensitive)"
        )


def _reason(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]
