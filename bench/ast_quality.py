"""Does AST beat its own controls on real held-out data? full / AST / random / budget, same backward samples.

    python bench/ast_quality.py --out=docs/bench/ast_quality.jsonl    # GPU, ~5 min: runs as parallel processes
    python bench/ast_quality.py --smoke                               # CPU, seconds: checks the script runs

Two real datasets the project has offline: scikit-learn's digits (1797 8x8 images, 10 classes) and the animal
silhouettes in ../shared/data/ (10,000 28x28 images, 10 classes; skipped with a note if absent). Each is split
into train / held-out test by the seed. For every (dataset, recipe, seed) one `train_ast.py --compare` runs
(the real code path, `train_ast.run_compare`) with the variants `full` and, per mode (batch, epoch) and target
rate (10%, 30%): `ast` (the default policies), `random` (matched to the AST run's per-step / per-epoch sample
counts) and `budget` (full data, cut to the AST run's backward samples). `--policies` adds AST variants with
other selection policies (e.g. `epoch:top,batch:top`, the policies before issue 20) to the same compare runs.

Recipes (learning rates for short sparse runs; a sparse run takes fewer optimizer steps than `full`, and its
schedule spans its own steps): `sgd` lr 0.02, `adamw` lr 3e-3, and `sgd_warm` lr 0.05 with 50 warm-up steps,
the recipe under which the controls train well and the pre-issue-20 batch mode collapsed.

Output: one JSON line per trained variant, one per (dataset, recipe, mode, rate) cell with mean +- std over
seeds and the paired AST - control difference per seed, then the summary: {"summary": true,
"ast_minus_random_pt_batch": x, "ast_minus_random_pt_epoch": y, "ast_minus_full_pt_epoch": z,
"ast_minus_random_pt_high_lr": h, ...}: x, y the worst cell mean over datasets, recipes sgd/adamw and rates;
z the worst epoch-mode AST - full, per (dataset, recipe) at the highest rate whose AST run used <= 40% of full's
backward samples over the whole run (30% here; the 10% figure is reported as ast_minus_full_pt_epoch_10); h batch mode AST - random under sgd_warm (worst over datasets and rates). Bars: x, y, h >= 0, z >= -1.
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SILHOUETTES = REPO.parent / "shared" / "data" / "animal_silhouettes.npz"

DATASETS = {
    # name: data overrides, epochs, final full epochs fraction
    "digits": ({"name": "digits", "loader": "resident"}, 30, 0.05),
    "silhouettes": ({"name": "npz", "root": str(SILHOUETTES), "loader": "resident"}, 20, 0.05),
}
RECIPES = {
    "sgd": {"name": "sgd", "lr": 0.02, "warmup_steps": 0, "weight_decay": 5e-4},
    "adamw": {"name": "adamw", "lr": 3e-3, "warmup_steps": 0, "weight_decay": 5e-4},
    "sgd_warm": {"name": "sgd", "lr": 0.05, "warmup_steps": 50, "weight_decay": 5e-4},
}
RATES = (0.1, 0.3)
MODES = ("batch", "epoch")
MAX_BACKWARD_FRACTION_Z = 0.4


def emit(out, **record):
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def variants(policies, modes=MODES, rates=RATES):
    """Compare runs of one group: full + per (mode, rate) the default AST run, its random and budget controls, and
    one AST run per extra policy."""
    runs = {"full": {"ast": {"mode": "full"}}}
    for mode in modes:
        for rate in rates:
            tag = f"{mode}{round(rate * 100)}"
            ast = {"mode": mode, "controller": {"target_rate": rate}}
            runs[f"ast_{tag}"] = {"ast": ast}
            runs[f"random_{tag}"] = {"ast": {**ast, "mode": "random", "match": f"ast_{tag}"}}
            runs[f"budget_{tag}"] = {"ast": {**ast, "mode": "budget", "budget_of": f"ast_{tag}"}}
            for spec in policies:  # mode:policy[:key=value...], e.g. epoch:importance:uniform_mix=0.1
                pmode, policy, *settings = spec.split(":")
                if pmode != mode:
                    continue
                extra = {}
                for setting in settings:
                    key, value = setting.split("=")
                    extra[key] = json.loads(value)
                name = "-".join([policy] + [s.replace("=", "") for s in settings])
                runs[f"{name}_{tag}"] = {"ast": {**ast, f"{mode}_policy": policy, **extra}}
    return runs


def group_config(dataset, recipe, seed, args, out_dir):
    data, epochs, final_full = DATASETS[dataset]
    if dataset == "silhouettes":
        data = {**data, "root": args.silhouettes}
    return {
        "run": {"name": f"{dataset}-{recipe}-s{seed}", "out_dir": str(out_dir), "seed": seed, "device": args.device,
                "epochs": args.epochs or epochs, "eval_every": 1000, "resume": "none"},
        "data": data,
        "model": {"name": "small_cnn", "width": args.width},
        "optim": RECIPES[recipe],
        "loop": {"precision": "fp32", "global_batch": 64, "log_every": 50},
        "ast": {"score_batch": 256, "warmup_epochs": 1, "final_full_fraction": final_full},
        "compare": {"enabled": True, "runs": variants(args.policies, args.modes, args.rates)},
    }


def run_group(job):
    """One compare run in this (worker) process; returns its variants' measured summaries."""
    dataset, recipe, seed, args, out_dir = job
    import torch
    torch.set_num_threads(1)
    import train_ast
    from lib import dist
    from lib.config import merge
    cfg = merge(train_ast.Config(), group_config(dataset, recipe, seed, args, out_dir))
    info = dist.setup(cfg.run.seed, cfg.run.device)
    t0 = time.perf_counter()
    quiet = open(os.devnull, "w")
    # the script's progress lines and bars; the JSON lines come from the parent, errors reach it through the pool
    saved, sys.stdout, sys.stderr = (sys.stdout, sys.stderr), quiet, quiet
    try:
        results = train_ast.run_compare(cfg, info)
    finally:
        sys.stdout, sys.stderr = saved
        quiet.close()
    keep = ("mode", "top1", "backward_samples", "forward_samples", "activation_rate", "train_seconds", "steps")
    return dataset, recipe, seed, {name: {k: r.get(k) for k in keep} for name, r in results.items()}, \
        time.perf_counter() - t0


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cells(records, seeds):
    """Per (dataset, recipe, mode, rate): means, stds and paired per-seed differences, in points."""
    out = []
    by = {(r["dataset"], r["recipe"], r["seed"], r["variant"]): r for r in records}
    groups = sorted({(r["dataset"], r["recipe"]) for r in records})
    for dataset, recipe in groups:
        full = [by.get((dataset, recipe, s, "full")) for s in seeds]
        for mode in MODES:
            for rate in RATES:
                tag = f"{mode}{round(rate * 100)}"
                if not any(r["variant"] == f"ast_{tag}" for r in records):
                    continue
                names = sorted({r["variant"] for r in records if r["variant"].endswith("_" + tag)})
                cell = {"kind": "cell", "dataset": dataset, "recipe": recipe, "mode": mode, "rate": rate}
                rows = {name: [by.get((dataset, recipe, s, name)) for s in seeds] for name in names}
                rows["full"] = full
                for name, rs in rows.items():
                    m, sd = mean_std([100 * r["top1"] for r in rs if r])
                    cell[f"{name.removesuffix('_' + tag)}_top1"] = [m, sd]
                ast = rows.get(f"ast_{tag}", [])
                frac = [r["backward_samples"] / f["backward_samples"] for r, f in zip(ast, full) if r and f]
                cell["ast_backward_fraction"] = statistics.fmean(frac) if frac else None
                for control in ("random", "budget", "full"):
                    other = rows.get(f"{control}_{tag}") if control != "full" else full
                    diffs = [100 * (a["top1"] - b["top1"]) for a, b in zip(ast, other or []) if a and b]
                    cell[f"ast_minus_{control}_per_seed"] = [round(d, 2) for d in diffs]
                    cell[f"ast_minus_{control}_pt"] = mean_std(diffs)
                for name in names:  # extra policies against random
                    policy = name.removesuffix("_" + tag)
                    if policy in ("ast", "random", "budget"):
                        continue
                    diffs = [100 * (a["top1"] - b["top1"]) for a, b in zip(rows[name], rows.get(f"random_{tag}", []))
                             if a and b]
                    cell[f"{policy}_minus_random_pt"] = mean_std(diffs)
                out.append(cell)
    return out


def full_gap_at_budget(cell_list):
    """Epoch-mode AST - full per (dataset, recipe), at the highest rate whose AST run used <= 40% of full's backward
    samples over the whole run (warm-up and final full epochs included)."""
    best = {}
    for c in cell_list:
        if c["mode"] != "epoch" or c["ast_backward_fraction"] is None or \
                c["ast_backward_fraction"] > MAX_BACKWARD_FRACTION_Z:
            continue
        key = (c["dataset"], c["recipe"])
        if key not in best or c["rate"] > best[key]["rate"]:
            best[key] = c
    return [c["ast_minus_full_pt"][0] for c in best.values()]


def summarize(cell_list, device, seconds, args):
    def worst(values):
        values = [v for v in values if v is not None]
        return round(min(values), 2) if values else None

    regular = [c for c in cell_list if c["recipe"] != "sgd_warm"]
    summary = {
        "summary": True,
        "ast_minus_random_pt_batch": worst(c["ast_minus_random_pt"][0] for c in regular if c["mode"] == "batch"),
        "ast_minus_random_pt_epoch": worst(c["ast_minus_random_pt"][0] for c in regular if c["mode"] == "epoch"),
        "ast_minus_full_pt_epoch": worst(full_gap_at_budget(regular)),
        "ast_minus_full_pt_epoch_10": worst(c["ast_minus_full_pt"][0] for c in regular
                                            if c["mode"] == "epoch" and c["rate"] == 0.1),
        "ast_minus_random_pt_high_lr": worst(c["ast_minus_random_pt"][0] for c in cell_list
                                             if c["recipe"] == "sgd_warm" and c["mode"] == "batch"),
        "ast_minus_budget_pt_batch": worst(c["ast_minus_budget_pt"][0] for c in regular if c["mode"] == "batch"),
        "ast_minus_budget_pt_epoch": worst(c["ast_minus_budget_pt"][0] for c in regular if c["mode"] == "epoch"),
        "ast_minus_random_pt_epoch_high_lr": worst(c["ast_minus_random_pt"][0] for c in cell_list
                                                   if c["recipe"] == "sgd_warm" and c["mode"] == "epoch"),
        "seeds": args.seeds, "datasets": sorted({c["dataset"] for c in cell_list}),
        "recipes": sorted({c["recipe"] for c in cell_list}), "seconds": round(seconds, 1), "device": device,
    }
    bars = {"ast_minus_random_pt_batch": 0.0, "ast_minus_random_pt_epoch": 0.0, "ast_minus_full_pt_epoch": -1.0,
            "ast_minus_random_pt_high_lr": 0.0}
    summary["bars_met"] = {k: (summary[k] is not None and summary[k] >= v) for k, v in bars.items()}
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, one seed, digits, 2 epochs: checks the script")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ...")
    parser.add_argument("--datasets", default="digits,silhouettes")
    parser.add_argument("--recipes", default="sgd,adamw,sgd_warm")
    parser.add_argument("--modes", default="batch,epoch", help="AST modes to compare")
    parser.add_argument("--rates", default="0.1,0.3", help="target activation rates")
    parser.add_argument("--policies", default="", help="extra AST variants, e.g. epoch:top,epoch:infobatch,batch:top")
    parser.add_argument("--workers", type=int, default=0, help="parallel processes (0 = cores - 2, max 14)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=0, help="override every dataset's epochs (0 = its own)")
    parser.add_argument("--width", type=int, default=16, help="small_cnn width")
    parser.add_argument("--silhouettes", default=str(SILHOUETTES), help="path of animal_silhouettes.npz")
    args = parser.parse_args()
    args.policies = [p for p in args.policies.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    if args.smoke:
        args.seeds, args.datasets, args.recipes, args.epochs, args.width = 1, "digits", "sgd", 3, 8
        args.rates = [0.3]
        args.device, args.workers = "cpu", 1
    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    args.device = device
    names = [d for d in args.datasets.split(",") if d]
    if "silhouettes" in names and not Path(args.silhouettes).is_file():
        print(f"note: {args.silhouettes} not found: the silhouettes dataset is skipped", flush=True)
        names.remove("silhouettes")
    recipes = [r for r in args.recipes.split(",") if r]
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("")
    workers = args.workers or max(1, min(14, (os.cpu_count() or 2) - 2))
    t0 = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(d, r, s, args, Path(tmp)) for s in seeds for d in names for r in recipes]
        if workers == 1:
            finished = map(run_group, jobs)
        else:
            import multiprocessing
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            finished = pool.map(run_group, jobs)
        for dataset, recipe, seed, results, seconds in finished:
            full = results["full"]["backward_samples"]
            for name, r in results.items():
                rec = {"kind": "run", "dataset": dataset, "recipe": recipe, "seed": seed, "variant": name, **r,
                       "backward_fraction": r["backward_samples"] / full}
                records.append(rec)
                emit(args.out, **rec)
            emit(args.out, kind="group_done", dataset=dataset, recipe=recipe, seed=seed, seconds=round(seconds, 1))
        if workers != 1:
            pool.shutdown()
    for cell in cells(records, seeds):
        emit(args.out, **cell)
    emit(args.out, **summarize(cells(records, seeds), device_name, time.perf_counter() - t0, args))


if __name__ == "__main__":
    main()
