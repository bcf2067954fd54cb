"""Throughput of each augmentation op and of the SimCLR view, in images per second.

Example:
    python benchmarks/augment_ops.py --batch-size 256 --image-size 32 --channels 3 --repeats 50 --device cpu

Each op runs with its default parameters on the same random batch. The SimCLR view is timed once for a
single view and once for two views of the batch (one training step's worth); the two-view line counts
source images, so its images/s is the rate at which a training loop can be fed.
"""

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable

import torch
from script_args import ArgumentParser

from sslab.augment.ops import OPS
from sslab.augment.view import parse_view

SIMCLR_VIEW = "crop,flip,color,grayscale,blur"


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory instead of returning it to the OS (and faulting it back in)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise SystemExit("mallopt failed: --keep-freed-memory needs glibc")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def time_calls(run: Callable[[], object], device: torch.device, repeats: int, warmup: int = 5) -> list[float]:
    """Seconds taken by each of `repeats` calls of `run`, after `warmup` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--specs", nargs="*", help="view specs to time instead of every registered op")
    parser.add_argument(
        "--keep-freed-memory", action="store_true", help="tune glibc malloc to keep freed memory (Linux)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()

    device = torch.device(args.device)
    n, size = args.batch_size, args.image_size
    generator = torch.Generator(device).manual_seed(0)
    x = torch.rand(n, args.channels, size, size, generator=generator, device=device)
    print(
        f"batch {n} x {args.channels} x {size} x {size} on {device}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats" + (", malloc keeps freed memory" if args.keep_freed_memory else "")
    )
    print(f"{'view':<44} {'median ms':>10} {'best ms':>8} {'images/s':>10}")

    def report(label: str, times: list[float], images: int) -> None:
        median = statistics.median(times)
        print(f"{label:<44} {median * 1e3:10.3f} {min(times) * 1e3:8.3f} {images / median:10,.0f}")

    for spec in args.specs or list(OPS):
        view = parse_view(spec)
        report(str(view)[:44], time_calls(lambda v=view: v(x, generator), device, args.repeats), n)

    view = parse_view(SIMCLR_VIEW)
    report(f"{SIMCLR_VIEW} (1 view)", time_calls(lambda: view(x, generator), device, args.repeats), n)
    two = time_calls(lambda: (view(x, generator), view(x, generator)), device, args.repeats)
    report(f"{SIMCLR_VIEW} (2 views)", two, n)


if __name__ == "__main__":
    main()
