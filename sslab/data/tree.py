"""Listing ImageFolder-style trees (`<class>/<image>`, optionally under `train/` and `test/`).

A tree is read from a folder on disk or streamed from a tar archive without extracting it.
"""

from __future__ import annotations

import os
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from sslab.data.decode import ImageData
from sslab.errors import DatasetError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
SPLITS = ("train", "test")


@dataclass(frozen=True)
class TreeEntry:
    """One image file: its split ("train"/"test", or None in a tree without splits), class and data."""

    split: str | None
    label: str
    key: str  # path relative to the tree root, "/"-separated: stable across machines, used for ordering
    data: ImageData


@dataclass(frozen=True)
class Tree:
    """The image files of a tree, sorted by (split, label, key)."""

    entries: list[TreeEntry]
    has_splits: bool

    @property
    def classes(self) -> tuple[str, ...]:
        """Sorted names of the class folders that hold at least one image file."""
        return tuple(sorted({entry.label for entry in self.entries}))


def is_image_name(name: str) -> bool:
    """Whether a file name (or "/"-separated path) looks like a visible image file."""
    base = posixpath.basename(name)
    return posixpath.splitext(base)[1].lower() in IMAGE_SUFFIXES and not base.startswith(".")


def is_split_tree(folder: Path) -> bool:
    """Whether `folder` has both a `train/` and a `test/` subfolder."""
    return all((folder / split).is_dir() for split in SPLITS)


def list_folder_tree(root: Path) -> Tree:
    """List `root/<class>/**/<image>`, or `root/{train,test}/<class>/**/<image>` when both exist."""
    has_splits = is_split_tree(root)
    entries = []
    for split in SPLITS if has_splits else (None,):
        base = root / split if split else root
        for class_dir in _visible_subfolders(base):
            for path in _walk_images(class_dir):
                key = path.relative_to(root).as_posix()
                entries.append(TreeEntry(split, class_dir.name, key, path))
    return Tree(sorted(entries, key=_order), has_splits)


def read_tar(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Stream `path` and return {member name: bytes} for the regular files whose name `wanted` accepts."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                if member.isfile() and wanted(member.name):
                    handle = archive.extractfile(member)
                    if handle is not None:
                        members[member.name] = handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"cannot read archive {path} ({exc}); re-download or re-create it") from exc
    return members


def tree_from_members(members: dict[str, bytes]) -> Tree:
    """Find the tree root inside archive members (image files only) and list the tree below it.

    The root is the shallowest folder holding both `train/<class>/...` and `test/<class>/...`; without
    one, it is the deepest folder common to all images, whose subfolders are the classes.
    """
    paths = {name: _parts(name) for name in members if is_image_name(name)}
    paths = {name: parts for name, parts in paths.items() if not any(p.startswith(".") for p in parts)}
    root = _split_root(paths.values())
    has_splits = root is not None
    if root is None:
        root = _common_parent(paths.values())
    depth = len(root)
    entries = []
    for name, parts in paths.items():
        if parts[:depth] != root:
            continue
        rest = parts[depth:]
        if has_splits and len(rest) >= 3 and rest[0] in SPLITS:
            entries.append(TreeEntry(rest[0], rest[1], "/".join(rest), members[name]))
        elif not has_splits and len(rest) >= 2:
            entries.append(TreeEntry(None, rest[0], "/".join(rest), members[name]))
    return Tree(sorted(entries, key=_order), has_splits)


def _split_root(paths: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    """The shallowest prefix followed by both train/<class>/<file> and test/<class>/<file> paths."""
    splits_under: dict[tuple[str, ...], set[str]] = {}
    for parts in paths:
        for i, part in enumerate(parts[:-2]):
            if part in SPLITS:
                splits_under.setdefault(parts[:i], set()).add(part)
                break
    complete = [root for root, found in splits_under.items() if found == set(SPLITS)]
    return min(complete, key=lambda root: (len(root), root)) if complete else None


def _common_parent(paths: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """The deepest folder above the class folders: the common prefix of the images' folders."""
    parents = [parts[:-1] for parts in paths]
    if not parents:
        return ()
    prefix = os.path.commonprefix(parents)
    # All images in one folder: that folder is the single class, so the root is its parent.
    return tuple(prefix[:-1]) if all(len(p) == len(prefix) for p in parents) else tuple(prefix)


def _parts(name: str) -> tuple[str, ...]:
    """Components of an archive member name, without a leading "/" or "." ("./a/b.jpg" -> ("a", "b.jpg"))."""
    return tuple(part for part in name.split("/") if part not in ("", ".", ".."))


def _visible_subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DatasetError(f"cannot list {folder} ({exc}); check that it exists and is readable") from exc


def _walk_images(folder: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, name) for name in filenames if is_image_name(name))
    return found


def _order(entry: TreeEntry) -> tuple[str, str, str]:
    return (entry.split or "", entry.label, entry.key)
