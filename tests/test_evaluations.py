"""Evaluations beyond the linear probe: fine-tuning on shares of the labels, transfer to another dataset by
reusing a pretraining, label-free metrics per epoch, and the kNN sweep."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from typer.testing import CliRunner

from sslab import label_free, runner
from sslab.cli import app
from sslab.config import from_mapping
from sslab.errors import ConfigError
from sslab.evaluate import knn_grid, knn_top1
from sslab.finetune import finetune, labelled_subset
from sslab.metrics import lookup, validation_twin
from sslab.pipeline import derived_seed
from sslab.runner import build_model, prepare_dataset, run_trial
from sslab.store import Store
from sslab.study import load_plan
from sslab.train import pretrain

TINY = {"dataset": "synthetic", "train_subset": 300, "image_size": 16, "epochs": 1, "batch_size": 64}


def _store(tmp_path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'r.db'}")


# ------------------------------------------------------------------------------------ labelled subsets


@pytest.mark.parametrize("percent", [1.0, 10.0, 50.0])
def test_labelled_subset_is_class_balanced_fixed_by_seed_and_inside_the_pool(percent: float) -> None:
    labels = torch.arange(1000) % 10  # 100 per class
    pool = torch.arange(100, 1000)  # the first 100 images held out (90 per class remain)
    chosen = labelled_subset(labels, percent, seed=3, pool=pool)
    per_class = torch.bincount(labels[chosen], minlength=10)
    assert per_class.tolist() == [max(1, round(90 * percent / 100))] * 10
    assert bool((chosen >= 100).all()) and chosen.unique().numel() == chosen.numel()
    assert torch.equal(chosen, labelled_subset(labels, percent, seed=3, pool=pool))
    assert not torch.equal(chosen, labelled_subset(labels, percent, seed=4, pool=pool))


def test_derived_seeds_differ_by_purpose_and_seed() -> None:
    seeds = {derived_seed(s, p) for s, p in itertools.product(range(3), ("labels-1", "labels-10", "views"))}
    assert len(seeds) == 9


# ------------------------------------------------------------------------------------------ fine-tuning


def _pretrained(config):
    dataset = prepare_dataset(config)
    method = build_model(config, dataset)
    pretrain(method, config, dataset.train_images, dataset.train_labels, torch.device("cpu"))
    return method, dataset


def test_finetuning_is_deterministic_and_never_reads_the_test_images() -> None:
    config = from_mapping(
        {**TINY, "finetune_labels": "10,100", "finetune_steps": 8, "finetune_batch": 32, "val_fraction": 0.2}
    )
    method, dataset = _pretrained(config)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    mean, std = runner.channel_stats(dataset.train_images)

    def scores(test_images: torch.Tensor) -> dict[str, float]:
        return finetune(
            method,
            config,
            dataset.train_images,
            dataset.train_labels,
            test_images,
            dataset.test_labels,
            dataset.num_classes,
            mean,
            std,
            torch.device("cpu"),
        )

    first = scores(dataset.test_images)
    assert set(first) == {
        "finetune_top1",
        "finetune_top1_10pct",
        "finetune_val_top1",
        "finetune_val_top1_10pct",
    }
    assert all(0.0 <= v <= 1.0 for v in first.values())
    assert scores(dataset.test_images) == first  # same seed, same numbers
    blind = scores(torch.full_like(dataset.test_images, 255))
    assert {k: v for k, v in blind.items() if "val" in k} == {k: v for k, v in first.items() if "val" in k}
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())  # a copy is fine-tuned


def test_finetuning_learns_from_the_labels() -> None:
    config = from_mapping({**TINY, "finetune_labels": "100", "finetune_steps": 60, "finetune_lr": 0.05})
    method, dataset = _pretrained(config)
    mean, std = runner.channel_stats(dataset.train_images)
    args = (dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels)
    tuned = finetune(method, config, *args, dataset.num_classes, mean, std, torch.device("cpu"))
    # 10 classes, chance 10%. Measured: 0.995 after 60 steps on these 300 synthetic images; 0.125 with the
    # same steps at learning rate 0 (the untrained classifier).
    assert tuned["finetune_top1"] > 0.6


def test_finetune_from_g1_needs_a_hidden_head_layer() -> None:
    with pytest.raises(ConfigError, match="finetune_from=g1 needs a head"):
        from_mapping({"finetune_labels": "10", "finetune_from": "g1", "head": 1})
    with pytest.raises(ConfigError, match="percent in"):
        from_mapping({"finetune_labels": "0,10"})
    config = from_mapping({"finetune_labels": " 10 ,1%,10"})
    assert config.finetune_labels == "1,10"


def test_evaluation_fields_leave_the_pretraining_identity_alone() -> None:
    plain = from_mapping(TINY)
    evaluated = plain.replace(
        finetune_labels="1,10", knn_sweep=True, probe_dataset="fashion-mnist-mini", knn_k=20, val_fraction=0.1
    )
    assert evaluated.hash() != plain.hash()
    assert evaluated.pretraining_hash() == plain.pretraining_hash()
    assert plain.replace(epochs=2).pretraining_hash() != plain.pretraining_hash()
    # fine-tuning settings are part of a trial only when it fine-tunes
    assert plain.replace(finetune_steps=5).hash() == plain.hash()


# ------------------------------------------------------------------------ transfer: reuse of a pretraining


def test_transfer_trial_reuses_the_pretraining_by_identity(tmp_path, monkeypatch) -> None:
    store = _store(tmp_path)
    source = from_mapping({**TINY, "dataset": "fashion-mnist-mini", "train_subset": 500, "epochs": 2})
    first = run_trial(source, store, checkpoint_dir=tmp_path)
    assert first.status == "done"

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again")

    monkeypatch.setattr(runner, "pretrain", no_training)
    transfer = source.replace(probe_dataset="synthetic", finetune_labels="10", finetune_steps=5)
    outcome = run_trial(transfer, store, checkpoint_dir=tmp_path)
    assert outcome.status == "done" and outcome.config_hash != first.config_hash
    row = store.find(transfer.hash())
    assert row is not None and row.pretrained_from == first.config_hash
    losses = [(m.epoch, m.value) for m in store.metrics(outcome.trial_id) if m.name == "loss"]
    source_losses = [(m.epoch, m.value) for m in store.metrics(first.trial_id) if m.name == "loss"]
    assert losses == source_losses and len(losses) == 2
    # the probe and the baseline read the other dataset (synthetic shapes, fitted to 1 x 16 x 16)
    assert outcome.metrics["baseline_linear_top1"] != first.metrics["baseline_linear_top1"]
    assert {"linear_top1", "knn_top1", "finetune_top1_10pct", "rankme"} <= set(outcome.metrics)
    assert outcome.metrics["rankme"] == first.metrics["rankme"]  # label-free metrics of the pretraining
    assert run_trial(transfer, store, checkpoint_dir=tmp_path).status == "cached"


def test_force_pretrains_again_and_a_damaged_weights_file_is_a_one_line_error(tmp_path) -> None:
    store = _store(tmp_path)
    config = from_mapping(TINY)
    run_trial(config, store, checkpoint_dir=tmp_path)
    from sslab import weights

    path = weights.path_for(config.pretraining_hash())
    assert path.exists()
    path.write_bytes(b"not a weights file")
    result = CliRunner().invoke(
        app,
        ["run", "--dataset", "synthetic", "--train-subset", "300", "--image-size", "16", "--epochs", "1"]
        + ["--batch-size", "64", "--knn-sweep", "--db", f"sqlite:///{tmp_path / 'r.db'}"],
    )
    assert result.exit_code != 0 and "cannot read the weights file" in result.output
    assert "Traceback" not in result.output
    forced = run_trial(config.replace(knn_sweep=True), store, checkpoint_dir=tmp_path, force=True)
    assert (
        forced.status == "done" and store.find(config.replace(knn_sweep=True).hash()).pretrained_from is None
    )


# ------------------------------------------------------------------------------------ label-free metrics


def test_rankme_by_hand() -> None:
    assert label_free.rankme(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)  # 8 equal singular values
    rank_one = torch.outer(torch.arange(1.0, 11.0), torch.ones(5))
    assert label_free.rankme(rank_one) == pytest.approx(1.0, abs=1e-4)
    features = torch.diag(torch.tensor([3.0, 1.0]))  # p = (0.75, 0.25)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert label_free.rankme(features) == pytest.approx(expected, rel=1e-5)


def test_alignment_and_uniformity_against_slow_references() -> None:
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 12, 5, generator=g)
    n1, n2 = (x / x.norm(dim=1, keepdim=True) for x in (f1, f2))
    aligned = sum(float((n1[i] - n2[i]).norm() ** 2) for i in range(12)) / 12
    assert label_free.alignment(f1, f2) == pytest.approx(aligned, rel=1e-6)
    assert label_free.alignment(f1, 3 * f1) == pytest.approx(0.0, abs=1e-12)
    pairs = [math.exp(-2 * float((n1[i] - n1[j]).norm() ** 2)) for i in range(12) for j in range(i + 1, 12)]
    assert label_free.uniformity(f1) == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-6)


def test_label_free_metrics_are_recorded_per_epoch_and_change_no_training(tmp_path) -> None:
    config = from_mapping({**TINY, "epochs": 2})
    store = _store(tmp_path)
    outcome = run_trial(config, store, checkpoint_dir=tmp_path)
    rows = store.metrics(outcome.trial_id)
    for name in ("rankme", "alignment", "uniformity"):
        assert [m.epoch for m in rows if m.name == name] == [1, 2, None]
        assert f"baseline_{name}" in outcome.metrics
    dataset = prepare_dataset(config)
    plain, measured = build_model(config, dataset), build_model(config, dataset)
    pretrain(plain, config, dataset.train_images, dataset.train_labels, torch.device("cpu"))
    seen = []

    def measure(method, record):
        seen.append(record.epoch)
        return runner._label_free(config, dataset, runner.DataFormat.of(dataset), torch.device("cpu"))(method)

    pretrain(
        measured, config, dataset.train_images, dataset.train_labels, torch.device("cpu"), measure=measure
    )
    assert seen == [1, 2]
    assert all(torch.equal(v, measured.state_dict()[k]) for k, v in plain.state_dict().items())


# ----------------------------------------------------------------------------------------------- kNN sweep


def test_knn_grid_equals_the_plain_knn_at_every_point() -> None:
    g = torch.Generator().manual_seed(1)
    train_x, test_x = torch.randn(60, 6, generator=g), torch.randn(25, 6, generator=g)
    train_y, test_y = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (25,), generator=g)
    grid = knn_grid(train_x, train_y, test_x, test_y, 3, (1, 5, 20), (0.05, 0.5), chunk=7)
    for (k, t), value in grid.items():
        assert value == knn_top1(train_x, train_y, test_x, test_y, 3, k, t)


def test_knn_sweep_chooses_on_validation_only(tmp_path) -> None:
    config = from_mapping({**TINY, "knn_sweep": True, "val_fraction": 0.2})
    dataset = prepare_dataset(config)
    method = build_model(config, dataset)
    metrics = runner.evaluate(method, config, dataset, torch.device("cpu"))
    assert {"knn_sweep_top1", "knn_sweep_k", "knn_sweep_t", "knn_top1_k20_t0.07"} <= set(metrics)
    k, t = int(metrics["knn_sweep_k"]), metrics["knn_sweep_t"]
    assert metrics["knn_sweep_top1"] == metrics[f"knn_top1_k{k}_t{t:g}"]
    blind = dataclasses.replace(dataset, test_images=torch.full_like(dataset.test_images, 255))
    blind_metrics = runner.evaluate(method, config, blind, torch.device("cpu"))
    assert (blind_metrics["knn_sweep_k"], blind_metrics["knn_sweep_t"]) == (k, t)


# ------------------------------------------------------------------------- metric names and study objectives


def test_evaluation_metrics_are_in_the_vocabulary_with_validation_twins() -> None:
    assert lookup("finetune_top1_10pct").split == "test"
    assert validation_twin("finetune_top1_1pct") == "finetune_val_top1_1pct"
    assert validation_twin("knn_sweep_top1") == "knn_sweep_val_top1"
    assert lookup("knn_val_top1_k20_t0.05").split == "val"
    assert lookup("baseline_rankme").name == "rankme" and lookup("rankme_g2") is None


def _study(tmp_path, body: str):
    path = tmp_path / "s.toml"
    path.write_text(
        f'name = "s"\n{body}\n[base]\ndataset = "synthetic"\nfinetune_labels = "10"\n'
        "val_fraction = 0.1\n[axes]\nlr = [0.1, 0.5]\n"
    )
    return load_plan(str(path))


def test_a_search_may_optimise_fine_tuning_only_on_validation(tmp_path) -> None:
    with pytest.raises(ConfigError, match="optimise finetune_val_top1_10pct"):
        _study(tmp_path, 'sampler = "tpe"\nn_trials = 4\nmetric = "finetune_top1_10pct"')
    plan = _study(tmp_path, 'sampler = "tpe"\nn_trials = 4\nmetric = "finetune_val_top1_10pct"')
    assert plan.spec.metric == "finetune_val_top1_10pct"


def test_weights_are_reused_only_where_their_trial_is_done(tmp_path, monkeypatch) -> None:
    config = from_mapping(TINY)
    run_trial(config, _store(tmp_path / "a"), checkpoint_dir=tmp_path)
    other = _store(tmp_path / "b")  # another store, the same weights folder
    outcome = run_trial(config.replace(knn_sweep=True), other, checkpoint_dir=tmp_path)
    assert other.find(config.replace(knn_sweep=True).hash()).pretrained_from is None
    assert outcome.status == "done"


def test_the_random_init_baseline_is_computed_once_and_stored(tmp_path, monkeypatch) -> None:
    store = _store(tmp_path)
    first = run_trial(from_mapping(TINY), store, checkpoint_dir=tmp_path)
    calls = []
    original = runner.evaluate

    def counting(method, config, *args, **kwargs):
        calls.append(config.probe_layers)
        return original(method, config, *args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", counting)
    # another method and augmentation, the same data, backbone, seed and probe: the stored baseline
    other = run_trial(from_mapping({**TINY, "method": "byol", "aug": "crop"}), store, checkpoint_dir=tmp_path)
    assert len(calls) == 1  # the trained model's evaluation only
    assert other.metrics["baseline_linear_top1"] == first.metrics["baseline_linear_top1"]
    run_trial(from_mapping({**TINY, "seed": 1}), store, checkpoint_dir=tmp_path)
    assert len(calls) == 3  # a new seed: a new initial backbone, its own baseline
