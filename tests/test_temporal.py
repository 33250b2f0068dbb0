"""Temporal regression (issue 12): per-frame checkpointing, the out-of-memory ladder, the .npz checks, one run end to
end through train_ast.py."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_ast
from lib.config import ConfigError, merge
from lib.fallback import MemoryFallbackError, MemoryLadder, Restart
from lib.loop import LoopConfig, OptimConfig, TrainStep, build_optimizer
from lib.temporal import TemporalBatch, TemporalConfig, TemporalRegressor
from lib.temporal_data import frame_indices, load_temporal_npz

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import make_temporal_regression  # noqa: E402


def tiny_model(checkpoint_frames=False, widths="4/8/16", frames=3):
    torch.manual_seed(0)
    return TemporalRegressor(TemporalConfig(widths=widths, checkpoint_frames=checkpoint_frames, groups=2,
                                            scalar_hidden=8, head_hidden=8), 1, frames, 2, 2)


def tiny_batch(n=4, frames=3, size=12):
    g = torch.Generator().manual_seed(1)
    return (TemporalBatch(torch.randn(n, frames, 1, size, size, generator=g), torch.randn(n, 2, generator=g)),
            torch.randn(n, 2, generator=g))


def test_per_frame_checkpointing_gives_the_plain_gradients():
    x, y = tiny_batch()
    grads = []
    for ckpt in (False, True):
        model = tiny_model(ckpt)
        F.mse_loss(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- the out-of-memory ladder
class Target:
    """What the ladder acts on (train_ast's Variant has the same two attributes)."""

    def __init__(self, model, step_fn):
        self.model, self.step_fn = model, step_fn


def ladder_for(tmp_path, mode, compiled=True, batch=8, min_micro=2):
    cfg = merge(train_ast.Config(), {"run": {"resume": "none"}, "loop": {"global_batch": batch},
                                     "memory": {"fallback": mode, "min_micro_batch": min_micro}})
    model = tiny_model(widths="full", frames=5)
    wrapped = torch.nn.Module()  # stands for torch.compile's wrapper: the model is its _orig_mod
    wrapped._orig_mod = model
    step_fn = TrainStep(model, build_optimizer(model, OptimConfig(), "cpu"), LoopConfig(precision="fp32"),
                        OptimConfig(), 10, "cpu", micro_batch=batch, log=lambda *a: None)
    ladder = MemoryLadder(cfg, tmp_path, log=lambda *a: None)
    ladder.attach(Target(wrapped if compiled else model, step_fn))
    return ladder, step_fn, model


def walk(ladder, step_fn, limit=20):
    """Call the ladder as TrainStep does on every out-of-memory step, until it restarts the run or gives up."""
    for _ in range(limit):
        try:
            ladder(step_fn, 8)
        except (Restart, MemoryFallbackError) as stop:
            return stop
    raise AssertionError("the ladder never ended")


def test_injected_ooms_walk_the_ladder_in_order(tmp_path):
    ladder, step_fn, model = ladder_for(tmp_path, "auto")
    stop = walk(ladder, step_fn)
    assert isinstance(stop, Restart)  # fewer frames: a data change restarts the run
    assert [r["rung"] for r in ladder.records] == ["micro_batch", "micro_batch", "compile_off", "checkpoint_frames",
                                                   "fewer_frames"]
    assert step_fn.micro_batch == 2 and model.checkpoint_frames and ladder.target.model is model
    assert ladder.effective_config().data.frames == 3 and ladder.effective_config().loop.compile is False
    # after the restart (frames 3, then 2), the small model; then nothing is left
    ladder.attach(Target(tiny_model(widths="full", frames=2, checkpoint_frames=True), step_fn))
    stop = walk(ladder, step_fn)
    assert isinstance(stop, Restart) and ladder.records[-1]["rung"] == "small_model"
    assert ladder.effective_config().model.temporal.widths == "small"
    ladder.attach(Target(tiny_model(widths="small", frames=2, checkpoint_frames=True), step_fn))
    assert "after every memory fallback" in str(walk(ladder, step_fn))
    note = ladder.note()
    assert note["requested"] == {"loop.micro_batch": 0, "loop.compile": False,
                                 "model.temporal.checkpoint_frames": False, "data.frames": 0,
                                 "model.temporal.widths": "full"}
    assert len(note["changes_model_or_data"]) == 2


def test_strict_refuses_model_changing_rungs(tmp_path):
    ladder, step_fn, model = ladder_for(tmp_path, "strict", compiled=False)
    stop = walk(ladder, step_fn)
    assert isinstance(stop, MemoryFallbackError)
    assert "strict refuses the next rung, fewer frames 5 -> 3" in str(stop) and "changes the data" in str(stop)
    assert [r["rung"] for r in ladder.records] == ["micro_batch", "micro_batch", "checkpoint_frames"]
    assert ladder.effective_config().data.frames == 0  # nothing that changes the model or data was taken


# ----------------------------------------------------------------------------- the .npz checks
def write(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(scalars=a["scalars"][:-1]), r"scalars has 5 samples .* but frames has N=6; expected scalars "
                                                    r"numbers \[N, S\]"),
    (lambda a: a.update(targets=a["targets"][:4]), r"targets has 4 samples .*expected targets numbers \[N\] or "
                                                   r"\[N, K\]"),
    (lambda a: a.update(frames=a["frames"].astype(np.float32)), r"frames has dtype float32; expected frames uint8 "
                                                                r"\[N, T, C, H, W\]"),
    (lambda a: a.update(frames=a["frames"][:, 0]), r"frames has shape \(6, 1, 8, 8\) \(4 dims\); expected frames "
                                                   r"uint8 \[N, T, C, H, W\]"),
    (lambda a: a.update(scalars=a["scalars"][:, 0]), r"scalars has shape \(6,\) \(1 dims\)"),
    (lambda a: a["targets"].__setitem__(3, np.nan), r"targets holds non-finite values .* 1 sample\(s\), the first "
                                                    r"at index 3; expected targets numbers \[N\] or \[N, K\]"),
    (lambda a: a.pop("scalars"), r"missing scalars"),
])
def test_npz_loader_names_the_bad_array_and_the_expected_shape(tmp_path, change, message):
    arrays = {"frames": np.zeros((6, 3, 1, 8, 8), np.uint8), "scalars": np.ones((6, 2), np.float32),
              "targets": np.arange(6, dtype=np.float32)}
    change(arrays)
    with pytest.raises(ConfigError, match=message):
        load_temporal_npz(write(tmp_path / "bad.npz", **arrays))


def test_generator_writes_what_the_loader_reads(tmp_path):
    arrays = make_temporal_regression.make(4, frames=5, size=12, channels=1, targets=2)
    loaded = load_temporal_npz(write(tmp_path / "ok.npz", **arrays))
    assert loaded["frames"].shape == (4, 5, 1, 12, 12) and loaded["targets"].shape == (4, 2)
    assert loaded["names"] == ["displacement_km", "speed_kmh"] and loaded["units"] == ["km", "km/h"]
    # displacement = speed x (T - 1) x dt; scalars = (km per pixel, minutes between frames)
    hours = 4 * loaded["scalars"][:, 1] / 60
    np.testing.assert_allclose(loaded["targets"][:, 0], loaded["targets"][:, 1] * hours, rtol=1e-5)
    assert frame_indices(5, 3) == [0, 2, 4] and frame_indices(5, 2) == [0, 4] and frame_indices(5, 0) == list(range(5))


# ----------------------------------------------------------------------------- end to end
def regression_run(tmp_path, **overrides):
    path = tmp_path / "t.npz"
    if not path.exists():
        np.savez(path, **make_temporal_regression.make(96, frames=5, size=12, channels=1))
    base = {"run": {"out_dir": str(tmp_path), "name": "r", "device": "cpu", "epochs": 2, "resume": "none"},
            "data": {"name": "temporal", "task": "regression", "root": str(path), "test_fraction": 0.25},
            "model": {"name": "temporal", "temporal": {"widths": "4/8/16", "groups": 2, "scalar_hidden": 8,
                                                       "head_hidden": 8}},
            "optim": {"name": "adamw", "lr": 0.003},
            "loop": {"precision": "fp32", "global_batch": 8, "log_every": 1},
            "ast": {"mode": "batch", "score_batch": 24, "warmup_epochs": 1, "controller": {"target_rate": 0.34}}}
    return merge(merge(train_ast.Config(), base), overrides)


def test_ast_regression_run_reports_mae_and_rmse_and_walks_the_ladder(tmp_path, monkeypatch):
    # out of memory while the model sees more than 3 frames: the ladder halves the micro-batch once (the floor is
    # 4), finds nothing compiled, turns checkpointing on, then drops to 3 frames and restarts the run from step 0
    forward = TemporalRegressor.forward

    def oom_above_3_frames(self, batch):
        if torch.is_grad_enabled() and self.frames > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(self, batch)
    monkeypatch.setattr(TemporalRegressor, "forward", oom_above_3_frames)
    cfg = regression_run(tmp_path, memory={"fallback": "auto", "min_micro_batch": 4})
    result = train_ast.main(cfg)["r"]
    assert result["mae"] > 0 and result["rmse"] >= result["mae"] and result["target_units"] == ["km"]
    assert result["memory_fallback"] == [
        "micro-batch 8 -> 4 (6 accumulation steps; effective batch unchanged)",  # warm-up: 24 a step
        "per-frame activation checkpointing on", "fewer frames 5 -> 3 (data.frames)"]
    assert result["changed_by_fallback"] == ["fewer frames 5 -> 3 (data.frames)"]
    run_dir = tmp_path / "r"
    import yaml
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["data"]["frames"] == 3 and saved["model"]["temporal"]["checkpoint_frames"] is True
    assert saved["memory_fallback"]["requested"]["data.frames"] == 0
    assert json.loads((run_dir / "result.json").read_text())["changed_by_fallback"] == result["changed_by_fallback"]
    # a rerun continues with the effective settings (the finished result is kept, not refused as another config)
    again = train_ast.main(regression_run(tmp_path, run={"resume": "auto"},
                                          memory={"fallback": "auto", "min_micro_batch": 4}))["r"]
    assert again["mae"] == result["mae"]


@pytest.mark.parametrize("mode", ["selective", "first_stage"])
def test_partial_checkpointing_gives_the_plain_gradients(mode):
    x, y = tiny_batch(size=16)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = TemporalRegressor(TemporalConfig(widths="4/8/16", checkpoint_frames=ckpt, checkpoint_mode=mode,
                                                 groups=2, scalar_hidden=8, head_hidden=8), 1, 3, 2, 2)
        F.mse_loss(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=name)


HELD_AFTER_FORWARD = """
import gc, sys, torch, torch.nn.functional as F
from lib.temporal import TemporalBatch, TemporalConfig, TemporalRegressor
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
g = torch.Generator().manual_seed(0)
x, y = TemporalBatch(torch.randn(4, 3, 1, 64, 64, generator=g), torch.randn(4, 2, generator=g)), torch.randn(4, 1)
for ckpt, mode in ((False, "frames"), (True, "frames"), (True, "selective"), (True, "first_stage")):
    model = TemporalRegressor(TemporalConfig(widths="32/64/128", checkpoint_frames=ckpt, checkpoint_mode=mode), 1, 3,
                              2, 1)
    F.mse_loss(model(x), y).backward()  # once untimed: the first call of a shape also allocates kernel caches
    model.zero_grad(set_to_none=False)
    gc.collect()
    before = rss()
    loss = F.mse_loss(model(x), y)
    print(rss() - before)  # bytes autograd (and the checkpoint caches) hold for the backward
    loss.backward()
"""


def test_checkpoint_modes_hold_less_for_the_backward(tmp_path):
    """Resident memory held between forward and backward, in a fresh process whose every allocation over 64 KB is
    its own mmap (freed memory goes back at once, so RSS counts the live tensors): none > selective, first_stage >
    frames."""
    import os
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", HELD_AFTER_FORWARD], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    plain, frames, selective, first_stage = (int(v) for v in out)
    assert plain > 20e6  # the measure sees the activations at all
    assert selective < 0.5 * plain and frames < 0.2 * plain, (plain, frames, selective)
    assert frames < first_stage < 0.6 * plain, (plain, frames, first_stage)


def test_film_fusion_starts_as_the_concat_head_and_bad_values_are_refused():
    x, _ = tiny_batch()
    film = tiny_model()                      # scalar_fusion=film by default, its FiLM layer zero-initialized
    concat = TemporalRegressor(TemporalConfig(widths="4/8/16", groups=2, scalar_hidden=8, head_hidden=8,
                                              scalar_fusion="concat"), 1, 3, 2, 2)
    missing, unexpected = concat.load_state_dict(film.state_dict(), strict=False)
    assert not missing and unexpected == ["film.weight", "film.bias"]
    with torch.no_grad():
        torch.testing.assert_close(film(x), concat(x))
    with pytest.raises(ConfigError, match="scalar_fusion"):
        TemporalConfig(scalar_fusion="sum").validate()
