"""Read a text-image cache (written by build_cache.py) as a torch Dataset, by index or a whole shard at a time.

    from lib.textreader import TextImageCache, ShardOrderSampler
    ds = TextImageCache("runs/cache_default/cache")
    image, sample_id = ds[0]                          # uint8 (C, H, W), the input line the text came from
    loader = DataLoader(ds, batch_size=256, sampler=ShardOrderSampler(ds, shuffle=True), num_workers=8)
    for images, ids in ds.iter_shards():              # sequential: one read per shard, (n, C, H, W)
        ...

Random access reads one compressed image (one pread) from its shard. `read_shard` / `iter_shards` read a whole
shard file in one sequential read and check its sha256. Every read records the shard's use in the cache's LRU
index (at most once per `touch_every_s` per shard and process), which decides what is evicted first.

A shard that is not in the cache (evicted under the size cap, never rendered, or failing its checksum) is
rendered by the reader itself with the cache's stored texts and settings and written back into the cache
(evicting least-recently-used shards to stay under the cap): the bytes are the ones build_cache.py writes.
This needs the same font file and Pillow/FreeType versions as the cache was built with; otherwise, and with
on_missing="error", it raises CacheMissError naming the shard. Safe with DataLoader workers (each process
opens its own files and builds its own renderer on first need).
"""
import collections
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import torch

from lib.textcache import (CacheError, CacheMissError, ShardStore, decode_image, decode_shard, encode_shard,
                           font_sha256, header_bytes, parse_header, read_manifest, read_texts, render_blobs)
from lib.textrender import DenoiseConfig, RenderConfig, build, renderer_versions, resolve_font

_OPEN_FILES = 32                    # shard files kept open per process


class TextImageCache(torch.utils.data.Dataset):
    """dataset[i] -> (image uint8 tensor (C, H, W), sample id); i counts the cached samples in input order."""

    def __init__(self, root, on_missing: str = "render", max_bytes: int | None = None, touch_every_s: float = 30.0):
        if on_missing not in ("render", "error"):
            raise ValueError(f"on_missing must be 'render' or 'error', got {on_missing!r}")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.on_missing = on_missing
        self.max_bytes = int(max_bytes or self.manifest["max_bytes"])
        self.touch_every_s = touch_every_s
        self.shard_size = self.manifest["shard_size"]
        self.num_shards = self.manifest["shards"]
        self.shape = tuple(self.manifest["image_shape"])                 # (C, H, W)
        index = np.load(self.root / "index.npy")                       # (n, 3): sample id, shard, position
        if index.shape != (self.manifest["samples"], 3):
            raise CacheError(f"{self.root}/index.npy has shape {index.shape}, the manifest says "
                             f"{self.manifest['samples']} samples; run build_cache.py on this folder again")
        self.sample_ids = index[:, 0].copy()
        self.stats = {"shards_rendered": 0, "corrupt_shards": 0}
        self._reset()

    # -- per-process state (files, renderer): rebuilt after pickling into a DataLoader worker
    def _reset(self):
        self._store = None
        self._files = collections.OrderedDict()                        # shard -> (fd, offsets)
        self._touched = {}                                              # shard -> monotonic time of last touch
        self._tools = None

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_store", "_files", "_touched", "_tools"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __del__(self):
        for fd, _ in getattr(self, "_files", {}).values():
            os.close(fd)

    @property
    def store(self) -> ShardStore:
        if self._store is None:
            self._store = ShardStore(self.root, self.max_bytes)
        return self._store

    def __len__(self):
        return len(self.sample_ids)

    def shard_of(self, i: int):
        """(shard, position inside it) of sample i."""
        return divmod(i, self.shard_size)

    def locate(self, sample_id: int):
        """Position i of the sample with this id (its input line number), or KeyError if it was skipped."""
        i = int(np.searchsorted(self.sample_ids, sample_id))
        if i == len(self.sample_ids) or self.sample_ids[i] != sample_id:
            raise KeyError(f"sample id {sample_id} is not in the cache (skipped as empty or bad input?)")
        return i

    def shard_range(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self)))

    def text(self, i: int) -> str:
        """The cleaned text rendered as sample i."""
        shard, pos = self.shard_of(i)
        return read_texts(self.root, self.manifest["text_offsets"], shard)[pos]

    # -- random access
    def __getitem__(self, i):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for a cache of {len(self)} samples")
        shard, pos = self.shard_of(i)
        for attempt in range(2):
            fd, offsets = self._open(shard)
            blob = os.pread(fd, int(offsets[pos + 1] - offsets[pos]), int(offsets[pos]))
            try:
                image = decode_image(blob, self.shape, self.store.name(shard))
                break
            except CacheError:  # zlib's checksum failed: the shard is damaged
                self._close(shard)
                if attempt == 1:
                    raise
                self._rendered(shard, corrupt=True)
        self._touch(shard)
        return torch.from_numpy(image.copy()), int(self.sample_ids[i])

    def _open(self, shard):
        """(fd, offsets) of a shard, kept open; a missing or damaged shard is rendered first."""
        entry = self._files.get(shard)
        if entry is not None:
            self._files.move_to_end(shard)
            return entry
        present = self.store.present(shard, verify=False)
        entry = self._open_file(shard) if present else None
        if entry is None:  # missing, evicted a moment ago by another process, or a damaged header
            self._rendered(shard, corrupt=present)
            entry = self._open_file(shard)
            if entry is None:
                raise CacheError(f"{self.store.path(shard)} is unreadable right after it was rendered; check the "
                                 f"disk, or whether another process writes this cache with other settings")
        self._files[shard] = entry
        if len(self._files) > _OPEN_FILES:
            os.close(self._files.popitem(last=False)[1][0])
        return entry

    def _open_file(self, shard):
        """(fd, offsets) if the shard file exists and its header fits its size and image count, else None."""
        try:
            fd = os.open(self.store.path(shard), os.O_RDONLY)
        except FileNotFoundError:
            return None
        n = len(self.shard_range(shard))
        try:
            count, shape, _, offsets = parse_header(os.pread(fd, header_bytes(n), 0), self.store.name(shard))
            ok = (count == n and shape == self.shape and offsets[-1] == os.fstat(fd).st_size
                  and bool((np.diff(offsets) >= 0).all()))
        except CacheError:
            ok = False
        if not ok:
            os.close(fd)
            return None
        return fd, offsets

    def _close(self, shard):
        entry = self._files.pop(shard, None)
        if entry is not None:
            os.close(entry[0])

    def _touch(self, shard, force=False):
        now = time.monotonic()
        last = self._touched.get(shard)
        if force or last is None or now - last >= self.touch_every_s:
            self.store.touch(shard)
            self._touched[shard] = now

    # -- whole shards
    def read_shard(self, shard: int):
        """(images uint8 (n, C, H, W), sample ids int64 (n,)) of one shard, read sequentially and sha256-checked."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range for a cache of {self.num_shards} shards")
        meta = self.store.marker(shard)
        data, corrupt = None, False
        if meta is not None:
            try:
                data = self.store.path(shard).read_bytes()
            except FileNotFoundError:
                data = None
            if data is not None and (len(data) != meta.get("bytes")
                                     or hashlib.sha256(data).hexdigest() != meta.get("sha256")):
                data, corrupt = None, True
        if data is None:
            data = self._rendered(shard, corrupt)
        images, _ = decode_shard(data, self.store.name(shard))
        self._touch(shard, force=True)
        ids = self.sample_ids[self.shard_range(shard).start:self.shard_range(shard).stop]
        return torch.from_numpy(images), torch.from_numpy(ids.copy())

    def iter_shards(self, shards=None):
        """Yield read_shard(s) for each shard in `shards` (default: all, in order)."""
        for shard in range(self.num_shards) if shards is None else shards:
            yield self.read_shard(shard)

    # -- rendering a missing shard
    def _rendered(self, shard, corrupt=False) -> bytes:
        """Render a shard that is missing or corrupt, store it (LRU eviction under the cap), return its bytes."""
        name = self.store.name(shard)
        why = "fails its checksum" if corrupt else "is not in the cache (evicted or never rendered)"
        self.stats["corrupt_shards"] += corrupt
        if self.on_missing == "error":
            raise CacheMissError(f"{name} of {self.root} {why}; run build_cache.py on this cache to render it, or "
                                 f"open the cache with on_missing='render'")
        renderer, denoiser = self._renderer_for(name, why)
        texts = read_texts(self.root, self.manifest["text_offsets"], shard)
        blobs, overflow = render_blobs(renderer, denoiser, texts, self.manifest["compress_level"])
        data = encode_shard(blobs, self.shape, shard * self.shard_size)
        self.store.put(shard, data, {"shard": shard, "images": len(blobs), "overflow": overflow})
        self.stats["shards_rendered"] += 1
        self._close(shard)
        return data

    def _renderer_for(self, name, why):
        if self._tools is None:
            m = self.manifest
            if renderer_versions() != m["versions"]:
                raise CacheMissError(f"{name} {why}, and this environment renders with {renderer_versions()}, not "
                                     f"the cache's {m['versions']}: its bytes would differ; run build_cache.py "
                                     f"where the cache was built, or rebuild the cache here")
            font = m["font_path"]
            if font != "builtin" and not Path(font).is_file():
                font = resolve_font(m["render"]["font"])[0]
            if font_sha256(font) != m["font_sha256"]:
                raise CacheMissError(f"{name} {why}, and the cache's font {m['render']['font']} (sha256 "
                                     f"{m['font_sha256'][:12]}) is not installed here; install it or rebuild")
            render = RenderConfig(**{**m["render"], "font": font})
            self._tools = build(render, DenoiseConfig(**m["denoise"]), font)
        return self._tools


class ShardOrderSampler(torch.utils.data.Sampler):
    """Indices shard by shard: shards in a random order, samples in a random order inside each shard.

    Consecutive reads stay in one shard (one open file, one LRU touch), yet every epoch differs. The order is a
    function of (seed, epoch): call set_epoch(e) before each epoch. shuffle=False gives 0, 1, 2, ...
    """

    def __init__(self, dataset: TextImageCache, shuffle: bool = True, seed: int = 0):
        self.n, self.shard_size = len(dataset), dataset.shard_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        if not self.shuffle:
            yield from range(self.n)
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        shards = -(-self.n // self.shard_size)
        for shard in torch.randperm(shards, generator=g).tolist():
            start = shard * self.shard_size
            size = min(self.shard_size, self.n - start)
            yield from (start + torch.randperm(size, generator=g)).tolist()
