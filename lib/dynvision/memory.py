"""Memory strategies (MemoryConfig.strategy): full BPTT, temporal checkpointing over chunks of steps (the
ring buffers of past states are the chunk state), saved activations offloaded to pinned host memory,
saved activations compressed to bf16/int8, truncated BPTT over windows (stream); `update_every` makes
later areas update at a lower temporal rate (hierarchical; a different model).

MemoryConfig and check_schedule (the cross-section checks that need the unrolled length) live here too.

What each costs, and when to avoid it (accuracy on real data: bench/dynvision_quality.py, docs/BENCHMARKS.md;
speed and memory: bench/dynvision_speed.py):
  checkpoint  exact (full's gradients up to floating-point order); costs a recomputed forward per chunk.
  offload     exact (the same tensors, copied to host and back); costs host-device copies, slow where the
              link is slow. Needs pinned host memory for the saved activations.
  compress    approximate: backward sees saved activations rounded to bf16 or int8 (per-channel scale).
              Under bf16 autocast, compress_dtype=bf16 changes only the tensors autocast keeps in fp32.
  stream      approximate: no gradient crosses a window end, so a loss reaches only the states of its own
              window. Avoid windows shorter than the path from V1 to the readout (4 forward delays, the
              reaction time): then no loss reaches V1 through the feedforward path, and V1 learns only
              through skip connections (if their path fits in the window) or not at all.
  update_every  not a memory strategy but a different model: later areas integrate over longer steps.
  Measured on real held-out data (bench/dynvision_quality.py, H200, 2026-12-02, DyRCNNx4, delays 5/3, 40 steps,
  digits and silhouettes, 3 seeds; docs/BENCHMARKS.md): offload and compress bf16 give full's accuracy on every
  seed, checkpoint -0.56 / +0.32 pt (rounding noise), compress int8 -0.28 / -0.20, stream with 30-step windows
  -0.46 / -0.62, with 10-step windows (shorter than the 20-step V1-to-readout path) -2.1 / -9.3 pt. Stream
  windows are aligned to the end of the unroll (stream_windows). Check a strategy on your data first:
  train_dynvision.py --compare.
"""
import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib.config import ConfigError
from lib.dynvision.model import reaction_step

STRATEGY_PARTS = ("full", "checkpoint", "offload", "compress", "stream")


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
# Saved-tensor policies: offload to pinned host memory, compress to bf16/int8, measure held bytes.

def _worth_packing(t, run, min_bytes):
    return (run is not None and t.is_floating_point() and t.numel() * t.element_size() >= min_bytes
            and t.data_ptr() not in run.protected)


def _dense(t):
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _kept_raw(t, mode):
    """Whether _compress keeps `t` as it is: no compression, or bf16 of a tensor that is not fp32."""
    return mode is None or (mode == "bf16" and t.dtype != torch.float32)


def _compress(t, mode):
    """(kind, dtype, tensors): bf16 halves fp32; int8 keeps a per-channel (dim 1) absmax scale."""
    if _kept_raw(t, mode):
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


class _PackedCache(dict):
    """A dict that a weakref can point to (plain dicts cannot)."""
    __slots__ = ("__weakref__",)


def _forget(cache_ref, key):
    cache = cache_ref()
    if cache is not None:
        cache.pop(key, None)


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

    packed_by_key = _PackedCache()  # a tensor saved by several nodes (a rate: Euler scan, pool, ...) is packed once
    cache_ref = weakref.ref(packed_by_key)

    def pack(t):
        if not _worth_packing(t, run_holder(), min_bytes):
            # a detached alias: holding a node's own output (with its grad_fn) from inside the node is a
            # reference cycle that is never freed for graph branches backward does not visit
            return None, t.detach()
        if not offload and _kept_raw(t, compress):  # kept as it is (bf16 under bf16 autocast): nothing to share
            return ("raw", t.dtype, (t.detach(),)), None
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t._version)
        hit = packed_by_key.get(key)
        if hit is not None:
            return hit
        kind, dtype, tensors = _compress(t, compress)
        if offload:
            tensors = tuple(to_host(x) for x in tensors)
        packed = ((kind, dtype, tensors), None)
        packed_by_key[key] = packed
        # the key may be reused once t is gone. The finalizer holds the cache weakly: a strong reference would
        # keep the cache, and every step's packed tensors in it, alive for as long as any t lives
        weakref.finalize(t, _forget, cache_ref, key)
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


def stream_windows(total, window, react):
    """Truncated-BPTT windows [t0, t1) over `total` steps, aligned to the end: the last window is full length.

    The labelled steps (from `react` on) sit at the end of the unroll, so aligning there gives them the longest
    in-window paths: with 40 steps, react 20 and windows of 30, [0, 10) [10, 40) lets every labelled step reach
    back to step 10, where start-aligned [0, 30) [30, 40) cut steps 30-39 off from everything below IT (the H200
    run of 2026-12-02 lost 53-91 pt that way). Windows that end before `react` carry state only.
    """
    bounds = list(range(total, 0, -window))[::-1]
    starts = [0] + bounds[:-1]
    return [(t0, t1, t1 > react) for t0, t1 in zip(starts, bounds)]


def stream_backward(model, images, labels, react, memory_cfg, loss_scale=1.0, scaler=None, label_smoothing=0.0):
    """Truncated BPTT: run w steps, backprop their share of the loss at once, detach the state, go on.

    Autograd holds one window's activations whatever the number of steps; gradients do not cross window
    ends, so parameters learn only from paths shorter than the window (approximate). Windows are aligned to
    the end of the unroll (stream_windows); those before the reaction step run without autograd.
    `loss_scale` multiplies the batch-summed loss before backward (e.g. 1 / global batch). Returns the
    per-sample loss (B,), detached.
    """
    inner = _unwrap(model)
    run = inner.start_run(images)
    total, B, w = run.total, run.batch, memory_cfg.stream_window_steps
    n_valid = total - react
    per_sample = torch.zeros(B, device=images.device)
    keys, state = [], []
    for t0, t1, labelled in stream_windows(total, w, react):
        run.refresh_casts()  # each window's backward frees its own cast nodes
        with _policy(inner, memory_cfg), torch.autocast(images.device.type, enabled=False), \
                torch.set_grad_enabled(labelled and torch.is_grad_enabled()):
            logits, *state = inner.run_chunk(run, t0, t1, keys, *state)
        keys = run.next_keys
        if labelled:
            lo = max(t0, react)
            chunk = logits[lo - t0:].float()                   # (n, B, K)
            n = chunk.shape[0]
            ce = F.cross_entropy(chunk.reshape(n * B, -1), labels.repeat(n), reduction="none",
                                 label_smoothing=label_smoothing).view(n, B).sum(0) / n_valid
            loss = ce.sum() * loss_scale
            (scaler.scale(loss) if scaler is not None else loss).backward()
            per_sample += ce.detach()
        state = [s.detach() for s in state]
    return per_sample
