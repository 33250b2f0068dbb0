"""lib/loop.py: accumulation, OOM recovery, LR schedule, non-finite policy, DDP equivalence."""
import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lib.config import ConfigError
from lib.loop import (LoopConfig, NonFiniteLossError, OptimConfig, TrainStep, build_optimizer, check_micro_batch,
                      lr_at, per_rank_batch, split_sizes)


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def ce(model, x, y):
    return F.cross_entropy(model(x), y, reduction="none")


def data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def run_steps(micro, steps=3, n=8, forward_loss=ce, optim=None, loop=None):
    model = make_model()
    optim = optim or OptimConfig(lr=0.1, weight_decay=1e-3, warmup_steps=0, schedule="constant")
    loop = loop or LoopConfig(precision="fp32", global_batch=n, log_every=1)
    step = TrainStep(model, build_optimizer(model, optim, "cpu"), loop, optim, steps, "cpu", micro_batch=micro,
                     log=lambda *a: None)
    outs = []
    for i in range(steps):
        x, y = data(n, seed=i)
        outs.append(step(x, y, forward_loss))
    return model, step, outs


def assert_same_params(a, b, atol=1e-6):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=1e-5, msg=name)


def test_accumulation_4x2_equals_8x1():
    full, _, out_full = run_steps(micro=None)
    accum, _, out_acc = run_steps(micro=4)
    assert_same_params(full, accum)
    for a, b in zip(out_full, out_acc):
        torch.testing.assert_close(a.loss, b.loss)
        torch.testing.assert_close(a.grad_norm, b.grad_norm)


def test_short_last_window_is_weighted_by_samples():
    full, _, _ = run_steps(micro=None, n=10)
    short, _, _ = run_steps(micro=4, n=10)  # windows 4, 4, 2
    assert split_sizes(10, 4) == [4, 4, 2]
    assert_same_params(full, short)


def test_tuple_targets_are_sliced_per_micro_batch():
    seen = []

    def fl(model, x, targets):
        y, index = targets
        assert len(y) == len(index) == x.shape[0]
        seen.extend(index.tolist())
        return ce(model, x, y)
    model = make_model()
    optim = OptimConfig(lr=0.1, schedule="constant")
    step = TrainStep(model, build_optimizer(model, optim, "cpu"), LoopConfig(precision="fp32"), optim, 1, "cpu",
                     micro_batch=3)
    x, y = data(8)
    step(x, (y, torch.arange(8)), fl)
    assert seen == list(range(8))


def test_batch_sizes_that_do_not_divide_are_refused():
    with pytest.raises(ConfigError, match="does not divide over 3 ranks"):
        per_rank_batch(64, 3)
    with pytest.raises(ConfigError, match="micro_batch=5 does not divide the per-rank batch 32"):
        check_micro_batch(32, 5)
    assert check_micro_batch(32, 8) == 4


def test_injected_oom_halves_micro_batch_and_loses_no_update():
    calls = {"n": 0}

    def flaky(model, x, y):
        calls["n"] += 1
        if calls["n"] == 3 and x.shape[0] > 2:  # third forward of the run: OOM inside step 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return ce(model, x, y)

    ref, ref_step, ref_out = run_steps(micro=4, steps=4)
    model, step, outs = run_steps(micro=4, steps=4, forward_loss=flaky)
    assert step.micro_batch == 2 and step.oom_retries == 1
    assert step.step == ref_step.step == 4
    assert sum(o.samples for o in outs) == sum(o.samples for o in ref_out) == 32
    assert_same_params(ref, model)


def test_lr_is_a_pure_function_of_the_step():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    lin = OptimConfig(lr=1.0, schedule="linear")
    assert lr_at(50, 100, lin) == pytest.approx(0.5)
    assert lr_at(7, 100, OptimConfig(lr=0.3, schedule="constant")) == 0.3


def test_nonfinite_step_is_skipped_and_counted_then_stops():
    def nan_at(bad_steps):
        state = {"step": 0}

        def fl(model, x, y):
            loss = ce(model, x, y)
            return loss * float("nan") if state["step"] in bad_steps else loss
        return state, fl

    state, fl = nan_at({1})
    model = make_model()
    optim = OptimConfig(lr=0.1, schedule="constant")
    loop = LoopConfig(precision="fp32", global_batch=8, max_nonfinite_in_row=2, log_every=1)
    step = TrainStep(model, build_optimizer(model, optim, "cpu"), loop, optim, 10, "cpu")
    x, y = data()
    step(x, y, fl)
    state["step"] = 1
    before = copy.deepcopy(model.state_dict())
    out = step(x, y, fl)
    assert out.skipped.item() == 1.0 and step.nonfinite_total.item() == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    state["step"] = 2
    step(x, y, fl)  # finite again: updates resume
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    state["step"] = 1
    step(x, y, fl)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps had a non-finite loss"):
        step(x, y, fl)


DDP_STEPS = 3


def ddp_job(rank, world, out_dir, steps=DDP_STEPS):
    """Two-rank job (tests/dist_env.py): TrainStep under DDP on interleaved shards; rank 0 saves the weights."""
    from lib import dist
    out_path = os.path.join(out_dir, "loop-ddp.pt")
    dist.setup(seed=0, device="cpu")
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    optim = OptimConfig(lr=0.1, weight_decay=1e-3, schedule="cosine", warmup_steps=1)
    loop = LoopConfig(precision="fp32", global_batch=16, log_every=1)
    step = TrainStep(ddp, build_optimizer(model, optim, "cpu"), loop, optim, steps, "cpu", micro_batch=4)
    for i in range(steps):
        x, y = data(16, seed=i)
        step(x[rank::world], y[rank::world], ce)  # interleaved shard of the same global batch
    if rank == 0:
        torch.save(model.state_dict(), out_path)
    dist.cleanup()


def test_two_gloo_processes_equal_one_process(two_ranks):
    steps = DDP_STEPS
    out = two_ranks / "loop-ddp.pt"
    model = make_model()
    optim = OptimConfig(lr=0.1, weight_decay=1e-3, schedule="cosine", warmup_steps=1)
    loop = LoopConfig(precision="fp32", global_batch=16, log_every=1)
    step = TrainStep(model, build_optimizer(model, optim, "cpu"), loop, optim, steps, "cpu")
    for i in range(steps):
        x, y = data(16, seed=i)
        step(x, y, ce)
    ddp_state = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-6, rtol=1e-5)


def test_checkpointed_blocks_give_the_same_gradients_as_plain_backward():
    from lib.loop import apply_activation_checkpointing
    plain, ckpt = make_model(), make_model()
    apply_activation_checkpointing(ckpt, ["0", "2"])
    x, y = data()
    for m in (plain, ckpt):
        ce(m, x, y).mean().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ConfigError, match="no submodule 'O'"):
        apply_activation_checkpointing(make_model(), ["O"])
