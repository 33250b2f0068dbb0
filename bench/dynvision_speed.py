"""Training-step speed and peak memory of DyRCNNx8 under each memory strategy, `full` in the same run.

DyRCNNx8, 224 px, 20 stimulus steps + 20 residual steps (forward delay 5, recurrent delay 3), bf16
autocast, AdamW; batches 8, 32 and 128. Every line on stdout is one JSON object: parameter count and
FLOPs per sample first, then one line per (strategy, batch), gradient agreement of each strategy with
`full`, and last {"summary": true, ...}. A configuration that does not fit says so ("fits": false).

    python bench/dynvision_speed.py | tee docs/bench/dynvision_speed.jsonl      # one GPU
    python bench/dynvision_speed.py --smoke                                      # CPU check, seconds
    python bench/dynvision_speed.py --only full,checkpoint --batches 32          # a subset

Variants: `full` (plain BPTT), `checkpoint[5|20]` (chunks of 10 steps unless named), `offload`, `compress`
(int8), `offload+compress`, `stream` (windows of 20 steps), `hierarchical` (V4 and IT update every 2nd
step: a lighter model, not a faster implementation), `stepwise` (one step at a time, as DynVision's loop
runs; the baseline for batching), `*_fused` (conv2 and the recurrent conv as one conv), `*_graph` (the
whole training step replayed from a CUDA graph). `exact` marks gradients equal to full BPTT's.
"""
import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.dynvision import (DyRCNN, LossConfig, MemoryConfig, ModelConfig, count_params,  # noqa: E402
                           flops_per_sample, reaction_step, stream_backward, strategy_forward, timestep_loss)

# name -> (memory strategy overrides, model overrides, capture the step in a CUDA graph, exact gradients)
VARIANTS = {
    "full": ({}, {}, False, True),
    "full_graph": ({}, {}, True, True),
    "full_fused": ({}, {"fuse_recurrent_conv": True}, False, True),
    "full_fused_graph": ({}, {"fuse_recurrent_conv": True}, True, True),
    "stepwise": ({}, {"max_window_steps": 1}, False, True),      # one step at a time, like DynVision's loop
    "checkpoint": ({"strategy": "checkpoint", "chunk_steps": 10}, {}, False, True),
    "checkpoint_graph": ({"strategy": "checkpoint", "chunk_steps": 10}, {}, True, True),
    "checkpoint_fused": ({"strategy": "checkpoint", "chunk_steps": 10}, {"fuse_recurrent_conv": True}, False, True),
    "checkpoint_fused_graph": ({"strategy": "checkpoint", "chunk_steps": 10}, {"fuse_recurrent_conv": True},
                               True, True),
    "checkpoint5_graph": ({"strategy": "checkpoint", "chunk_steps": 5}, {}, True, True),
    "checkpoint20_graph": ({"strategy": "checkpoint", "chunk_steps": 20}, {}, True, True),
    "offload": ({"strategy": "offload"}, {}, False, True),
    "compress": ({"strategy": "compress", "compress_dtype": "int8"}, {}, False, False),
    "offload+compress": ({"strategy": "offload+compress", "compress_dtype": "int8"}, {}, False, False),
    "stream": ({"strategy": "stream", "stream_window_steps": 20}, {}, False, False),
    "hierarchical": ({}, {"update_every": [1, 1, 2, 2]}, False, False),  # a different (lighter) model
}
DEFAULT_PLAN = [  # (variant, batch), most important first: a deadline drops the tail
    ("full", 32), ("checkpoint", 32), ("checkpoint", 128), ("full_graph", 32), ("checkpoint_graph", 32),
    ("full_fused", 32), ("full_fused_graph", 32), ("checkpoint_fused", 32), ("checkpoint_fused_graph", 32),
    ("checkpoint_graph", 128), ("checkpoint_fused_graph", 128), ("full", 128), ("full_graph", 128),
    ("full", 8), ("full_graph", 8), ("checkpoint", 8), ("checkpoint_graph", 8), ("stepwise", 32),
    ("checkpoint5_graph", 32), ("checkpoint20_graph", 32),
    ("offload", 32), ("compress", 32), ("offload+compress", 32), ("stream", 32), ("hierarchical", 32),
    ("offload", 8), ("compress", 8), ("stream", 8), ("hierarchical", 8),
    ("offload", 128), ("compress", 128), ("offload+compress", 128), ("stream", 128), ("hierarchical", 128),
]


def emit(record):
    print(json.dumps(record), flush=True)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def smoke_memory(memory_cfg, smoke):
    """The strategy's config; in --smoke, chunks/windows shrink to the 8 steps and every tensor is packed."""
    if smoke:
        memory_cfg.chunk_steps = min(memory_cfg.chunk_steps, 4)
        memory_cfg.stream_window_steps = min(memory_cfg.stream_window_steps, 4)
        memory_cfg.min_saved_bytes = 0
    memory_cfg.validate()
    return memory_cfg


def make_model(model_kw, smoke, device):
    small = dict(channels=[4, 6, 8, 10], num_classes=10, n_timesteps=4, forward_delay_steps=1,
                 recurrent_delay_steps=1) if smoke else {}
    cfg = ModelConfig(**{**small, **model_kw})
    torch.manual_seed(0)
    model = DyRCNN(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


class Stepper:
    """One training step (forward, loss, backward, AdamW) for a strategy; optionally replayed from a CUDA graph."""

    def __init__(self, model, memory_cfg, images, labels, dtype, graphed):
        self.model, self.memory_cfg, self.dtype = model, memory_cfg, dtype
        self.images, self.labels = images, labels
        self.react = reaction_step(model.cfg, LossConfig())
        fused = images.device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, capturable=graphed)
        self.graph = None
        if graphed:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up (cudnn autotuning, optimizer state) outside the capture
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()  # the graph's pool is allocated during capture: count it
            self.graph = torch.cuda.CUDAGraph()
            self.opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(self.graph):
                self._step(zero=False)

    def _step(self, zero=True):
        if zero:
            self.opt.zero_grad(set_to_none=True)
        device_type = self.images.device.type
        with torch.autocast(device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            if "stream" in self.memory_cfg.parts():
                loss = stream_backward(self.model, self.images, self.labels, self.react, self.memory_cfg,
                                       loss_scale=1.0 / len(self.labels)).mean()
            else:
                logits = strategy_forward(self.model, self.images, self.memory_cfg)
                loss = timestep_loss(logits, self.labels, self.react).mean()
        if "stream" not in self.memory_cfg.parts():
            loss.backward()
        self.opt.step()
        return loss

    def __call__(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()


def measure(name, batch, args, device, dtype):
    mem_kw, model_kw, graphed, exact = VARIANTS[name]
    record = {"variant": name, "strategy": mem_kw.get("strategy", "full"), "batch": batch, "exact": exact,
              "cuda_graph": graphed, **{k: v for k, v in mem_kw.items() if k != "strategy"}, **model_kw}
    if graphed and device.type != "cuda":
        return {**record, "skipped": "CUDA graphs need a GPU"}
    model = make_model(model_kw, args.smoke, device)
    memory_cfg = smoke_memory(MemoryConfig(**mem_kw), args.smoke)
    size = args.image_size
    g = torch.Generator(device="cpu").manual_seed(1)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    labels = torch.randint(0, model.cfg.num_classes, (batch,), generator=g).to(device)
    stepper = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stepper = Stepper(model, memory_cfg, images, labels, dtype, graphed)
        for _ in range(args.warmup):
            stepper()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            if not graphed:
                torch.cuda.reset_peak_memory_stats()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(args.iters)]
            for start, end in events:
                start.record()
                stepper()
                end.record()
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) / 1e3 for s, e in events]
            peak = torch.cuda.max_memory_allocated() / 1e9
            reserved = torch.cuda.max_memory_reserved() / 1e9
        else:
            for _ in range(args.iters):
                t0 = time.perf_counter()
                stepper()
                times.append(time.perf_counter() - t0)
            peak = reserved = None
        step_s = statistics.median(times)
        record.update(fits=True, step_s=round(step_s, 5), samples_per_s=round(batch / step_s, 2),
                      step_s_min=round(min(times), 5), step_s_max=round(max(times), 5),
                      peak_gb=None if peak is None else round(peak, 3),
                      peak_reserved_gb=None if reserved is None else round(reserved, 3))
    except torch.OutOfMemoryError:
        record.update(fits=False, note="out of memory on this GPU")
    finally:
        del stepper, model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def grad_check(names, batch, args, device, dtype):
    """Cosine and relative error of each strategy's gradient against `full` on the same weights and batch."""
    base = make_model({}, args.smoke, device)
    g = torch.Generator(device="cpu").manual_seed(2)
    images = torch.randn(batch, 3, args.image_size, args.image_size, generator=g).to(device)
    labels = torch.randint(0, base.cfg.num_classes, (batch,), generator=g).to(device)
    react = reaction_step(base.cfg, LossConfig())

    def grads(mem_kw):
        memory_cfg = smoke_memory(MemoryConfig(**mem_kw), args.smoke)
        base.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if "stream" in memory_cfg.parts():
                stream_backward(base, images, labels, react, memory_cfg, loss_scale=1.0 / batch)
            else:
                loss = timestep_loss(strategy_forward(base, images, memory_cfg), labels, react).mean()
        if "stream" not in memory_cfg.parts():
            loss.backward()
        return torch.cat([p.grad.float().flatten() for p in base.parameters() if p.grad is not None])

    ref = grads({})
    for name in names:
        mem_kw = VARIANTS[name][0]
        got = grads(mem_kw)
        emit({"grad_check": name, "batch": batch, "vs": "full",
              "cosine": round(torch.nn.functional.cosine_similarity(got, ref, dim=0).item(), 6),
              "rel_err": float(f"{((got - ref).norm() / ref.norm()).item():.3e}")})


def scan_check(device):
    """The fused Triton Euler scan against the torch ops on random bf16 data (forward and backward)."""
    import lib.dynvision.scan as dv  # use_fused_scan is read there
    if device.type != "cuda" or not dv.HAVE_TRITON:
        return
    g = torch.Generator(device="cpu").manual_seed(3)
    B = 8
    x = torch.randn(3 * B, 64, 56, 56, generator=g).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    rec = torch.randn(x.shape, generator=g).to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    prev = torch.randn(B, 64, 56, 56, generator=g).relu().to(device, torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(x.shape, generator=g).to(device, torch.bfloat16)
    res = []
    for fused in (False, True):
        dv.use_fused_scan = fused
        out = dv.euler_scan(x, rec, prev, 0.4, B)
        res.append((out.float(), *[t.float() for t in torch.autograd.grad(out, (x, rec, prev), grad)]))
    dv.use_fused_scan = True

    def rel(a, b):
        return float(f"{((a - b).norm() / b.norm().clamp_min(1e-30)).item():.3e}")
    emit({"scan_check": "triton vs torch", "out_rel_err": rel(res[1][0], res[0][0]),
          "grad_x_rel_err": rel(res[1][1], res[0][1]), "grad_prev_rel_err": rel(res[1][3], res[0][3])})


def micro(device):
    """Time the V1 convolutions alone (forward, and backward as training runs it) at b32 x 5 steps."""
    from torch.utils.flop_counter import FlopCounterMode

    def timeit(fn, reps=10):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps / 1e3

    def case(name, cin, cout, k, stride, rows, size, fmt, input_grad):
        x = torch.randn(rows, cin, size, size, device=device, dtype=torch.bfloat16).contiguous(memory_format=fmt)
        w = (torch.randn(cout, cin, k, k, device=device, dtype=torch.bfloat16) * 0.05).contiguous(memory_format=fmt)
        w.requires_grad_()
        x.requires_grad_(input_grad)
        y = torch.nn.functional.conv2d(x, w, None, stride, k // 2)
        gy = torch.randn_like(y)
        wrt = [w] + ([x] if input_grad else [])
        with FlopCounterMode(display=False) as fc:
            torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, stride, k // 2), wrt, gy)
        fwd = timeit(lambda: torch.nn.functional.conv2d(x, w, None, stride, k // 2))
        both = timeit(lambda: torch.autograd.grad(torch.nn.functional.conv2d(x, w, None, stride, k // 2),
                                                  [w] + ([x] if input_grad else []), gy))
        emit({"micro": name, "fwd_ms": round(fwd * 1e3, 3), "fwd_bwd_ms": round(both * 1e3, 3),
              "tflops": round(fc.get_total_flops() / both / 1e12, 1)})

    cl, nchw = torch.channels_last, torch.contiguous_format
    case("V1.conv1 3->64 k5 s2 NHWC", 3, 64, 5, 2, 160, 224, cl, False)
    case("V1.conv1 3->64 k5 s2 NCHW", 3, 64, 5, 2, 160, 224, nchw, False)
    case("V1.conv1 4->64 k5 s2 NHWC (padded)", 4, 64, 5, 2, 160, 224, cl, False)
    case("V1.conv1 8->64 k5 s2 NHWC (padded)", 8, 64, 5, 2, 160, 224, cl, False)
    case("V1.conv2 64->64 k5 NHWC", 64, 64, 5, 1, 160, 112, cl, True)
    case("V1.rec 64->64 k5 NHWC 3 steps", 64, 64, 5, 1, 96, 112, cl, True)
    case("V1.conv2+rec fused 128->64 k5 NHWC 3 steps", 128, 64, 5, 1, 96, 112, cl, True)


def profile_step(name, batch, args, device, dtype, path):
    """Top kernels of one training step (torch.profiler), written to `path`."""
    mem_kw, model_kw, _, _ = VARIANTS[name]
    model = make_model(model_kw, args.smoke, device)
    images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, model.cfg.num_classes, (batch,), device=device)
    stepper = Stepper(model, smoke_memory(MemoryConfig(**mem_kw), args.smoke), images, labels, dtype, False)
    for _ in range(2):
        stepper()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        stepper()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=90))
    del stepper, model
    gc.collect()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, to check the script")
    ap.add_argument("--batches", default="", help="comma list; default 8,32,128 (smoke: 2)")
    ap.add_argument("--only", default="", help="comma list of variants (default: the plan in DEFAULT_PLAN)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining plan after this many seconds")
    ap.add_argument("--profile", default="", help="write a kernel table of one full b32 step to this file")
    ap.add_argument("--micro", action="store_true", help="also time the V1 convolutions alone")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    args.image_size = 16 if args.smoke else 224
    if args.smoke:
        args.warmup, args.iters = 1, 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    batches = [int(b) for b in args.batches.split(",") if b] or ([2] if args.smoke else [8, 32, 128])
    big, mid = max(batches), sorted(batches)[len(batches) // 2]
    remap = {8: min(batches), 32: mid, 128: big}
    plan = [(n, remap.get(b, b)) for n, b in DEFAULT_PLAN]
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in VARIANTS]
        if unknown:
            ap.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
        plan = [(n, b) for b in batches for n in wanted]
    plan = [(n, b) for n, b in plan if b in batches]
    plan = [p for i, p in enumerate(plan) if p not in plan[:i]]  # --smoke maps several batches onto one

    # The work: parameters and FLOPs per sample of one forward+backward, counted by FlopCounterMode on
    # this implementation (batched windows) and on the step-by-step graph (the same model's math).
    model = make_model({}, args.smoke, device)
    emit({"params": count_params(model), "preset": "x8", "image_size": args.image_size,
          "steps": model.cfg.total_steps(), "device": device_name, "torch": torch.__version__})
    flops = flops_per_sample(model, args.image_size, batch=1, device=device, dtype=dtype)
    flops_stepwise = flops_per_sample(make_model({"max_window_steps": 1}, args.smoke, device), args.image_size,
                                      batch=1, device=device, dtype=dtype)
    emit({"flops": True, "gflop_per_sample": round(flops / 1e9, 2),
          "gflop_per_sample_stepwise_graph": round(flops_stepwise / 1e9, 2), "counter": "FlopCounterMode",
          "note": "forward+backward of the loss on steps >= reaction time; batch 1"})
    del model
    scan_check(device)
    if args.micro and device.type == "cuda":
        micro(device)
    if args.profile:
        profile_step("full", mid, args, device, dtype, args.profile)

    results = []
    for name, batch in plan:
        if time.perf_counter() - t_start > args.budget_s:
            emit({"variant": name, "batch": batch, "skipped": f"time budget {args.budget_s:.0f} s spent"})
            continue
        log(f"[bench] {name} b{batch} ...")
        rec = measure(name, batch, args, device, dtype)
        results.append(rec)
        emit(rec)
    if time.perf_counter() - t_start < args.budget_s + 60:
        grad_check(["checkpoint", "offload", "compress", "offload+compress", "stream"], min(batches), args,
                   device, dtype)
    def ok(r, batch, exact_only=True):
        return r.get("fits") and r["batch"] == batch and (r["exact"] or not exact_only)
    exact_mid = [r for r in results if ok(r, mid)]
    fastest = max(exact_mid, key=lambda r: r["samples_per_s"], default=None)
    peak_key = "peak_gb" if device.type == "cuda" else "step_s"
    leanest = min(exact_mid, key=lambda r: r[peak_key] or 0, default=None)
    best_big = min([r for r in results if ok(r, big)], key=lambda r: r[peak_key] or 0, default=None)
    def fastest_of(prefix):
        runs = [r for r in results if ok(r, mid) and r["strategy"] == prefix]
        return min(runs, key=lambda r: r["step_s"], default=None)
    full, ckpt = fastest_of("full"), fastest_of("checkpoint")
    full_eager = next((r for r in results if r["variant"] == "full" and ok(r, mid)), None)
    ckpt_eager = next((r for r in results if r["variant"] == "checkpoint" and ok(r, mid)), None)
    emit({"summary": True, "params": count_params(make_model({}, args.smoke, torch.device("cpu"))),
          "gflop_per_sample": round(flops / 1e9, 2),
          f"samples_per_s_b{mid}": fastest and fastest["samples_per_s"],
          f"fastest_exact_b{mid}": fastest and fastest["variant"],
          f"peak_gb_b{mid}_exact": leanest and leanest["peak_gb"],
          f"leanest_exact_b{mid}": leanest and leanest["variant"],
          f"peak_gb_b{big}_best": best_big and best_big["peak_gb"],
          f"leanest_exact_b{big}": best_big and best_big["variant"],
          # fastest checkpoint configuration over fastest full configuration, and the plain eager pair
          "checkpoint_vs_full_time": (round(ckpt["step_s"] / full["step_s"], 3) if ckpt and full else None),
          "checkpoint_vs_full_pair": ckpt and full and f'{ckpt["variant"]} / {full["variant"]}',
          "checkpoint_vs_full_time_eager": (round(ckpt_eager["step_s"] / full_eager["step_s"], 3)
                                            if ckpt_eager and full_eager else None),
          "device": device_name, "smoke": args.smoke, "wall_s": round(time.perf_counter() - t_start, 1)})


if __name__ == "__main__":
    main()
