"""A method is one file plus its registration: a toy method with its own setting runs from the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from torch import Tensor
from typer.testing import CliRunner

import sslab.methods.base as base
import sslab.methods.catalog as catalog
from sslab.cli import app
from sslab.config import TrialConfig
from sslab.losses import nt_xent
from sslab.models import Backbone, build_head
from sslab.settings import MethodSettings, Setting
from sslab.store import Store

runner = CliRunner()
TINY = ["--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--train-subset", "256", "-q"]


def register_toy(behaviour: int = 1) -> None:
    """What a method's file holds: its settings, then its code, registered under its name."""

    class ToySettings(MethodSettings):
        name = "toy"
        paper = "a toy contrastive method for the tests"
        shared_defaults = {"out_dim": 32}
        version = behaviour

        scale = Setting(0.5, "softmax temperature of the toy loss", "made up", above=0)

    @base.register(ToySettings)
    class Toy(base.Method):
        def __init__(self, config: TrialConfig, backbone: Backbone, num_classes: int) -> None:
            super().__init__(config, backbone, num_classes)
            self.head = build_head(backbone.feature_dim, 2, None, config.out_dim, True)

        def forward(self, views: list[Tensor], labels: Tensor, step: base.StepContext) -> base.StepOutput:
            z1, z2 = (self.head(self.backbone(v)) for v in views[:2])
            return base.StepOutput(loss=nt_xent(z1, z2, self.settings.scale), embedding=z1)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    catalog.methods()  # the built-ins first, then the toy on top of a copy that the test may change
    monkeypatch.setattr(catalog, "_catalog", dict(catalog._catalog))
    monkeypatch.setattr(base, "IMPLEMENTATIONS", dict(base.IMPLEMENTATIONS))
    register_toy()
    yield


def test_a_registered_method_runs_from_the_cli_with_its_own_setting(toy: None, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    result = runner.invoke(app, ["run", "--method", "toy", "--set", "toy.scale=0.25", *TINY, "--db", db])
    assert result.exit_code == 0, result.output
    (row,) = Store(db).trials()
    assert row.status == "done" and row.method == "toy" and row.config["settings"] == {"scale": 0.25}
    listing = runner.invoke(app, ["methods", "toy"], env={"COLUMNS": "200"})
    assert listing.exit_code == 0 and "toy.scale" in listing.output and "0.5" in listing.output
    bad = runner.invoke(app, ["run", "--method", "toy", "--set", "toy.scale=-1", *TINY, "--db", db])
    assert bad.exit_code == 2 and "toy.scale must be > 0" in bad.output


def test_a_fix_to_a_method_keeps_its_old_trials_listed_as_older(toy: None, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'r.db'}"
    args = ["run", "--method", "toy", *TINY, "--db", db]
    assert runner.invoke(app, args).exit_code == 0
    register_toy(behaviour=2)  # a later release changes what the toy computes
    rerun = runner.invoke(app, args)
    assert rerun.exit_code == 0 and "already done" not in rerun.output  # the new behaviour trains
    frame = Store(db).results_frame().set_index("id")
    assert list(frame["method_version"]) == [1, 2]
    assert list(frame["older_behaviour"]) == [True, False] and len(set(frame["hash"])) == 2
    again = runner.invoke(app, args)
    assert "already done as trial 2" in again.output
