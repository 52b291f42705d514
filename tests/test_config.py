import dataclasses

import pytest

from jobs.common import parse_job_args
from orchestrator.config import ExperimentConfig, load_experiment
from orchestrator.typed_config import ConfigError, apply_overrides, flatten, to_dict


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_loads_yaml_with_nested_sections_and_defaults(tmp_path):
    config = load_experiment(
        write(tmp_path, "name: x\ndata:\n  image_size: [64, 128]\ntrain:\n  lr: 1\n")
    )
    assert config.name == "x"
    assert config.data.image_size == (64, 128)
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.train.epochs == ExperimentConfig().train.epochs
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "y"


def test_overrides_take_precedence(tmp_path):
    config = load_experiment(
        write(tmp_path, "train:\n  epochs: 2\n"),
        [
            "train.epochs=7",
            "data.crop_size=[32, 64]",
            "tracking.run_name=abc",
            "data.image_size=null",
        ],
    )
    assert config.train.epochs == 7
    assert config.data.crop_size == (32, 64)
    assert config.tracking.run_name == "abc"
    assert config.data.image_size is None


@pytest.mark.parametrize(
    "text, overrides, key",
    [
        ("trian:\n  epochs: 2\n", [], "trian"),
        ("train:\n  epoch: 2\n", [], "train.epoch"),
        ("train:\n  epochs: two\n", [], "train.epochs"),
        ("train:\n  optimizer: rmsprop\n", [], "train.optimizer"),
        ("data:\n  image_size: [1, 2, 3]\n", [], "data.image_size"),
        ("data:\n  synthetic:\n    height: 1.5\n", [], "data.synthetic.height"),
        ("", ["data.synthetic.num_trian=3"], "data.synthetic.num_trian"),
        ("", ["train.batch_size=true"], "train.batch_size"),
        ("", ["train.epochs=0"], "train"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, key):
    with pytest.raises(ConfigError) as error:
        load_experiment(write(tmp_path, text), overrides)
    assert str(error.value).startswith(key)


def test_a_value_of_no_union_member_lists_the_members(tmp_path):
    config = load_experiment(write(tmp_path, ""), ["eem.region_threshold=otsu"])
    assert config.eem.region_threshold == "otsu"
    with pytest.raises(ConfigError) as error:
        load_experiment(write(tmp_path, ""), ["eem.region_threshold=median"])
    assert str(error.value) == "eem.region_threshold: 'median' matches none of float | 'otsu'"


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml")


def test_round_trip_and_flatten():
    config = ExperimentConfig()
    assert load_experiment(None, []) == config
    flat = flatten(config)
    assert flat["train.lr"] == config.train.lr
    assert flat["data.synthetic.num_train"] == config.data.synthetic.num_train
    assert to_dict(config)["data"]["image_size"] == list(config.data.image_size)


def test_cli_reports_config_error_and_exits(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_job_args("x", argv=["--set", "train.nope=1"])
    assert exit_info.value.code == 2
    assert "train.nope" in capsys.readouterr().err


def test_shipped_configs_load():
    for name in ("demo", "camvid", "cityscapes"):
        config = load_experiment(f"jobs/configs/{name}.yaml")
        assert config.name == name
