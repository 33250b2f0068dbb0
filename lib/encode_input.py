"""What encode_stream.py reads: a lib/data split in order, or a build_cache.py cache through CacheLoader.

    source = open_source(cfg, device)               # cfg: encode_stream.Config; cache.dir set -> the cache
    source.loader.set_epoch(0, indices=torch.arange(8192, 16384))   # the samples to read, in this order
    for images, keys, index in source.loader:       # float32 (B, C, H, W) normalized on `device`; keys: source.key
        ...

CacheLoader has the loader protocol of lib/loaders.py (set_epoch(epoch, indices), batches of (images, keys,
index)), with the cache's sample ids (input line numbers) as the keys. Each needed shard is read once, in one
sequential read, by one of `readers` threads (TextImageCache.read_shard: sha256 against the shard's marker, then
zlib per image; both release the GIL), at most `prefetch` shards ahead of the batch being assembled. The uint8
images go to the device as they are (pinned host memory, asynchronous copy) and are normalized there:
(x / 255 - mean) / std, a 1-channel (grayscale) cache replicated to 3 channels by broadcasting in the same pass
(the encoder keeps its 3-channel patch embedding: the plan's parameter count, and weights trained on RGB fit).

A shard that is missing or fails its checksum is never encoded: the cache is opened with on_missing="error" and
the error names the shard (check_cache_shards checks presence and sizes before any work; a changed byte is found
by the sha256 when the shard is read).
"""
import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from lib.config import ConfigError, to_dict
from lib.data import DataConfig, build_data, in_order
from lib.loaders import _Normalizer
from lib.textcache import CacheError, CacheMissError
from lib.textreader import TextImageCache

FIX = ("render it again with build_cache.py (the command that built this cache renders missing and corrupt "
       "shards), then run this command again: the chunks encoded so far are kept")


class CacheLoader:
    """Batches (images on `device`, sample ids, positions) of a TextImageCache in the order set by set_epoch."""

    def __init__(self, cache: TextImageCache, batch_size, device, channels=3, mean=0.5, std=0.5, readers=2,
                 prefetch=4, channels_last=True):
        if cache.on_missing != "error":
            raise ValueError("open the cache with on_missing='error': a missing or corrupt shard is not encoded")
        c, self.height, self.width = cache.shape
        if c not in (1, channels):
            raise CacheError(f"{cache.root} holds {c}-channel images; the encoder takes {channels}")
        self.cache, self.batch_size, self.device = cache, batch_size, torch.device(device)
        self.channels, self.readers, self.prefetch = channels, max(1, readers), max(1, prefetch)
        self.normalize = _Normalizer((255.0 * mean,) * channels, (255.0 * std,) * channels, self.device,
                                     channels_last)
        self.num_samples = len(cache)
        self.store = cache.store  # created lazily by the cache: here, before any reader thread needs it
        self.set_epoch(0)

    def set_epoch(self, epoch, indices=None):
        """Read `indices` (default: every sample) in this order; the epoch is ignored (no shuffling)."""
        self.indices = torch.arange(self.num_samples) if indices is None else torch.as_tensor(indices).long().cpu()

    def __len__(self):
        return -(-len(self.indices) // self.batch_size)

    def _segments(self):
        """[(shard, first position in it, indices)]: maximal runs of consecutive indices inside one shard (each run
        is a slice of its shard: no gather)."""
        shards = torch.div(self.indices, self.cache.shard_size, rounding_mode="floor")
        breaks = (shards[1:] != shards[:-1]) | (self.indices[1:] != self.indices[:-1] + 1)
        cuts = (torch.nonzero(breaks).flatten() + 1).tolist()
        out = []
        for lo, hi in zip([0, *cuts], [*cuts, len(shards)]):
            if hi > lo:
                shard = int(shards[lo])
                out.append((shard, int(self.indices[lo]) - shard * self.cache.shard_size, self.indices[lo:hi]))
        return out

    def missing_shards(self, indices=None):
        """Names of the shards holding `indices` (default: this epoch's) that are absent or not their marker's size."""
        index = self.indices if indices is None else torch.as_tensor(indices).long()
        shards = torch.unique(torch.div(index, self.cache.shard_size, rounding_mode="floor")).tolist()
        return [self.store.name(s) for s in shards if not self.store.present(s, verify=False)]

    def _read(self, shard):
        try:
            return self.cache.read_shard(shard)                            # uint8 (n, C, H, W), int64 (n,)
        except CacheMissError:
            name = self.store.name(shard)
            if self.store.marker(shard) is not None and self.store.path(shard).exists():
                why = "fails its checksum (its bytes differ from its marker's sha256)"
            else:
                why = "is missing (evicted under the cache's size cap, or never rendered)"
            raise CacheMissError(f"cache shard {name} of {self.cache.root} {why}: none of its samples were "
                                 f"encoded; {FIX}") from None

    def _batch(self, pieces):
        b = sum(len(p[0]) for p in pieces)
        cuda = self.device.type == "cuda"
        images = torch.empty((b, *pieces[0][0].shape[1:]), dtype=torch.uint8, pin_memory=cuda)  # (B, C, H, W)
        torch.cat([p[0] for p in pieces], out=images)                     # the one host copy
        if cuda:
            images = images.to(self.device, non_blocking=True)
        images = self.normalize.into_format(images.expand(b, self.channels, self.height, self.width))
        return images, torch.cat([p[1] for p in pieces]), torch.cat([p[2] for p in pieces])

    def __iter__(self):
        segments = self._segments()
        order = [s for i, (s, _, _) in enumerate(segments) if i == 0 or segments[i - 1][0] != s]
        pool = ThreadPoolExecutor(self.readers, thread_name_prefix="cache-reader")
        ahead, upcoming = collections.deque(), iter(order)
        try:
            def refill():
                while len(ahead) < self.prefetch:
                    shard = next(upcoming, None)
                    if shard is None:
                        return
                    ahead.append((shard, pool.submit(self._read, shard)))

            refill()
            current, data = None, None
            pieces, filled = [], 0
            for shard, first, index in segments:
                if shard != current:
                    current, future = ahead.popleft()
                    data = future.result()
                    refill()
                images, ids = data
                start = 0
                while start < len(index):  # a segment may end one batch and start the next
                    take = min(len(index) - start, self.batch_size - filled)
                    part = slice(first + start, first + start + take)
                    pieces.append((images[part], ids[part], index[start:start + take]))
                    filled, start = filled + take, start + take
                    if filled == self.batch_size:
                        yield self._batch(pieces)
                        pieces, filled = [], 0
            if pieces:
                yield self._batch(pieces)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- what encode_stream reads
@dataclass
class Source:
    """A loader over the samples in order, and what the outputs must record about them."""
    loader: object                  # set_epoch(0, indices=...); yields (images on the device, keys, index)
    num_samples: int
    in_channels: int
    key: str                        # the per-sample key column: label (a dataset) | sample_id (a cache)
    identity: str                   # data | cache:<the cache's settings fingerprint>
    what: str                       # for messages
    classes: list = field(default_factory=list)


def open_source(cfg, device):
    """The dataset split named by data.* (in order, no augmentation), or the cache at cache.dir."""
    e, c = cfg.encode, cfg.cache
    if c.dir:
        cache = TextImageCache(c.dir, on_missing="error")
        channels, height, width = cache.shape
        if height != width or height != cfg.model.image_size:
            raise ConfigError(f"the cache {c.dir} holds {height}x{width} px images; set model.image_size={height} "
                              f"(square images only), or build a cache at the model's size")
        loader = CacheLoader(cache, e.batch_size, device, channels=3, mean=c.mean, std=c.std, readers=c.readers,
                             prefetch=c.prefetch, channels_last=cfg.data.channels_last)
        return Source(loader, len(cache), 3, "sample_id", f"cache:{cache.manifest['fingerprint']}",
                      f"the cache {c.dir} ({'grayscale, replicated to 3 channels' if channels == 1 else 'RGB'})")
    data_cfg = DataConfig(**{**to_dict(cfg.data), "augment": False, "resize_schedule": {},
                             "image_size": cfg.model.image_size})
    data = build_data(data_cfg, device, batch_size=e.batch_size, seed=cfg.run.seed)  # all ranks, unsharded
    loader = in_order(data.train if e.split == "train" else data.test)
    return Source(loader, data.num_train if e.split == "train" else data.num_test, data.in_channels, "label", "data",
                  f"the {e.split} split", data.classes)


def check_cache_shards(cfg, source, chunks, mine):
    """Before any work: every cache shard this rank reads is present at its marker's size (else named, not encoded)."""
    if not cfg.cache.dir or not mine:
        return
    missing = source.loader.missing_shards(torch.cat([torch.arange(*chunks[c]) for c in mine]))
    if missing:
        raise CacheMissError(f"{len(missing)} shard(s) of the cache {cfg.cache.dir} are missing or not the size their "
                             f"marker records ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): "
                             f"nothing was encoded; {FIX}")
