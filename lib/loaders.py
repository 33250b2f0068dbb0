"""Loaders: batches of a dataset on the device, in an order and with augmentation fixed by (seed, epoch).

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

Kept in one module past 500 lines: the three loaders share _LoaderBase's epoch plan and its resume contract,
and are read side by side; _Pipeline is ImageFolderLoader's alone.
"""
import contextlib
import os
import queue
import threading
import time
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from lib import jpeg
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
