"""A compact, pre-resized cache of an ImageFolder split (the FFCV idea), read by ImageFolderLoader (data.loader=cache).

Every image is re-encoded once as a baseline RGB JPEG whose shorter side is at most `side` px (256 by default:
enough for 224 px random-resized crops; larger images are scaled down with PIL's antialiased bilinear filter,
smaller baseline JPEGs are stored byte for byte), and packed into shards with an offset table. Grayscale, CMYK,
progressive and PNG-named-.JPEG files are converted once here, so every cached file goes to nvJPEG's batched
path; unreadable files (truncated, empty) are recorded as such and skipped at read time exactly as the jpeg
loader skips them (replaced by the next readable file, listed by their original path).

    <cache_dir>/<split>/  (train, val)
      manifest.json              settings and the source folder's fingerprint (relative paths, sizes, mtimes);
                                 written first: a folder without it holds no cache. "complete" once every shard is
      source.npz                 the listing the cache was built from (what changed, when the folder has since)
      shards/shard-000012.bin    SHARD_IMAGES encoded files, lib/textcache.py's shard format with magic
                                 b"FRIMJPG1" and shape (3, 0, 0): b"FRIMJPG1" | uint32 n, 3, 0, 0 | uint64 first
                                 position | uint64 offsets[n + 1] | the files back to back
      markers/shard-000012.json  size and sha256 of the shard, per-image height / width / source kind / error:
                                 written after the shard is durable (lib/textcache.ShardStore)
      index.npz                  per image: shard, offset, bytes (-1 = unreadable source), height, width; written
                                 last, when every shard is present

Resume: a shard counts only if its file matches its marker (size; sha256 when verified), so a build killed at any
point (kill -9 included) continues with the missing shards; temp files of dead processes are removed. Opening a
cache checks the source folder: a file added, removed, resized or touched since the build is refused with what
changed (rebuild into a new data.cache_dir or delete the old one). A shard that fails its checksum is built again
from the source folder. Reads are one pread per image from the shard (the page cache holds a warm cache); opening
with verify reads every shard sequentially once (its sha256), which also warms the page cache.
"""
import collections
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
from PIL import Image

from lib.storage import atomic_write_json
from lib.textcache import (CacheError, ShardStore, differences, encode_shard, header_bytes, parse_header,
                           write_file)

FORMAT = "frugal-imagecache-1"
SHARD_MAGIC = b"FRIMJPG1"
SHARD_IMAGES = 1024             # images per shard: the unit of writing, verification and resume
TASK_IMAGES = 32                # images per task handed to a build worker
NO_CAP = 1 << 62                # the store's LRU cap: an image cache is never evicted
_OPEN_FILES = 64                # shard files kept open per reading process


# ----------------------------------------------------------------------------- re-encoding (build workers)
def stored_size(width, height, side):
    """(width, height) of an image stored at shorter side <= side px (larger ones are scaled down)."""
    scale = min(1.0, side / min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def reencode(path, side, quality):
    """One source file as stored in the cache: (encoded bytes, height, width, source kind, error).

    An unreadable file gives (b"", 0, 0, "unreadable", the error); its place in the index says so."""
    from lib.jpeg import sniff_jpeg  # imported here: spawned build workers import only what they use
    try:
        with open(path, "rb") as f:
            data = f.read()
        kind, height, width = sniff_jpeg(data)
        if kind == "baseline" and min(height, width) <= side:
            return data, height, width, kind, ""  # small enough and nvJPEG-ready: no second lossy encode
        if not data:
            raise OSError("empty file")
        img = Image.open(io.BytesIO(data))
        size = stored_size(*img.size, side)
        img.draft(img.mode, size)  # DCT-domain scaling where the image is 2x (or more) larger than needed
        img.load()
        img = img.convert("RGB") if img.mode != "RGB" else img
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)  # antialiased: PIL widens the filter when it shrinks
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=quality)  # baseline, 4:2:0 chroma (PIL's default below quality 95)
        return out.getvalue(), size[1], size[0], kind, ""
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return b"", 0, 0, "unreadable", f"{type(e).__name__}: {e}"


def _reencode_task(task):
    paths, side, quality = task
    return [reencode(p, side, quality) for p in paths]


# ----------------------------------------------------------------------------- the source folder
def listing(split_dir, rel_paths):
    """(sizes, mtimes in ns) of the listed files: with the paths, what a cache's validity depends on."""
    sizes = np.empty(len(rel_paths), dtype=np.int64)
    mtimes = np.empty(len(rel_paths), dtype=np.int64)
    for i, rel in enumerate(rel_paths):
        st = os.stat(os.path.join(split_dir, os.fsdecode(rel)))
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def source_fingerprint(rel_paths, sizes, mtimes):
    h = hashlib.sha256()
    for rel, size, mtime in zip(rel_paths, sizes.tolist(), mtimes.tolist()):
        h.update(bytes(rel) + b"\0" + f"{size}:{mtime}\n".encode())
    return h.hexdigest()


def _changes(old, rel_paths, sizes, mtimes):
    """A few words on how the folder differs from the listing a cache was built from."""
    before = {bytes(p): (int(s), int(m)) for p, s, m in zip(old["paths"], old["sizes"], old["mtimes"])}
    now = {bytes(p): (int(s), int(m)) for p, s, m in zip(rel_paths, sizes, mtimes)}
    added = sorted(set(now) - set(before))
    removed = sorted(set(before) - set(now))
    changed = sorted(p for p in set(now) & set(before) if now[p] != before[p])
    parts = []
    for what, names in (("added", added), ("removed", removed), ("changed (size or mtime)", changed)):
        if names:
            parts.append(f"{len(names)} {what}, e.g. {os.fsdecode(names[0])}")
    return "; ".join(parts) or "the file order differs"


# ----------------------------------------------------------------------------- reading (loader workers)
class CacheSplit:
    """A complete image cache of one split, as ImageFolderLoader reads it: read(i) -> the encoded file of sample i,
    name(i) -> its path in the source folder (for messages). Safe in DataLoader workers (files opened per
    process, on first use)."""

    def __init__(self, cache_dir, source_dir):
        self.dir, self.root = Path(cache_dir), str(source_dir)
        self.manifest = _read_manifest(self.dir)
        with np.load(self.dir / "index.npz") as index:
            self.shard, self.offset, self.length = index["shard"], index["offset"], index["length"]
            self.height, self.width = index["height"], index["width"]
        with np.load(self.dir / "source.npz") as src:
            self.rel_paths = src["paths"]
        self.errors = {int(k): v for k, v in self.manifest.get("errors", {}).items()}
        self._files = collections.OrderedDict()  # shard -> fd

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = collections.OrderedDict()  # descriptors stay with their process
        return state

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def __len__(self):
        return len(self.length)

    def name(self, index):
        return os.path.join(self.root, os.fsdecode(self.rel_paths[index]))

    def read(self, index):
        if self.length[index] < 0:
            raise OSError(f"unreadable when the cache was built: {self.errors.get(int(index), 'no image')}")
        fd = self._open(int(self.shard[index]))
        return os.pread(fd, int(self.length[index]), int(self.offset[index]))

    def _open(self, shard):
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        fd = os.open(self.dir / "shards" / ShardStore.name(shard), os.O_RDONLY)
        self._files[shard] = fd
        if len(self._files) > _OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def bytes_per_image(self):
        ok = self.length >= 0
        return float(self.length[ok].mean()) if ok.any() else 0.0


def _read_manifest(cache_dir):
    path = Path(cache_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} holds no image cache (no manifest.json)") from None
    except ValueError as e:
        raise CacheError(f"{path} is corrupt ({e}); delete {cache_dir} and build the cache again") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{cache_dir} holds a cache of format {manifest.get('format')!r}, this code reads {FORMAT}; "
                         f"set data.cache_dir to a new folder")
    return manifest


# ----------------------------------------------------------------------------- building
def _check_or_start(cache_dir, settings, rel_paths, sizes, mtimes, setting):
    """The manifest of a cache of these settings and this source listing: an existing one is checked (other
    settings or a changed folder are refused), a new one is written with the listing. Returns it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    source = {"files": len(rel_paths), "fingerprint": source_fingerprint(rel_paths, sizes, mtimes)}
    if (cache_dir / "manifest.json").exists():
        manifest = _read_manifest(cache_dir)
        if manifest["settings"] != settings:
            changed = "; ".join(differences(manifest["settings"], settings))
            raise CacheError(f"{cache_dir} holds a cache built with other settings ({changed}); delete it or set "
                             f"{setting} to a new folder")
        if manifest["source"]["fingerprint"] != source["fingerprint"]:
            with np.load(cache_dir / "source.npz") as old:
                what = _changes(old, rel_paths, sizes, mtimes)
            raise CacheError(f"the image folder changed since the cache in {cache_dir} was built ({what}); the cache "
                             f"would train on stale images: delete {cache_dir} and build it again, or set {setting} "
                             f"to a new folder")
        return manifest
    if any(p.name not in ("shards", "markers") and not p.name.startswith(".") for p in cache_dir.iterdir()):
        raise CacheError(f"{cache_dir} is not empty and holds no image cache; choose an empty or new {setting}")
    buf = io.BytesIO()
    np.savez(buf, paths=rel_paths, sizes=sizes, mtimes=mtimes)
    write_file(cache_dir / "source.npz", buf.getvalue(), "the image cache's source listing")
    manifest = {"format": FORMAT, "settings": settings, "source": source,
                "shards": -(-len(rel_paths) // settings["shard_images"]), "complete": False,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pillow": Image.__version__}
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return manifest


def _verify(store, shards, verify, threads=8):
    """The shards among `shards` that are missing or fail their marker (size; sha256 when verify), in parallel."""
    with ThreadPoolExecutor(threads) as pool:  # hashlib releases the GIL on large reads
        ok = list(pool.map(lambda s: store.present(s, verify=verify), shards))
    return [s for s, good in zip(shards, ok) if not good]


def _ordered(pool, tasks, window):
    """Results of _reencode_task over `tasks` in order, at most `window` in flight; in this process without pool."""
    if pool is None:
        yield from map(_reencode_task, tasks)
        return
    pending = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(_reencode_task, task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise CacheError("a process building the image cache died (killed, or out of memory?); the shards finished "
                         "so far are kept: run the same command again (with fewer data.cache_workers if memory is "
                         "short)") from None
    finally:
        for future in pending:
            future.cancel()


def _build_shards(store, split_dir, rel_paths, todo, settings, workers, log):
    """Re-encode and write the shards in `todo`, in order, each as soon as it is complete. Returns images done."""
    side, quality, per_shard = settings["side"], settings["quality"], settings["shard_images"]
    tasks = []
    for shard in todo:
        paths = [os.path.join(split_dir, os.fsdecode(p)) for p in rel_paths[shard * per_shard:(shard + 1) * per_shard]]
        tasks += [(paths[i:i + TASK_IMAGES], side, quality) for i in range(0, len(paths), TASK_IMAGES)]
    pool, workers = None, min(workers, len(tasks))
    if workers > 0:  # spawned, not forked: the caller may hold CUDA and threads
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    done, pending, queue = 0, [], collections.deque(todo)
    start = time.perf_counter()
    try:
        for results in _ordered(pool, tasks, window=4 * max(1, workers)):
            pending += results
            shard = queue[0]
            if len(pending) < min(per_shard, len(rel_paths) - shard * per_shard):
                continue
            queue.popleft()
            blobs = [r[0] for r in pending]
            meta = {"shard": shard, "images": len(pending), "heights": [r[1] for r in pending],
                    "widths": [r[2] for r in pending],
                    "kinds": {str(i): r[3] for i, r in enumerate(pending) if r[3] != "baseline"},
                    "errors": {str(i): r[4] for i, r in enumerate(pending) if r[4]}}
            store.put(shard, encode_shard(blobs, (3, 0, 0), shard * per_shard, magic=SHARD_MAGIC), meta,
                      evict=False)
            done += len(pending)
            pending = []
            rate = done / max(time.perf_counter() - start, 1e-9)
            log(f"[cache] {store.name(shard)} written ({done} images this run, {rate:.0f} images/s)")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return done


def _write_index(store, cache_dir, manifest, n):
    """index.npz from the markers and shard headers; the manifest marked complete with the build's counts."""
    index = {k: np.empty(n, dtype=np.int64) for k in ("shard", "offset", "length", "height", "width")}
    kinds, errors = {}, {}
    for shard in range(manifest["shards"]):
        meta = store.marker(shard)
        first = shard * manifest["settings"]["shard_images"]
        count = meta["images"]
        with open(store.path(shard), "rb") as f:
            _, _, _, offsets = parse_header(f.read(header_bytes(count)), store.name(shard), magic=SHARD_MAGIC)
        rows = slice(first, first + count)
        index["shard"][rows] = shard
        index["offset"][rows] = offsets[:-1]
        index["length"][rows] = np.diff(offsets)
        index["height"][rows], index["width"][rows] = meta["heights"], meta["widths"]
        for pos, kind in meta["kinds"].items():
            if kind != "unreadable":
                kinds[kind] = kinds.get(kind, 0) + 1
        for pos, error in meta["errors"].items():
            errors[str(first + int(pos))] = error
            index["length"][first + int(pos)] = -1
    buf = io.BytesIO()
    np.savez(buf, **index)
    write_file(cache_dir / "index.npz", buf.getvalue(), "the image cache's index")
    ok = index["length"] >= 0
    manifest.update(complete=True, converted=kinds, unreadable=len(errors), errors=errors,
                    bytes_per_image=round(float(index["length"][ok].mean()), 1) if ok.any() else 0.0)
    atomic_write_json(cache_dir / "manifest.json", manifest)
    return manifest


def open_or_build(split_dir, rel_paths, cache_dir, *, side=256, quality=90, workers=0, verify=True, log=print,
                  setting="data.cache_dir", shard_images=SHARD_IMAGES, build=True):
    """The image cache of one ImageFolder split as a CacheSplit: built (or completed, after a crash) if needed.

    Refuses a cache of other settings and one built from a folder that changed since (file list, sizes, mtimes);
    shards that are missing or fail their checksum are built again from the source folder (build=False: refused).
    Returns (cache, report) with what this call did (shards built, images, seconds, images per second)."""
    split_dir, cache_dir = Path(split_dir), Path(cache_dir)
    if side < 32 or not 1 <= quality <= 95:
        raise CacheError(f"image cache: side must be >= 32 px and quality in 1..95, got {side}, {quality}")
    t0 = time.perf_counter()
    sizes, mtimes = listing(split_dir, rel_paths)
    settings = {"side": int(side), "quality": int(quality), "shard_images": int(shard_images)}
    manifest = _check_or_start(cache_dir, settings, rel_paths, sizes, mtimes, setting)
    store = ShardStore(cache_dir, NO_CAP, setting=setting)
    todo = _verify(store, list(range(manifest["shards"])), verify)
    if todo and not build:
        raise CacheError(f"the image cache in {cache_dir} misses {len(todo)} of {manifest['shards']} shards; build it "
                         f"first (the first rank does, or python tools/build_image_cache.py)")
    corrupt = [s for s in todo if store.marker(s) is not None]
    for shard in corrupt:
        log(f"[cache] {cache_dir / 'shards' / store.name(shard)} fails its checksum (damaged on disk?): building it "
            f"again from {split_dir}")
    for shard in todo:
        store.remove(shard)
    report = {"cache_dir": str(cache_dir), "images": len(rel_paths), "shards": manifest["shards"],
              "shards_built": len(todo), "corrupt_rebuilt": len(corrupt), "verify_seconds": time.perf_counter() - t0}
    if todo:
        log(f"[cache] {cache_dir}: building {len(todo)} of {manifest['shards']} shards from {split_dir} "
            f"(short side <= {side} px, JPEG quality {quality}, {workers} worker processes)")
        t1 = time.perf_counter()
        built = _build_shards(store, split_dir, rel_paths, todo, settings, workers, log)
        seconds = time.perf_counter() - t1
        report.update(images_built=built, build_seconds=round(seconds, 3),
                      build_images_per_s=round(built / seconds, 1) if seconds > 0 else None)
    if todo or not manifest.get("complete"):
        manifest = _write_index(store, cache_dir, manifest, len(rel_paths))
    report.update(bytes_per_image=manifest["bytes_per_image"], converted=manifest["converted"],
                  unreadable=manifest["unreadable"], seconds=round(time.perf_counter() - t0, 3))
    return CacheSplit(cache_dir, split_dir), report


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of two uint8 arrays of one shape (inf when equal)."""
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if err == 0 else 10 * math.log10(255.0 ** 2 / err)
