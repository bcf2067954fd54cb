"""Pretraining loop, evaluation and the trial runner, end to end on small real and synthetic data."""

import math
import shutil

import pytest
import torch

from sslab import weights
from sslab.config import from_mapping
from sslab.evaluate import knn_top1, linear_probe
from sslab.methods.base import build_method
from sslab.models import build_backbone, build_head
from sslab.optim import build_optimizer, clip_each_gradient, lr_at, weight_decay_at
from sslab.runner import balanced_subset, run_trial
from sslab.store import Store
from sslab.train import TrialFailed, pretrain


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'results.db'}")


def test_simclr_beats_random_init_on_embedded_fashion_mnist(store, tmp_path) -> None:
    # Measured with this config: linear 0.8415 vs baseline 0.8085 (+3.3 points), kNN 0.7105 vs 0.6860.
    config = from_mapping({"epochs": 4, "seed": 0})
    outcome = run_trial(config, store, checkpoint_dir=tmp_path)
    margin = outcome.metrics["linear_top1"] - outcome.metrics["baseline_linear_top1"]
    assert margin > 0.015, outcome.metrics
    assert outcome.metrics["knn_top1"] > outcome.metrics["baseline_knn_top1"]
    assert outcome.collapsed is False
    epochs = [m for m in store.metrics(outcome.trial_id) if m.name == "loss"]
    assert [m.epoch for m in epochs] == [1, 2, 3, 4]
    assert epochs[-1].value < epochs[0].value


@pytest.mark.parametrize("head", [1, 3])
def test_probe_layers_all_probes_every_head_layer_and_names_z(store, tmp_path, head: int) -> None:
    config = from_mapping(
        {"dataset": "synthetic", "epochs": 1, "batch_size": 64, "head": head, "probe_layers": "all"}
    )
    metrics = run_trial(config, store, checkpoint_dir=tmp_path).metrics
    layers = [f"g{depth}" for depth in range(1, head + 1)]
    assert all(f"linear_top1_{g}" in metrics and f"knn_top1_{g}" in metrics for g in layers)
    assert f"linear_top1_g{head + 1}" not in metrics
    assert metrics["linear_top1_z"] == metrics[f"linear_top1_g{head}"]  # z: the head's output
    assert metrics["knn_top1_z"] == metrics[f"knn_top1_g{head}"]


def test_non_finite_loss_fails_the_trial_and_keeps_its_record(store, tmp_path) -> None:
    config = from_mapping(
        {"dataset": "synthetic", "epochs": 2, "batch_size": 64, "lr": 1e6, "normalize": False}
    )
    with pytest.raises(TrialFailed, match="non-finite loss"):
        run_trial(config, store, checkpoint_dir=tmp_path)
    row = store.find(config.hash())
    assert row is not None and row.status == "failed" and "non-finite loss" in row.reason
    assert "baseline_linear_top1" in store.final_metrics(row.id)


# moco draws its batch shuffle, relpos its patches and instdisc its random bank from torch's global generator,
# kept in the checkpoint.
@pytest.mark.parametrize("method", ["simclr", "moco", "relpos", "instdisc"])
def test_resume_continues_from_the_last_checkpoint(method: str, store, tmp_path, monkeypatch) -> None:
    config = from_mapping(
        {"method": method, "dataset": "synthetic", "epochs": 3, "batch_size": 64, "train_subset": 512}
    )
    reference = run_trial(
        config,
        Store(f"sqlite:///{tmp_path / 'ref.db'}"),
        checkpoint_dir=tmp_path / "ref",
        weights_dir=tmp_path / "ref-weights",
    )

    import sslab.train as train

    original = train.EpochRecord

    def interrupt_after_second_epoch(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = original(*args, **kwargs)
        if record.epoch == 2:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(train, "EpochRecord", interrupt_after_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_trial(config, store, checkpoint_dir=tmp_path / "run", weights_dir=tmp_path / "weights")
    assert store.find(config.hash()).status == "interrupted"
    monkeypatch.setattr(train, "EpochRecord", original)

    # The interrupted epoch 2 was not checkpointed: resume redoes it from the epoch-1 checkpoint and
    # must land exactly where an uninterrupted run does.
    resumed = run_trial(
        config, store, resume=True, checkpoint_dir=tmp_path / "run", weights_dir=tmp_path / "weights"
    )
    assert resumed.status == "done"
    ended, straight = (
        weights.load(config.pretraining_hash(), tmp_path / d) for d in ("weights", "ref-weights")
    )
    assert ended is not None and straight is not None
    for name, tensor in straight.state.items():  # the same weights and method state (queues, banks, ...)
        assert torch.equal(ended.state[name], tensor), name
    assert resumed.metrics["final_loss"] == reference.metrics["final_loss"]
    assert resumed.metrics["linear_top1"] == reference.metrics["linear_top1"]
    losses = sorted((m.epoch, m.value) for m in store.metrics(resumed.trial_id) if m.name == "loss")
    assert [epoch for epoch, _ in losses] == [1, 2, 3]
    assert not (tmp_path / "run" / f"{config.hash()}.pt").exists()


def test_a_resumed_trial_keeps_what_the_epoch_hook_measured_before(store, tmp_path, monkeypatch) -> None:
    """The hook (a study's per-epoch validation kNN) runs on the epochs trained in this run only: a resumed
    trial's replayed epochs keep the values measured with their own weights."""
    config = from_mapping({"dataset": "synthetic", "epochs": 3, "batch_size": 64, "train_subset": 512})
    measured: list[int] = []

    def hook(method, record, extra) -> None:  # type: ignore[no-untyped-def]
        measured.append(record.epoch)
        extra["knn_val_top1"] = record.epoch / 10 + (0.5 if len(measured) > 2 else 0.0)  # differs per run

    import sslab.train as train

    original = train.EpochRecord

    def interrupt_in_third_epoch(*args, **kwargs):  # type: ignore[no-untyped-def]
        record = original(*args, **kwargs)
        if record.epoch == 3:
            raise KeyboardInterrupt
        return record

    monkeypatch.setattr(train, "EpochRecord", interrupt_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_trial(config, store, checkpoint_dir=tmp_path, epoch_hook=hook)
    monkeypatch.setattr(train, "EpochRecord", original)
    resumed = run_trial(config, store, resume=True, checkpoint_dir=tmp_path, epoch_hook=hook)
    assert measured == [1, 2, 3]  # epochs 1 and 2 replayed without the hook
    metrics = store.metrics(resumed.trial_id)
    values = {m.epoch: m.value for m in metrics if m.name == "knn_val_top1" and m.epoch is not None}
    assert values == {1: pytest.approx(0.1), 2: pytest.approx(0.2), 3: pytest.approx(0.8)}


def test_linear_probe_and_knn_on_separable_features() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 4
    train_y = torch.arange(300) % 3
    test_y = torch.arange(90) % 3
    train_x = centres[train_y] + torch.randn(300, 8, generator=generator)
    test_x = centres[test_y] + torch.randn(90, 8, generator=generator)
    assert linear_probe(train_x, train_y, test_x, test_y, 3).top1 > 0.95
    assert knn_top1(train_x, train_y, test_x, test_y, 3, k=20) > 0.95
    shuffled = linear_probe(train_x, train_y[torch.randperm(300, generator=generator)], test_x, test_y, 3)
    assert shuffled.top1 < 0.6
    chosen = linear_probe(train_x, train_y, test_x, test_y, 3, val_fraction=0.2)
    assert chosen.val_top1 is not None and chosen.val_top1 > 0.9


def test_knn_vote_is_weighted_by_similarity() -> None:
    # One very close neighbour of class 1 outweighs two distant ones of class 0 at low temperature.
    train_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    train_y = torch.tensor([1, 0, 0])
    test_x = torch.tensor([[1.0, 0.1]])
    assert knn_top1(train_x, train_y, test_x, torch.tensor([1]), 2, k=3, temperature=0.1) == 1.0
    assert knn_top1(train_x, train_y, test_x, torch.tensor([0]), 2, k=3, temperature=100.0) == 1.0


def test_lr_schedule_warmup_and_cosine() -> None:
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(10, 100, 0, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))


def test_weight_decay_schedule_is_dinos_cosine() -> None:
    """DINO's cosine_scheduler(0.04, 0.4, ...): the base value at the first step, the final at the last."""
    assert weight_decay_at(0, 11, 0.04, 0.4) == pytest.approx(0.04)
    assert weight_decay_at(5, 11, 0.04, 0.4) == pytest.approx(0.22)
    assert weight_decay_at(10, 11, 0.04, 0.4) == pytest.approx(0.4)
    assert weight_decay_at(3, 11, 0.04, None) == 0.04


def test_pretrain_follows_the_weight_decay_schedule(monkeypatch) -> None:
    config = from_mapping(
        {"batch_size": 16, "epochs": 2, "weight_decay": 0.04, "weight_decay_end": 0.4, "precision": "fp32"}
    )
    from sslab.methods.base import build_method

    torch.manual_seed(0)
    method = build_method(config, build_backbone("smallcnn", 1, 16), num_classes=10)
    seen: list[tuple[float, ...]] = []
    optimizers = []
    import sslab.train as train_module

    def capture(*args, **kwargs):
        optimizers.append(build_optimizer(*args, **kwargs))
        return optimizers[-1]

    monkeypatch.setattr(train_module, "build_optimizer", capture)
    monkeypatch.setattr(
        method,
        "before_optimizer_step",
        lambda step: seen.append(tuple(g["weight_decay"] for g in optimizers[0].param_groups)),
    )
    images = torch.randint(0, 256, (32, 1, 16, 16), dtype=torch.uint8)
    pretrain(method, config, images, torch.arange(32) % 10, torch.device("cpu"))
    expected = [weight_decay_at(step, 4, 0.04, 0.4) for step in range(4)]
    assert [wd for wd, _ in seen] == pytest.approx(expected)  # weights follow the schedule
    assert all(no_decay == 0.0 for _, no_decay in seen)  # biases and norms stay without decay


def test_clip_each_gradient_clips_every_parameter_on_its_own() -> None:
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    big.grad, small.grad = torch.tensor([3.6, 4.8]), torch.tensor([1.0])  # norms 6 and 1
    clip_each_gradient([big, small], 3.0)
    assert big.grad.tolist() == pytest.approx([1.8, 2.4], rel=1e-5)  # 3 / 6 of itself, not 3 / sqrt(37)
    assert small.grad.tolist() == [1.0]


def test_optimizer_leaves_biases_and_norms_without_weight_decay() -> None:
    backbone = build_backbone("smallcnn", 3, 32)
    optimizer = build_optimizer(from_mapping({"optimizer": "lars"}), backbone)
    for group in optimizer.param_groups:
        shapes = {p.ndim for p in group["params"]}
        assert (group["weight_decay"] == 0) == (shapes <= {1})


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_accept_any_channel_count(name: str, channels: int) -> None:
    backbone = build_backbone(name, channels, 32)
    assert backbone(torch.randn(2, channels, 32, 32)).shape == (2, backbone.feature_dim)


def test_resnet_cifar_stem() -> None:
    small = build_backbone("resnet18", 3, 32)
    large = build_backbone("resnet18", 3, 224)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert large.conv1.kernel_size == (7, 7) and not isinstance(large.maxpool, torch.nn.Identity)


@pytest.mark.parametrize(("depth", "layers"), [(0, 0), (1, 1), (2, 2), (4, 4)])
def test_head_depth_and_intermediate_outputs(depth: int, layers: int) -> None:
    head = build_head(16, depth, 32, 8)
    outputs = head.intermediate(torch.randn(4, 16))
    assert len(outputs) == layers
    assert head(torch.randn(4, 16)).shape == ((4, 8) if depth else (4, 16))
    if depth >= 2:
        assert outputs[0].shape == (4, 32)


def test_balanced_subset_keeps_class_shares() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    images = torch.arange(100).view(100, 1, 1, 1)
    _, chosen = balanced_subset(images, labels, 30)
    assert torch.bincount(chosen).tolist() == [10, 10, 10]


def test_random_streams_are_derived_from_seed_purpose_and_rank() -> None:
    """Replicate seed s + 1's data order is not seed s's augmentation stream (as it was in pipeline 1)."""
    from sslab.train import stream_seed

    old = [from_mapping({"seed": s, "pipeline_version": 1}) for s in (0, 1)]
    assert stream_seed(old[0], "augment") == stream_seed(old[1], "order")
    new = [from_mapping({"seed": s}) for s in (0, 1)]
    seeds = {
        stream_seed(c, purpose, rank) for c in new for purpose in ("order", "augment") for rank in (0, 1)
    }
    assert len(seeds) == 8


@pytest.mark.skipif(
    not shutil.which("gcc") and not shutil.which("cc"), reason="torch.compile on a CPU needs a C compiler"
)
def test_a_compiled_backbone_trains_as_the_eager_one_and_is_the_same_trial() -> None:
    """`compile` is a runtime setting: the trial's identity is unchanged, its losses and weights agree with
    the eager step's to float rounding (the compiler fuses and reorders operations), and the state dict keeps
    its keys, so checkpoints and kept weights load either way."""
    eager_config = from_mapping({"batch_size": 16, "epochs": 1, "precision": "fp32"})
    compiled_config = eager_config.with_runtime(compile=True)
    assert compiled_config.hash() == eager_config.hash()
    images = torch.randint(
        0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.arange(32) % 10
    results, states = [], []
    for config in (eager_config, compiled_config):
        torch.manual_seed(0)
        method = build_method(config, build_backbone("smallcnn", 3, 16), num_classes=10)
        results.append(pretrain(method, config, images, labels, torch.device("cpu")))
        states.append(method.state_dict())
        assert (method.backbone._compiled_call_impl is not None) is config.compile  # nn.Module.compile's
    assert states[0].keys() == states[1].keys()
    assert math.isclose(results[0].history[0].loss, results[1].history[0].loss, rel_tol=1e-4)
    for name, value in states[0].items():
        if value.is_floating_point():
            assert torch.allclose(value, states[1][name], rtol=1e-3, atol=1e-4), name
