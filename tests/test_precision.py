"""`--precision auto`: bf16 on CPUs that compute it natively (from pipeline version 3), recorded per trial."""

from __future__ import annotations

import io
import platform

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from sslab.cli import app
from sslab.config import from_mapping
from sslab.runtime import native_bf16_cpu
from sslab.store import Store, flat_record
from sslab.train import autocast_dtype, emulated_precision_warning

CPU = torch.device("cpu")
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "128", "-q"]


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_on_a_cpu_that_computes_it_natively(native: bool, monkeypatch) -> None:
    monkeypatch.setenv("SSLAB_CPU_BF16", "1" if native else "0")
    assert native_bf16_cpu() is native
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if native else None)
    assert autocast_dtype("auto", CPU, pipeline=2) is None  # what `auto` computed before version 3
    assert autocast_dtype("fp32", CPU) is None and autocast_dtype("bf16", CPU) == torch.bfloat16
    assert (emulated_precision_warning("bf16", CPU) is None) is native
    assert emulated_precision_warning("fp32", CPU) is None


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch's x86 CPU probes")
def test_without_the_override_the_cpu_is_asked(monkeypatch) -> None:
    monkeypatch.delenv("SSLAB_CPU_BF16")
    assert native_bf16_cpu() is (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def test_an_explicit_precision_is_the_same_trial_at_pipeline_2_and_3() -> None:
    for precision in ("fp32", "bf16"):
        today = from_mapping({"precision": precision})
        assert today.pipeline_version == 3
        assert today.hash() == from_mapping({"precision": precision, "pipeline_version": 2}).hash()
        assert not flat_record(from_mapping({"precision": precision, "pipeline_version": 2}).record())[
            "older_behaviour"
        ]
    auto = from_mapping({})
    assert auto.hash() != from_mapping({"pipeline_version": 2}).hash()  # `auto` changed meaning
    assert flat_record(from_mapping({"pipeline_version": 2}).record())["older_behaviour"]
    assert not flat_record(auto.record())["older_behaviour"]


@pytest.mark.parametrize(("native", "computed"), [(True, "bf16"), (False, "fp32")])
def test_a_trial_records_what_it_computed_in(native, computed, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLAB_CPU_BF16", "1" if native else "0")
    db = f"sqlite:///{tmp_path / 'r.db'}"
    run = CliRunner().invoke(app, ["run", *TINY, "--db", db])
    assert run.exit_code == 0, run.output
    frame = Store(db).results_frame()
    assert list(frame["precision"]) == ["auto"] and list(frame["precision_used"]) == [computed]
    shown = CliRunner().invoke(app, ["results", "--db", db, "--format", "csv", "--all"])
    assert list(pd.read_csv(io.StringIO(shown.stdout))["precision_used"]) == [computed]


def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSLAB_CPU_BF16", "0")
    run = CliRunner().invoke(app, ["run", *TINY, "--precision", "bf16", "--db", f"sqlite:///{tmp_path}/r.db"])
    assert run.exit_code == 0, run.output
    assert "warning: bf16 on this CPU is emulated" in run.output and "--precision auto" in run.output


def test_stored_baselines_keep_their_key() -> None:
    """The random-init baseline's key, as the release before pretrain_unlabelled computed it; the field
    changes the key only when set (it changes the images' normalisation)."""
    from sslab.runner import baseline_hash

    keys = [baseline_hash(from_mapping(v), CPU) for v in ({}, {"dataset": "cifar10", "train_subset": 20000})]
    assert keys == ["11594059747f2b50", "cf5cc99aac661c7c"]
    assert baseline_hash(
        from_mapping({"dataset": "stl10", "pretrain_unlabelled": True}), CPU
    ) != baseline_hash(from_mapping({"dataset": "stl10"}), CPU)
