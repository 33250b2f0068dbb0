"""The encoders encode_stream.py runs, picked by model.name, and how it runs them (autocast, micro-batches, compile).

    rvit  lib/rvit.py: `blocks` shared blocks x `loops` loops; class-token outputs (embedding, loop_embeddings, tokens)
    trm   lib/trm.py: the plan's encoder, one `blocks`-layer network in TRM's h_cycles x l_cycles recursion, then 12
          capsules (sketches, checksums, children; tokens)

    model = load_encoder(EncoderConfig(name="trm", image_size=224, patch_size=16, width=768, heads=12), 3, seed=0)
    encoder = Encoder(model, ("sketches", "checksums", "children"), device, autocast_dtype("auto", device), 192)
    out = encoder(images)                          # {name: (B, ...)}, under inference_mode and autocast

One flat config for both (the other model's keys are ignored by the model, though a resumed run must still match
them), so that the existing configs and run folders of the RViT keep their keys; model.name defaults to rvit for
the same reason: a folder written before model.name existed resumes as the RViT it holds.
"""
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lib import rvit, trm
from lib.config import ConfigError

MODELS = {"rvit": (rvit.RViTConfig, rvit.RecursiveViT, rvit.OUTPUTS),
          "trm": (trm.TRMConfig, trm.CapsuleTRM, trm.OUTPUTS)}


@dataclass
class EncoderConfig:
    name: str = "rvit"              # rvit (lib/rvit.py) | trm (lib/trm.py: the capsule encoder of the plan)
    image_size: int = 32            # px, square; divisible by patch_size
    patch_size: int = 8             # px
    width: int = 192                # token dimension D
    heads: int = 3                  # attention heads (width / heads = head dimension)
    mlp_ratio: float = 4.0          # MLP hidden = mlp_ratio x width
    blocks: int = 2                 # distinct transformer blocks (the shared weights); trm: its network's layers
    loops: int = 3                  # rvit: times the blocks run in sequence (depth = blocks x loops)
    h_cycles: int = 2               # trm: outer cycles, all but the last without gradient
    l_cycles: int = 3               # trm: latent updates per outer cycle (then one answer update)
    capsules: int = 12              # trm: capsule queries -> sketches (capsules, width)
    children: int = 4               # trm: child vectors per capsule -> children (capsules, children, width)
    checksum_dim: int = 32          # trm: code per capsule -> checksums (capsules, checksum_dim)
    weights: str = ""               # optional local state_dict to load (torch.load weights_only=True)

    def validate(self):
        if self.name not in MODELS:
            raise ConfigError(f"model.name must be one of {', '.join(MODELS)}, got '{self.name}'")
        self.model_config().validate()

    def model_config(self):
        """The chosen model's own config (RViTConfig or TRMConfig) from the keys it has."""
        cls = MODELS[self.name][0]
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls)})

    def outputs(self):
        return MODELS[self.name][2]


def load_encoder(cfg, in_channels, seed=0):
    """The encoder of `cfg` (an EncoderConfig, or an RViTConfig / TRMConfig) from a local state_dict (every key must
    match) or from random init seeded by `seed` alone, so that every rank holds the same encoder."""
    if isinstance(cfg, EncoderConfig):
        model_cls, model_cfg = MODELS[cfg.name][1], cfg.model_config()
    else:
        model_cls, model_cfg = (rvit.RecursiveViT if isinstance(cfg, rvit.RViTConfig) else trm.CapsuleTRM), cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(model_cfg, in_channels)
    weights = getattr(cfg, "weights", "")
    if weights:
        from lib.models import load_weights  # imports torchvision (2 s): only when there are weights to load
        load_weights(model, weights, strict=True)
    return model


def autocast_dtype(precision, device):
    """Compute dtype of `precision` (auto | bf16 | fp16 | fp32) on `device`; None = fp32, no autocast.

    auto: bf16 on GPUs with native bf16 (Ampere and later), fp16 on older ones (a T4), fp32 on CPU."""
    device = torch.device(device)
    if precision == "auto":
        if device.type != "cuda":
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


class Encoder:
    """model forward under inference_mode and autocast, in micro-batches that halve after an out-of-memory error.

    compile=True runs torch.compile(model) on fixed shapes: a short last micro-batch is padded with zeros to the
    micro-batch size (its padding rows are dropped), so the tail of a split costs no recompilation.
    """

    def __init__(self, model, outputs, device, dtype, micro_batch, compile=False):
        self.model, self.outputs, self.device, self.dtype = model, tuple(outputs), torch.device(device), dtype
        self.micro_batch = micro_batch
        self.compiled = compile
        self.forward = torch.compile(model, dynamic=False) if compile else model

    def _part(self, images):
        n = len(images)
        if self.compiled and n < self.micro_batch:
            images = F.pad(images, (0, 0, 0, 0, 0, 0, 0, self.micro_batch - n))  # (micro_batch, C, H, W)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.forward(images, self.outputs)
        return {k: v[:n] for k, v in out.items()}

    @torch.inference_mode()
    def __call__(self, images):
        while True:
            try:
                parts = [self._part(images[start:start + self.micro_batch])
                         for start in range(0, len(images), self.micro_batch)]
                return {k: torch.cat([p[k] for p in parts]) if len(parts) > 1 else parts[0][k]
                        for k in self.outputs}
            except torch.OutOfMemoryError:
                if self.micro_batch == 1:
                    raise
                self.micro_batch //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"[encode] out of memory: micro-batch halved to {self.micro_batch}", flush=True)


def forward_flops(build, input_shape, *args) -> int:
    """FLOPs of one forward of `build()` on a zero input of `input_shape` (FlopCounterMode), on the meta device.

    Attention runs through SDPA's math backend there, so its matmuls are counted: the fused kernels of the CPU and
    nn.MultiheadAttention's fused inference path are invisible to the counter (it would miss ViT-B/16's q/k/v
    projections). Weights do not change FLOPs; nothing is computed."""
    with torch.device("meta"):
        model = build()
        x = torch.zeros(input_shape)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(x, *args)
    return int(counter.get_total_flops())
