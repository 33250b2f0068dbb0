"""Data-parallel scaling of train_ast.py through torchrun: throughput and efficiency against 1 GPU.

    python bench/scaling.py                       # GPUs: 1, 2, 4, 8 (as many as the machine has)
    python bench/scaling.py --smoke               # CPU: 1 and 2 gloo processes, tiny model

Weak scaling: each rank keeps a per-GPU batch of 256 (batch mode: 2048 scored per rank) on its own share of
the data, so N GPUs train a global batch N times larger; efficiency(N) = throughput(N) / (N x throughput(1)).
Every N runs as its own `torchrun` job of train_ast.train() (ResNet-50, 224 px, bf16, synthetic
GPU-resident data), in `full` and `batch` at 10%; the timed epoch is the last one (see bench/ast_speed.py).
Not covered yet: encode_stream.py (the script does not exist in this repository yet).
Last line: {"summary": true, "gpus": [...], "train_full_efficiency": [...], "train_ast10_efficiency": [...],
"device": ...}.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def emit(**record):
    print(json.dumps(record), flush=True)


def worker(args):
    """One torchrun job: train one variant, rank 0 prints the timed epoch's throughput."""
    import train_ast
    from lib import dist
    from lib.config import merge
    info = dist.setup(0, "cpu" if args.smoke else "auto")
    world = info.world_size
    batch_like = args.mode == "batch"
    cfg = merge(train_ast.Config(), {
        "run": {"name": f"{args.mode}_{world}", "out_dir": args.out_dir, "epochs": 3 if batch_like else 2,
                "resume": "none"},
        "data": {"name": "synthetic", "image_size": args.size, "num_classes": 1000, "loader": "resident",
                 "train_samples": args.samples_per_gpu * world, "test_samples": 64 * world,
                 "resident_max_gb": 40.0},
        "model": {"name": args.model},
        "optim": {"lr": 0.05, "warmup_steps": 20, "weight_decay": 5e-5},
        "loop": {"precision": "fp32" if args.smoke else "bf16", "global_batch": args.batch * world,
                 "log_every": 20},
        "ast": {"mode": args.mode, "score_batch": args.score_batch * world, "warmup_epochs": 0,
                "controller": {"target_rate": 0.1}},
    })
    torch.backends.cudnn.benchmark = True
    result = train_ast.train(cfg, info, Path(args.out_dir) / cfg.run.name)
    if dist.is_main():
        curve = result["curve"]
        seconds = curve[-1]["train_seconds"] - curve[-2]["train_seconds"]
        emit(mode=args.mode, gpus=world, epoch_seconds=round(seconds, 3),
             images_per_s=round(args.samples_per_gpu * world / seconds, 1), global_batch=cfg.loop.global_batch,
             device=torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu")
    dist.cleanup()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="full")
    parser.add_argument("--out-dir", default="")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="per-GPU training batch")
    parser.add_argument("--score-batch", type=int, default=2048, help="per-GPU scoring batch (batch mode)")
    parser.add_argument("--samples-per-gpu", type=int, default=16384)
    parser.add_argument("--gpus", default="", help="comma list, default 1,2,4,8 up to the GPUs present")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.batch, args.score_batch, args.samples_per_gpu = "small_cnn", 16, 16, 32, 256
    if args.worker:
        return worker(args)
    available = 2 if args.smoke else torch.cuda.device_count()
    counts = [int(g) for g in args.gpus.split(",")] if args.gpus else [g for g in (1, 2, 4, 8) if g <= available]
    out_dir = tempfile.mkdtemp(prefix="scaling_")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    throughput = {}
    for mode in ("full", "batch"):
        for n in counts:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--worker", f"--mode={mode}", f"--out-dir={out_dir}"] + \
                  [a for a in sys.argv[1:] if a.startswith(("--model", "--size", "--batch", "--score-batch",
                                                            "--samples-per-gpu", "--smoke"))]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
            if run.returncode != 0 or not lines:
                emit(mode=mode, gpus=n, error=f"exit {run.returncode}", stderr_tail=run.stderr[-2000:])
                continue
            record = json.loads(lines[-1])
            print(lines[-1], flush=True)
            throughput[(mode, n)] = record["images_per_s"]

    def efficiency(mode):
        base = throughput.get((mode, 1))
        return [round(throughput[(mode, n)] / (n * base), 4) if base and (mode, n) in throughput else None
                for n in counts]

    device = "cpu" if args.smoke else torch.cuda.get_device_name()
    emit(summary=True, gpus=counts, train_full_efficiency=efficiency("full"),
         train_ast10_efficiency=efficiency("batch"), encode_efficiency=None,
         encode_note="encode_stream.py does not exist yet", device=device, torch=torch.__version__,
         command=" ".join(sys.argv))
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
