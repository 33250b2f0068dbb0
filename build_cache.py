"""Render text into 224x224 images, fast, into a resumable, size-capped, checksummed cache of shards.

    # CPU, seconds: 512 samples of the built-in corpus at 64x64, rendered in this process
    python build_cache.py --config configs/cache_tiny.yaml
    # the built-in corpus (Python's language reference help texts) at 224x224 on every core
    python build_cache.py --config configs/cache_default.yaml
    # your texts: one sample per line, or JSON lines with a "text" field; the cache where training reads it
    python build_cache.py --config configs/cache_default.yaml --data.source=/data/texts.jsonl \\
        --cache.dir=/data/textcache
    # killed, out of disk, preempted? Run the same command again: present shards are kept, the rest rendered

Pipeline: the input is read and cleaned in this process (bad-input policy and counts: lib/textcorpus.py), cut
into shards of cache.shard_size samples and written as texts.bin + index.npy + manifest.json (lib/textcache.py
describes the folder). Every missing shard is then cut into tasks of cache.chunk_size texts for a spawn-context
process pool (concurrent.futures: a killed worker is an error, not a hang) whose initializer builds ONE
renderer and ONE denoiser per worker (font loaded once, word cache kept warm: lib/textrender.py); workers
render, clean up and zlib-compress each image; this process assembles each shard in order and one writer
thread writes it durably (temp file, fsync, rename), then its marker, while rendering goes on.

Resume: a shard counts only if its file matches its marker (size and sha256); others are rendered again, with
the same bytes (rendering is deterministic). A folder built with other settings (render, denoise, texts, font,
Pillow/FreeType version) is refused with the differences listed. Size cap (cache.max_gb): the build fills the
cache up to the cap and stops there; shards beyond it are rendered by the reader (lib/textreader.py) on first
use, which evicts least-recently-used shards to stay under the cap. Read the cache with
`lib.textreader.TextImageCache(cache_dir)`: a torch Dataset of (uint8 (C, H, W) image, sample id).
"""
import collections
import dataclasses
import hashlib
import io
import multiprocessing as mp
import queue
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lib.config import ConfigError
from lib.storage import atomic_write_json, format_bytes, format_report, storage_report
from lib.textcache import (FORMAT, CacheError, ShardStore, differences, encode_shard, encode_texts, fingerprint,
                           font_sha256, init_worker, read_manifest, render_chunk, settings, write_file)
from lib.textcorpus import CorpusConfig, read_corpus
from lib.textrender import DenoiseConfig, MODES, RenderConfig, log, resolve_font, usable_cores


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    name: str = "textcache"         # run folder: <out_dir>/<name> (config.yaml, run_info.json, build_report.json)
    out_dir: str = "runs"


@dataclass
class CacheConfig:
    dir: str = ""                   # the cache folder ("" = <out_dir>/<name>/cache); the same folder resumes
    shard_size: int = 1024          # images per shard file: the unit of writing, resume, eviction and lost work
    max_gb: float = 5.0             # cap on the shard files, GB (1e9 bytes); least recently used evicted first
    compress_level: int = 4         # zlib level of each image: 1 fastest .. 9 smallest (lib/textcache.py)
    workers: int = -1               # render processes: -1 = one per usable core, 0 = render in this process
    chunk_size: int = 64            # texts per task handed to a worker
    verify: bool = True             # on resume, check the sha256 of every present shard (false: sizes only)
    progress: bool = True           # progress bar with images/s on stderr


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: CorpusConfig = field(default_factory=CorpusConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def validate(self):
        c = self.cache
        if c.shard_size < 1 or c.chunk_size < 1 or c.workers < -1:
            raise ConfigError("cache.shard_size and cache.chunk_size must be >= 1, cache.workers >= -1")
        if not 0 <= c.compress_level <= 9:
            raise ConfigError(f"cache.compress_level must be 0-9 (zlib), got {c.compress_level}")
        if c.max_gb <= 0:
            raise ConfigError(f"cache.max_gb must be > 0 (GB of shard files), got {c.max_gb}")


# ----------------------------------------------------------------------------- the cache folder
@dataclass
class Plan:
    root: Path
    store: ShardStore
    manifest: dict
    texts: list
    render: RenderConfig            # with render.font resolved to a file path (or 'builtin') for the workers
    todo: list                      # shards to render, in order
    corrupt: list                   # shards that were present but failed their checksum (removed, in todo)
    evicted: list                   # shards evicted at the start because the cap was lowered


def open_cache(cfg: Config, root: Path, corpus) -> Plan:
    """Create the cache folder's texts, index and manifest, or check that an existing one matches; plan shards."""
    font, note = resolve_font(cfg.render.font)
    if note:
        log(f"note: {note}")
    render = dataclasses.replace(cfg.render, font=font)
    n, size = len(corpus.texts), cfg.cache.shard_size
    texts_bin, text_offsets = encode_texts(corpus.texts, size)
    index = np.stack([np.asarray(corpus.ids, dtype=np.int64), np.arange(n) // size, np.arange(n) % size], 1)
    values = settings(render, cfg.denoise, font, font_sha256(font), size, cfg.cache.compress_level,
                      hashlib.sha256(texts_bin).hexdigest(), n)
    max_bytes = int(cfg.cache.max_gb * 1e9)
    manifest = {**values, "fingerprint": fingerprint(values), "shards": len(text_offsets) - 1,
                "image_shape": [MODES[render.mode], render.height, render.width], "text_offsets": text_offsets,
                "font_path": font, "max_bytes": max_bytes, "input": corpus.source, "input_counts": corpus.counts}
    root.mkdir(parents=True, exist_ok=True)
    old = None
    if (root / "manifest.json").exists():
        old = read_manifest(root)
        if old["fingerprint"] != manifest["fingerprint"]:
            changed = "; ".join(differences({k: old.get(k) for k in values}, values)[:6])
            raise CacheError(f"{root} holds a cache built with other settings ({changed}); delete that folder or "
                             f"set cache.dir to a new one")
    elif any(p.name not in ("shards", "markers", "texts.bin", "index.npy") and not p.name.startswith(".")
             for p in root.iterdir()) or any((root / "shards").glob("shard-*")):
        raise CacheError(f"{root} is not empty and holds no cache manifest; choose an empty or new cache.dir")
    store = ShardStore(root, max_bytes)
    if store.removed_temps:
        log(f"removed {store.removed_temps} temp file(s) left by an interrupted run")
    # texts.bin and index.npy are derived from the input: rewrite them if missing or damaged
    if old is None or not _same_bytes(root / "texts.bin", texts_bin):
        write_file(root / "texts.bin", texts_bin, "the cache's texts")
    index_bytes = _npy_bytes(index)
    if old is None or not _same_bytes(root / "index.npy", index_bytes):
        write_file(root / "index.npy", index_bytes, "the cache's index")
    if old is None or old.get("max_bytes") != max_bytes:
        atomic_write_json(root / "manifest.json", {**manifest, "created": (old or {}).get("created", _now())})
    manifest = read_manifest(root)
    evicted = store.shrink()
    todo, corrupt = [], []
    for shard in range(manifest["shards"]):
        if store.present(shard, verify=cfg.cache.verify):
            continue
        if store.marker(shard) is not None and store.path(shard).exists():
            corrupt.append(shard)
            log(f"{store.name(shard)} fails its checksum: rendering it again")
        store.remove(shard)
        todo.append(shard)
    return Plan(root, store, manifest, corpus.texts, render, todo, corrupt, evicted)


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------- rendering
class WorkerDied(RuntimeError):
    """A render process died (killed, out of memory); finished shards are kept."""


def start_pool(workers, render, denoise, level, per_sample=False):
    """A spawn-context process pool; each worker builds one renderer and one denoiser (per_sample: init_worker)."""
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=init_worker,
                               initargs=(render, denoise, render.font, level, per_sample))


def _ordered(pool, tasks, window):
    """Results of render_chunk over `tasks`, in order, with at most `window` tasks in flight (bounded memory)."""
    if pool is None:
        yield from map(render_chunk, tasks)
        return
    pending = collections.deque()
    try:
        for task in tasks:
            pending.append(pool.submit(render_chunk, task))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise WorkerDied("a render worker process died (killed, or out of memory?); the shards finished so far "
                         "are kept: run the same command again, with fewer cache.workers if memory is short") from None
    finally:
        for future in pending:
            future.cancel()


class ShardWriter:
    """The one writer: a thread that writes finished shards durably (shard, fsync, marker) in order, so fsync
    waits overlap rendering. At most `depth` finished shards wait for it (bounded memory)."""

    def __init__(self, store: ShardStore, depth: int = 2):
        self.store, self.queue = store, queue.Queue(depth)
        self.written, self.cap_reached, self.error = [], False, None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is not None or self.cap_reached:
                continue  # drain: nothing after a failure or the cap is written
            shard, data, meta = item
            try:
                if self.store.put(shard, data, meta, evict=False):
                    self.written.append(meta)
                else:
                    self.cap_reached = True
            except BaseException as e:  # re-raised in the main thread
                self.error = e

    def put(self, shard, data, meta):
        if self.error is not None:
            raise self.error
        self.queue.put((shard, data, meta))

    def close(self):
        """Wait until every queued shard is written; re-raise a write error."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def render_shards(plan: Plan, cfg: Config, pool=None, workers=0, stop=lambda: False):
    """Render plan.todo through the pool (or in this process); each shard is written as soon as it is complete.

    Stops at the first shard that does not fit under the cap (not written), or when `stop()` says so (a preemption
    signal: the shards completed so far are written). Returns the run's counts.
    """
    size, shape = plan.manifest["shard_size"], tuple(plan.manifest["image_shape"])
    chunk = cfg.cache.chunk_size
    shard_texts = {s: plan.texts[s * size:(s + 1) * size] for s in plan.todo}
    tasks = (texts[i:i + chunk] for s in plan.todo for texts in [shard_texts[s]] for i in range(0, len(texts), chunk))
    todo = collections.deque(plan.todo)
    blobs, overflow, hits, misses = [], 0, 0, 0
    writer = ShardWriter(plan.store)
    start = time.perf_counter()
    try:
        with tqdm(total=sum(map(len, shard_texts.values())), unit="img", disable=not cfg.cache.progress,
                  mininterval=1.0, smoothing=0.05) as bar:
            for chunk_blobs, chunk_overflow, chunk_hits, chunk_misses in _ordered(pool, tasks, max(1, workers) * 4):
                blobs += chunk_blobs
                overflow, hits, misses = overflow + chunk_overflow, hits + chunk_hits, misses + chunk_misses
                bar.update(len(chunk_blobs))
                if stop():
                    break
                if len(blobs) < len(shard_texts[todo[0]]):
                    continue
                shard = todo.popleft()
                writer.put(shard, encode_shard(blobs, shape, shard * size),
                           {"shard": shard, "images": len(blobs), "overflow": overflow})
                blobs, overflow = [], 0
                if writer.cap_reached:
                    break
    finally:
        writer.close()  # shards already rendered are written even if rendering failed
    return {"shards_written": len(writer.written), "images_rendered": sum(m["images"] for m in writer.written),
            "overflow": sum(m["overflow"] for m in writer.written), "word_hits": hits, "word_misses": misses,
            "cap_reached": writer.cap_reached, "seconds": time.perf_counter() - start}


def build(plan: Plan, cfg: Config, stop=lambda: False):
    """Render every shard the cache misses, with cache.workers processes; returns the counts of this run."""
    workers = usable_cores() if cfg.cache.workers == -1 else cfg.cache.workers
    workers = min(workers, -(-len(plan.todo) * plan.manifest["shard_size"] // cfg.cache.chunk_size))  # <= tasks
    if not plan.todo:
        return {"shards_written": 0, "images_rendered": 0, "overflow": 0, "word_hits": 0, "word_misses": 0,
                "cap_reached": False, "seconds": 0.0, "workers": 0}
    level = plan.manifest["compress_level"]
    if workers == 0:
        init_worker(plan.render, cfg.denoise, plan.render.font, level)
        return {**render_shards(plan, cfg, stop=stop), "workers": 0}
    pool = start_pool(workers, plan.render, cfg.denoise, level)
    try:
        return {**render_shards(plan, cfg, pool, workers, stop), "workers": workers}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------- report
def cache_report(plan: Plan) -> dict:
    """Bytes per category of the cache folder, and what is in it."""
    root, store = plan.root, plan.store
    present = [s for s in range(plan.manifest["shards"]) if store.present(s, verify=False)]
    markers = [store.marker(s) for s in present]
    images = sum(m["images"] for m in markers)
    shard_bytes = sum(m["bytes"] for m in markers)
    sizes = storage_report({"shards": store.shards, "markers": store.markers, "texts": root / "texts.bin",
                            "index": root / "index.npy", "manifest": root / "manifest.json"})
    return {"shards_present": len(present), "shards_missing": plan.manifest["shards"] - len(present),
            "images_present": images, "overflow_in_present_shards": sum(m["overflow"] for m in markers),
            "bytes_per_image": round(shard_bytes / images, 1) if images else None,
            "cap_bytes": store.max_bytes, "storage": sizes}


# ----------------------------------------------------------------------------- main
def main(cfg: Config) -> dict:
    """Build (or complete) the cache; returns the report also written to <out_dir>/<name>/result.json."""
    # lib.run imports torch; imported here, not at the top, so the spawned render workers (which import this
    # module) start without it
    from lib.dist import DistInfo
    from lib.run import Run
    import torch
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    # the cache folder's manifest refuses other render settings (it knows which matter): the run folder refuses none
    with Run(cfg, info, may_change=(), work=(), log=log) as run:
        root = Path(cfg.cache.dir) if cfg.cache.dir else run.dir / "cache"
        corpus = read_corpus(cfg.data)
        if not corpus.texts:
            raise ConfigError(f"data.source={cfg.data.source} gives no samples to render (input counts: "
                              f"{corpus.counts}); check the file and data.format / data.text_field")
        c = corpus.counts
        log(f"input: {c['samples']} samples from {c['lines']} lines; skipped {c['empty_skipped']} empty, "
            f"{c['invalid_utf8_skipped']} invalid UTF-8, {c['bad_json_skipped']} bad JSON; replaced invalid UTF-8 "
            f"in {c['invalid_utf8_replaced']}, cleaned control characters in {c['control_chars_cleaned']}, "
            f"truncated {c['truncated']} to {cfg.data.max_chars} characters")
        plan = open_cache(cfg, root, corpus)
        shards = plan.manifest["shards"]
        log(f"cache {root}: {shards - len(plan.todo)} of {shards} shards present, rendering {len(plan.todo)}"
            + (f" ({len(plan.corrupt)} failed their checksum)" if plan.corrupt else "")
            + (f"; evicted {len(plan.evicted)} to fit the cap" if plan.evicted else ""))
        counts = build(plan, cfg, stop=lambda: run.should_stop(collective=False))
        cache = cache_report(plan)
        rate = counts["images_rendered"] / counts["seconds"] if counts["seconds"] else 0.0
        lookups = counts["word_hits"] + counts["word_misses"]
        report = dict(cache_dir=str(root), format=FORMAT, input_counts=corpus.counts, **cache,
                      shards_total=shards, shards_rendered=counts["shards_written"],
                      corrupt_rerendered=len(plan.corrupt), evicted_at_start=len(plan.evicted),
                      cap_reached=counts["cap_reached"], images_rendered=counts["images_rendered"],
                      overflow_rendered=counts["overflow"], seconds=round(counts["seconds"], 3),
                      images_per_s=round(rate, 1), workers=counts["workers"],
                      word_cache_hit_rate=round(counts["word_hits"] / lookups, 4) if lookups else None,
                      removed_temps=plan.store.removed_temps)
        log(f"rendered {counts['images_rendered']} images in {counts['seconds']:.1f} s ({rate:.0f} images/s, "
            f"{counts['workers']} workers); {counts['overflow']} of them did not fit the page (cut)")
        if run.should_stop(collective=False):
            run.preempted(result=report)  # the shards written so far are complete: rerun to render the rest
        if counts["cap_reached"]:
            log(f"cache full at its cap {format_bytes(plan.store.max_bytes)}: {cache['shards_present']} of {shards} "
                f"shards present; readers render the other {cache['shards_missing']} on first use (evicting the "
                f"least recently used), or raise cache.max_gb")
        log(format_report(cache["storage"]) + f" | cap {format_bytes(plan.store.max_bytes)}")
        # every build reports the cache as it is now, also one that rendered nothing
        return run.finish(report, did_work=True, report=False)


if __name__ == "__main__":  # --help, config errors and user errors (a missing font, a full disk, ...) as one line
    from lib.run import run_script
    run_script(main, Config(), __doc__, extra_errors=(WorkerDied,))
