"""lib/memory.py: the micro-batch probe finds the largest fit under an injected budget and OOM."""
import pytest
import torch

from lib import memory
from lib.memory import find_micro_batch, plan_accumulation


@pytest.fixture(autouse=True)
def no_garbage_collection(monkeypatch):
    """The probe frees memory between tries (gc.collect: ~1 s each in a suite's big heap); these probes allocate
    nothing, so the probe logic is tested without it."""
    monkeypatch.setattr(memory, "free_memory", lambda device=None: None)


def probe(limit_bytes, oom_above=None, per_sample=1000):
    state = {"peak": 0, "tried": []}

    def try_step(b):
        state["tried"].append(b)
        if oom_above is not None and b > oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        state["peak"] = 5000 + per_sample * b  # fixed cost + activations

    return state, try_step, (lambda: state["peak"]), (lambda: state.update(peak=0))


@pytest.mark.parametrize("budget,expected", [(5000 + 1000 * 37, 37), (5000 + 1000 * 64, 64), (5000 + 1000 * 3, 3)])
def test_largest_micro_batch_under_budget(budget, expected):
    state, try_step, peak, reset = probe(budget)
    assert find_micro_batch(try_step, start=8, max_batch=64, budget_bytes=budget, measure_peak=peak,
                            reset_peak=reset) == expected


def test_oom_is_a_miss_not_a_crash():
    state, try_step, peak, reset = probe(None, oom_above=20)
    assert find_micro_batch(try_step, start=8, max_batch=256, budget_bytes=None, measure_peak=peak,
                            reset_peak=reset) == 20
    assert any(b > 20 for b in state["tried"])


def test_nothing_fits_is_a_clear_error():
    state, try_step, peak, reset = probe(None, oom_above=0)
    with pytest.raises(torch.OutOfMemoryError, match="even micro-batch 1 does not fit"):
        find_micro_batch(try_step, start=8, max_batch=64, measure_peak=peak, reset_peak=reset)


def test_plan_accumulation_balances_windows():
    assert plan_accumulation(256, 48) == (43, 6)
    assert plan_accumulation(256, 256) == (256, 1)
    assert plan_accumulation(256, 64) == (64, 4)
