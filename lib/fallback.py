"""What a training step does when it runs out of memory: memory.fallback, the ladder of lib/loop.py's OOM handling.

    memory.fallback=micro_batch  halve the micro-batch (accumulating more steps) down to 1, then stop: the loop's
                                 behaviour before the ladder, and the default
    memory.fallback=auto         walk the ladder, one rung per out-of-memory step, in this order:
        1 micro_batch        halve the micro-batch down to memory.min_micro_batch; accumulation keeps the effective
                             batch (the optimizer's batch) unchanged
        2 compile_off        run the model uncompiled (compiled graphs and CUDA-graph pools hold memory of their own)
        3 checkpoint_frames  per-frame activation checkpointing on (model.temporal.checkpoint_frames)
        4 fewer_frames       fewer frames per sample (data.frames), evenly spaced, first and last kept; repeated down
                             to memory.min_frames
        5 small_model        the small width preset (model.temporal.widths=small)
    memory.fallback=strict       the same ladder without the rungs that change the model or the data (4 and 5): where
                                 auto would take one, the run stops and says why. Rungs 1-3 compute the same model on
                                 the same data (the temporal model uses GroupNorm, so neither micro-batches nor a
                                 recomputed forward change its numbers); strict allows them.
Rungs 1-3 act in place and training goes on from the failed step (no update lost or applied twice). Rungs 4 and 5
change what is trained, so the run restarts from step 0 with the new settings (`Restart`); checkpoints of the
abandoned settings are moved to checkpoints-before-fallback-<k>/. Every rung taken is logged; config.yaml then holds
the effective settings plus a `memory_fallback` note (the rungs, the requested values of the keys they changed), the
run summary (result.json, compare.md) lists them, and a rerun resumes with the effective settings. A rung that does
not apply (no compiled model, a model without frames) is skipped. The ladder runs in one process: under torchrun a
rank cannot change its model alone, so auto and strict are refused there.
"""
from dataclasses import dataclass
from pathlib import Path

import yaml

from lib import checkpoint
from lib.config import ConfigError, merge, to_dict

MODES = ("micro_batch", "auto", "strict")
RUNGS = ("micro_batch", "compile_off", "checkpoint_frames", "fewer_frames", "small_model")
CHANGES_MODEL_OR_DATA = ("fewer_frames", "small_model")
NOTE_KEY = "memory_fallback"


@dataclass
class MemoryConfig:
    fallback: str = "micro_batch"   # on out of memory: micro_batch (halve it down to 1, then stop) | auto (the ladder
                                    # of lib/fallback.py) | strict (the ladder without model- or data-changing rungs)
    min_micro_batch: int = 1        # auto / strict: the micro-batch rung halves down to this many samples
    min_frames: int = 2             # auto: the fewer-frames rung goes down to this many frames

    def validate(self):
        if self.fallback not in MODES:
            raise ConfigError(f"memory.fallback must be one of {', '.join(MODES)}, got '{self.fallback}'")
        if self.min_micro_batch < 1 or self.min_frames < 1:
            raise ConfigError("memory.min_micro_batch and memory.min_frames must be >= 1")


class Restart(Exception):
    """A model- or data-changing rung was taken: rebuild the run from step 0 with the ladder's effective config."""


class MemoryFallbackError(RuntimeError):
    """Out of memory with no rung left (or, under strict, only refused ones): the message says what was tried."""


def _set(nested, dotted, value):
    *path, last = dotted.split(".")
    for part in path:
        nested = nested.setdefault(part, {})
    nested[last] = value


def _apply(cfg, overrides):
    """`cfg` with {dotted key: value} applied (a new config; merge copies)."""
    nested = {}
    for key, value in overrides.items():
        _set(nested, key, value)
    return merge(cfg, nested) if nested else cfg


def _get(cfg, dotted):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _largest_divisor_at_most(n, cap):
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


class MemoryLadder:
    """The OOM handler a TrainStep calls (`on_oom`), for one training run (all its restarts)."""

    def __init__(self, cfg, run_dir, world_size=1, log=print):
        self.requested, self.mode, self.log = cfg, cfg.memory.fallback, log
        self.run_dir = Path(run_dir)
        if self.mode != "micro_batch" and world_size > 1:
            raise ConfigError(f"memory.fallback={self.mode} runs in one process; under torchrun set the memory "
                              f"settings explicitly (loop.micro_batch, model.temporal.checkpoint_frames, data.frames, "
                              f"model.temporal.widths) or use memory.fallback=micro_batch")
        self.records = []           # every rung taken, in order
        self.overrides = {}         # dotted key -> effective value
        self.done = set()           # rungs that are used up or do not apply
        self.target = None          # what the in-place rungs act on: has .model and .step_fn
        self.restarts = 0
        self._restore()

    @property
    def active(self):
        return self.mode != "micro_batch"

    # ---- the effective config and its note
    def effective_config(self):
        """The requested config with the rungs' changes applied."""
        return _apply(self.requested, self.overrides)

    def note(self):
        """The `memory_fallback` entry of config.yaml: the rungs taken, what they changed, the requested values."""
        return {"mode": self.mode, "steps": [r["text"] for r in self.records],
                "changes_model_or_data": [r["text"] for r in self.records if r["changes_model_or_data"]],
                "effective": dict(self.overrides),
                "requested": {k: _get(self.requested, k) for k in self.overrides}}

    def write_note(self, run_dir=None):
        """Rewrite config.yaml as the effective config plus the note (nothing to do before a rung is taken)."""
        if not self.records:
            return
        path = Path(run_dir or self.run_dir) / "config.yaml"
        data = to_dict(self.effective_config())
        data[NOTE_KEY] = self.note()
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    def _restore(self):
        """A rerun of a run whose rungs changed its settings continues with them (the checkpoint was made so)."""
        path = self.run_dir / "config.yaml"
        if self.requested.run.resume == "none" or not path.is_file():
            return
        if not (any(self.run_dir.glob("checkpoints/step-*/COMPLETE")) or (self.run_dir / "result.json").is_file()):
            return
        note = (yaml.safe_load(path.read_text()) or {}).get(NOTE_KEY)
        if note:
            self.overrides = dict(note.get("effective", {}))
            self.records = [{"rung": "restored", "text": t, "changes_model_or_data": t in note.get(
                "changes_model_or_data", []), "at_step": None} for t in note.get("steps", [])]
            self.log(f"[memory fallback] {self.run_dir.name}: continuing with the settings of earlier fallbacks: "
                     f"{self.overrides}")

    def set_aside_checkpoints(self):
        """Checkpoints of the settings a restart abandons: moved to checkpoints-before-fallback-<k>/."""
        ckpt = self.run_dir / "checkpoints"
        if ckpt.is_dir() and any(ckpt.iterdir()):
            ckpt.rename(self.run_dir / f"checkpoints-before-fallback-{self.restarts}")

    # ---- the ladder
    def attach(self, target):
        """Act on `target.model` (possibly compiled) and `target.step_fn` from now on."""
        self.target = target

    def __call__(self, step_fn, batch):
        """One out-of-memory step: take the next rung that applies (in place or by raising Restart)."""
        for rung in RUNGS:
            if rung in self.done:
                continue
            change = getattr(self, f"_{rung}")(step_fn, batch)
            if change is None:
                self.done.add(rung)
                continue
            text, updates = change
            if rung in CHANGES_MODEL_OR_DATA and self.mode == "strict":
                raise MemoryFallbackError(
                    f"out of memory at step {step_fn.step}; memory.fallback=strict refuses the next rung, {text}, "
                    f"which changes the {'data' if rung == 'fewer_frames' else 'model'}. Tried: "
                    f"{'; '.join(r['text'] for r in self.records) or 'nothing else applied'}. Set memory.fallback="
                    f"auto to allow it, or set it yourself (lower loop.global_batch, data.frames, "
                    f"model.temporal.widths)")
            self.overrides.update(updates)
            record = {"rung": rung, "text": text, "changes_model_or_data": rung in CHANGES_MODEL_OR_DATA,
                      "at_step": step_fn.step}
            self.records.append(record)
            self.log(f"[memory fallback] step {step_fn.step}: out of memory; {text}"
                     + ("; restarting the run from step 0 with it" if record["changes_model_or_data"] else ""))
            self.write_note()
            if record["changes_model_or_data"]:
                self.restarts += 1
                raise Restart(text)
            return
        tried = "; ".join(r["text"] for r in self.records) or "no rung applied"
        raise MemoryFallbackError(f"out of memory at step {step_fn.step} after every memory fallback ({tried}); "
                                  f"lower loop.global_batch or the input size")

    def _raw(self):
        return checkpoint.unwrap(self.target.model)

    def _micro_batch(self, step_fn, batch):
        current = step_fn.micro_batch or batch
        smaller = current // 2
        if smaller < self.requested.memory.min_micro_batch or smaller < 1:
            return None
        step_fn.micro_batch = smaller
        step_fn.oom_retries += 1
        per_rank = self.requested.loop.global_batch  # one process (see __init__)
        return (f"micro-batch {current} -> {smaller} ({-(-batch // smaller)} accumulation steps; effective batch "
                f"unchanged)", {"loop.micro_batch": _largest_divisor_at_most(per_rank, smaller)})

    def _compile_off(self, step_fn, batch):
        model = self.target.model
        if not hasattr(model, "_orig_mod"):
            return None
        self.target.model = step_fn.model = model._orig_mod
        return "torch.compile off", {"loop.compile": False}

    def _checkpoint_frames(self, step_fn, batch):
        raw = self._raw()
        if getattr(raw, "checkpoint_frames", True):  # on already, or a model without frames
            return None
        raw.checkpoint_frames = True
        how = {"selective": "selective", "first_stage": "first-stage per-frame"}.get(raw.cfg.checkpoint_mode,
                                                                                    "per-frame")
        return f"{how} activation checkpointing on", {"model.temporal.checkpoint_frames": True}

    def _fewer_frames(self, step_fn, batch):
        frames = getattr(self._raw(), "frames", None)
        floor = self.requested.memory.min_frames
        if frames is None or frames <= floor:
            return None
        fewer = max(floor, (frames + 1) // 2)
        return f"fewer frames {frames} -> {fewer} (data.frames)", {"data.frames": fewer}

    def _small_model(self, step_fn, batch):
        from lib.temporal import WIDTH_PRESETS, parse_widths
        raw = self._raw()
        if getattr(raw, "cfg", None) is None or not hasattr(raw.cfg, "widths"):
            return None
        current = parse_widths(raw.cfg.widths)
        if all(c <= s for c, s in zip(current, WIDTH_PRESETS["small"])):
            return None
        widths = "/".join(map(str, current))
        return f"small model, widths {widths} -> 32/64/128 (model.temporal.widths)", {"model.temporal.widths": "small"}


def saved_effective(cfg, run_dir):
    """The config a finished or checkpointed run in run_dir actually used: `cfg` with its fallback note applied."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return cfg
    note = (yaml.safe_load(path.read_text()) or {}).get(NOTE_KEY)
    return _apply(cfg, note.get("effective", {})) if note else cfg
