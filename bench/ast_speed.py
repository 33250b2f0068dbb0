"""Wall-clock of each AST mode against full training, same run, through train_ast.train() itself: one sparse
epoch (steady state) and the whole run (warm-up epoch on all data included).

    python bench/ast_speed.py                     # GPU: ResNet-50, 224 px, bf16, synthetic GPU-resident data
    python bench/ast_speed.py --smoke             # CPU: tiny sizes, checks the script runs

Every variant trains the same model from the same init with the real script's code path, for the same number of
epochs (`--epochs`, default 4): epoch 0 on all data (the AST modes' warm-up; `full` trains every epoch on all
data), then sparse epochs. An "epoch-equivalent" is one pass of the loader over the training set: `full` trains
every sample; `batch` scores every sample with a no-grad forward and trains the selected ones; `epoch` trains the
kept share. Two figures per variant: the last epoch alone (steady state: the controller has settled and cuDNN has
autotuned the few subset shapes) and the whole run's train_seconds (evaluation excluded; what a user waits for).
A 20-step throwaway run first takes the one-time costs (CUDA/cuDNN start-up, autotuning the full-batch shapes),
so the first variant is not charged them, and `pretune` autotunes every subset and scoring shape once (timed and
reported as pretune_seconds: a long run pays it once per process, this short bench would pay it in its timed epochs); a whole-run speedup above 1 / activation rate is flagged impossible.
Last line: {"summary": true, "speedup_batch_10": x, ... (steady state), "whole_run_speedup_batch_10": x, ...,
"device": ...}.
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_ast  # noqa: E402
from lib import dist  # noqa: E402
from lib.config import merge  # noqa: E402


def emit(**record):
    print(json.dumps(record), flush=True)


def base_config(args, out_dir):
    overrides = {
        "run": {"name": "bench", "out_dir": str(out_dir), "epochs": 2, "eval_every": 1, "resume": "none",
                "device": "auto"},
        "data": {"name": "synthetic", "image_size": args.size, "num_classes": 1000, "loader": "resident",
                 "train_samples": args.samples, "test_samples": args.batch, "augment": True,
                 "resident_max_gb": 40.0},
        "model": {"name": args.model, **({"width": 8} if args.smoke else {})},
        "optim": {"lr": 0.05, "warmup_steps": 20, "weight_decay": 5e-5},
        "loop": {"precision": "bf16" if not args.smoke else "fp32", "global_batch": args.batch,
                 "log_every": 20, "channels_last": True},
    }
    return merge(train_ast.Config(), overrides)


VARIANTS = {
    # name: ast overrides; every variant runs args.epochs epochs, the first on all data
    "full": {"mode": "full"},
    "batch_10": {"mode": "batch", "controller": {"target_rate": 0.1}},
    "batch_20": {"mode": "batch", "controller": {"target_rate": 0.2}},
    "batch_10_cheap_scoring": {"mode": "batch", "controller": {"target_rate": 0.1}, "score_resolution": -2},
    "epoch_10": {"mode": "epoch", "controller": {"target_rate": 0.1}},
    "epoch_20": {"mode": "epoch", "controller": {"target_rate": 0.2}},
}
COMMON_AST = {"warmup_epochs": 1, "final_full_fraction": 0.0}  # one warm-up epoch on all data, then sparse epochs


def pretune(cfg, info, args):
    """Autotune, once and timed, every input shape the variants will see, as a long run does in its first minutes.

    cudnn.benchmark autotunes each new input shape once per process (about 10 s for a ResNet-50 forward+backward on
    an H200); a long run pays that once per shape, but a 4-epoch bench would pay it inside its timed epochs (a first
    subset shape met in the last epoch made batch_10's "steady state" 3x slower than full). So: forward+backward at
    every subset bucket batch mode can train (train_ast.subset_size over every controller count), and no-grad
    forwards of the scoring batch at each scoring resolution. Returns the seconds spent (reported, not hidden)."""
    from lib.loop import prepare_model, split_sizes
    from lib.models import build_model
    import time
    model = prepare_model(build_model(cfg.model, 3, cfg.data.num_classes, args.size), cfg.loop, info.device)
    fmt = torch.channels_last if info.device.type == "cuda" else torch.contiguous_format
    dtype = torch.bfloat16 if cfg.loop.precision == "bf16" else torch.float32
    round_to, band = (8 if args.smoke else 32), cfg.ast.rate_band
    buckets = {train_ast.subset_size(k, args.score_batch, rate, round_to, band)
               for rate in (0.1, 0.2) for k in range(args.score_batch + 1)}
    # a subset larger than the training batch runs as micro-batches of it: its remainder is one more shape (the
    # H200 run of 2026-12-02 missed these: batch_20's 384..448 subsets paid for 128 and 160 in its timed run)
    subsets = sorted({m for k in buckets for m in split_sizes(k, args.batch)})
    start = time.perf_counter()
    with torch.autocast(info.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for k in subsets:
            x = torch.randn(k, 3, args.size, args.size, device=info.device).contiguous(memory_format=fmt)
            model(x).float().mean().backward()
        with torch.no_grad():
            for px in (args.size, args.size // 2):
                model(torch.randn(args.score_batch, 3, px, px, device=info.device).contiguous(memory_format=fmt))
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    if info.device.type == "cuda":
        torch.cuda.empty_cache()
    return subsets, seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="training batch of full / epoch modes")
    parser.add_argument("--score-batch", type=int, default=2048, help="samples scored per step in batch mode")
    parser.add_argument("--samples", type=int, default=16384, help="training set size (one epoch)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of every variant (the first on all data)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.batch, args.score_batch, args.samples = "small_cnn", 16, 8, 16, 128
        args.epochs = 3
    torch.backends.cudnn.benchmark = True
    # every variant trains on the same synthetic set: a function of the config's data section, made by each variant
    # before its timed epochs (so it is not in train_seconds)
    out_dir = Path(tempfile.mkdtemp(prefix="ast_speed_"))
    cfg = base_config(args, out_dir)
    info = dist.setup(0, "cpu" if args.smoke else "auto")
    device_name = torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu"
    # one-time costs (CUDA and cuDNN start-up, autotuning the full-batch shapes) go to a throwaway run
    train_ast.train(merge(cfg, {"run": {"name": "warmup", "max_steps": 2 if args.smoke else 20, "epochs": 1},
                                "ast": {"mode": "full"}}), info, out_dir / "warmup")
    subsets, tune_seconds = pretune(cfg, info, args)
    emit(pretune_subset_sizes=subsets, pretune_seconds=round(tune_seconds, 3), device=device_name)
    epoch_seconds, whole_seconds, whole_rates = {}, {}, {}
    for name, ast_overrides in VARIANTS.items():
        overrides = {"ast": {**COMMON_AST, **ast_overrides}, "run": {"name": name, "epochs": args.epochs}}
        if ast_overrides["mode"] == "batch":
            overrides["ast"]["score_batch"] = args.score_batch
            overrides["ast"]["round_to"] = 8 if args.smoke else 32
        if overrides["ast"].get("score_resolution") == -2:
            overrides["ast"]["score_resolution"] = args.size // 2  # cheap scoring: half the resolution
        vcfg = merge(cfg, overrides)
        result = train_ast.train(vcfg, info, out_dir / name)
        curve = result["curve"]
        timed = curve[-1]["train_seconds"] - curve[-2]["train_seconds"]  # the last epoch alone
        steps_timed = curve[-1]["step"] - curve[-2]["step"]
        metrics = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
        plans = [m for m in metrics if m.get("kind") == "epoch_plan"]
        if plans:
            rate = plans[-1]["rate"]
        elif ast_overrides["mode"] == "batch":
            rate = sum(result["counts"][-steps_timed:]) / (steps_timed * args.score_batch)
        else:
            rate = 1.0
        epoch_seconds[name], whole_seconds[name] = timed, result["train_seconds"]
        whole_rates[name] = result["activation_rate"]
        emit(variant=name, mode=result["mode"], epoch_seconds=round(timed, 3), optimizer_steps=steps_timed,
             images_per_epoch=args.samples, images_per_s=round(args.samples / timed, 1),
             whole_run_seconds=round(result["train_seconds"], 3), epochs=args.epochs,
             backward_samples_total=result["backward_samples"], forward_samples_total=result["forward_samples"],
             activation_rate_timed_epoch=round(rate, 4), activation_rate_whole_run=round(result["activation_rate"], 4),
             batch=args.batch, score_batch=args.score_batch if ast_overrides["mode"] == "batch" else None,
             device=device_name)
    full, full_whole = epoch_seconds["full"], whole_seconds["full"]
    summary = {f"speedup_{k}": round(full / v, 3) for k, v in epoch_seconds.items() if k != "full"}
    summary.update({f"whole_run_speedup_{k}": round(full_whole / v, 3) for k, v in whole_seconds.items()
                    if k != "full"})
    impossible = [k for k, v in whole_seconds.items() if k != "full" and full_whole / v > 1.05 / whole_rates[k]]
    emit(summary=True, **summary, impossible=impossible, full_epoch_seconds=round(full, 3),
         full_whole_run_seconds=round(full_whole, 3), pretune_seconds=round(tune_seconds, 3), epochs=args.epochs, model=args.model, size=args.size,
         samples=args.samples, device=device_name, torch=torch.__version__, command=" ".join(sys.argv))
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
