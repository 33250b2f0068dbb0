"""Reading a comparison of training runs: paired statistics, the verdict line, compare.md / compare.csv / per_class.csv.

Every number comes from what the runs measured in the same invocation: their result.json summaries and their
per-sample test results (test_predictions.npz: whether each test sample was classified correctly, its label; or
its absolute and squared error in target units for regression, where MAE is the metric and lower is better). Two
runs evaluated on the same test set are compared sample by sample, so the uncertainty of one seed's accuracy
difference is the paired standard error over the test samples; with several seeds it is the spread of the per-seed
differences and a paired t-test on them.
"""
import csv
import json
import math
from pathlib import Path

import numpy as np

from lib.stats import paired_difference, paired_t_test, per_class_accuracy

PREDICTIONS_FILE = "test_predictions.npz"
AST_MODES = ("batch", "epoch")
# a measured speedup above 1 / activation_rate (with this slack for timer noise) cannot come from training fewer
# samples: it means one-time costs (CUDA start, cuDNN autotuning) were charged to the baseline
IMPOSSIBLE_SLACK = 1.05


# ----------------------------------------------------------------------------- loading
def save_predictions(run_dir, per_sample):
    """Write the per-sample test results (dict of arrays in test-set order) next to result.json, atomically."""
    from lib.storage import atomic_write_bytes
    import io
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in per_sample.items()})
    atomic_write_bytes(Path(run_dir) / PREDICTIONS_FILE, buffer.getvalue())


def load_predictions(run_dir):
    """The per-sample test results of a run, or None if it wrote none (or they are unreadable)."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- the report
def _metric(results):
    """(name, sign): top1 (+1, higher is better) for classification, mae (-1, lower is better) for regression."""
    summaries = [r for per_seed in results.values() for r in per_seed.values()]
    if any(r.get("top1") is not None for r in summaries):
        return "top1", 1.0
    return ("mae", -1.0) if any(r.get("mae") is not None for r in summaries) else ("mse", -1.0)


def _per_sample_key(metric):
    return {"top1": "correct", "mae": "abs_error"}.get(metric, "squared_error")


def _units(results):
    """The regression targets' units ('km'), or '' when the runs do not say."""
    units = next((r.get("target_units") for per in results.values() for r in per.values() if r.get("target_units")),
                 None)
    return "/".join(dict.fromkeys(units)) if units else ""


def baseline_of(name, runs):
    """The full-data baseline run `name` is measured against, among `runs` ({name: summary} of one seed):
    `<prefix>_full` for a run named `<prefix>_<anything>` when such a run exists (one baseline per architecture in
    a sweep), else `full`; None when there is none."""
    if "_" in name:
        prefixed = name.rsplit("_", 1)[0] + "_full"
        if prefixed in runs and runs[prefixed]["mode"] == "full":
            return prefixed
    return "full" if "full" in runs and runs["full"]["mode"] == "full" else None


def _comparisons(results, predictions):
    """(ast_name, control_name, kind) for every AST run and each control that refers to it, plus `full`."""
    names = list(next(iter(results.values())))
    first = next(iter(results.values()))
    pairs = []
    for name in names:
        if first[name]["mode"] not in AST_MODES:
            continue
        for other in names:
            r = first[other]
            if r["mode"] == "random" and r.get("match") == name:
                pairs.append((name, other, "random"))
            elif r["mode"] == "budget" and r.get("budget_of") == name:
                pairs.append((name, other, "budget"))
            elif r["mode"] == "curriculum" and r.get("match") == name:
                pairs.append((name, other, "curriculum"))
        base = baseline_of(name, first)
        if base is not None:
            pairs.append((name, base, "full"))
    return pairs


def compare_pair(results, predictions, ast_name, control, metric, sign):
    """Difference ast - control in points (accuracy) or raw units (MSE, sign-flipped so > 0 means AST is better):
    per seed, its mean, spread and test; with one seed the paired standard error over the test samples."""
    scale = 100.0 if metric == "top1" else 1.0
    per_seed = []
    for seed, runs in results.items():
        a, b = runs.get(ast_name, {}).get(metric), runs.get(control, {}).get(metric)
        if a is not None and b is not None:
            per_seed.append(sign * scale * (a - b))
    out = {"ast": ast_name, "control": control, "per_seed": [round(d, 3) for d in per_seed]}
    mean, std, t, p = paired_t_test(per_seed)
    out.update(mean=mean, std=std, t=t, p=p, seeds=len(per_seed), se=None, test="paired t-test over seeds")
    if len(per_seed) == 1:
        seed = next(iter(results))
        pa, pb = predictions.get((seed, ast_name)), predictions.get((seed, control))
        key = _per_sample_key(metric)
        if pa is not None and pb is not None and key in pa and key in pb and len(pa[key]) == len(pb[key]):
            _, se = paired_difference(pa[key], pb[key])
            out.update(se=None if se is None else scale * se, std=None,
                       test=f"paired standard error over {len(pa[key])} test samples, one seed")
    return out


def verdict_line(pair, metric, units=""):
    """One sentence: does AST beat the control, by how much, with what uncertainty."""
    unit = {"top1": "pt", "mae": f"{units + ' ' if units else ''}MAE"}.get(metric, "(MSE)")
    mean = pair["mean"]
    if mean is None:
        return f"{pair['ast']} vs {pair['control']}: no comparable results."
    spread = pair["se"] if pair["seeds"] == 1 else pair["std"]
    spread_text = f" ± {spread:.2f}" if spread is not None else ""
    if pair["seeds"] > 1 and pair["p"] is not None:
        evidence = pair["p"] < 0.05 and mean > 0
        detail = f"mean ± std of the paired differences over {pair['seeds']} seeds {pair['per_seed']}; paired " \
                 f"t-test t = {pair['t']:.2f}, p = {pair['p']:.3f}"
    elif pair["seeds"] == 1 and spread:
        evidence = mean > 2 * spread
        detail = pair["test"] + "; run --compare.seeds=3 for the spread over seeds"
    else:
        evidence = False
        detail = f"{pair['seeds']} seed(s), no spread available"
    better = "" if metric == "top1" else " lower (lower is better)"
    amount = f"{mean:+.2f}{spread_text} {unit}{better}"
    if mean <= 0:
        return f"**{pair['ast']} does not beat {pair['control']}**: {amount} ({detail})."
    if evidence:
        return f"**{pair['ast']} beats {pair['control']}** by {amount} ({detail})."
    return f"**{pair['ast']} is ahead of {pair['control']}, but not clearly**: {amount} ({detail})."


def activation_line(name, runs):
    """The AST run's activation rate over the whole run next to its target, with what explains the gap."""
    rates = [r["activation_rate"] for r in runs.values() if r.get("activation_rate") is not None]
    r0 = next(iter(runs.values()))
    target = r0.get("target_rate")
    if not rates or target is None:
        return ""
    whole = sum(rates) / len(rates)
    sparse = [r.get("sparse_activation_rate") for r in runs.values() if r.get("sparse_activation_rate") is not None]
    full_epochs = r0.get("full_data_epochs", 0)
    text = f"{name} trained {100 * whole:.1f}% of the samples offered over the whole run (target {100 * target:.0f}%)"
    if full_epochs:
        which = "the warm-up" if r0.get("mode") == "batch" else "warm-up and final"
        text += f": {full_epochs} of its {r0.get('epochs')} epochs ({which}) train on all data"
        if sparse:
            text += f", the sparse epochs ran at {100 * sum(sparse) / len(sparse):.1f}%"
    elif sparse:
        text += f"; its sparse steps ran at {100 * sum(sparse) / len(sparse):.1f}%"
    if r0.get("mode") == "batch":
        text += "; batch mode also ran a no-grad scoring forward over every offered sample"
    return text + "."


def mean_std(values):
    """(mean, sample std) of the values that are not None; std None below two values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return mean, std


def _speedup(runs, full_runs):
    """Whole-run speedup vs full per seed, mean over seeds (None without a full run)."""
    values = [full_runs[s]["train_seconds"] / r["train_seconds"] for s, r in runs.items()
              if full_runs and s in full_runs and r.get("train_seconds")]
    return sum(values) / len(values) if values else None


def write_comparison(root, results, predictions, say=print):
    """compare.md, compare.csv, per_class.csv (+ plots) from results {seed: {name: summary}} and per-sample
    predictions {(seed, name): arrays}. Returns the verdict lines."""
    root = Path(root)
    metric, sign = _metric(results)
    seeds = list(results)
    names = list(results[seeds[0]])
    by_name = {name: {s: results[s][name] for s in seeds if name in results[s]} for name in names}
    rows = []
    for name in names:
        runs = by_name[name]
        first = next(iter(runs.values()))
        m, sd = mean_std([r.get(metric) for r in runs.values()])
        m5, _ = mean_std([r.get("top5") for r in runs.values()])
        base = baseline_of(name, results[seeds[0]])
        speedup = 1.0 if first["mode"] == "full" else (_speedup(runs, by_name[base]) if base else None)
        rate = mean_std([r["activation_rate"] for r in runs.values()])[0]
        flag = ""
        if speedup and rate and speedup > IMPOSSIBLE_SLACK / rate:
            flag = "impossible (> 1 / activation rate: one-time costs charged to full?)"
        rows.append({"run": name, "mode": first["mode"], metric: m, f"{metric}_std": sd, "top5": m5,
                     "rmse": mean_std([r.get("rmse") for r in runs.values()])[0],
                     "memory_fallback": "; ".join(dict.fromkeys(t for r in runs.values()
                                                                for t in r.get("changed_by_fallback") or [])),
                     "train_seconds": mean_std([r["train_seconds"] for r in runs.values()])[0],
                     "forward_samples": mean_std([r["forward_samples"] for r in runs.values()])[0],
                     "backward_samples": mean_std([r["backward_samples"] for r in runs.values()])[0],
                     "activation_rate": rate, "speedup_vs_full": speedup, "speedup_note": flag,
                     "energy_j": mean_std([r.get("energy_j") for r in runs.values()])[0]})
    per_class = _per_class_table(results, predictions, names, metric)
    for row in rows:
        row.update(per_class["summary"].get(row["run"], {}))
    pairs = [compare_pair(results, predictions, a, c, metric, sign) for a, c, _ in _comparisons(results, predictions)]
    units = _units(results)
    verdicts = [verdict_line(p, metric, units) for p in pairs]
    activations = [activation_line(name, by_name[name]) for name in names
                   if next(iter(by_name[name].values()))["mode"] in AST_MODES]

    show_top5 = any(r.get("top5") is not None and r.get("num_classes", 0) > 10
                    for per_seed in results.values() for r in per_seed.values())
    keys = ["run", "mode", metric] + ([f"{metric}_std"] if len(seeds) > 1 else []) + (["top5"] if show_top5 else []) + \
        (["rmse"] if metric == "mae" else []) + \
        ["train_seconds", "forward_samples", "backward_samples", "activation_rate", "speedup_vs_full", "energy_j"] + \
        (["memory_fallback"] if any(r["memory_fallback"] for r in rows) else [])
    class_keys = [k for k in ("worst_class", "worst_class_top1", "classes_better_than_full",
                              "classes_worse_than_full") if any(k in r for r in rows)]
    _write_csv(root, rows, keys + class_keys + ["speedup_note"], results, metric)
    _write_per_class_csv(root, per_class)
    table = _markdown_table(rows, keys, metric, units)
    notes = [r["run"] + ": " + r["speedup_note"] for r in rows if r["speedup_note"]]
    seeds_text = f"{len(seeds)} seeds ({', '.join(str(s) for s in seeds)}), mean over seeds" if len(seeds) > 1 \
        else f"seed {seeds[0]}"
    text = (f"# Comparison: {root.name}\n\nAll numbers measured in this run ({seeds_text}; same machine, one variant "
            f"after another). train_seconds is the whole run's training wall-clock (warm-up and final full epochs "
            f"included, evaluation excluded) and speedup_vs_full is full's over this run's; forward_samples includes "
            f"batch mode's scoring forward; energy is the GPU driver's counter (NVML), 'not measured' where there is "
            f"none."
            + (f" Regression: test MAE and RMSE in target units ({units or 'as stored'}), lower is better."
               if metric == "mae" else "")
            + (" memory_fallback lists the out-of-memory fallbacks that changed a run's model or data "
               "(lib/fallback.py; config.yaml holds the effective settings)." if "memory_fallback" in keys else "")
            + f"\n\n{table}\n")
    if notes:
        text += "\n" + "\n".join(f"- speedup flagged {n}" for n in notes) + "\n"
    if per_class["lines"]:
        text += "\n" + "\n".join(per_class["lines"]) + "\n"
    text += "\n## Verdict\n\n" + "\n".join(f"- {a}" for a in activations if a) + "\n" + \
        "\n".join(f"- {v}" for v in verdicts) + "\n"
    record = experiment_record(root, results, rows, pairs, metric)
    if record:
        import yaml
        dumped = yaml.safe_dump(record, sort_keys=False, allow_unicode=True, width=110)
        (root / "experiment.yaml").write_text(dumped)
        text += "\n## Experiment record (experiment.yaml)\n\n```yaml\n" + dumped + "```\n"
    (root / "compare.md").write_text(text)
    (root / "compare.json").write_text(json.dumps({"metric": metric, "seeds": seeds, "rows": rows, "pairs": pairs},
                                                  indent=2, default=str))
    say(table)
    for v in verdicts:
        say(v.replace("**", ""))
    try:
        plot_comparison(root, results, per_class, metric)
    except Exception as e:  # a plot never fails a run
        say(f"plots skipped: {type(e).__name__}: {e}")
    return verdicts


STABILITY_RULE = ("stable = no step skipped for a non-finite loss, the final test metric within 1 pt (accuracy) of "
                  "the best point of the run's curve, and (batch mode) the logged activation rate over the second half "
                  "of training within 2.5 pp of the target on average")


def _train_records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _convergence(summary, metric):
    """'stable' or 'unstable (why)' by STABILITY_RULE, from the run's own log and curve."""
    reasons = []
    if summary.get("nonfinite_skipped"):
        reasons.append(f"{summary['nonfinite_skipped']} non-finite steps skipped")
    curve = [c.get(metric) for c in summary.get("curve", []) if c.get(metric) is not None]
    if curve and metric == "top1" and max(curve) - curve[-1] > 0.01:
        reasons.append(f"final {100 * curve[-1]:.2f}% vs best {100 * max(curve):.2f}%")
    if summary.get("mode") == "batch":
        logged = [r for r in _train_records(summary.get("run_dir", "")) if "activation_rate" in r]
        half = logged[len(logged) // 2:]
        if half and summary.get("target_rate"):
            rate = sum(r["activation_rate"] for r in half) / len(half)
            if abs(rate - summary["target_rate"]) > 0.025:
                reasons.append(f"activation rate {100 * rate:.1f}% vs target {100 * summary['target_rate']:.0f}%")
    return "stable" if not reasons else "unstable (" + "; ".join(reasons) + ")"


def _threshold_range(summary):
    """[min, max] of the selection threshold the run logged (score units), or 'not logged'."""
    values = [r["threshold"] for r in _train_records(summary.get("run_dir", ""))
              if r.get("kind") in ("train", "epoch_plan") and isinstance(r.get("threshold"), (int, float))
              and math.isfinite(r["threshold"])]
    return [round(min(values), 6), round(max(values), 6)] if values else "not logged"


def experiment_record(root, results, rows, pairs, metric):
    """The validation plan's experiment template, one entry per AST run, filled only with measured values."""
    import yaml
    by_row = {r["run"]: r for r in rows}
    seed = next(iter(results))
    entries = []
    for name, summary in results[seed].items():
        if summary["mode"] not in AST_MODES:
            continue
        run_dir = Path(summary.get("run_dir", root / name))
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
        info = json.loads((run_dir / "run_info.json").read_text()) if (run_dir / "run_info.json").is_file() else {}
        base = baseline_of(name, results[seed])
        row, full = by_row[name], by_row.get(base)
        ast_runs = [results[s][name] for s in results if name in results[s]]
        full_runs = [results[s][base] for s in results if base in results[s]]
        energy = "not measured"
        if full and row.get("energy_j") and full.get("energy_j"):
            energy = round(1 - row["energy_j"] / full["energy_j"], 4)
        ctrl = cfg.get("ast", {}).get("controller", {})
        entry = {
            "run": name, "architecture": cfg.get("model", {}).get("name"), "dataset": cfg.get("data", {}).get("name"),
            "target_activation": summary.get("target_rate"), "batch_size": cfg.get("loop", {}).get("global_batch"),
            "score_batch": cfg.get("ast", {}).get("score_batch") if summary["mode"] == "batch" else None,
            "epochs": summary.get("epochs"), "hardware": info.get("device_name", "unknown"),
            "mode": summary["mode"],
            "selection": cfg.get("ast", {}).get(f"{summary['mode']}_policy"),
            "pi_gains": {"kp": ctrl.get("kp"), "ki": ctrl.get("ki")} if summary["mode"] == "batch" else "not used",
            "seeds": list(results), "baseline": base or "none",
            f"baseline_{metric}": full[metric] if full else "not measured",
            f"ast_{metric}": row[metric],
            f"ast_{metric}_per_seed": [r.get(metric) for r in ast_runs],
            f"baseline_{metric}_per_seed": [r.get(metric) for r in full_runs],
            "training_time_s": row["train_seconds"], "baseline_training_time_s": full["train_seconds"] if full else None,
            "speedup": row["speedup_vs_full"] if row["speedup_vs_full"] is not None else "not measured",
            "energy_savings": energy,
            "average_activation_rate": row["activation_rate"],
            "threshold_range": _threshold_range(summary),
            "convergence": [_convergence(r, metric) for r in ast_runs],
            "convergence_rule": STABILITY_RULE,
            "versus": {p["control"]: {"mean": p["mean"], "std": p["std"], "se": p["se"], "per_seed": p["per_seed"],
                                      "t": p["t"], "p": p["p"], "test": p["test"]}
                       for p in pairs if p["ast"] == name},
            "notes": "every value measured in this comparison; accuracy in [0, 1], differences in points (pt)",
        }
        entries.append(entry)
    return {"experiments": entries} if entries else None


def _fmt(k, v, metric):
    if v is None or v == "":
        return "not measured" if k == "energy_j" else "-"
    if k in ("top1", "top5", "activation_rate", "top1_std", "worst_class_top1"):
        return f"{100 * v:.2f}%"
    if k in ("train_seconds", "energy_j"):
        return f"{v:.1f}"
    if k == "speedup_vs_full":
        return f"{v:.2f}x"
    if isinstance(v, float):
        return f"{v:.4g}" if k not in ("forward_samples", "backward_samples") else f"{v:.0f}"
    return str(v)


def markdown_table(rows, keys, fmt, headers=None):
    """A markdown table of `rows` (dicts), one column per key; fmt(key, value) -> the cell's text; headers: {key:
    the column's title} where it differs from the key."""
    headers = headers or {}
    lines = ["| " + " | ".join(headers.get(k, k) for k in keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(k, row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _markdown_table(rows, keys, metric, units=""):
    suffix = f" ({units})" if units else ""
    headers = {"mae": f"test MAE{suffix}", "rmse": f"test RMSE{suffix}", "mae_std": f"MAE std{suffix}"}
    return markdown_table(rows, keys, lambda k, v: _fmt(k, v, metric), headers)


def _write_csv(root, rows, keys, results, metric):
    with open(root / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("not measured" if k == "energy_j" and row.get(k) is None else row.get(k))
                             for k in keys})
    if len(results) > 1:  # one row per (seed, run): what the means above were taken over
        with open(root / "compare_per_seed.csv", "w", newline="") as f:
            fields = ["seed", "run", "mode", metric, "train_seconds", "backward_samples", "activation_rate"]
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            for seed, runs in results.items():
                for name, r in runs.items():
                    writer.writerow({"seed": seed, "run": name, **r})


def _per_class_table(results, predictions, names, metric):
    """Per-class accuracy of every run (mean over seeds) and how the AST runs gain or lose against full."""
    out = {"classes": [], "by_run": {}, "summary": {}, "lines": []}
    if metric != "top1":
        return out
    num_classes = max((r.get("num_classes", 0) for per in results.values() for r in per.values()), default=0)
    class_names = next((r.get("classes") for per in results.values() for r in per.values() if r.get("classes")), None)
    for name in names:
        accs = []
        for seed in results:
            pred = predictions.get((seed, name))
            if pred is not None and "correct" in pred and "label" in pred:
                accs.append(per_class_accuracy(pred["correct"], pred["label"], num_classes))
        if accs:
            out["by_run"][name] = np.nanmean(np.stack(accs), axis=0)
    if not out["by_run"]:
        return out
    out["classes"] = list(class_names) if class_names and len(class_names) == num_classes else \
        [str(c) for c in range(num_classes)]
    first = results[next(iter(results))]
    out["baseline"] = {n: baseline_of(n, first) for n in out["by_run"] if first[n]["mode"] != "full"}
    for name, acc in out["by_run"].items():
        base = out["baseline"].get(name)
        full = out["by_run"].get(base) if base else None
        worst = int(np.nanargmin(acc)) if np.isfinite(acc).any() else None
        summary = {"worst_class": out["classes"][worst] if worst is not None else None,
                   "worst_class_top1": float(acc[worst]) if worst is not None else None}
        if full is not None and first[name]["mode"] != "full":
            diff = acc - full
            summary["classes_better_than_full"] = int(np.sum(diff > 0))
            summary["classes_worse_than_full"] = int(np.sum(diff < 0))
        out["summary"][name] = summary
    lines = []
    for name, summary in out["summary"].items():
        if "classes_better_than_full" in summary:
            lines.append(f"- per class, {name} vs {out['baseline'][name]}: {summary['classes_better_than_full']} "
                         f"classes better, "
                         f"{summary['classes_worse_than_full']} worse; its worst class is {summary['worst_class']} "
                         f"({100 * summary['worst_class_top1']:.1f}%)")
    if lines:
        out["lines"] = ["## Per class (per_class.csv, per_class.png)", ""] + lines
    return out


def _write_per_class_csv(root, per_class):
    """per_class.csv: one row per class, the accuracy of every run (mean over seeds) and each run minus its
    full-data baseline."""
    if not per_class["by_run"]:
        return
    runs = list(per_class["by_run"])
    pairs = [(n, b) for n, b in per_class.get("baseline", {}).items() if b in per_class["by_run"]]
    with open(Path(root) / "per_class.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class"] + runs + [f"{n}_minus_{b}" for n, b in pairs])
        for c, label in enumerate(per_class["classes"]):
            writer.writerow([label] + [f"{per_class['by_run'][n][c]:.4f}" for n in runs] +
                            [f"{per_class['by_run'][n][c] - per_class['by_run'][b][c]:+.4f}" for n, b in pairs])


def plot_comparison(root, results, per_class, metric):
    """accuracy_vs_time.png, controller.png and per_class.png (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    root = Path(root)
    seed = next(iter(results))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results[seed].items():
        curve = r.get("curve") or []
        ax.plot([c["train_seconds"] for c in curve], [c.get(metric) for c in curve], marker="o", label=name)
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel(f"test {metric}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(root / "accuracy_vs_time.png", dpi=100)
    plt.close(fig)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for name, r in results[seed].items():
        path = Path(r.get("run_dir", root / name)) / "metrics.jsonl"
        if not path.is_file():
            continue
        rec = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rec = [x for x in rec if x.get("kind") == "train" and "activation_rate" in x]
        if rec:
            ax1.plot([x["step"] for x in rec], [x["threshold"] for x in rec], label=name)
            ax2.plot([x["step"] for x in rec], [x["activation_rate"] for x in rec], label=name)
    ax1.set_ylabel("threshold")
    ax2.set_ylabel("activation rate")
    ax2.set_xlabel("step")
    if ax1.lines:
        ax1.legend()
    fig.tight_layout()
    fig.savefig(root / "controller.png", dpi=100)
    plt.close(fig)
    pairs = [(n, b) for n, b in per_class.get("baseline", {}).items() if b in per_class["by_run"]]
    if pairs:
        classes = per_class["classes"]
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(classes)), 4))
        width = 0.8 / len(pairs)
        x = np.arange(len(classes))
        for i, (name, base) in enumerate(pairs):
            ax.bar(x + i * width, 100 * (per_class["by_run"][name] - per_class["by_run"][base]), width,
                   label=f"{name} - {base}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x + 0.4 - width / 2, classes, rotation=90 if len(classes) > 20 else 0)
        ax.set_ylabel("per-class top-1 minus full-data baseline (pt)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(root / "per_class.png", dpi=100)
        plt.close(fig)
