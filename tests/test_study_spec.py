"""Study files: validation, presets, grid expansion, protocols and overrides (no training)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sslab.cli import app
from sslab.errors import ConfigError
from sslab.study import load_plan, study_files
from sslab.study.spec import PRESET_DIR

runner = CliRunner()
PRESETS = sorted(path.stem for path in PRESET_DIR.glob("*.toml"))
OPS = ["crop", "cutout", "color", "sobel", "noise", "blur", "rotate"]


def write(tmp_path: Path, text: str, name: str = "study.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_every_problem_is_reported_at_once_with_file_and_field(tmp_path) -> None:
    path = write(
        tmp_path,
        """
name = "broken"
sampler = "grid"
n_trials = 5
metric = "accuracy"
colour = 1
seeds = [0, 0]
[base]
epochs = 0
wobble = 3
[axes]
temperature = [0.5, -1.0]
first = ["crop"]
lr = { type = "log", low = 1e-3, high = 1.0 }
[pruner]
metric = "linear_top1"
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_plan(path)
    message = str(caught.value)
    expected_fields = [
        "n_trials",  # only for searches
        "metric",  # unknown metric
        "colour",  # unknown key
        "seeds",  # repeated seed
        "base.wobble",  # unknown config field
        "base:",  # epochs must be > 0
        "axes.temperature = -1.0",  # an invalid axis value, named with its value
        "axes.first",  # op axis without a protocol
        "axes.lr",  # a distribution in a grid
        "pruner.metric",  # not a per-epoch metric
    ]
    for field in expected_fields:
        assert f"{path}: {field}" in message, (field, message)
    assert "epochs must be > 0" in message and "temperature must be > 0" in message
    assert message.splitlines()[0].startswith(f"{path}: {len(message.splitlines()) - 1} problems")


@pytest.mark.parametrize("name", PRESETS)
def test_presets_are_valid_and_found_by_name(name: str) -> None:
    plan = load_plan(name)
    assert plan.spec.name == name and plan.total >= 2 and plan.spec.description
    assert len({cell.hash for cell in plan.cells}) == len(plan.cells)
    assert name in study_files()


def test_presets_cover_the_published_ablations() -> None:
    assert set(PRESETS) >= {
        "aug-pairs",
        "color-strength",
        "head",
        "head-depth",
        "batch-size",
        "temperature",
        "methods",
        "simsiam-stopgrad",
        "byol-bn",
        "moco-queue",
    }


def test_aug_pairs_grid_asymmetric_protocol() -> None:
    plan = load_plan("aug-pairs")
    assert plan.total == 49 and plan.spec.protocol == "asymmetric"
    assert [a.name for a in plan.spec.axes] == ["first", "second"]
    cells = {(c.axes["first"], c.axes["second"]): c for c in plan.cells}
    assert set(cells) == {(a, b) for a in OPS for b in OPS}
    single = cells[("crop", "crop")].config
    assert single.aug1 == "crop(scale=0.2-1)" and single.aug2 == "identity"  # diagonal: the single op
    pair = cells[("color", "crop")].config
    assert pair.aug1 == "color,crop(scale=0.2-1)" and pair.aug2 == "identity"  # ordered: first, then second
    assert pair.view_specs == ("color,crop(scale=0.2-1)", "identity")
    assert all(c.axes["seed"] == 0 for c in plan.cells)


def test_symmetric_protocol_and_labelled_axes(tmp_path) -> None:
    path = write(
        tmp_path,
        """
name = "sym"
protocol = "symmetric"
seeds = [3, 4]
[base]
dataset = "synthetic"
[ops]
crop = "crop(scale=0.5-1)"
[axes]
first = ["crop", "blur"]
[axes.strength.weak]
temperature = 0.5
[axes.strength.strong]
temperature = 0.1
normalize = false
""",
    )
    plan = load_plan(path)
    assert plan.total == 2 * 2 * 2
    cell = next(c for c in plan.cells if c.axes == {"first": "crop", "strength": "strong", "seed": 4})
    assert cell.config.view_specs == ("crop(scale=0.5-1)", "crop(scale=0.5-1)")
    s = cell.config.settings
    assert s.temperature == 0.1 and s.normalize is False and cell.config.seed == 4


def test_exclude_drops_cells_and_duplicates_are_refused(tmp_path) -> None:
    plan = load_plan("head")
    assert plan.total == 15 and plan.excluded == 6
    none = [c for c in plan.cells if c.axes["head"] == "none"]
    assert len(none) == 1 and none[0].axes["out_dim"] == 128 and none[0].config.head == 0
    assert {c.config.head for c in plan.cells if c.axes["head"] == "non-linear"} == {2}
    assert plan.spec.base["probe_layers"] == "all"
    path = write(
        tmp_path,
        """
name = "dup"
[axes.variant.a]
temperature = 0.5
[axes.variant.b]
temperature = 0.5
""",
    )
    with pytest.raises(ConfigError, match="give the same trial"):
        load_plan(path)


CIFAR_CPU_SCALE = {"dataset": "cifar10", "train_subset": "20000", "precision": "bf16"}


@pytest.mark.parametrize(
    ("follow_up", "original", "overrides", "shared"),
    [
        ("color-strength-budget-cifar10", "color-strength", CIFAR_CPU_SCALE, {"epochs": 4}),
        ("batch-size-budget-cifar10", "batch-size", CIFAR_CPU_SCALE, {"epochs": (2, 4, 8)}),
        (
            "aug-pairs-seeds-cifar10",
            "aug-pairs-nobase-cifar10 aug-pairs-color1-cifar10",
            {},
            {"epochs": 4, "seed": 0},
        ),
        ("head-budget-cifar10", "head", CIFAR_CPU_SCALE, {"epochs": 4}),
    ],
)
def test_budget_follow_ups_reuse_the_original_trials(
    follow_up: str, original: str, overrides: dict, shared: dict
) -> None:
    """The follow-ups' short-budget cells are the original CIFAR-10 trials: same config hash."""
    original_hashes = {cell.hash for name in original.split() for cell in load_plan(name, overrides).cells}
    cells = load_plan(follow_up).cells

    def is_shared(cell) -> bool:
        return all(cell.axes[k] in (v if isinstance(v, tuple) else (v,)) for k, v in shared.items())

    reused = [cell for cell in cells if is_shared(cell)]
    assert reused and all(cell.hash in original_hashes for cell in reused)
    assert not any(cell.hash in original_hashes for cell in cells if not is_shared(cell))


def test_overrides_apply_and_conflicts_are_errors() -> None:
    plan = load_plan("temperature", {"epochs": "1", "train_subset": "512", "method": "simclr"})
    assert all(c.config.epochs == 1 and c.config.train_subset == 512 for c in plan.cells)
    assert {c.config.settings.temperature for c in plan.cells} == {0.05, 0.1, 0.5, 1.0}
    with pytest.raises(ConfigError, match="--set temperature: is set by the study"):
        load_plan("temperature", {"temperature": "0.2"})
    with pytest.raises(ConfigError, match="--set aug1: is set by the study"):
        load_plan("aug-pairs", {"aug1": "crop"})
    with pytest.raises(ConfigError, match="epochs must be > 0"):
        load_plan("temperature", {"epochs": "0"})


def test_seeds_option_replaces_the_files_seeds() -> None:
    plan = load_plan("methods", seeds=[4])
    methods = len(plan.spec.axes[0].values)  # one cell per method of the study
    assert {c.axes["seed"] for c in plan.cells} == {4} and plan.total == methods >= 13
    assert {c.config.seed for c in plan.cells} == {4}
    result = runner.invoke(app, ["study", "show", "methods", "--seeds", "0,1"])
    assert result.exit_code == 0 and f"{methods} x 2 seed(s)" in result.output, result.output
    for seeds, message in (("0,x", "give integers separated by commas"), ("1,1", "--seeds: has repeated")):
        result = runner.invoke(app, ["study", "show", "methods", "--seeds", seeds])
        assert result.exit_code == 2 and message in result.output, result.output


def test_method_override_fills_that_methods_defaults() -> None:
    from sslab.methods import method_info

    info = method_info("byol")
    plan = load_plan("batch-size", {"method": "byol"})
    config = plan.cells[0].config
    assert config.method == "byol" and dict(config.settings) == info.defaults()
    for key, value in info.shared_defaults.items():
        assert getattr(config, key) == value
    with pytest.raises(ConfigError, match="give the same trial"):  # byol has no temperature to vary
        load_plan("temperature", {"method": "byol"})


def test_search_samplers_need_n_trials_and_one_seed(tmp_path) -> None:
    path = write(
        tmp_path,
        """
name = "search"
sampler = "tpe"
seeds = [0, 1]
[axes]
lr = { type = "log", low = 1e-3, high = 1.0 }
head = { type = "int", low = 0, high = 3 }
temperature = { type = "categorical", choices = [0.1, 0.5] }
[base]
val_fraction = 0.1
""",
    )
    with pytest.raises(ConfigError) as caught:
        load_plan(path)
    assert "n_trials: sampler tpe needs n_trials" in str(caught.value)
    assert "seeds: sampler tpe takes one seed" in str(caught.value)
    path = write(tmp_path, Path(path).read_text().replace("seeds = [0, 1]", "seeds = [0]\nn_trials = 6"))
    plan = load_plan(path)
    assert (
        plan.total == 6 and not plan.cells and plan.spec.metric == "linear_val_top1"
    )  # validation by default
    cell = plan.cell_for({"lr": 0.01, "head": 3, "temperature": 0.1, "seed": 0})
    assert cell.config.lr == 0.01 and cell.config.head == 3


def test_cli_show_list_and_bad_input(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shown = runner.invoke(app, ["study", "show", "aug-pairs", "--set", "epochs=1"])
    assert shown.exit_code == 0, shown.output
    assert "49 trials (7 x 7 x 1 seed(s))" in shown.output and "epochs=1" in shown.output
    assert "aug2 = identity" in shown.output
    listed = runner.invoke(app, ["study", "list"])
    assert listed.exit_code == 0 and "aug-pairs" in listed.output and "moco-queue" in listed.output
    db = tmp_path / "r.db"
    bad = runner.invoke(app, ["study", "run", "aug-pairs", "--set", "wobble=1", "--db", f"sqlite:///{db}"])
    assert bad.exit_code == 2 and "unknown field 'wobble'" in bad.output and "Traceback" not in bad.output
    bad = runner.invoke(app, ["study", "run", "aug-pairs", "--set", "epochs=-1", "--db", f"sqlite:///{db}"])
    assert bad.exit_code == 2 and "epochs must be > 0" in bad.output
    assert not db.exists()  # nothing was written before the error
    missing = runner.invoke(app, ["study", "run", "nope"])
    assert missing.exit_code == 2 and "unknown study 'nope'" in missing.output


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (
            'sampler = "tpe"\nn_trials = 4\nmetric = "linear_top1"',
            "linear_top1 is test accuracy: optimise linear_val_top1",
        ),
        ('sampler = "random"\nn_trials = 4\nmetric = "knn_top1_g2"', "optimise knn_val_top1_g2"),
        ('[pruner]\nmetric = "knn_top1"', "prune on knn_val_top1"),
        (
            'sampler = "tpe"\nn_trials = 4\nmetric = "linear_val_top1"',
            "linear_val_top1 needs a validation split",
        ),
        ('[pruner]\nmetric = "knn_val_top1"', "knn_val_top1 needs a validation split"),
    ],
)
def test_no_search_or_pruner_selects_on_the_test_set(tmp_path, body: str, fragment: str) -> None:
    path = write(
        tmp_path, f'name = "s"\n{body}\n[base]\ndataset = "synthetic"\n[axes]\ntemperature = [0.1, 0.5]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_plan(str(path))
    assert fragment in str(caught.value)


def test_a_search_on_the_validation_metric_is_accepted(tmp_path) -> None:
    body = 'sampler = "tpe"\nn_trials = 4\nmetric = "linear_val_top1"\n[pruner]\nmetric = "knn_val_top1"\n'
    path = write(
        tmp_path,
        f'name = "s"\n{body}[base]\ndataset = "synthetic"\nval_fraction = 0.1\n[axes]\nlr = [0.1, 0.5]\n',
    )
    plan = load_plan(str(path))
    assert plan.spec.metric == "linear_val_top1" and plan.spec.pruner is not None


def test_the_grid_without_base_crop_is_the_one_recorded_before() -> None:
    """aug-pairs-nobase-cifar10 at the behaviour an earlier release ran names the 49 trials it recorded for
    aug-pairs-cifar10 (their hashes are in results/); today's grid, with the base crop, is other trials."""
    import csv

    recorded = Path(__file__).resolve().parents[1] / "results" / "aug-pairs-nobase-cifar10-trials.csv"
    with recorded.open() as handle:
        hashes = {row["hash"] for row in csv.DictReader(handle)}
    assert len(hashes) == 49
    earlier = {"method_version": "1", "pipeline_version": "1"}
    assert {cell.hash for cell in load_plan("aug-pairs-nobase-cifar10", earlier).cells} == hashes
    assert not {cell.hash for cell in load_plan("aug-pairs-nobase-cifar10").cells} & hashes
    with_base = load_plan("aug-pairs-cifar10").cells
    assert all(cell.config.base_aug == "crop(scale=0.2-1)" for cell in with_base)
    assert not {cell.hash for cell in with_base} & hashes
