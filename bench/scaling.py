"""Scaling of train_ast.py and encode_stream.py through torchrun: throughput and efficiency against 1 GPU.

    python bench/scaling.py                       # GPUs: 1, 2, 4, 8 (as many as the machine has)
    python bench/scaling.py --smoke               # CPU: 1 and 2 gloo processes, tiny models

Weak scaling: each rank keeps its own load, so efficiency(N) = throughput(N) / (N x throughput(1)).
  train   every N is its own `torchrun` job of train_ast.train() (ResNet-50, 224 px, bf16, synthetic
          GPU-resident data), `full` and `batch` at 10%, a per-GPU batch of 256 (batch mode: 2048 scored per
          rank), so N GPUs train a global batch N times larger; timed: the last epoch (see bench/ast_speed.py).
  encode  every N is its own `torchrun` job of encode_stream.main() (RViT-B/16: 2 blocks x 6 loops, 224 px,
          bf16, synthetic GPU-resident data, --encode-samples-per-gpu samples per rank, class-token outputs of
          every loop written as fp16 chunks); timed: the slowest rank's encode loop, writes included.
Last line: {"summary": true, "gpus": [...], "train_full_efficiency": [...], "train_ast10_efficiency": [...],
"encode_efficiency": [...], "device": ...}.
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
        "model": {"name": args.model, **({"width": 8} if args.smoke else {})},
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


def encode_worker(args):
    """One torchrun job: encode this job's share with encode_stream; rank 0 prints the throughput."""
    import encode_stream
    from lib.config import merge
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = ({"image_size": 32, "patch_size": 8, "width": 64, "heads": 2, "blocks": 2, "loops": 2} if args.smoke
             else {"image_size": args.size, "patch_size": 16, "width": 768, "heads": 12, "blocks": 2, "loops": 6})
    cfg = merge(encode_stream.Config(), {
        "run": {"name": f"encode_{world}", "out_dir": args.out_dir, "resume": "none",
                "device": "cpu" if args.smoke else "auto"},
        "data": {"name": "synthetic", "num_classes": 1000, "loader": "resident", "train_samples": 64,
                 "test_samples": args.encode_samples_per_gpu * world, "resident_max_gb": 60.0},
        "model": model,
        "encode": {"outputs": ["embedding", "loop_embeddings"], "batch_size": args.batch, "chunk_samples": 4096}})
    result = encode_stream.main(cfg)  # sets up and tears down the process group itself
    if int(os.environ.get("RANK", "0")) == 0:
        emit(mode="encode", gpus=world, seconds=result["seconds"], samples=result["samples"],
             images_per_s=result["samples_per_s"],
             device=torch.cuda.get_device_name() if torch.cuda.is_available() and not args.smoke else "cpu")


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
    parser.add_argument("--encode-samples-per-gpu", type=int, default=32768)
    parser.add_argument("--modes", default="full,batch,encode", help="comma list of full, batch, encode")
    parser.add_argument("--gpus", default="", help="comma list, default 1,2,4,8 up to the GPUs present")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.size, args.batch, args.score_batch, args.samples_per_gpu = "small_cnn", 16, 16, 32, 128
        args.encode_samples_per_gpu = 128
    if args.worker:
        return encode_worker(args) if args.mode == "encode" else worker(args)
    available = 2 if args.smoke else torch.cuda.device_count()
    counts = [int(g) for g in args.gpus.split(",")] if args.gpus else [g for g in (1, 2, 4, 8) if g <= available]
    out_dir = tempfile.mkdtemp(prefix="scaling_")
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               PYTHONUNBUFFERED="1")
    throughput = {}
    for mode in args.modes.split(","):
        for n in counts:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   __file__, "--worker", f"--mode={mode}", f"--out-dir={out_dir}"] + \
                  [a for a in sys.argv[1:] if a.startswith(("--model", "--size", "--batch", "--score-batch",
                                                            "--samples-per-gpu", "--encode-samples-per-gpu",
                                                            "--smoke"))]
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
         train_ast10_efficiency=efficiency("batch"), encode_efficiency=efficiency("encode"),
         images_per_s={f"{m}_{n}": v for (m, n), v in throughput.items()}, device=device, torch=torch.__version__,
         command=" ".join(sys.argv))
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
