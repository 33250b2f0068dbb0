"""Models for the training scripts: a small fast CNN for 32 px data, torchvision ResNet-18/50/101 / ViT-B/16, and the
temporal regressor of lib/temporal.py (frame sequences + scalars -> targets).

All are built from random init, or from a local weights file (state_dict saved with torch.save; loaded with
weights_only=True). Nothing is downloaded.
"""
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from lib.config import ConfigError
from lib.temporal import TemporalConfig, TemporalRegressor

MODELS = ("small_cnn", "resnet18", "resnet50", "resnet101", "vit_b16", "temporal")


@dataclass
class ModelConfig:
    name: str = "small_cnn"         # small_cnn | resnet18 | resnet50 | resnet101 | vit_b16 | temporal (regression)
    width: int = 64                 # small_cnn: channels of the first block (doubles per block)
    weights: str = ""               # optional local state_dict file to start from
    small_input: str = "auto"       # resnet: 3x3 stride-1 stem without max-pool for <= 64 px inputs (auto|yes|no)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)  # model.name=temporal (lib/temporal.py)

    def validate(self):
        if self.name not in MODELS:
            import difflib
            close = difflib.get_close_matches(self.name, MODELS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"model.name '{self.name}' is not one of {', '.join(MODELS)}{hint}")
        if self.small_input not in ("auto", "yes", "no"):
            raise ConfigError(f"model.small_input must be auto, yes or no, got '{self.small_input}'")


def _conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.GELU())


class SmallCNN(nn.Module):
    """Three conv blocks with pooling (in the spirit of airbench's CIFAR net), then a linear head."""

    def __init__(self, in_channels, num_classes, width=64):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.stem = _conv_bn(in_channels, w1)
        self.block1 = nn.Sequential(_conv_bn(w1, w2), nn.MaxPool2d(2), _conv_bn(w2, w2))
        self.block2 = nn.Sequential(_conv_bn(w2, w3), nn.MaxPool2d(2), _conv_bn(w3, w3))
        self.block3 = nn.Sequential(_conv_bn(w3, w3), nn.AdaptiveMaxPool2d(1))
        self.head = nn.Linear(w3, num_classes)

    def forward(self, x):             # (B, C, H, W)
        x = self.block3(self.block2(self.block1(self.stem(x))))  # (B, 4w, 1, 1)
        return self.head(x.flatten(1))  # (B, num_classes)


def _resnet(name, in_channels, num_classes, small_input):
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if small_input or in_channels != 3:
        stride, kernel = (1, 3) if small_input else (2, 7)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
    if small_input:
        model.maxpool = nn.Identity()
    return model


def build_model(cfg, in_channels, num_classes, image_size, temporal=None):
    """Build `cfg.name` for inputs (in_channels, image_size, image_size) and `num_classes` outputs; temporal data
    (`temporal`: lib/temporal_data.py's description of it) needs model.name=temporal and the reverse."""
    if (cfg.name == "temporal") != bool(temporal):
        raise ConfigError("model.name=temporal reads temporal data (data.name=temporal) and temporal data needs "
                          f"model.name=temporal; got model.name={cfg.name}")
    if cfg.name == "temporal":
        model = TemporalRegressor(cfg.temporal, in_channels, temporal["frames"], temporal["num_scalars"], num_classes,
                                  temporal["target_mean"], temporal["target_std"])
    elif cfg.name == "small_cnn":
        model = SmallCNN(in_channels, num_classes, cfg.width)
    elif cfg.name in ("resnet18", "resnet50", "resnet101"):
        small = image_size <= 64 if cfg.small_input == "auto" else cfg.small_input == "yes"
        model = _resnet(cfg.name, in_channels, num_classes, small)
    else:
        if image_size % 16:
            raise ConfigError(f"vit_b16 needs an image size divisible by 16, got {image_size}; "
                              f"set data.image_size (e.g. 224)")
        model = torchvision.models.vit_b_16(weights=None, image_size=image_size, num_classes=num_classes)
        if in_channels != 3:
            model.conv_proj = nn.Conv2d(in_channels, model.hidden_dim, 16, stride=16)
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model


def load_weights(model, path, strict=False):
    """Load a local state_dict (weights_only=True); a classifier of another shape is left at random init, unless
    `strict`: then every key and shape must match."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our checkpoints
    own = model.state_dict()
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    if strict:
        try:
            return model.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"model.weights {path} does not fit this model's configuration (check the model.* "
                              f"sizes): {str(e)[:400]}") from None
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ConfigError(f"model.weights {path} has keys this model does not: {unexpected[:5]}...")
    return missing, mismatched
