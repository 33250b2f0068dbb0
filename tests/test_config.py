"""Config merge order and error messages."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lib.config import ConfigError, from_dict, merge, parse, to_dict, write_run_info


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


@dataclass
class Window:
    start: int = 0
    end: int = 10

    def validate(self):
        if self.end <= self.start:
            raise ConfigError(f"window.end={self.end} must be > window.start={self.start}")


@dataclass
class WithWindow:
    window: Window = field(default_factory=Window)


def test_values_valid_only_together_pass_when_split_over_yaml_and_cli(tmp_path):
    f = tmp_path / "w.yaml"
    f.write_text("window:\n  start: 20\n")           # alone it is invalid: start 20 > end 10
    cfg = parse(WithWindow(), ["--config", str(f), "--window.end=30"])
    assert cfg == parse(WithWindow(), ["--window.start=20", "--window.end=30"]) == WithWindow(Window(20, 30))
    with pytest.raises(ConfigError, match="must be > window.start"):  # the final config is still checked
        parse(WithWindow(), ["--config", str(f)])
    with pytest.raises(ConfigError, match="must be > window.start"):  # and merge alone validates its result
        merge(WithWindow(), {"window": {"start": 20}})


def test_a_real_cross_field_rule_split_over_yaml_and_cli(tmp_path):
    """DynVision: memory.chunk_steps must fit the unrolled steps, which the CLI raises after the YAML."""
    from pathlib import Path

    import train_dynvision
    base = Path(__file__).resolve().parent.parent / "configs/dynvision_debug.yaml"
    f = tmp_path / "long_chunks.yaml"
    f.write_text(base.read_text() + "\n# chunks longer than the debug model's 8 steps\n")
    f.write_text(f.read_text().replace("chunk_steps: 4", "chunk_steps: 12"))
    cfg = parse(train_dynvision.Config(), ["--config", str(f), "--model.n_timesteps=10"])
    assert (cfg.memory.chunk_steps, cfg.model.n_timesteps) == (12, 10)
    with pytest.raises(ConfigError, match="chunk_steps=12 is larger than"):
        parse(train_dynvision.Config(), ["--config", str(f)])
