"""Where the training images of each step come from: held on the device, or streamed from host memory.

The whole uint8 training set is moved to the device when it fits there; a batch is then one gather on the
device. A set that does not fit (ImageNet-100 at 224 px, STL-10's unlabelled images on a small GPU) stays
in host memory, typically memory-mapped from the dataset cache so that it need not fit in RAM either: each
batch is gathered there by a background thread, into pinned memory on CUDA, one step ahead of the step that
needs it, and copied to the device without blocking. Both give the same batches for the same indices.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

RESIDENT_SHARE = 0.5  # the most of the device's free memory the images may take; the rest is the model's


class ImageParts:
    """Several uint8 image tensors (N_i, C, H, W) indexed as one, in order, without copying them together:
    STL-10's train images, then its 100,000 unlabelled ones, memory-mapped."""

    def __init__(self, *parts: Tensor) -> None:
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.shape[0])
        self.shape = torch.Size((self.starts[-1], *parts[0].shape[1:]))
        self.dtype = parts[0].dtype

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.parts[0].element_size()

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        """The images at `index` (CPU indices into the whole), gathered from each part."""
        if dim != 0:
            raise ValueError("ImageParts are indexed along the images only")
        out = torch.empty((index.numel(), *self.shape[1:]), dtype=self.dtype)
        for part, start, end in zip(self.parts, self.starts, self.starts[1:], strict=False):
            where = ((index >= start) & (index < end)).nonzero().squeeze(1)
            if where.numel():
                out[where] = part.index_select(0, index[where] - start)
        return out

    def __getitem__(self, index: Tensor | slice) -> Tensor:
        if isinstance(index, slice):
            index = torch.arange(self.shape[0])[index]
        return self.index_select(0, index.cpu())

    def to(self, device: torch.device) -> Tensor:
        """One tensor on `device`, filled part by part."""
        whole = torch.empty(self.shape, dtype=self.dtype, device=device)
        for part, start in zip(self.parts, self.starts, strict=False):
            whole[start : start + part.shape[0]].copy_(part)
        return whole


def fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether images of `nbytes` should be held on `device`. A CPU (or MPS, sharing host memory) holds them
    where they already are: a memory-mapped cache is paged in and out by the operating system."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= RESIDENT_SHARE * free


class ResidentImages:
    """The images on the device; a batch is a gather there."""

    streamed = False

    def __init__(self, images: Tensor | ImageParts, device: torch.device) -> None:
        # On a CPU the images stay where they are: parts are not copied together.
        self.images = images if device.type == "cpu" else images.to(device)
        self.device = device

    def prefetch(self, index: Tensor) -> None:
        """Nothing to prepare: the gather happens on the device."""

    def batch(self, index: Tensor) -> Tensor:
        return self.images[index.to(self.device)]

    def close(self) -> None:
        """Nothing to stop."""


class StreamedImages:
    """The images in host memory (a memory-mapped tensor or not); batches gathered a step ahead."""

    streamed = True

    def __init__(self, images: Tensor | ImageParts, device: torch.device) -> None:
        self.images = images
        self.device = device
        self.pin = device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sslab-batches")
        self._pending: tuple[Tensor, Future[Tensor]] | None = None

    def _gather(self, index: Tensor) -> Tensor:
        batch = self.images.index_select(0, index)
        return batch.pin_memory() if self.pin else batch

    def prefetch(self, index: Tensor) -> None:
        """Start gathering the batch of `index` (CPU indices) in the background."""
        self._pending = (index, self._pool.submit(self._gather, index))

    def batch(self, index: Tensor) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is not None and torch.equal(pending[0], index):
            host = pending[1].result()
        else:
            host = self._gather(index)
        return host.to(self.device, non_blocking=self.pin)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def image_source(
    images: Tensor | ImageParts, device: torch.device, stream: bool | None = None
) -> ResidentImages | StreamedImages:
    """Images held on `device` when they fit there (or `stream=False`), else streamed (`stream=True`)."""
    if stream is None:
        stream = not fits_on_device(images.numel() * images.element_size(), device)
    return StreamedImages(images, device) if stream else ResidentImages(images, device)
