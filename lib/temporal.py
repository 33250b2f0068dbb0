"""Temporal multimodal regression: a short sequence of image frames plus scalar features -> physical quantities.

    model = TemporalRegressor(TemporalConfig(widths="full"), in_channels=3, frames=5, num_scalars=2, num_outputs=1)
    y = model(TemporalBatch(frames, scalars))   # frames (B, T, C, H, W) normalized, scalars (B, S) -> y (B, K)

One CNN encodes every frame (shared weights); a temporal convolution over the frame embeddings fuses them (it sees
the differences between neighbouring frames, which is what a displacement is made of); an MLP encodes the scalars,
which also scale and shift the fused frame features (FiLM, `scalar_fusion: film`: physical targets are often a
product, such as a motion in pixels times a pixel scale in km, which a head that only sees both side by side learns
poorly: on the demo set it stayed at what the scalars alone explain); a fusion head maps both to K outputs in target
units (the head's output is scaled by the training targets' mean and std, buffers set by the data, so losses and
errors are in km).

Memory: the encoder's activations at full resolution dominate a step (B x T images through 64-channel maps at H x
W), not the weights (2.9 M for full widths) or their AdamW state. `checkpoint_frames` runs the encoder of each frame
slot under torch.utils.checkpoint (non-reentrant): the forward keeps only the frame inputs and the embeddings; the
backward recomputes one frame slot at a time, so its activations are live for 1/T of the batch instead of all of it,
for one extra encoder forward. `checkpoint_mode: first_stage` recomputes only the full-resolution stage (per frame
slot, like `frames`): it holds about 57% of the encoder's activations (64 channels at H x W against 128 at H/2 and
256 at H/4) for about a quarter of its convolution work, so it saves about half the activations for a fraction of
the recompute. `checkpoint_mode: selective` instead keeps every convolution's output and recomputes
only GroupNorm and GELU in the backward (torch's selective activation checkpointing, one region per GroupNorm ->
GELU -> next convolution, over all frames at once): about a third of the encoder's activations kept (a conv output
per block, against conv output, norm output and activation per block), no convolution recomputed. GroupNorm, not
BatchNorm: the result does not depend on how the batch is split into micro-batches or frame slots, and a recomputed
forward updates no running statistics, so checkpointing and micro-batching (the memory fallbacks that do not change
the model) compute the same gradients.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lib.config import ConfigError

WIDTH_PRESETS = {"full": (64, 128, 256), "small": (32, 64, 128)}
FUSIONS = ("conv", "mean")
SCALAR_FUSIONS = ("film", "concat")
CHECKPOINT_MODES = ("frames", "selective", "first_stage")


def parse_widths(widths):
    """'full' | 'small' | 'a/b/c' (three channel counts, one per encoder stage) -> (a, b, c)."""
    if widths in WIDTH_PRESETS:
        return WIDTH_PRESETS[widths]
    try:
        parts = tuple(int(w) for w in widths.split("/"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise ConfigError(f"model.temporal.widths must be full (64/128/256), small (32/64/128) or three channel "
                          f"counts like 16/32/64; got '{widths}'")
    return parts


@dataclass
class TemporalConfig:
    widths: str = "full"            # encoder channels per stage: full (64/128/256) | small (32/64/128) | a/b/c
    fusion: str = "conv"            # temporal fusion of the frame embeddings: conv (1-D conv over frames, then a
                                    # linear map of all T of them: sees first vs last) | mean (order-free average)
    scalar_hidden: int = 64         # width of the scalar-feature MLP
    scalar_fusion: str = "film"     # film: the scalars scale and shift the frame features (z * (1 + g(s)) + b(s)),
                                    # then the head sees both | concat: the head sees both, side by side only
    head_hidden: int = 256          # width of the fusion head
    checkpoint_frames: bool = False  # activation checkpointing of the frame encoder (saves activation memory), as:
    checkpoint_mode: str = "frames"  # frames: each frame slot's encoder recomputed in the backward (the least memory,
                                    # one more encoder forward) | selective: conv outputs kept, GroupNorm + GELU
                                    # recomputed (more memory than frames, far less recompute) | first_stage: only
                                    # the full-resolution stage recomputed, one frame slot at a time
    groups: int = 8                 # GroupNorm groups (capped by the channel count)

    def validate(self):
        parse_widths(self.widths)
        if self.checkpoint_mode not in CHECKPOINT_MODES:
            raise ConfigError(f"model.temporal.checkpoint_mode must be one of {', '.join(CHECKPOINT_MODES)}, "
                              f"got '{self.checkpoint_mode}'")
        if self.scalar_fusion not in SCALAR_FUSIONS:
            raise ConfigError(f"model.temporal.scalar_fusion must be one of {', '.join(SCALAR_FUSIONS)}, "
                              f"got '{self.scalar_fusion}'")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"model.temporal.fusion must be one of {', '.join(FUSIONS)}, got '{self.fusion}'")
        if self.scalar_hidden < 1 or self.head_hidden < 1 or self.groups < 1:
            raise ConfigError("model.temporal.scalar_hidden, head_hidden and groups must be >= 1")


class TemporalBatch:
    """Frames (B, T, C, H, W) and scalars (B, S) that slice together: the training loop indexes, splits and moves
    a batch as if it were one tensor (batch[idx], batch.shape[0], len(batch))."""

    def __init__(self, frames, scalars):
        self.frames, self.scalars = frames, scalars

    @property
    def shape(self):
        return self.frames.shape

    @property
    def is_cuda(self):
        return self.frames.is_cuda

    def dim(self):
        return self.frames.dim()

    def __len__(self):
        return self.frames.shape[0]

    def __getitem__(self, index):
        return TemporalBatch(self.frames[index], self.scalars[index])

    def to(self, *args, **kwargs):
        return TemporalBatch(self.frames.to(*args, **kwargs), self.scalars.to(*args, **kwargs))

    def expand_first(self, batch):
        """The first sample repeated `batch` times (memory probes)."""
        return TemporalBatch(self.frames[:1].expand(batch, *self.frames.shape[1:]).contiguous(),
                             self.scalars[:1].expand(batch, *self.scalars.shape[1:]).contiguous())


def _conv_gn(c_in, c_out, groups, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(min(groups, c_out), c_out), nn.GELU())


class FrameEncoder(nn.Module):
    """One frame (N, C, H, W) -> embedding (N, w3). Two coordinate channels are appended to the input so that the
    pooled features can say where a structure is (a plain CNN + global pooling is blind to position)."""

    def __init__(self, in_channels, widths, groups):
        super().__init__()
        w1, w2, w3 = widths
        self.stage1 = nn.Sequential(_conv_gn(in_channels + 2, w1, groups), _conv_gn(w1, w1, groups))  # full res
        self.stage2 = nn.Sequential(_conv_gn(w1, w2, groups, stride=2), _conv_gn(w2, w2, groups))     # 1/2
        self.stage3 = nn.Sequential(_conv_gn(w2, w3, groups, stride=2), _conv_gn(w3, w3, groups))     # 1/4
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.proj = nn.Linear(w3 * 16, w3)
        self.dim = w3

    def forward(self, x, selective=False):                           # (N, C, H, W)
        if selective:
            return self._embed(self._selective_blocks(self._with_coordinates(x)))
        return self.rest(self.first_stage(x))                        # (N, w3)

    def first_stage(self, x):
        """(N, C, H, W) frames -> (N, w1, H, W): coordinates appended, the full-resolution stage."""
        return self.stage1(self._with_coordinates(x))

    def rest(self, h):
        """(N, w1, H, W) first-stage features -> (N, w3) embedding."""
        return self._embed(self.stage3(self.stage2(h)))              # stages at H/2 and H/4

    def _embed(self, x):
        return self.proj(self.pool(x).flatten(1))                    # (N, w3, H/4, W/4) -> (N, w3)

    @staticmethod
    def _with_coordinates(x):
        n, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        return torch.cat([x, ys, xs], dim=1)                         # (N, C + 2, H, W)

    def _selective_blocks(self, x):
        """The three stages with only the conv outputs kept: each region GroupNorm -> GELU -> next conv takes the
        previous conv's output and gives the next one (the same tensor the next region keeps as its input), and the
        convolution inside is cached, not recomputed, so the backward recomputes only the norm and the activation."""
        blocks = [*self.stage1, *self.stage2, *self.stage3]          # each nn.Sequential(conv, norm, act)
        h = blocks[0][0](x)                                          # (N, w1, H, W): the first conv output
        for prev, nxt in zip(blocks, blocks[1:]):
            h = checkpoint(_norm_act_conv, prev, nxt, h, use_reentrant=False, preserve_rng_state=False,
                           context_fn=_keep_conv_outputs)
        return blocks[-1][2](blocks[-1][1](h))                       # the last norm + act, kept as usual


def _norm_act_conv(prev, nxt, h):
    return nxt[0](prev[2](prev[1](h)))                               # conv(act(norm(h)))


def _save_convolutions(ctx, op, *args, **kwargs):
    conv = op in (torch.ops.aten.convolution.default, torch.ops.aten.cudnn_convolution.default)
    return CheckpointPolicy.MUST_SAVE if conv else CheckpointPolicy.PREFER_RECOMPUTE


def _keep_conv_outputs():
    return create_selective_checkpoint_contexts(_save_convolutions)


class TemporalRegressor(nn.Module):
    """Per-frame CNN (shared) -> temporal fusion; scalar MLP; fusion head -> (B, K) in target units."""

    def __init__(self, cfg, in_channels, frames, num_scalars, num_outputs, target_mean=None, target_std=None):
        super().__init__()
        self.cfg = cfg
        self.frames = frames
        self.checkpoint_frames = cfg.checkpoint_frames  # switched on in place by the memory fallback
        self.encoder = FrameEncoder(in_channels, parse_widths(cfg.widths), cfg.groups)
        d = self.encoder.dim
        self.time_embed = nn.Parameter(torch.zeros(1, frames, d))
        self.temporal = nn.Conv1d(d, d, kernel_size=3, padding=1) if cfg.fusion == "conv" else None
        self.fuse = nn.Linear(frames * d, d) if cfg.fusion == "conv" else None
        self.scalars = nn.Sequential(nn.Linear(max(num_scalars, 1), cfg.scalar_hidden), nn.GELU(),
                                     nn.Linear(cfg.scalar_hidden, cfg.scalar_hidden), nn.GELU())
        # FiLM starts as the identity (zero init): training decides how much the scalars modulate the frames
        self.film = nn.Linear(cfg.scalar_hidden, 2 * d) if cfg.scalar_fusion == "film" else None
        if self.film is not None:
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.head = nn.Sequential(nn.Linear(d + cfg.scalar_hidden, cfg.head_hidden), nn.GELU(),
                                  nn.Linear(cfg.head_hidden, cfg.head_hidden), nn.GELU(),
                                  nn.Linear(cfg.head_hidden, num_outputs))
        mean = torch.zeros(num_outputs) if target_mean is None else torch.as_tensor(target_mean, dtype=torch.float32)
        std = torch.ones(num_outputs) if target_std is None else torch.as_tensor(target_std, dtype=torch.float32)
        self.register_buffer("target_mean", mean.reshape(num_outputs))
        self.register_buffer("target_std", std.reshape(num_outputs))

    def encode_frames(self, frames):                                 # (B, T, C, H, W)
        b, t = frames.shape[:2]
        if self.checkpoint_frames and torch.is_grad_enabled() and self.cfg.checkpoint_mode == "selective":
            return self.encoder(frames.flatten(0, 1), selective=True).view(b, t, -1)   # (B, T, D)
        if self.checkpoint_frames and torch.is_grad_enabled() and self.cfg.checkpoint_mode == "first_stage":
            # the full-resolution stage per frame slot under checkpoint (its output is kept: the next stage's
            # input); the later stages over all frames at once, as without checkpointing. Slot-major order.
            h = torch.cat([checkpoint(self.encoder.first_stage, frames[:, i], use_reentrant=False,
                                      preserve_rng_state=False) for i in range(t)])   # (T*B, w1, H, W)
            return self.encoder.rest(h).view(t, b, -1).transpose(0, 1)            # (B, T, D)
        if self.checkpoint_frames and torch.is_grad_enabled():
            # one checkpoint per frame slot: only its input (B, C, H, W) and output (B, D) stay alive; no RNG
            # inside the encoder, so no RNG state to save and restore
            out = [checkpoint(self.encoder, frames[:, i], use_reentrant=False, preserve_rng_state=False)
                   for i in range(t)]
            return torch.stack(out, dim=1)                           # (B, T, D)
        return self.encoder(frames.flatten(0, 1)).view(b, t, -1)     # (B*T, C, H, W) -> (B, T, D)

    def forward(self, batch):
        frames, scalars = batch.frames, batch.scalars               # (B, T, C, H, W), (B, S)
        if frames.shape[1] != self.frames:
            raise ValueError(f"the model was built for {self.frames} frames, got {frames.shape[1]}")
        z = self.encode_frames(frames) + self.time_embed             # (B, T, D)
        if self.temporal is not None:
            z = z + torch.nn.functional.gelu(self.temporal(z.transpose(1, 2))).transpose(1, 2)  # (B, T, D)
            z = torch.nn.functional.gelu(self.fuse(z.flatten(1)))   # (B, T*D) -> (B, D)
        else:
            z = z.mean(dim=1)                                        # (B, D)
        if scalars.shape[1] == 0:
            scalars = scalars.new_zeros(scalars.shape[0], 1)
        s = self.scalars(scalars)                                    # (B, scalar_hidden)
        if self.film is not None:
            gain, shift = self.film(s).chunk(2, dim=1)               # (B, D) each
            z = z * (1 + gain) + shift
        out = self.head(torch.cat([z, s], dim=1))                    # (B, K), normalized units
        return out.float() * self.target_std + self.target_mean      # (B, K) in target units
