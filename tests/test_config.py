import pytest

from sslab.config import FIELD_NAMES, field_help, from_mapping, load_toml, parse_assignments
from sslab.errors import ConfigError


def test_hash_is_stable_and_ignores_runtime_fields() -> None:
    base = from_mapping({})
    assert base.hash() == from_mapping({}).hash()
    assert base.hash() == base.replace(device="cpu", data_dir="/elsewhere").hash()
    assert base.hash() != base.replace(temperature=0.1).hash()
    assert len(base.hash()) == 16


def test_from_mapping_coerces_cli_strings() -> None:
    config = from_mapping({"epochs": "3", "temperature": "0.2", "normalize": "false", "image_size": "none"})
    s = config.settings
    assert (config.epochs, s.temperature, s.normalize, config.image_size) == (3, 0.2, False, None)


def test_from_mapping_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        from_mapping({"epochs": "three", "bogus": 1, "temperature": "x"}, source="trial.toml")
    message = str(error.value)
    assert message.startswith("trial.toml:")
    assert "bogus" in message and "epochs" in message and "temperature" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"epochs": 0}, "epochs must be > 0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"batch_size": 1}, "batch_size"),
        ({"val_fraction": 0.7}, "val_fraction"),
        ({"temperature": -1.0}, "simclr.temperature must be > 0"),
    ],
)
def test_validation_errors_name_the_field(changes: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        from_mapping(changes)


def test_integer_field_rejects_fraction() -> None:
    with pytest.raises(ConfigError, match="epochs: expected int"):
        from_mapping({"epochs": 2.5})


def test_parse_assignments() -> None:
    assert parse_assignments(["epochs=2", "batch-size=64"]) == {"epochs": "2", "batch_size": "64"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["epochs"])
    with pytest.raises(ConfigError, match="unknown field 'nope'"):
        parse_assignments(["nope=1"])
    assert parse_assignments(["dino.teacher-temp=0.07"]) == {"dino.teacher_temp": "0.07"}


def test_load_toml_errors_are_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_toml(bad)


def test_every_field_has_help_text() -> None:
    assert set(field_help()) == set(FIELD_NAMES)
