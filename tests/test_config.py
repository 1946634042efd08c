from pathlib import Path

import pytest

from biprop_hpc.cli import main
from biprop_hpc.config import Config, ConfigError, build_config, read_yaml
from biprop_hpc.data import DATASETS
from biprop_hpc.data.build import IMAGE_TREE_DATASETS
from biprop_hpc.models import MODELS

CONFIGS = sorted(p for p in Path(__file__).parent.parent.joinpath("configs").rglob("*.yaml")
                 if not p.name.startswith("_"))


def test_precedence_defaults_base_file_command_line(tmp_path):
    (tmp_path / "base.yaml").write_text("lr: 0.5\nepochs: 7\nmodel: conv4\n")
    (tmp_path / "run.yaml").write_text("base: base.yaml\nepochs: 3\n")
    cfg = build_config(str(tmp_path / "run.yaml"), {"model": "conv6", "lr": None})
    assert (cfg.lr, cfg.epochs, cfg.model) == (0.5, 3, "conv6")
    assert cfg.batch_size == Config().batch_size
    assert cfg.config_name == "run"


def test_unknown_yaml_key_names_it_and_suggests(tmp_path):
    (tmp_path / "bad.yaml").write_text("kep_ratio: 0.3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'kep_ratio'.*did you mean 'keep_ratio'"):
        read_yaml(tmp_path / "bad.yaml")


def test_unknown_flag_is_rejected_with_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--save-evry", "2"])
    assert exit_info.value.code == 2
    assert "--save-evry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--save-evry", "2"])
    assert "did you mean --save-every" in capsys.readouterr().err


def test_abbreviated_flags_are_not_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--epo", "2"])


def test_prune_rate_is_the_kept_fraction_alias():
    assert build_config(None, {"prune_rate": "0.3"}).keep_ratio == 0.3


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_keep_ratio_outside_0_1_is_rejected(value):
    with pytest.raises(ConfigError, match="keep_ratio"):
        build_config(None, {"keep_ratio": value})


@pytest.mark.parametrize("key,value,pattern", [
    ("optimizer", "rmsprop", "optimizer"), ("epochs", "0", "epochs"), ("batch_size", "1.5", "batch_size"),
    ("nesterov", "maybe", "nesterov"), ("weight_init", "xavier", "weight_init"),
    ("lr_schedule", "multistep", "milestones"),
])
def test_bad_values_name_the_key(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_config(None, {key: value})


def test_types_are_coerced_from_strings():
    cfg = build_config(None, {"epochs": "4", "lr": "0.25", "nesterov": "true", "milestones": ["2", "3"],
                              "lr_schedule": "multistep"})
    assert (cfg.epochs, cfg.lr, cfg.nesterov, cfg.milestones) == (4, 0.25, True, [2, 3])


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")


def test_missing_config_file_says_where_configs_live(tmp_path):
    with pytest.raises(ConfigError, match="configs/"):
        read_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_are_valid(path):
    cfg = build_config(str(path), {})
    assert cfg.model in MODELS
    assert cfg.dataset in tuple(DATASETS) + IMAGE_TREE_DATASETS


def test_config_round_trips_through_dict():
    cfg = build_config(None, {"keep_ratio": "0.3", "milestones": ["5"]})
    assert Config.from_dict(cfg.to_dict()) == cfg
