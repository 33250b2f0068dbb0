"""lib/checkpoint.py: round-trips, keep-k, skipping partial/corrupt checkpoints, RNG, preemption, crashes."""
import errno
import os
import random
import signal
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn

from lib import checkpoint as ckpt
from lib import storage
from lib.config import to_dict


@dataclass
class _Cfg:
    lr: float = 0.1  # learning rate
    sizes: list[int] = field(default_factory=lambda: [4, 8])


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _trained(steps=3):
    """A model + SGD-momentum optimizer + GradScaler that have taken a few steps (non-trivial state)."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for _ in range(steps):
        x = torch.randn(16, 4)
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    return model, opt, scaler


def _state(model, opt, scaler, step):
    return {"model": ckpt.model_state(model), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "step": step, "epoch": 1, "batch_in_epoch": 7, "config": to_dict(_Cfg()), "extra": {"best": 0.5}}


def _assert_equal(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _save_steps(tmp_path, steps, keep=3):
    model, opt, scaler = _trained(1)
    for s in steps:
        ckpt.save(tmp_path, s, _state(model, opt, scaler, s), keep=keep)
    return model, opt, scaler


def test_round_trip_restores_model_optimizer_scaler_exactly(tmp_path):
    model, opt, scaler = _trained()
    state = _state(model, opt, scaler, 3)
    path = ckpt.save(tmp_path, 3, state)
    assert path == tmp_path / "step-000003" and (path / "COMPLETE").exists()
    loaded = ckpt.load(ckpt.resolve_resume("auto", tmp_path))
    _assert_equal({k: v for k, v in state.items()}, {k: v for k, v in loaded.items() if k != "rng"})

    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler2 = torch.amp.GradScaler("cpu")
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    scaler2.load_state_dict(loaded["scaler"])
    # the real test: one more identical step from both gives bit-identical parameters
    x = torch.randn(16, 4)
    for m, o, s in ((model, opt, scaler), (model2, opt2, scaler2)):
        s.scale(m(x).square().mean()).backward()
        s.step(o)
        s.update()
    _assert_equal(model.state_dict(), model2.state_dict())
    _assert_equal(opt.state_dict(), opt2.state_dict())
    assert scaler.get_scale() == scaler2.get_scale()


def test_keep_newest_k(tmp_path):
    _save_steps(tmp_path, [10, 20, 30, 40, 50], keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000030", "step-000040", "step-000050"]
    assert ckpt.latest(tmp_path).name == "step-000050"


def test_resave_same_step_and_older_step_never_deletes_new(tmp_path):
    model, opt, scaler = _save_steps(tmp_path, [10, 20], keep=2)
    ckpt.save(tmp_path, 20, _state(model, opt, scaler, 20), keep=2)
    assert ckpt.latest(tmp_path).name == "step-000020"
    with pytest.warns(UserWarning, match="newer checkpoints"):
        ckpt.save(tmp_path, 5, _state(model, opt, scaler, 5), keep=2)
    assert (tmp_path / "step-000005" / "COMPLETE").exists()


@pytest.mark.parametrize("damage", ["temp_file_only", "no_marker", "truncated_with_marker", "bitflip_with_marker"])
def test_latest_skips_partial_or_corrupt(tmp_path, damage):
    _save_steps(tmp_path, [1, 2])
    bad = tmp_path / "step-000003"
    if damage == "temp_file_only":
        bad.mkdir()
        (bad / ".state.pt.tmp.123").write_bytes(b"half a checkpoint")
    else:
        _save_steps(tmp_path, [3])
        state_file = bad / "state.pt"
        data = state_file.read_bytes()
        if damage == "no_marker":
            (bad / "COMPLETE").unlink()
        elif damage == "truncated_with_marker":
            state_file.write_bytes(data[: len(data) // 2])
        else:
            state_file.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.warns(UserWarning, match="step-000003"):
        assert ckpt.latest(tmp_path).name == "step-000002"
    with pytest.raises(ckpt.CheckpointError):
        ckpt.resolve_resume(str(bad), tmp_path)


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load(tmp_path / "step-000001")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated"):
        ckpt.load(junk)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    assert ckpt.resolve_resume("none", tmp_path) is None
    assert ckpt.resolve_resume("", tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path) is None


def test_non_plain_state_rejected_before_writing(tmp_path):
    import argparse
    with pytest.raises(ckpt.CheckpointError, match=r"state\['config'\].*Namespace"):
        ckpt.save(tmp_path, 1, {"config": argparse.Namespace(lr=0.1)})
    assert ckpt.latest(tmp_path) is None


class _DDPLike(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)


class _CompiledLike(nn.Module):
    """Mimics torch.compile's OptimizedModule: the real model sits in `_orig_mod`."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, x):
        return self._orig_mod(x)


def test_unwrap_and_prefix_stripping():
    base = _model()
    wrapped = _DDPLike(_CompiledLike(_DDPLike(base)))
    assert ckpt.unwrap(wrapped) is base
    reference = base.state_dict()
    # the raw wrapped state_dict carries the prefixes; model_state must not
    assert all(k.startswith("module._orig_mod.module.") for k in wrapped.state_dict())
    stripped = ckpt.model_state(wrapped)
    _assert_equal(dict(reference), dict(stripped))
    # prefixes saved by older code or by a submodule compiled on its own are stripped too
    stripped_raw = ckpt.strip_prefixes(wrapped.state_dict())
    _assert_equal(dict(reference), dict(stripped_raw))
    assert dict(stripped._metadata) == dict(reference._metadata)  # module versions survive (BatchNorm)
    fresh = _model()
    fresh.load_state_dict(stripped_raw)  # strict: the keys must line up exactly
    # a model with a real child called `module` next to other children is not a wrapper
    holder = nn.Module()
    holder.module = nn.Linear(2, 2)
    holder.head = nn.Linear(2, 2)
    assert ckpt.unwrap(holder) is holder
    assert set(ckpt.model_state(holder)) == set(holder.state_dict())


def test_real_torch_compile_prefix_stripped():
    base = nn.Linear(3, 2)
    compiled = torch.compile(base)  # wrapping is lazy: no compilation happens without a forward
    assert ckpt.unwrap(compiled) is base
    assert set(ckpt.model_state(compiled)) == {"weight", "bias"}


def test_rng_restore_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # leave a cached gaussian behind
    ckpt.save(tmp_path, 1, {"step": 1})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(3).tolist(), torch.randn(2).tolist())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckpt.restore_rng(ckpt.load(ckpt.latest(tmp_path))["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
           torch.rand(3).tolist(), torch.randn(2).tolist())
    assert got == expected


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_handler_sets_flag_and_restores(sig):
    signum = getattr(signal, sig)
    before_term, before_usr1 = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with ckpt.PreemptionHandler() as handler:
        assert not handler.requested
        os.kill(os.getpid(), signum)
        assert handler.requested and handler.received == sig
        assert handler.sync_requested() is True  # not distributed: just the local flag
    assert signal.getsignal(signal.SIGTERM) == before_term
    assert signal.getsignal(signal.SIGUSR1) == before_usr1


@pytest.mark.parametrize("crash_in", ["torch.save", "os.replace", "marker"])
def test_crash_while_writing_keeps_previous(tmp_path, monkeypatch, crash_in):
    model, opt, scaler = _save_steps(tmp_path, [1, 2, 3], keep=3)
    before = {p.name: (p / "state.pt").read_bytes() for p in tmp_path.iterdir()}

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill")  # BaseException: like a real crash, not a handled error

    if crash_in == "torch.save":
        def half_save(obj, f, *args, **kwargs):
            f.write(b"PK\x03\x04 partial bytes")
            boom()
        monkeypatch.setattr(torch, "save", half_save)
    elif crash_in == "os.replace":
        monkeypatch.setattr(os, "replace", boom)
    else:
        monkeypatch.setattr(ckpt, "atomic_write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(tmp_path, 4, _state(model, opt, scaler, 4), keep=3)
    monkeypatch.undo()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert ckpt.latest(tmp_path).name == "step-000003"
    for name, data in before.items():  # nothing older was pruned or touched
        assert (tmp_path / name / "state.pt").read_bytes() == data
    # the next successful save cleans up and prunes normally
    ckpt.save(tmp_path, 5, _state(model, opt, scaler, 5), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000003", "step-000005"]


def test_disk_full_raises_storage_error_and_keeps_previous(tmp_path, monkeypatch):
    model, opt, scaler = _save_steps(tmp_path, [1])

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"some bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(storage.StorageError, match="disk full.*older checkpoints are intact"):
        ckpt.save(tmp_path, 2, _state(model, opt, scaler, 2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]  # temp file and empty folder removed
    assert ckpt.latest(tmp_path).name == "step-000001"


def test_free_space_checked_before_writing(tmp_path, monkeypatch):
    model, opt, scaler = _save_steps(tmp_path, [1])
    usage = storage.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(storage.StorageError, match="need .* only 1.0 KB free"):
        ckpt.save(tmp_path, 2, _state(model, opt, scaler, 2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]
    assert ckpt.latest(tmp_path).name == "step-000001"


def test_stop_now_without_process_group_follows_the_signal():
    import os
    import signal
    from lib.checkpoint import PreemptionHandler
    with PreemptionHandler() as preempt:
        assert not preempt.stop_now(step=7, every=5)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.stop_now(step=7, every=5)  # one process: at the next step, not the next log step


def test_disk_full_inside_torchs_zip_writer_is_a_storage_error(tmp_path, monkeypatch):
    """torch reports a failed write as RuntimeError('unexpected pos ...') with the ENOSPC in __context__."""
    model, opt, scaler = _save_steps(tmp_path, [1])
    real_write = ckpt._HashingWriter.write

    def fills_up(self, data):
        if self.bytes > 2000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)
    monkeypatch.setattr(ckpt._HashingWriter, "write", fills_up)
    with pytest.raises(storage.StorageError, match="disk full while writing checkpoint step 2") as err:
        ckpt.save(tmp_path, 2, _state(model, opt, scaler, 2))
    assert isinstance(err.value.__cause__, RuntimeError)  # the real torch path, not a hand-raised OSError
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001"]


def _fake_free(monkeypatch, free):
    monkeypatch.setattr(ckpt, "free_bytes", lambda path: free["bytes"])


def test_short_disk_prunes_before_writing_and_ends_like_a_roomy_one(tmp_path, monkeypatch):
    roomy, short = tmp_path / "roomy", tmp_path / "short"
    model, opt, scaler = _save_steps(roomy, [1, 2, 3], keep=3)
    _save_steps(short, [1, 2, 3], keep=3)
    size = sum(f.stat().st_size for f in (short / "step-000003").iterdir())
    need = ckpt._tensor_bytes(_state(model, opt, scaler, 4)) + (1 << 20)  # what save asks for
    free = {"bytes": need - size}  # only pruning the two that keep=2 drops anyway makes it fit
    _fake_free(monkeypatch, free)
    real_prune = ckpt._delete_checkpoint
    order = []
    monkeypatch.setattr(ckpt, "_delete_checkpoint", lambda p: (order.append(("delete", p.name)), real_prune(p)))
    monkeypatch.setattr(ckpt, "_make_room", lambda *a, _real=ckpt._make_room: (_real(*a), free.update(bytes=10 ** 12)))
    ckpt.save(short, 4, _state(model, opt, scaler, 4), keep=2)
    monkeypatch.undo()
    ckpt.save(roomy, 4, _state(model, opt, scaler, 4), keep=2)
    assert sorted(p.name for p in short.iterdir()) == sorted(p.name for p in roomy.iterdir()) \
        == ["step-000003", "step-000004"]
    assert order[:2] == [("delete", "step-000002"), ("delete", "step-000001")]  # before the write


def test_short_disk_says_which_keep_would_fit(tmp_path, monkeypatch):
    model, opt, scaler = _save_steps(tmp_path, [1, 2, 3], keep=3)
    size = sum(f.stat().st_size for f in (tmp_path / "step-000003").iterdir())
    need = ckpt._tensor_bytes(_state(model, opt, scaler, 4)) + (1 << 20)
    _fake_free(monkeypatch, {"bytes": need - size * 3 // 2})  # keep=3 prunes one first: not enough; two would do
    with pytest.raises(storage.StorageError, match="lower run.keep_checkpoints to 2"):
        ckpt.save(tmp_path, 4, _state(model, opt, scaler, 4), keep=3)
    _fake_free(monkeypatch, {"bytes": 1000})
    with pytest.raises(storage.StorageError, match="keeping fewer checkpoints would not free enough"):
        ckpt.save(tmp_path, 4, _state(model, opt, scaler, 4), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_keep_counts_and_prunes_only_verified_checkpoints(tmp_path):
    model, opt, scaler = _save_steps(tmp_path, [1, 2], keep=2)
    bad = tmp_path / "step-000002" / "state.pt"
    bad.write_bytes(bad.read_bytes()[:-3] + b"abc")  # marker present, file rotted
    ckpt._verified.clear()                            # a new process: nothing verified yet
    with pytest.warns(UserWarning, match="step-000002"):
        ckpt.save(tmp_path, 3, _state(model, opt, scaler, 3), keep=2)
    # the corrupt one neither counts as a kept checkpoint nor is deleted; the good step 1 survives as the backup
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_all_checkpoints_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    _save_steps(tmp_path, [1, 2])
    for name in ("step-000001", "step-000002"):
        f = tmp_path / name / "state.pt"
        f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match="every checkpoint .* is corrupt"):
        ckpt.resolve_resume("auto", tmp_path)
    for name in ("step-000001", "step-000002"):
        (tmp_path / name / "COMPLETE").unlink()       # killed before any marker: a fresh start is right
    assert ckpt.resolve_resume("auto", tmp_path) is None
