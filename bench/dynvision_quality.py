"""Do DyRCNN's memory strategies keep its accuracy and temporal dynamics on real held-out data? Each vs `full`.

    python bench/dynvision_quality.py --out=$OUT/dynvision_quality.jsonl --plot=$OUT/dynvision_quality.png  # GPU
    python bench/dynvision_quality.py --smoke                                   # CPU, seconds: checks the script

DyRCNNx4 (36/64/121/256 channels) with the delays on: forward 5 steps, recurrent 3, 20 stimulus + 20 residual
steps, reaction (first labelled) step 20, bf16 autocast on CUDA, AdamW. Two real datasets the project has
offline: scikit-learn's digits (1797 8x8 images; 20% held out by the seed) at 16 px, and the animal silhouettes in
../shared/data/ (10,000 28x28 images, 10 classes) at 32 px: a fixed permutation holds out --test-samples
images (real held-out data, never trained on) and trains on the next --train-samples (a subset, for time).

Strategies (train_dynvision.py --compare, the real code path, `train_dynvision.run_compare`): full, checkpoint
(chunks of 10 steps), offload, compress bf16, compress int8, stream with a window shorter than the 4 forward
delays from V1 to the readout (2 delays: V1 gets no gradient through the feedforward path) and one longer
(6 delays: the losses of the first window reach V1; later windows still cut paths), stream (long window) +
compress int8, and `update_every: [1, 1, 2, 2]` (V4 and IT update every second step: a different model).
Every strategy of a (dataset, seed) starts from the same weights and sees the same batches. Jobs (dataset,
seed) run as parallel processes on the one GPU (--workers); peak memory is each process's own CUDA
max_memory_allocated, and step time is measured afterwards with each strategy alone on the GPU (--timing-steps
steps after the first epoch; 0 = take the parallel runs' times, which share the GPU).

Output, JSON lines: one per trained run (accuracy per timestep on the held-out split), one per (dataset,
strategy) with the final accuracy mean +- std over seeds, the paired difference to full (points; mean +- std
over seeds, paired t-test p, lib/stats.py), the Pearson correlation of its accuracy-per-timestep curve with
full's (same seed; steps from the reaction step on; mean and min over seeds), step time, peak memory, and
plateau_gain_pt (final accuracy minus the accuracy at 75% of the epochs: near 0 = trained to a plateau); last
{"summary": true, "worst_exact_minus_full_pt": a, "worst_approx_minus_full_pt": b, "worst_curve_correlation": c,
"device": ...}: a = the checkpoint/offload difference farthest from 0, b = the lowest approximate difference
(compress, stream, their combination, update_every), c = the lowest mean correlation of any strategy, each over
both datasets. Bars (issue 18): |a| <= 0.5 pt; b >= -2 pt and c >= 0.95, per strategy in `bars`.

What each strategy costs and when to avoid it: the measured differences are what this bench is for (H200 run of
2026-12-02 in docs/BENCHMARKS.md: every strategy within 0.8 pt of full but stream with windows shorter than the
V1 -> readout path, -2.1 / -9.3 pt). Known by construction: checkpoint and offload compute full BPTT's gradients
(they cost time: recomputation, host copies); stream windows shorter than the V1 -> readout path (4 forward
delays) cannot carry gradient from the loss to V1 through the feedforward path, so V1 learns only through skip
connections, if at all; compress bf16 under bf16 autocast changes only the tensors autocast keeps in fp32.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SILHOUETTES = REPO.parent / "shared" / "data" / "animal_silhouettes.npz"

# name: data overrides (root of the npz filled in at run time), epochs
DATASETS = {
    "digits": ({"name": "digits", "image_size": 16}, 15),
    "silhouettes": ({"name": "npz", "image_size": 32}, 8),
}


def strategies(forward_delay):
    """The compared variants: name -> overrides of the run config. Stream windows are relative to the 4 forward
    delays from V1 to the readout: half of that path (shorter) and 1.5 x (longer)."""
    path = 4 * forward_delay
    short, long = path // 2, path + path // 2
    return {
        "full": {"memory": {"strategy": "full"}},
        "checkpoint": {"memory": {"strategy": "checkpoint", "chunk_steps": max(1, path // 2)}},
        "offload": {"memory": {"strategy": "offload"}},
        "compress_bf16": {"memory": {"strategy": "compress", "compress_dtype": "bf16"}},
        "compress_int8": {"memory": {"strategy": "compress", "compress_dtype": "int8"}},
        f"stream_{short}": {"memory": {"strategy": "stream", "stream_window_steps": short}},
        f"stream_{long}": {"memory": {"strategy": "stream", "stream_window_steps": long}},
        f"stream_{long}+compress_int8": {"memory": {"strategy": "stream+compress", "stream_window_steps": long,
                                                    "compress_dtype": "int8"}},
        "update_every_1122": {"model": {"update_every": [1, 1, 2, 2]}},
    }


def emit(out, **record):
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def write_silhouettes(src, dst, train_samples, test_samples):
    """A fixed split of the silhouettes (sorted by class: permuted first): the first test_samples of the
    permutation are held out, the next train_samples are trained on; written as x_train/y_train/x_test/y_test."""
    import numpy as np
    with np.load(src, allow_pickle=False) as f:
        x, y = f["x"], f["y"]
    if train_samples + test_samples > len(y):
        raise SystemExit(f"--train-samples + --test-samples = {train_samples + test_samples} is more than the "
                         f"{len(y)} images in {src}")
    perm = np.random.default_rng(12345).permutation(len(y))
    test, train = perm[:test_samples], perm[test_samples:test_samples + train_samples]
    np.savez(dst, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])


def job_config(dataset, seed, args, out_dir, data_root):
    data, epochs = DATASETS[dataset]
    epochs = args.epochs or epochs
    data = {**data, "augment": False, "loader": "resident", **({"root": data_root} if data_root else {})}
    model = {"preset": "x4", "n_timesteps": 20, "forward_delay_steps": 5, "recurrent_delay_steps": 3}
    if args.smoke:
        data["image_size"] = 8
        model.update(channels=[4, 6, 8, 10], n_timesteps=4, forward_delay_steps=1, recurrent_delay_steps=1)
    return {
        "run": {"name": f"{dataset}-s{seed}", "out_dir": str(out_dir), "seed": seed, "device": args.device,
                "epochs": epochs, "eval_every": max(1, round(0.75 * epochs)), "keep_checkpoints": 1,
                "max_steps": args.max_steps, "eval_batches": args.eval_batches},
        "data": data,
        "model": model,
        "optim": {"name": "adamw", "lr": args.lr, "weight_decay": 1e-4, "warmup_steps": 20 if not args.smoke else 0,
                  "clip_grad_norm": 1.0},
        "loop": {"precision": "auto", "global_batch": args.batch, "log_every": 20},
        "compare": {"enabled": True, "runs": strategies(model["forward_delay_steps"]),
                    "warmup_steps": 0 if args.smoke else 20},
    }


def earlier_accuracy(run_dir):
    """The final-step accuracy of the evaluation before the last one (metrics.jsonl), or None."""
    path = Path(run_dir) / "metrics.jsonl"
    evals = [json.loads(line) for line in path.read_text().splitlines() if '"eval"' in line] if path.is_file() else []
    return evals[-2]["accuracy_per_step"][-1] if len(evals) >= 2 else None


def run_job(job):
    """One `train_dynvision --compare` (every strategy, one dataset and seed) in this worker process."""
    dataset, seed, args, out_dir, data_root, overrides = job
    import torch
    torch.set_num_threads(1)
    import train_dynvision
    from lib import dist
    from lib.config import merge
    cfg = merge(merge(train_dynvision.Config(), job_config(dataset, seed, args, out_dir, data_root)), overrides)
    info = dist.setup(cfg.run.seed, cfg.run.device)
    torch.backends.cudnn.benchmark = True
    t0 = time.perf_counter()
    quiet = open(os.devnull, "w")
    saved, sys.stdout, sys.stderr = (sys.stdout, sys.stderr), quiet, quiet  # the JSON lines come from the parent
    try:
        results = train_dynvision.run_compare(cfg, info)
    finally:
        sys.stdout, sys.stderr = saved
        quiet.close()
    keep = ("final_accuracy", "mean_accuracy_after_reaction", "accuracy_per_step", "reaction_step", "steps",
            "train_seconds", "step_seconds", "peak_memory_gb", "memory_strategy", "update_every", "n_timesteps",
            "dt_ms")
    root = Path(cfg.run.out_dir) / cfg.run.name
    out = {name: {**{k: r.get(k) for k in keep}, "earlier_final_accuracy": earlier_accuracy(root / name)}
           for name, r in results.items()}
    return dataset, seed, out, time.perf_counter() - t0


def step_times_alone(dataset, args, out_dir, data_root):
    """Seconds per training step of every strategy, each alone on the device: one short compare run (seed 0), the
    first epoch (one-time costs) excluded."""
    n_train = 1797 - round(0.2 * 1797) if dataset == "digits" else args.train_samples
    first_epoch = n_train // args.batch
    overrides = {"run": {"name": f"{dataset}-timing", "max_steps": first_epoch + args.timing_steps, "eval_batches": 1,
                         "eval_every": 10 ** 6}}
    _, _, results, _ = run_job((dataset, 0, args, out_dir, data_root, overrides))
    return {name: r["step_seconds"] for name, r in results.items()}


def strategy_records(dataset, results, alone):
    """Per strategy of one dataset: lib/dynvision/report.strategy_rows plus the plateau check and the bars."""
    from lib.compare import mean_std
    from lib.dynvision.report import strategy_rows
    records = []
    for row in strategy_rows(results):
        name = row["run"]
        runs = [results[s][name] for s in results]
        gains = [100 * (r["final_accuracy"] - r["earlier_final_accuracy"]) for r in runs
                 if r.get("earlier_final_accuracy") is not None]
        exact = row["exact"]  # checkpoint / offload (and full): full BPTT's gradients of the default model
        d, c = row["minus_full_pt"], row["curve_correlation"]
        if name == "full":
            bar = None
        elif exact:
            bar = d is not None and abs(d) <= 0.5
        else:
            bar = d is not None and d >= -2.0 and c is not None and c >= 0.95
        records.append({
            "kind": "strategy", "dataset": dataset, "strategy": name, "exact": exact, "seeds": row["seeds"],
            "final_accuracy": [row["final_accuracy"], row["final_accuracy_std"]],
            "final_accuracy_per_seed": row["final_accuracy_per_seed"],
            "after_reaction_accuracy": row["after_reaction_accuracy"],
            "minus_full_pt": [d, row["minus_full_pt_std"]], "minus_full_p": row["minus_full_p"],
            "minus_full_pt_per_seed": row["minus_full_pt_per_seed"],
            "after_reaction_minus_full_pt": row["after_reaction_minus_full_pt"],
            "curve_correlation": c, "curve_correlation_min": row["curve_correlation_min"],
            "curve_max_abs_diff_pt": row["curve_max_abs_diff_pt"], "full_curve_range_pt": row["full_curve_range_pt"],
            "step_seconds": alone.get(name) if alone else row["step_seconds"],
            "step_seconds_measured": "alone on the device" if alone else "in the parallel runs (shared device)",
            "peak_memory_gb": row["peak_memory_gb"],
            "plateau_gain_pt": mean_std(gains)[0], "bar_met": bar})
    return records


def summarize(records, device, seconds, args):
    def pick(values, key):
        values = [v for v in values if v is not None]
        return round(key(values), 4) if values else None

    exact = [r for r in records if r["exact"] and r["strategy"] != "full"]
    approx = [r for r in records if not r["exact"]]
    others = [r for r in records if r["strategy"] != "full"]
    return {
        "summary": True,
        "worst_exact_minus_full_pt": pick([r["minus_full_pt"][0] for r in exact], lambda v: max(v, key=abs)),
        "worst_approx_minus_full_pt": pick([r["minus_full_pt"][0] for r in approx], min),
        "worst_curve_correlation": pick([r["curve_correlation"] for r in others], min),
        # a correlation with a flat curve (digits: full's accuracy moves < 1 pt after the reaction step) is noise;
        # the same minimum over the datasets whose full curve spans >= 2 pt, and the largest per-step gap to full
        "worst_curve_correlation_where_full_varies": pick([r["curve_correlation"] for r in others
                                                           if (r["full_curve_range_pt"] or 0) >= 2.0], min),
        "full_curve_range_pt": {r["dataset"]: r["full_curve_range_pt"] for r in records if r["strategy"] == "full"},
        "worst_curve_max_abs_diff_pt": {d: pick([r["curve_max_abs_diff_pt"] for r in others if r["dataset"] == d],
                                                max) for d in sorted({r["dataset"] for r in records})},
        "bars_missed": [f"{r['dataset']}/{r['strategy']}" for r in others if r["bar_met"] is False],
        "per_dataset": {d: {r["strategy"]: {"minus_full_pt": r["minus_full_pt"][0],
                                            "curve_correlation": r["curve_correlation"]} for r in others
                            if r["dataset"] == d} for d in sorted({r["dataset"] for r in records})},
        "full_plateau_gain_pt": {r["dataset"]: r["plateau_gain_pt"] for r in records if r["strategy"] == "full"},
        "seeds": args.seeds, "batch": args.batch, "epochs": {d: args.epochs or DATASETS[d][1]
                                                             for d in sorted({r["dataset"] for r in records})},
        "silhouettes_train_test": [args.train_samples, args.test_samples], "seconds": round(seconds, 1),
        "device": device,
    }


def plot(path, by_dataset):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lib.dynvision.report import plot_accuracy_per_step
    fig, axes = plt.subplots(1, len(by_dataset), figsize=(6.5 * len(by_dataset), 4), squeeze=False)
    for ax, (dataset, results) in zip(axes[0], by_dataset.items()):
        plot_accuracy_per_step(ax, results, title=f"{dataset}: held-out accuracy per timestep, "
                                                  f"mean of {len(results)} seed{'s' if len(results) > 1 else ''}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a tiny model, 1 seed, 2 steps: checks the script")
    parser.add_argument("--out", default="", help="also write the JSON lines to this file")
    parser.add_argument("--plot", default="", help="write the accuracy-per-timestep plot (PNG) here")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--datasets", default="digits,silhouettes")
    parser.add_argument("--epochs", type=int, default=0, help="override every dataset's epochs (0 = its own)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each run after this many steps (0 = all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW peak learning rate (cosine decay)")
    parser.add_argument("--train-samples", type=int, default=2500, help="silhouettes: training subset")
    parser.add_argument("--test-samples", type=int, default=2000, help="silhouettes: held-out images")
    parser.add_argument("--eval-batches", type=int, default=0, help="test batches per evaluation (0 = all)")
    parser.add_argument("--workers", type=int, default=0, help="parallel processes (0 = one per job, max 8)")
    parser.add_argument("--timing-steps", type=int, default=20, help="steps timed per strategy alone (0 = off)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--silhouettes", default=str(SILHOUETTES), help="path of animal_silhouettes.npz")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.max_steps, args.batch, args.eval_batches = 1, 1, 2, 32, 1
        args.train_samples, args.test_samples, args.device, args.workers, args.timing_steps = 64, 64, "cpu", 1, 0
    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    names = [d for d in args.datasets.split(",") if d]
    if "silhouettes" in names and not Path(args.silhouettes).is_file():
        if not args.smoke:  # a quality result must not quietly lose half its data
            sys.exit(f"error: {args.silhouettes} not found: pass --silhouettes=<path of animal_silhouettes.npz> "
                     f"or --datasets=digits")
        names.remove("silhouettes")  # the smoke run checks the script, on what this machine has
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("")
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    # run folders (a checkpoint per epoch, fsynced) in memory where there is room: ~20 MB per run
    import shutil
    shm = Path("/dev/shm")
    roomy = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4e9
    scratch = str(shm) if roomy else None
    by_dataset = {d: {s: {} for s in seeds} for d in names}
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        roots = {d: None for d in names}
        if "silhouettes" in names:
            roots["silhouettes"] = str(Path(tmp) / "silhouettes_split.npz")
            write_silhouettes(args.silhouettes, roots["silhouettes"], args.train_samples, args.test_samples)
        jobs = [(d, s, args, Path(tmp), roots[d], {}) for s in seeds for d in names]
        workers = args.workers or min(8, len(jobs))
        if workers == 1:
            finished = map(run_job, jobs)
        else:
            import multiprocessing
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            finished = pool.map(run_job, jobs)
        for dataset, seed, results, seconds in finished:
            for name, r in results.items():
                emit(args.out, kind="run", dataset=dataset, seed=seed, strategy=name,
                     **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
                        if k != "accuracy_per_step"},
                     accuracy_per_step=[round(a, 4) for a in r["accuracy_per_step"]])
            emit(args.out, kind="job_done", dataset=dataset, seed=seed, seconds=round(seconds, 1))
            by_dataset[dataset][seed] = results
        if workers != 1:
            pool.shutdown()
        alone = {}
        if args.timing_steps and workers > 1:
            for d in names:
                alone[d] = step_times_alone(d, args, Path(tmp), roots[d])
    records = []
    for d in names:
        for record in strategy_records(d, by_dataset[d], alone.get(d)):
            records.append(record)
            emit(args.out, **record)
    if args.plot:
        try:
            plot(args.plot, by_dataset)
        except Exception as e:  # the numbers are the result; a plot that fails is reported
            print(f"plot skipped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    emit(args.out, **summarize(records, device_name, time.perf_counter() - t0, args))


if __name__ == "__main__":
    main()
