"""Tests for sslab.data: every dataset source, the cache, and the error messages."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sslab.data.cifar as cifar_module
import sslab.data.registry as registry
from sslab.data import (
    DATASET_NAMES,
    DEFAULT_DATASET,
    DatasetWarning,
    ImageDataset,
    dataset_status,
    load_dataset,
)
from sslab.data.cache import cache_file
from sslab.data.download import fetch
from sslab.data.embedded import embedded_path
from sslab.data.fashion_mnist import CLASSES as FASHION_CLASSES
from sslab.data.imagefolder import stratified_test_mask
from sslab.data.synthetic import make_synthetic
from sslab.errors import DatasetError

REPO = Path(__file__).resolve().parents[1]
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
REAL_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads $SSLAB_DATA from the machine or writes to the real cache."""
    monkeypatch.delenv("SSLAB_DATA", raising=False)
    monkeypatch.setenv("SSLAB_CACHE", str(tmp_path_factory.mktemp("default-cache")))


def _single_line(exc: pytest.ExceptionInfo[DatasetError]) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- builders for fake sources


def _save(image: Image.Image, path: Path, fmt: str | None = None, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)


def _solid(mode: str, size: tuple[int, int], value: int | tuple[int, ...]) -> Image.Image:
    return Image.new(mode, size, value)


def make_mixed_folder(root: Path) -> dict[str, int]:
    """Three classes of mixed formats, modes and sizes, one corrupt file and some non-images."""
    rng = np.random.default_rng(0)
    counts = {}
    for c, label in enumerate(("cat", "dog", "fish")):
        folder = root / label
        images = [
            ("rgb.jpg", Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "JPEG"),
            ("gray.png", _solid("L", (50, 50), 60 + c), "PNG"),
            ("rgba.png", _solid("RGBA", (20, 64), (200, 10, 10, 255)), "PNG"),
            ("palette.png", _solid("RGB", (48, 48), (0, 0, 255)).convert("P"), "PNG"),
            ("small.bmp", _solid("RGB", (16, 16), (9, 9, 9)), "BMP"),
            ("photo.webp", _solid("RGB", (64, 48), (0, 128, 0)), "WEBP"),
        ]
        for i in range(4):  # most images have a short side of 40: the auto size
            images.append((f"extra{i}.jpg", _solid("RGB", (40 + 10 * i, 40), (c * 50, 100, 20)), "JPEG"))
        for name, image, fmt in images:
            _save(image, folder / name, fmt)
        counts[label] = len(images)
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.jpg").write_bytes(b"ignored: hidden")
    (root / "fish" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return counts


def make_split_tree(root: Path, classes: tuple[str, ...], train: int, test: int, fmt: str = "PNG") -> dict:
    """root/{train,test}/<class>/<i>.<ext> with 32x32 images whose pixels encode (split, class, index)."""
    pixels: dict[tuple[str, str, int], np.ndarray] = {}
    ext = "png" if fmt == "PNG" else "jpg"
    for split, count in (("train", train), ("test", test)):
        for c, label in enumerate(classes):
            for i in range(count):
                array = np.full(
                    (32, 32, 3), (c * 20, i * 30, 200 if split == "train" else 50), dtype=np.uint8
                )
                array[:8, :8] = 255 - array[:8, :8]
                _save(Image.fromarray(array), root / split / label / f"{i:04d}.{ext}", fmt)
                pixels[(split, label, i)] = array
    return pixels


def make_tarball(tree: Path, tarball: Path, arcname: str) -> Path:
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(tree, arcname=arcname)
    return tarball


def make_cifar10_batches(folder: Path, per_batch: int = 4) -> dict[str, dict]:
    """A fake cifar-10-batches-py: Python-2-style pickles with bytes keys."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": [int(x) for x in rng.integers(0, 10, per_batch)],
            b"batch_label": name.encode(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    meta = {b"label_names": [name.encode() for name in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return batches


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


# ---------------------------------------------------------------- embedded default and synthetic


def test_embedded_default_loads_and_is_balanced() -> None:
    assert DEFAULT_DATASET == "fashion-mnist-mini"
    ds = load_dataset(DEFAULT_DATASET)
    assert ds.name == DEFAULT_DATASET
    assert ds.train_images.shape == (10_000, 1, 28, 28) and ds.test_images.shape == (2_000, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.is_contiguous() and ds.test_images.is_contiguous()
    assert ds.classes == FASHION_CLASSES and ds.num_classes == 10
    assert (ds.channels, ds.image_size) == (1, 28)
    assert ds.train_labels.bincount().tolist() == [1000] * 10
    assert ds.test_labels.bincount().tolist() == [200] * 10
    assert 40 < ds.train_images.float().mean() < 120  # real clothing images, not blank


def test_embedded_file_stays_small() -> None:
    assert embedded_path().stat().st_size < 8_000_000


def test_embedded_resizes_on_request() -> None:
    ds = load_dataset(DEFAULT_DATASET, image_size=32)
    assert ds.train_images.shape == (10_000, 1, 32, 32) and ds.image_size == 32


def test_synthetic_is_deterministic() -> None:
    a = load_dataset("synthetic")
    b = load_dataset("synthetic")
    assert a.train_images.shape == (1000, 3, 32, 32) and a.test_images.shape == (200, 3, 32, 32)
    assert a.train_labels.bincount().tolist() == [100] * 10
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, make_synthetic(seed=1).train_images)
    assert load_dataset("synthetic", image_size=16).train_images.shape == (1000, 3, 16, 16)
    # Classes differ on average: the class-mean images are far apart.
    means = torch.stack([a.train_images[a.train_labels == c].float().mean(0) for c in range(10)])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 100


def test_image_dataset_validates_layout() -> None:
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(2, dtype=torch.int64)
    ds = ImageDataset("x", images, labels, images, labels, ("a",))
    assert "train=2" in repr(ds)
    with pytest.raises(DatasetError):
        ImageDataset("x", images.float(), labels, images, labels, ("a",))
    with pytest.raises(DatasetError):
        ImageDataset("x", images, labels + 1, images, labels, ("a",))


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_mixed_files(tmp_path: Path) -> None:
    counts = make_mixed_folder(tmp_path / "pets")
    with pytest.warns(DatasetWarning) as record:
        ds = load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=24, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in record if issubclass(w.category, DatasetWarning)]
    assert len(messages) == 1 and "skipped 1 unreadable image file in" in messages[0]
    assert "broken.png" in messages[0]
    assert ds.classes == ("cat", "dog", "fish")
    assert ds.train_images.shape[1:] == (3, 24, 24) and ds.test_images.shape[1:] == (3, 24, 24)
    assert len(ds.train_labels) + len(ds.test_labels) == sum(counts.values())
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.is_contiguous()


def test_imagefolder_auto_size_and_colour_handling(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _save(_solid("RGBA", (40, 40), (0, 0, 0, 0)), root / "a" / "clear.png")  # transparent -> white
    _save(_solid("L", (40, 60), 77), root / "a" / "gray.png")
    _save(_solid("RGB", (300, 200), (10, 20, 30)), root / "b" / "big.jpg", quality=100)
    _save(_solid("RGB", (40, 40), (1, 2, 3)).convert("P"), root / "b" / "pal.gif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "cache")
    assert ds.image_size == 40  # most common short side
    everything = torch.cat([ds.train_images, ds.test_images])
    labels = torch.cat([ds.train_labels, ds.test_labels])
    assert everything.shape == (4, 3, 40, 40)
    means = {tuple(image.float().mean((1, 2)).round().int().tolist()) for image in everything}
    assert (255, 255, 255) in means and (77, 77, 77) in means
    assert labels.bincount().tolist() == [2, 2]


def test_imagefolder_auto_size_is_capped(tmp_path: Path) -> None:
    for i in range(2):
        _save(_solid("RGB", (200, 150), (i, i, i)), tmp_path / "f" / f"c{i}" / "x.png")
    ds = load_dataset(f"imagefolder:{tmp_path / 'f'}", cache_dir=tmp_path / "cache")
    assert ds.image_size == 64


def test_imagefolder_uses_train_test_folders(tmp_path: Path) -> None:
    make_split_tree(tmp_path / "tree", ("x", "y"), train=3, test=2)
    ds = load_dataset(f"imagefolder:{tmp_path / 'tree'}", image_size=16, cache_dir=tmp_path / "cache")
    assert ds.classes == ("x", "y")
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_labels.tolist() == [0, 0, 1, 1]
    assert ds.train_images.shape == (6, 3, 16, 16)


def test_imagefolder_auto_split_is_stratified_and_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for c, count in enumerate((10, 5, 1)):
        for i in range(count):
            _save(_solid("RGB", (20, 20), (c * 80, i * 20, 0)), root / f"class{c}" / f"{i}.png")
    first = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "c1")
    second = load_dataset(f"imagefolder:{root}", cache_dir=tmp_path / "c2")
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_images, second.test_images)
    assert first.test_labels.bincount(minlength=3).tolist() == [2, 1, 0]
    assert first.train_labels.bincount(minlength=3).tolist() == [8, 4, 1]


def test_stratified_mask_is_stable_when_files_are_added() -> None:
    keys = [f"a/{i}.png" for i in range(20)]
    before = stratified_test_mask(keys, ["a"] * 20)
    after = stratified_test_mask(keys + ["a/new.png"], ["a"] * 21)
    assert sum(before) == 4 and sum(after) == 4
    assert sum(b != a for b, a in zip(before, after[:20], strict=True)) <= 2


def test_imagefolder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as exc:
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", cache_dir=tmp_path / "cache")
    assert "no images in class subfolders" in _single_line(exc)
    _save(_solid("RGB", (8, 8), 0), tmp_path / "loose" / "a.png")  # images but no class folders
    with pytest.raises(DatasetError):
        load_dataset(f"imagefolder:{tmp_path / 'loose'}", cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetError) as exc:
        load_dataset(f"imagefolder:{tmp_path / 'missing'}", cache_dir=tmp_path / "cache")
    assert "does not exist" in _single_line(exc)
    with pytest.raises(DatasetError):
        load_dataset("imagefolder:", cache_dir=tmp_path / "cache")


def test_imagefolder_from_tarball(tmp_path: Path) -> None:
    make_mixed_folder(tmp_path / "pets")
    tarball = make_tarball(tmp_path / "pets", tmp_path / "pets.tar.gz", "pets")
    with pytest.warns(DatasetWarning, match="skipped 1 unreadable"):
        from_tar = load_dataset(f"imagefolder:{tarball}", image_size=20, cache_dir=tmp_path / "c1")
    with pytest.warns(DatasetWarning):
        from_dir = load_dataset(f"imagefolder:{tmp_path / 'pets'}", image_size=20, cache_dir=tmp_path / "c2")
    assert torch.equal(from_tar.train_images, from_dir.train_images)
    assert torch.equal(from_tar.test_labels, from_dir.test_labels)


# ---------------------------------------------------------------- cifar


def test_cifar10_from_tarball_of_tree(tmp_path: Path) -> None:
    pixels = make_split_tree(tmp_path / "src", CIFAR10_CLASSES, train=3, test=1)
    tarball = make_tarball(tmp_path / "src", tmp_path / "cifar10-mini.tar.gz", "cifar10-mini")
    ds = load_dataset("cifar10", data_dir=tarball, cache_dir=tmp_path / "cache")
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_images.shape == (30, 3, 32, 32) and ds.test_images.shape == (10, 3, 32, 32)
    assert ds.train_labels.tolist() == [c for c in range(10) for _ in range(3)]
    expected = torch.from_numpy(pixels[("train", "bird", 1)]).permute(2, 0, 1)
    assert torch.equal(ds.train_images[2 * 3 + 1], expected)
    # The folder holding the tarball works too: it is found by its name.
    again = load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache2")
    assert torch.equal(again.test_images, ds.test_images)


def test_a_cifar10_archive_is_not_taken_for_cifar100(tmp_path: Path) -> None:
    make_split_tree(tmp_path / "src", CIFAR10_CLASSES, train=1, test=1)
    (tmp_path / "data").mkdir()
    make_tarball(tmp_path / "src", tmp_path / "data" / "cifar10-jpeg.tar.gz", "cifar10-jpeg")
    present = {status.name: status.present for status in dataset_status(tmp_path / "data")}
    assert present["cifar10"] and not present["cifar100"]


def test_cifar10_from_jpeg_tree_folder(tmp_path: Path) -> None:
    pixels = make_split_tree(tmp_path / "tree", CIFAR10_CLASSES, train=2, test=1, fmt="JPEG")
    ds = load_dataset("cifar10", data_dir=tmp_path / "tree", cache_dir=tmp_path / "cache")
    original = torch.from_numpy(pixels[("test", "truck", 0)]).permute(2, 0, 1).float()
    assert (ds.test_images[9].float() - original).abs().mean() < 4  # JPEG is lossy
    # A folder containing the tree (under any name) is accepted for --data-dir.
    parent = load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache2")
    assert torch.equal(parent.train_images, ds.train_images)
    resized = load_dataset("cifar10", data_dir=tmp_path / "tree", image_size=16, cache_dir=tmp_path / "cache")
    assert resized.train_images.shape == (20, 3, 16, 16)


def test_cifar10_tree_with_wrong_class_count(tmp_path: Path) -> None:
    make_split_tree(tmp_path / "tree", ("a", "b"), train=1, test=1)
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", data_dir=tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert "needs 10 class folders" in _single_line(exc)


def test_cifar10_python_batches(tmp_path: Path) -> None:
    batches = make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):
        ds = load_dataset("cifar10", data_dir=data_dir, cache_dir=tmp_path / "cache")
        assert ds.classes == CIFAR10_CLASSES
        assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
        second = batches["data_batch_2"]
        assert torch.equal(ds.train_images[4], torch.from_numpy(second[b"data"][0].reshape(3, 32, 32)))
        assert ds.train_labels[4:8].tolist() == second[b"labels"]
        assert ds.test_labels.tolist() == batches["test_batch"][b"labels"]


def test_cifar10_python_batches_in_tarball(tmp_path: Path) -> None:
    batches = make_cifar10_batches(tmp_path / "src" / "cifar-10-batches-py")
    tarball = make_tarball(
        tmp_path / "src" / "cifar-10-batches-py", tmp_path / "x.tgz", "cifar-10-batches-py"
    )
    ds = load_dataset("cifar10", data_dir=tarball, cache_dir=tmp_path / "cache")
    assert torch.equal(
        ds.test_images[0], torch.from_numpy(batches["test_batch"][b"data"][0].reshape(3, 32, 32))
    )


def test_cifar100_python_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for name, count in (("train", 6), ("test", 3)):
        data = {
            b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
            b"fine_labels": list(range(count)),
        }
        (folder / name).write_bytes(pickle.dumps(data))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))
    ds = load_dataset("cifar100", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.num_classes == 100 and ds.train_images.shape == (6, 3, 32, 32) and ds.classes[5] == "c5"
    # A cifar100 folder is not mistaken for cifar10.
    with pytest.raises(DatasetError):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache")


def test_corrupt_cifar_batch_gives_one_line_error(tmp_path: Path) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert "data_batch_3" in _single_line(exc)


# ---------------------------------------------------------------- fashion-mnist and stl10 from fake files


def test_fashion_mnist_from_fake_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(5),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([9, 0]),
    }
    for i, (stem, array) in enumerate(arrays.items()):
        compress = i % 2 == 0
        write_idx(folder / (stem + (".gz" if compress else "")), array, compress)
    ds = load_dataset("fashion-mnist", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (5, 1, 28, 28) and ds.test_labels.tolist() == [9, 0]
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")  # truncated
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", data_dir=folder, cache_dir=tmp_path / "cache")
    assert "truncated" in _single_line(exc)


def test_stl10_from_fake_binaries(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 3, 96, 96), dtype=np.uint8)  # (N, C, H, W)
    for split in ("train", "test"):
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # stored column-major
        np.array([1, 10, 5], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    ds = load_dataset("stl10", data_dir=tmp_path, cache_dir=tmp_path / "cache")
    assert torch.equal(ds.train_images, torch.from_numpy(images))
    assert ds.train_labels.tolist() == [0, 9, 4] and ds.classes[0] == "airplane"


# ---------------------------------------------------------------- cache


def test_second_load_reads_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_split_tree(tmp_path / "tree", CIFAR10_CLASSES, train=2, test=1)
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", data_dir=tmp_path / "tree", cache_dir=cache)

    def no_decoding(*args: object) -> ImageDataset:
        raise AssertionError("decoded although a valid cache exists")

    monkeypatch.setattr(cifar_module, "decode", no_decoding)
    second = load_dataset("cifar10", data_dir=tmp_path / "tree", cache_dir=cache)
    assert torch.equal(first.train_images, second.train_images) and second.classes == first.classes
    assert not list((cache / "datasets").glob(".*")), "temporary files were left behind"


def test_changed_source_is_decoded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "pics"
    for c in range(2):
        _save(_solid("RGB", (8, 8), (c, 0, 0)), root / f"c{c}" / "0.png")
    name, cache = f"imagefolder:{root}", tmp_path / "cache"
    calls: list[Path] = []
    real = registry.load_imagefolder

    def counting(path: Path, image_size: int | None, dataset_name: str, scratch: Path) -> ImageDataset:
        calls.append(path)
        return real(path, image_size, dataset_name, scratch)

    monkeypatch.setattr(registry, "load_imagefolder", counting)
    load_dataset(name, cache_dir=cache)
    load_dataset(name, cache_dir=cache)
    assert len(calls) == 1
    _save(_solid("RGB", (8, 8), (9, 9, 9)), root / "c1" / "1.png")
    changed = load_dataset(name, cache_dir=cache)
    assert len(calls) == 2
    assert len(changed.train_labels) + len(changed.test_labels) == 3
    assert len(list((cache / "datasets").glob("*.pt"))) == 1  # the stale file was removed


def test_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", data_dir=tmp_path, cache_dir=cache)
    path = cache_file(cache, "cifar10", None, tmp_path / "cifar-10-batches-py")
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(DatasetWarning, match="ignoring unreadable dataset cache"):
        rebuilt = load_dataset("cifar10", data_dir=tmp_path, cache_dir=cache)
    assert torch.equal(rebuilt.train_images, first.train_images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=cache)  # the rewritten file is valid


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.warns(DatasetWarning, match="could not write dataset cache"):
        ds = load_dataset("cifar10", data_dir=tmp_path, cache_dir=blocker)
    assert ds.train_images.shape[0] == 20


def test_resized_load_is_cached_separately(tmp_path: Path) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    cache = tmp_path / "cache"
    small = load_dataset("cifar10", data_dir=tmp_path, image_size=8, cache_dir=cache)
    assert small.train_images.shape == (20, 3, 8, 8)
    assert sorted(p.name.split("-")[1] for p in (cache / "datasets").glob("*.pt")) == ["8", "native"]


def test_default_cache_dir_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("SSLAB_CACHE", str(tmp_path / "env-cache"))
    load_dataset("cifar10", data_dir=tmp_path)
    assert list((tmp_path / "env-cache" / "datasets").glob("cifar10-native-*.pt"))


def test_sslab_data_is_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("SSLAB_DATA", str(tmp_path))
    assert load_dataset("cifar10", cache_dir=tmp_path / "cache").train_images.shape[0] == 20


# ---------------------------------------------------------------- errors and status


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset("mnist-xl")
    message = _single_line(exc)
    assert all(name in message for name in DATASET_NAMES)


def test_missing_dataset_names_every_place_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    message = _single_line(exc)
    assert str(tmp_path / "data") in message and "$SSLAB_DATA unset" in message
    assert str(tmp_path / "cache" / "downloads" / "cifar10") in message and "--data-dir" in message
    monkeypatch.setenv("SSLAB_DATA", str(tmp_path / "shared"))
    with pytest.raises(DatasetError) as exc:
        load_dataset("stl10", cache_dir=tmp_path / "cache")
    assert f"$SSLAB_DATA={tmp_path / 'shared'}" in _single_line(exc)


def test_missing_data_dir_and_bad_image_size(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", data_dir=tmp_path / "nope")
    assert "does not exist" in _single_line(exc)
    with pytest.raises(DatasetError):
        load_dataset("synthetic", image_size=0)


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nmore detail")

    monkeypatch.setattr(torchvision.datasets, "STL10", offline)
    with pytest.raises(DatasetError) as exc:
        load_dataset("stl10", download=True, cache_dir=tmp_path / "cache")
    assert "downloading stl10" in _single_line(exc) and "name resolution" in str(exc.value)
    with pytest.raises(DatasetError):
        fetch("x", tmp_path / "dl", lambda root: 1 / 0)


def test_dataset_status_lists_every_name(tmp_path: Path) -> None:
    make_cifar10_batches(tmp_path / "cifar-10-batches-py")
    statuses = {status.name: status for status in dataset_status(tmp_path)}
    assert tuple(statuses) == DATASET_NAMES
    assert statuses[DEFAULT_DATASET].present and statuses["synthetic"].present
    cifar10 = statuses["cifar10"]
    assert cifar10.present and cifar10.path == str(tmp_path / "cifar-10-batches-py")
    assert cifar10.searched[0] == str(tmp_path)
    assert not statuses["cifar100"].present and statuses["cifar100"].path is None
    assert statuses["fashion-mnist"].searched[-2:][0] == str(SYSTEM_FASHION)


# ---------------------------------------------------------------- real data (skipped when absent)


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason=f"{SYSTEM_FASHION} absent (dataset-fashion-mnist)")
def test_full_fashion_mnist_from_system_folder(tmp_path: Path) -> None:
    ds = load_dataset("fashion-mnist", cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (60_000, 1, 28, 28) and ds.test_images.shape == (10_000, 1, 28, 28)
    assert ds.train_labels.bincount().tolist() == [6000] * 10 and ds.classes == FASHION_CLASSES
    # The embedded set is a true subset of the official files.
    with np.load(embedded_path()) as npz:
        mini = load_dataset(DEFAULT_DATASET)
        train_at = torch.from_numpy(npz["train_indices"].astype(np.int64))
        test_at = torch.from_numpy(npz["test_indices"].astype(np.int64))
    assert torch.equal(ds.train_images[train_at], mini.train_images)
    assert torch.equal(ds.test_labels[test_at], mini.test_labels)


@pytest.mark.skipif(not REAL_CIFAR.is_file(), reason=f"{REAL_CIFAR} absent (real CIFAR-10 JPEG tarball)")
def test_real_cifar10_tarball(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    ds = load_dataset("cifar10", data_dir=REAL_CIFAR, cache_dir=tmp_path / "cache")
    decoded = time.perf_counter() - start
    start = time.perf_counter()
    again = load_dataset("cifar10", data_dir=REAL_CIFAR, cache_dir=tmp_path / "cache")
    reloaded = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nCIFAR-10 tarball: decode {decoded:.1f} s, cached reload {reloaded:.2f} s")
    assert ds.train_images.shape == (50_000, 3, 32, 32) and ds.test_images.shape == (10_000, 3, 32, 32)
    assert ds.classes == CIFAR10_CLASSES
    assert ds.train_labels.bincount().tolist() == [5000] * 10
    assert ds.test_labels.bincount().tolist() == [1000] * 10
    assert torch.equal(again.test_images, ds.test_images)
    assert 80 < ds.train_images.float().mean() < 160
    with Image.open(io.BytesIO(_first_member(REAL_CIFAR, "cifar10-jpeg/train/airplane/0000.jpg"))) as im:
        reference = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float()
    assert (ds.train_images[0].float() - reference).abs().mean() < 2  # libjpeg-turbo vs PIL rounding


def _first_member(tarball: Path, name: str) -> bytes:
    with tarfile.open(tarball, "r|gz") as archive:
        for member in archive:
            if member.name == name:
                handle = archive.extractfile(member)
                assert handle is not None
                return handle.read()
    raise AssertionError(f"{name} not in {tarball}")


def fake_stl10(root: Path, train: int = 3, unlabelled: int = 0) -> dict[str, np.ndarray]:
    """STL-10 binaries in `root`/stl10_binary, stored column-major per channel as the official ones are."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    arrays = {split: rng.integers(0, 256, (train, 3, 96, 96), dtype=np.uint8) for split in ("train", "test")}
    for split, images in arrays.items():
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        (np.arange(train, dtype=np.uint8) % 10 + 1).tofile(folder / f"{split}_y.bin")
    if unlabelled:
        arrays["unlabelled"] = rng.integers(0, 256, (unlabelled, 3, 96, 96), dtype=np.uint8)
        arrays["unlabelled"].transpose(0, 1, 3, 2).tofile(folder / "unlabeled_X.bin")
    return arrays


def test_stl10_unlabelled_split_is_read_upright_and_kept_in_the_cache(tmp_path: Path) -> None:
    arrays = fake_stl10(tmp_path / "data", unlabelled=5)
    for _ in ("decoded", "from the cache"):
        ds = load_dataset("stl10", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
        assert ds.unlabelled_images is not None
        assert torch.equal(ds.unlabelled_images, torch.from_numpy(arrays["unlabelled"]))
        assert torch.equal(ds.train_images, torch.from_numpy(arrays["train"]))
    assert not list((tmp_path / "cache" / "scratch").iterdir())  # the scratch file was unlinked at once
    small = load_dataset("stl10", data_dir=tmp_path / "data", image_size=32, cache_dir=tmp_path / "cache")
    assert small.unlabelled_images is not None and small.unlabelled_images.shape == (5, 3, 32, 32)


def test_stl10_without_its_unlabelled_file_has_no_unlabelled_split(tmp_path: Path) -> None:
    fake_stl10(tmp_path / "data")
    assert (
        load_dataset("stl10", data_dir=tmp_path / "data", cache_dir=tmp_path / "c").unlabelled_images is None
    )


def rss_anon_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads anonymous memory from /proc")
def test_imagefolder_decodes_into_files_not_memory(tmp_path: Path) -> None:
    """Decoded straight into unlinked files in the cache's scratch folder: the same images as decoding in
    memory, while the process's anonymous memory grows by far less than the decoded set."""
    from sslab.data.imagefolder import load_imagefolder

    rng = np.random.default_rng(7)
    for c in range(3):
        for i in range(120):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
            _save(Image.fromarray(pixels), tmp_path / "tree" / f"class{c}" / f"{i:03d}.png", "PNG")
    side = 224  # 360 x 3 x 224 x 224 = 54 MiB decoded
    scratch = tmp_path / "scratch"
    before = rss_anon_kib()
    streamed = load_imagefolder(tmp_path / "tree", side, "imagefolder:t", scratch)
    grown = rss_anon_kib() - before
    in_memory = load_imagefolder(tmp_path / "tree", side, "imagefolder:t")
    assert torch.equal(streamed.train_images, in_memory.train_images)
    assert torch.equal(streamed.test_images, in_memory.test_images)
    assert torch.equal(streamed.train_labels, in_memory.train_labels)
    assert str(streamed.train_images.untyped_storage().filename).startswith(str(scratch))
    assert not list(scratch.iterdir())  # unlinked at once: their space goes with the tensors
    decoded_kib = 360 * 3 * side * side // 1024
    assert grown < decoded_kib // 3, (grown, decoded_kib)
