"""lib/loop.py TrainStep against a minimal hand-written loop, same run: ResNet-50, 224 px, bf16, channels_last.

    python bench/loop_overhead.py                 # GPU: eager and compiled, JSON lines on stdout
    python bench/loop_overhead.py --smoke         # CPU: ResNet-18 at 32 px, checks the script runs

Data are synthetic GPU-resident batches (rotated among a few, so no input is reused back to back).
Each variant: warm-up steps (compile happens there), then timed steps between CUDA events; variants are
interleaved (minimal, lib, minimal, lib) and the best round of each is kept.
The last line is {"summary": true, "lib_vs_minimal_eager": r1, "lib_vs_minimal_compiled": r2, "device": ...}.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.loop import LoopConfig, OptimConfig, TrainStep, build_optimizer, prepare_model  # noqa: E402


def emit(**record):
    print(json.dumps(record), flush=True)


def make_model(device, compile_model, seed=0, arch="resnet50"):
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=1000)
    return prepare_model(model, LoopConfig(channels_last=True, compile=compile_model), device)


def timed(run_step, batches, warmup, steps, device):
    """Images/s of `run_step(x, y)` over `steps` steps after `warmup` steps."""
    for i in range(warmup):
        run_step(*batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    for i in range(steps):
        run_step(*batches[i % len(batches)])
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - t0
    return steps * batches[0][0].shape[0] / seconds


def minimal_loop(model, lr, device):
    """What a careful user writes by hand: autocast bf16, backward, SGD step, zero_grad(set_to_none)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)

    def run_step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run_step


def lib_loop(model, lr, device, batch):
    optim_cfg = OptimConfig(name="sgd", lr=lr, weight_decay=5e-5, schedule="cosine", warmup_steps=10)
    loop_cfg = LoopConfig(precision="bf16", global_batch=batch, log_every=50)
    step = TrainStep(model, build_optimizer(model, optim_cfg, device), loop_cfg, optim_cfg, 10_000, device)

    def ce(m, x, y):
        return F.cross_entropy(m(x), y, reduction="none")

    def run_step(x, y):
        step(x, y, ce)
    return run_step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run to check the script")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    size = 224
    if args.smoke:
        args.batch, args.steps, args.warmup, args.rounds, size = 4, 2, 1, 1, 32
    torch.backends.cudnn.benchmark = True
    g = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(args.batch, 3, size, size, device=device, generator=g)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, 1000, (args.batch,), device=device, generator=g)) for _ in range(4)]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results = {}
    for compiled in ([False] if args.smoke else [False, True]):
        mode = "compiled" if compiled else "eager"
        arch = "resnet18" if args.smoke else "resnet50"  # smoke: checks the script runs, in seconds
        models = {"minimal": make_model(device, compiled, arch=arch), "lib": make_model(device, compiled, arch=arch)}
        steps = {"minimal": minimal_loop(models["minimal"], 0.1, device),
                 "lib": lib_loop(models["lib"], 0.1, device, args.batch)}
        best = {"minimal": 0.0, "lib": 0.0}
        for r in range(args.rounds):
            for variant in ("minimal", "lib"):
                ips = timed(steps[variant], batches, args.warmup if r == 0 else 3, args.steps, device)
                best[variant] = max(best[variant], ips)
                emit(variant=variant, mode=mode, round=r, images_per_s=round(ips, 1), batch=args.batch,
                     steps=args.steps, device=name)
        results[mode] = best["lib"] / best["minimal"]
        emit(mode=mode, minimal_images_per_s=round(best["minimal"], 1), lib_images_per_s=round(best["lib"], 1),
             lib_vs_minimal=round(results[mode], 4), device=name)
        del models, steps
        torch.cuda.empty_cache() if device.type == "cuda" else None
    emit(summary=True, lib_vs_minimal_eager=round(results["eager"], 4),
         lib_vs_minimal_compiled=round(results.get("compiled", float("nan")), 4), device=name,
         torch=torch.__version__, command=" ".join(sys.argv))


if __name__ == "__main__":
    main()
