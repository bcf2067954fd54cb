"""SEED and plain distillation: losses, the frozen teacher, the queue, naming a teacher, short real runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from steps import step_context
from typer.testing import CliRunner

from sslab import weights
from sslab.cli import app
from sslab.config import TrialConfig, from_mapping
from sslab.errors import ConfigError
from sslab.losses import distillation_kl, info_nce, seed_loss
from sslab.methods.base import Method, build_method
from sslab.models import build_backbone
from sslab.optim import build_optimizer
from sslab.runner import run_trial
from sslab.store import Provenance, Store
from sslab.teachers import resolve_teacher

N, SIDE = 16, 16  # tiny batches of 16 x 16 single-channel images for the unit tests
ROOT = Path(__file__).resolve().parent.parent
PROVENANCE = Provenance("cpu", torch.__version__, "test", None, "host")

# ---------------------------------------------------------------------------------------------- losses


def slow_seed_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float
) -> float:
    """SEED's loss one sample and one candidate at a time: candidates [z_t_n, queue_1, ..., queue_K]."""
    total = 0.0
    for s, t in zip(F.normalize(z_s.double(), dim=1), F.normalize(z_t.double(), dim=1), strict=True):
        candidates = [t, *F.normalize(queue.double(), dim=1)]
        teacher = [math.exp(float(t @ c) / tau_t) for c in candidates]
        student = [math.exp(float(s @ c) / tau_s) for c in candidates]
        p_t = [v / sum(teacher) for v in teacher]
        log_p_s = [math.log(v / sum(student)) for v in student]
        total -= sum(p * q for p, q in zip(p_t, log_p_s, strict=True))
    return total / len(z_s)


@pytest.mark.parametrize(("tau_s", "tau_t"), [(0.2, 0.05), (0.5, 0.5), (1.0, 0.1)])
def test_seed_loss_matches_a_slow_reference(tau_s: float, tau_t: float) -> None:
    generator = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    queue = torch.randn(5, 8, generator=generator)
    expected = slow_seed_loss(z_s, z_t, queue, tau_s, tau_t)
    assert seed_loss(z_s, z_t, queue, tau_s, tau_t).item() == pytest.approx(expected, rel=1e-5)


def test_seed_loss_of_a_student_equal_to_its_teacher_is_the_teachers_entropy() -> None:
    # Hand-worked: z = e1 against the queue [e2] at tau 1: scores [1, 0], p = (e, 1) / (1 + e), and the loss
    # is the entropy of p: log(1 + e) - e / (1 + e) = 0.58220.
    e1, e2 = torch.eye(2)
    loss = seed_loss(e1[None], e1[None], e2[None], 1.0, 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.e) - math.e / (1 + math.e), abs=1e-6)
    assert loss.item() == pytest.approx(0.58220, abs=1e-5)
    generator = torch.Generator().manual_seed(1)
    z, queue = torch.randn(4, 8, generator=generator), torch.randn(7, 8, generator=generator)
    zn, qn = F.normalize(z, dim=1), F.normalize(queue, dim=1)
    p = F.softmax(torch.cat([(zn * zn).sum(1, keepdim=True), zn @ qn.T], dim=1) / 0.3, dim=1)
    entropy = -(p * p.log()).sum(dim=1).mean()
    assert seed_loss(z, z, queue, 0.3, 0.3).item() == pytest.approx(entropy.item(), rel=1e-5)


def test_seed_loss_with_a_cold_teacher_is_infonce_with_the_teacher_as_positive() -> None:
    # tau_T -> 0 makes p^T one-hot on the teacher's own embedding (its cosine with itself, 1, is the largest).
    generator = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    queue = torch.randn(9, 8, generator=generator)
    cold = seed_loss(z_s, z_t, queue, 0.2, 1e-4)
    assert cold.item() == pytest.approx(info_nce(z_s, z_t, queue, 0.2).item(), rel=1e-5)


def test_seed_loss_trains_the_student_only_and_rejects_bad_input() -> None:
    z_s = torch.randn(4, 8, requires_grad=True)
    z_t = torch.randn(4, 8, requires_grad=True)
    seed_loss(z_s, z_t, torch.randn(3, 8)).backward()
    assert z_s.grad is not None and z_s.grad.abs().sum() > 0 and z_t.grad is None
    with pytest.raises(ValueError, match="queue must be"):
        seed_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 5))
    with pytest.raises(ValueError, match="teacher_temperature must be > 0"):
        seed_loss(torch.randn(4, 8), torch.randn(4, 8), torch.randn(3, 8), 0.2, 0.0)
    with pytest.raises(ValueError, match="equal shape"):
        seed_loss(torch.randn(4, 8), torch.randn(3, 8), torch.randn(3, 8))


@pytest.mark.parametrize("tau", [0.07, 0.2, 1.0])
def test_distillation_kl_matches_an_independent_computation(tau: float) -> None:
    generator = torch.Generator().manual_seed(3)
    z_s, z_t = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    total = 0.0
    for s, t in zip(F.normalize(z_s.double(), dim=1), F.normalize(z_t.double(), dim=1), strict=True):
        q_s = [math.exp(float(v) / tau) for v in s]
        q_t = [math.exp(float(v) / tau) for v in t]
        p_s = [v / sum(q_s) for v in q_s]
        p_t = [v / sum(q_t) for v in q_t]
        total += sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s, strict=True))
    assert distillation_kl(z_s, z_t, tau).item() == pytest.approx(total / 5, rel=1e-5)
    # S2-BNN's code minimises the cross-entropy: the same up to the teacher's entropy, so the same gradient.
    log_p_t = F.log_softmax(F.normalize(z_t, dim=1) / tau, dim=1)
    cross_entropy = -(log_p_t.exp() * F.log_softmax(F.normalize(z_s, dim=1) / tau, dim=1)).sum(1).mean()
    entropy = -(log_p_t.exp() * log_p_t).sum(1).mean()
    assert distillation_kl(z_s, z_t, tau).item() == pytest.approx((cross_entropy - entropy).item(), abs=1e-6)
    assert distillation_kl(z_t, z_t, tau).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------------- a teacher on disk


def keep_teacher(directory: Path, method: str = "simclr", **fields: Any) -> TrialConfig:
    """A freshly initialised `method` on 1-channel 16 px images, kept as a finished trial's weights."""
    config = from_mapping({"method": method, "batch_size": N, **fields})
    torch.manual_seed(1)
    teacher = build_method(config, build_backbone("smallcnn", 1, SIDE), num_classes=10)
    weights.save(
        weights.TrainedWeights(
            pretraining_hash=config.pretraining_hash(),
            trial_hash=config.hash(),
            config=config.record(),
            state=teacher.state_dict(),
            channels=1,
            image_size=SIDE,
            num_classes=10,
            mean=torch.full((1, 1, 1, 1), 0.3),
            std=torch.full((1, 1, 1, 1), 0.2),
        ),
        directory,
    )
    return config


@pytest.fixture
def teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TrialConfig:
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "weights"))
    return keep_teacher(tmp_path / "weights")


def student(method: str, kept: TrialConfig, channels: int = 1, **fields: Any) -> Method:
    """A `method` student of the teacher `kept` (its settings and shared fields in `fields`)."""
    config = from_mapping({"method": method, "batch_size": N, "teacher": kept.pretraining_hash(), **fields})
    torch.manual_seed(0)
    return build_method(config, build_backbone("smallcnn", channels, SIDE), num_classes=10)


def views(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(N, 1, SIDE, SIDE, generator=generator) for _ in range(2)]


def train(method: Method, steps: int) -> None:
    optimizer = build_optimizer(method.config, method)
    method.train()
    for step in range(steps):
        out = method(views(step), torch.zeros(N, dtype=torch.long), step_context(step, steps, rows=N))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        method.after_step(step_context(step, steps, rows=N))


@pytest.mark.parametrize("method", ["seed", "distill"])
def test_the_teacher_is_frozen_and_stays_in_eval_mode(method: str, teacher: TrialConfig) -> None:
    distiller = student(method, teacher, lr=0.5)
    frozen = distiller.teacher
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    student_before = [p.detach().clone() for p in distiller.backbone.parameters()]
    optimised = {
        id(p) for group in build_optimizer(distiller.config, distiller).param_groups for p in group["params"]
    }
    assert not any(id(p) in optimised for p in frozen.parameters())
    assert all(not p.requires_grad for p in frozen.parameters())
    train(distiller, steps=3)
    assert distiller.training and not frozen.training and not any(m.training for m in frozen.modules())
    for key, value in frozen.state_dict().items():  # weights and batch-norm statistics alike
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in frozen.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(student_before, distiller.backbone.parameters(), strict=True)
    )


def test_the_teacher_is_the_kept_trial_and_sees_its_own_normalisation(teacher: TrialConfig) -> None:
    distiller = student("seed", teacher)
    kept = weights.load(teacher.pretraining_hash())
    assert kept is not None
    reference = build_method(teacher, build_backbone("smallcnn", 1, SIDE), num_classes=10)
    reference.load_state_dict(kept.state)
    reference.eval()
    pixels = torch.rand(N, 1, SIDE, SIDE)
    mean, std = torch.full((1, 1, 1, 1), 0.5), torch.full((1, 1, 1, 1), 0.25)  # the student's data
    context = step_context(mean=mean, std=std)
    with torch.no_grad():
        expected = reference.head(reference.backbone((pixels - 0.3) / 0.2))  # the teacher's normalisation
    assert torch.allclose(distiller.teacher((pixels - mean) / std, context), expected, atol=1e-5)
    # Building the teacher does not move the random stream the student's initial weights come from.
    torch.manual_seed(0)
    simclr = build_method(
        from_mapping({"batch_size": N}), build_backbone("smallcnn", 1, SIDE), num_classes=10
    )
    assert torch.equal(simclr.head.layers[0][0].weight, distiller.head.layers[0][0].weight)


def test_the_seed_queue_is_fifo_and_checkpointed(teacher: TrialConfig) -> None:
    distiller = student("seed", teacher, queue_size=40)
    distiller.train()
    embedded = []
    for step in range(2):  # 2N = 32 teacher embeddings per step into 40 slots
        x = views(step)
        distiller(x, torch.zeros(N, dtype=torch.long), step_context(step, 2, rows=N))
        with torch.no_grad():
            embedded.append(F.normalize(distiller.teacher(torch.cat(x), step_context()), dim=1))  # (2N, D)
        if step == 0:
            assert torch.allclose(distiller.queue.keys[:32], embedded[0], atol=1e-6)
    first, second = embedded
    keys = distiller.queue.keys
    assert torch.allclose(keys[32:40], second[:8], atol=1e-6)  # the newest fill the free slots,
    assert torch.allclose(keys[:24], second[8:], atol=1e-6)  # then overwrite the oldest, wrapping around
    assert torch.allclose(keys[24:32], first[24:], atol=1e-6) and int(distiller.queue.ptr) == 24
    state = distiller.state_dict()
    assert torch.equal(state["queue.keys"], keys) and int(state["queue.ptr"]) == 24
    restored = student("seed", teacher, queue_size=40)
    restored.load_state_dict(state)
    assert torch.equal(restored.queue.keys, keys) and int(restored.queue.ptr) == 24


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"teacher": ""}, "seed needs --set seed.teacher="),
        ({"teacher": "12"}, "is not a pretraining hash"),
        ({"teacher": "0123456789abcdef"}, "train the teacher first"),
        ({"out_dim": 64}, "set out_dim=128"),
    ],
)
def test_a_teacher_that_cannot_be_used_is_a_one_line_error(
    teacher: TrialConfig, fields: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment) as error:
        student("seed", teacher, **fields)
    assert "\n" not in str(error.value)


def test_a_teacher_of_other_images_is_a_one_line_error(teacher: TrialConfig) -> None:
    distiller = student("distill", teacher, channels=3)
    wrong = [torch.randn(N, 3, SIDE, SIDE), torch.randn(N, 3, SIDE, SIDE)]
    with pytest.raises(
        ConfigError, match="1-channel 16x16 images, this trial's views are 3-channel"
    ) as error:
        distiller(wrong, torch.zeros(N, dtype=torch.long), step_context(rows=N))
    assert "\n" not in str(error.value)


# -------------------------------------------------------------------------------------- naming a teacher


def finished(store: Store, config: TrialConfig, status: str = "done", keep: bool = True) -> int:
    """Record `config` as a trial with `status`; with `keep`, a weights file where its weights would be."""
    trial_id = store.begin_trial(config, PROVENANCE)
    store.finish_trial(trial_id, status)
    if keep:
        path = weights.path_for(config.pretraining_hash())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return trial_id


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "weights"))
    return Store(f"sqlite:///{tmp_path / 'r.db'}")


def test_a_teacher_is_named_by_trial_id_config_hash_pretraining_hash_or_study_cell(store: Store) -> None:
    configs = [from_mapping({"dataset": "synthetic", "seed": seed, "epochs": 2}) for seed in (0, 1)]
    ids = [finished(store, config) for config in configs]
    store.register_study("teachers", {"axes": {"epochs": [2]}, "seeds": [0, 1]})
    for config in configs:
        store.add_study_trial("teachers", config.hash(), {"epochs": 2, "seed": config.seed})
    expected = configs[1].pretraining_hash()
    assert resolve_teacher(store, str(ids[1])) == expected
    assert resolve_teacher(store, configs[1].hash()) == expected
    assert resolve_teacher(store, expected) == expected and resolve_teacher(None, expected) == expected
    assert resolve_teacher(store, "teachers:epochs=2,seed=1") == expected
    assert resolve_teacher(store, " teachers: seed = 1 ") == expected
    # An evaluation-only difference (kNN k) is another trial with the same pretraining, so the same teacher.
    assert from_mapping({**configs[1].values(), "knn_k": 20}).pretraining_hash() == expected


@pytest.mark.parametrize(
    ("reference", "fragment"),
    [
        ("99", "no trial 99 in"),
        ("0123456789abcdef", "neither a trial's config hash"),
        ("nope", "give a trial id, a config hash"),
        ("other:seed=0", "no study 'other'"),
        ("teachers:epochs=2", "2 trials of study teachers"),
        ("teachers:lr=1", "the study's axes: epochs, seed"),
        ("teachers:seed=2", "no trial of study teachers"),
        ("2", "trial 2 is failed, not done"),
        ("3", "is done but its weights are not kept"),
    ],
)
def test_an_unknown_or_unfinished_teacher_is_a_one_line_error(
    store: Store, reference: str, fragment: str
) -> None:
    configs = [from_mapping({"dataset": "synthetic", "seed": seed, "epochs": 2}) for seed in range(3)]
    finished(store, configs[0])
    finished(store, configs[1], "failed")
    finished(store, configs[2], keep=False)
    store.register_study("teachers", {"axes": {"epochs": [2]}, "seeds": [0, 1]})
    for config in configs[:2]:
        store.add_study_trial("teachers", config.hash(), {"epochs": 2, "seed": config.seed})
    with pytest.raises(ConfigError, match=fragment) as error:
        resolve_teacher(store, reference)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--method", "seed"], "seed needs --set seed.teacher="),
        (["--method", "seed", "--set", "seed.teacher=12"], "teacher 12: no trial 12 in"),
        (["--method", "distill", "--teacher", "0123456789abcdef"], "train the teacher first"),
    ],
)
def test_sslab_run_without_a_usable_teacher_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arguments: list[str], fragment: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "weights"))
    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = CliRunner().invoke(app, ["run", "--dataset", "synthetic", *arguments, "--db", db, "-q"])
    assert result.exit_code != 0 and fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1, result.output
    assert Store(db).trials() == []  # refused before any trial was recorded


# ------------------------------------------------------------------------------ short real pretrainings

# Linear-probe margins over the random-init baseline, measured with these very runs (2000 images, 2 epochs,
# seed 0, each method's defaults, the teacher a small CNN trained by SimCLR on the same budget, itself +3.55):
# SEED +4.1 points, distill +2.05 (students of seeds 1 and 2: SEED +3.75 / +3.9, distill +2.3 / +2.25; SimCLR
# alone +4.1 / +6.3: a teacher no bigger than its student teaches it no more). Each test asks for about half.
MARGINS = {"seed": 0.02, "distill": 0.01}
BUDGET = {"train_subset": 2000, "epochs": 2, "seed": 0}


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, TrialConfig, int]]:
    """A small CNN trained by SimCLR on the embedded data, weights kept: (store URL, weights, config, id)."""
    directory = tmp_path_factory.mktemp("teacher")
    url = f"sqlite:///{directory / 'r.db'}"
    config = from_mapping({"method": "simclr", **BUDGET})
    outcome = run_trial(config, Store(url), checkpoint_dir=directory, weights_dir=directory / "weights")
    assert (
        outcome.status == "done"
        and weights.path_for(config.pretraining_hash(), directory / "weights").exists()
    )
    yield url, directory / "weights", config, outcome.trial_id


def test_a_seed_student_named_by_trial_id_beats_random_init(
    trained_teacher: tuple[str, Path, TrialConfig, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, kept, teacher, trial_id = trained_teacher
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(kept))
    budget = ["--train-subset", "2000", "--epochs", "2", "--seed", "0"]
    result = CliRunner().invoke(
        app, ["run", "--method", "seed", *budget, "--set", f"seed.teacher={trial_id}", "--db", url, "-q"]
    )
    assert result.exit_code == 0, result.output
    store = Store(url)
    row = store.trials()[-1]
    assert row.method == "seed" and row.status == "done" and not row.collapsed
    assert row.config["settings"]["teacher"] == teacher.pretraining_hash()  # stored by what it learnt from
    metrics = store.final_metrics(row.id)
    assert metrics["linear_top1"] - metrics["baseline_linear_top1"] > MARGINS["seed"], metrics


def test_a_distill_student_beats_random_init(
    trained_teacher: tuple[str, Path, TrialConfig, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, kept, teacher, _ = trained_teacher
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(kept))
    config = from_mapping({"method": "distill", "teacher": teacher.pretraining_hash(), **BUDGET})
    outcome = run_trial(config, Store(url), checkpoint_dir=tmp_path, weights_dir=tmp_path / "weights")
    assert outcome.status == "done" and outcome.collapsed is False
    margin = outcome.metrics["linear_top1"] - outcome.metrics["baseline_linear_top1"]
    assert margin > MARGINS["distill"], outcome.metrics


@pytest.mark.slow  # four trials in five processes: ~50 s of CPU
def test_the_two_stage_script_runs_the_teacher_then_the_study(tmp_path: Path) -> None:
    # The preset at one epoch, in ./studies where it shadows the shipped one: a teacher and three cells.
    preset = (ROOT / "studies" / "seed-distill.toml").read_text()
    assert preset.count("epochs = 4\n") == 1
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "seed-distill.toml").write_text(preset.replace("epochs = 4\n", "epochs = 1\n"))
    tiny = ["dataset=fashion-mnist-mini", "train_subset=128", "batch_size=64", "precision=fp32"]
    env = {
        **os.environ,
        "TEACHER_EPOCHS": "1",
        "SSLAB_DB": f"sqlite:///{tmp_path / 'r.db'}",
        weights.WEIGHTS_ENV: str(tmp_path / "weights"),
        "SSLAB_WORKERS": "1",
        "SSLAB_PYTHON": sys.executable,
    }
    arguments = [part for key_value in [*tiny, "backbone=smallcnn"] for part in ("--set", key_value)]
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "seed-distill.sh"), *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    store = Store(env["SSLAB_DB"])
    teacher = next(row for row in store.trials() if row.config["epochs"] == 1)
    assert teacher.method == "simclr" and teacher.config["train_subset"] == 128
    frame = store.study_frame("seed-distill")
    assert sorted(frame["method"]) == ["distill", "seed", "simclr"]
    assert set(frame["status"]) == {"done"} and set(frame["train_subset"]) == {128}
    pretraining = from_mapping(teacher.config).pretraining_hash()
    assert set(frame[frame["method"] != "simclr"]["teacher"]) == {pretraining}
