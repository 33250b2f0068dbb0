"""Recurrent vision models with biological delays (DyRCNN, after DynVision by Gutzen & Lindsay, 2025).

Four areas V1 -> V2 -> V4 -> IT, each a feedforward convolution (two in the x8 preset) plus a recurrent
convolution over the area's own delayed past rate, integrated with Euler dynamics

    h(t) = r(t-1) + dt/tau * (drive(t) - r(t-1)),   r(t) = relu(h(t)),
    drive(t) = ff(input(t)) + rec(r(t - recurrent_delay)) [+ skip] [+ feedback]

where the input of area k is area k-1's pooled rate from `forward_delay` steps ago and the readout sees
IT's rate `forward_delay` steps ago. An area is silent until its input first arrives; a connection whose
source has not started yet contributes nothing (as in DynVision, where those states are None).

Speed: an area's feedforward input comes from earlier areas only, so once V1 has run a window of steps,
V2 can run the same window, and so on: each area runs its feedforward convs for a whole window of steps
as one batched convolution (B*steps rows) instead of one small conv per step. Only its own recurrence is
sequential, and that is batched over runs of `recurrent_delay` steps (the recurrent input of a run lies
before it). Feedback reads a later area, so it bounds the window by its delay. Windows are one forward
delay long by default. The Euler scan is one autograd node that keeps only its output (the rates); on GPUs
it is one Triton kernel per run. Max pooling recomputes its argmax in backward instead of storing int64
indices, per-step views of a block come from one torch.split, and weights are cast once per forward.
Nothing in the forward syncs with the host, so a whole training step can be captured in a CUDA graph
(see bench/dynvision_speed.py). Measured on one H100: docs/bench/dynvision_speed.jsonl.

Memory strategies (MemoryConfig.strategy): full BPTT, temporal checkpointing over chunks of steps (the
ring buffers of past states are the chunk state), saved activations offloaded to pinned host memory,
saved activations compressed to bf16/int8, truncated BPTT over windows (stream); `update_every` makes
later areas update at a lower temporal rate (hierarchical; a different model).
"""
import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from lib.config import ConfigError

AREAS = ["V1", "V2", "V4", "IT"]
# Connections between non-successive areas, target <- source (DynVision's DyRCNN).
SKIP_SOURCES = {2: 0, 3: 1}       # V4 <- V1, IT <- V2
FEEDBACK_SOURCES = {0: 2, 1: 3}   # V1 <- V4, V2 <- IT
RECURRENCE_TYPES = ("full", "depthwise", "pointdepthwise", "none")
STRATEGY_PARTS = ("full", "checkpoint", "offload", "compress", "stream")


@dataclass
class AreaSpec:
    out_channels: int
    mid_channels: int       # 0 = one convolution; >0 = conv(k, stride) -> relu -> conv(k, 1) (x8)
    kernel: int
    stride: int             # stride of the first convolution
    pool: bool              # 3x3 stride-2 max pool on the way to the next area


PRESETS = {
    # DynVision DyRCNNx4: 36/64/121/256 channels, one 3x3 conv per area.
    "x4": [AreaSpec(36, 0, 3, 1, True), AreaSpec(64, 0, 3, 1, True),
           AreaSpec(121, 0, 3, 1, False), AreaSpec(256, 0, 3, 2, False)],
    # DynVision DyRCNNx8: two convs per area (first strided), 64/144/256/529 channels, 5x5 in V1.
    "x8": [AreaSpec(64, 64, 5, 2, True), AreaSpec(144, 144, 3, 2, True),
           AreaSpec(256, 256, 3, 2, False), AreaSpec(529, 529, 3, 2, False)],
}


@dataclass
class ModelConfig:
    preset: str = "x8"                  # x4 | x8 (DynVision DyRCNNx4 / DyRCNNx8)
    channels: list[int] = field(default_factory=list)  # override the 4 areas' channels (tests, debug); [] = preset
    num_classes: int = 1000
    in_channels: int = 3
    n_timesteps: int = 20               # steps the stimulus is shown (a static image is repeated)
    residual_timesteps: int = -1        # blank steps appended so the input reaches the readout; -1 = 4 * forward delay
    dt_ms: float = 2.0                  # Euler step (ms)
    tau_ms: float = 5.0                 # membrane time constant (ms)
    forward_delay_steps: int = 5        # area k-1 -> area k and IT -> readout (steps of dt)
    recurrent_delay_steps: int = 3      # an area's recurrent input is its own rate this many steps ago (>= 1)
    recurrence_type: str = "full"       # full | depthwise | pointdepthwise | none
    skip: bool = True                   # V1 -> V4 and V2 -> IT (1x1 conv on the subsampled source)
    skip_delay_steps: int = 0           # DynVision's t_skip = 0 ms (the source's rate of the same step); -1 = fwd delay
    feedback: bool = False              # V4 -> V1 and IT -> V2 (1x1 conv, bilinear upsampling)
    feedback_delay_steps: int = 20      # DynVision's t_feedback = 40 ms at dt 2 ms; -1 = forward delay (must be >= 1)
    update_every: list[int] = field(default_factory=lambda: [1, 1, 1, 1])  # hierarchical: area k updates every n steps
    max_window_steps: int = 0           # steps batched per area; 0 = one forward delay, 1 = step by step
    fuse_recurrent_conv: bool = False   # x8: one conv over [ff, past rate] channels instead of two convs + add
    channels_last: bool = True          # NHWC activations (faster convs on GPUs)
    bias: bool = True
    recurrent_weight_init: float = 0.001  # recurrent weights ~ U(-a, a), as in DynVision

    def validate(self):
        if self.preset not in PRESETS:
            raise ConfigError(f"model.preset must be one of {sorted(PRESETS)}, got '{self.preset}'")
        if self.channels and (len(self.channels) != 4 or min(self.channels) < 1):
            raise ConfigError(f"model.channels must list 4 positive channel counts (V1, V2, V4, IT) or be [], "
                              f"got {self.channels}")
        if self.recurrence_type not in RECURRENCE_TYPES:
            raise ConfigError(f"model.recurrence_type must be one of {', '.join(RECURRENCE_TYPES)}, "
                              f"got '{self.recurrence_type}'")
        if self.n_timesteps < 1:
            raise ConfigError(f"model.n_timesteps must be >= 1, got {self.n_timesteps}")
        if self.forward_delay_steps < 0 or self.skip_delay_steps < -1:
            raise ConfigError("model.forward_delay_steps and skip_delay_steps must be >= 0 (-1 = default)")
        if self.recurrent_delay_steps < 1:
            raise ConfigError(f"model.recurrent_delay_steps must be >= 1 (an area cannot read its own state of "
                              f"the same step), got {self.recurrent_delay_steps}")
        if self.feedback and self.feedback_delay() < 1:
            raise ConfigError(f"model.feedback_delay_steps must be >= 1 (feedback from a later area of the same "
                              f"step is not computable), got {self.feedback_delay()}")
        if self.residual_timesteps < -1:
            raise ConfigError("model.residual_timesteps must be >= 0, or -1 to derive it from the delays")
        if len(self.update_every) != 4 or min(self.update_every) < 1:
            raise ConfigError(f"model.update_every must list 4 integers >= 1 (one per area), got {self.update_every}")
        for name, every in zip(AREAS, self.update_every):
            alpha = every * self.dt_ms / self.tau_ms
            if not 0 < alpha < 2:
                raise ConfigError(f"model: area {name} integrates with dt*update_every/tau = {alpha:.2f}; Euler "
                                  f"needs 0 < that < 2 to be stable: lower update_every or dt_ms, or raise tau_ms")
        if self.max_window_steps < 0:
            raise ConfigError("model.max_window_steps must be >= 0 (0 = as large as the delays allow)")

    def skip_delay(self):
        return self.forward_delay_steps if self.skip_delay_steps < 0 else self.skip_delay_steps

    def feedback_delay(self):
        return self.forward_delay_steps if self.feedback_delay_steps < 0 else self.feedback_delay_steps

    def residual(self):
        """Blank steps after the stimulus; by default the 4 forward delays from the image to the readout."""
        return 4 * self.forward_delay_steps if self.residual_timesteps < 0 else self.residual_timesteps

    def total_steps(self, n_timesteps=None):
        """Unrolled steps: stimulus steps + residual steps."""
        return (self.n_timesteps if n_timesteps is None else n_timesteps) + self.residual()


@dataclass
class LossConfig:
    mode: str = "all_after_reaction"    # all_after_reaction (CE on every step from the reaction time) | pooled
    reaction_time_steps: int = -1       # first labelled step; -1 = 4 * forward delay (the image reaches the readout)
    label_smoothing: float = 0.0

    def validate(self):
        if self.mode not in ("all_after_reaction", "pooled"):
            raise ConfigError(f"loss.mode must be 'all_after_reaction' or 'pooled', got '{self.mode}'")
        if self.reaction_time_steps < -1:
            raise ConfigError("loss.reaction_time_steps must be >= 0, or -1 to derive it from the delays")


@dataclass
class MemoryConfig:
    strategy: str = "full"              # full | checkpoint | offload | compress | stream; '+' combines
                                        # (offload+compress, stream+compress, stream+offload)
    chunk_steps: int = 10               # checkpoint: steps per recomputed chunk
    compress_dtype: str = "int8"        # compress: bf16 | int8 (per-channel scales)
    stream_window_steps: int = 20       # stream: truncated-BPTT window (gradients do not cross window ends)
    min_saved_bytes: int = 65536        # offload/compress leave smaller saved tensors alone

    def validate(self):
        parts = self.parts()
        for p in parts:
            if p not in STRATEGY_PARTS:
                import difflib
                close = difflib.get_close_matches(p, STRATEGY_PARTS, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"memory.strategy: unknown strategy '{p}'{hint}; choose from "
                                  f"{', '.join(STRATEGY_PARTS)}, or combine with '+', e.g. 'offload+compress'")
        if len(set(parts)) != len(parts):
            raise ConfigError(f"memory.strategy '{self.strategy}' names a strategy twice")
        if "full" in parts and len(parts) > 1:
            raise ConfigError("memory.strategy 'full' (plain BPTT) does not combine with others; drop 'full'")
        if "checkpoint" in parts and ("offload" in parts or "compress" in parts or "stream" in parts):
            raise ConfigError("memory.strategy: 'checkpoint' keeps only chunk-boundary states, so offload/compress "
                              "would touch nothing and stream has its own windows; use checkpoint alone")
        if self.compress_dtype not in ("bf16", "int8"):
            raise ConfigError(f"memory.compress_dtype must be 'bf16' or 'int8', got '{self.compress_dtype}'")
        if self.chunk_steps < 1 or self.stream_window_steps < 1:
            raise ConfigError("memory.chunk_steps and memory.stream_window_steps must be >= 1")

    def parts(self):
        return [p.strip() for p in self.strategy.split("+") if p.strip()] or ["full"]


def reaction_step(model_cfg, loss_cfg):
    """First step whose logits carry a label (derived from the delays unless set)."""
    if loss_cfg.reaction_time_steps >= 0:
        return loss_cfg.reaction_time_steps
    return 4 * model_cfg.forward_delay_steps


def check_schedule(model_cfg, loss_cfg, memory_cfg, n_timesteps=None):
    """Cross-section checks that need the unrolled length: clear errors before any training starts."""
    total = model_cfg.total_steps(n_timesteps)
    react = reaction_step(model_cfg, loss_cfg)
    if react >= total:
        raise ConfigError(
            f"no step is left after the reaction time: reaction at step {react} but only {total} steps are "
            f"unrolled (n_timesteps {model_cfg.n_timesteps} + residual {model_cfg.residual()}); raise "
            f"model.n_timesteps or model.residual_timesteps, or lower loss.reaction_time_steps / the delays")
    parts = memory_cfg.parts()
    if "checkpoint" in parts and memory_cfg.chunk_steps > total:
        raise ConfigError(f"memory.chunk_steps={memory_cfg.chunk_steps} is larger than the {total} unrolled steps; "
                          f"use at most {total} (e.g. {max(1, total // 4)})")
    if "stream" in parts:
        if memory_cfg.stream_window_steps > total:
            raise ConfigError(f"memory.stream_window_steps={memory_cfg.stream_window_steps} is larger than the "
                              f"{total} unrolled steps; use at most {total}")
        if loss_cfg.mode == "pooled":
            raise ConfigError("memory.strategy 'stream' backpropagates each window's loss as it ends, which needs a "
                              "per-step loss: set loss.mode=all_after_reaction")
    return total, react


# ----------------------------------------------------------------------------------------------------------
# Custom autograd nodes: one node per Euler scan (keeps only the rates), max pool without stored indices.

try:  # the fused scan kernel is optional: CPUs and machines without Triton use the torch ops below
    import triton
    import triton.language as tl

    @triton.jit
    def _scan_fwd_kernel(x_ptr, rec_ptr, prev_ptr, out_ptr, n_steps, numel, alpha,
                         HAS_REC: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        if HAS_PREV:
            h = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            h = tl.zeros([BLOCK], dtype=tl.float32)
        at = offs  # int64 offsets, advanced by one step per iteration: n steps may pass 2**31 elements
        for _ in range(n_steps):
            d = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
            if HAS_REC:
                d += tl.load(rec_ptr + at, mask=mask, other=0.0).to(tl.float32)
            h = tl.maximum(h + alpha * (d - h), 0.0)
            stored = h.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + at, stored, mask=mask)
            h = stored.to(tl.float32)  # the next step starts from the stored rate, as after a checkpoint
            at += numel

    @triton.jit
    def _scan_bwd_kernel(grad_ptr, out_ptr, grad_drive_ptr, grad_prev_ptr, n_steps, numel, alpha,
                         HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        carry = tl.zeros([BLOCK], dtype=tl.float32)
        at = offs  # int64 offsets of the last step, then walked backwards
        for _ in range(n_steps - 1):
            at += numel
        for _ in range(n_steps):
            g = tl.load(grad_ptr + at, mask=mask, other=0.0).to(tl.float32) + (1.0 - alpha) * carry
            o = tl.load(out_ptr + at, mask=mask, other=0.0)
            g = tl.where(o > 0, g, 0.0)
            tl.store(grad_drive_ptr + at, (alpha * g).to(grad_drive_ptr.dtype.element_ty), mask=mask)
            carry = g
            at -= numel
        if HAS_PREV:
            tl.store(grad_prev_ptr + offs, ((1.0 - alpha) * carry).to(grad_prev_ptr.dtype.element_ty), mask=mask)

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import problem means: use the torch path
    HAVE_TRITON = False

_SCAN_BLOCK = 1024
use_fused_scan = True  # module switch (tests compare both paths)
_TRITON_ON_CPU = False  # tests run the kernels under TRITON_INTERPRET=1


def _same_layout(ref, *others):
    return all(o is None or (o.shape == ref.shape and o.stride() == ref.stride() and o.dtype == ref.dtype)
               for o in others)


def _fusable(drive, rec, prev):
    dense = drive.is_contiguous() or drive.is_contiguous(memory_format=torch.channels_last)
    return (use_fused_scan and HAVE_TRITON and (drive.is_cuda or _TRITON_ON_CPU) and dense and _same_layout(drive, rec)
            and (prev is None or (prev.dtype == drive.dtype and prev.stride() == drive[:prev.shape[0]].stride())))


class _EulerScan(torch.autograd.Function):
    """r_i = relu(lerp(r_{i-1}, drive_i, alpha)), drive = x (+ rec), over n steps stacked as rows of B.

    One autograd node that saves only its output (the rates): the relu mask and nothing else is needed.
    On GPUs with Triton the whole scan is one kernel (one read of x, rec and one write per step).
    """

    @staticmethod
    def forward(ctx, x, rec, prev, alpha, batch):
        n = x.shape[0] // batch
        fused = _fusable(x, rec, prev)
        out = torch.empty_like(x)
        if fused:
            numel = x[:batch].numel()
            grid = (triton.cdiv(numel, _SCAN_BLOCK),)
            _scan_fwd_kernel[grid](x, rec if rec is not None else x, prev if prev is not None else x, out, n,
                                   numel, float(alpha), HAS_REC=rec is not None, HAS_PREV=prev is not None,
                                   BLOCK=_SCAN_BLOCK)
        else:
            drive = x if rec is None else x + rec
            h = prev
            for i in range(n):
                d, o = drive[i * batch:(i + 1) * batch], out[i * batch:(i + 1) * batch]
                if h is None:
                    torch.mul(d, alpha, out=o)  # no past state yet: h = 0 + alpha * (drive - 0)
                else:
                    torch.lerp(h, d, alpha, out=o)
                o.relu_()
                h = o
        ctx.save_for_backward(out)
        ctx.alpha, ctx.batch, ctx.has_prev, ctx.has_rec = alpha, batch, prev is not None, rec is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        alpha, batch = ctx.alpha, ctx.batch
        n = out.shape[0] // batch
        grad_drive = torch.empty_like(out)
        grad_prev = None
        if _fusable(out, None, None) and HAVE_TRITON:
            if grad_out.stride() != out.stride():
                grad_out = torch.empty_like(out).copy_(grad_out)  # the kernel indexes both the same way
            numel = out[:batch].numel()
            if ctx.has_prev:
                grad_prev = torch.empty_like(out[:batch])
            grid = (triton.cdiv(numel, _SCAN_BLOCK),)
            _scan_bwd_kernel[grid](grad_out, out, grad_drive, grad_prev if grad_prev is not None else out, n,
                                   numel, float(alpha), HAS_PREV=ctx.has_prev, BLOCK=_SCAN_BLOCK)
        else:
            g = grad_out[(n - 1) * batch:]
            carry = None
            for i in reversed(range(n)):
                rows = slice(i * batch, (i + 1) * batch)
                if carry is not None:
                    g = torch.add(grad_out[rows], carry, alpha=1.0 - alpha)
                g = torch.ops.aten.threshold_backward(g, out[rows], 0)  # relu mask from the saved rate
                torch.mul(g, alpha, out=grad_drive[rows])
                carry = g
            if ctx.has_prev:
                grad_prev = carry * (1.0 - alpha)
        return grad_drive, (grad_drive if ctx.has_rec else None), grad_prev, None, None


def euler_scan(x, rec, prev, alpha, batch):
    """Euler-integrate and rectify n stacked steps (rows of `batch`): drive = x + rec, from rate `prev` (None = 0)."""
    return _EulerScan.apply(x, rec, prev, alpha, batch)


class _MaxPoolNoIndices(torch.autograd.Function):
    """3x3/2 max pool that recomputes its argmax in backward: the input (a rate) is saved anyway."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.max_pool2d(x, 3, 2, 1)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [3, 3], [2, 2], [1, 1], [1, 1], False, idx)


def _pool_size(n):
    return (n + 2 - 3) // 2 + 1


# ----------------------------------------------------------------------------------------------------------
# Per-step signals stored as row blocks: a run of consecutive steps of one block is a free view.

class _Timeline:
    """Per-step tensors (B, C, H, W) of one signal; entries point into (n*B, C, H, W) blocks, no copies.

    Per-step views of a block come from one torch.split, so backward materialises one gradient per
    block rather than one full-size zero-filled gradient per slice (SliceBackward), which dominated.
    """

    def __init__(self, batch):
        self.batch = batch
        self.entries = {}  # step -> (block, row)
        self._views = {}   # id(block) -> (block, per-step views)

    def put_block(self, steps, block):
        for i, t in enumerate(steps):
            self.entries[t] = (block, i)

    def hold(self, t):
        self.entries[t] = self.entries[t - 1]

    def has(self, t):
        return t in self.entries

    def step(self, t):
        block, i = self.entries[t]
        if block.shape[0] == self.batch:
            return block
        cached = self._views.get(id(block))
        if cached is None or cached[0] is not block:
            cached = (block, torch.split(block, self.batch))
            self._views[id(block)] = cached
        return cached[1][i]

    def rows(self, steps):
        """(len(steps)*B, ...) for the given steps: whole blocks as they are, other steps copied once."""
        parts, i = [], 0
        while i < len(steps):
            block, row = self.entries[steps[i]]
            n = block.shape[0] // self.batch
            if row == 0 and i + n <= len(steps) and all(
                    self.entries[steps[i + j]][0] is block and self.entries[steps[i + j]][1] == j
                    for j in range(n)):
                parts.append(block)
                i += n
            else:
                parts.append(self.step(steps[i]))
                i += 1
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def prune(self, keep_from):
        for t in [t for t in self.entries if t < keep_from]:
            del self.entries[t]
        live = {id(b) for b, _ in self.entries.values()}
        for key in [k for k in self._views if k not in live]:
            del self._views[key]


class _Run:
    """What one forward shares across chunks: weights cast once, input frames, sizes, static schedule."""

    def __init__(self, model, images, dtype):
        cfg = model.cfg
        self.model, self.dtype = model, dtype
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if images.dim() == 4:        # (B, C, H, W): a static image shown for n_timesteps steps
            self.video = None
            self.n_stimulus = cfg.n_timesteps
            image = images.to(dtype).contiguous(memory_format=self.memory_format)
            self.image, self.blank = image, torch.zeros_like(image)
        elif images.dim() == 5:      # (B, T_in, C, H, W): one frame per step, then blank
            self.video = images.to(dtype)
            self.n_stimulus = images.shape[1]
            self.blank = torch.zeros_like(self.video[:, 0]).contiguous(memory_format=self.memory_format)
        else:
            raise ValueError(f"images must be (B, C, H, W) or (B, T, C, H, W), got shape {tuple(images.shape)}")
        if images.shape[-3] != cfg.in_channels:
            raise ValueError(f"images have {images.shape[-3]} channels but model.in_channels={cfg.in_channels}")
        self.batch = images.shape[0]
        self.total = self.n_stimulus + cfg.residual()
        self.sizes, self.pooled_sizes = model.spatial_sizes(images.shape[-2], images.shape[-1])
        self.refresh_casts()
        self.next_keys = None

    def refresh_casts(self):
        """Cast every weight to the compute dtype once (autograd sees one cast per weight, not per window)."""
        self.weights = {}
        for module in self.model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                # keep the parameter's layout (prepare_model makes conv weights channels_last on GPUs):
                # a different layout would hand DDP gradients whose strides do not match its buckets
                w = module.weight.to(dtype=self.dtype)
                b = None if module.bias is None else module.bias.to(self.dtype)
                self.weights[module] = (w, b)
        self.fused = {}
        self.protected = {t.data_ptr() for pair in self.weights.values() for t in pair if t is not None}
        self.protected |= {p.data_ptr() for p in self.model.parameters()}

    def fused_weights(self, area):
        """conv2 and the recurrent conv as one conv over [ff, past rate] channels (same math, one kernel)."""
        if area not in self.fused:
            w2, b2 = self.weights[area.conv2]
            wr, br = self.weights[area.recurrence[0]]
            w = torch.cat([w2, wr], dim=1).contiguous(memory_format=self.memory_format)
            bias = None if b2 is None else b2 + br
            self.fused[area] = (w, bias)
            self.protected |= {t.data_ptr() for t in (w, bias) if t is not None}
        return self.fused[area]

    def frames(self, steps):
        """Input rows for the given steps: the stimulus while it is shown, blank after."""
        parts = []
        for t in steps:
            if t >= self.n_stimulus:
                parts.append(self.blank)
            elif self.video is None:
                parts.append(self.image)
            else:
                parts.append(self.video[:, t].contiguous(memory_format=self.memory_format))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Area(nn.Module):
    """One visual area: feedforward conv(s) and a recurrent connection over its own delayed rate."""

    def __init__(self, in_channels, spec, recurrence_type, bias):
        super().__init__()
        k = spec.kernel
        first_out = spec.mid_channels or spec.out_channels
        self.conv1 = nn.Conv2d(in_channels, first_out, k, stride=spec.stride, padding=k // 2, bias=bias)
        self.conv2 = (nn.Conv2d(spec.mid_channels, spec.out_channels, k, padding=k // 2, bias=bias)
                      if spec.mid_channels else None)
        c = spec.out_channels
        if recurrence_type == "full":
            self.recurrence = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2))
        elif recurrence_type == "depthwise":        # depthwise k x k, then pointwise (DynVision 'depthpointwise')
            self.recurrence = nn.Sequential(nn.Conv2d(c, c, k, padding=k // 2, groups=c), nn.Conv2d(c, c, 1))
        elif recurrence_type == "pointdepthwise":
            self.recurrence = nn.Sequential(nn.Conv2d(c, c, 1), nn.Conv2d(c, c, k, padding=k // 2, groups=c))
        else:
            self.recurrence = None
        self.spec = spec


class DyRCNN(nn.Module):
    """DyRCNNx4 / DyRCNNx8 unrolled over time; forward(images) -> per-step logits (B, T, classes)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        specs = [AreaSpec(**vars(s)) for s in PRESETS[cfg.preset]]
        for s, c in zip(specs, cfg.channels or []):
            s.out_channels, s.mid_channels = c, (c if s.mid_channels else 0)
        self.specs = specs
        chans = [cfg.in_channels] + [s.out_channels for s in specs]
        self.areas = nn.ModuleList(Area(chans[k], specs[k], cfg.recurrence_type, cfg.bias) for k in range(4))
        self.skip_convs = nn.ModuleDict()
        if cfg.skip:
            for tgt, src in SKIP_SOURCES.items():
                self.skip_convs[AREAS[tgt]] = nn.Conv2d(specs[src].out_channels, specs[tgt].out_channels, 1)
        self.feedback_convs = nn.ModuleDict()
        if cfg.feedback:
            for tgt, src in FEEDBACK_SOURCES.items():
                self.feedback_convs[AREAS[tgt]] = nn.Conv2d(specs[src].out_channels, specs[tgt].out_channels, 1)
        self.classifier = nn.Linear(specs[-1].out_channels, cfg.num_classes)
        self.d_ff, self.d_rec = cfg.forward_delay_steps, cfg.recurrent_delay_steps
        self.d_skip, self.d_fb = cfg.skip_delay(), cfg.feedback_delay()
        self.start = [k * self.d_ff for k in range(4)]  # an area starts when its input first arrives
        self.alpha = [e * cfg.dt_ms / cfg.tau_ms for e in cfg.update_every]
        # Area k reads earlier areas (any delay, also 0) and its own past: earlier areas are computed first
        # within a window, and its own past is handled by the recurrent runs. Only feedback reads a later
        # area, so only the feedback delay bounds the window. By default windows are one forward delay
        # long: then area k's window reads exactly area k-1's previous window, and a window whose steps no
        # longer reach the readout is left out of backward as a whole (longer windows run backward over
        # such steps too, with zero gradients: measured 702 vs 587 GFLOP/sample for x8 at 224 px).
        self.window = self.d_ff if self.d_ff > 0 else 1 << 30
        if cfg.feedback:
            self.window = min(self.window, self.d_fb)
        if cfg.max_window_steps > 0:
            self.window = cfg.max_window_steps if not cfg.feedback else min(cfg.max_window_steps, self.d_fb)
        self.reset_parameters()

    def reset_parameters(self):
        """DynVision's init: He-normal feedforward convs, small uniform recurrence, zero skip/feedback."""
        for area in self.areas:
            for conv in (area.conv1, area.conv2):
                if conv is not None:
                    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
            if area.recurrence is not None:
                for conv in area.recurrence:
                    a = self.cfg.recurrent_weight_init
                    nn.init.uniform_(conv.weight, -a, a)
                    nn.init.zeros_(conv.bias)
        for conv in list(self.skip_convs.values()) + list(self.feedback_convs.values()):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    # -- geometry and schedule ------------------------------------------------------------------------
    def spatial_sizes(self, height, width):
        """(rate sizes, pooled sizes) of the 4 areas for an input of height x width."""
        sizes, pooled = [], []
        h, w = height, width
        for s in self.specs:
            p, k = s.kernel // 2, s.kernel
            h, w = (h + 2 * p - k) // s.stride + 1, (w + 2 * p - k) // s.stride + 1
            sizes.append((h, w))
            if s.pool:
                h, w = _pool_size(h), _pool_size(w)
            pooled.append((h, w))
        return sizes, pooled

    def lookback(self):
        """How many past steps of each signal a later step can read: the ring-buffer depth per signal."""
        held = [1 if e > 1 else 0 for e in self.cfg.update_every]  # a held step copies the step before
        rate = [max(1, self.d_rec) for _ in range(4)]
        if self.cfg.feedback:
            for src in FEEDBACK_SOURCES.values():
                rate[src] = max(rate[src], self.d_fb)
        rate[3] = max(rate[3], self.d_ff)  # readout sees IT d_ff steps ago
        pooled = [max(self.d_ff, held[k]) for k in range(3)]
        skip = {tgt: max(self.d_skip, held[src]) for tgt, src in SKIP_SOURCES.items()} if self.cfg.skip else \
            {tgt: 0 for tgt in SKIP_SOURCES}
        return rate, pooled, skip

    def _groups(self, k, upd):
        """Split an area's update steps into runs whose recurrent inputs all lie before the run."""
        groups = []
        for t in upd:
            present = self.areas[k].recurrence is not None and t - self.d_rec >= self.start[k]
            no_rec = self.areas[k].recurrence is None
            if groups and (no_rec or t - groups[-1][0][0] < self.d_rec) and present == groups[-1][1]:
                groups[-1][0].append(t)
            else:
                groups.append(([t], present))
        return groups

    # -- the computation ------------------------------------------------------------------------------
    def _conv(self, run, module, x):
        w, b = run.weights[module]
        return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)

    def _recurrent(self, run, area, x):
        for conv in area.recurrence:
            x = self._conv(run, conv, x)
        return x

    def _area_window(self, run, tl, k, a, b):
        """Advance area k over steps [a, b): batched feedforward, recurrence in runs, Euler scan."""
        cfg, B, area = self.cfg, run.batch, self.areas[k]
        start, every = self.start[k], cfg.update_every[k]
        steps = [t for t in range(a, b) if t >= start]
        if not steps:
            return
        upd = [t for t in steps if (t - start) % every == 0]
        rate = tl["rate"][k]
        pool_tl = tl["pool"][k] if k < 3 else None
        skip_tgt = next((tgt for tgt, src in SKIP_SOURCES.items() if src == k), None) if cfg.skip else None

        def hold_until(t_end):  # between updates an area keeps its last rate (hierarchical rates)
            for t in steps:
                if t < t_end and not rate.has(t):
                    rate.hold(t)
                    if pool_tl is not None:
                        pool_tl.hold(t)
                    if skip_tgt is not None:
                        tl["skip"][skip_tgt].hold(t)

        if upd:
            u = run.frames(upd) if k == 0 else tl["pool"][k - 1].rows([t - self.d_ff for t in upd])
            x = self._conv(run, area.conv1, u)                     # (n*B, C, H, W)
            fused = cfg.fuse_recurrent_conv and area.conv2 is not None and cfg.recurrence_type == "full"
            if area.conv2 is not None:
                x = F.relu(x)
                if not fused:
                    x = self._conv(run, area.conv2, x)
            extras = []                                             # (first update index, rows) to add
            if k in SKIP_SOURCES and cfg.skip:
                src = SKIP_SOURCES[k]
                present = [t for t in upd if t - self.d_skip >= self.start[src]]
                if present:
                    feed = tl["skip"][k].rows([t - self.d_skip for t in present])
                    extras.append((len(upd) - len(present), self._conv(run, self.skip_convs[AREAS[k]], feed)))
            if k in FEEDBACK_SOURCES and cfg.feedback:
                src = FEEDBACK_SOURCES[k]
                present = [t for t in upd if t - self.d_fb >= self.start[src]]
                if present:
                    fb = self._conv(run, self.feedback_convs[AREAS[k]],
                                    tl["rate"][src].rows([t - self.d_fb for t in present]))
                    fb = F.interpolate(fb, size=run.sizes[k], mode="bilinear", align_corners=False)
                    extras.append((len(upd) - len(present), fb))
            groups = self._groups(k, upd)
            sizes = [len(g) * B for g, _ in groups]
            extra_pieces = [()] * len(groups)
            for first, extra in extras:  # skip/feedback inputs join the feedforward drive of the window
                if first:  # steps before the source started get nothing
                    extra = torch.cat([extra.new_zeros((first * B, *extra.shape[1:])), extra])
                if fused:  # the drive is only formed per run
                    extra_pieces = [(*e, p) for e, p in zip(extra_pieces, torch.split(extra, sizes))]
                else:
                    x = x + extra
            pieces = torch.split(x, sizes) if len(groups) > 1 else (x,)
            for (group, has_rec), piece, extra_piece in zip(groups, pieces, extra_pieces):
                hold_until(group[0])
                past = rate.rows([t - self.d_rec for t in group]) if has_rec else None
                if fused:
                    if past is not None:
                        w, bias = run.fused_weights(area)
                        drive = F.conv2d(torch.cat([piece, past], dim=1), w, bias, 1, area.conv2.padding)
                    else:
                        drive = self._conv(run, area.conv2, piece)
                    for e in extra_piece:
                        drive = drive + e
                    rec = None
                else:
                    drive = piece
                    rec = self._recurrent(run, area, past) if past is not None else None
                prev = rate.step(group[0] - 1) if rate.has(group[0] - 1) else None
                r = euler_scan(drive, rec, prev, self.alpha[k], B)   # (n*B, C, H, W) rates
                rate.put_block(group, r)
                if pool_tl is not None:
                    pool_tl.put_block(group, _MaxPoolNoIndices.apply(r) if area.spec.pool else r)
                if skip_tgt is not None:
                    # the skip's 1x1 conv is strided in DynVision: subsample first, convolve at the target size
                    tl["skip"][skip_tgt].put_block(group, F.interpolate(r, size=run.sizes[skip_tgt],
                                                                        mode="nearest"))
        hold_until(b)

    def _readout(self, run, tl, t0, t1):
        """Logits (n, B, classes) for steps [t0, t1): classifier on IT's rate forward_delay steps ago."""
        B, K = run.batch, self.cfg.num_classes
        valid = [t for t in range(t0, t1) if t - self.d_ff >= self.start[3]]
        parts = []
        if len(valid) < t1 - t0:
            parts.append(torch.zeros(t1 - t0 - len(valid), B, K, device=run.blank.device, dtype=run.dtype))
        if valid:
            it = tl["rate"][3].rows([t - self.d_ff for t in valid])
            w, bias = run.weights[self.classifier]
            parts.append(F.linear(it.mean(dim=(2, 3)), w, bias).view(len(valid), B, K))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _new_timelines(self, batch):
        return {"rate": [_Timeline(batch) for _ in range(4)], "pool": [_Timeline(batch) for _ in range(3)],
                "skip": {tgt: _Timeline(batch) for tgt in SKIP_SOURCES}}

    def run_chunk(self, run, t0, t1, keys, *state):
        """Steps [t0, t1) from the carried state (keys name the tensors); returns (logits, *next state).

        The next state holds the entries later steps read (the ring buffers), cloned so a chunk's blocks can
        be freed; their keys are left in run.next_keys. Pure in its tensor inputs, so it can be recomputed.
        """
        tl = self._new_timelines(run.batch)
        for (sig, k, t, idx) in keys:
            (tl[sig][k]).entries[t] = (state[idx], 0)
        t = t0
        while t < t1:
            w1 = min(t + self.window, t1)
            for k in range(4):
                self._area_window(run, tl, k, t, w1)
            t = w1
        logits = self._readout(run, tl, t0, t1)
        rate_lb, pool_lb, skip_lb = self.lookback()
        out_keys, out, seen = [], [], {}
        wanted = [("rate", k, rate_lb[k]) for k in range(4)] + [("pool", k, pool_lb[k]) for k in range(3)]
        wanted += [("skip", k, skip_lb[k]) for k in SKIP_SOURCES]
        for sig, k, depth in wanted:
            timeline = tl[sig][k]
            for t in range(t1 - depth, t1):
                if timeline.has(t):
                    block, row = timeline.entries[t]
                    ident = (id(block), row)
                    if ident not in seen:
                        seen[ident] = len(out)
                        out.append(timeline.step(t).clone())
                    out_keys.append((sig, k, t, seen[ident]))
        run.next_keys = out_keys
        return (logits, *out)

    def start_run(self, images):
        """Prepare one forward: compute dtype from autocast, weights cast once, frames and sizes."""
        device_type = images.device.type
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = self.classifier.weight.dtype
        run = _Run(self, images, dtype)
        self._last_run = weakref.ref(run)  # saved-tensor policies look up the cast weights they must not touch
        return run

    def current_run(self):
        """The _Run of the forward in progress (or None)."""
        ref = getattr(self, "_last_run", None)
        return ref() if ref is not None else None

    def forward(self, images, chunk_steps=0, record=False):
        """Per-step logits (B, T, classes), T = stimulus steps + residual steps.

        chunk_steps > 0 (with grad) recomputes each chunk of steps in backward (temporal checkpointing).
        record=True also returns each area's rates {name: (B, T, C, H, W)} (zeros before it starts).
        """
        if record and chunk_steps > 0:
            raise ValueError("record=True keeps every step's rates; it does not combine with chunk_steps")
        device_type = images.device.type
        run = self.start_run(images)
        with torch.autocast(device_type if device_type in ("cuda", "cpu") else "cpu", enabled=False):
            if chunk_steps <= 0 or not torch.is_grad_enabled():
                tl = self._new_timelines(run.batch)
                rate_lb, pool_lb, skip_lb = self.lookback()
                parts, t = [], 0
                while t < run.total:
                    w1 = min(t + self.window, run.total)
                    for k in range(4):
                        self._area_window(run, tl, k, t, w1)
                    parts.append(self._readout(run, tl, t, w1))
                    if record:
                        t = w1
                        continue
                    # drop what no later step reads (autograd still holds what backward needs)
                    for k in range(4):
                        tl["rate"][k].prune(w1 - rate_lb[k])
                    for k in range(3):
                        tl["pool"][k].prune(w1 - pool_lb[k])
                    for k in SKIP_SOURCES:
                        tl["skip"][k].prune(w1 - skip_lb[k])
                    t = w1
                logits = parts[0] if len(parts) == 1 else torch.cat(parts)
            else:
                keys, state, parts = [], [], []
                for t0 in range(0, run.total, chunk_steps):
                    t1 = min(t0 + chunk_steps, run.total)
                    if t1 == run.total:  # backward starts here at once: recomputing it would buy nothing
                        out = self.run_chunk(run, t0, t1, keys, *state)
                    else:
                        out = _checkpoint(self.run_chunk, run, t0, t1, keys, *state, use_reentrant=False,
                                          preserve_rng_state=False)
                    parts.append(out[0])
                    keys, state = run.next_keys, list(out[1:])
                logits = torch.cat(parts)
        logits = logits.transpose(0, 1)  # (B, T, classes)
        if not record:
            return logits
        responses = {}
        for k, name in enumerate(AREAS):
            zero = torch.zeros_like(tl["rate"][k].step(self.start[k]))
            steps = [tl["rate"][k].step(t) if tl["rate"][k].has(t) else zero for t in range(run.total)]
            responses[name] = torch.stack(steps, dim=1)  # (B, T, C, H, W)
        return logits, responses


def build_model(cfg: ModelConfig):
    """A DyRCNN from its config."""
    return DyRCNN(cfg)


# ----------------------------------------------------------------------------------------------------------
# Loss and metrics over timesteps.

def timestep_loss(logits, labels, react, mode="all_after_reaction", label_smoothing=0.0):
    """Per-sample loss (B,): mean CE over steps >= react, or CE of the logits averaged over those steps."""
    valid = logits[:, react:].float()                       # (B, T', K)
    if mode == "pooled":
        return F.cross_entropy(valid.mean(1), labels, reduction="none", label_smoothing=label_smoothing)
    b, t, k = valid.shape
    ce = F.cross_entropy(valid.reshape(b * t, k), labels.repeat_interleave(t), reduction="none",
                         label_smoothing=label_smoothing)
    return ce.view(b, t).mean(1)


def accuracy_per_step(logits, labels):
    """Correct predictions per step, summed over the batch: (T,) device tensor (no sync)."""
    return (logits.argmax(-1) == labels[:, None]).sum(0)


# ----------------------------------------------------------------------------------------------------------
# Saved-tensor policies: offload to pinned host memory, compress to bf16/int8, measure held bytes.

def _worth_packing(t, run, min_bytes):
    return (run is not None and t.is_floating_point() and t.numel() * t.element_size() >= min_bytes
            and t.data_ptr() not in run.protected)


def _dense(t):
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _compress(t, mode):
    """(kind, dtype, tensors): bf16 halves fp32; int8 keeps a per-channel (dim 1) absmax scale."""
    if mode is None or (mode == "bf16" and t.dtype != torch.float32):
        return "raw", t.dtype, (t,)
    t = t.detach()
    if mode == "bf16":
        return "bf16", t.dtype, (t.to(torch.bfloat16),)
    dims = [d for d in range(t.dim()) if d != 1] if t.dim() > 1 else list(range(t.dim()))
    # two reductions instead of abs() + amax: no full-size temporary
    bound = torch.maximum(t.amax(dim=dims, keepdim=True), -t.amin(dim=dims, keepdim=True)).float()
    scale = bound.clamp_min(1e-12) / 127.0
    q = (t * (1.0 / scale).to(t.dtype)).round_().clamp_(-127, 127).to(torch.int8)
    return "int8", t.dtype, (q, scale)


def _decompress(kind, dtype, tensors):
    if kind == "raw":
        return tensors[0]
    if kind == "bf16":
        return tensors[0].to(dtype)
    q, scale = tensors
    return q.to(dtype) * scale.to(dtype)


def saved_tensor_policy(run_holder, offload=False, compress=None, min_bytes=65536):
    """Saved activations go to pinned host memory (offload, exact) and/or bf16/int8 (compress, approximate).

    run_holder() returns the current _Run, whose cast weights stay on the device untouched. Host copies run
    on a side stream so they overlap the forward; backward waits for them on the device, not the host.
    """
    side = torch.cuda.Stream() if offload and torch.cuda.is_available() else None

    def to_host(x):
        if x.device.type != "cuda":
            return ("copy", x.clone())  # CPU runs: a plain copy keeps the path testable
        src = x if _dense(x) else x.contiguous()
        host = torch.empty_strided(src.size(), src.stride(), dtype=src.dtype, device="cpu", pin_memory=True)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            host.copy_(src, non_blocking=True)
        src.record_stream(side)  # keep the device block until the copy is done
        return ("host", host, src.device)

    def to_device(item):
        if item[0] == "copy":
            return item[1]
        torch.cuda.current_stream().wait_stream(side)
        return item[1].to(item[2], non_blocking=True)

    packed_by_key = {}  # a tensor saved by several nodes (a rate: Euler scan, pool, ...) is packed once

    def pack(t):
        if not _worth_packing(t, run_holder(), min_bytes):
            # a detached alias: holding a node's own output (with its grad_fn) from inside the node is a
            # reference cycle that is never freed for graph branches backward does not visit
            return None, t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        hit = packed_by_key.get(key)
        if hit is not None:
            return hit
        kind, dtype, tensors = _compress(t, compress)
        if offload:
            tensors = tuple(to_host(x) for x in tensors)
        packed = ((kind, dtype, tensors), None)
        packed_by_key[key] = packed
        weakref.finalize(t, packed_by_key.pop, key, None)  # the key may be reused once t is gone
        return packed

    def unpack(packed):
        meta, t = packed
        if meta is None:
            return t
        kind, dtype, tensors = meta
        if offload:
            tensors = tuple(to_device(x) for x in tensors)
        return _decompress(kind, dtype, tensors)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


class SavedBytesMeter:
    """Counts bytes autograd holds through saved-tensor hooks: live now and the peak (tests, benchmarks)."""

    def __init__(self):
        self.live, self.peak = 0, 0

    def _release(self, n):
        self.live -= n

    def __enter__(self):
        meter = self

        class Held:
            __slots__ = ("t", "__weakref__")

        def pack(t):
            holder = Held()
            holder.t = t.detach()  # see saved_tensor_policy: no reference cycle through grad_fn
            n = t.numel() * t.element_size()
            meter.live += n
            meter.peak = max(meter.peak, meter.live)
            weakref.finalize(holder, meter._release, n)
            return holder

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------------------------
# Running a strategy: forward (+ the backward for stream).

def _unwrap(model):
    inner = model.module if hasattr(model, "module") else model   # DDP
    return getattr(inner, "_orig_mod", inner)                      # torch.compile


def _policy(inner, memory_cfg):
    parts = memory_cfg.parts()
    if "offload" not in parts and "compress" not in parts:
        return contextlib.nullcontext()
    return saved_tensor_policy(inner.current_run, offload="offload" in parts,
                               compress=memory_cfg.compress_dtype if "compress" in parts else None,
                               min_bytes=memory_cfg.min_saved_bytes)


def strategy_forward(model, images, memory_cfg):
    """Per-step logits (B, T, classes) under the memory strategy (full / checkpoint / offload / compress)."""
    if "checkpoint" in memory_cfg.parts():
        return model(images, chunk_steps=memory_cfg.chunk_steps)
    with _policy(_unwrap(model), memory_cfg):
        return model(images)


def stream_backward(model, images, labels, react, memory_cfg, loss_scale=1.0, scaler=None, label_smoothing=0.0):
    """Truncated BPTT: run w steps, backprop their share of the loss at once, detach the state, go on.

    Autograd holds one window's activations whatever the number of steps; gradients do not cross window
    ends, so parameters learn only from paths shorter than the window (approximate). `loss_scale`
    multiplies the batch-summed loss before backward (e.g. 1 / global batch). Returns the per-sample
    loss (B,), detached.
    """
    inner = _unwrap(model)
    run = inner.start_run(images)
    total, B, w = run.total, run.batch, memory_cfg.stream_window_steps
    n_valid = total - react
    per_sample = torch.zeros(B, device=images.device)
    keys, state = [], []
    for t0 in range(0, total, w):
        t1 = min(t0 + w, total)
        run.refresh_casts()  # each window's backward frees its own cast nodes
        with _policy(inner, memory_cfg), torch.autocast(images.device.type, enabled=False):
            logits, *state = inner.run_chunk(run, t0, t1, keys, *state)
        keys = run.next_keys
        lo = max(t0, react)
        if lo < t1:
            chunk = logits[lo - t0:].float()                   # (n, B, K)
            n = chunk.shape[0]
            ce = F.cross_entropy(chunk.reshape(n * B, -1), labels.repeat(n), reduction="none",
                                 label_smoothing=label_smoothing).view(n, B).sum(0) / n_valid
            loss = ce.sum() * loss_scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
            per_sample += ce.detach()
        state = [s.detach() for s in state]
    return per_sample


def count_params(model):
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def flops_per_sample(model, image_size, batch=1, device="cpu", dtype=None):
    """Forward+backward FLOPs per sample counted by torch.utils.flop_counter.FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(batch, model.cfg.in_channels, image_size, image_size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        ctx = torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()
        with ctx:
            logits = model(x)
        timestep_loss(logits, labels, 0).sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch
