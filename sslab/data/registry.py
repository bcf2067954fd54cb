"""Dataset names, where each is searched for, and `load_dataset` / `dataset_status`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sslab.data import cifar, fashion_mnist, stl10
from sslab.data.cache import cache_file, load_cache, save_cache
from sslab.data.dataset import DatasetWarning, ImageDataset
from sslab.data.embedded import EMBEDDED_NAME, embedded_path, load_embedded
from sslab.data.imagefolder import load_imagefolder
from sslab.data.locations import DATA_ENV, Found, env_path, resolve_cache_dir
from sslab.data.resize import resize_dataset
from sslab.data.synthetic import make_synthetic
from sslab.errors import DatasetError

IMAGEFOLDER_PREFIX = "imagefolder:"
NO_DATA_DIR = (EMBEDDED_NAME, "synthetic")  # built in: a --data-dir is not looked at
DEFAULT_DATASET = EMBEDDED_NAME


@dataclass(frozen=True)
class DatasetSpec:
    """How one named dataset is found, decoded and (optionally) downloaded."""

    name: str
    description: str
    hint: str  # how to obtain it, for the "not found" message
    probe: Callable[[Path, bool], Found | None]
    decode: Callable[[Found, Path], ImageDataset]  # the found source, a folder for scratch files
    download: Callable[[Path], None] | None = None
    system_dirs: tuple[Path, ...] = ()


@dataclass(frozen=True)
class DatasetStatus:
    """Whether a dataset can be loaded, and where it was looked for (for `sslab data list`)."""

    name: str
    description: str
    searched: tuple[str, ...]  # the places looked in, in order
    path: str | None  # where it was found
    present: bool


# Lambdas look the module functions up at call time, so tests can monkeypatch them.
SPECS: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        description="Fashion-MNIST, 60,000 train / 10,000 test, 1x28x28, 10 classes",
        hint="pass --data-dir pointing at the folder with its four IDX files (apt-get install "
        "dataset-fashion-mnist puts them in /usr/share/datasets/fashion-mnist), or download=True",
        probe=lambda root, loose: fashion_mnist.probe(root, loose),
        decode=lambda found, scratch: fashion_mnist.decode(found),
        download=lambda dest: fashion_mnist.download(dest),
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        description="CIFAR-10, 50,000 train / 10,000 test, 3x32x32, 10 classes",
        hint="pass --data-dir pointing at cifar-10-batches-py, an ImageFolder tree with train/ and test/ "
        "or its .tar.gz, or download=True",
        probe=lambda root, loose: cifar.probe(cifar.CIFAR10, root, loose),
        decode=lambda found, scratch: cifar.decode(cifar.CIFAR10, found),
        download=lambda dest: cifar.download(cifar.CIFAR10, dest),
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        description="CIFAR-100, 50,000 train / 10,000 test, 3x32x32, 100 fine classes",
        hint="pass --data-dir pointing at cifar-100-python, an ImageFolder tree with train/ and test/ "
        "or its .tar.gz, or download=True",
        probe=lambda root, loose: cifar.probe(cifar.CIFAR100, root, loose),
        decode=lambda found, scratch: cifar.decode(cifar.CIFAR100, found),
        download=lambda dest: cifar.download(cifar.CIFAR100, dest),
    ),
    "stl10": DatasetSpec(
        name="stl10",
        description="STL-10, 5,000 train / 8,000 test / 100,000 unlabelled, 3x96x96, 10 classes",
        hint="pass --data-dir pointing at stl10_binary (or its parent), or download=True (about 2.6 GB)",
        probe=lambda root, loose: stl10.probe(root, loose),
        decode=lambda found, scratch: stl10.decode(found, scratch),
        download=lambda dest: stl10.download(dest),
    ),
}
_BUILTIN_DESCRIPTIONS = {
    EMBEDDED_NAME: "Fashion-MNIST subset shipped with sslab, 10,000 train / 2,000 test, 1x28x28, 10 classes",
    "synthetic": "procedural coloured shapes for tests, 1,000 train / 200 test, 3x32x32, 10 classes",
}
_IMAGEFOLDER_DESCRIPTION = "your own folder (or .tar.gz) of class subfolders, as RGB images"

DATASET_NAMES: tuple[str, ...] = (
    EMBEDDED_NAME,
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "stl10",
    f"{IMAGEFOLDER_PREFIX}PATH",
    "synthetic",
)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
) -> ImageDataset:
    """Load dataset `name` (one of DATASET_NAMES) as uint8 tensors, resized to `image_size` if given.

    Sources are searched in `data_dir`, then $SSLAB_DATA, then system folders and earlier downloads; with
    `download` a missing dataset is fetched into `cache_dir`/downloads. Decoded datasets are cached under
    `cache_dir`/datasets (default $SSLAB_CACHE or ~/.cache/sslab), keyed by name, size and the source's
    path, size and mtime. The embedded default and `synthetic` need no files and no cache.
    """
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DatasetError(f"image size must be a positive integer, got {image_size!r}")
    key = name.strip()
    if data_dir is not None and (key.lower() in NO_DATA_DIR or key.lower().startswith(IMAGEFOLDER_PREFIX)):
        missing = "" if Path(data_dir).expanduser().exists() else " (and does not exist)"
        warnings.warn(
            f"--data-dir {data_dir}{missing} is not used: dataset {key} needs no data folder",
            DatasetWarning,
            stacklevel=2,
        )
    if key.lower().startswith(IMAGEFOLDER_PREFIX):
        return _load_imagefolder(key, image_size, cache_dir)
    key = key.lower()
    if key == EMBEDDED_NAME:
        return resize_dataset(load_embedded(), image_size)
    if key == "synthetic":
        return make_synthetic(image_size or 32)
    spec = SPECS.get(key)
    if spec is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    cache_root = resolve_cache_dir(cache_dir)
    found = _locate(spec, data_dir, cache_root, download)

    def native() -> ImageDataset:
        return _cached(
            spec.name, found.path, None, cache_root, lambda: spec.decode(found, cache_root / "scratch")
        )

    if image_size is None:
        return native()
    return _cached(
        spec.name, found.path, image_size, cache_root, lambda: resize_dataset(native(), image_size)
    )


def dataset_status(data_dir: str | Path | None = None) -> list[DatasetStatus]:
    """One entry per name in DATASET_NAMES: description, places searched, and whether it was found."""
    cache_root = resolve_cache_dir(None)
    statuses = []
    for name in DATASET_NAMES:
        if name in SPECS:
            spec = SPECS[name]
            places = _places(spec, Path(data_dir).expanduser() if data_dir else None, cache_root)
            found = _search(spec, places)
            searched = tuple(label for label, _, _ in places)
            path = str(found.path) if found else None
            statuses.append(DatasetStatus(name, spec.description, searched, path, found is not None))
        elif name == EMBEDDED_NAME:
            path = str(embedded_path())
            present = embedded_path().is_file()
            statuses.append(DatasetStatus(name, _BUILTIN_DESCRIPTIONS[name], (path,), path, present))
        elif name == "synthetic":
            statuses.append(DatasetStatus(name, _BUILTIN_DESCRIPTIONS[name], (), None, True))
        else:
            statuses.append(DatasetStatus(name, _IMAGEFOLDER_DESCRIPTION, (), None, False))
    return statuses


_Place = tuple[str, Path | None, bool]  # (label for messages, path or None when unset, probe loosely)


def _places(spec: DatasetSpec, data_dir: Path | None, cache_root: Path) -> list[_Place]:
    """Where `spec` is looked for, in order."""
    places: list[_Place] = []
    if data_dir is not None:
        places.append((str(data_dir), data_dir, True))
    env = env_path(DATA_ENV)
    places.append((f"${DATA_ENV}={env}", env, False) if env else (f"${DATA_ENV} unset", None, False))
    places += [(str(folder), folder, False) for folder in spec.system_dirs]
    if spec.download is not None:
        downloads = _download_dir(cache_root, spec)
        places.append((str(downloads), downloads, False))
    return places


def _search(spec: DatasetSpec, places: list[_Place]) -> Found | None:
    for _, path, loose in places:
        if path is not None:
            found = spec.probe(path, loose)
            if found is not None:
                return found
    return None


def _locate(spec: DatasetSpec, data_dir: str | Path | None, cache_root: Path, download: bool) -> Found:
    """Find `spec`'s source, downloading it when allowed; DatasetError naming every place searched."""
    folder = Path(data_dir).expanduser() if data_dir else None
    if folder is not None and not folder.exists():
        raise DatasetError(
            f"data dir {folder} does not exist; pass an existing folder or archive for {spec.name}"
        )
    places = _places(spec, folder, cache_root)
    found = _search(spec, places)
    if found is None and download and spec.download is not None:
        destination = _download_dir(cache_root, spec)
        spec.download(destination)
        found = spec.probe(destination, False)
    if found is None:
        searched = ", ".join(label for label, _, _ in places)
        raise DatasetError(f"{spec.name} not found (searched: {searched}); {spec.hint}")
    return found


def _load_imagefolder(name: str, image_size: int | None, cache_dir: str | Path | None) -> ImageDataset:
    raw = name[len(IMAGEFOLDER_PREFIX) :].strip()
    if not raw:
        raise DatasetError("imagefolder needs a path: use imagefolder:PATH with a folder of class folders")
    path = Path(raw).expanduser()
    if not path.exists():
        raise DatasetError(
            f"imagefolder path {path} does not exist; pass imagefolder:PATH with a folder of class folders"
        )
    cache_root = resolve_cache_dir(cache_dir)
    scratch = cache_root / "scratch"  # the decoded images go to files there, not to memory
    return _cached(
        name, path, image_size, cache_root, lambda: load_imagefolder(path, image_size, name, scratch)
    )


def _cached(
    name: str, source: Path, image_size: int | None, cache_root: Path, build: Callable[[], ImageDataset]
) -> ImageDataset:
    """The dataset from its cache file if valid, else `build()` and write the cache file."""
    path = cache_file(cache_root, name, image_size, source)
    dataset = load_cache(path)
    if dataset is None:
        dataset = build()
        save_cache(path, dataset)
    return dataset


def _download_dir(cache_root: Path, spec: DatasetSpec) -> Path:
    return cache_root / "downloads" / spec.name
