"""DyRCNN: batched windows vs a plain per-step loop, memory strategies vs full BPTT, delays, bad configs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lib.dynvision as dv
from lib.config import ConfigError
from lib.dynvision import scan
from lib.dynvision import (AREAS, FEEDBACK_SOURCES, SKIP_SOURCES, DyRCNN, LossConfig, MemoryConfig, ModelConfig,
                           SavedBytesMeter, check_schedule, count_params, reaction_step, stream_backward,
                           stream_windows, strategy_forward, timestep_loss)


def small_cfg(**kw):
    base = dict(preset="x8", channels=[4, 6, 8, 10], num_classes=5, n_timesteps=6, forward_delay_steps=2,
                recurrent_delay_steps=2, channels_last=False)
    return ModelConfig(**{**base, **kw})


def small_model(seed=0, **kw):
    """fp64 model with every weight random (DynVision's zero-init skips would hide skip bugs)."""
    torch.manual_seed(seed)
    model = DyRCNN(small_cfg(**kw)).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def images(batch=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)


def dataclasses_replace(obj, **kw):
    return dataclasses.replace(obj, **kw)


def flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def naive_forward(model, x):
    """The model's math written as one plain loop over steps and areas (no windows, no batching)."""
    cfg = model.cfg
    d_ff, d_rec, d_skip, d_fb = cfg.forward_delay_steps, cfg.recurrent_delay_steps, cfg.skip_delay(), \
        cfg.feedback_delay()
    total = cfg.total_steps()
    start = [k * d_ff for k in range(4)]
    alpha = cfg.dt_ms / cfg.tau_ms
    rates, pooled, logits = [{} for _ in range(4)], [{} for _ in range(4)], []
    for t in range(total):
        for k, area in enumerate(model.areas):
            if t < start[k]:
                continue
            u = (x if t < cfg.n_timesteps else torch.zeros_like(x)) if k == 0 else pooled[k - 1][t - d_ff]
            drive = area.conv1(u)
            if area.conv2 is not None:
                drive = area.conv2(F.relu(drive))
            size = drive.shape[-2:]
            if area.recurrence is not None and t - d_rec >= start[k]:
                drive = drive + area.recurrence(rates[k][t - d_rec])
            if cfg.skip and k in SKIP_SOURCES and t - d_skip >= start[SKIP_SOURCES[k]]:
                src = rates[SKIP_SOURCES[k]][t - d_skip]
                drive = drive + model.skip_convs[AREAS[k]](F.interpolate(src, size=size, mode="nearest"))
            if cfg.feedback and k in FEEDBACK_SOURCES and t - d_fb >= start[FEEDBACK_SOURCES[k]]:
                fb = model.feedback_convs[AREAS[k]](rates[FEEDBACK_SOURCES[k]][t - d_fb])
                drive = drive + F.interpolate(fb, size=size, mode="bilinear", align_corners=False)
            prev = rates[k].get(t - 1)
            r = F.relu(alpha * drive if prev is None else prev + alpha * (drive - prev))
            rates[k][t] = r
            pooled[k][t] = F.max_pool2d(r, 3, 2, 1) if area.spec.pool else r
        if t - d_ff >= start[3]:
            logits.append(model.classifier(rates[3][t - d_ff].mean(dim=(2, 3))))
        else:
            logits.append(torch.zeros(x.shape[0], cfg.num_classes, dtype=x.dtype))
    return torch.stack(logits, dim=1)


# ---------------------------------------------------------------------------------------------------------
# The work: DynVision's DyRCNNx8 size.

def test_x8_parameter_count_matches_dynvision():
    n = count_params(DyRCNN(ModelConfig(preset="x8")))
    assert abs(n - 9.06e6) / 9.06e6 < 0.05, n


def test_x8_flops_per_sample_within_10_percent_of_reference():
    model = DyRCNN(ModelConfig(preset="x8")).to("meta")  # FlopCounterMode counts shapes: meta is enough
    flops = dv.flops_per_sample(model, 224, device="meta")
    assert abs(flops / 1e9 - 647) / 647 < 0.10, flops / 1e9


# ---------------------------------------------------------------------------------------------------------
# The batched implementation computes the plain per-step model.

@pytest.mark.parametrize("kw", [
    dict(),
    dict(feedback=True, feedback_delay_steps=3, skip_delay_steps=1),
    dict(recurrence_type="depthwise", skip_delay_steps=2),
    dict(recurrence_type="pointdepthwise", preset="x4"),
    dict(recurrence_type="none"),
    dict(fuse_recurrent_conv=True, feedback=True, feedback_delay_steps=2),
])
def test_batched_windows_match_plain_loop(kw):
    model = small_model(**kw)
    x = images()
    got = model(x)
    want = naive_forward(model, x)
    assert got.shape == (2, model.cfg.total_steps(), 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert want[:, 4 * model.cfg.forward_delay_steps:].abs().sum() > 0  # the test is not vacuous


@pytest.mark.parametrize("kw", [dict(), dict(update_every=[1, 2, 2, 3]), dict(feedback=True, feedback_delay_steps=4)])
def test_window_sizes_agree_forward_and_backward(kw):
    a = small_model(**kw)
    b = DyRCNN(dataclasses_replace(a.cfg, max_window_steps=1)).double()
    b.load_state_dict(a.state_dict())
    x = images()
    ya, yb = a(x), b(x)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat_grad(a), flat_grad(b), rtol=1e-9, atol=1e-9)


def test_hierarchical_areas_hold_between_updates():
    model = small_model(update_every=[1, 1, 2, 2])
    with torch.no_grad():
        _, resp = model(images(), record=True)
    it = resp["IT"]                                         # (B, T, C, H, W)
    start = 3 * model.cfg.forward_delay_steps
    for t in range(start + 1, it.shape[1], 2):              # odd offsets hold the last update
        torch.testing.assert_close(it[:, t], it[:, t - 1], rtol=0, atol=0)
    assert (it[:, start + 2] - it[:, start + 1]).abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# Delays: an impulse reaches each area exactly when the delays say.

def first_change(a, b):
    diff = (a - b).flatten(2).abs().amax(dim=(0, 2)) if a.dim() > 3 else (a - b).abs().amax(dim=(0, 2))
    nz = torch.nonzero(diff > 0)
    return int(nz[0]) if len(nz) else None


@pytest.mark.parametrize("skip,t_impulse", [(False, 0), (False, 9), (True, 0), (True, 9)])
def test_impulse_reaches_it_and_readout_at_the_delayed_step(skip, t_impulse):
    d_ff, d_skip = 3, 1
    model = small_model(skip=skip, skip_delay_steps=d_skip, forward_delay_steps=d_ff, n_timesteps=12)
    total = model.cfg.total_steps()
    video = torch.zeros(2, 12, 3, 32, 32, dtype=torch.float64)
    impulse = video.clone()
    impulse[:, t_impulse] = images()
    with torch.no_grad():
        base_logits, base = model(video, record=True)
        hit_logits, hit = model(impulse, record=True)
    # earliest arrival over the area graph: chain edges d_ff, skip edges d_skip; an area starts at k*d_ff
    arrive = [t_impulse, None, None, None]
    for k in range(1, 4):
        via = [arrive[k - 1] + d_ff]
        if skip and k in SKIP_SOURCES:
            via.append(arrive[SKIP_SOURCES[k]] + d_skip)
        arrive[k] = max(min(via), k * d_ff)
    for k, name in enumerate(AREAS):
        assert first_change(hit[name], base[name]) == arrive[k], name
    expected_logits = arrive[3] + d_ff
    assert expected_logits < total
    assert first_change(hit_logits, base_logits) == expected_logits
    if not skip and t_impulse == 0:
        assert expected_logits == model.cfg.residual() == 4 * d_ff  # the residual steps the input needs


# ---------------------------------------------------------------------------------------------------------
# Memory strategies against full BPTT.

def grads_under(model, x, labels, memory_cfg):
    model.zero_grad(set_to_none=True)
    react = reaction_step(model.cfg, LossConfig())
    if "stream" in memory_cfg.parts():
        loss = stream_backward(model, x, labels, react, memory_cfg)
    else:
        loss = timestep_loss(strategy_forward(model, x, memory_cfg), labels, react)
        loss.sum().backward()
    return flat_grad(model), loss.detach()


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 14])
def test_checkpoint_gradients_equal_full(chunk):
    model = small_model(skip_delay_steps=1)
    x, labels = images(3), torch.tensor([0, 3, 4])
    want, loss_full = grads_under(model, x, labels, MemoryConfig())
    got, loss = grads_under(model, x, labels, MemoryConfig(strategy="checkpoint", chunk_steps=chunk))
    torch.testing.assert_close(loss, loss_full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_checkpoint_with_feedback_and_hierarchy_equals_full():
    model = small_model(feedback=True, feedback_delay_steps=3, update_every=[1, 2, 1, 2])
    x, labels = images(2), torch.tensor([1, 2])
    want, _ = grads_under(model, x, labels, MemoryConfig())
    got, _ = grads_under(model, x, labels, MemoryConfig(strategy="checkpoint", chunk_steps=5))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_offload_gradients_equal_full():
    model = small_model()
    x, labels = images(3), torch.tensor([0, 1, 2])
    want, _ = grads_under(model, x, labels, MemoryConfig())
    got, _ = grads_under(model, x, labels, MemoryConfig(strategy="offload", min_saved_bytes=0))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype,mode", [(torch.float32, "int8"), (torch.float32, "bf16"), (torch.float64, "int8")])
def test_compress_gradient_cosine_vs_full(dtype, mode):
    model = small_model().to(dtype)
    x, labels = images(3).to(dtype), torch.tensor([0, 1, 2])
    want, _ = grads_under(model, x, labels, MemoryConfig())
    got, _ = grads_under(model, x, labels, MemoryConfig(strategy="compress", compress_dtype=mode, min_saved_bytes=0))
    cosine = F.cosine_similarity(got, want, dim=0).item()
    assert cosine >= 0.99, cosine
    assert not torch.equal(got, want)  # something was actually packed


def live_tensors():
    import gc
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


@pytest.mark.parametrize("strategy,mode", [("compress", "bf16"), ("compress", "int8"), ("offload", "int8"),
                                           ("offload+compress", "bf16")])
def test_memory_policies_keep_nothing_alive_after_the_step(strategy, mode):
    """Under bf16 autocast compress bf16 keeps bf16 tensors as they are: that path once leaked every step's
    saved tensors (the cache's finalizers held the cache; 14 GB after 20 steps on the H200)."""
    model = small_model().float()
    x, labels = images(3).float(), torch.tensor([0, 1, 2])
    cfg = MemoryConfig(strategy=strategy, compress_dtype=mode, min_saved_bytes=0)
    counts = []
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            grads_under(model, x, labels, cfg)
        counts.append(live_tensors())
    assert counts[2] == counts[1], counts


def test_stream_holds_the_same_bytes_whatever_the_number_of_steps():
    peaks = {}
    for strategy in ("stream", "full"):
        for n in (16, 40):  # both unroll several whole windows after the reaction time
            model = small_model(n_timesteps=n)
            x, labels = images(2), torch.tensor([1, 3])
            with SavedBytesMeter() as meter:
                grads_under(model, x, labels, MemoryConfig(strategy=strategy, stream_window_steps=6))
            peaks[strategy, n] = meter.peak
    assert peaks["stream", 40] == peaks["stream", 16], peaks
    assert peaks["full", 40] > 1.5 * peaks["full", 16], peaks  # and the meter does see growth


def test_stream_with_window_covering_all_steps_equals_full():
    model = small_model()
    x, labels = images(2), torch.tensor([1, 3])
    want, _ = grads_under(model, x, labels, MemoryConfig())
    total = model.cfg.total_steps()
    got, _ = grads_under(model, x, labels, MemoryConfig(strategy="stream", stream_window_steps=total))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_stream_windows_are_aligned_to_the_end_of_the_unroll():
    assert stream_windows(40, 30, 20) == [(0, 10, False), (10, 40, True)]
    assert stream_windows(40, 10, 20) == [(0, 10, False), (10, 20, False), (20, 30, True), (30, 40, True)]
    assert stream_windows(40, 40, 20) == [(0, 40, True)]
    assert stream_windows(7, 3, 0) == [(0, 1, True), (1, 4, True), (4, 7, True)]


@pytest.mark.parametrize("window", [4, 9])
def test_stream_gradients_equal_one_backward_of_the_truncated_unroll(window):
    """stream_backward's per-window backward passes add up to one backward through the same unroll cut (detached)
    at the same window ends, built here from run_chunk directly."""
    model = small_model(skip_delay_steps=1)
    x, labels = images(3), torch.tensor([0, 3, 4])
    react = reaction_step(model.cfg, LossConfig())
    loss = stream_backward(model, x, labels, react, MemoryConfig(strategy="stream", stream_window_steps=window))
    got = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    run = model.start_run(x)
    keys, state, parts = [], [], []
    for t0, t1, _ in stream_windows(run.total, window, react):
        logits, *state = model.run_chunk(run, t0, t1, keys, *state)
        keys, state = run.next_keys, [s.detach() for s in state]
        parts.append(logits)
    want_loss = timestep_loss(torch.cat(parts).transpose(0, 1), labels, react)
    want_loss.sum().backward()
    torch.testing.assert_close(loss, want_loss.detach().float(), rtol=1e-6, atol=1e-6)
    want = [p.grad for p in model.parameters()]
    assert [g is None for g in got] == [g is None for g in want]  # short windows: V1 may get no gradient at all
    assert sum(g is not None for g in got) > len(got) // 2
    torch.testing.assert_close([g for g in got if g is not None], [g for g in want if g is not None],
                               rtol=1e-10, atol=1e-12)


def test_pooled_loss_uses_mean_logits_after_reaction():
    logits = torch.randn(2, 6, 4)
    labels = torch.tensor([1, 2])
    got = timestep_loss(logits, labels, 3, mode="pooled")
    torch.testing.assert_close(got, F.cross_entropy(logits[:, 3:].mean(1), labels, reduction="none"))
    per_step = timestep_loss(logits, labels, 3)
    want = torch.stack([F.cross_entropy(logits[:, t], labels, reduction="none") for t in range(3, 6)]).mean(0)
    torch.testing.assert_close(per_step, want)


# ---------------------------------------------------------------------------------------------------------
# Bad input fails before training, saying what to change.

def test_no_step_after_reaction_time_is_an_error():
    with pytest.raises(ConfigError, match="no step is left after the reaction time"):
        check_schedule(ModelConfig(n_timesteps=20, residual_timesteps=0), LossConfig(), MemoryConfig())
    with pytest.raises(ConfigError, match="reaction"):
        check_schedule(ModelConfig(n_timesteps=5), LossConfig(reaction_time_steps=40), MemoryConfig())


def test_chunk_larger_than_steps_is_an_error():
    with pytest.raises(ConfigError, match="chunk_steps=50 is larger than the 40 unrolled steps"):
        check_schedule(ModelConfig(), LossConfig(), MemoryConfig(strategy="checkpoint", chunk_steps=50))


def test_unknown_strategy_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'checkpoint'"):
        MemoryConfig(strategy="chekpoint").validate()
    with pytest.raises(ConfigError, match="does not combine"):
        MemoryConfig(strategy="full+offload").validate()


def test_bad_model_options_are_errors():
    for kw, pattern in [(dict(recurrence_type="lateral"), "recurrence_type"),
                        (dict(recurrent_delay_steps=0), "recurrent_delay_steps"),
                        (dict(feedback=True, feedback_delay_steps=0), "feedback_delay_steps"),
                        (dict(update_every=[1, 1, 8, 8]), "stable")]:
        with pytest.raises(ConfigError, match=pattern):
            ModelConfig(**kw).validate()


# ---------------------------------------------------------------------------------------------------------
# GPU: the fused Triton scan computes what the torch ops compute.

@pytest.mark.skipif(not (torch.cuda.is_available() and scan.HAVE_TRITON), reason="needs a CUDA GPU and Triton")
def test_fused_scan_matches_torch_ops_on_gpu():
    g = torch.Generator(device="cpu").manual_seed(0)
    B = 4
    x = torch.randn(3 * B, 16, 20, 20, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    rec = torch.randn(x.shape, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    prev = torch.randn(B, 16, 20, 20, generator=g).relu().cuda().contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x.shape, generator=g).cuda()
    outs = []
    for fused in (False, True):
        scan.use_fused_scan = fused  # the switch is read in lib.dynvision.scan: set it there
        leaves = [t.clone().requires_grad_() for t in (x, rec, prev)]
        out = scan.euler_scan(*leaves, 0.4, B)
        outs.append((out, *torch.autograd.grad(out, leaves, grad)))
    scan.use_fused_scan = True
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Training script: the debug recipe end to end, stream's own backward, the micro-batch probe.

def debug_config(tmp_path, *overrides):
    import train_dynvision
    from lib.config import parse
    return train_dynvision, parse(train_dynvision.Config(), ["--config", "configs/dynvision_debug.yaml",
                                                             f"--run.out_dir={tmp_path}", "--run.epochs=1",
                                                             *overrides])


@pytest.mark.parametrize("strategy", ["checkpoint", "stream"])
def test_debug_recipe_trains_and_writes_accuracy_per_step(tmp_path, strategy):
    script, cfg = debug_config(tmp_path, f"--memory.strategy={strategy}", "--run.max_steps=6",
                               "--memory.stream_window_steps=4", "--run.eval_batches=2")
    summary = script.main(cfg)
    run_dir = tmp_path / "dynvision_debug"
    rows = (run_dir / "accuracy_per_step.csv").read_text().strip().splitlines()
    assert rows[0].startswith("epoch,step,time_ms")
    assert len(rows) == 1 + cfg.model.total_steps()
    assert (run_dir / "accuracy_per_step.png").is_file()
    assert summary["steps"] == 6 and len(summary["accuracy_per_step"]) == 8


def test_stream_step_accumulates_like_one_batch(tmp_path):
    """StreamStep over micro-batches gives the gradient of stream over the whole batch."""
    script, cfg = debug_config(tmp_path, "--memory.strategy=stream", "--memory.stream_window_steps=3")
    from lib.loop import build_optimizer
    model_cfg = dataclasses_replace(cfg.model, num_classes=10, in_channels=1)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    grads = []
    for micro in (None, 4):
        torch.manual_seed(0)
        model = DyRCNN(model_cfg)
        opt = build_optimizer(model, cfg.optim, "cpu")
        step = script.StreamStep(model, opt, cfg.loop, cfg.optim, 10, "cpu", micro_batch=micro,
                                 memory_cfg=cfg.memory, react=reaction_step(model_cfg, cfg.loss), label_smoothing=0.0)
        captured = {}
        opt.step = lambda captured=captured, model=model: captured.update(g=flat_grad(model).clone())
        step(x, y, None)
        grads.append(captured["g"])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_adaptive_micro_batch_respects_an_injected_budget(tmp_path, monkeypatch):
    import lib.memory
    monkeypatch.setattr(lib.memory, "free_memory", lambda device=None: None)  # gc.collect: seconds in a big heap
    script, cfg = debug_config(tmp_path, "--memory.strategy=full")
    model = DyRCNN(dataclasses_replace(cfg.model, num_classes=10, in_channels=1))
    x, y = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    react = reaction_step(model.cfg, cfg.loss)
    meter = SavedBytesMeter()

    def peak_at(b):  # bytes autograd holds for one forward at micro-batch b
        with SavedBytesMeter() as m:
            timestep_loss(model(x[:b]), y[:b], react).mean().backward()
        model.zero_grad(set_to_none=True)
        return m.peak

    budget = (peak_at(11) + peak_at(12)) / 2             # 11 fits, 12 does not
    with meter:
        def reset():
            meter.live, meter.peak = 0, 0
        micro, largest = script.auto_micro_batch(model, cfg, (x, y), 64, react, measure_peak=lambda: meter.peak,
                                                 reset_peak=reset, budget_bytes=budget)
    assert largest == 11
    assert micro <= largest and peak_at(micro) <= budget


def test_fused_scan_kernels_match_torch_ops_in_the_triton_interpreter():
    """The Triton kernels' logic on the CPU (TRITON_INTERPRET=1 must be set before they are defined)."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    code = textwrap.dedent("""
        import torch
        import lib.dynvision.scan as dv  # the switches are read there
        assert dv.HAVE_TRITON
        torch.manual_seed(0)
        B = 2
        worst = 0.0
        for has_rec in (False, True):
            for has_prev in (False, True):
                x = torch.randn(3 * B, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
                rec = torch.randn_like(x).requires_grad_() if has_rec else None
                prev = (torch.randn(B, 4, 5, 5).relu().contiguous(memory_format=torch.channels_last)
                        .requires_grad_() if has_prev else None)
                grad = torch.randn(3 * B, 4, 5, 5)  # NCHW: the kernel path must re-lay it out
                res = []
                for fused in (False, True):
                    dv._TRITON_ON_CPU = dv.use_fused_scan = fused
                    out = dv.euler_scan(x, rec, prev, 0.4, B)
                    leaves = [t for t in (x, rec, prev) if t is not None]
                    res.append([out, *torch.autograd.grad(out, leaves, grad)])
                worst = max(worst, *[(a - b).abs().max().item() for a, b in zip(*res)])
        print(worst)
    """)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5


def test_training_resumed_after_sigterm_equals_uninterrupted(tmp_path, monkeypatch):
    """Stop at step 7 with SIGTERM (checkpoint at the step boundary), resume: same weights as one run."""
    import os
    import signal
    from pathlib import Path

    import train_dynvision
    from lib import checkpoint
    from lib.config import parse
    from lib.run import Preempted

    def cfg(name):
        return parse(train_dynvision.Config(), [
            "--config", str(Path(__file__).resolve().parent.parent / "configs/dynvision_debug.yaml"),
            f"--run.out_dir={tmp_path}", f"--run.name={name}", "--run.resume=auto", "--run.epochs=1",
            "--run.max_steps=12", "--loop.log_every=1"])

    train_dynvision.main(cfg("ref"))
    real_step = train_dynvision.TrainStep.__call__

    def step_then_signal(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if self.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    monkeypatch.setattr(train_dynvision.TrainStep, "__call__", step_then_signal)
    with pytest.raises(Preempted) as stop:  # preempted: checkpoint written, exit status 0
        train_dynvision.main(cfg("run"))
    assert stop.value.code == 0
    monkeypatch.setattr(train_dynvision.TrainStep, "__call__", real_step)
    assert checkpoint.latest(tmp_path / "run" / "checkpoints").name == "step-000007"
    train_dynvision.main(cfg("run"))
    ref = checkpoint.load(checkpoint.latest(tmp_path / "ref" / "checkpoints"))
    got = checkpoint.load(checkpoint.latest(tmp_path / "run" / "checkpoints"))
    assert got["step"] == ref["step"] == 12
    for k, v in ref["model"].items():
        assert torch.equal(v, got["model"][k]), k


# ---------------------------------------------------------------------------------------------------------
# --compare: the strategies back to back into one run folder (issue 18).

def test_compare_writes_one_row_per_strategy_exact_ones_match_full_and_reruns_reuse_or_refuse(tmp_path, monkeypatch):
    """compare.md/.csv/.png with one row per strategy; checkpoint and offload train to full's weights and
    accuracy per step; a rerun retrains nothing; a changed config is refused, naming the key."""
    import csv as csv_module
    from lib import checkpoint
    from lib.config import ConfigError
    runs = {"full": {"memory": {"strategy": "full"}}, "checkpoint": {"memory": {"strategy": "checkpoint"}},
            "offload": {"memory": {"strategy": "offload", "min_saved_bytes": 0}},
            "stream": {"memory": {"strategy": "stream", "stream_window_steps": 3}}}
    over = ["--compare.enabled=true", "--run.max_steps=3", "--run.eval_batches=2", "--data.image_size=8",
            "--model.channels=[4,6,8,10]"]
    script, cfg = debug_config(tmp_path, *over)
    cfg.compare.runs = runs
    results = script.main(cfg)
    root = tmp_path / "dynvision_debug"
    rows = list(csv_module.DictReader(open(root / "compare.csv")))
    assert [r["run"] for r in rows] == list(runs) and rows[0]["peak_memory_gb"] == "not measured"
    assert (root / "compare.md").read_text().count("\n| ") == 1 + len(runs)  # header + one row each
    assert (root / "accuracy_per_step.png").is_file()
    weights = {name: checkpoint.load(checkpoint.latest(root / name / "checkpoints"))["model"] for name in runs}
    for name in ("checkpoint", "offload"):
        assert results[name]["accuracy_per_step"] == results["full"]["accuracy_per_step"]
        for key, value in weights["full"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=1e-5, atol=1e-6)
    assert results["full"]["steps"] == 3 and len(results["full"]["accuracy_per_step"]) == 8

    def no_training(*args, **kwargs):
        raise AssertionError("a finished strategy was trained again")
    monkeypatch.setattr(script, "train", no_training)
    again = script.main(cfg)
    assert {n: r["final_accuracy"] for n, r in again.items()} == {n: r["final_accuracy"] for n, r in results.items()}
    _, changed = debug_config(tmp_path, *over, "--optim.lr=0.01")
    changed.compare.runs = runs
    with pytest.raises(ConfigError, match=r"optim.lr: 0.003 -> 0.01"):
        script.main(changed)
