"""Every shipped config parses into its script's config, and models load local weights."""
from pathlib import Path

import pytest
import torch

import train_ast
from lib.config import merge, parse
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


STUDY_CONFIGS = ["imagenet100_arch_sweep.yaml", "longtail_digits.yaml"]


@pytest.mark.parametrize("name", STUDY_CONFIGS)
def test_every_compare_variant_of_the_study_configs_resolves(name):
    assert ROOT / "configs" / name in CONFIGS  # also parsed by test_config_parses
    cfg = parse(train_ast.Config(), ["--config", str(ROOT / "configs" / name)])
    assert cfg.compare.enabled and cfg.compare.runs
    for overrides in cfg.compare.runs.values():
        merge(cfg, overrides)  # every variant's merged config validates


def test_arch_sweep_pairs_each_architecture_with_its_controls_and_builds_small():
    cfg = parse(train_ast.Config(), ["--config", str(ROOT / "configs" / "imagenet100_arch_sweep.yaml")])
    variants = {name: merge(cfg, overrides) for name, overrides in cfg.compare.runs.items()}
    archs = ("resnet50", "resnet101", "vit_b16")
    assert sorted(variants) == sorted(f"{a}_{k}" for a in archs for k in ("full", "ast", "random"))
    for arch in archs:
        full, ast, random = (variants[f"{arch}_{k}"] for k in ("full", "ast", "random"))
        assert {full.model.name, ast.model.name, random.model.name} == {arch}
        assert full.optim == ast.optim == random.optim  # one recipe per architecture
        assert (full.ast.mode, ast.ast.mode, random.ast.mode, random.ast.match) == ("full", "epoch", "random",
                                                                                  f"{arch}_ast")
        batch, lr = ast.loop.global_batch, ast.optim.lr  # the scaling rules the YAML comments state
        assert lr == pytest.approx(0.1 * batch / 256 if arch.startswith("resnet") else 5e-4 * batch / 512)
        model = build_model(ast.model, 3, 100, 32).eval()  # small: 32 px (ResNet's small-input stem), on CPU
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
        if arch.startswith("resnet"):  # the small-input stem of resnet18/50: 3x3 stride 1, no max-pool
            assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
