"""Every bench's --smoke runs to its summary line, so a bench cannot silently rot (issue 14, item 12).

The benches run in this process (torch is imported once); scaling.py's driver starts torchrun jobs by design,
so it runs as a subprocess (one job of two ranks, the train worker); its encode worker runs here as one rank.
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def summary_of(text):
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert lines and lines[-1].get("summary") is True, text[-2000:]
    return lines[-1]


def run_bench(name, args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / name), *args])
    runpy.run_path(str(ROOT / "bench" / name), run_name="__main__")
    return summary_of(capsys.readouterr().out)


@pytest.mark.parametrize("name, args, keys", [
    ("ast_speed.py", ["--smoke"], ["speedup_batch_10", "speedup_epoch_10", "speedup_batch_10_cheap_scoring"]),
    ("loop_overhead.py", ["--smoke"], ["lib_vs_minimal_eager"]),
    ("dynvision_speed.py", ["--smoke"], ["samples_per_s_b2", "checkpoint_vs_full_time"]),
    ("data_pipeline.py", ["--smoke=true"], ["new_vs_resident", "standard_vs_resident", "pipeline_only_img_per_s"]),
    ("ast_jpeg.py", ["--smoke=true"], ["ratio_batch10", "ratio_batch10_cheap", "ratio_epoch10",
                                       "full_compiled_jpeg_vs_resident", "files", "cache_bytes_per_image"]),
])
def test_bench_smoke_reaches_its_summary(name, args, keys, tmp_path, monkeypatch, capsys):
    if name in ("data_pipeline.py", "ast_jpeg.py"):
        args = [*args, f"--root={tmp_path / 'folder'}"]  # never a shared /tmp folder: suites run side by side
    summary = run_bench(name, args, monkeypatch, capsys)
    assert summary["device"] == "cpu"
    for key in keys:
        assert summary[key] is not None and summary[key] > 0, (key, summary)


def test_dynvision_quality_smoke_exact_strategies_match_full(monkeypatch, capsys):
    # digits only (the silhouettes may be absent on a CI machine); on the CPU in fp32 checkpoint and offload
    # compute full's gradients, so their held-out accuracy equals full's exactly
    summary = run_bench("dynvision_quality.py", ["--smoke", "--datasets=digits"], monkeypatch, capsys)
    assert summary["device"] == "cpu"
    assert summary["worst_exact_minus_full_pt"] == 0.0
    assert "worst_approx_minus_full_pt" in summary and "worst_curve_correlation" in summary


def test_scaling_smoke_through_torchrun(tmp_path, monkeypatch, capsys):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "bench/scaling.py", "--smoke", "--modes=batch", "--gpus=2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = summary_of(proc.stdout)  # one torchrun job of 2 gloo ranks (no 1-rank job: efficiency unknown)
    assert summary["gpus"] == [2] and summary["images_per_s"]["batch_2"] > 0, proc.stdout[-2000:]
    # the encode worker, as the one rank of a job
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--worker", "--mode=encode", "--smoke", f"--out-dir={tmp_path}"])
    runpy.run_path(str(ROOT / "bench" / "scaling.py"), run_name="__main__")
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["mode"] == "encode" and record["samples"] == 128 and record["images_per_s"] > 0


def test_ast_quality_smoke_compares_matched_controls(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "ast_quality.py"), "--smoke"])
    runpy.run_path(str(ROOT / "bench" / "ast_quality.py"), run_name="__main__")
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary, runs = lines[-1], {r["variant"]: r for r in lines if r.get("kind") == "run"}
    assert summary["summary"] is True and summary["device"] == "cpu"
    for key in ("ast_minus_random_pt_batch", "ast_minus_random_pt_epoch", "ast_minus_budget_pt_epoch"):
        assert isinstance(summary[key], float), (key, summary)
    for tag in ("batch30", "epoch30"):  # the controls train on exactly the AST run's backward samples
        assert runs[f"random_{tag}"]["backward_samples"] == runs[f"ast_{tag}"]["backward_samples"]
        assert 0 <= runs[f"budget_{tag}"]["backward_samples"] - runs[f"ast_{tag}"]["backward_samples"] < 64
    cells = [r for r in lines if r.get("kind") == "cell"]
    assert {(c["mode"], c["rate"]) for c in cells} == {("batch", 0.3), ("epoch", 0.3)}


def test_encode_speed_smoke(tmp_path, monkeypatch, capsys):
    summary = run_bench("encode_speed.py", ["--smoke", f"--root={tmp_path / 'scratch'}"], monkeypatch, capsys)
    assert summary["device"] == "cpu" and summary["disk_bound"] in (True, False)
    for key in ("encoder_vs_vitb16", "end_to_end_vs_encoder", "end_to_end_samples_per_s", "peak_rss_gb",
                "disk_write_mb_s", "bytes_per_sample", "imagefolder_samples_per_s", "encoder_flops", "vitb16_flops"):
        assert summary[key] is not None and summary[key] > 0, (key, summary)


def test_regression_memory_smoke(monkeypatch, capsys):
    summary = run_bench("regression_memory.py", ["--smoke"], monkeypatch, capsys)
    assert set(summary) == {"summary", "ckpt_memory_saving", "ckpt_time_cost", "best_compile_speedup", "device",
                            "selective_memory_saving", "selective_time_cost", "first_stage_memory_saving",
                            "first_stage_time_cost"}
    assert summary["device"] == "cpu" and summary["ckpt_memory_saving"] > 0  # fewer bytes kept for the backward
    assert 0 < summary["first_stage_memory_saving"] < summary["ckpt_memory_saving"]


def test_ast_jpeg_summarizes_what_finished_when_stopped(tmp_path, monkeypatch, capsys):
    """A SIGTERM (the GPU machine's time limit) or the hard stop in the middle of a run: the summary still comes,
    from the runs that finished, and names the run that was cut short."""
    import signal
    sys.path.insert(0, str(ROOT / "bench"))
    import ast_jpeg
    real_train, calls = ast_jpeg.train_ast.train, []

    def train(vcfg, info, run_dir):
        calls.append(vcfg.run.name)
        if vcfg.run.name == "epoch10_jpeg":
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread before train() returns
        return real_train(vcfg, info, run_dir)

    monkeypatch.setattr(ast_jpeg.train_ast, "train", train)
    before = signal.getsignal(signal.SIGTERM)
    ast_jpeg.main(ast_jpeg.BenchConfig(smoke=True, root=str(tmp_path / "folder"), compiled=False, extras=False))
    assert signal.getsignal(signal.SIGTERM) is before  # the bench's handler is gone again
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert summary["summary"] is True and summary["interrupted_run"].startswith("epoch10_jpeg (SIGTERM")
    runs = [(r["variant"], r["source"]) for r in lines if r.get("part") == "run"]
    assert runs[-2:] == [("full", "jpeg"), ("batch10_cheap", "jpeg")]  # full first on every source, then rotated
    assert calls[-1] == "epoch10_jpeg" and len(runs) == 4 + 2
    assert summary["ratio_batch10_cheap"] > 0 and summary["ratio_epoch10"] is None
