import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from sslab.cli import app
from sslab.store import Store

runner = CliRunner()
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "-q"]


@pytest.fixture
def db(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)
    return f"sqlite:///{tmp_path / 'results.db'}"


def test_run_records_trial_and_results_lists_it(db: str) -> None:
    result = runner.invoke(app, ["run", *TINY, "--db", db])
    assert result.exit_code == 0, result.output
    assert "linear_top1" in result.output
    csv = runner.invoke(app, ["results", "--db", db, "--format", "csv"])
    assert csv.exit_code == 0, csv.output
    frame = pd.read_csv(__import__("io").StringIO(csv.stdout))
    assert list(frame["status"]) == ["done"] and frame.loc[0, "dataset"] == "synthetic"
    assert 0.0 <= frame.loc[0, "linear_top1"] <= 1.0
    records = json.loads(runner.invoke(app, ["results", "--db", db, "--format", "json"]).stdout)
    assert records[0]["method"] == "simclr"


def test_second_run_of_same_config_does_not_train(db: str) -> None:
    assert runner.invoke(app, ["run", *TINY, "--db", db]).exit_code == 0
    again = runner.invoke(app, ["run", *TINY, "--db", db])
    assert again.exit_code == 0
    assert "already done" in again.output
    assert len(Store(db).trials()) == 1


def test_config_file_and_set_precedence(db: str, tmp_path) -> None:
    config = tmp_path / "trial.toml"
    config.write_text(
        'dataset = "synthetic"\nepochs = 1\nbatch_size = 64\ntrain_subset = 256\ntemperature = 0.3\n'
    )
    result = runner.invoke(
        app, ["run", "--config", str(config), "--set", "temperature=0.2", "--db", db, "-q"]
    )
    assert result.exit_code == 0, result.output
    row = Store(db).trials()[0]
    assert row.config["settings"]["temperature"] == 0.2 and row.config["epochs"] == 1


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--aug", "crop,wobble"], "wobble"),
        (["--epochs", "0"], "epochs must be > 0"),
        (["--optimizer", "rmsprop"], "optimizer must be one of"),
        (["--dataset", "imagefolder:/does/not/exist"], "/does/not/exist"),
        (["--set", "nope=1"], "unknown field 'nope'"),
        (["--config", "/no/such/file.toml"], "config file not found"),
    ],
)
def test_bad_input_is_a_one_line_error_and_store_is_untouched(
    db: str, arguments: list, fragment: str
) -> None:
    assert runner.invoke(app, ["run", *TINY, "--db", db]).exit_code == 0
    result = runner.invoke(app, ["run", *TINY, *arguments, "--db", db])
    assert result.exit_code != 0
    assert fragment in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(error_lines) == 1, result.output
    trials = Store(db).trials()
    assert [t.status for t in trials if t.status != "failed"] == ["done"]


def test_results_on_empty_or_missing_store(tmp_path) -> None:
    missing = runner.invoke(app, ["results", "--db", f"sqlite:///{tmp_path / 'none.db'}"])
    assert missing.exit_code != 0 and "no results store" in missing.output
    bad_format = runner.invoke(app, ["results", "--format", "xml", "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert bad_format.exit_code != 0 and "unknown format" in bad_format.output


def test_data_and_augment_listings() -> None:
    data = runner.invoke(app, ["data", "list"])
    assert data.exit_code == 0 and "fashion-mnist-mini" in data.output and "cifar10" in data.output
    ops = runner.invoke(app, ["augment", "list"])
    assert ops.exit_code == 0 and "crop" in ops.output and "sobel" in ops.output


def test_methods_lists_every_method_with_its_paper() -> None:
    from sslab.methods import methods

    METHODS = methods()

    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for name in (
        "simclr",
        "moco",
        "mocov3",
        "byol",
        "simsiam",
        "swav",
        "dino",
        "barlow",
        "instdisc",
        "supervised",
    ):
        assert name in METHODS and name in result.output
    assert "Grill et al. 2020" in result.output


def test_every_recorded_metric_is_in_the_vocabulary(db: str) -> None:
    from sslab import metrics

    result = runner.invoke(app, ["run", *TINY, "--probe-layers", "all", "--val-fraction", "0.1", "--db", db])
    assert result.exit_code == 0, result.output
    store = Store(db)
    (trial,) = store.trials()
    names = {row.name for row in store.metrics(trial.id)}
    assert {"linear_top1", "knn_top1_z", "baseline_linear_top1", "loss", "linear_val_top1_g2"} <= names
    assert all(metrics.is_metric(name) for name in names), sorted(
        n for n in names if not metrics.is_metric(n)
    )
    per_epoch = {row.name for row in store.metrics(trial.id) if row.epoch is not None}
    assert per_epoch <= set(metrics.epoch_metrics())


def test_stl10_pretrains_on_train_and_unlabelled_and_probes_on_train(db: str, tmp_path, monkeypatch) -> None:
    """The standard STL-10 protocol end to end, on fake binaries: 40 labelled and 88 unlabelled images."""
    import sslab.runner as runner_module
    from tests.test_data import fake_stl10

    fake_stl10(tmp_path / "data", train=40, unlabelled=88)
    seen = []
    original = runner_module.pretrain
    monkeypatch.setattr(
        runner_module, "pretrain", lambda *a, **k: seen.append(a[2].shape[0]) or original(*a, **k)
    )
    monkeypatch.setenv("SSLAB_CACHE", str(tmp_path / "cache"))
    stl = ["--dataset", "stl10", "--data-dir", str(tmp_path / "data"), "--image-size", "32", "--epochs", "1"]
    stl += ["--batch-size", "32", "-q", "--db", db]
    result = runner.invoke(app, ["run", *stl, "--pretrain-unlabelled"])
    assert result.exit_code == 0, result.output
    assert seen == [128]  # train + unlabelled
    assert runner.invoke(app, ["run", *stl]).exit_code == 0 and seen == [128, 40]  # another trial: train only
    frame = Store(db).results_frame()
    assert sorted(frame["pretrain_unlabelled"]) == [False, True] and frame["linear_top1"].notna().all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dataset", "synthetic"], "pretrain_unlabelled needs a dataset with an unlabelled split (stl10)"),
        (["--dataset", "stl10", "--method", "supervised"], "method supervised trains on labels"),
    ],
)
def test_pretrain_unlabelled_is_refused_where_it_cannot_apply(db: str, options, message) -> None:
    result = runner.invoke(app, ["run", *options, "--pretrain-unlabelled", "--db", db])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1
