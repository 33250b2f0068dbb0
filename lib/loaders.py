"""Loaders: batches of a dataset on the device, in an order and with augmentation fixed by (seed, epoch).

Three loaders, one protocol (set_epoch / iter / len / batch_size / skipped / resolution):
  ResidentLoader     datasets that fit in device memory: stored uint8 on the device, batches gathered, cropped,
                     flipped and normalized there; no worker processes.
  ArrayLoader        the same arrays through a torch DataLoader (workers, pinned memory, persistent workers).
  ImageFolderLoader  files on disk (lib/folderloader.py, on this module's _LoaderBase). decode="gpu"
                     (loader=jpeg or cache): workers read bytes; one thread decodes batches with nvJPEG, a second
                     crops/resizes/normalizes them on the GPU, each on its own high-priority stream, `prefetch`
                     batches ahead of training; files nvJPEG should not get (CMYK, grayscale, progressive, PNG) are
                     decoded by PIL in the workers, counted in `loader.fallback`.
                     decode="pil" (loader=dataloader): PIL in the workers, the standard CPU path.
Every random choice is a function of (seed, epoch, position or index), so set_epoch(e, start_batch=k) resumes
with exactly the batches an uninterrupted run would have produced. Unreadable image files are skipped, counted
(`loader.skipped`, `loader.skipped_files`) and replaced by the next readable file; training stops only when more
than data.max_skipped_fraction of the files are unreadable.
"""
import weakref

import torch
import torch.nn.functional as F

from lib.config import ConfigError
from lib.datasets import mix_seed
from lib.dist import shard_positions

MAX_SKIP_MESSAGES = 10          # print the first few unreadable files; all are listed by skip_report()


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

    def close(self):
        """Stop this loader's worker processes now (DataLoader loaders; a no-op otherwise). Persistent workers are
        otherwise stopped when the garbage collector finds the DataLoader iterator: at a random later moment, in
        whichever thread allocates, at 5 s per worker whose join times out there (a 120 s stall measured in the
        middle of a later run on the H200). The loader can be iterated again afterwards (new workers)."""
        loader = getattr(self, "_loader", None)
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None:
            iterator._shutdown_workers()  # what DataLoader's own __del__ calls; idempotent
            loader._iterator = None

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
