"""Trial identities: canonical, stable across releases, and blind to what the method does not read."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sslab.config as config_module
from sslab.config import SHARED_FIELDS, TrialConfig, from_mapping, shared_defaults
from sslab.errors import ConfigError
from sslab.methods.catalog import BUILTIN, method_info, methods, read_declaration
from sslab.pipeline import PIPELINE_VERSION

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLES = [
    {},
    {"method": "moco", "queue_size": 256},
    {"method": "dino", "dino.teacher_temp": 0.05, "epochs": 2},
    {"method": "barlow", "aug": "crop,color(s=0.5)"},
    {"method": "supervised", "aug1": "crop", "aug2": "identity"},
]


def test_a_new_field_at_its_default_changes_no_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    extended = dataclasses.make_dataclass(
        "Extended", [("new_knob", int, dataclasses.field(default=3))], bases=(TrialConfig,), frozen=True
    )
    configs = [(config, config.hash()) for config in map(from_mapping, SAMPLES)]
    base_defaults = config_module.shared_defaults
    monkeypatch.setattr(config_module, "SHARED_FIELDS", (*SHARED_FIELDS, "new_knob"))
    monkeypatch.setattr(
        config_module,
        "shared_defaults",
        lambda info, version=None: {**base_defaults(info, version), "new_knob": 3},
    )
    for config, old_hash in configs:
        same = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrialConfig)}
        assert extended(**same).hash() == old_hash
        assert extended(**same, new_knob=4).hash() != old_hash


def test_a_new_setting_at_its_default_changes_no_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    from sslab.settings import Setting

    before = from_mapping({"method": "barlow", "lambd": 0.01}).hash()
    info = method_info("barlow")
    grown = dataclasses.replace(info, settings={**info.settings, "new_knob": Setting(2, "a later knob")})
    monkeypatch.setitem(methods.__globals__["_catalog"], "barlow", grown)
    after = from_mapping({"method": "barlow", "lambd": 0.01})
    assert after.settings["new_knob"] == 2 and after.hash() == before
    assert from_mapping({"method": "barlow", "lambd": 0.01, "barlow.new_knob": 3}).hash() != before


@pytest.mark.parametrize(
    ("spelled", "meant"),
    [
        ("crop,color", "crop,color(s=1)"),
        ("crop,color", "crop(scale=0.08-1, ratio=0.75-1.333),color(p=0.8,s=1.0,gray=0.2)"),
        ("crop(ratio=0.5-2,scale=0.2-1)", "crop(scale=0.2-1.0, ratio=0.5-2)"),
        ("flip,identity", "flip"),
        ("", "identity"),
    ],
)
def test_augmentation_specs_are_one_trial_however_spelled(spelled: str, meant: str) -> None:
    assert from_mapping({"aug": spelled}).hash() == from_mapping({"aug": meant}).hash()
    assert (
        from_mapping({"aug1": spelled, "aug2": "flip"}).hash()
        == from_mapping({"aug1": meant, "aug2": "flip"}).hash()
    )


def test_views_given_both_ways_are_one_trial() -> None:
    assert (
        from_mapping({"aug": "crop,flip"}).hash()
        == from_mapping({"aug1": "crop,flip", "aug2": "crop,flip"}).hash()
    )
    assert from_mapping({"aug": "crop"}).hash() != from_mapping({"aug1": "crop", "aug2": "flip"}).hash()
    assert from_mapping({}).hash() == from_mapping({"aug": TrialConfig.aug}).hash()


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"queue_size": 0}, {"queue_size": 4096}),  # SimCLR without its momentum encoder reads no queue
        ({"ema": 0.9}, {"simclr.ema": 0.999}),
        ({"method": "supervised", "head": 2}, {"method": "supervised", "head": 3, "out_dim": 64}),
        ({"local_size": 0}, {"local_size": 12, "local_scale": "0.1-0.3"}),  # no local crops
        (
            {"method": "dino", "centering": False},
            {"method": "dino", "centering": False, "center_momentum": 0.5},
        ),
        ({"method": "byol", "predictor": False}, {"method": "byol", "predictor": False, "pred_width": 64}),
    ],
)
def test_a_field_the_method_does_not_read_does_not_split_trials(one: dict, other: dict) -> None:
    assert from_mapping(one).hash() == from_mapping(other).hash()


def test_fields_the_method_reads_do_split_trials() -> None:
    base = from_mapping({})
    for changes in ({"temperature": 0.1}, {"normalize": False}, {"momentum_encoder": True}, {"epochs": 5}):
        assert from_mapping(changes).hash() != base.hash(), changes
    moco = {"method": "moco"}
    assert from_mapping({**moco, "queue_size": 0}).hash() != from_mapping(moco).hash()


def test_numbers_are_normalised() -> None:
    assert from_mapping({"epochs": "4", "lr": "5e-1"}).hash() == from_mapping({}).hash()
    assert from_mapping({"temperature": 1}).hash() == from_mapping({"temperature": "1.0"}).hash()
    assert from_mapping({"local_scale": "0.05-0.40"}).local_scale == "0.05-0.4"


def test_method_defaults_are_left_out_of_the_identity() -> None:
    dino = from_mapping({"method": "dino"})
    assert dino.identity() == {
        "v": 2,
        "method": "dino",
        "method_version": dino.info.version,
        "pipeline_version": 3,
    }
    assert dino.optimizer == "adamw" and dino.settings.teacher_temp == 0.04
    explicit = {"method": "dino", "optimizer": "adamw", "lr": 1e-3, "dino.teacher_temp": 0.04}
    assert from_mapping(explicit).hash() == dino.hash()


def test_defaults_are_pinned() -> None:
    """A default is part of every stored identity that leaves it out: changing one changes what old trials
    mean. Bump IDENTITY_VERSION (shared fields), PIPELINE_VERSION (what the shared pipeline computes) or the
    method's `version` (its settings), then update
    tests/fixtures/identity-defaults.json."""
    assert current_defaults() == json.loads((FIXTURES / "identity-defaults.json").read_text())


def test_trials_recorded_before_a_default_changed_keep_their_hash() -> None:
    """Records (and hashes) written by the release before DINO, SwAV and MoCo v3 moved to version 3, which
    changed defaults: read back, and asked for again at version 2, each is the same trial."""
    for entry in json.loads((FIXTURES / "records-before-fixes.json").read_text()):
        record = entry["record"]
        assert from_mapping(record).hash() == entry["hash"]
        asked = {"method": record["method"], "method_version": 2, "pipeline_version": 1}
        asked |= {k: v for k, v in record.items() if k in ("backbone", "head", "epochs", "local_crops")}
        asked |= {f"{record['method']}.{k}": v for k, v in record["settings"].items() if k == "teacher_temp"}
        assert from_mapping(asked).hash() == entry["hash"], record["method"]
        assert from_mapping({**asked, "method_version": 3}).hash() != entry["hash"]
        assert from_mapping({**asked, "pipeline_version": 2}).hash() != entry["hash"]
        assert from_mapping(record).pipeline_version == 1  # recorded before the field: pipeline 1


def test_a_pipeline_change_keeps_older_trials_apart() -> None:
    """Trials of pipeline 1 keep their hash and are listed as older behaviour; the same request today is
    another trial. Asking for pipeline 1 explicitly finds the old one."""
    old = from_mapping({"pipeline_version": 1})
    assert "pipeline_version" not in old.identity()
    assert from_mapping({}).hash() != old.hash()
    assert from_mapping(old.record()).hash() == old.hash()
    assert from_mapping(from_mapping({}).record()).hash() == from_mapping({}).hash()
    with pytest.raises(ConfigError, match="pipeline_version must be one of 1, 2, 3"):
        from_mapping({"pipeline_version": 7})


def current_defaults() -> dict:
    return json.loads(
        json.dumps(
            {
                "identity_version": config_module.IDENTITY_VERSION,
                "pipeline_version": PIPELINE_VERSION,
                "shared": shared_defaults(method_info("simclr")) | {"method": None},
                "methods": {
                    name: {
                        "version": info.version,
                        "settings": info.defaults(),
                        "shared_defaults": dict(info.shared_defaults),
                        # the defaults that trials of each older version are read with
                        "earlier": {
                            version: {
                                "settings": info.defaults(version),
                                "shared_defaults": info.shared_defaults_at(version),
                            }
                            for version in range(1, info.version)
                        },
                        "ignores": list(info.ignores),
                        "needs": {k: s.needs for k, s in info.settings.items() if s.needs},
                    }
                    for name, info in methods().items()
                    if name in BUILTIN
                },
                "default_hash": from_mapping({}).hash(),
            }
        )
    )


@pytest.mark.parametrize("name", BUILTIN)
def test_settings_read_from_the_file_equal_the_imported_ones(name: str) -> None:
    import importlib

    from sslab.methods.base import implementation

    info = read_declaration(
        Path(importlib.util.find_spec(f"sslab.methods.{name}").origin), f"sslab.methods.{name}"
    )
    assert implementation(name).declaration.info == info


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"method": "barlow", "temperature": 0.2}, "temperature is a setting of simclr, moco"),
        (
            {"method": "simclr", "dino.teacher_temp": 0.07},
            "dino.teacher_temp is a setting of dino, but the trial",
        ),
        ({"simclr.nope": 1}, "simclr has no setting 'nope'; its settings: temperature"),
        ({"temprature": 0.1}, "did you mean temperature?"),
        ({"method": "simclr", "simclr.temperature": 0}, "simclr.temperature must be > 0"),
        (
            {"method": "instdisc", "bank_init": "zeros"},
            "instdisc.bank_init must be one of random, first-visit",
        ),
        ({"method": "barlow", "local_crops": 2}, "does not use local crops"),
        ({"method": "simcrl"}, "did you mean simclr?"),
    ],
)
def test_bad_settings_are_one_line_errors(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping(values)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_settings_are_spelled_three_ways() -> None:
    expected = from_mapping({"method": "dino", "dino.teacher_temp": 0.07})
    assert from_mapping({"method": "dino", "teacher_temp": 0.07}) == expected
    assert from_mapping({"method": "dino", "dino": {"teacher_temp": 0.07}}) == expected
    assert (
        expected.settings.teacher_temp == 0.07
        and expected.replace(teacher_temp=0.05).settings.teacher_temp == 0.05
    )


def test_config_round_trips_through_its_record_and_values() -> None:
    for values in SAMPLES:
        config = from_mapping(values)
        assert from_mapping(config.record()) == config
        assert from_mapping(config.values()) == config


@pytest.mark.parametrize(
    "command",
    [
        ["--help"],
        ["methods"],
        ["methods", "dino"],
        ["run", "--help"],
        ["study", "show", "aug-pairs-mini"],
        ["augment", "list"],
    ],
)
def test_commands_that_train_nothing_start_without_torch(command: list[str]) -> None:
    blocked = "import sys; sys.modules['torch'] = None; from sslab.cli import app; app()"
    result = subprocess.run(
        [sys.executable, "-c", blocked, *command],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_the_backbone_names_validated_are_the_ones_built() -> None:
    from sslab.config import BACKBONES
    from sslab.models import BACKBONES as BUILT

    assert tuple(BUILT) == BACKBONES


def test_a_finished_trial_is_answered_without_torch(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from sslab.cli import app

    tiny = ["run", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "256", "--batch-size", "64"]
    db = ["--db", f"sqlite:///{tmp_path / 'r.db'}"]
    assert CliRunner().invoke(app, [*tiny, "-q", *db]).exit_code == 0
    blocked = "import sys; sys.modules['torch'] = None; from sslab.cli import app; app()"
    result = subprocess.run(
        [sys.executable, "-c", blocked, *tiny, *db], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already done as trial 1" in result.stderr and "linear_top1" in result.stdout


def test_a_finished_trial_in_a_sqlite_store_is_answered_without_sqlalchemy(
    tmp_path: Path, monkeypatch
) -> None:
    """The store's own read (SQLAlchemy) and the standard library's print the same answer; the second is
    what a repeated command takes, so nothing slow to import is on its path."""
    from typer.testing import CliRunner

    from sslab.cli import app

    tiny = ["run", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "256", "--batch-size", "64"]
    db = ["--db", f"sqlite:///{tmp_path / 'r.db'}"]
    assert CliRunner().invoke(app, [*tiny, "-q", *db]).exit_code == 0
    probe = (
        "import sys; from sslab.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print('imported:', *sorted({'sqlalchemy', 'pandas', 'torch'} & set(sys.modules)))"
    )
    fast = subprocess.run(
        [sys.executable, "-c", probe, *tiny, *db], capture_output=True, text=True, timeout=60
    )
    assert fast.returncode == 0, fast.stderr[-2000:]
    assert "already done as trial 1" in fast.stderr and fast.stdout.splitlines()[-1] == "imported:"
    monkeypatch.setattr("sslab.store_lookup.done_trial", lambda url, config_hash: None)
    full = CliRunner().invoke(app, [*tiny, *db])
    assert "already done as trial 1" in full.output
    table = [line for line in fast.stdout.splitlines() if "│" in line]
    assert table and all(line in full.stdout for line in table)  # the same metrics, found the slow way
