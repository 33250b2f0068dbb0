"""Temporal regression data: an .npz of frame sequences, scalar features and targets, checked, split and batched.

The file (tools/make_temporal_regression.py writes a documented synthetic one):
    frames   uint8   [N, T, C, H, W]   T frames of C x H x W pixels per sample (0..255)
    scalars  numbers [N, S]            per-sample features (e.g. km per pixel); S may be 0
    targets  numbers [N] or [N, K]     what to predict, finite, in target units (e.g. km)
    target_names, target_units  optional string arrays [K]
Every array's first axis is the sample axis N. A bad array is a ConfigError that names it and the expected shape.

The loader yields (TemporalBatch(frames (B, T', C, H, W) float normalized, scalars (B, S) standardized), targets
(B, K) float32 in target units, sample indices (B,)); T' = data.frames of the T stored frames, evenly spaced with
the first and the last kept (a displacement over the sequence stays measurable). Order: lib/loaders.py's
_LoaderBase (seeded by (seed, epoch), rank shards, resume at a batch).
"""
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from lib.config import ConfigError
from lib.datasets import mix_seed
from lib.loaders import _LoaderBase
from lib.temporal import TemporalBatch

REQUIRED = ("frames", "scalars", "targets")
EXPECTED = {"frames": "uint8 [N, T, C, H, W]", "scalars": "numbers [N, S]", "targets": "numbers [N] or [N, K]"}


def _fail(path, name, what):
    raise ConfigError(f"{path}: {name} {what}; expected {name} {EXPECTED[name]} (every array's first axis is the "
                      f"sample axis N; tools/make_temporal_regression.py writes a valid file)")


def load_temporal_npz(path):
    """The checked arrays of a temporal .npz: frames uint8 (N, T, C, H, W), scalars float32 (N, S), targets float32
    (N, K), and target names and units (lists of K strings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.root={path} is not a file; write one with python tools/make_temporal_regression"
                                f".py --out={path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"data.root={path} is not an .npz file ({type(e).__name__}: {e})") from None
    if isinstance(npz, np.ndarray):
        raise ConfigError(f"data.root={path} is a .npy file (one array), not an .npz holding "
                          f"{', '.join(REQUIRED)}")
    with npz:
        missing = [k for k in REQUIRED if k not in npz.files]
        if missing:
            raise ConfigError(f"{path} holds {sorted(npz.files)}; missing {', '.join(missing)}: expected frames "
                              f"{EXPECTED['frames']}, scalars {EXPECTED['scalars']}, targets {EXPECTED['targets']}")
        arrays = {}
        for key in REQUIRED + tuple(k for k in ("target_names", "target_units") if k in npz.files):
            try:
                arrays[key] = npz[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise ConfigError(f"{path}: {key} holds Python objects (an object array), which are not loaded; "
                                      f"store numbers") from None
                raise ConfigError(f"{path}: {key} cannot be read, the file is damaged ({e})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ConfigError(f"{path}: {key} cannot be read, the file is damaged ({type(e).__name__}: {e})") \
                    from None
    frames, scalars, targets = arrays["frames"], arrays["scalars"], arrays["targets"]
    if frames.dtype != np.uint8:
        _fail(path, "frames", f"has dtype {frames.dtype}")
    if frames.ndim != 5:
        _fail(path, "frames", f"has shape {frames.shape} ({frames.ndim} dims)")
    n = frames.shape[0]
    if min(frames.shape) == 0:
        _fail(path, "frames", f"has shape {frames.shape}, with an empty axis")
    if scalars.dtype.kind not in "biuf":
        _fail(path, "scalars", f"has dtype {scalars.dtype}")
    if scalars.ndim != 2:
        _fail(path, "scalars", f"has shape {scalars.shape} ({scalars.ndim} dims)")
    if targets.dtype.kind not in "biuf":
        _fail(path, "targets", f"has dtype {targets.dtype}")
    if targets.ndim not in (1, 2):
        _fail(path, "targets", f"has shape {targets.shape} ({targets.ndim} dims)")
    for name, array in (("scalars", scalars), ("targets", targets)):
        if array.shape[0] != n:
            _fail(path, name, f"has {array.shape[0]} samples (shape {array.shape}) but frames has N={n}")
        bad = ~np.isfinite(array.astype(np.float64)).reshape(n, -1).all(axis=1)
        if bad.any():
            _fail(path, name, f"holds non-finite values (NaN or inf) in {int(bad.sum())} sample(s), the first at "
                              f"index {int(np.argmax(bad))}")
    targets = targets.reshape(n, -1).astype(np.float32)
    k = targets.shape[1]
    names = [str(s) for s in arrays.get("target_names", [f"target{i}" for i in range(k)])]
    units = [str(s) for s in arrays.get("target_units", [""] * k)]
    if len(names) != k or len(units) != k:
        raise ConfigError(f"{path}: target_names and target_units must hold one string per target column (K={k}); "
                          f"got {len(names)} and {len(units)}")
    return {"frames": frames, "scalars": scalars.astype(np.float32), "targets": targets, "names": names,
            "units": units}


def frame_indices(stored, wanted):
    """Indices of `wanted` of `stored` frames, evenly spaced, first and last included (0 = all)."""
    if wanted in (0, stored):
        return list(range(stored))
    if not 1 <= wanted <= stored:
        raise ConfigError(f"data.frames={wanted} but the file holds {stored} frames per sample; use 1..{stored} "
                          f"(0 = all)")
    if wanted == 1:
        return [stored - 1]
    return sorted({round(i * (stored - 1) / (wanted - 1)) for i in range(wanted)})


class TemporalLoader(_LoaderBase):
    """Batches of (TemporalBatch, targets, index) on `device`; frames stay uint8 until a batch is gathered."""

    def __init__(self, frames, scalars, targets, batch_size, *, device, frame_mean, frame_std, **kw):
        self.frames, self.scalars, self.targets = frames, scalars, targets
        self.device = torch.device(device)
        self.frame_scale = (1.0 / frame_std).view(1, 1, -1, 1, 1).to(device)           # (1, 1, C, 1, 1)
        self.frame_shift = (-frame_mean / frame_std).view(1, 1, -1, 1, 1).to(device)
        super().__init__(len(targets), batch_size, resolution=int(frames.shape[-1]), **kw)

    def __iter__(self):
        order = self._order.to(self.frames.device)
        for start, end in self._batch_ranges():
            index = order[start:end]
            x = self.frames[index].to(self.device, non_blocking=True).float()         # (B, T, C, H, W)
            x = torch.addcmul(self.frame_shift, x, self.frame_scale)
            yield (TemporalBatch(x, self.scalars[index].to(self.device, non_blocking=True)),
                   self.targets[index].to(self.device, non_blocking=True), index.to(self.device))


def build_temporal(cfg, device, batch_size, eval_batch_size, seed, rank, world_size):
    """Read, check and split data.root (data.test_fraction, by seed); returns lib.data.Data with loaders."""
    from lib.data import Data
    if cfg.task != "regression":
        raise ConfigError("data.name=temporal holds regression targets: set data.task=regression")
    arrays = load_temporal_npz(cfg.root)
    keep = frame_indices(arrays["frames"].shape[1], cfg.frames)
    frames = torch.from_numpy(np.ascontiguousarray(arrays["frames"][:, keep]))          # (N, T', C, H, W) uint8
    scalars, targets = torch.from_numpy(arrays["scalars"]), torch.from_numpy(arrays["targets"])
    n = len(targets)
    n_test = max(1, int(round(n * cfg.test_fraction)))
    if n - n_test < 1:
        raise ConfigError(f"{cfg.root} holds {n} samples: too few to hold out data.test_fraction={cfg.test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, 7)))
    train, test = perm[n_test:], perm[:n_test]
    # statistics of the training split only: frames per channel, scalars and targets per column
    c = frames.shape[2]
    sample = frames[train].transpose(1, 2).reshape(len(train), c, -1).double()          # (N, C, T'HW)
    frame_mean, frame_std = sample.mean((0, 2)).float(), sample.std((0, 2)).clamp_min(1e-3).float()
    s_mean, s_std = scalars[train].mean(0), scalars[train].std(0, unbiased=False).clamp_min(1e-6)
    scalars = (scalars - s_mean) / s_std
    t_mean, t_std = targets[train].mean(0), targets[train].std(0, unbiased=False).clamp_min(1e-6)
    size_gb = frames.numel() / 1e9
    store = device if size_gb <= cfg.resident_max_gb else torch.device("cpu")  # else batches are copied over
    pin = store.type == "cpu" and device.type == "cuda"
    common = dict(device=device, frame_mean=frame_mean, frame_std=frame_std, seed=seed, rank=rank,
                  world_size=world_size)
    loaders = [TemporalLoader(frames[idx].pin_memory() if pin else frames[idx].to(store), scalars[idx].to(store),
                              targets[idx].to(store), bs, train=is_train, **common)
               for idx, bs, is_train in ((train, batch_size, True), (test, eval_batch_size, False))]
    return Data(train=loaders[0], test=loaders[1], num_classes=targets.shape[1], in_channels=c,
                image_size=int(frames.shape[-1]), num_train=len(train), num_test=len(test), task="regression",
                mean=tuple(frame_mean.tolist()), std=tuple(frame_std.tolist()),
                classes=list(arrays["names"]),
                temporal={"frames": len(keep), "stored_frames": int(arrays["frames"].shape[1]),
                          "num_scalars": int(scalars.shape[1]), "target_mean": t_mean.tolist(),
                          "target_std": t_std.tolist(), "names": arrays["names"], "units": arrays["units"]})
