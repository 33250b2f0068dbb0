"""Sharded cache of rendered text images: file format, a crash-safe store with an LRU size cap, worker code.

A cache folder holds one corpus rendered with one set of settings:

    manifest.json             settings and their fingerprint, sample count, shard layout, bad-input counts;
                              written last when a cache is created: a folder without it holds no cache
    texts.bin                 the cleaned texts, one zlib-compressed JSON list per shard (offsets in the
                              manifest): what the images are rendered from, so any shard can be rendered again
    index.npy                 int64 (n, 3): sample id (input line number), shard, position in the shard
    shards/shard-000012.bin   the images; the size cap counts these (LRU recency: shards/.lru-index.json)
    markers/shard-000012.json size, sha256, images, overflow: written after the shard is durable
    .lock                     taken (flock) by every process that writes: the builder, readers that render

Shard file: b"FRTXIMG1" | uint32 n, C, H, W | uint64 first position | uint64 offsets[n + 1] (from the file
start) | n blobs, each zlib(one image's raw uint8 (C, H, W) bytes). One blob per image, not one stream per
shard: a random read decompresses one image instead of the shard, for 11% more bytes (built-in corpus at the
default settings, zlib level 4, one core of the CPU test machine: 2294 B per image as separate blobs, 2030 B
as one stream per shard; 0.22 ms to compress an image, 0.08 ms to decompress it). Level 4 has 96% of level 6's
compression (2193 B) at 70% of its time (0.31 ms); decompression costs the same at every level. zlib's adler32
checks every blob as it is decoded; the marker's sha256 covers the whole file (checked by the builder on
resume and by whole-shard reads).

A shard counts as present only if its file exists and matches its marker. An evicted shard is simply not
present, like one never rendered: build_cache.py renders missing shards while they fit under the cap (it
evicts only to enforce a lowered cap, never to make room), and a reader renders a missing shard on first use,
evicting the least recently used to stay under the cap (same bytes: rendering is deterministic), or, opened
with on_missing="error", raises CacheMissError.

Temp files (`.<name>.tmp.<pid>`, from lib/storage's atomic writes) of processes that no longer run are removed
whenever a store is opened, so nothing a crashed run half-wrote survives the next start.
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lib.storage import (LRUCache, StorageError, atomic_write_bytes, atomic_write_json, check_free_space,
                         format_bytes, lru_shrink, lru_touch, sha256_file)
from lib.textrender import Denoiser, Renderer, build, renderer_versions

FORMAT = "frugal-textcache-1"
SHARD_MAGIC = b"FRTXIMG1"
_HEAD = struct.Struct("<8sIIIIQ")   # magic, n, C, H, W, first position
_TMP_RE = re.compile(r"^\..+\.tmp\.(\d+)$")
_STALE_TMP_S = 24 * 3600            # temp files older than this are removed even if their pid is alive (reused)


class CacheError(StorageError):
    """A cache folder cannot be used as asked (other settings, corrupt, not a cache); the message says what to do."""


class CacheMissError(CacheError):
    """A shard is not in the cache (evicted, never rendered or corrupt) and the reader may not render it."""


# ----------------------------------------------------------------------------- shard format
def encode_shard(blobs, shape, first, magic=SHARD_MAGIC) -> bytes:
    """One shard file from per-image blobs of images of `shape` (C, H, W); `first` is its first position.

    The format is shared with lib/imagecache.py (JPEG blobs of varying sizes, shape (3, 0, 0), its own magic)."""
    n = len(blobs)
    head = _HEAD.pack(magic, n, *shape, first)
    offsets = np.empty(n + 1, dtype="<u8")
    offsets[0] = len(head) + 8 * (n + 1)
    offsets[1:] = offsets[0] + np.cumsum([len(b) for b in blobs], dtype=np.uint64)
    return b"".join([head, offsets.tobytes(), *blobs])


def parse_header(data: bytes, name="shard", magic=SHARD_MAGIC):
    """(n, shape, first, offsets) from the start of a shard file (at least the header and offset table)."""
    if len(data) < _HEAD.size:
        raise CacheError(f"{name} is truncated (no header)")
    found, n, c, h, w, first = _HEAD.unpack_from(data)
    if found != magic:
        raise CacheError(f"{name} is not a shard of this cache (magic {found!r}, expected {magic!r})")
    end = _HEAD.size + 8 * (n + 1)
    if len(data) < end:
        raise CacheError(f"{name} is truncated inside its offset table")
    offsets = np.frombuffer(data, dtype="<u8", count=n + 1, offset=_HEAD.size).astype(np.int64)
    return n, (c, h, w), first, offsets


def header_bytes(n) -> int:
    """Bytes of the header plus offset table of a shard of n images."""
    return _HEAD.size + 8 * (n + 1)


def decode_image(blob: bytes, shape, name="shard"):
    """One image, uint8 (C, H, W), from its zlib blob (zlib's adler32 checks it)."""
    try:
        raw = zlib.decompress(blob)
    except zlib.error as e:
        raise CacheError(f"{name}: an image does not decompress ({e})") from None
    if len(raw) != shape[0] * shape[1] * shape[2]:
        raise CacheError(f"{name}: an image has {len(raw)} bytes, expected {shape}")
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def decode_shard(data: bytes, name="shard"):
    """All images of a shard file as uint8 (n, C, H, W), plus its first position."""
    n, shape, first, offsets = parse_header(data, name)
    if offsets[-1] != len(data):
        raise CacheError(f"{name} has {len(data)} bytes, its offset table says {offsets[-1]}")
    out = np.empty((n, *shape), dtype=np.uint8)
    for i in range(n):
        out[i] = decode_image(data[offsets[i]:offsets[i + 1]], shape, name)
    return out, first


# ----------------------------------------------------------------------------- rendering (workers and readers)
def render_blobs(renderer: Renderer, denoiser: Denoiser, texts, level: int):
    """Render, clean up and compress each text: (list of zlib blobs, number of texts that overflowed the page)."""
    blobs, overflow = [], 0
    for text in texts:
        image, cut = renderer.render(text)
        blobs.append(zlib.compress(denoiser(image).tobytes(), level))
        overflow += cut
    return blobs, overflow


_WORKER = {}


def init_worker(render_cfg, denoise_cfg, font, level, per_sample=False):
    """Pool initializer: one renderer and one denoiser for this process, reused for every chunk.

    per_sample=True builds them for every sample instead (the first pipeline's pattern, kept to measure it
    in bench/build_cache_speed.py).
    """
    _WORKER.update(render=render_cfg, denoise=denoise_cfg, font=font, level=level, per_sample=per_sample)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    if not per_sample:
        _WORKER["renderer"], _WORKER["denoiser"] = build(render_cfg, denoise_cfg, font)


def _exit_with_parent(parent_pid):
    """A worker whose parent was killed (SIGKILL: no cleanup) would wait for tasks forever: exit instead."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(1)


def render_chunk(texts):
    """Worker task: (blobs, overflow, word-cache hits, misses) for a chunk of texts."""
    w = _WORKER
    if not w["per_sample"]:
        renderer = w["renderer"]
        hits, misses = renderer.hits, renderer.misses
        blobs, overflow = render_blobs(renderer, w["denoiser"], texts, w["level"])
        return blobs, overflow, renderer.hits - hits, renderer.misses - misses
    blobs, overflow, hits, misses = [], 0, 0, 0
    for text in texts:
        renderer, denoiser = build(w["render"], w["denoise"], w["font"])
        blob, cut = render_blobs(renderer, denoiser, [text], w["level"])
        blobs += blob
        overflow += cut
        hits, misses = hits + renderer.hits, misses + renderer.misses
    return blobs, overflow, hits, misses


def worker_ready(_):
    """A no-op task: once every worker has run one, all initializers are done."""
    time.sleep(0.05)
    return os.getpid()


# ----------------------------------------------------------------------------- settings
def settings(render_cfg, denoise_cfg, font, font_sha256, shard_size, level, texts_sha256, n):
    """Everything the shard bytes depend on; equal settings <=> interchangeable shards."""
    render = asdict(render_cfg)
    render.pop("word_cache_size")  # speed only
    render["font"] = "builtin" if font == "builtin" else Path(font).name
    return {"format": FORMAT, "render": render, "font_sha256": font_sha256, "denoise": asdict(denoise_cfg),
            "compress_level": level, "shard_size": shard_size, "samples": n, "texts_sha256": texts_sha256,
            "versions": renderer_versions()}


def fingerprint(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def differences(old: dict, new: dict, prefix=""):
    """Dotted keys whose values differ between two settings dicts, with old -> new."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def font_sha256(font) -> str:
    return "builtin" if font == "builtin" else sha256_file(font)


# ----------------------------------------------------------------------------- texts
def encode_texts(texts, shard_size):
    """texts.bin bytes and the per-shard byte offsets (n_shards + 1)."""
    parts, offsets = [], [0]
    for start in range(0, len(texts), shard_size):
        parts.append(zlib.compress(json.dumps(texts[start:start + shard_size]).encode(), 6))
        offsets.append(offsets[-1] + len(parts[-1]))
    return b"".join(parts), offsets


def read_texts(root, offsets, shard):
    """The texts of one shard, from texts.bin."""
    with open(Path(root) / "texts.bin", "rb") as f:
        f.seek(offsets[shard])
        data = f.read(offsets[shard + 1] - offsets[shard])
    try:
        return json.loads(zlib.decompress(data))
    except (zlib.error, ValueError) as e:
        raise CacheError(f"{root}/texts.bin is corrupt at shard {shard} ({e}); run build_cache.py on this "
                         f"cache again to rewrite it") from None


def read_manifest(root):
    """The manifest of a cache folder; CacheError if the folder holds no (finished) cache."""
    path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{root} holds no text-image cache (no manifest.json); build one with "
                         f"python build_cache.py --cache.dir={root}") from None
    except ValueError as e:
        raise CacheError(f"{path} is corrupt ({e}); run build_cache.py on this folder again") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{root} holds a cache of format {manifest.get('format')!r}, this code reads {FORMAT}")
    return manifest


# ----------------------------------------------------------------------------- store
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class ShardStore:
    """The shard files of one cache folder: LRU size cap (lib/storage.LRUCache), markers, verification, locking.

    Every write (a shard and its marker, an eviction, an LRU touch) happens under an exclusive flock on
    `<root>/.lock`, re-reading the LRU index first, so a builder and several reader processes can share a
    cache (on Windows, without fcntl, one process at a time).
    """

    def __init__(self, root, max_bytes: int, setting: str = "cache.dir"):
        self.root = Path(root)
        self.setting = setting  # the option that names this folder, for messages
        self.shards = self.root / "shards"
        self.markers = self.root / "markers"
        self.max_bytes = int(max_bytes)
        self.shards.mkdir(parents=True, exist_ok=True)
        self.markers.mkdir(parents=True, exist_ok=True)
        self.removed_temps = self.clean_temps()

    # -- names and locking
    @staticmethod
    def name(shard: int) -> str:
        return f"shard-{shard:06d}.bin"

    def path(self, shard: int) -> Path:
        return self.shards / self.name(shard)

    def marker_path(self, shard: int) -> Path:
        return self.markers / f"shard-{shard:06d}.json"

    @contextlib.contextmanager
    def locked(self):
        try:
            import fcntl
        except ImportError:  # Windows: no cross-process lock
            yield
            return
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _lru(self) -> LRUCache:
        return LRUCache(self.shards, self.max_bytes)  # reads the current index from disk

    # -- housekeeping
    def clean_temps(self) -> int:
        """Remove temp files left by processes that no longer run (or older than a day); returns how many."""
        removed = 0
        now = time.time()
        for folder in (self.root, self.shards, self.markers):
            for path in folder.iterdir():
                m = _TMP_RE.match(path.name)
                if not m:
                    continue
                try:
                    stale = now - path.stat().st_mtime > _STALE_TMP_S
                except FileNotFoundError:
                    continue
                if stale or not _pid_alive(int(m.group(1))):
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def _drop_orphan_markers(self):
        for marker in self.markers.glob("shard-*.json"):
            if not (self.shards / (marker.stem + ".bin")).exists():
                marker.unlink(missing_ok=True)

    # -- state
    def marker(self, shard: int):
        try:
            return json.loads(self.marker_path(shard).read_text())
        except (OSError, ValueError):
            return None

    def present(self, shard: int, verify: bool = True) -> bool:
        """True if the shard file matches its marker: size always, sha256 too when verify."""
        meta = self.marker(shard)
        try:
            if not isinstance(meta, dict) or self.path(shard).stat().st_size != meta.get("bytes"):
                return False
            return not verify or sha256_file(self.path(shard)) == meta.get("sha256")
        except OSError:
            return False

    def used_bytes(self) -> int:
        return self._lru().size_bytes()

    # -- writes
    def remove(self, shard: int):
        """Delete a shard (marker first, so a crash in between leaves an unmarked file: not present)."""
        with self.locked():
            self.marker_path(shard).unlink(missing_ok=True)
            self.path(shard).unlink(missing_ok=True)

    def shrink(self) -> list[str]:
        """Evict least-recently-used shards until the cache fits its cap; returns the evicted names."""
        with self.locked():
            evicted = lru_shrink(self._lru())
            self._drop_orphan_markers()
        return evicted

    def touch(self, shard: int):
        """Record a read of the shard (LRU recency)."""
        with self.locked():
            lru_touch(self._lru(), self.name(shard))

    def put(self, shard: int, data: bytes, meta: dict, evict: bool = True) -> bool:
        """Write a shard durably, then its marker. To fit the cap, evict least-recently-used shards, or with
        evict=False write nothing and return False. A full disk raises StorageError, leaving no marker."""
        name = self.name(shard)
        if len(data) > self.max_bytes:
            raise CacheError(f"one shard is {format_bytes(len(data))}, more than the cache cap "
                             f"{format_bytes(self.max_bytes)}: raise cache.max_gb or lower cache.shard_size")
        with self.locked():
            lru = self._lru()
            if not evict:
                try:
                    current = self.path(shard).stat().st_size
                except FileNotFoundError:
                    current = 0
                if lru.size_bytes() - current + len(data) > self.max_bytes:
                    return False
            self.marker_path(shard).unlink(missing_ok=True)
            check_free_space(self.shards, len(data) + (1 << 20), f"cache shard {name}",
                             f"free space or point {self.setting} to a larger disk, then run the same command again")
            try:
                lru.put(name, data)
                atomic_write_json(self.marker_path(shard), {**meta, "bytes": len(data),
                                                            "sha256": hashlib.sha256(data).hexdigest()})
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    self.path(shard).unlink(missing_ok=True)
                    self.marker_path(shard).unlink(missing_ok=True)
                    raise StorageError(errno.ENOSPC, f"disk full while writing cache shard {name} under "
                                                     f"{self.shards}: free space or point {self.setting} to a "
                                                     f"larger disk, then run the same command again (finished "
                                                     f"shards are kept)") from None
                raise
            self._drop_orphan_markers()
        return True


def write_file(path, data: bytes, what: str):
    """atomic_write_bytes with a full disk turned into a StorageError that says what to do."""
    check_free_space(Path(path).parent, len(data) + (1 << 20), what,
                     "free space or point cache.dir to a larger disk")
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(errno.ENOSPC, f"disk full while writing {what} ({path}); free space or point "
                                             f"cache.dir to a larger disk") from None
        raise
