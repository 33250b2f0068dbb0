"""Datasets and loaders: synthetic, scikit-learn digits, CIFAR-10/100, ImageFolder (ImageNet layout), .npz arrays.

    data = build_data(DataConfig(name="cifar10", root="data", download=True), device, batch_size=256)
    for epoch in range(epochs):
        data.train.set_epoch(epoch)                 # order, augmentation and resolution of this epoch
        for images, labels, index in data.train:    # all on `device`; index = dataset indices (B,)
            ...

Three loaders, one protocol (set_epoch / iter / len / batch_size / skipped / resolution):
  ResidentLoader     datasets that fit in device memory: stored uint8 on the device, batches gathered, cropped,
                     flipped and normalized there; no worker processes.
  ArrayLoader        the same arrays through a torch DataLoader (workers, pinned memory, persistent workers).
  ImageFolderLoader  files on disk. decode="gpu" (loader=jpeg): workers read bytes; one thread decodes batches
                     with nvJPEG, a second crops/resizes/normalizes them on the GPU, each on its own
                     high-priority stream, `prefetch` batches ahead of training; files nvJPEG should not get
                     (CMYK, grayscale, progressive, PNG) are decoded by PIL in the workers, counted in
                     `loader.fallback`.
                     decode="pil" (loader=dataloader): PIL in the workers, the standard CPU path.
Every random choice is a function of (seed, epoch, position or index), so set_epoch(e, start_batch=k) resumes
with exactly the batches an uninterrupted run would have produced. Unreadable image files are skipped, counted
(`loader.skipped`, `loader.skipped_files`) and replaced by the next readable file; training stops only when more
than data.max_skipped_fraction of the files are unreadable.
"""
import contextlib
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib import jpeg
from lib.config import ConfigError
from lib.dist import barrier, shard_positions

# CUDA feeds all streams of a process through CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 unless set). nvJPEG
# decodes on about 14 streams of its own, so some share a queue with the training stream and wait behind every
# kernel queued there: on an H100 a batch took 69 ms to decode during ResNet-50 training instead of 29 ms, and
# new_vs_resident fell from 0.93 to 0.84 (docs/bench/data_pipeline_history/). CUDA reads the value once, when it
# starts, so it is set here, at import, unless the user chose one.
CUDA_CONNECTIONS = "32"
CUDA_CONNECTIONS_SET_LATE = "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ and torch.cuda.is_initialized()
if not CUDA_CONNECTIONS_SET_LATE:
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_CONNECTIONS)

NAMES = ("synthetic", "digits", "cifar10", "cifar100", "imagefolder", "npz")
LOADERS = ("auto", "resident", "dataloader", "jpeg")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGEFOLDER_DEFAULT_SIZE = 224  # px, when data.image_size = 0
SYNTHETIC_DEFAULT_SIZE = 32     # px, when data.image_size = 0
MAX_SKIP_MESSAGES = 10          # print the first few unreadable files; all are listed by skip_report()


@dataclass
class DataConfig:
    name: str = "digits"            # synthetic | digits | cifar10 | cifar100 | imagefolder | npz
    root: str = "data"              # cifar download dir, ImageFolder root (train/ and val/ inside), or .npz path
    download: bool = False          # cifar only: download when missing (otherwise a clear error says how)
    image_size: int = 0             # training resolution in px; 0 = native (imagefolder: 224, synthetic: 32)
    num_classes: int = 10           # synthetic only
    train_samples: int = 2048       # synthetic only
    test_samples: int = 512         # synthetic only
    test_fraction: float = 0.2      # digits / npz without a split: held-out fraction (deterministic by seed)
    loader: str = "auto"            # auto | resident | dataloader | jpeg (auto: resident if it fits in
                                    # resident_max_gb; imagefolder: jpeg on CUDA, else dataloader)
    resident_max_gb: float = 4.0    # GB of device memory the resident loader may hold (train + test)
    workers: int = 4                # dataloader / jpeg worker processes (0 = in the main process)
    prefetch: int = 2               # batches each worker prepares ahead; jpeg: GPU batches decoded ahead
    augment: bool = True            # train only: pad-crop (pad = size/8) for arrays, random-resized-crop for
                                    # imagefolder, + horizontal flip
    resize_schedule: dict[int, int] = field(default_factory=dict)  # {epoch: px} progressive resizing (train
                                    # loader; test stays at image_size); empty = fixed
    channels_last: bool = True      # images in channels_last memory format
    max_skipped_fraction: float = 0.01  # imagefolder: stop when more than this fraction of files is unreadable
    cpu_decode_fraction: float = 0.0    # jpeg loader: share of each batch decoded by PIL in the workers instead
                                        # of nvJPEG (measured slower on an H100 at 0.25-0.5; for GPUs without
                                        # hardware JPEG engines, where nvJPEG decodes on the SMs)

    def validate(self):
        if self.name not in NAMES:
            raise ConfigError(f"data.name must be one of {', '.join(NAMES)}; got '{self.name}'")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader must be one of {', '.join(LOADERS)}; got '{self.loader}'")
        if self.loader == "resident" and self.name == "imagefolder":
            raise ConfigError("data.loader=resident does not support imagefolder (files of different sizes); "
                              "use data.loader=jpeg (GPU decode) or data.loader=dataloader (PIL)")
        if self.loader == "jpeg" and self.name != "imagefolder":
            raise ConfigError(f"data.loader=jpeg decodes image files and needs data.name=imagefolder; "
                              f"for '{self.name}' use auto, resident or dataloader")
        if self.image_size < 0:
            raise ConfigError(f"data.image_size must be >= 0 (0 = native size), got {self.image_size}")
        if self.num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {self.num_classes}")
        if self.train_samples < 1 or self.test_samples < 1:
            raise ConfigError("data.train_samples and data.test_samples must be >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.resident_max_gb <= 0:
            raise ConfigError(f"data.resident_max_gb must be > 0, got {self.resident_max_gb}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be >= 1, got {self.prefetch}")
        if not 0.0 <= self.cpu_decode_fraction <= 1.0:
            raise ConfigError(f"data.cpu_decode_fraction must be in [0, 1], got {self.cpu_decode_fraction}")
        if not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ConfigError(f"data.max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        for epoch, size in self.resize_schedule.items():
            if epoch < 0 or size < 1:
                raise ConfigError(f"data.resize_schedule maps epoch (>= 0) to resolution in px (>= 1); "
                                  f"got {epoch}: {size}")


@dataclass
class Data:
    train: object                   # a loader (ResidentLoader | ArrayLoader | ImageFolderLoader)
    test: object
    num_classes: int
    in_channels: int
    image_size: int                 # px; the train loader's resolution follows data.resize_schedule
    num_train: int
    task: str = "classification"
    num_test: int = 0
    mean: tuple = ()                # per channel, in 0..1 units for uint8 data (raw units for float npz)
    std: tuple = ()
    classes: list = field(default_factory=list)


def mix_seed(*parts):
    """One 63-bit seed from several integers (seed, epoch, ...), stable across platforms and processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- in-memory datasets
def _synthetic(cfg, device=None):
    """Deterministic images whose class is a smooth color pattern plus noise: learnable, independent of run seed.

    With a CUDA `device` they are drawn there, in blocks (ImageNet-sized sets in seconds, not minutes on the CPU);
    the numbers then differ from the CPU's, as the two generators do.
    """
    size = cfg.image_size or SYNTHETIC_DEFAULT_SIZE
    on = torch.device(device) if device is not None and torch.device(device).type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=on).manual_seed(mix_seed(1234, cfg.num_classes, size))
    protos = torch.rand(cfg.num_classes, 3, 4, 4, generator=g, device=on) * 2 - 1
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)  # (K, 3, S, S)
    block = 1024 if on.type == "cuda" else None  # CPU: one block, the sequence the CPU data always had

    def make(n):
        labels = torch.randperm(n, generator=g, device=on) % cfg.num_classes
        out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=on)
        for start in range(0, n, block or max(n, 1)):
            y = labels[start:start + (block or n)]
            coarse = torch.randn(len(y), 3, 8, 8, generator=g, device=on)
            x = 128 + 60 * protos[y] + 25 * F.interpolate(coarse, size=(size, size), mode="bilinear",
                                                           align_corners=False)
            x = x + 10 * torch.randn(len(y), 3, size, size, generator=g, device=on)
            out[start:start + len(y)] = x.round().clamp(0, 255).to(torch.uint8)
        return out, labels

    x_train, y_train = make(cfg.train_samples)
    x_test, y_test = make(cfg.test_samples)
    return x_train, y_train, x_test, y_test, cfg.num_classes


def _split(x, y, fraction, seed):
    """Deterministic held-out split: a permutation seeded by `seed`, the last `fraction` is the test set."""
    g = torch.Generator().manual_seed(mix_seed(seed, 7))
    perm = torch.randperm(len(y), generator=g)
    n_test = max(1, int(round(len(y) * fraction)))
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def _digits(cfg, seed):
    """scikit-learn's 8x8 digits (1797 images, shipped with the package): 0..16 scaled to uint8 0..255."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    return (*_split(x, y, cfg.test_fraction, seed), 10)


def _cifar(cfg, rank, world_size):
    """CIFAR-10/100 through torchvision; downloads only with data.download=true (rank 0 first under DDP)."""
    import torchvision
    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python"
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def load(train, download):
        try:
            return cls(root=cfg.root, train=train, download=download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{cfg.name} not found (or damaged) under {os.path.join(cfg.root, folder)} ({e}). Set "
                f"data.download=true to download it, or set data.root to the folder that holds {folder}/"
            ) from None
        except OSError as e:  # no network, no permission
            raise FileNotFoundError(f"could not download {cfg.name} into {cfg.root}: {e}. Download it on a "
                                    f"machine with internet and copy {folder}/ into data.root") from None

    if cfg.download and distributed:  # one rank downloads, the others wait and then read
        if rank == 0:
            load(True, True)
        barrier()
    download = cfg.download and not distributed
    sets = [load(True, download), load(False, False)]
    out = []
    for s in sets:
        out.append(torch.from_numpy(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2))))  # (N, H, W, C) -> NCHW
        out.append(torch.as_tensor(s.targets, dtype=torch.int64))
    return (*out, len(sets[0].classes))


def _to_nchw(x, key, path):
    """Arrays as (N, C, H, W): accepts (N, H, W), (N, H, W, C) and (N, C, H, W) with C in 1, 3, 4."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise ConfigError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or "
                              f"(N, C, H, W) with C in 1, 3 or 4")
    else:
        raise ConfigError(f"{path}: {key} has shape {x.shape}; expected images (N, H, W[, C])")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    if np.issubdtype(x.dtype, np.integer) and x.size and x.min() >= 0 and x.max() <= 255:
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8)))
    return torch.from_numpy(np.ascontiguousarray(x.astype(np.float16)))  # floats kept in their own units


def _npz(cfg, seed):
    """Arrays from an .npz: x_train, y_train, x_test, y_test, or x, y split by data.test_fraction."""
    path = Path(cfg.root)
    if not path.is_file():
        raise FileNotFoundError(f"data.root={path} is not an .npz file; set data.root to a file holding "
                                f"x_train, y_train, x_test, y_test (or x, y)")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        parts = [_to_nchw(arrays["x_train"], "x_train", path), arrays["y_train"],
                 _to_nchw(arrays["x_test"], "x_test", path), arrays["y_test"]]
    elif {"x", "y"} <= arrays.keys():
        x, y = _to_nchw(arrays["x"], "x", path), arrays["y"]
        if len(x) != len(y):
            raise ConfigError(f"{path}: x has {len(x)} samples but y has {len(y)}")
        parts = list(_split(x, torch.as_tensor(y.astype(np.int64)), cfg.test_fraction, seed))
    else:
        raise ConfigError(f"{path} holds {sorted(arrays)}; expected x_train, y_train, x_test, y_test (or x, y)")
    x_train, y_train, x_test, y_test = parts
    y_train = torch.as_tensor(np.asarray(y_train).astype(np.int64)).reshape(-1)
    y_test = torch.as_tensor(np.asarray(y_test).astype(np.int64)).reshape(-1)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ConfigError(f"{path}: images and labels differ in length (train {len(x_train)} vs {len(y_train)}, "
                          f"test {len(x_test)} vs {len(y_test)})")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(f"{path}: train images {tuple(x_train.shape[1:])} and test images "
                          f"{tuple(x_test.shape[1:])} differ in shape")
    if min(int(y_train.min()), int(y_test.min())) < 0:
        raise ConfigError(f"{path}: labels must be class indices >= 0")
    return x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1


def channel_stats(x):
    """Per-channel mean and std of (N, C, H, W) data in its stored units, computed in float64 chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64)
        total += c.sum((0, 2, 3))
        total_sq += (c * c).sum((0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=1e-12).sqrt()
    return mean.cpu(), std.cpu()


# ----------------------------------------------------------------------------- shared loader logic
class _LoaderBase:
    """Epoch plan shared by all loaders: seeded order, optional index subset, rank shard, resume, resolution."""

    def __init__(self, num_samples, batch_size, *, train, seed, rank, world_size, resolution,
                 resize_schedule=None):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.num_samples = num_samples
        self._batch_size = batch_size
        self.train = train
        self.drop_last = train  # every training step sees a full batch
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.base_resolution = resolution
        self.resolution = resolution
        self.resize_schedule = dict(resize_schedule or {}) if train else {}
        self.skipped_files = []
        self.fallback = {}  # jpeg loader: files decoded by PIL instead of nvJPEG, by reason ("cpu_share":
                            # offloaded by data.cpu_decode_fraction)
        self.epoch = 0
        self.set_epoch(0)

    @property
    def batch_size(self):
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value):
        if int(value) < 1:
            raise ValueError(f"batch_size must be >= 1, got {value}")
        self._batch_size = int(value)

    @property
    def skipped(self):
        """Number of distinct unreadable files met so far."""
        return len(self.skipped_files)

    def resolution_at(self, epoch):
        """Train resolution of `epoch`: the resize_schedule entry of the latest epoch <= `epoch`, else image_size."""
        keys = [e for e in self.resize_schedule if e <= epoch]
        return self.resize_schedule[max(keys)] if keys else self.base_resolution

    def set_epoch(self, epoch, indices=None, start_batch=0):
        """Fix this epoch's order (seeded by (seed, epoch)), this rank's shard, resume point and resolution.

        indices: restrict the epoch to these dataset indices (shuffled); start_batch: the next iteration skips
        that many batches without loading them. Train shards drop the remainder that does not divide by
        world_size; test shards wrap around to pad it (every rank gets the same number of batches).
        """
        self.epoch = int(epoch)
        if indices is None:
            base = torch.arange(self.num_samples)
        else:
            base = torch.as_tensor(indices, dtype=torch.int64).detach().reshape(-1).cpu()
            if base.numel() and (int(base.min()) < 0 or int(base.max()) >= self.num_samples):
                raise ValueError(f"set_epoch indices must lie in [0, {self.num_samples}); got "
                                 f"[{int(base.min())}, {int(base.max())}]")
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = base[torch.randperm(len(base), generator=g)] if self.train else base
        extras = self._draw_epoch_augment(g, len(order))
        n = len(order)
        if self.world_size > 1:
            keep = shard_positions(n, self.rank, self.world_size, pad=not self.train)
            order = order[keep]
            extras = {k: v[keep] for k, v in extras.items()}
        self._order = order
        self._extras = extras
        self.resolution = self.resolution_at(self.epoch) if self.train else self.base_resolution
        total = self._total_batches()
        if not 0 <= start_batch <= total:
            raise ValueError(f"start_batch={start_batch} is outside this epoch's {total} batches")
        self._start_batch = int(start_batch)

    def _draw_epoch_augment(self, generator, n):
        """Per-position random numbers drawn once per epoch (subclasses); {} when augmentation is per index."""
        return {}

    def _total_batches(self):
        n = len(self._order)
        return n // self._batch_size if self.drop_last else -(-n // self._batch_size)

    def __len__(self):
        """Batches the next iteration yields: this epoch's batches after start_batch."""
        return self._total_batches() - self._start_batch

    def _batch_ranges(self):
        n = len(self._order)
        for b in range(self._start_batch, self._total_batches()):
            yield b * self._batch_size, min((b + 1) * self._batch_size, n)

    def skip_report(self):
        """A readable list of the unreadable files skipped so far (empty string when none)."""
        if not self.skipped_files:
            return ""
        lines = [f"{self.skipped} unreadable file(s) were skipped and replaced by the next readable file:"]
        return "\n".join(lines + [f"  {p}" for p in self.skipped_files])


def in_order(loader):
    """Make a loader read its split in index order, each sample once, at its base resolution (for inference over a
    training split; build it with data.augment=false). Returns the loader."""
    loader.train = False
    loader.drop_last = False
    loader.resize_schedule = {}
    loader.set_epoch(0)
    return loader


def crop_flip(x, dy, dx, flip, pad):
    """Zero-pad (B, C, H, W) by `pad`, cut the H x W window at (dy, dx), mirror where `flip`: no per-sample loop."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)                     # (B, H) padded row index
    cols = dx[:, None] + torch.arange(w, device=x.device)                     # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)                     # mirror = read columns backwards
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]                # (B, H, W, C)
    return out.permute(0, 3, 1, 2)                                            # (B, C, H, W)


class _Normalizer:
    """Stored units -> float32 (x - mean) / std at the current resolution, in the configured memory format."""

    def __init__(self, mean, std, device, channels_last):
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        self.scale = (1.0 / std).float().view(1, -1, 1, 1).to(device)
        self.shift = (-mean / std).float().view(1, -1, 1, 1).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, x, resolution=None):
        x = x.contiguous().float()  # one fixed layout so that every loader computes bit-identical results
        if resolution is not None and (x.shape[-2], x.shape[-1]) != (resolution, resolution):
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                              antialias=True)
        return torch.addcmul(self.shift, x, self.scale).contiguous(memory_format=self.memory_format)

    def into_format(self, x):
        """Images already at their size, any dtype and layout: one fused pass into a new float32 tensor."""
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale, out=out)


# ----------------------------------------------------------------------------- in-memory loaders
class _ArrayLoaderBase(_LoaderBase):
    def __init__(self, images, labels, normalizer, batch_size, *, train, augment, seed, rank, world_size,
                 resolution, resize_schedule):
        self.images = images
        self.labels = labels
        self.native = images.shape[-1]
        self.pad = max(1, self.native // 8) if (train and augment) else 0  # 4 px for 32 px images
        self.normalize = normalizer
        super().__init__(len(labels), batch_size, train=train, seed=seed, rank=rank, world_size=world_size,
                         resolution=resolution, resize_schedule=resize_schedule)

    def _draw_epoch_augment(self, generator, n):
        if not self.pad:
            return {}
        return {"dy": torch.randint(0, 2 * self.pad + 1, (n,), generator=generator),
                "dx": torch.randint(0, 2 * self.pad + 1, (n,), generator=generator),
                "flip": torch.rand(n, generator=generator) < 0.5}


class ResidentLoader(_ArrayLoaderBase):
    """Whole dataset in device memory (uint8, or float16 for float arrays); batches built on the device."""

    def __iter__(self):
        device = self.images.device
        order = self._order.to(device)
        extras = {k: v.to(device) for k, v in self._extras.items()}
        for start, end in self._batch_ranges():
            index = order[start:end]
            x = self.images[index]
            if extras:
                x = crop_flip(x, extras["dy"][start:end], extras["dx"][start:end], extras["flip"][start:end],
                              self.pad)
            yield self.normalize(x, self.resolution), self.labels[index], index


class _ArrayBatches(torch.utils.data.Dataset):
    """Worker side of ArrayLoader: one item = one batch spec (indices + that batch's crop offsets and flips)."""

    def __init__(self, images, labels, pad):
        self.images, self.labels, self.pad = images, labels, pad

    def __getitem__(self, spec):
        index, dy, dx, flip = spec
        x = self.images[index]
        if dy is not None:
            x = crop_flip(x, dy, dx, flip, self.pad)
        return x.contiguous(), self.labels[index], index


class _Specs(torch.utils.data.Sampler):
    """Yields one spec per batch of the loader's current epoch; read when an iteration starts.

    Holds the loader's method weakly and iterates over a plain list: a loader <-> DataLoader cycle would leave
    the worker shutdown to the garbage collector (a 5 s join timeout per worker, and forked workers of other
    loaders would inherit the live iterator).
    """

    def __init__(self, make_specs):
        self.make_specs = weakref.WeakMethod(make_specs)

    def __iter__(self):
        return iter(self.make_specs()())


def _worker_init(_):
    torch.set_num_threads(1)  # workers run small per-batch ops; more threads only oversubscribe the cores


def _make_dataloader(dataset, specs, workers, prefetch, pin_memory, collate_fn=None):
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=specs, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None, collate_fn=collate_fn)


class ArrayLoader(_ArrayLoaderBase):
    """The arrays of ResidentLoader through a DataLoader (workers, pinned memory): same batches, bit for bit."""

    def __init__(self, images, labels, normalizer, batch_size, *, device, workers, prefetch, **kw):
        super().__init__(images, labels, normalizer, batch_size, **kw)
        self.device = torch.device(device)
        self._loader = _make_dataloader(_ArrayBatches(images, labels, self.pad), _Specs(self._specs), workers,
                                        prefetch, pin_memory=self.device.type == "cuda")

    def _specs(self):
        specs = []  # a list, not a generator: a suspended generator would keep this loader alive in a cycle
        for start, end in self._batch_ranges():
            aug = [self._extras[k][start:end] for k in ("dy", "dx", "flip")] if self._extras else [None] * 3
            specs.append((self._order[start:end], *aug))
        return specs

    def __iter__(self):
        resolution = self.resolution
        for x, y, index in self._loader:
            x = x.to(self.device, non_blocking=True)
            yield (self.normalize(x, resolution), y.to(self.device, non_blocking=True),
                   index.to(self.device, non_blocking=True))


# ----------------------------------------------------------------------------- image folders
def scan_imagefolder(split_dir, classes=None):
    """List split_dir/<class>/<image>: (relative paths as a bytes array, labels, classes, empty class folders)."""
    split_dir = Path(split_dir)
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise FileNotFoundError(f"{split_dir} has class folders that train/ lacks: {unknown[:5]}; both splits "
                                    f"need the same class folder names")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(e.name for e in os.scandir(folder) if e.is_file()
                       and e.name.lower().endswith(IMAGE_EXTENSIONS)) if folder.is_dir() else []
        if not files:
            empty.append(name)
        paths.extend(os.fsencode(os.path.join(name, f)) for f in files)
        labels.extend([label] * len(files))
    # bytes in one numpy buffer: forked workers share it without touching per-string refcounts
    return np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64), list(classes), empty


class _FolderBatches(torch.utils.data.Dataset):
    """Worker side of ImageFolderLoader: one item = one batch (bytes for nvJPEG, or PIL pixels)."""

    def __init__(self, root, rel_paths, labels, seed, gpu_decode, cpu_fraction=0.0):
        self.root, self.rel_paths, self.labels = str(root), rel_paths, labels
        self.seed, self.gpu_decode, self.cpu_fraction = seed, gpu_decode, cpu_fraction

    def __getitem__(self, spec):
        index, epoch, resolution, augment = spec
        batch = jpeg.read_batch(self.root, self.rel_paths, self.labels, index, epoch=epoch, resolution=resolution,
                                augment=augment, seed=self.seed, gpu_decode=self.gpu_decode,
                                cpu_fraction=self.cpu_fraction)
        batch["resolution"] = resolution
        return batch


class _Pipeline:
    """Runs `stages` in threads, one thread and one high-priority CUDA stream per stage, `depth` items ahead.

    stage 0 takes items from `source`; stage i > 0 takes stage i-1's results, after its stream waited for the
    previous stage's work. Stage threads release the GIL inside torch ops, so a blocking nvJPEG call in one
    stage overlaps with the crop/resize issue of the other and with the training loop.
    """

    _END = object()

    def __init__(self, source, stages, device, depth, stats):
        self.device, self.stats = device, stats
        self.stop = threading.Event()
        self.queues = [queue.Queue(maxsize=depth) for _ in stages]
        # High-priority streams: a training step keeps every SM busy, and this stage's small kernels would otherwise
        # queue behind each of its kernels in turn, making a batch arrive late and the training stream wait for it.
        streams = [None] * len(stages)
        if device.type == "cuda":
            highest = min(torch.cuda.Stream.priority_range())  # lower number = higher priority
            streams = [torch.cuda.Stream(device, priority=highest) for _ in stages]
        self.streams = streams
        self.threads = []
        for i, stage in enumerate(stages):
            inbox = None if i == 0 else self.queues[i - 1]
            prev = None if i == 0 else self.streams[i - 1]
            t = threading.Thread(target=self._run, args=(i, stage, source, inbox, prev, self.queues[i]),
                                 daemon=True, name=f"data-stage{i}")
            self.threads.append(t)
            t.start()

    def _put(self, q, item):
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def _get(self, q):
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                pass
        return self._END

    def _items(self, source, inbox):
        if inbox is None:
            it = iter(source)
            while True:
                t0 = time.perf_counter()
                item = next(it, self._END)
                self.stats["worker_wait_s"] += time.perf_counter() - t0
                if item is self._END:
                    return
                yield item, None
        while True:
            item = self._get(inbox)
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _run(self, i, stage, source, inbox, prev_stream, outbox):
        stream = self.streams[i]
        try:
            with contextlib.ExitStack() as ctx:
                if stream is not None:
                    ctx.enter_context(torch.cuda.device(self.device))
                    ctx.enter_context(torch.cuda.stream(stream))
                for payload, event in self._items(source, inbox):
                    if self.stop.is_set():
                        return
                    if event is not None:
                        stream.wait_event(event)
                    t0 = time.perf_counter()
                    out = stage(payload, stream)
                    self.stats[f"stage{i}_s"] += time.perf_counter() - t0
                    done = None
                    if stream is not None:
                        done = torch.cuda.Event()
                        done.record(stream)
                    self._put(outbox, (out, done))
            self._put(outbox, self._END)
        except BaseException as e:  # handed down the stages to the consumer, which re-raises it
            self._put(outbox, e)

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        item = self._get(self.queues[-1])
        self.stats["consumer_wait_s"] += time.perf_counter() - t0
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        out, event = item
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in out:  # made on a side stream, used on this one: keep the allocator from reusing early
                t.record_stream(stream)
        self.stats["batches"] += 1
        return out

    def close(self):
        self.stop.set()
        for t in self.threads:
            t.join()


def _identity(batch):
    return batch


class ImageFolderLoader(_LoaderBase):
    """Image files of one split. decode="gpu": nvJPEG batches on the GPU (CPU torchvision when no GPU),
    crop/resize/flip as batched matmuls, in two threads a few batches ahead; decode="pil": PIL in the workers.

    `stats` adds up where the time went: worker_wait_s (decode thread waiting for workers), stage0_s (nvJPEG),
    stage1_s (crop/resize issue), consumer_wait_s (the training loop waiting for a batch: input-bound time).
    """

    def __init__(self, root, rel_paths, labels, batch_size, *, device, decode, augment, workers, prefetch,
                 channels_last, max_skipped_fraction, seed, rank, world_size, resolution, train,
                 resize_schedule=None, cpu_decode_fraction=0.0):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the stage threads need the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.decode = decode
        if decode == "gpu":
            import torchvision.io  # noqa: F401  (import here: a first import inside a stage thread is slow)
            if CUDA_CONNECTIONS_SET_LATE and self.device.type == "cuda" and rank == 0:
                print(f"[data] CUDA started before lib.data was imported, with CUDA_DEVICE_MAX_CONNECTIONS unset: "
                      f"nvJPEG shares hardware queues with training and decodes up to 2x slower. Import lib.data "
                      f"first or export CUDA_DEVICE_MAX_CONNECTIONS={CUDA_CONNECTIONS}", flush=True)
        self.augment = augment and train
        self.rel_paths = rel_paths
        self.root = str(root)
        self.prefetch = prefetch
        self.max_skipped_fraction = max_skipped_fraction
        self.normalize = _Normalizer(tuple(255 * m for m in jpeg.IMAGENET_MEAN),
                                     tuple(255 * s for s in jpeg.IMAGENET_STD), self.device, channels_last)
        self.stats = dict.fromkeys(("batches", "worker_wait_s", "stage0_s", "stage1_s", "consumer_wait_s"), 0)
        self._skipped_set = set()
        self._lock = threading.Lock()
        super().__init__(len(labels), batch_size, train=train, seed=seed, rank=rank, world_size=world_size,
                         resolution=resolution, resize_schedule=resize_schedule)
        dataset = _FolderBatches(root, rel_paths, labels, seed, gpu_decode=decode == "gpu",
                                 cpu_fraction=cpu_decode_fraction if decode == "gpu" else 0.0)
        pin = self.device.type == "cuda" and decode == "pil"  # nvJPEG reads the encoded bytes from host memory
        self._loader = _make_dataloader(dataset, _Specs(self._specs), workers, prefetch, pin_memory=pin,
                                        collate_fn=_identity)

    def _specs(self):
        order = self._order.numpy()  # a list of specs, not a generator (see ArrayLoader._specs)
        return [(order[start:end], self.epoch, self.resolution, self.augment) for start, end in self._batch_ranges()]

    def __iter__(self):
        source = iter(self._loader)  # created here, in the caller's thread: worker processes fork from it
        if self.decode == "pil":
            for batch in source:
                yield self.finish(self.decode_stage(batch, None), None)
            return
        pipeline = _Pipeline(source, (self.decode_stage, self.finish), self.device, self.prefetch, self.stats)
        try:
            yield from pipeline
        finally:
            pipeline.close()

    def _account(self, batch):
        with self._lock:
            for reason, count in batch["fallback"].items():
                self.fallback[reason] = self.fallback.get(reason, 0) + count
            for entry in batch["skipped"]:
                path = entry.split(" (", 1)[0]
                if path in self._skipped_set:
                    continue
                self._skipped_set.add(path)
                self.skipped_files.append(path)
                if self.rank == 0 and len(self.skipped_files) <= MAX_SKIP_MESSAGES:
                    print(f"[data] skipped unreadable file {entry}; replaced by the next readable file"
                          + (" (further skips are counted silently; see skip_report())"
                             if len(self.skipped_files) == MAX_SKIP_MESSAGES else ""), flush=True)
            if len(self.skipped_files) > self.max_skipped_fraction * self.num_samples:
                raise RuntimeError(
                    f"{len(self.skipped_files)} of {self.num_samples} files under {self.root} are unreadable, more "
                    f"than data.max_skipped_fraction={self.max_skipped_fraction}; fix or remove them (first: "
                    f"{self.skipped_files[:5]}) or raise data.max_skipped_fraction")

    def decode_stage(self, batch, stream):
        """Stage 0: nvJPEG on the whole batch (blocks this thread until decoded); PIL for files it refuses."""
        if batch["blob"] is None:
            return batch, []
        blob, offsets = batch["blob"], batch["offsets"]
        try:
            return batch, jpeg.decode_jpegs(blob, offsets, self.device)
        except RuntimeError:
            pass
        images = []
        for i in range(len(offsets) - 1):
            data = blob[int(offsets[i]):int(offsets[i + 1])]
            try:
                images.extend(jpeg.decode_jpegs(data, [0, len(data)], self.device))
                continue
            except RuntimeError:
                pass
            index = int(batch["index"][int(batch["gpu_pos"][i])])
            path = os.path.join(self.root, os.fsdecode(self.rel_paths[index]))
            try:
                img = jpeg.pil_open_rgb(data.numpy().tobytes())
                images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).to(self.device))
                batch["fallback"]["decode_error"] = batch["fallback"].get("decode_error", 0) + 1
            except (OSError, ValueError, SyntaxError) as e:
                # found only after the worker filled the batch: keep the batch full with a flat gray image
                h, w = batch["sizes"][i].tolist()
                images.append(torch.full((3, h, w), 128, dtype=torch.uint8, device=self.device))
                batch["skipped"].append(f"{path} ({type(e).__name__}: {e})")
        return batch, images

    def finish(self, payload, stream):
        """Stage 1: crop/resize/flip the decoded images, add the CPU-decoded ones, normalize; (images, labels, index)."""
        batch, decoded = payload
        if stream is not None:
            for img in decoded:  # allocated on stage 0's stream
                img.record_stream(stream)
        size = batch["resolution"]
        gpu_pos, cpu_pos = torch.from_numpy(batch["gpu_pos"]), torch.from_numpy(batch["cpu_pos"])
        n = len(batch["labels"])
        parts = []
        if len(gpu_pos):
            parts.append((gpu_pos, jpeg.resized_crop_batch(decoded, batch["boxes"], batch["flip"], size)))
        if len(cpu_pos):
            parts.append((cpu_pos, batch["cpu_images"].to(self.device, non_blocking=True)))
        self._account(batch)
        if len(parts) == 1 and len(parts[0][0]) == n:
            raw = parts[0][1]
        else:  # some files took the CPU path: put both parts back in batch order
            raw = torch.empty(n, 3, size, size, device=self.device)
            for pos, x in parts:
                raw.index_copy_(0, pos.to(self.device), x.float())
        images = self.normalize.into_format(raw)
        return (images, torch.from_numpy(batch["labels"]).to(self.device, non_blocking=True),
                torch.from_numpy(batch["index"]).to(self.device, non_blocking=True))


# ----------------------------------------------------------------------------- build
def _resident_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def build_data(cfg, device, batch_size, eval_batch_size=0, seed=0, rank=0, world_size=1):
    """Load the dataset named by `cfg` and wrap it in train/test loaders on `device` (see the module docstring)."""
    device = torch.device(device)
    eval_batch_size = eval_batch_size or batch_size
    if cfg.name == "imagefolder":
        return _build_imagefolder(cfg, device, batch_size, eval_batch_size, seed, rank, world_size)
    if cfg.name == "synthetic":
        on_device = cfg.loader in ("auto", "resident")  # worker processes need them in host memory
        x_train, y_train, x_test, y_test, num_classes = _synthetic(cfg, device if on_device else None)
    elif cfg.name == "digits":
        x_train, y_train, x_test, y_test, num_classes = _digits(cfg, seed)
    elif cfg.name in ("cifar10", "cifar100"):
        x_train, y_train, x_test, y_test, num_classes = _cifar(cfg, rank, world_size)
    else:
        x_train, y_train, x_test, y_test, num_classes = _npz(cfg, seed)
    height, width = x_train.shape[-2:]
    if height != width and not cfg.image_size:
        raise ConfigError(f"{cfg.name} images are {height}x{width} (not square); set data.image_size to the square "
                          f"training resolution in px")
    mean, std = channel_stats(x_train)
    resolution = cfg.image_size or int(height)
    size_gb = _resident_bytes(x_train, x_test) / 1e9
    kind = cfg.loader
    if kind == "auto":
        kind = "resident" if size_gb <= cfg.resident_max_gb else "dataloader"
    elif kind == "resident" and size_gb > cfg.resident_max_gb:
        raise ConfigError(f"{cfg.name} needs {size_gb:.2f} GB as stored, more than data.resident_max_gb="
                          f"{cfg.resident_max_gb}; raise data.resident_max_gb or use data.loader=dataloader")
    normalizer = _Normalizer(mean, std, device, cfg.channels_last)
    common = dict(seed=seed, rank=rank, world_size=world_size, resolution=resolution)
    loaders = []
    for x, y, train, bs in ((x_train, y_train, True, batch_size), (x_test, y_test, False, eval_batch_size)):
        kw = dict(common, train=train, augment=cfg.augment, resize_schedule=cfg.resize_schedule)
        if kind == "resident":
            loaders.append(ResidentLoader(x.to(device), y.to(device), normalizer, bs, **kw))
        else:
            loaders.append(ArrayLoader(x.cpu(), y.cpu(), normalizer, bs, device=device, workers=cfg.workers,
                                       prefetch=cfg.prefetch, **kw))
    scale = 255.0 if x_train.dtype == torch.uint8 else 1.0
    return Data(train=loaders[0], test=loaders[1], num_classes=num_classes, in_channels=int(x_train.shape[1]),
                image_size=resolution, num_train=len(y_train), num_test=len(y_test),
                mean=tuple(float(m) / scale for m in mean), std=tuple(float(s) / scale for s in std),
                classes=[str(c) for c in range(num_classes)])


def _build_imagefolder(cfg, device, batch_size, eval_batch_size, seed, rank, world_size):
    root = Path(cfg.root)
    hint = (f"set data.root to a folder with train/<class>/*.JPEG and val/<class>/*.JPEG (ImageNet layout; val "
            f"sorted into class folders), or write a synthetic one: python tools/make_imagefolder.py --out={root}")
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} does not exist; {hint}")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root} has no {split}/ folder; {hint}")
    train_paths, train_labels, classes, empty = scan_imagefolder(root / "train")
    if not classes or len(train_paths) == 0:
        raise FileNotFoundError(f"{root / 'train'} holds no image files in class folders; {hint}")
    val_paths, val_labels, _, val_empty = scan_imagefolder(root / "val", classes)
    if len(val_paths) == 0:
        raise FileNotFoundError(f"{root / 'val'} holds no image files in class folders; {hint}")
    if rank == 0 and (empty or val_empty):
        # policy: an empty class keeps its label (outputs stay aligned with the folder names) and training goes on
        print(f"[data] warning: empty class folders (kept as labels without samples): train {empty[:10]}"
              f"{' ...' if len(empty) > 10 else ''}, val {val_empty[:10]}{' ...' if len(val_empty) > 10 else ''}",
              flush=True)
    kind = cfg.loader
    if kind == "auto":
        kind = "jpeg" if device.type == "cuda" else "dataloader"
    decode = "gpu" if kind == "jpeg" else "pil"
    resolution = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    common = dict(device=device, decode=decode, workers=cfg.workers, prefetch=cfg.prefetch,
                  channels_last=cfg.channels_last, max_skipped_fraction=cfg.max_skipped_fraction, seed=seed,
                  rank=rank, world_size=world_size, resolution=resolution, augment=cfg.augment,
                  cpu_decode_fraction=cfg.cpu_decode_fraction)
    train = ImageFolderLoader(root / "train", train_paths, train_labels, batch_size, train=True,
                              resize_schedule=cfg.resize_schedule, **common)
    test = ImageFolderLoader(root / "val", val_paths, val_labels, eval_batch_size, train=False, **common)
    return Data(train=train, test=test, num_classes=len(classes), in_channels=3, image_size=resolution,
                num_train=len(train_labels), num_test=len(val_labels), mean=jpeg.IMAGENET_MEAN,
                std=jpeg.IMAGENET_STD, classes=classes)
