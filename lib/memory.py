"""Adaptive micro-batch: the largest micro-batch whose step fits a memory budget, OOM-safe.

The probe doubles the micro-batch until a step runs out of memory or its peak exceeds the budget, then
bisects between the last fit and the first miss. Between probes gradients and the allocator cache are
freed so one failed probe does not poison the next.
"""
import gc
import math

import torch


def _is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def cuda_peak_bytes(device=None):
    """Peak bytes allocated on the CUDA device since the last reset."""
    return torch.cuda.max_memory_allocated(device)


def free_memory(device=None):
    """Collect garbage and release cached CUDA blocks (no-op on CPU)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.empty_cache()


def find_micro_batch(try_step, start, max_batch, budget_bytes=None, measure_peak=None, reset_peak=None,
                     log=None):
    """Largest micro-batch in [1, max_batch] for which `try_step(b)` runs and its peak fits `budget_bytes`.

    try_step(b) runs one forward+backward at micro-batch b (its gradients are discarded by the caller).
    measure_peak() -> bytes and reset_peak() default to the current CUDA device's allocator statistics;
    pass your own to inject a budget (tests) or measure something else.
    """
    if measure_peak is None and torch.cuda.is_available():
        measure_peak, reset_peak = cuda_peak_bytes, torch.cuda.reset_peak_memory_stats
    reset_peak = reset_peak or (lambda: None)

    def fits(b):
        free_memory()
        reset_peak()
        try:
            try_step(b)
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            ok, peak = False, None
        else:
            peak = measure_peak() if measure_peak else None
            ok = budget_bytes is None or peak is None or peak <= budget_bytes
        free_memory()
        if log:
            shown = "oom" if peak is None and not ok else f"{peak / 1e9:.2f} GB" if peak is not None else "n/a"
            log(f"[micro-batch probe] {b}: {'fits' if ok else 'too big'} (peak {shown})")
        return ok

    b = max(1, min(start, max_batch))
    if not fits(b):
        low, high = 0, b           # bisect below the start
    else:
        low = b
        while low < max_batch:
            nxt = min(max_batch, low * 2)
            if not fits(nxt):
                high = nxt
                break
            low = nxt
        else:
            return low
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    if low == 0:
        raise torch.OutOfMemoryError(
            "even micro-batch 1 does not fit the memory budget; lower the resolution, enable activation "
            "checkpointing, use bf16, or raise loop.memory_budget_gb")
    return low


def plan_accumulation(batch, max_micro):
    """Split `batch` into the fewest equal-as-possible micro-batches of at most `max_micro`.

    Returns (micro_batch, accumulation_steps); e.g. 256 with max 48 -> (43, 6), not 5 x 48 + 16.
    """
    steps = math.ceil(batch / max(1, max_micro))
    return math.ceil(batch / steps), steps
