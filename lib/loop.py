"""The manual training step every training script uses: AMP, accumulation, clipping, LR, non-finite policy.

One optimizer step, in order (STYLE.md):
    for each micro-batch: autocast forward -> scale(loss * n_micro / n_batch).backward()
        (DDP all-reduce skipped on all but the last micro-batch)
    unscale_ -> grad norm (clip if asked) -> non-finite check -> step -> scaler.update -> zero_grad(set_to_none)
The learning rate is a pure function of the step, written into the param groups before every step, so a
resumed run needs only the step counter. Nothing here calls .item() on a CUDA tensor except on check steps.
"""
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from lib.config import ConfigError


@dataclass
class OptimConfig:
    name: str = "sgd"               # sgd | adamw
    lr: float = 0.1                 # peak learning rate (for the global batch)
    momentum: float = 0.9           # sgd only
    nesterov: bool = True           # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    weight_decay: float = 5e-4      # not applied to biases and norm weights (1-D params)
    schedule: str = "cosine"        # cosine | linear | constant (after warmup)
    warmup_steps: int = 0           # linear warmup from lr/warmup_steps to lr
    min_lr_ratio: float = 0.0       # final lr = lr * min_lr_ratio
    clip_grad_norm: float = 0.0     # max global grad norm; 0 = no clipping

    def validate(self):
        if self.name not in ("sgd", "adamw"):
            raise ConfigError(f"optim.name must be 'sgd' or 'adamw', got '{self.name}'")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear or constant, got '{self.schedule}'")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")


@dataclass
class LoopConfig:
    precision: str = "auto"         # auto (bf16 where supported, else fp32) | bf16 | fp16 | fp32
    global_batch: int = 128         # samples per optimizer step, summed over all ranks
    micro_batch: int = 0            # samples per forward/backward; 0 = global_batch / world_size; -1 = auto
    memory_budget_gb: float = 0.0   # for micro_batch=-1 on CUDA: largest micro-batch whose peak fits (0 = 90% of free)
    compile: bool = False           # torch.compile the model
    compile_mode: str = "default"   # default | reduce-overhead | max-autotune
    checkpoint_blocks: list[str] = field(default_factory=list)  # module names to run under activation checkpointing
    max_nonfinite_in_row: int = 5   # stop after this many consecutive skipped (non-finite) steps
    log_every: int = 50             # steps between host syncs for logging / non-finite checks
    channels_last: bool = True      # memory format for conv models on CUDA

    def validate(self):
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"loop.precision must be auto, bf16, fp16 or fp32, got '{self.precision}'")
        if self.global_batch < 1:
            raise ConfigError(f"loop.global_batch must be >= 1, got {self.global_batch}")
        if self.micro_batch < -1:
            raise ConfigError(f"loop.micro_batch must be >= 1, 0 (no accumulation) or -1 (auto), "
                              f"got {self.micro_batch}")
        if self.log_every < 1 or self.max_nonfinite_in_row < 1:
            raise ConfigError("loop.log_every and loop.max_nonfinite_in_row must be >= 1")


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


def resolve_precision(precision, device):
    """Map 'auto'/'bf16'/'fp16'/'fp32' to an autocast dtype (None = fp32, no autocast) for `device`."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("loop.precision=fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def lr_at(step, total_steps, cfg):
    """Learning rate at optimizer step `step` (0-based): linear warmup, then cosine/linear/constant decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def build_optimizer(model, cfg, device):
    """SGD (nesterov) or AdamW; no weight decay on 1-D params; fused kernels where the device has them."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # Fused kernels step all params in one launch and can skip a step from a device flag (found_inf),
    # which lets the non-finite policy run without a host sync.
    fused = torch.device(device).type in ("cuda", "cpu")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=fused)


def apply_activation_checkpointing(model, names):
    """Run each named submodule under torch.utils.checkpoint (recompute in backward instead of storing).

    Note: BatchNorm inside a checkpointed block updates its running statistics twice per step (forward and
    recompute); with momentum 0.1 this shifts them slightly, as in every framework that checkpoints BN.
    """
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            valid = [n for n, _ in model.named_modules() if n]
            import difflib
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"loop.checkpoint_blocks: model has no submodule '{name}'{hint}") from None
        inner = module.forward

        def forward(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return _checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)
        module.forward = forward
    return model


def split_sizes(n, micro_batch):
    """Split n samples into ceil(n / micro_batch) micro-batches; the last window may be short."""
    micro_batch = max(1, micro_batch)
    return [min(micro_batch, n - start) for start in range(0, n, micro_batch)]


def per_rank_batch(global_batch, world_size):
    """Samples each rank processes per optimizer step; refuses a global batch that does not divide."""
    if global_batch % world_size:
        raise ConfigError(f"loop.global_batch={global_batch} does not divide over {world_size} ranks; "
                          f"use a multiple of {world_size}")
    return global_batch // world_size


def check_micro_batch(per_rank, micro_batch):
    """Accumulation steps for a fixed micro-batch; refuses a micro-batch that does not divide the rank batch."""
    if per_rank % micro_batch:
        raise ConfigError(f"loop.micro_batch={micro_batch} does not divide the per-rank batch {per_rank}; "
                          f"pick a divisor of {per_rank} or micro_batch=-1 (auto)")
    return per_rank // micro_batch


def _take(targets, sl):
    """Slice a per-sample tensor, or each tensor of a tuple (e.g. labels and sample indices)."""
    if isinstance(targets, (tuple, list)):
        return type(targets)(t[sl] for t in targets)
    return targets[sl]


@dataclass
class StepOut:
    loss: torch.Tensor          # mean (weighted) loss of the step, device scalar, detached
    grad_norm: torch.Tensor     # global grad norm before clipping (device scalar)
    skipped: torch.Tensor       # 1.0 if the step was skipped as non-finite (device scalar)
    samples: int                # samples through forward+backward in this step (this rank)
    lr: float


class TrainStep:
    """One optimizer step over a batch, split into micro-batches (gradient accumulation), AMP, clipping.

    Call it with the rank's batch and a `forward_loss(model, inputs, targets) -> (B,) per-sample loss`;
    `targets` may be a tensor or a tuple of per-sample tensors, sliced alongside the inputs.
    A CUDA out-of-memory error inside the step halves the micro-batch (doubling accumulation) and redoes
    the step from zero gradients: no update is lost or applied twice. `on_oom(step, batch)` replaces the halving
    with another policy (lib/fallback.py's ladder); it changes what it must in place and returns, or raises.
    """

    def __init__(self, model, optimizer, loop_cfg, optim_cfg, total_steps, device, micro_batch=None,
                 log=print, on_oom=None):
        self.model, self.optimizer = model, optimizer
        self.loop_cfg, self.optim_cfg = loop_cfg, optim_cfg
        self.total_steps, self.device = total_steps, torch.device(device)
        self.dtype = resolve_precision(loop_cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.micro_batch = micro_batch  # None = whole batch in one go
        self.log = log
        self.step = 0  # optimizer steps taken (including skipped ones)
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self._device_skip = all(g.get("fused") for g in optimizer.param_groups) and \
            getattr(optimizer, "_step_supports_amp_scaling", False)
        zero = torch.zeros((), device=self.device)
        self.nonfinite_total = zero.clone()      # skipped steps so far (device counter)
        self._bad_in_row = zero.clone()
        self._worst_streak = zero.clone()        # longest non-finite streak since the last check
        self.oom_retries = 0
        self.on_oom = on_oom

    def autocast(self):
        """The autocast context of this loop (a no-op in fp32)."""
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def _no_sync(self, last):
        if not last and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _accumulate(self, inputs, targets, forward_loss, weights):
        n = inputs.shape[0]
        sizes = split_sizes(n, self.micro_batch or n)
        loss_sum = torch.zeros((), device=self.device)
        start = 0
        for i, size in enumerate(sizes):
            sl = slice(start, start + size)
            start += size
            with self._no_sync(last=i == len(sizes) - 1), self.autocast():
                per_sample = forward_loss(self.model, inputs[sl], _take(targets, sl))  # (b,)
                if weights is not None:
                    per_sample = per_sample * weights[sl]
                # Dividing by the whole batch size makes the accumulated gradient the batch mean,
                # also when the last window is short.
                loss = per_sample.float().sum() / n
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        return loss_sum

    def __call__(self, inputs, targets, forward_loss, weights=None):
        """Run one optimizer step on this rank's batch; returns device tensors (no host sync)."""
        lr = lr_at(self.step, self.total_steps, self.optim_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        while True:
            try:
                loss_sum = self._accumulate(inputs, targets, forward_loss, weights)
                break
            except torch.OutOfMemoryError:
                self._recover_from_oom(inputs.shape[0])
        self.scaler.unscale_(self.optimizer)
        clip = self.optim_cfg.clip_grad_norm
        if clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, clip)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        bad = ~torch.isfinite(loss_sum)
        if self.dtype != torch.float16:  # in fp16, inf gradients are the scaler's normal business
            bad = bad | ~torch.isfinite(grad_norm)
        bad = bad.float()
        if self.dtype == torch.float16:
            self.scaler.step(self.optimizer)  # skips on inf/nan gradients by itself
        elif self._device_skip and self.step > 0:
            # fused optimizers skip the update on device when found_inf != 0 (no host sync)
            self.optimizer.found_inf = bad
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bool(bad):  # host check: first step (fused momentum init) or non-fused optimizers
            self.optimizer.step()
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._bad_in_row = (self._bad_in_row + 1) * bad
        self._worst_streak = torch.maximum(self._worst_streak, self._bad_in_row)
        self.nonfinite_total += bad
        self.step += 1
        if self.step % min(self.loop_cfg.log_every, self.loop_cfg.max_nonfinite_in_row) == 0 \
                or self.device.type == "cpu":
            self.check_nonfinite()
        return StepOut(loss_sum, grad_norm.detach(), bad, inputs.shape[0], lr)

    def check_nonfinite(self):
        """Host check of the non-finite streak; raises NonFiniteLossError past the configured limit."""
        worst = int(self._worst_streak.item())
        self._worst_streak.zero_()
        if worst >= self.loop_cfg.max_nonfinite_in_row:
            raise NonFiniteLossError(
                f"{worst} consecutive steps had a non-finite loss or gradient (up to step {self.step}); "
                f"the updates were skipped. Lower optim.lr, enable optim.clip_grad_norm, use loop.precision=bf16 "
                f"instead of fp16, or check the data for NaN/inf.")

    def _recover_from_oom(self, batch):
        self.optimizer.zero_grad(set_to_none=True)
        if self.on_oom is not None:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self.on_oom(self, batch)
        current = self.micro_batch or batch
        if current <= 1:
            raise torch.OutOfMemoryError(
                "out of memory with micro-batch 1: the model does not fit; lower loop.global_batch "
                "resolution, use loop.checkpoint_blocks or precision bf16")
        self.micro_batch = max(1, current // 2)
        self.oom_retries += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.log(f"[oom] step {self.step}: out of memory at micro-batch {current}; retrying the step with "
                 f"micro-batch {self.micro_batch} ({math.ceil(batch / self.micro_batch)} accumulation steps)")

    def state_dict(self):
        """Loop state for checkpoints: scaler, counters, current micro-batch."""
        return {"scaler": self.scaler.state_dict(), "step": self.step, "micro_batch": self.micro_batch,
                "nonfinite_total": float(self.nonfinite_total.item()), "oom_retries": self.oom_retries}

    def load_state_dict(self, state):
        self.scaler.load_state_dict(state["scaler"])
        self.step = state["step"]
        self.micro_batch = state["micro_batch"]
        self.nonfinite_total.fill_(state["nonfinite_total"])
        self.oom_retries = state["oom_retries"]


def prepare_model(model, loop_cfg, device):
    """Move to device, channels_last on CUDA, activation checkpointing, optional torch.compile."""
    device = torch.device(device)
    model = model.to(device)
    if loop_cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if loop_cfg.checkpoint_blocks:
        apply_activation_checkpointing(model, loop_cfg.checkpoint_blocks)
    if loop_cfg.compile:
        model = torch.compile(model, mode=None if loop_cfg.compile_mode == "default" else loop_cfg.compile_mode)
    return model


class MetricsLog:
    """Append metrics as JSON lines to run_dir/metrics.jsonl (rank 0 only; flushed each write)."""

    def __init__(self, path, enabled=True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")

    def write(self, **record):
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self):
        if self.enabled:
            self._file.close()


class Throughput:
    """Samples/s and peak memory between log boundaries; syncs the device only when read."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.samples = 0
        self._t0 = time.perf_counter()

    def add(self, n):
        self.samples += n

    def read(self):
        """Return (samples per second since the last read, peak memory in GB) and restart the window."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 1e9
        else:
            peak = 0.0
        now = time.perf_counter()
        rate = self.samples / max(now - self._t0, 1e-9)
        self.samples, self._t0 = 0, now
        return rate, peak
