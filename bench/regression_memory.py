"""Temporal regression model (lib/temporal.py), full widths 64/128/256, AdamW, batch 20, 5 frames of 3x128x128: peak
memory and step time with and without per-frame checkpointing, eager and each torch.compile mode, in one run.

    # one GPU, bf16 autocast: eager, default and reduce-overhead took 28 s on an H200 (2026-12-02)
    python bench/regression_memory.py --modes=eager,default,reduce-overhead --out=$OUT/regression_memory.jsonl
    # + max-autotune: its compile (Triton matmul autotuning) ran past 215 s on the H200 and was stopped there
    python bench/regression_memory.py --out=$OUT/regression_memory.jsonl
    # CPU, seconds (the tests run it): tiny sizes, eager only; memory = bytes saved for backward
    python bench/regression_memory.py --smoke

What dominates the peak: the encoder's activations. The step pushes B x T = 100 frames through 64-channel maps at
128 x 128 (each such map is 1 M values per frame); the 2.9 M weights with their gradients and AdamW state are about
46 MB (weights_grads_adamw_gb in each line). Per-frame checkpointing keeps each frame slot's input and embedding
and recomputes one slot (B frames) at a time in the backward, so activations are live for 1/T of the frames at once.

Per variant (eager | default | reduce-overhead | max-autotune) x (plain | checkpointed), a fresh model from the same
seed: `--warmup` steps (the compile happens in the first; its wall time is compile_s), then `--steps` timed steps with
CUDA events; the median is step_ms; peak_gb is torch.cuda.max_memory_allocated over the timed steps (reset after the
warm-up). max-autotune is kept small: convolutions autotune against ATen only (--conv-autotune=aten, the default;
=all also tries Triton conv templates and may take many minutes). Last line:
{"summary": true, "ckpt_memory_saving": 1 - peak(ckpt) / peak(plain), "ckpt_time_cost": time(ckpt) / time(plain) - 1
 (both eager, per-frame checkpointing), "best_compile_speedup": max over modes of eager / compiled time (plain),
 "selective_memory_saving", "selective_time_cost" (the same for checkpoint_mode=selective), "first_stage_memory_saving",
 "first_stage_time_cost" (checkpoint_mode=first_stage: only the full-resolution stage, per frame slot), "device": ...}.
On the CPU (--smoke) memory is the bytes saved through autograd's hooks, which the selective mode's kept conv outputs
bypass: its CPU figure undercounts (tests/test_temporal.py measures it by resident memory instead).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.temporal import TemporalBatch, TemporalConfig, TemporalRegressor  # noqa: E402

MODES = ("eager", "default", "reduce-overhead", "max-autotune")
CHECKPOINTS = ("off", "frames", "selective", "first_stage")  # none | per frame slot | conv outputs kept | the
                                                             # full-resolution stage per frame slot (lib/temporal.py)


def make_inputs(args, device):
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(args.batch, args.frames, args.channels, args.size, args.size, generator=g)
    scalars = torch.randn(args.batch, 2, generator=g)
    targets = torch.randn(args.batch, 1, generator=g) * 3 + 5
    return TemporalBatch(frames.to(device), scalars.to(device)), targets.to(device)


def saved_bytes(fn):
    """Bytes of the tensors autograd keeps for the backward while `fn` runs its forward (the CPU memory measure)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def run_variant(args, mode, ckpt, device):
    """One (compile mode, checkpointing) variant; ckpt: "off" or a lib/temporal.py checkpoint_mode."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    cfg = TemporalConfig(widths=args.widths, checkpoint_frames=ckpt != "off",
                         checkpoint_mode="frames" if ckpt == "off" else ckpt)
    model = TemporalRegressor(cfg, args.channels, args.frames, 2, 1).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    step_model = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    batch, targets = make_inputs(args, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    measured = {}

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out, measured["saved"] = saved_bytes(lambda: step_model(batch)) if device.type == "cpu" else \
                (step_model(batch), None)
            loss = F.mse_loss(out.float(), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    step()  # compiles here
    sync()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    step_ms = statistics.median(times)
    record = {"mode": mode, "checkpoint": ckpt, "batch": args.batch, "frames": args.frames,
              "frame": f"{args.channels}x{args.size}x{args.size}", "widths": args.widths, "step_ms": round(step_ms, 3),
              "compile_s": round(first_s - step_ms / 1e3, 2) if mode != "eager" else None,
              "peak_gb": round(peak, 4) if peak is not None else None,
              "saved_for_backward_gb": round(measured["saved"] / 1e9, 5) if measured.get("saved") is not None else None,
              "weights_grads_adamw_gb": round(16 * params / 1e9, 4), "params": params}
    del step_model, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, eager only")
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--frames", type=int, default=5)
    parser.add_argument("--size", type=int, default=128, help="frame height and width in px")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--widths", default="full")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (the first compiles)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    parser.add_argument("--conv-autotune", default="aten", choices=("aten", "all"),
                        help="max-autotune: conv backends tried (aten keeps it to seconds)")
    parser.add_argument("--out", default="", help="also write the JSON lines to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.frames, args.size, args.channels, args.widths = 2, 3, 16, 1, "4/8/16"
        args.steps, args.warmup, args.modes = 2, 1, "eager"
    modes = [m for m in args.modes.split(",") if m]
    if "eager" not in modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must include eager (the baseline) and only name {', '.join(MODES)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        import torch._inductor.config as inductor
        if args.conv_autotune == "aten":
            inductor.max_autotune_conv_backends = "ATEN"
    if args.out:  # written line by line: what ran before a crash or a time limit is kept
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("")

    def emit(record):
        line = json.dumps(record)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    results = {}
    t_start = time.perf_counter()
    for mode in modes:
        # selective and first-stage checkpointing run eager only: with compiled selective variants the bench ran
        # past 150 s on the H200 (2026-12-02; 28 s without), and the compile modes' question is answered by plain
        # and per-frame
        for ckpt in CHECKPOINTS if mode == "eager" else CHECKPOINTS[:2]:
            results[(mode, ckpt)] = run_variant(args, mode, ckpt, device)
            emit(results[(mode, ckpt)])
    plain, ckpt, selective, first = (results[("eager", c)] for c in CHECKPOINTS)
    memory_key = "peak_gb" if device.type == "cuda" else "saved_for_backward_gb"
    speedups = {m: plain["step_ms"] / results[(m, "off")]["step_ms"] for m in modes if m != "eager"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit({"summary": True, "ckpt_memory_saving": round(1 - ckpt[memory_key] / plain[memory_key], 4),
          "ckpt_time_cost": round(ckpt["step_ms"] / plain["step_ms"] - 1, 4),
          "best_compile_speedup": round(max(speedups.values()), 4) if speedups else None,
          "selective_memory_saving": round(1 - selective[memory_key] / plain[memory_key], 4),
          "selective_time_cost": round(selective["step_ms"] / plain["step_ms"] - 1, 4),
          "first_stage_memory_saving": round(1 - first[memory_key] / plain[memory_key], 4),
          "first_stage_time_cost": round(first["step_ms"] / plain["step_ms"] - 1, 4),
          "device": name})
    print(f"# memory measured as {memory_key}; compile speedups {json.dumps(speedups)}; "
          f"wall {time.perf_counter() - t_start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
