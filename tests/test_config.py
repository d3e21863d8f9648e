from pathlib import Path

import pytest

from sftlab.config import Config, apply_override, load_config
from sftlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "examples").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert SHIPPED, "examples/ should ship at least one run YAML"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_yaml_loads_and_its_data_exists(path):
    cfg = load_config(path)
    for spec in cfg.data.train + cfg.data.eval:
        assert Path(spec.path).exists(), spec.path


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.data.overflow == "truncate" and cfg.data.train_on == "assistant"


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "data.max_length=512", "data.cache=false",
                             "data.train=[{path: a.jsonl, format: alpaca}]", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.max_length == 512 and cfg.data.cache is False
    assert cfg.data.train[0].path == str(Path("a.jsonl").resolve()) and cfg.data.train[0].format == "alpaca"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_dataset_shorthand_string_and_relative_paths(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  train: data/x.jsonl\n  eval: [{path: /abs/e.jsonl}]\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.train[0].path == str(tmp_path / "data/x.jsonl")
    assert cfg.data.eval[0].path == "/abs/e.jsonl"


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.max_lenght'; did you mean 'max_length'"):
        load_config(None, ["data.max_lenght=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"data.overflow: 'cut' is not allowed.*truncate, drop, error"):
        load_config(None, ["data.overflow=cut"])


def test_bad_type_names_key():
    with pytest.raises(ConfigError, match=r"train.batch_size: expected int, got 'abc'"):
        load_config(None, ["train.batch_size=abc"])


def test_range_validation():
    with pytest.raises(ConfigError, match="train.batch_size must be at least 1"):
        load_config(None, ["train.batch_size=0"])


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        apply_override({}, "train.lr")


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_dataset_entry_needs_a_path():
    with pytest.raises(ConfigError, match="missing required key 'path'"):
        load_config(None, ["data.train=[{format: alpaca}]"])


def test_resolved_config_round_trips_from_another_directory(tmp_path):
    cfg = load_config(None, ["data.train=[x.jsonl]", "train.epochs=2"])
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and again.data.train[0].path == str(Path("x.jsonl").resolve())
