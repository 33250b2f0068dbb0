"""Every shipped config parses into its script's config, and models load local weights."""
from pathlib import Path

import pytest
import torch

import train_ast
from lib.config import parse
from lib.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses(path):
    if path.name.startswith("encode"):
        import encode_stream
        parse(encode_stream.Config(), ["--config", str(path)])
    elif path.name.startswith("cache"):
        import build_cache
        parse(build_cache.Config(), ["--config", str(path)])
    elif path.name.startswith("dynvision"):
        train_dynvision = pytest.importorskip("train_dynvision")
        parse(train_dynvision.Config(), ["--config", str(path)])
    else:
        parse(train_ast.Config(), ["--config", str(path)])


def test_local_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    source = build_model(ModelConfig(name="resnet18"), 3, 10, 32)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_model(ModelConfig(name="resnet18", weights=str(tmp_path / "w.pt")), 3, 10, 32)
    for k, v in source.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # another head size: the classifier stays at random init, the rest loads
    other = build_model(ModelConfig(name="resnet18", weights=str(tmp_path / "w.pt")), 3, 5, 32)
    assert torch.equal(other.conv1.weight, source.conv1.weight) and other.fc.weight.shape == (5, 512)


def test_encoder_weights_round_trip(tmp_path):
    import encode_stream
    from lib.rvit import RViTConfig
    cfg = RViTConfig(image_size=16, patch_size=4, width=32, heads=2)
    source = encode_stream.load_encoder(cfg, 3, seed=1)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pt")  # a checkpoint holding the state_dict
    loaded = encode_stream.load_encoder(RViTConfig(**{**cfg.__dict__, "weights": str(tmp_path / "w.pt")}), 3, seed=2)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(source(x)["embedding"], loaded(x)["embedding"])
