"""Process-wide settings: the allocator keeps large freed blocks rather than faulting them in each step;
the tests' fp32 pin on `--precision auto` covers fixtures of every scope."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sslab.runtime import CPU_BF16_ENV
from sslab.weights import WEIGHTS_ENV

ROOT = Path(__file__).resolve().parent.parent

# Allocates and frees a 64 MiB tensor (above glibc's 32 MiB mmap-threshold ceiling, as a ResNet-18's
# activations at batch 512 are) as a training step does, and counts the page faults of the later rounds.
_ROUNDS = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from sslab.runtime import tune_allocator
    tuned = sys.argv[1] == "1" and tune_allocator()
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(12):  # warm-up: the heap grows to what the rounds need
        x = torch.ones(16 << 20); del x
    before = faults()
    for _ in range(10):
        x = torch.ones(16 << 20); del x
    print(json.dumps({"tuned": tuned, "faults": faults() - before}))
    """
)


def _faults(tune: bool) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", _ROUNDS, "1" if tune else "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the allocator settings are glibc's (Linux)")
def test_a_tuned_allocator_reuses_large_blocks_instead_of_faulting_them_in() -> None:
    untuned, tuned = _faults(False), _faults(True)
    if not tuned["tuned"]:
        pytest.skip("this C library has no glibc mallopt settings")
    if untuned["faults"] < 10 * 16_384 * 0.9:  # 64 MiB of 4 KiB pages faulted in per round
        pytest.skip(
            f"the untuned rounds faulted only {untuned['faults']} pages (huge pages?): nothing to save"
        )
    assert tuned["faults"] < untuned["faults"] / 20, (tuned, untuned)


@pytest.fixture(scope="module")
def auto_setting_in_a_module_fixture() -> str | None:
    """What a module-scoped fixture (as the multi-process tests' ranks are) sees of the fp32 pin."""
    return os.environ.get(CPU_BF16_ENV)


def test_the_fp32_pin_reaches_module_scoped_fixtures(auto_setting_in_a_module_fixture: str | None) -> None:
    if os.environ.get("SSLAB_TEST_AUTO_BF16") == "1":
        pytest.skip("SSLAB_TEST_AUTO_BF16=1 lifts the pin")
    assert auto_setting_in_a_module_fixture == "0"


@pytest.fixture(scope="module")
def weights_dir_in_a_module_fixture() -> str | None:
    """Where a module-scoped fixture that trains would keep its weights."""
    return os.environ.get(WEIGHTS_ENV)


def test_module_scoped_fixtures_keep_weights_out_of_the_checkout(
    weights_dir_in_a_module_fixture: str | None,
) -> None:
    assert weights_dir_in_a_module_fixture is not None
    assert not Path(weights_dir_in_a_module_fixture).resolve().is_relative_to(ROOT)
