"""DyRCNN: the model and its config, the loss and metrics over timesteps (see lib/dynvision/__init__.py).

Speed: an area's feedforward input comes from earlier areas only, so once V1 has run a window of steps,
V2 can run the same window, and so on: each area runs its feedforward convs for a whole window of steps
as one batched convolution (B*steps rows) instead of one small conv per step. Only its own recurrence is
sequential, and that is batched over runs of `recurrent_delay` steps (the recurrent input of a run lies
before it). Feedback reads a later area, so it bounds the window by its delay. Windows are one forward
delay long by default. The Euler scan is one autograd node that keeps only its output (the rates); on GPUs
it is one Triton kernel per run. Max pooling recomputes its argmax in backward instead of storing int64
indices, per-step views of a block come from one torch.split, and weights are cast once per forward.
Nothing in the forward syncs with the host, so a whole training step can be captured in a CUDA graph
(see bench/dynvision_speed.py). Measured on one H200: docs/bench/dynvision_speed.jsonl.

A little over 500 lines: the configs stay next to the model they build, and DyRCNN is one class.
"""
import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from lib.config import ConfigError
from lib.dynvision.scan import _MaxPoolNoIndices, _pool_size, euler_scan
from lib.dynvision.timeline import _exporting, _Run, _Timeline

AREAS = ["V1", "V2", "V4", "IT"]
# Connections between non-successive areas, target <- source (DynVision's DyRCNN).
SKIP_SOURCES = {2: 0, 3: 1}       # V4 <- V1, IT <- V2
FEEDBACK_SOURCES = {0: 2, 1: 3}   # V1 <- V4, V2 <- IT
RECURRENCE_TYPES = ("full", "depthwise", "pointdepthwise", "none")


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


def reaction_step(model_cfg, loss_cfg):
    """First step whose logits carry a label (derived from the delays unless set)."""
    if loss_cfg.reaction_time_steps >= 0:
        return loss_cfg.reaction_time_steps
    return 4 * model_cfg.forward_delay_steps


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
        if not _exporting():  # torch 2.11's strict export cannot trace a weakref; export runs no memory strategy
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
