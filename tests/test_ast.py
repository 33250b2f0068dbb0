"""train_ast.py end to end on CPU: sample accounting per mode, controls, resume equality, bad input."""
import json
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
