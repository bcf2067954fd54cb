"""Versions of the training pipeline every method shares: augmentation ops and random streams (torch-free).

A trial records the version it ran with (`TrialConfig.pipeline_version`), so a release that changes what the
shared pipeline computes recognises the trials an older one recorded and keeps them apart from new ones:
trials recorded before the version existed ran version 1.

1. A colour jitter's order of adjustments drawn once per batch; crops resampled bilinearly (no antialiasing)
   from fractional boxes, and local crops cut at the full size, then downsampled; the data order seeded with
   the trial's seed and augmentation with seed + 1 + rank (so seed s's augmentation stream was seed s + 1's
   data order).
2. The adjustment order drawn per image, as torchvision's ColorJitter does; crops cut on whole pixels and
   resampled with antialiasing straight to their output size (torchvision's RandomResizedCrop); every random
   stream derived from (seed, purpose, rank).
3. `precision = "auto"` computes in bf16 on CPUs with native bf16 (AVX512-BF16, AMX, Arm BF16), where
   earlier versions computed in fp32 on every CPU. A trial with an explicit precision computes what it did
   at version 2, so its identity names version 2 (`effective_version`) and it stays one trial.
"""

import hashlib

PIPELINE_VERSION = 3
VERSIONS = (1, 2, 3)


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose of one trial: replicate seeds and purposes never share a random stream."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}".encode()).digest()[:7], "little")


def effective_version(version: int, precision: str) -> int:
    """The earliest version that computes what `version` does for a trial of this `precision`: version 3
    changed only what `auto` means on a CPU."""
    return 2 if version == 3 and precision != "auto" else version
