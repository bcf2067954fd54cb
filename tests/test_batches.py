"""Training images held on the device or streamed from a memory-mapped dataset cache: the same batches."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from sslab.batches import ImageParts, ResidentImages, StreamedImages, image_source
from sslab.config import from_mapping
from sslab.data.cache import load_cache, save_cache
from sslab.data.dataset import ImageDataset
from sslab.methods.base import build_method
from sslab.models import build_backbone
from sslab.train import pretrain


def dataset(n: int, side: int = 16, seed: int = 0) -> ImageDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % 10
    return ImageDataset(
        "random", images, labels, images[:20].clone(), labels[:20].clone(), tuple("abcdefghij")
    )


def resident_kib() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def test_streamed_batches_from_the_cache_equal_the_resident_ones(tmp_path) -> None:
    path = tmp_path / "cache.pt"
    save_cache(path, dataset(500))
    cached = load_cache(path)
    assert cached is not None
    resident = image_source(cached.train_images, torch.device("cpu"), stream=False)
    streamed = image_source(cached.train_images, torch.device("cpu"), stream=True)
    assert isinstance(resident, ResidentImages) and isinstance(streamed, StreamedImages)
    order = torch.randperm(500, generator=torch.Generator().manual_seed(3))
    batches = [order[i : i + 64] for i in range(0, 448, 64)]
    for index, (batch, following) in enumerate(zip(batches, [*batches[1:], None], strict=True)):
        if following is not None and index != 2:  # step 2 finds no batch prepared: gathered on the spot
            streamed.prefetch(following)
        assert torch.equal(streamed.batch(batch), resident.batch(batch))
        assert torch.equal(resident.batch(batch), cached.train_images[batch])
    streamed.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set size from /proc")
def test_the_dataset_cache_is_memory_mapped_not_read_whole(tmp_path) -> None:
    path = tmp_path / "big.pt"
    big = dataset(64 * 1024, side=32)  # 192 MiB of uint8 train images
    save_cache(path, big)
    del big
    before = resident_kib()
    cached = load_cache(path)
    assert cached is not None
    assert resident_kib() - before < 64 * 1024  # far less than the 192 MiB on disk: paged in on use
    assert int(cached.train_images[12345].sum()) == int(dataset(64 * 1024, side=32).train_images[12345].sum())


def test_pretraining_streamed_equals_pretraining_resident() -> None:
    config = from_mapping({"batch_size": 32, "epochs": 2, "precision": "fp32"})
    data = dataset(128)
    histories = []
    for stream in (False, True):
        torch.manual_seed(0)
        method = build_method(config, build_backbone("smallcnn", 3, 16), num_classes=10)
        result = pretrain(
            method, config, data.train_images, data.train_labels, torch.device("cpu"), stream=stream
        )
        histories.append([record.loss for record in result.history])
        weights = [p.detach().clone() for p in method.parameters()]
        histories.append(weights)
    assert histories[0] == histories[2]
    assert all(torch.equal(a, b) for a, b in zip(histories[1], histories[3], strict=True))


def test_image_parts_index_as_their_concatenation() -> None:
    first, second = dataset(40).train_images, dataset(70, seed=1).train_images
    parts, whole = ImageParts(first, second), torch.cat([first, second])
    assert parts.shape == whole.shape and parts.numel() == whole.numel()
    index = torch.randperm(110, generator=torch.Generator().manual_seed(2))[:50]
    assert torch.equal(parts.index_select(0, index), whole[index])
    assert torch.equal(parts[::7], whole[::7]) and torch.equal(parts.to(torch.device("cpu")), whole)
    for stream in (False, True):
        source = image_source(parts, torch.device("cpu"), stream=stream)
        source.prefetch(index)
        assert torch.equal(source.batch(index), whole[index])
        source.close()


def test_pretraining_on_parts_equals_pretraining_on_their_concatenation() -> None:
    """Train and unlabelled images read in place train exactly as one tensor of both would."""
    config = from_mapping({"batch_size": 32, "epochs": 1, "precision": "fp32"})
    labelled, unlabelled = dataset(64), dataset(64, seed=5)
    labels = torch.cat([labelled.train_labels, torch.full((64,), -1)])
    weights = []
    for images in (
        ImageParts(labelled.train_images, unlabelled.train_images),
        torch.cat([labelled.train_images, unlabelled.train_images]),
    ):
        torch.manual_seed(0)
        method = build_method(config, build_backbone("smallcnn", 3, 16), num_classes=10)
        pretrain(method, config, images, labels, torch.device("cpu"))
        weights.append([p.detach().clone() for p in method.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))
