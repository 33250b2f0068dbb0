"""Config merge order and error messages."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lib.config import ConfigError, from_dict, parse, to_dict, write_run_info


@dataclass
class Inner:
    lr: float = 0.1
    steps: int = 10
    name: str = "sgd"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    path: Optional[str] = None


@dataclass
class Outer:
    seed: int = 0
    debug: bool = False
    optim: Inner = field(default_factory=Inner)


def test_merge_order_defaults_file_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\noptim:\n  lr: 1\n  steps: 5\n")
    cfg = parse(Outer(), ["--config", str(f), "--optim.steps=7", "--debug"])
    assert cfg.seed == 3                      # from the file
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.optim.steps == 7               # CLI beats the file
    assert cfg.debug is True                  # a bare flag is true
    assert cfg.optim.name == "sgd"            # default kept
    assert from_dict(Outer(), to_dict(cfg)) == cfg


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        parse(Outer(), ["--optim.lrr=0.1"])
    f = tmp_path / "c.yaml"
    f.write_text("sead: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sead' \(did you mean 'seed'\?\)"):
        parse(Outer(), ["--config", str(f)])


def test_wrong_type_names_key_expected_and_given():
    with pytest.raises(ConfigError, match=r"'optim.steps' expects int, got float 0.5"):
        parse(Outer(), ["--optim.steps=0.5"])
    with pytest.raises(ConfigError, match=r"'debug' expects bool, got str 'maybe'"):
        parse(Outer(), ["--debug=maybe"])
    with pytest.raises(ConfigError, match=r"'optim.betas\[1\]' expects float"):
        parse(Outer(), ["--optim.betas=[0.9, x]"])
    assert parse(Outer(), ["--optim.path=null"]).optim.path is None


def test_missing_and_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        parse(Outer(), ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        parse(Outer(), ["--config", str(bad)])


def test_yaml_is_never_executed(tmp_path):
    f = tmp_path / "evil.yaml"
    f.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse(Outer(), ["--config", str(f)])


def test_run_info_written(tmp_path):
    info = write_run_info(tmp_path / "run", Outer(), "cpu", argv=["train.py", "--seed=1"])
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("seed: 0")
    assert info["torch"] and info["device"] == "cpu" and "--seed=1" in info["command"]
    assert (tmp_path / "run" / "run_info.json").is_file()
