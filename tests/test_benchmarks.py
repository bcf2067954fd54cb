"""The GPU measurement script at tiny CPU settings, and the peer pipeline's per-image dataset."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from sslab.config import from_mapping
from sslab.data import load_dataset
from sslab.models import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("env", "cuda_tests", "peer", "run", "results")
SCRIPTS = sorted(path.stem for path in (ROOT / "benchmarks").glob("*.py") if path.stem != "script_args")
sys.path.insert(0, str(ROOT / "benchmarks"))  # as for a script run from there: its siblings import


def load_benchmark(name: str) -> ModuleType:
    """A script of benchmarks/ (not a package) imported as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


peer_pipeline = load_benchmark("peer_pipeline")
gpu_report = load_benchmark("gpu_report")


@pytest.fixture(scope="module")
def synthetic_dataset() -> Any:
    data = load_dataset("synthetic")
    return peer_pipeline.two_view_dataset(
        from_mapping({"method": "simclr"}), data.train_images, data.train_labels
    )


def test_gpu_script_tiny_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # One thread: the tiny run measures nothing, and threads that wait on each other crawl on a busy machine.
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--device", "cpu", "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert done.returncode == 0, done.stdout + done.stderr + log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["tiny"] is True
    assert summary["dataset"]["name"] == "synthetic"
    assert list(summary["steps"]) == list(STEPS)
    assert all(step["status"] == "ok" and step["seconds"] > 0 for step in summary["steps"].values())
    assert summary["failed_steps"] == []
    assert summary["steps"]["cuda_tests"]["mode"] == "collect-only"
    assert summary["cuda_tests"]["collected"] > 0  # the -k cuda selection finds the CUDA-only tests

    rates = summary["images_per_s"]
    assert rates["sslab"] > 0 and rates["peer"] > 0
    assert summary["ratio"] == pytest.approx(rates["sslab"] / rates["peer"])
    assert 0 < summary["augment_share"] < 1
    peer = summary["peer_pipeline"]
    assert peer["config"]["backbone"] == "smallcnn" and peer["config"]["batch_size"] == 32
    assert peer["flops_per_image"] > 0
    assert peer["sslab"]["peak_memory_bytes"] is None  # GPU memory and peak fraction: CUDA only

    trial = summary["e2e"]["trial"]
    assert summary["e2e"]["status"] == "ok" and summary["e2e"]["wall_seconds"] > 0
    assert trial["status"] == "done" and trial["dataset"] == "synthetic" and trial["train_subset"] == 256
    assert 0 <= trial["linear_top1"] <= 1 and trial["images_per_s"] > 0
    # everything the steps made stays in OUT, and nothing else (checkpoints, weights) lands there
    expected = {"summary.json", "env.json", "peer.json", "results.csv", "gpu.db", "steps.tsv", "log.txt"}
    assert {path.name for path in out.iterdir()} == expected


def test_two_views_shape_dtype_and_difference(synthetic_dataset: Any) -> None:
    torch.manual_seed(0)
    first, second, label, index = synthetic_dataset[5]
    assert first.shape == second.shape == (3, 32, 32)
    assert first.dtype == second.dtype == torch.float32
    assert index == 5 and label == int(synthetic_dataset.labels[5])
    assert not torch.equal(first, second)  # two independent draws of the same image
    assert first.abs().max() > 1  # normalised with the channel statistics, not left in [0, 1]


def test_two_views_deterministic_under_seed(synthetic_dataset: Any) -> None:
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(synthetic_dataset[7][:2])
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1], strict=True))
    assert not torch.equal(draws[0][0], draws[2][0])


@pytest.mark.parametrize("op", peer_pipeline.MIRRORED_OPS)
def test_every_mirrored_op_makes_a_view(op: str) -> None:
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    transform = peer_pipeline.peer_transform(op, 32, mean, std)
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    view = transform(image)
    assert view.shape == (3, 32, 32) and view.dtype == torch.float32
    if op == "identity":  # nothing but the normalisation
        assert torch.allclose(view, (image / 255 - 0.5) / 0.25, atol=1e-6)


def test_sslab_parameters_carry_over() -> None:
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    ops = peer_pipeline.peer_transform(
        "crop(scale=0.2-1),color(s=0.5,gray=0.3),blur", 32, mean, std
    ).transforms
    crop, jitter, gray, blur = ops[:4]
    assert crop.scale == (0.2, 1.0) and crop.size == (32, 32)
    assert jitter.p == 0.8 and jitter.transforms[0].brightness == (0.6, 1.4)
    assert jitter.transforms[0].hue == (-0.1, 0.1)
    assert gray.p == 0.3
    assert blur.p == 0.5 and blur.transforms[0].kernel_size == (3, 3)  # sslab's kernel: 0.1 of the side


def test_unmirrored_op_is_refused() -> None:
    with pytest.raises(ValueError, match="rotate"):
        peer_pipeline.peer_transform("crop,rotate", 32, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))


@pytest.mark.parametrize(
    ("line", "counts"),
    [
        ("53 passed, 154 deselected in 20.1s", {"passed": 53, "deselected": 154}),
        (
            "1 failed, 50 passed, 2 skipped, 1 error in 3.0s",
            {"failed": 1, "passed": 50, "skipped": 2, "errors": 1},
        ),
        ("53/207 tests collected (154 deselected) in 10.79s", {"collected": 53, "deselected": 154}),
    ],
)
def test_pytest_summary_line_is_read(line: str, counts: dict[str, int]) -> None:
    assert gpu_report.pytest_counts(["tests/test_augment.py::x PASSED", line, ""]) == counts


def test_step_status_from_exit(tmp_path: Path) -> None:
    (tmp_path / "steps.tsv").write_text("env\t0\t1.5\t90\t\npeer\t124\t130.0\t130\t\nrun\t1\t3.2\t140\t\n")
    steps = gpu_report.read_steps(tmp_path / "steps.tsv")
    assert {name: step["status"] for name, step in steps.items()} == {
        "env": "ok",
        "peer": "timeout",
        "run": "failed",
    }


def test_methods_benchmark_times_every_method_teachers_included(tmp_path: Path) -> None:
    """benchmarks/methods.py on 8 images of 16 px: a line per method, the distillation methods included."""
    methods = "simclr,dino,seed,distill,cmc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SSLAB_WEIGHTS_DIR": str(tmp_path)}
    command = [sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--methods", methods]
    command += ["--batch-size", "8", "--image-size", "16", "--rounds", "1", "--steps", "1"]
    command += ["--teacher-backbone", "smallcnn", "--precision", "bf16"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert "precision=bf16" in lines[0]
    rates = {line.split()[0]: float(line.split()[1].replace(",", "")) for line in lines[1:]}
    assert set(rates) == set(methods.split(",")) and all(rate > 0 for rate in rates.values())


TINY_TRIAL = ["--set", "dataset=synthetic", "--set", "train_subset=128", "--set", "epochs=1"]
TINY_TRIAL += ["--set", "batch_size=32", "--set", "precision=fp32"]


def test_augment_fidelity_trains_every_pipeline_and_compares_each_op(tmp_path: Path) -> None:
    """benchmarks/augment_fidelity.py, tiny: the three pipelines train, and each op's statistics agree
    between sslab and torchvision where they draw from the same distributions."""
    fidelity = load_benchmark("augment_fidelity")
    out = tmp_path / "f.json"
    result = fidelity.main([*TINY_TRIAL, "--seeds", "0", "--stats-images", "128", "--json", str(out)])
    assert json.loads(out.read_text())["runs"].keys() == set(fidelity.PIPELINES)
    for pipeline, by_seed in result["runs"].items():
        assert 0 < by_seed[0]["linear_top1"] <= 100 and by_seed[0]["seconds"] > 0, pipeline
    stats = result["op_statistics"]
    assert len(stats) == 3  # crop, flip, color of the default view
    for op, by_pipeline in stats.items():
        ours, theirs = by_pipeline["sslab-2"], by_pipeline["torchvision"]
        assert abs(ours["mean"] - theirs["mean"]) < 0.03 and abs(ours["std"] - theirs["std"]) < 0.03, op


def test_baseline_bn_probes_initial_and_recalibrated_statistics() -> None:
    baseline_bn = load_benchmark("baseline_bn")
    rows = baseline_bn.main(["--set", "dataset=synthetic", "--set", "train_subset=128", "--seeds", "0"])[
        "rows"
    ]
    assert [row["bn"] for row in rows] == ["initial", "recalibrated"]
    assert rows[0]["linear_top1"] != rows[1]["linear_top1"] or rows[0]["knn_top1"] != rows[1]["knn_top1"]


def test_recalibrating_batch_norm_sets_the_running_statistics_to_the_data_average() -> None:
    from sslab.runner import build_model
    from sslab.train import channel_stats

    baseline_bn = load_benchmark("baseline_bn")
    config = from_mapping({"dataset": "synthetic", "train_subset": 64})
    data = load_dataset("synthetic")
    method = build_model(config, data)
    images = data.train_images[:64]
    assert baseline_bn.recalibrate_batch_norm(method, images, torch.device("cpu"), batch=16) == 3
    conv, norm = method.backbone.features[0], method.backbone.features[1]
    mean, std = channel_stats(images)
    with torch.no_grad():
        before_norm = conv((images.float() / 255 - mean) / std)  # (N, C, H, W): what the first norm sees
    assert torch.allclose(norm.running_mean, before_norm.mean((0, 2, 3)), atol=1e-4)
    assert norm.num_batches_tracked == 4 and not method.backbone.training


def test_trial_overhead_times_every_part_and_the_repeated_command(tmp_path: Path) -> None:
    """benchmarks/trial_overhead.py on the built-in shapes: the parts add up to the trial, and the repeated
    command finds the trial done."""
    out = tmp_path / "overhead.json"
    env = {**os.environ, "SSLAB_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, str(ROOT / "benchmarks" / "trial_overhead.py"), "--dataset", "synthetic"]
    done = subprocess.run(
        [*command, "--json", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    parts = report["parts_s"]
    assert {"train", "evaluation", "baseline", "label_free", "data", "other"} <= set(parts)
    assert abs(sum(parts.values()) - report["wall_s"]) < 1e-6 and parts["other"] >= 0
    assert report["done_command_s"] > 0 and "evaluation share" in done.stdout


conv_peak = load_benchmark("conv_peak")


def test_conv_flops_count_multiply_adds_of_the_forward_pass() -> None:
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1, stride=2))
    convs = conv_peak.find_convolutions(backbone, torch.randn(2, 3, 8, 8), torch.float32)
    assert [tuple(c.output_shape) for c in convs] == [(2, 8, 8, 8), (2, 4, 4, 4)]
    # 2 FLOPs per multiply-add: (outputs) x (inputs each output reads)
    assert convs[0].flops == 2 * (2 * 8 * 8 * 8) * (3 * 3 * 3)
    assert convs[1].flops == 2 * (2 * 4 * 4 * 4) * 8


def _run_on_one_thread(script: str, *arguments: str) -> list[str]:
    """A benchmark script's stdout lines, on one thread; fails the test if the script fails."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


def test_conv_peak_times_each_pass_and_the_step(tmp_path: Path) -> None:
    lines = _run_on_one_thread(
        "conv_peak", "--backbone", "smallcnn", "--batch-size", "4", "--rounds", "1", "--precision", "fp32"
    )
    table = [line for line in lines if line.startswith(("0.", "1.", "2.", "stem", "features", "layer"))]
    assert len(table) >= 3 and all(len(line.split()) >= 9 for line in table)  # label, GFLOP, three passes
    assert any(line.startswith("fastest convolution pass:") for line in lines)
    assert any(line.startswith("training step:") and "% of that peak" in line for line in lines)


def test_conv_weight_grad_compares_both_kernels_and_the_step() -> None:
    lines = _run_on_one_thread(
        "conv_weight_grad", "--backbone", "smallcnn", "--batch-size", "4", "--rounds", "1"
    )
    table = [line for line in lines if line.startswith("features")]
    assert len(table) == 3 and all(line.split()[-1] in ("GEMM", "oneDNN") for line in table)
    assert table[0].split()[-1] == "oneDNN"  # a 16 x 16 output keeps torch's kernel on every machine
    steps = [line for line in lines if line.startswith("training step,")]
    amx = cpu_kernels.cpu_kind() == cpu_kernels.AMX  # elsewhere the AMX rule's bf16 shapes are timed too
    assert len(steps) == (2 if amx else 3) and steps[0].endswith("(1.00x)")
    assert steps[1].startswith(f"training step, this CPU's rule ({cpu_kernels.cpu_kind() or 'none'}):")


def test_step_ops_times_each_phase_and_ranks_the_ops() -> None:
    lines = _run_on_one_thread("step_ops", "--batch-size", "4", "--steps", "1", "--top", "10")
    step = next(line for line in lines if line.startswith("step "))
    assert all(f"{phase} " in step for phase in ("views", "forward", "backward", "optimiser"))
    ops = [line for line in lines if " ms " in line and "%" in line]
    assert len(ops) == 10
    shares = [float(line.split()[2].rstrip("%")) for line in ops]
    assert shares == sorted(shares, reverse=True) and all(0 < share <= 100 for share in shares)
    assert any("convolution" in line for line in ops)  # a CNN's step is dominated by its convolutions


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_refuses_an_unknown_option_in_one_line(
    script: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["env", "--out", "unused"] if script == "gpu_report" else []  # a subcommand and what it needs
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *command, "--no-such-option"])
    with pytest.raises(SystemExit) as stopped:
        load_benchmark(script).main()
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "--no-such-option" in error and len(error.splitlines()) == 1


FAKE_MARGIN_TESTS = """
from sslab.config import from_mapping
from sslab.store import Provenance, Store


def _log(tmp_path, linear):
    store = Store(f"sqlite:///{tmp_path / 'r.db'}")
    trial = store.begin_trial(from_mapping({"epochs": 1}), Provenance("cpu", "t", "0", None, "host"))
    store.log_metrics(trial, {"linear_top1": 0.1}, epoch=0)  # per-epoch: not the final metrics
    store.log_metrics(trial, {"linear_top1": linear, "baseline_linear_top1": 0.5})
    return linear - 0.5


def test_wide_beats_random_init(tmp_path):
    assert _log(tmp_path, 0.75) > 0.2


def test_narrow_beats_random_init(tmp_path):
    assert _log(tmp_path, 0.55) > 0.2


def test_unrelated(tmp_path):
    _log(tmp_path, 0.9)
"""


def test_margins_records_each_selected_test_final_metrics(tmp_path: Path) -> None:
    tests = tmp_path / "test_fake_margins.py"
    tests.write_text(FAKE_MARGIN_TESTS)
    out = tmp_path / "margins.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "margins.py"), "--precisions", "fp32"]
    done = subprocess.run(
        [*command, "--json", str(out), str(tests)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["test"].rsplit("::", 1)[1]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"test_wide_beats_random_init", "test_narrow_beats_random_init"}
    wide, narrow = rows["test_wide_beats_random_init"], rows["test_narrow_beats_random_init"]
    assert wide["passed"] and not narrow["passed"]
    assert wide["precision"] == "fp32" and wide["linear_top1"] == 0.75
    assert wide["margin"] == pytest.approx(0.25) and narrow["margin"] == pytest.approx(0.05)
    assert "FAILED" in done.stdout


@pytest.mark.parametrize(
    ("script", "arguments", "message"),
    [
        ("conv_peak", ["--batch-size", "0"], "--batch-size and --rounds must be >= 1"),
        ("conv_peak", ["--backbone", "nosuchnet"], "nosuchnet"),
        ("conv_weight_grad", ["--rounds", "0"], "--batch-size and --rounds must be >= 1"),
        ("conv_weight_grad", ["--backbone", "nosuchnet"], "nosuchnet"),
        ("margins", ["--precisions", "fp16"], "--precisions takes fp32 and/or bf16"),
        ("margins", ["no/such/tests"], "no such test"),
        ("step_ops", ["--steps", "0"], "--steps and --top must be at least 1"),
        ("step_ops", ["--backbone", "nosuchnet"], "nosuchnet"),
    ],
)
def test_convolution_and_margin_benchmarks_refuse_bad_input_in_one_line(
    script: str, arguments: list[str], message: str
) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert done.stderr.strip().startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr
