"""Datasets and loaders: synthetic, scikit-learn digits, CIFAR-10/100, ImageFolder (ImageNet layout), .npz arrays.

    data = build_data(DataConfig(name="cifar10", root="data", download=True), device, batch_size=256)
    for epoch in range(epochs):
        data.train.set_epoch(epoch)                 # order, augmentation and resolution of this epoch
        for images, labels, index in data.train:    # all on `device`; index = dataset indices (B,)
            ...

Datasets are read in lib/datasets.py (arrays in memory, image-folder listings); the three loaders that
batch them, one protocol, are in lib/loaders.py and lib/folderloader.py (image files, from a folder or the
pre-resized cache of lib/imagecache.py). This module holds the config, picks the loader and sets
CUDA_DEVICE_MAX_CONNECTIONS at import (below); it re-exports the names callers used to import from here.
"""
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib import jpeg
from lib.config import ConfigError
from lib.datasets import (_cifar, _digits, _npz, _synthetic, channel_stats, long_tail_indices, mix_seed,  # noqa: F401
                          scan_imagefolder)
from lib.dist import barrier
from lib.folderloader import SELECTIVE_POLICIES, ImageFolderLoader, SelectiveBatch  # noqa: F401
from lib.jpeg import FileSource
from lib.loaders import ArrayLoader, ResidentLoader, _Normalizer, crop_flip, in_order  # noqa: F401

# CUDA feeds all streams of a process through CUDA_DEVICE_MAX_CONNECTIONS hardware queues (8 unless set). nvJPEG
# decodes on about 14 streams of its own, so some share a queue with the training stream and wait behind every
# kernel queued there: on an H100 a batch took 69 ms to decode during ResNet-50 training instead of 29 ms, and
# new_vs_resident fell from 0.93 to 0.84 (docs/bench/data_pipeline_history/). CUDA reads the value once, when it
# starts, so it is set here, at import, unless the user chose one.
CUDA_CONNECTIONS = "32"
CUDA_CONNECTIONS_SET_LATE = "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ and torch.cuda.is_initialized()
if not CUDA_CONNECTIONS_SET_LATE:
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", CUDA_CONNECTIONS)

NAMES = ("synthetic", "digits", "cifar10", "cifar100", "imagefolder", "npz", "temporal")
TASKS = ("classification", "regression")
REGRESSION_LOSSES = ("mse", "huber")
LOADERS = ("auto", "resident", "dataloader", "jpeg", "cache")
IMAGEFOLDER_DEFAULT_SIZE = 224  # px, when data.image_size = 0


@dataclass
class DataConfig:
    name: str = "digits"            # synthetic | digits | cifar10 | cifar100 | imagefolder | npz | temporal
    root: str = "data"              # cifar download dir, ImageFolder root (train/ and val/ inside), or .npz path
                                    # (temporal: frames, scalars, targets; see lib/temporal_data.py)
    task: str = "classification"    # classification | regression (data.name=temporal)
    frames: int = 0                 # temporal: frames per sample used, evenly spaced, first and last kept (0 = all)
    regression_loss: str = "mse"    # regression: mse | huber (per sample, mean over the target columns)
    huber_delta: float = 1.0        # huber: where the loss turns from quadratic to linear, in target units (km)
    download: bool = False          # cifar only: download when missing (otherwise a clear error says how)
    image_size: int = 0             # training resolution in px; 0 = native (imagefolder: 224, synthetic: 32)
    num_classes: int = 10           # synthetic only
    train_samples: int = 2048       # synthetic only
    test_samples: int = 512         # synthetic only
    test_fraction: float = 0.2      # digits / npz without a split: held-out fraction (deterministic by seed)
    loader: str = "auto"            # auto | resident | dataloader | jpeg | cache (auto: resident if it fits in
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
    long_tail_ratio: float = 1.0    # > 1: the train split subsampled to an exponential long tail (CIFAR-LT, Cui et
                                    # al. 2019): class c keeps n_0 * ratio^(-c/(C-1)) samples, class 0 all of them,
                                    # the last class 1/ratio (e.g. 10 or 100); drawn by run seed; test set untouched.
                                    # 1 = off
    # image files in batch mode (jpeg / cache loaders): selective decoding
    selective_decode: str = "auto"  # auto | always | never: score every sample on a low-resolution image made in
                                    # the workers from a DCT-scaled decode, decode whole only the selected ones.
                                    # auto: when scoring below the training resolution (ast.score_resolution) or
                                    # not at all (the random control); never: decode every image whole on the GPU
    score_cpu_share: float = 0.5    # selective decoding: share of each batch scored from the workers' decodes; the
                                    # rest is decoded whole by nvJPEG at once. Half and half adds the two capacities:
                                    # a scoring decode of an ImageNet-sized file costs a CPU core about 1.7 ms (the
                                    # entropy decoding DCT scaling cannot skip), nvJPEG took ~9k images/s while
                                    # training on an H100 (bench/ast_jpeg.py measures both shares)
    # image files: the pre-resized cache (data.loader=cache), built in cache_dir on first use
    # (or by tools/build_image_cache.py)
    cache_dir: str = ""             # folder of the cache (train/ and val/ inside); required with loader=cache
    cache_side: int = 256           # px: shorter side of the cached images (larger ones are scaled down)
    cache_quality: int = 90         # JPEG quality of the re-encoded images
    cache_verify: bool = True       # check every shard's sha256 when the cache is opened (also warms the page cache)
    cache_workers: int = -1         # processes that build the cache; -1 = one per core, 0 = in this process

    def validate(self):
        if self.name not in NAMES:
            raise ConfigError(f"data.name must be one of {', '.join(NAMES)}; got '{self.name}'")
        if self.task not in TASKS:
            raise ConfigError(f"data.task must be one of {', '.join(TASKS)}; got '{self.task}'")
        if (self.task == "regression") != (self.name == "temporal"):
            raise ConfigError(f"data.task={self.task} with data.name={self.name}: regression reads data.name=temporal "
                              f"(an .npz of frames, scalars, targets) and temporal data is regression")
        if self.regression_loss not in REGRESSION_LOSSES or self.huber_delta <= 0 or self.frames < 0:
            raise ConfigError(f"data.regression_loss must be mse or huber, data.huber_delta > 0 and data.frames >= 0; "
                              f"got {self.regression_loss}, {self.huber_delta}, {self.frames}")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader must be one of {', '.join(LOADERS)}; got '{self.loader}'")
        if self.loader == "resident" and self.name == "imagefolder":
            raise ConfigError("data.loader=resident does not support imagefolder (files of different sizes); "
                              "use data.loader=jpeg (GPU decode) or data.loader=dataloader (PIL)")
        if self.loader in ("jpeg", "cache") and self.name != "imagefolder":
            raise ConfigError(f"data.loader={self.loader} decodes image files and needs data.name=imagefolder; "
                              f"for '{self.name}' use auto, resident or dataloader")
        if self.loader == "cache" and not self.cache_dir:
            raise ConfigError("data.loader=cache needs data.cache_dir: the folder that holds (or will hold, built on "
                              "first use) the pre-resized copy of data.root")
        if self.selective_decode not in SELECTIVE_POLICIES:
            raise ConfigError(f"data.selective_decode must be one of {', '.join(SELECTIVE_POLICIES)}; got "
                              f"'{self.selective_decode}'")
        if not 0.0 <= self.score_cpu_share <= 1.0:
            raise ConfigError(f"data.score_cpu_share must be in [0, 1], got {self.score_cpu_share}")
        if self.cache_side < 32 or not 1 <= self.cache_quality <= 95 or self.cache_workers < -1:
            raise ConfigError(f"data.cache_side must be >= 32 px, data.cache_quality in 1..95 and data.cache_workers "
                              f">= -1; got {self.cache_side}, {self.cache_quality}, {self.cache_workers}")
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
        if not (math.isfinite(self.long_tail_ratio) and self.long_tail_ratio >= 1):
            raise ConfigError(f"data.long_tail_ratio must be a number >= 1 (1 = off; 10 = the first class has 10x the "
                              f"training samples of the last), got {self.long_tail_ratio}")
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
    temporal: dict = field(default_factory=dict)  # temporal regression: frames, num_scalars, target mean/std, names,
                                                  # units (lib/temporal_data.py)

    def close(self):
        """Stop the loaders' worker processes (see _LoaderBase.close); call when done with this data."""
        for loader in (self.train, self.test):
            close = getattr(loader, "close", None)
            if close is not None:
                close()

# ----------------------------------------------------------------------------- build
def _resident_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _long_tail(cfg, labels, num_classes, seed, rank):
    """The training samples data.long_tail_ratio keeps (lib/datasets.long_tail_indices), with the counts printed."""
    keep, source, kept = long_tail_indices(labels, num_classes, cfg.long_tail_ratio, seed)
    if rank == 0:
        print(f"[data] long tail, ratio {cfg.long_tail_ratio:g}: train samples per class {kept} (of {source}; "
              f"{len(keep)} of {sum(source)} kept), test set unchanged", flush=True)
    return keep


def build_data(cfg, device, batch_size, eval_batch_size=0, seed=0, rank=0, world_size=1):
    """Load the dataset named by `cfg` and wrap it in train/test loaders on `device` (see the module docstring)."""
    device = torch.device(device)
    eval_batch_size = eval_batch_size or batch_size
    if cfg.name == "imagefolder":
        return _build_imagefolder(cfg, device, batch_size, eval_batch_size, seed, rank, world_size)
    if cfg.name == "temporal":
        from lib.temporal_data import build_temporal
        return build_temporal(cfg, device, batch_size, eval_batch_size, seed, rank, world_size)
    if cfg.name == "synthetic":
        on_device = cfg.loader in ("auto", "resident")  # worker processes need them in host memory
        x_train, y_train, x_test, y_test, num_classes = _synthetic(cfg, device if on_device else None)
    elif cfg.name == "digits":
        x_train, y_train, x_test, y_test, num_classes = _digits(cfg, seed)
    elif cfg.name in ("cifar10", "cifar100"):
        x_train, y_train, x_test, y_test, num_classes = _cifar(cfg, rank, world_size)
    else:
        x_train, y_train, x_test, y_test, num_classes = _npz(cfg, seed)
    if cfg.long_tail_ratio > 1:
        keep = _long_tail(cfg, y_train, num_classes, seed, rank).to(y_train.device)
        x_train, y_train = x_train[keep.to(x_train.device)], y_train[keep]
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
    if cfg.long_tail_ratio > 1:
        keep = _long_tail(cfg, train_labels, len(classes), seed, rank).numpy()
        train_paths, train_labels = train_paths[keep], train_labels[keep]
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
    decode = "pil" if kind == "dataloader" else "gpu"
    if decode == "gpu" and CUDA_CONNECTIONS_SET_LATE and device.type == "cuda" and rank == 0:
        print(f"[data] CUDA started before lib.data was imported, with CUDA_DEVICE_MAX_CONNECTIONS unset: "
              f"nvJPEG shares hardware queues with training and decodes up to 2x slower. Import lib.data "
              f"first or export CUDA_DEVICE_MAX_CONNECTIONS={CUDA_CONNECTIONS}", flush=True)
    resolution = cfg.image_size or IMAGEFOLDER_DEFAULT_SIZE
    common = dict(device=device, decode=decode, workers=cfg.workers, prefetch=cfg.prefetch,
                  channels_last=cfg.channels_last, max_skipped_fraction=cfg.max_skipped_fraction, seed=seed,
                  rank=rank, world_size=world_size, resolution=resolution, augment=cfg.augment,
                  cpu_decode_fraction=cfg.cpu_decode_fraction, selective_decode=cfg.selective_decode,
                  score_cpu_share=cfg.score_cpu_share)
    if kind == "cache":
        train_source, val_source = (_image_cache(cfg, root / split, paths, split, rank)
                                    for split, paths in (("train", train_paths), ("val", val_paths)))
    else:
        train_source, val_source = FileSource(root / "train", train_paths), FileSource(root / "val", val_paths)
    train = ImageFolderLoader(train_source, train_labels, batch_size, train=True,
                              resize_schedule=cfg.resize_schedule, **common)
    test = ImageFolderLoader(val_source, val_labels, eval_batch_size, train=False, **common)
    return Data(train=train, test=test, num_classes=len(classes), in_channels=3, image_size=resolution,
                num_train=len(train_labels), num_test=len(val_labels), mean=jpeg.IMAGENET_MEAN,
                std=jpeg.IMAGENET_STD, classes=classes)


def _image_cache(cfg, split_dir, rel_paths, split, rank):
    """The pre-resized cache of one split (lib/imagecache.py), built on first use: rank 0 builds or completes it
    while the other ranks wait, then every rank opens it (and checks it matches the folder)."""
    from lib.imagecache import open_or_build  # errors (other settings, a changed folder) are StorageErrors
    cache_dir = Path(cfg.cache_dir) / split
    workers = (os.cpu_count() or 1) if cfg.cache_workers == -1 else cfg.cache_workers
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    kw = dict(side=cfg.cache_side, quality=cfg.cache_quality, log=log)
    failed = None
    if rank == 0:
        try:
            cache, report = open_or_build(split_dir, rel_paths, cache_dir, workers=workers, verify=cfg.cache_verify,
                                          **kw)
        except Exception as e:  # raised after the barrier: the other ranks must not wait for rank 0 forever
            failed = e
    barrier()
    if failed is not None:
        raise failed
    if rank != 0:  # built and verified by rank 0: check that it matches the folder and is complete, build nothing
        cache, report = open_or_build(split_dir, rel_paths, cache_dir, verify=False, build=False, **kw)
    log(f"[cache] {split}: {report['images']} images, {report['bytes_per_image'] / 1e3:.1f} KB per image, "
        f"{report['unreadable']} unreadable source files (skipped as the jpeg loader skips them), converted once: "
        f"{report['converted'] or 'none'}")
    return cache
