"""Reading a comparison of memory strategies: accuracy, temporal dynamics, cost; compare.md / compare.csv / plot.

Every number comes from the runs' result.json summaries (train_dynvision.py). Per strategy: the accuracy at the
last unrolled step, the mean accuracy from the reaction step on (the first labelled step: by default 4 x the
forward delay, the first step at which the image can reach the readout), the paired difference to `full` per
seed (points; mean +- std and a paired t-test over seeds), the Pearson correlation of its accuracy-per-timestep
curve with full's of the same seed (from the reaction step on: earlier steps show the untrained readout bias in
every strategy alike), train seconds, step seconds and peak memory (CUDA max_memory_allocated; 'not measured'
on CPU).
"""
import csv
import math
from pathlib import Path

import numpy as np

from lib.compare import markdown_table, mean_std
from lib.stats import paired_t_test

EXACT_PARTS = ("full", "checkpoint", "offload")   # strategies whose gradients are full BPTT's


def is_exact(summary):
    """Does this run compute full BPTT's gradients of the default model (exact strategy, every area every step)?"""
    parts = str(summary.get("memory_strategy", "full")).split("+")
    return all(p in EXACT_PARTS for p in parts) and all(e == 1 for e in summary.get("update_every", [1]))


def after_reaction(accuracy_per_step, reaction_step):
    """Mean accuracy over the steps from the reaction step on."""
    return sum(accuracy_per_step[reaction_step:]) / max(1, len(accuracy_per_step) - reaction_step)


def _after_reaction(summary):
    return after_reaction(summary["accuracy_per_step"], summary["reaction_step"])


def curve_correlation(a, b, start=0):
    """Pearson correlation of two accuracy curves over steps >= start; None if either is constant there."""
    x, y = np.asarray(a[start:], dtype=np.float64), np.asarray(b[start:], dtype=np.float64)
    if len(x) < 2 or len(x) != len(y) or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def curve_max_abs_diff(a, b, start=0):
    """Largest |a - b| over steps >= start, in points: what a correlation cannot show when the curves are flat."""
    x, y = np.asarray(a[start:], dtype=np.float64), np.asarray(b[start:], dtype=np.float64)
    return float(100 * np.abs(x - y).max()) if len(x) and len(x) == len(y) else None


def curve_range(a, start=0):
    """max - min of an accuracy curve over steps >= start, in points (near 0: a correlation with it is noise)."""
    x = np.asarray(a[start:], dtype=np.float64)
    return float(100 * (x.max() - x.min())) if len(x) else None


def strategy_rows(results, baseline="full"):
    """One row per strategy from results {seed: {name: summary}}: means over seeds, paired differences to the
    baseline in points with their t-test, curve correlations; per-seed values under *_per_seed."""
    seeds = list(results)
    names = list(results[seeds[0]])
    rows = []
    for name in names:
        runs = {s: results[s][name] for s in seeds if name in results[s]}
        base = {s: results[s].get(baseline) for s in runs}
        finals = [r["final_accuracy"] for r in runs.values()]
        reacted = [_after_reaction(r) for r in runs.values()]
        diffs = [100 * (r["final_accuracy"] - base[s]["final_accuracy"]) for s, r in runs.items() if base[s]]
        reacted_diffs = [100 * (_after_reaction(r) - _after_reaction(base[s])) for s, r in runs.items() if base[s]]
        corrs = [curve_correlation(r["accuracy_per_step"], base[s]["accuracy_per_step"], r["reaction_step"])
                 for s, r in runs.items() if base[s]]
        corrs = [c for c in corrs if c is not None]
        gaps = [curve_max_abs_diff(r["accuracy_per_step"], base[s]["accuracy_per_step"], r["reaction_step"])
                for s, r in runs.items() if base[s]]
        ranges = [curve_range(base[s]["accuracy_per_step"], r["reaction_step"]) for s, r in runs.items() if base[s]]
        mean_d, std_d, t, p = paired_t_test(diffs)
        first = next(iter(runs.values()))
        row = {"run": name, "strategy": first.get("memory_strategy"), "exact": is_exact(first),
               "update_every": first.get("update_every"), "seeds": len(runs),
               "final_accuracy": mean_std(finals)[0], "final_accuracy_std": mean_std(finals)[1],
               "after_reaction_accuracy": mean_std(reacted)[0],
               "minus_full_pt": mean_d, "minus_full_pt_std": std_d, "minus_full_p": p, "minus_full_t": t,
               "after_reaction_minus_full_pt": mean_std(reacted_diffs)[0],
               "curve_correlation": mean_std(corrs)[0], "curve_correlation_min": min(corrs) if corrs else None,
               "curve_max_abs_diff_pt": mean_std(gaps)[0], "full_curve_range_pt": mean_std(ranges)[0],
               "train_seconds": mean_std([r.get("train_seconds") for r in runs.values()])[0],
               "step_seconds": mean_std([r.get("step_seconds") for r in runs.values()])[0],
               "peak_memory_gb": mean_std([r.get("peak_memory_gb") for r in runs.values()])[0],
               "final_accuracy_per_seed": [round(v, 4) for v in finals],
               "minus_full_pt_per_seed": [round(d, 2) for d in diffs],
               "curve_correlation_per_seed": [round(c, 4) for c in corrs]}
        if name == baseline:
            row.update(minus_full_pt=0.0, curve_correlation=1.0, curve_correlation_min=1.0)
        rows.append(row)
    return rows


def _fmt(key, value):
    if value is None:
        return "not measured" if key == "peak_memory_gb" else "-"
    if key in ("final_accuracy", "final_accuracy_std", "after_reaction_accuracy"):
        return f"{100 * value:.2f}%"
    if key in ("minus_full_pt", "minus_full_pt_std", "after_reaction_minus_full_pt"):
        return f"{value:+.2f}" if "std" not in key else f"{value:.2f}"
    if key in ("curve_correlation", "minus_full_p"):
        return f"{value:.3f}"
    if key in ("train_seconds", "peak_memory_gb"):
        return f"{value:.2f}"
    if key == "step_seconds":
        return f"{1000 * value:.1f} ms"
    return str(value)


def write_strategy_comparison(root, results, say=print):
    """compare.md, compare.csv and accuracy_per_step.png in `root` from results {seed: {name: summary}}; returns
    the rows. A plot that fails is reported and skipped."""
    root = Path(root)
    rows = strategy_rows(results)
    several = len(results) > 1
    keys = ["run", "strategy", "final_accuracy"] + (["final_accuracy_std"] if several else []) + \
        ["after_reaction_accuracy", "minus_full_pt"] + (["minus_full_pt_std", "minus_full_p"] if several else []) + \
        ["curve_correlation", "train_seconds", "step_seconds", "peak_memory_gb"]
    with open(root / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + ["exact"], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("not measured" if k == "peak_memory_gb" and row[k] is None else row.get(k))
                             for k in keys + ["exact"]})
    table = markdown_table(rows, keys, _fmt)
    first = next(iter(results[next(iter(results))].values()))
    seeds_text = f"{len(results)} seeds ({', '.join(str(s) for s in results)}), mean over seeds" if several \
        else f"seed {next(iter(results))}"
    text = (f"# Memory strategies: {root.name}\n\nAll numbers measured in this run ({seeds_text}; same data, same "
            f"initial weights, one strategy after another on the same machine). final_accuracy is the test accuracy "
            f"at the last of the {len(first['accuracy_per_step'])} unrolled steps; after_reaction_accuracy is the "
            f"mean over the steps from the reaction step ({first['reaction_step']}) on; minus_full_pt is the paired "
            f"difference of final_accuracy to full in points; curve_correlation is the Pearson correlation of the "
            f"accuracy-per-step curve with full's (same seed, steps from the reaction step on); step_seconds "
            f"excludes the first epoch (one-time costs) where there are several; peak_memory_gb is CUDA's "
            f"max_memory_allocated over the run ('not measured' on CPU). Exact strategies (full, checkpoint, "
            f"offload) compute the same gradients as full up to floating-point order; the others approximate them "
            f"or change the model (update_every).\n\n{table}\n\nPlot: accuracy_per_step.png\n")
    (root / "compare.md").write_text(text)
    say(table)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4))
        plot_accuracy_per_step(ax, results)
        fig.tight_layout()
        fig.savefig(root / "accuracy_per_step.png", dpi=120)
        plt.close(fig)
    except Exception as e:  # a plot never fails a run
        say(f"plot skipped: {type(e).__name__}: {e}")
    return rows


def plot_accuracy_per_step(ax, results, title=None):
    """Accuracy per timestep (mean over seeds) of every strategy on one axis, stimulus and reaction time marked."""
    seeds = list(results)
    names = list(results[seeds[0]])
    first = results[seeds[0]][names[0]]
    dt = first.get("dt_ms", 1.0)
    for i, name in enumerate(names):
        curves = np.array([results[s][name]["accuracy_per_step"] for s in seeds if name in results[s]])
        times = dt * np.arange(curves.shape[1])
        style = "-" if is_exact(results[seeds[0]][name]) else "--"
        ax.plot(times, 100 * curves.mean(0), style, marker=".", markersize=3, label=name, color=f"C{i % 10}")
    ax.axvspan(0, first.get("n_timesteps", 0) * dt, color="0.92", label="stimulus on")
    ax.axvline(first["reaction_step"] * dt, color="0.4", ls=":", label="reaction step")
    ax.set_xlabel("time (ms)" if "dt_ms" in first else "step")
    ax.set_ylabel("held-out top-1 accuracy (%)")
    ax.set_title(title or f"accuracy per timestep ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if not math.isnan(ax.get_ylim()[0]):
        ax.set_ylim(bottom=0)
