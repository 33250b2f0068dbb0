"""Checkpoints: atomic step-N saves with a completion marker, keep-newest-k, verified resume, preemption flag.

Layout: `ckpt_dir/step-000123/state.pt` plus `ckpt_dir/step-000123/COMPLETE`. The state file is
written to a temp file, fsynced, os.replace'd and the folder fsynced; the COMPLETE marker (JSON with
the file's size and sha256) is written the same way, last. A folder without COMPLETE does not exist
(killed saves are removed by `remove_partial` and by the next save), one whose file no longer matches its
marker is skipped with a warning and never counted or pruned, and if every checkpoint is corrupt,
resume: auto is a CheckpointError rather than a silent restart. When the disk is short, the checkpoints a
save would prune are pruned before it writes; a full disk (also inside torch's zip writer) is a StorageError.

The saved dict holds only tensors, dicts, lists, tuples, str, int, float, bool and None so that it
loads with torch.load(weights_only=True): the model is saved unwrapped (no `module.`/`_orig_mod.`),
RNG states are converted to lists/tensors, and the config must be plain data (lib.config.to_dict).

Scripts use this through lib/run.py (Run.resume, Run.save, Run.should_stop); training_state and
restore_training are what a training script saves and loads. One purpose (checkpoint files and the
preemption flag that triggers the last one), hence a little over 500 lines.
"""
import collections
import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
import time
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from lib.storage import StorageError, atomic_write_json, disk_full_error, format_bytes, free_bytes, fsync_dir

STATE_FILE = "state.pt"
MARKER_FILE = "COMPLETE"
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (missing, partial, corrupt, not plain data); the message says why."""


# ---------------------------------------------------------------- model unwrapping

def unwrap(model) -> nn.Module:
    """Strip DDP/DataParallel `.module` and torch.compile `._orig_mod` wrappers, repeatedly."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, nn.Module) and [n for n, _ in model.named_children()] == ["module"] \
                and not any(True for _ in model.named_parameters(recurse=False)) \
                and not any(True for _ in model.named_buffers(recurse=False)):
            # any other pure wrapper (FSDP-style, custom DDP) whose only content is `.module`
            model = model.module
        else:
            return model


def _strip_key(key: str) -> str:
    return ".".join(part for part in key.split(".") if part != "_orig_mod")


def strip_prefixes(state_dict: dict) -> dict:
    """Drop `_orig_mod` path segments anywhere and `module.` prefixes shared by every key (repeatedly)."""
    keys = [_strip_key(k) for k in state_dict]
    depth = 0  # how many leading `module.` wrappers every key shares
    while keys and all(k.split(".")[depth:depth + 1] == ["module"] and k.count(".") > depth for k in keys):
        depth += 1
    out = collections.OrderedDict(
        (".".join(_strip_key(k).split(".")[depth:]), v) for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module versions that load_state_dict uses (e.g. BatchNorm)
        new_meta = collections.OrderedDict()
        for k, v in metadata.items():
            parts = _strip_key(k).split(".") if k else []
            if parts[:depth] == ["module"] * depth:
                new_meta.setdefault(".".join(parts[depth:]), v)  # entries of the wrappers themselves drop out
        out._metadata = new_meta
    return out


def model_state(model) -> dict:
    """The unwrapped model's state_dict with any `module.`/`_orig_mod.` prefixes stripped."""
    return strip_prefixes(unwrap(model).state_dict())


# ---------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """Current RNG states as plain data: python, numpy, torch CPU, and CUDA (all devices, if in use)."""
    version, internal, gauss_next = random.getstate()
    state = {"python": [version, list(internal), gauss_next], "torch": torch.get_rng_state()}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
        state["numpy"] = [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                          float(cached_gaussian)]
    except ImportError:
        pass
    # only if CUDA is in use: querying it would otherwise create a CUDA context in CPU-only runs
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(rng_state: dict):
    """Restore python/numpy/torch/CUDA RNG states saved by `save` (or `rng_state`)."""
    if not isinstance(rng_state, dict):
        raise CheckpointError(f"rng state must be the dict saved in checkpoint['rng'], got {type(rng_state).__name__}")
    if "python" in rng_state:
        version, internal, gauss_next = rng_state["python"]
        random.setstate((version, tuple(internal), gauss_next))
    if "numpy" in rng_state:
        import numpy as np
        name, keys, pos, has_gauss, cached_gaussian = rng_state["numpy"]
        np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    if "torch" in rng_state:
        torch.set_rng_state(rng_state["torch"].cpu())  # a map_location="cuda" load must not break this
    if "cuda" in rng_state:
        saved = [t.cpu() for t in rng_state["cuda"]]
        if not torch.cuda.is_available():
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(saved)} device(s) but CUDA is not "
                          f"available; CUDA random draws will not continue the saved stream")
            return
        count = torch.cuda.device_count()
        if count != len(saved):
            warnings.warn(f"checkpoint holds CUDA RNG states for {len(saved)} device(s), this process sees "
                          f"{count}; restoring the first {min(count, len(saved))}")
        for device, state in enumerate(saved[:count]):
            torch.cuda.set_rng_state(state, device)


# ---------------------------------------------------------------- save

_PLAIN = (str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device)


def _check_plain(obj, where="state"):
    """Fail now, naming the key, if `obj` holds something torch.load(weights_only=True) would refuse."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in (dict, collections.OrderedDict):
        for k, v in obj.items():
            if type(k) not in (str, int, float, bool, type(None)):
                raise CheckpointError(f"{where} has a key of type {type(k).__name__} ({k!r}); use str/int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where} is a {type(obj).__module__}.{type(obj).__name__}, which a weights_only load refuses; store plain "
        f"data instead (configs: lib.config.to_dict(cfg); numpy arrays: torch.from_numpy; objects: their state_dict())")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes() if obj.device.type != "meta" else 0
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class _HashingWriter:
    """File wrapper that hashes bytes on their way to disk, so the marker's sha256 costs no re-read."""

    def __init__(self, f):
        self.f, self.sha256, self.bytes = f, hashlib.sha256(), 0

    def write(self, data):
        self.sha256.update(data)
        n = self.f.write(data)
        self.bytes += memoryview(data).nbytes
        return n

    def flush(self):
        self.f.flush()


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every step-N folder, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, key=lambda t: t[0], reverse=True)


def _delete_checkpoint(path: Path):
    # marker first: a crash halfway through the rmtree leaves a partial checkpoint, never a broken "complete" one
    (path / MARKER_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
    _verified.pop(path, None)


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


# step folders whose state file matched its marker: {folder: (size, mtime_ns, sha256)}. A folder written by this
# process is verified by construction (hashed on its way to disk), so keep-k does not re-read what it wrote;
# resuming (`latest`) always hashes.
_verified = {}
_warned = set()  # corrupt folders already reported by save


def _fingerprint(step_dir: Path):
    try:
        st = (step_dir / STATE_FILE).stat()
        return st.st_size, st.st_mtime_ns, json.loads((step_dir / MARKER_FILE).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_verified(step_dir: Path) -> bool:
    """True if step_dir is a complete checkpoint whose file matches its marker (hashed once per process)."""
    found = _fingerprint(step_dir)
    if found is not None and _verified.get(step_dir) == found:
        return True
    if _check_complete(step_dir) is not None:
        return False
    _verified[step_dir] = _fingerprint(step_dir)
    return True


def remove_partial(ckpt_dir) -> list[Path]:
    """Delete what killed saves left behind: step folders without a marker and temp files; returns the folders.

    Folders with a marker that does not match are kept (they may be inspected) and never count as complete.
    """
    removed = []
    for _, step_dir in _step_dirs(Path(ckpt_dir)):
        if not (step_dir / MARKER_FILE).exists():
            _delete_checkpoint(step_dir)
            removed.append(step_dir)
        else:
            for tmp in step_dir.glob(f".{STATE_FILE}.tmp.*"):
                tmp.unlink(missing_ok=True)
    if removed:
        fsync_dir(ckpt_dir)
    return removed


def _make_room(ckpt_dir: Path, step_dir: Path, need: int, keep: int, step: int):
    """Before writing: if the disk is short, delete now the verified checkpoints this save prunes anyway.

    The newest verified checkpoint always survives until the new one is complete; if that is not enough room,
    StorageError says how much is missing and whether a lower keep would do.
    """
    free = free_bytes(ckpt_dir)
    if free >= need:
        return
    complete = [p for _, p in _step_dirs(ckpt_dir) if p != step_dir and _is_verified(p)]   # newest first
    freed = lambda k: sum(_folder_bytes(p) for p in complete[max(k - 1, 1):])  # noqa: E731
    if free + freed(keep) >= need:
        for old in complete[max(keep - 1, 1):]:
            _delete_checkpoint(old)
        fsync_dir(ckpt_dir)
        return
    fits = [k for k in range(keep - 1, 0, -1) if free + freed(k) >= need]
    advice = (f"lower run.keep_checkpoints to {fits[0]} (that prunes enough before writing)" if fits else
              "delete old runs or set the checkpoint folder to a larger disk (keeping fewer checkpoints would not "
              "free enough)")
    raise StorageError(errno.ENOSPC,
                       f"not enough disk space for checkpoint step {step}: need {format_bytes(need)}, "
                       f"only {format_bytes(free)} free under {ckpt_dir}, and pruning to keep={keep} frees only "
                       f"{format_bytes(freed(keep))}; {advice}. Older checkpoints are intact")


def _raise_if_disk_full(exc: BaseException, what: str, need: int, free_before: int):
    """Turn a failed write whose cause is a full disk (also inside torch's RuntimeError) into a StorageError."""
    if disk_full_error(exc) is None:
        return
    raise StorageError(errno.ENOSPC, f"disk full while writing {what} (needs about {format_bytes(need)}, "
                                     f"{format_bytes(free_before)} were free); the partial file was removed and "
                                     f"older checkpoints are intact. Free space, lower run.keep_checkpoints, or "
                                     f"use a larger disk") from exc


def save(ckpt_dir, step: int, state: dict, keep: int = 3) -> Path:
    """Write `state` as ckpt_dir/step-N atomically (marker last), keeping the newest `keep` verified ones; rank 0.

    Adds state["rng"] (python, numpy, torch, CUDA) unless present. When the disk is short, the checkpoints that
    would be pruned after the write are pruned before it. Only checkpoints whose file matched their marker are
    counted or pruned; folders without a marker (killed saves) older than `step` are removed. Returns the folder.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step must be an int >= 0, got {step!r}")
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be >= 1 (checkpoints to keep), got {keep!r}")
    if not isinstance(state, dict):
        raise CheckpointError(f"state must be a dict, got {type(state).__name__}")
    if "rng" not in state:
        state = {**state, "rng": rng_state()}
    _check_plain(state)

    ckpt_dir = Path(ckpt_dir)
    step_dir = ckpt_dir / f"step-{step:06d}"
    newer = [p.name for s, p in _step_dirs(ckpt_dir) if s > step and (p / MARKER_FILE).exists()]
    if newer:
        warnings.warn(f"saving step {step} into {ckpt_dir}, which already holds newer checkpoints {newer} "
                      f"(from another run?); resume: auto will pick those. Use a fresh checkpoint folder.")
    need = _tensor_bytes(state) + (1 << 20)  # tensor payload + 1 MiB for pickle/zip overhead
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    _make_room(ckpt_dir, step_dir, need, keep, step)
    step_dir.mkdir(exist_ok=True)
    fsync_dir(ckpt_dir)
    if (step_dir / MARKER_FILE).exists():  # re-saving a step: it stops counting as complete until rewritten
        (step_dir / MARKER_FILE).unlink()
        fsync_dir(step_dir)

    final = step_dir / STATE_FILE
    tmp = step_dir / f".{STATE_FILE}.tmp.{os.getpid()}"
    free_before = free_bytes(ckpt_dir)
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(step_dir)
        atomic_write_json(step_dir / MARKER_FILE, {
            "step": step, "file": STATE_FILE, "bytes": writer.bytes, "sha256": writer.sha256.hexdigest(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__})
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not (step_dir / MARKER_FILE).exists() and final.exists() and isinstance(e, Exception):
            final.unlink()  # written but never marked: it does not exist, and it holds disk space
        if not any(step_dir.iterdir()):
            step_dir.rmdir()  # leave no empty partial folder behind
        if isinstance(e, Exception):
            _raise_if_disk_full(e, f"checkpoint step {step} to {step_dir}", need, free_before)
        raise
    _verified[step_dir] = _fingerprint(step_dir)

    # prune after the new checkpoint is complete: the newest `keep` verified ones stay, the new one among them
    complete = [p for _, p in _step_dirs(ckpt_dir) if p != step_dir and _is_verified(p)]
    corrupt = [p for _, p in _step_dirs(ckpt_dir) if (p / MARKER_FILE).exists() and p != step_dir
               and p not in complete and p not in _warned]
    if corrupt:
        _warned.update(corrupt)
        warnings.warn(f"checkpoint(s) {[p.name for p in corrupt]} in {ckpt_dir} do not match their marker: left on "
                      f"disk for you to inspect or delete, never counted among the {keep} kept")
    for old in complete[keep - 1:]:
        _delete_checkpoint(old)
    for s, partial in _step_dirs(ckpt_dir):  # leftovers of interrupted older saves (no marker: never complete)
        if s < step and not (partial / MARKER_FILE).exists():
            _delete_checkpoint(partial)
    fsync_dir(ckpt_dir)
    return step_dir


# ---------------------------------------------------------------- find / load

def _state_path(path: Path) -> Path:
    return path / STATE_FILE if path.is_dir() else path


def _check_complete(step_dir: Path, verify_hash: bool = True):
    """Return None if step_dir is a complete, intact checkpoint, else the reason it is not."""
    marker_path = step_dir / MARKER_FILE
    if not marker_path.exists():
        return "no COMPLETE marker (interrupted while writing)"
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable COMPLETE marker ({e})"
    state_file = step_dir / STATE_FILE
    if not state_file.is_file():
        return f"{STATE_FILE} is missing"
    if not isinstance(marker, dict) or "sha256" not in marker:  # hand-made marker: fall back to a real load
        try:
            load(state_file)
        except CheckpointError as e:
            return str(e)
        return None
    size = state_file.stat().st_size
    if size != marker.get("bytes"):
        return f"{STATE_FILE} is {size} bytes but the marker says {marker.get('bytes')} (truncated or overwritten)"
    if verify_hash:
        h = hashlib.sha256()
        with open(state_file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != marker["sha256"]:
            return f"{STATE_FILE} does not match the sha256 in its marker (corrupted on disk)"
    return None


def latest(ckpt_dir) -> Path | None:
    """Newest complete, intact step folder in `ckpt_dir` (partial/corrupt ones skipped with a warning), or None."""
    for _, step_dir in _step_dirs(Path(ckpt_dir)):
        reason = _check_complete(step_dir)
        if reason is None:
            _verified[step_dir] = _fingerprint(step_dir)  # the first save's keep-k will not hash it again
            return step_dir
        warnings.warn(f"skipping checkpoint {step_dir}: {reason}")
    return None


def load(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) a step folder or state file; CheckpointError if missing/partial/corrupt."""
    path = Path(path)
    if path.is_dir() and _STEP_DIR_RE.match(path.name) and not (path / MARKER_FILE).exists():
        raise CheckpointError(f"checkpoint {path} has no {MARKER_FILE} marker: it was interrupted while writing. "
                              f"Resume from an older one (resume: auto picks the newest complete one)")
    state_file = _state_path(path)
    if not state_file.is_file():
        raise CheckpointError(f"checkpoint not found: {state_file} (check the resume path; "
                              f"resume: auto picks the newest complete one in the checkpoint folder)")
    try:
        state = torch.load(state_file, map_location=map_location, weights_only=True)
    except Exception as e:  # zip/pickle/EOF errors all mean the same to the user
        unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if unsupported and zipfile.is_zipfile(state_file):
            raise CheckpointError(f"checkpoint {state_file} holds a {unsupported.group(1)} object, which "
                                  f"torch.load(weights_only=True) refuses; it was saved by code that stored objects "
                                  f"instead of plain data. Re-save it with plain data (see lib.checkpoint)") from None
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        raise CheckpointError(f"checkpoint {state_file} is corrupt or truncated ({type(e).__name__}: {detail}); "
                              f"use an older checkpoint (resume: auto skips broken ones)") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {state_file} holds a {type(state).__name__}, expected a dict")
    return state


def resolve_resume(resume: str, ckpt_dir) -> Path | None:
    """'' or 'none' -> None; 'auto' -> latest(ckpt_dir) (None if none yet; CheckpointError if every one is
    corrupt); else a path that must exist."""
    if resume is None or resume.strip().lower() in ("", "none"):
        return None
    if resume.strip().lower() == "auto":
        path = latest(ckpt_dir)
        claimed = [p.name for _, p in _step_dirs(Path(ckpt_dir)) if (p / MARKER_FILE).exists()]
        if path is None and claimed:  # never a silent restart from step 0 over a run that has checkpoints
            raise CheckpointError(f"every checkpoint in {ckpt_dir} is corrupt ({', '.join(claimed[:5])}: the state "
                                  f"file does not match its marker); nothing to resume from. Restore them from a "
                                  f"backup, or move them away to start again from step 0")
        return path
    path = Path(resume).expanduser()
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist; pass an existing step folder or state file, "
                              f"'auto' for the newest checkpoint in {ckpt_dir}, or 'none'")
    if path.is_dir() and not (_STEP_DIR_RE.match(path.name) or (path / STATE_FILE).is_file()):
        raise CheckpointError(f"resume path {path} is a folder but not a step-N checkpoint; pass a step folder "
                              f"such as {path}/step-000100, or resume: auto")
    if path.is_dir():
        reason = _check_complete(path)
        if reason is not None:
            raise CheckpointError(f"cannot resume from {path}: {reason}; pick an older checkpoint or resume: auto")
    return path


def training_state(model, optimizer, step_fn, counters, config, **extra):
    """What a training script checkpoints: unwrapped model, optimizer, loop state, counters, config (plain data)."""
    import copy
    return {"model": model_state(model), "optimizer": optimizer.state_dict(), "loop": step_fn.state_dict(),
            "counters": copy.deepcopy(counters), "config": config, "step": counters["step"],
            "epoch": counters.get("epoch", 0), "batch_in_epoch": counters.get("batch_in_epoch", 0), **extra}


def restore_training(state, model, optimizer, step_fn, counters, rank=0, seed=0):
    """Load what training_state saved. The checkpoint holds rank 0's RNG state: rank 0 restores it, the other
    ranks re-derive theirs from (seed, rank, step) so they do not all draw the same numbers."""
    from lib.dist import seed_everything
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step_fn.load_state_dict(state["loop"])
    counters.update(state["counters"])
    if rank == 0:
        restore_rng(state["rng"])
    else:
        seed_everything(seed + rank + 1_000_003 * counters["step"])


# ---------------------------------------------------------------- preemption

class PreemptionHandler:
    """Install SIGTERM/SIGUSR1 handlers that only set a flag; the loop saves and exits at a step boundary.

    Use as a context manager (handlers are restored on exit). Under torchrun, combine the flag across
    ranks with `sync_requested` so every rank stops at the same step.
    """

    def __init__(self, signals=None):
        if signals is None:
            signals = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))
        self.signals = tuple(signals)
        self._requested = False
        self.received = None  # name of the first signal received
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("PreemptionHandler created outside the main thread: Python only delivers signals to "
                          "the main thread, so preemption signals will not be caught")
            return
        for sig in self.signals:
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        # do no I/O here: the handler may interrupt a print or a write; the loop reports it
        if not self._requested:
            self.received = signal.Signals(signum).name
        self._requested = True

    @property
    def requested(self) -> bool:
        """True once a preemption signal arrived."""
        return self._requested

    def sync_requested(self, device=None) -> bool:
        """`requested` OR-ed over all ranks (a collective: every rank must call it at the same step)."""
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return self._requested
        flag = torch.tensor([1.0 if self._requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._requested = bool(flag.item())  # once combined, every rank holds the same decision
        return self._requested

    def stop_now(self, step, every, device=None) -> bool:
        """At a step boundary: should the run checkpoint and exit? Under torchrun the flag is combined over
        ranks every `every` steps (a collective), so all ranks stop at the same step; alone, at once."""
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return step % every == 0 and self.sync_requested(device)
        return self._requested

    def restore(self):
        """Put back the handlers that were installed before this one."""
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False
