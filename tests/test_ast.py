"""train_ast.py end to end on CPU: sample accounting per mode, controls, resume equality, bad input."""
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

import train_ast
from lib import checkpoint
from lib.config import ConfigError, merge, parse

ROOT = Path(__file__).resolve().parent.parent


def tiny(tmp_path, **overrides):
    """A digits run that takes a few seconds on CPU."""
    base = {"run": {"out_dir": str(tmp_path), "name": "t", "device": "cpu", "epochs": 2, "resume": "none"},
            "data": {"name": "digits", "image_size": 16, "loader": "resident"},
            "model": {"name": "small_cnn", "width": 8},
            "optim": {"lr": 0.05, "warmup_steps": 2},
            "loop": {"precision": "fp32", "global_batch": 32, "log_every": 1},
            "ast": {"score_batch": 128, "controller": {"target_rate": 0.25}}}
    cfg = merge(train_ast.Config(), base)
    return merge(cfg, overrides)


class SampleCounter:
    """Counts samples through the model's forward (with / without grad, train mode) and through backward."""

    def __init__(self, model):
        self.train_grad = self.train_nograd = self.backward = 0
        model.register_forward_hook(self._forward)
        model.head.register_full_backward_hook(self._backward)

    def _forward(self, module, args, output):
        if module.training:
            if torch.is_grad_enabled():
                self.train_grad += args[0].shape[0]
            else:
                self.train_nograd += args[0].shape[0]

    def _backward(self, module, grad_input, grad_output):
        self.backward += grad_output[0].shape[0]


@pytest.fixture
def counted(monkeypatch):
    counters = []
    build = train_ast.build_model

    def build_and_count(*args, **kwargs):
        model = build(*args, **kwargs)
        counters.append(SampleCounter(model))
        return model
    monkeypatch.setattr(train_ast, "build_model", build_and_count)
    return counters


def test_batch_mode_backward_runs_on_exactly_the_selected_samples(tmp_path, counted):
    cfg = tiny(tmp_path, ast={"mode": "batch"})
    result = train_ast.main(cfg)["t"]
    c = counted[0]
    assert c.backward == c.train_grad == result["backward_samples"] == sum(result["counts"])
    warm = 11  # epoch 0 is the warm-up on all data: 1438 // 128 steps without a scoring forward
    assert result["counts"][:warm] == [128] * warm
    assert c.train_nograd == result["score_forward_samples"] == (result["steps"] - warm) * 128
    sparse = sum(result["counts"][warm:])
    assert sparse < 0.5 * result["score_forward_samples"]  # really sparse
    assert result["activation_rate"] == result["backward_samples"] / (result["steps"] * 128)


def test_epoch_mode_has_no_extra_forward(tmp_path, counted):
    cfg = tiny(tmp_path, run={"epochs": 4},
               ast={"mode": "epoch", "warmup_epochs": 1, "final_full_fraction": 0.25, "explore_rate": 0.05})
    result = train_ast.main(cfg)["t"]
    c = counted[0]
    assert c.train_nograd == 0
    assert c.train_grad == c.backward == result["backward_samples"] == result["forward_samples"]
    n = 1438  # digits training split
    full_epoch, sparse_epoch = result["counts"][0], result["counts"][1]
    assert full_epoch == n and result["counts"][3] == n
    assert sparse_epoch == round(0.25 * n)
    plans = [json.loads(l) for l in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [p["rate"] for p in plans if p["kind"] == "epoch_plan"][1] == pytest.approx(0.25, abs=1e-3)


def test_random_control_trains_on_the_same_number_of_samples(tmp_path):
    for ast_mode in ("batch", "epoch"):
        extra = {"warmup_epochs": 1, "final_full_fraction": 0.0, "explore_rate": 0.05} if ast_mode == "epoch" else {}
        cfg = tiny(tmp_path / ast_mode, run={"epochs": 3}, ast={"mode": ast_mode, **extra},
                   compare={"enabled": True, "runs": {"ast": {}, "random": {"ast": {"mode": "random", "match": "ast"}},
                                                      "budget": {"ast": {"mode": "budget", "budget_of": "ast"}}}})
        results = train_ast.main(cfg)
        assert results["random"]["backward_samples"] == results["ast"]["backward_samples"]
        assert results["random"]["counts"] == results["ast"]["counts"]
        # budget: full data, as many backward samples as the AST run (rounded up to whole steps)
        assert 0 <= results["budget"]["backward_samples"] - results["ast"]["backward_samples"] < 32


def test_quickstart_config_runs_and_writes_comparison(tmp_path):
    cfg = parse(train_ast.Config(), ["--config", str(ROOT / "configs/quickstart.yaml"),
                                     f"--run.out_dir={tmp_path}"])
    results = train_ast.main(cfg)
    assert list(results) == ["full", "ast", "random"]
    text = (tmp_path / "quickstart" / "compare.md").read_text()
    for name in ("full", "ast", "random"):
        assert f"| {name} |" in text
    assert "not measured" in text  # no GPU energy counter on CPU: said, not invented
    rows = (tmp_path / "quickstart" / "compare.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("run,mode,top1")
    assert results["full"]["top1"] > 0.8  # digits is easy: the pipeline really learns
    assert results["ast"]["backward_samples"] < 0.5 * results["full"]["backward_samples"]


def _loss_by_step(path):
    out = {}
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r["loss"]
    return out


@pytest.mark.parametrize("mode", ["batch", "epoch"])
def test_resume_after_sigterm_and_crash_equals_uninterrupted(tmp_path, monkeypatch, mode):
    extra = {"warmup_epochs": 1, "final_full_fraction": 0.0, "explore_rate": 0.05} if mode == "epoch" else {}
    over = {"run": {"epochs": 3, "checkpoint_every": 4, "resume": "auto"}, "ast": {"mode": mode, **extra}}
    ref = train_ast.main(tiny(tmp_path / "ref", **over))["t"]
    ref_model = checkpoint.load(checkpoint.latest(tmp_path / "ref" / "t" / "checkpoints"))["model"]

    # 1) SIGTERM in the middle of an epoch: checkpoint at the next step boundary, clean exit
    real_step = train_ast.TrainStep.__call__

    def step_then_signal(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(train_ast.TrainStep, "__call__", step_then_signal)
    with pytest.raises(SystemExit) as exit_info:
        train_ast.main(tiny(tmp_path / "run", **over))
    assert exit_info.value.code == 0
    monkeypatch.setattr(train_ast.TrainStep, "__call__", real_step)
    assert checkpoint.latest(tmp_path / "run" / "t" / "checkpoints").name == "step-000006"

    # 2) a crash while writing a later checkpoint: the partial one is ignored on resume
    real_save = torch.save

    def crash_on_step_12(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 12:
            real_save(obj, f, *args, **kwargs)
            raise RuntimeError("simulated crash while writing step 12")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", crash_on_step_12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_ast.main(tiny(tmp_path / "run", **over))
    monkeypatch.setattr(torch, "save", real_save)
    survivor = checkpoint.latest(tmp_path / "run" / "t" / "checkpoints").name
    assert survivor in ("step-000008", "step-000011")  # 11 = end of epoch 0 in batch mode (11 steps/epoch)

    # 3) resume to the end
    result = train_ast.main(tiny(tmp_path / "run", **over))["t"]
    got = _loss_by_step(tmp_path / "run" / "t" / "metrics.jsonl")
    want = _loss_by_step(tmp_path / "ref" / "t" / "metrics.jsonl")
    assert got == want  # every step's loss, exactly
    final = checkpoint.load(checkpoint.latest(tmp_path / "run" / "t" / "checkpoints"))["model"]
    for k, v in ref_model.items():
        assert torch.equal(v, final[k]), k
    assert result["backward_samples"] == ref["backward_samples"]


def test_bad_input_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="target_rate must be in"):
        tiny(tmp_path, ast={"controller": {"target_rate": 1.5}})
    with pytest.raises(ConfigError, match="target_rate must be in"):
        tiny(tmp_path, ast={"controller": {"target_rate": 0.0}})
    with pytest.raises(ConfigError, match=r"unknown significance score 'los'.*did you mean 'loss'"):
        tiny(tmp_path, ast={"score": "los"})
    with pytest.raises(ConfigError, match=r"ast.mode 'bacth'.*did you mean 'batch'"):
        tiny(tmp_path, ast={"mode": "bacth"})
    with pytest.raises(ConfigError, match="fewer than one batch"):
        train_ast.main(tiny(tmp_path, ast={"mode": "full"}, loop={"global_batch": 4096}))


def test_imagefolder_of_real_jpegs_trains_with_bad_files_counted(tmp_path):
    from tools.make_imagefolder import MakeConfig, make_imagefolder
    root = tmp_path / "folder"
    make_imagefolder(MakeConfig(out=str(root), classes=3, train_per_class=12, val_per_class=4, width=72, height=56,
                                workers=1, grayscale=1, cmyk=1, truncated=1))
    cfg = tiny(tmp_path, data={"name": "imagefolder", "root": str(root), "image_size": 32, "loader": "dataloader",
                               "workers": 0, "max_skipped_fraction": 0.2},
               loop={"global_batch": 8}, ast={"mode": "batch", "score_batch": 16, "round_to": 8})
    result = train_ast.main(cfg)["t"]
    assert result["steps"] > 0 and 0.0 <= result["top1"] <= 1.0
    assert result["skipped_files"] >= 1  # the truncated file: skipped, counted, training went on


def test_batchnorm_running_stats_follow_the_stated_policy(tmp_path, monkeypatch):
    """Warm-up steps update BN running stats; sparse steps update them once, from the scoring forward."""
    updates = []
    real_step = train_ast.TrainStep.__call__

    def spy(self, inputs, *args, **kwargs):
        bn = train_ast.checkpoint.unwrap(self.model).stem[1]
        before = bn.num_batches_tracked.item(), bn.running_mean.clone()
        out = real_step(self, inputs, *args, **kwargs)
        updates.append((bn.num_batches_tracked.item() - before[0], not torch.equal(before[1], bn.running_mean)))
        return out
    monkeypatch.setattr(train_ast.TrainStep, "__call__", spy)
    train_ast.main(tiny(tmp_path, run={"epochs": 2}, ast={"mode": "batch", "warmup_epochs": 1}))
    warm, sparse = updates[:11], updates[11:]
    assert all(changed for _, changed in warm)      # warm-up: the training forward updates the statistics
    assert not any(changed for _, changed in sparse)  # sparse: the subset forward leaves them (momentum 0)


@pytest.mark.parametrize("policy", ["sample", "infobatch", "top"])
def test_epoch_plans_keep_the_budget_and_favour_high_scores(tmp_path, policy):
    cfg = tiny(tmp_path, run={"epochs": 40}, ast={"mode": "epoch", "epoch_policy": policy, "warmup_epochs": 1,
                                                  "final_full_fraction": 0.0, "explore_rate": 0.05})
    n = 1000
    scores = torch.linspace(0.0, 1.0, n) ** 2 * 4  # sample i's last loss, rising with i
    kept = torch.zeros(n)
    for epoch in range(1, 40):
        idx, weights, _ = train_ast.plan_epoch(cfg, epoch, scores, n)
        assert idx.numel() == round(0.25 * n) == idx.unique().numel()
        kept[idx] += 1
        if weights is not None:
            assert weights[idx].mean().item() == pytest.approx(1.0, rel=0.05)
    low, high = kept[:n // 2].mean(), kept[n // 2:].mean()
    assert high > 1.5 * low              # favours high scores ...
    if policy != "top":  # ... but every sample keeps a chance: at least the uniform floor (mix 0.3 x rate 0.25)
        assert kept[:n // 2].mean() >= 0.8 * 0.3 * 0.25 * 39
    assert train_ast.plan_epoch(cfg, 0, scores, n)[:2] == (None, None)  # the warm-up epoch: all data


def test_class_balanced_plan_keeps_each_class_share(tmp_path):
    cfg = tiny(tmp_path, run={"epochs": 4}, ast={"mode": "epoch", "class_balanced": True, "final_full_fraction": 0.0})
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    scores = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    scores[labels == 2] = 5.0  # one class is all hard: without balancing it would fill the plan
    idx, _, _ = train_ast.plan_epoch(cfg, 1, scores, 1000, labels=labels, num_classes=3)
    assert torch.bincount(labels[idx], minlength=3).tolist() == [150, 75, 25]


def test_sampled_batch_mode_trains_on_exactly_the_sampled_subset(tmp_path, counted):
    cfg = tiny(tmp_path, ast={"mode": "batch", "batch_policy": "sample", "weight_power": 1.0})
    result = train_ast.main(cfg)["t"]
    c = counted[0]
    assert c.backward == c.train_grad == result["backward_samples"] == sum(result["counts"])
    sparse = result["counts"][11:]
    assert all(30 <= k <= 34 for k in sparse)  # 128 scored x (25% +- 2 pp), in buckets of 2


def _sigterm_at(monkeypatch, step):
    """Make the training step send SIGTERM to this process after optimizer step `step`."""
    real_step = train_ast.TrainStep.__call__

    def step_then_signal(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(train_ast.TrainStep, "__call__", step_then_signal)
    return real_step


def _final_weights(run_dir):
    return checkpoint.load(checkpoint.latest(run_dir / "checkpoints"))["model"]


def test_epoch_mode_resumed_inside_a_sparse_epoch_equals_uninterrupted(tmp_path, monkeypatch):
    """Issue 14 item 1: the epoch plan is checkpointed, so a resume inside a sparse epoch trains the same samples."""
    over = {"run": {"epochs": 3, "resume": "auto"}, "ast": {"mode": "epoch", "final_full_fraction": 0.0}}
    ref = train_ast.main(tiny(tmp_path / "ref", **over))["t"]
    real_step = _sigterm_at(monkeypatch, 50)  # epoch 0 (all data) is 44 steps: step 50 is inside sparse epoch 1
    with pytest.raises(SystemExit) as exit_info:
        train_ast.main(tiny(tmp_path / "run", **over))
    assert exit_info.value.code == 0
    monkeypatch.setattr(train_ast.TrainStep, "__call__", real_step)
    result = train_ast.main(tiny(tmp_path / "run", **over))["t"]
    want, got = _final_weights(tmp_path / "ref" / "t"), _final_weights(tmp_path / "run" / "t")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert result["top1"] == ref["top1"] and result["counts"] == ref["counts"]


def test_sigterm_in_the_last_step_then_rerun_reports_the_final_evaluation(tmp_path, monkeypatch):
    """Issue 14 item 2: the rerun evaluates the final weights instead of reporting the previous epoch's point."""
    over = {"run": {"epochs": 2, "resume": "auto"}, "ast": {"mode": "full"}}
    ref = train_ast.main(tiny(tmp_path / "ref", **over))["t"]
    real_step = _sigterm_at(monkeypatch, ref["steps"])
    with pytest.raises(SystemExit):
        train_ast.main(tiny(tmp_path / "run", **over))
    monkeypatch.setattr(train_ast.TrainStep, "__call__", real_step)
    result = train_ast.main(tiny(tmp_path / "run", **over))["t"]
    assert result["steps"] == ref["steps"] and result["top1"] == ref["top1"]
    assert result["curve"][-1]["step"] == ref["steps"]


def test_a_changed_config_is_refused_for_a_finished_variant_and_a_resumed_run(tmp_path):
    """Issue 14 item 5: a compare rerun with another lr does not reuse the finished variants; nor does a trainer
    resume a checkpointed folder written with another config."""
    runs = {"full": {"ast": {"mode": "full"}}}
    train_ast.main(tiny(tmp_path, run={"epochs": 1, "resume": "auto"}, compare={"enabled": True, "runs": runs}))
    changed = tiny(tmp_path, run={"epochs": 1, "resume": "auto"}, optim={"lr": 0.02},
                   compare={"enabled": True, "runs": runs})
    with pytest.raises(ConfigError, match=r"optim.lr: 0.05 -> 0.02"):
        train_ast.main(changed)
    with pytest.raises(ConfigError, match=r"another config \(ast.mode: 'full' -> 'batch'"):
        train_ast.main(tiny(tmp_path, run={"epochs": 1, "resume": "auto", "name": "t/full"}))


def test_curriculum_control_trains_exactly_its_planned_samples(tmp_path, monkeypatch):
    """Issue 21 item 3: the curriculum run takes the AST run's per-epoch counts and trains only its planned samples,
    drawn from the easiest part of the data (a pool that grows over the run)."""
    plans, steps = {}, {}
    real_plan, real_step = train_ast.plan_epoch, train_ast.TrainStep.__call__

    def record_plan(cfg, epoch, scores, *args, **kwargs):
        out = real_plan(cfg, epoch, scores, *args, **kwargs)
        if cfg.ast.mode == "curriculum" and out[0] is not None:
            plans[epoch] = (out[0].clone(), scores.clone())
        return out

    def record_step(self, inputs, targets, *args, **kwargs):
        steps.setdefault(id(self), []).append(targets[1].clone())  # one list per run (one TrainStep each)
        return real_step(self, inputs, targets, *args, **kwargs)
    monkeypatch.setattr(train_ast, "plan_epoch", record_plan)
    monkeypatch.setattr(train_ast.TrainStep, "__call__", record_step)
    runs = {"ast": {"ast": {"mode": "epoch"}}, "curriculum": {"ast": {"mode": "curriculum", "match": "ast"}}}
    results = train_ast.main(tiny(tmp_path, run={"epochs": 4}, ast={"final_full_fraction": 0.0},
                                  compare={"enabled": True, "runs": runs}))
    assert results["curriculum"]["counts"] == results["ast"]["counts"]
    assert results["curriculum"]["backward_samples"] == results["ast"]["backward_samples"]
    assert sorted(plans) == [1, 2, 3]
    curriculum_steps = list(steps.values())[-1]
    warm, sparse = 1438 // 32, round(0.25 * 1438) // 32  # steps of the warm-up epoch and of each sparse epoch
    pools = []
    for e, epoch in enumerate(sorted(plans)):
        plan, scores = plans[epoch]
        got = torch.cat(curriculum_steps[warm + e * sparse:warm + (e + 1) * sparse])
        assert got.numel() == sparse * 32 == got.unique().numel()
        assert set(got.tolist()) <= set(plan.tolist())  # trained = planned (less the last partial batch)
        rank = torch.argsort(torch.argsort(scores))  # 0 = the easiest by last-seen loss
        competence = math.sqrt(0.3 ** 2 + (1 - 0.3 ** 2) * min(1.0, epoch / 4 / 0.8))  # root pacing, the defaults
        assert int(rank[plan].max()) < math.ceil(competence * 1438)  # only from the pool of the easiest
        pools.append(math.ceil(competence * 1438))
    assert pools[0] < 0.65 * 1438 and pools == sorted(pools) and pools[-1] > 0.95 * 1438  # grows to nearly all


def test_two_seed_compare_writes_paired_statistics_and_a_matching_experiment_record(tmp_path):
    """Issue 21 items 5-6: per-seed runs, paired differences with a t-test, and experiment.yaml holding only
    numbers that compare.csv (and the runs' results) hold too."""
    import csv as csv_module
    import yaml
    runs = {"full": {"ast": {"mode": "full"}}, "ast": {"ast": {"mode": "epoch"}},
            "random": {"ast": {"mode": "random", "match": "ast"}}}
    results = train_ast.main(tiny(tmp_path, run={"epochs": 2}, ast={"final_full_fraction": 0.0},
                                  compare={"enabled": True, "runs": runs, "seeds": 2}))
    assert sorted(results) == [0, 1] and all(sorted(r) == ["ast", "full", "random"] for r in results.values())
    root = tmp_path / "t"
    assert (root / "seed-0" / "ast" / "result.json").is_file() and (root / "seed-1" / "ast" / "result.json").is_file()
    rows = {r["run"]: r for r in csv_module.DictReader(open(root / "compare.csv"))}
    record = yaml.safe_load((root / "experiment.yaml").read_text())["experiments"]
    assert [e["run"] for e in record] == ["ast"]
    e = record[0]
    mean_ast = sum(results[s]["ast"]["top1"] for s in (0, 1)) / 2
    assert e["ast_top1"] == pytest.approx(float(rows["ast"]["top1"])) == pytest.approx(mean_ast)
    assert e["baseline_top1"] == pytest.approx(float(rows["full"]["top1"]))
    assert e["training_time_s"] == pytest.approx(float(rows["ast"]["train_seconds"]))
    assert e["speedup"] == pytest.approx(float(rows["ast"]["speedup_vs_full"]))
    assert e["average_activation_rate"] == pytest.approx(float(rows["ast"]["activation_rate"]))
    assert e["energy_savings"] == "not measured" and rows["ast"]["energy_j"] == "not measured"
    assert e["ast_top1_per_seed"] == [results[s]["ast"]["top1"] for s in (0, 1)]
    versus = e["versus"]["random"]
    diffs = [100 * (results[s]["ast"]["top1"] - results[s]["random"]["top1"]) for s in (0, 1)]
    assert versus["per_seed"] == pytest.approx(diffs, abs=1e-3)
    assert versus["mean"] == pytest.approx(sum(diffs) / 2)
    assert versus["test"] == "paired t-test over seeds"
    text = (root / "compare.md").read_text()
    assert "## Verdict" in text and "over 2 seeds" in text and "experiment.yaml" in text
