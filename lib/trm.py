"""The plan's encoder: one 2-layer transformer network applied recursively (Tiny Recursive Model cycles), then
pooled into 12 capsules, each with a sketch, a checksum code and 4 children.

    from lib.trm import TRMConfig, CapsuleTRM
    model = CapsuleTRM(TRMConfig())                  # 224 px, 16x16 patches, width 768, 2 layers, H=2 x L=3
    out = model(images, ("sketches", "checksums", "children"))   # images (B, 3, 224, 224), normalized

The recursion follows TRM (Jolicoeur-Martineau, 2025, "Less is More: Recursive Reasoning with Tiny Networks"):
an answer state y and a latent state z, both (B, N, D), refined by the SAME network `net` (`blocks` post-norm
transformer layers, shared weights):

    x = patch_embed(images) + position           # (B, N, D): N = 196 patches of 16x16 px, D = 768
    y, z = y_init, z_init                        # fixed random start states (D,), broadcast over tokens (buffers)
    for cycle in range(h_cycles):                # every cycle but the last under torch.no_grad()
        for _ in range(l_cycles):
            z = net(z + y + x)                   # refine the latent from (x, y, z)
        y = net(y + z)                           # update the answer from (y, z)

Training backpropagates through the last outer cycle only: the earlier cycles run without autograd, so their
outputs enter the last cycle as constants (y_init and z_init, used only there, get no gradient: they are buffers,
as in TRM). The layers are post-norm (x = norm(x + attn(x)); x = norm(x + mlp(x))), as in TRM: each state
re-enters the network 8 times, and post-norm keeps every state at unit scale, where pre-norm residual streams
would keep growing. Attention is F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU).

Layer applications per image: h_cycles x (l_cycles + 1) x blocks = 2 x 4 x 2 = 16: the plan's 6 latent updates
x 2 layers = 12 (ViT-B/16's depth), plus TRM's 2 answer-state updates x 2 layers = 4.

Outputs (per sample; every one computed from the final answer state y, the `tokens` output):
- sketches  (capsules, D) = (12, 768): capsule pooling. 12 learned capsule queries attend over the N final tokens
  (SDPA, `heads` heads of D / heads dims, the tokens as keys and values, no projections): each sketch is an
  attention-weighted mean of the tokens, one per capsule.
- children  (capsules, children, D) = (12, 4, 768): the same pooling with 4 child queries per capsule, each the
  capsule's query plus a learned child offset, so a capsule's children look at variations of what it looks at.
- checksums (capsules, checksum_dim) = (12, 32): a 32-d code of each capsule, tanh(W sketch + b) with one
  learned W (768 x 32) shared by the capsules: small enough to compare or index capsules cheaply.
- tokens    (N, D): the final answer state itself.

Parameters at width 768 (3 input channels): 14,987,552 = 14,916,864 in the trunk (patch embedding 590,592,
positions 150,528, two layers 2 x 7,087,872: the plan's 14.9M) + 70,688 in the capsule head (queries 9,216,
child offsets 36,864, checksum code 24,608). With in_channels=1 the patch embedding has 393,216 fewer.

FLOPs per image at 224 px (torch.utils.flop_counter.FlopCounterMode, forward, batch 1, attention through SDPA's
math backend so that its matmuls are counted; bench/encode_speed.py measures them again in its run):
46,548,664,320 for this encoder (the three capsule outputs) against 35,127,656,448 for torchvision's vit_b_16:
1.325x, from 16 layer applications on 196 tokens against ViT-B/16's 12 on 197. At equal FLOPs to ViT-B/16 the
recursion would be h_cycles=2, l_cycles=2 (2 x 3 x 2 = 12 layer applications: 34,978,480,128 FLOPs, 0.996x).
Speed at equal FLOPs (samples/s x FLOPs per sample against vit_b_16's, same batch and precision):
bench/encode_speed.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.config import ConfigError

OUTPUTS = ("sketches", "checksums", "children", "tokens")


@dataclass
class TRMConfig:
    image_size: int = 224           # px, square; divisible by patch_size
    patch_size: int = 16            # px
    width: int = 768                # token dimension D
    heads: int = 12                 # attention heads (width / heads = head dimension), also for capsule pooling
    mlp_ratio: float = 4.0          # MLP hidden = mlp_ratio x width
    blocks: int = 2                 # transformer layers of the one recursive network
    h_cycles: int = 2               # outer cycles; all but the last without gradient
    l_cycles: int = 3               # latent updates per outer cycle (then one answer update)
    capsules: int = 12              # capsule queries -> sketches (capsules, D)
    children: int = 4               # child vectors per capsule -> children (capsules, children, D)
    checksum_dim: int = 32          # code per capsule -> checksums (capsules, checksum_dim)

    def validate(self):
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size={self.image_size} must be a positive multiple of "
                              f"model.patch_size={self.patch_size}")
        if self.width < 1 or self.heads < 1 or self.width % self.heads:
            raise ConfigError(f"model.width={self.width} must be a positive multiple of model.heads={self.heads}")
        if self.blocks < 1 or self.h_cycles < 1 or self.l_cycles < 1:
            raise ConfigError(f"model.blocks, model.h_cycles and model.l_cycles must be >= 1, got {self.blocks}, "
                              f"{self.h_cycles} and {self.l_cycles}")
        if self.capsules < 1 or self.children < 1 or self.checksum_dim < 1:
            raise ConfigError(f"model.capsules, model.children and model.checksum_dim must be >= 1, got "
                              f"{self.capsules}, {self.children} and {self.checksum_dim}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"model.mlp_ratio must be > 0, got {self.mlp_ratio}")

    def layer_applications(self):
        """Transformer layer applications per image: (latent updates + answer updates) x layers."""
        return self.h_cycles * (self.l_cycles + 1) * self.blocks


class PostNormBlock(nn.Module):
    """Transformer layer, post-norm as in TRM: x = norm(x + attention(x)), then x = norm(x + MLP(x))."""

    def __init__(self, width, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm2 = nn.LayerNorm(width, eps=1e-6)

    def forward(self, x):                                                  # (B, N, D)
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)                               # each (B, heads, N, D / heads)
        attn = F.scaled_dot_product_attention(q, k, v)                     # (B, heads, N, D / heads)
        x = self.norm1(x + self.proj(attn.transpose(1, 2).reshape(b, n, d)))
        return self.norm2(x + self.mlp(x))


class CapsuleTRM(nn.Module):
    """Patch embedding + learned positions; one `blocks`-layer network run in TRM's H/L cycles; capsule pooling."""

    def __init__(self, cfg: TRMConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.position = nn.Parameter(torch.randn(1, self.num_patches, d) * 0.02)
        self.net = nn.Sequential(*(PostNormBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.blocks)))
        # start states: fixed random vectors, as TRM's (they only feed the no-grad cycles: nothing to learn)
        self.register_buffer("y_init", nn.init.trunc_normal_(torch.empty(d), std=1.0, a=-2.0, b=2.0))
        self.register_buffer("z_init", nn.init.trunc_normal_(torch.empty(d), std=1.0, a=-2.0, b=2.0))
        # unit-scale queries against unit-scale tokens: attention logits of std ~1, so capsules differ at init
        self.capsule_query = nn.Parameter(torch.randn(cfg.capsules, d))
        self.child_offset = nn.Parameter(torch.randn(cfg.capsules, cfg.children, d) * 0.5)
        self.checksum = nn.Linear(d, cfg.checksum_dim)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1 / (in_channels * cfg.patch_size ** 2)))

    def recurse(self, x):
        """TRM's cycles from the embedded patches x (B, N, D) to the final answer state y (B, N, D)."""
        y = self.y_init.expand_as(x)
        z = self.z_init.expand_as(x)
        for cycle in range(self.cfg.h_cycles):
            with torch.set_grad_enabled(torch.is_grad_enabled() and cycle == self.cfg.h_cycles - 1):
                for _ in range(self.cfg.l_cycles):
                    z = self.net(z + y + x)                                # latent from (x, y, z)
                y = self.net(y + z)                                        # answer from (y, z)
        return y

    def pool(self, tokens):
        """Capsule pooling of tokens (B, N, D): sketches (B, K, D), children (B, K, C, D), checksums (B, K, c)."""
        b, n, d = tokens.shape
        k, c, h = self.cfg.capsules, self.cfg.children, self.cfg.heads
        queries = torch.cat([self.capsule_query, (self.capsule_query[:, None] + self.child_offset).flatten(0, 1)])
        q = queries.view(1, k + k * c, h, d // h).transpose(1, 2).expand(b, -1, -1, -1)  # (B, h, K + K*C, D/h)
        kv = tokens.view(b, n, h, d // h).transpose(1, 2)                  # (B, h, N, D / h)
        pooled = F.scaled_dot_product_attention(q.to(kv.dtype), kv, kv)  # (B, h, K + K*C, D / h)
        pooled = pooled.transpose(1, 2).reshape(b, k + k * c, d)          # (B, K + K*C, D)
        sketches = pooled[:, :k]                                          # (B, K, D)
        return sketches, pooled[:, k:].view(b, k, c, d), torch.tanh(self.checksum(sketches))

    def forward(self, images, outputs=("sketches", "checksums", "children")):
        """images (B, C, S, S) -> {name: tensor} for the requested OUTPUTS (shapes: the module docstring)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.position  # (B, N, D)
        tokens = self.recurse(x)
        result = {"tokens": tokens} if "tokens" in outputs else {}
        if any(o in outputs for o in ("sketches", "children", "checksums")):
            sketches, children, checksums = self.pool(tokens)
            result.update({k: v for k, v in (("sketches", sketches), ("children", children),
                                             ("checksums", checksums)) if k in outputs})
        return result

    def output_shapes(self):
        """Per-sample shape of each output: what one row of each stored array holds."""
        c = self.cfg
        return {"sketches": (c.capsules, c.width), "checksums": (c.capsules, c.checksum_dim),
                "children": (c.capsules, c.children, c.width), "tokens": (self.num_patches, c.width)}
