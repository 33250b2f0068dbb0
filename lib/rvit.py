"""Recursive vision transformer: a few transformer blocks applied `loops` times with shared weights.

    x = patch_embed(images) + position        # (B, 1 + N, D): class token + N patches
    for loop in range(loops):                 # the same blocks on every loop
        x = blocks(x + loop_embed[loop])
        loop_embeddings[:, loop] = norm(x[:, 0])

Depth (and compute) is blocks x loops, parameters only `blocks` blocks: RViT-B/16 with 2 blocks x 6 loops costs
what ViT-B/16 costs per image with 14.9M parameters instead of 85.8M (both without a classifier). Attention is F.scaled_dot_product_attention
(flash / memory-efficient kernels on GPU). Built from random init or a local state_dict; nothing is downloaded.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.config import ConfigError

OUTPUTS = ("embedding", "loop_embeddings", "tokens")


@dataclass
class RViTConfig:
    image_size: int = 32            # px, square; divisible by patch_size
    patch_size: int = 8             # px
    width: int = 192                # token dimension D
    heads: int = 3                  # attention heads (width / heads = head dimension)
    mlp_ratio: float = 4.0          # MLP hidden = mlp_ratio x width
    blocks: int = 2                 # distinct transformer blocks (the shared weights)
    loops: int = 3                  # times the blocks run in sequence: depth = blocks x loops
    weights: str = ""               # optional local state_dict to load (torch.load weights_only=True)

    def validate(self):
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} must be a positive multiple of "
                              f"model.patch_size={self.patch_size}")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ConfigError(f"model.width={self.width} must be a positive multiple of model.heads={self.heads}")
        if self.blocks < 1 or self.loops < 1:
            raise ConfigError(f"model.blocks and model.loops must be >= 1, got {self.blocks} and {self.loops}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):                                                  # (B, T, D)
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                               # each (B, heads, T, D / heads)
        attn = F.scaled_dot_product_attention(q, k, v)                     # (B, heads, T, D / heads)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class RecursiveViT(nn.Module):
    """Patch embedding, class token, learned positions; `blocks` blocks run `loops` times; final LayerNorm."""

    def __init__(self, cfg, in_channels=3):
        super().__init__()
        self.cfg = cfg
        num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, cfg.width, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.position = nn.Parameter(torch.randn(1, 1 + num_patches, cfg.width) * 0.02)
        self.loop_embed = nn.Parameter(torch.randn(cfg.loops, 1, 1, cfg.width) * 0.02)  # tells the blocks the loop
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.blocks))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        fan_in = in_channels * cfg.patch_size ** 2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1 / fan_in))

    def forward(self, images, outputs=("embedding",)):
        """images (B, C, S, S) -> {name: tensor} for the requested OUTPUTS:
        embedding (B, D) final class token; loop_embeddings (B, loops, D) class token after each loop;
        tokens (B, N, D) final patch tokens. All after the final LayerNorm."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)            # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)   # (B, 1 + N, D)
        x = x + self.position
        per_loop = []
        for loop in range(self.cfg.loops):
            x = x + self.loop_embed[loop]
            for block in self.blocks:
                x = block(x)
            if "loop_embeddings" in outputs:
                per_loop.append(self.norm(x[:, 0]))                        # (B, D)
        x = self.norm(x)
        result = {}
        if "embedding" in outputs:
            result["embedding"] = x[:, 0]
        if "loop_embeddings" in outputs:
            result["loop_embeddings"] = torch.stack(per_loop, 1)           # (B, loops, D)
        if "tokens" in outputs:
            result["tokens"] = x[:, 1:]                                    # (B, N, D)
        return result

    def output_shapes(self):
        """Per-sample shape of each output: what one row of each stored array holds."""
        n = (self.cfg.image_size // self.cfg.patch_size) ** 2
        return {"embedding": (self.cfg.width,), "loop_embeddings": (self.cfg.loops, self.cfg.width),
                "tokens": (n, self.cfg.width)}
