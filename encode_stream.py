"""Stream a dataset or a text-image cache through a recursive vision transformer; per-sample outputs to disk.

    # CPU, seconds: scikit-learn digits through a tiny RViT, embeddings in runs/encode/
    python encode_stream.py
    # the plan's encoder (lib/trm.py: TRM cycles, 12 capsules) over a build_cache.py cache, sketches + checksums +
    # children as fp16 (build the cache first: python build_cache.py --config configs/cache_default.yaml)
    python encode_stream.py --config configs/encode_text_cache.yaml --cache.dir=runs/textcache/cache
    # one GPU, an ImageNet folder (train/ and val/ inside data.root), RViT-B/16 from a local weights file
    python encode_stream.py --config configs/encode_imagenet.yaml --data.root=/data/imagenet \\
        --model.weights=/ckpt/rvit_b16.pt
    # every GPU of a node: each rank encodes its own chunks, no communication until the end
    torchrun --nproc_per_node=8 encode_stream.py --config configs/encode_imagenet.yaml --data.root=/data/imagenet
    # killed or preempted? Run the same command again: finished chunks are kept, the rest is encoded

The samples are cut into chunks of encode.chunk_samples consecutive samples; a chunk is the unit of work, of output
and of resume. Rank r encodes the unfinished chunks r, r + W, ... (W ranks) and writes each one as
`chunks/chunk-000012.npz` (index, key, valid + one array per output) with a JSON marker holding its size and
sha256, both via temp file + fsync + rename; a chunk without a matching marker does not exist. Host memory is
bounded: finished chunks wait for encode.write_threads writer threads in a queue of encode.write_queue chunks. At
the end rank 0 joins the chunks into one .npy per output (written through a memory map, a chunk at a time), writes
manifest.json and removes the chunks. Read the result with `read_outputs(run_dir)`.

Input: data.* (any lib/data dataset, split encode.split, read in order) or, with cache.dir set, a build_cache.py
cache in sample order (lib/encode_input.py: whole shards read ahead by threads; grayscale images replicated to 3
channels and normalized on the device as (x / 255 - cache.mean) / cache.std). A cache shard that is missing or fails
its checksum is named in an error and not encoded (the chunks finished before are kept). The per-sample key column
is `label` for a dataset and `sample_id` (the input line the text came from) for a cache.

Outputs (encode.outputs) of model.name=rvit (lib/rvit.py): embedding (D) the final class token; loop_embeddings
(loops, D) the class token after each loop of the shared blocks; tokens (N, D) the final patch tokens. Of
model.name=trm (lib/trm.py, which says how each is computed): sketches (12, D), checksums (12, 32), children
(12, 4, D), tokens (N, D). encode.compile=true runs torch.compile on fixed shapes.

A folder that holds outputs of another config (lib/run.py names the keys), other weights, another cache or
another number of samples (encode_info.json: the weights file's sha256, the cache's settings fingerprint, the
count) is refused with the reason. Without model.weights the encoder is randomly initialized: said at the start,
in the summary and in manifest.json.
A rerun of a finished encoding with encode.consolidate=false re-verifies every chunk and encodes corrupt ones
again. The run folder, the config check, preemption and the storage report are lib/run.py's; the chunk store, its
writer threads, the copy off the GPU and the consolidation stay here with the loop they serve (hence over 500 lines).
"""
import errno
import hashlib
import io
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lib import dist
from lib.config import ConfigError
from lib.data import DataConfig
from lib.encode_input import check_cache_shards, open_source
from lib.encoder import Encoder, EncoderConfig, autocast_dtype, load_encoder
from lib.run import MAY_CHANGE as RUN_MAY_CHANGE
from lib.run import Run, config_differences, run_script
from lib.storage import (HashingWriter, StorageError, atomic_write_json, atomic_write_stream, check_free_space,
                         disk_full_error, format_bytes, fsync_dir, sha256_file)

STORE_DTYPES = {"float16": np.float16, "float32": np.float32}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MANIFEST_FORMAT = "frugal-encode-1"
# settings that change speed, not the encoded values: a resumed run may change them (every other key must match
# the run that wrote the chunks already there, or its outputs would mix two encoders)
MAY_CHANGE = RUN_MAY_CHANGE + ("data.loader", "data.resident_max_gb", "data.max_skipped_fraction",
                               "data.channels_last", "encode.batch_size", "encode.write_queue", "encode.write_threads",
                               "encode.max_host_gb", "encode.consolidate", "encode.compile", "cache.readers",
                               "cache.prefetch", "cache.dir")  # cache.dir: the cache's content is checked by
                                                                 # its fingerprint
WORK = ("chunks/chunk-*.json", "manifest.json")  # what makes a folder hold an encoding
RANDOM_WEIGHTS = ("model.weights is empty: the encoder is RANDOMLY INITIALIZED (seed run.seed), so these outputs are "
                  "not features of a trained model; set --model.weights=/path/to/state_dict.pt")


# ----------------------------------------------------------------------------- config
@dataclass
class RunConfig:
    name: str = "encode"            # output folder: <out_dir>/<name>
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"            # auto | cuda | cpu
    resume: str = "auto"            # auto: keep verified chunks, encode the rest | none: refuse a used folder


@dataclass
class EncodeConfig:
    split: str = "test"             # test (imagefolder: val/) | train (read in order, no augmentation)
    outputs: list[str] = field(default_factory=lambda: ["embedding"])  # rvit: embedding | loop_embeddings |
                                    # tokens; trm: sketches | checksums | children | tokens
    batch_size: int = 256           # images per forward (halved on out-of-memory, for this run)
    chunk_samples: int = 4096       # samples per chunk file: the unit of work, of resume and of lost work
    store_dtype: str = "float16"    # float16 | float32 on disk
    precision: str = "auto"         # compute: auto (bf16 on CUDA, fp16 on GPUs without bf16 such as a T4, fp32
                                    # on CPU) | bf16 | fp16 | fp32
    write_queue: int = 2            # finished chunks waiting for a writer thread
    write_threads: int = 2          # chunks written at once (each holds one chunk in host memory)
    max_host_gb: float = 8.0        # refuse settings whose chunk buffers would need more host RAM than this
    limit: int = 0                  # encode only the first `limit` samples of the split (0 = all)
    consolidate: bool = True        # at the end: one .npy per output, chunks removed
    compile: bool = False           # torch.compile the encoder (fixed shapes; speed only)


@dataclass
class CacheInputConfig:
    dir: str = ""                   # a build_cache.py cache folder to encode instead of data.* ("" = data.*)
    mean: float = 0.5               # the uint8 images are normalized as (x / 255 - mean) / std: 0.5 / 0.5 -> -1..1
    std: float = 0.5                # (grayscale caches are replicated to the encoder's 3 channels)
    readers: int = 2                # threads reading and decoding whole shards
    prefetch: int = 4               # shards read ahead of the encoder


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(augment=False))
    model: EncoderConfig = field(default_factory=EncoderConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    cache: CacheInputConfig = field(default_factory=CacheInputConfig)

    def validate(self):
        e, names = self.encode, self.model.outputs()
        if e.split not in ("train", "test"):
            raise ConfigError(f"encode.split must be train or test, got '{e.split}'")
        if not e.outputs or any(o not in names for o in e.outputs) or len(set(e.outputs)) != len(e.outputs):
            raise ConfigError(f"encode.outputs must list distinct names out of {', '.join(names)} (the outputs of "
                              f"model.name={self.model.name}); got {e.outputs}")
        if self.cache.std <= 0 or self.cache.readers < 1 or self.cache.prefetch < 1:
            raise ConfigError("cache.std must be > 0 and cache.readers, cache.prefetch >= 1")
        if e.store_dtype not in STORE_DTYPES:
            raise ConfigError(f"encode.store_dtype must be one of {', '.join(STORE_DTYPES)}, got '{e.store_dtype}'")
        if e.precision not in PRECISIONS:
            raise ConfigError(f"encode.precision must be one of {', '.join(PRECISIONS)}, got '{e.precision}'")
        if e.batch_size < 1 or e.chunk_samples < 1 or e.write_queue < 1 or e.write_threads < 1 or e.limit < 0:
            raise ConfigError("encode.batch_size, encode.chunk_samples, encode.write_queue and encode.write_threads "
                              "must be >= 1 and encode.limit >= 0")
        if self.run.resume not in ("auto", "none"):
            raise ConfigError(f"run.resume must be auto or none, got '{self.run.resume}'")
        if not self.cache.dir and self.data.image_size and self.data.image_size != self.model.image_size:
            raise ConfigError(f"data.image_size={self.data.image_size} differs from model.image_size="
                              f"{self.model.image_size}; set one of them (data.image_size=0 follows the model)")


# ----------------------------------------------------------------------------- chunk files
class ChunkStore:
    """chunks/chunk-NNNNNN.npz + chunk-NNNNNN.json (size and sha256, written last) under the run folder."""

    def __init__(self, run_dir):
        self.folder = Path(run_dir) / "chunks"
        self.folder.mkdir(parents=True, exist_ok=True)

    def paths(self, chunk):
        return self.folder / f"chunk-{chunk:06d}.npz", self.folder / f"chunk-{chunk:06d}.json"

    def verified(self, chunk):
        """True if the chunk's marker exists and its data file has the marker's size and sha256."""
        data, marker = self.paths(chunk)
        try:
            meta = json.loads(marker.read_text())
            return data.stat().st_size == meta["bytes"] and sha256_file(data) == meta["sha256"]
        except (OSError, ValueError, KeyError):
            return False

    def write(self, chunk, arrays, meta):
        """Write the arrays as one .npz, then its marker; both atomic and fsynced. Returns the bytes written.

        The .npz is streamed into its temp file and hashed on the way (a chunk of the plan's outputs is 285 MB: no
        copy in memory, no second pass to hash it)."""
        path, marker = self.paths(chunk)
        try:
            nbytes, sha = atomic_write_stream(path, lambda f: np.savez(f, **arrays))
            atomic_write_json(marker, dict(meta, chunk=chunk, bytes=nbytes, sha256=sha))
        except Exception as e:
            full = disk_full_error(e)
            if full is not None:
                raise StorageError(full.errno, f"disk full while writing {path.name} under {self.folder}: the chunks "
                                               f"written before it are intact; free space and run the same command "
                                               f"again to encode the rest") from e
            raise
        return nbytes

    def read(self, chunk):
        """The chunk's arrays, after checking the data file against its marker (StorageError if it differs)."""
        path, marker = self.paths(chunk)
        data = path.read_bytes()
        meta = json.loads(marker.read_text())
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise StorageError(errno.EIO, f"{path} does not match its marker (corrupt); run the same encode_stream.py "
                                          f"command again: it verifies every chunk and encodes corrupt ones again")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


class ChunkWriter:
    """`threads` threads that write finished chunks; `put` blocks while `depth` chunks wait (bounded host memory).

    A chunk arrives as a function giving (arrays, meta) (finish_chunk): the wait for its copies off the GPU and its
    host-side checks happen here, not in the loop. Chunks are independent files with their own markers, so several
    are written at once (zip CRC, sha256 and file writes release the GIL): one writer thread held an H200 run at
    2,881 samples/s of the plan's outputs, against 6,572 for the encoder alone (docs/BENCHMARKS.md)."""

    def __init__(self, store, depth, on_written, threads=2):
        self.store, self.on_written = store, on_written
        self.queue = queue.Queue(maxsize=depth)
        self.error = None
        self.lock = threading.Lock()  # on_written updates shared counters and the metrics file
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"chunk-writer-{i}")
                        for i in range(max(1, threads))]
        for t in self.threads:
            t.start()

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:  # after a failure, drain without writing so that put() never blocks
                try:
                    chunk, arrays_and_meta = item
                    arrays, meta = arrays_and_meta()
                    nbytes = self.store.write(chunk, arrays, meta)
                    with self.lock:
                        self.on_written(chunk, nbytes, meta)
                except BaseException as e:
                    self.error = e

    def put(self, chunk, arrays_and_meta):
        self._raise()
        self.queue.put((chunk, arrays_and_meta))

    def close(self):
        """Wait until every queued chunk is written; re-raise a write error."""
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error


# ----------------------------------------------------------------------------- helpers
def chunk_ranges(num_samples, chunk_samples):
    """[(start, end)] of each chunk: consecutive samples, the last chunk possibly shorter."""
    return [(s, min(s + chunk_samples, num_samples)) for s in range(0, num_samples, chunk_samples)]


def facts(cfg, num_samples, identity="data"):
    """What the outputs depend on beyond the config: the weights file's content, the samples' source, their count."""
    weights = cfg.model.weights
    return {"weights_sha256": sha256_file(weights) if weights else "", "num_samples": num_samples,
            "source": identity}


def read_outputs(run_dir, mmap=True):
    """The finished outputs of a run: {"index", "label", "valid", <output>...} as numpy arrays (memory-mapped)."""
    run_dir = Path(run_dir)
    manifest_path = run_dir / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_dir} has no manifest.json: the encoding did not finish; run the same "
                                f"encode_stream.py command again to complete it")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise FileNotFoundError(f"{manifest_path} was not written by encode_stream.py")
    if not manifest["consolidated"]:
        store = ChunkStore(run_dir)
        parts = [store.read(c) for c in range(manifest["chunks"])]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return {name: np.load(run_dir / meta["file"], mmap_mode="r" if mmap else None, allow_pickle=False)
            for name, meta in manifest["files"].items()}


# ----------------------------------------------------------------------------- consolidation
def consolidate(store, run_dir, num_chunks, shapes, dtypes, num_samples):
    """Join the chunks into one .npy per array, written and hashed as a stream (one chunk in memory at a time).

    Plain sequential writes, not memory maps: a map's dirty pages count as this process's resident memory, which
    then grew with the whole output (12.5 GB peak RSS for 9 GB of outputs on the H200, 2026-12-02).
    """
    outs = {}
    try:
        for name, shape in shapes.items():
            tmp = run_dir / f".{name}.npy.tmp"
            out = HashingWriter(open(tmp, "wb"))
            outs[name] = (tmp, out)
            np.lib.format.write_array_header_1_0(out, {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtypes[name])), "fortran_order": False,
                "shape": (num_samples, *shape)})
        row = 0
        for chunk in range(num_chunks):
            arrays = store.read(chunk)
            n = len(arrays["index"])
            for name, (_, out) in outs.items():
                out.write(memoryview(np.ascontiguousarray(arrays[name], dtype=dtypes[name])).cast("B"))
            row += n
        assert row == num_samples, (row, num_samples)
        for _, out in outs.values():
            out.flush()
            os.fsync(out.file.fileno())
    finally:
        for _, out in outs.values():
            out.file.close()
    files = {}
    for name, (tmp, out) in outs.items():
        path = run_dir / f"{name}.npy"
        os.replace(tmp, path)
        files[name] = {"file": path.name, "shape": [num_samples, *shapes[name]],
                       "dtype": np.dtype(dtypes[name]).name, "sha256": out.sha256.hexdigest()}
    fsync_dir(run_dir)
    return files


# ----------------------------------------------------------------------------- encode
def encode(cfg, run):
    """Encode this rank's unfinished chunks; rank 0 then consolidates. Returns this invocation's numbers."""
    info, e = run.info, cfg.encode
    # ---- build: the samples in order, their chunks, what the folder holds already
    source = open_source(cfg, info.device)
    num_samples = min(source.num_samples, e.limit) if e.limit else source.num_samples
    chunks = chunk_ranges(num_samples, e.chunk_samples)
    if not cfg.model.weights:
        run.say(f"[encode] WARNING: {RANDOM_WEIGHTS}")
    manifest_path = run.dir / "manifest.json"
    check_folder(cfg, run, num_samples, source.identity)
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None and manifest["consolidated"]:
        return nothing_to_do(run, num_samples)
    store = ChunkStore(run.dir)
    done = verified_chunks(store, len(chunks), info)
    if manifest is not None:
        if all(done):
            return nothing_to_do(run, num_samples)
        dist.barrier()  # every rank has read the manifest before it goes
        if dist.is_main():  # a chunk went bad since: the encoding is incomplete until it is encoded again
            manifest_path.unlink()
    remaining = [c for c in range(len(chunks)) if not done[c]]
    mine = remaining[info.rank::info.world_size]

    # ---- memory, disk and the cache's shards, before any work
    check_cache_shards(cfg, source, chunks, mine)
    model = load_encoder(cfg.model, source.in_channels, cfg.run.seed).to(info.device).eval()
    shapes = {k: v for k, v in model.output_shapes().items() if k in e.outputs}
    store_dtype = STORE_DTYPES[e.store_dtype]
    row_bytes = sum(int(np.prod(s)) for s in shapes.values()) * np.dtype(store_dtype).itemsize + 17
    # queued + being written (one per writer thread) + being copied off
    host_bytes = row_bytes * e.chunk_samples * (e.write_queue + e.write_threads + 1)
    if host_bytes > e.max_host_gb * 1e9:
        raise ConfigError(f"encode.chunk_samples={e.chunk_samples} x {format_bytes(row_bytes)} per sample with "
                          f"encode.write_queue={e.write_queue} needs {format_bytes(host_bytes)} of host memory, more "
                          f"than encode.max_host_gb={e.max_host_gb}; lower encode.chunk_samples")
    need = row_bytes * sum(chunks[c][1] - chunks[c][0] for c in mine)
    if e.consolidate and dist.is_main():
        need += row_bytes * num_samples
    check_free_space(run.dir, need, "encoded outputs", "point run.out_dir to a larger disk or set encode.limit")
    run.say(f"[encode] {num_samples} samples of {source.what} in {len(chunks)} chunks "
            f"({len(chunks) - len(remaining)} done before); {cfg.model.name} encoder; {info.world_size} rank(s); "
            f"outputs {', '.join(f'{k} {tuple(v)}' for k, v in shapes.items())} as {e.store_dtype}, "
            f"{format_bytes(row_bytes * num_samples)} in all")

    # ---- the loop (no communication between ranks), then the numbers of all ranks
    encoder = Encoder(model, e.outputs, info.device, autocast_dtype(e.precision, info.device), e.batch_size,
                      compile=e.compile)
    written, seconds = encode_chunks(cfg, run, encoder, source, store, chunks, mine, store_dtype)
    result = combine_ranks(run, chunks, mine, written, seconds, len(chunks) - len(remaining), cfg.model.weights)
    result["bytes_per_sample"] = row_bytes  # the outputs + index, key and valid: one row on disk
    if result.pop("stopped"):
        run.preempted(result=result)  # exit 0; the verified chunks are kept for the rerun

    # ---- summary: rank 0 joins the chunks and writes the manifest
    dist.barrier()
    if dist.is_main():
        write_manifest(cfg, run, source, store, chunks, shapes, num_samples)
        bad = [f"{result['invalid_rows']} unreadable sample(s) (valid=False, zeros)" if result["invalid_rows"] else "",
               f"{result['nonfinite_rows']} row(s) with inf/nan in {e.store_dtype}" if result["nonfinite_rows"] else "",
               f"WARNING: {RANDOM_WEIGHTS}" if not cfg.model.weights else ""]
        print(f"[encode] {num_samples} samples -> {run.dir} ({result['samples_per_s']} samples/s over "
              f"{info.world_size} rank(s) this run)" + "".join(f"; {b}" for b in bad if b), flush=True)
    dist.barrier()
    result["complete"] = manifest_path.is_file()
    return run.finish(result, did_work=result["samples"] > 0)


def write_manifest(cfg, run, source, store, chunks, shapes, num_samples):
    """Rank 0, every chunk written: join them into one .npy per array (encode.consolidate), then manifest.json."""
    e = cfg.encode
    missing = [c for c in range(len(chunks)) if not store.paths(c)[1].exists()]
    if missing:
        raise StorageError(errno.ENOENT, f"{len(missing)} chunk(s) are missing (first {missing[:5]}): a rank "
                                         f"failed; run the same command again to encode them")
    dtypes = {k: STORE_DTYPES[e.store_dtype] for k in shapes}
    dtypes.update({"index": np.int64, source.key: np.int64, "valid": np.bool_})
    manifest = {"format": MANIFEST_FORMAT, "num_samples": num_samples, "chunks": len(chunks),
                "split": "cache" if cfg.cache.dir else e.split, "model": cfg.model.name, "outputs": list(e.outputs),
                "key": source.key, "consolidated": e.consolidate, "classes": source.classes,
                "weights": cfg.model.weights, "random_weights": not cfg.model.weights, "source": source.identity}
    if cfg.cache.dir:
        manifest["cache"] = cfg.cache.dir
    if not cfg.model.weights:
        manifest["warning"] = RANDOM_WEIGHTS
    if e.consolidate:
        manifest["files"] = consolidate(store, run.dir, len(chunks), {**shapes, "index": (), source.key: (),
                                                                      "valid": ()}, dtypes, num_samples)
    atomic_write_json(run.dir / "manifest.json", manifest)  # the encoding exists from here on
    if e.consolidate:
        shutil.rmtree(store.folder)


def check_folder(cfg, run, num_samples, identity):
    """Refuse a folder whose outputs came from other weights, another cache or split size, or resume=none on a used
    one. (Run already refused one written with another config.) encode_info.json records these facts for the rerun.
    """
    info_path = run.dir / "encode_info.json"
    expected = facts(cfg, num_samples, identity)
    used = any(any(run.dir.glob(pattern)) for pattern in WORK)
    if used and cfg.run.resume == "none":
        raise ConfigError(f"{run.dir} already holds an encoding (run.resume=none refuses to touch it); use "
                          f"another run.name, or run.resume=auto to continue it")
    if used and info_path.is_file():
        saved = {"source": "data", **json.loads(info_path.read_text())}  # written before caches: a dataset
        diffs = config_differences(saved, expected)
        if diffs:
            raise ConfigError(f"{run.dir} holds outputs of another configuration ({'; '.join(diffs)}); use another "
                              f"run.name, or delete the folder to start over")
    if (run.dir / "manifest.json").is_file() and not info_path.is_file():
        raise ConfigError(f"{run.dir} holds a manifest.json that encode_stream.py did not write (is it a dataset "
                          f"folder?); choose another run.out_dir / run.name")
    dist.barrier()  # every rank has read the folder before rank 0 writes into it
    if dist.is_main() and not used:
        atomic_write_json(info_path, expected)


def nothing_to_do(run, num_samples):
    run.say(f"[encode] {run.dir} is complete already ({num_samples} samples, every chunk verified); nothing to do")
    result = {"samples": 0, "seconds": 0.0, "samples_per_s": 0.0, "chunks_written": 0, "complete": True}
    run.finish(result, did_work=False)  # keeps result.json of the run that encoded them
    return result


def verified_chunks(store, num_chunks, info):
    """[bool] per chunk: its file matches its marker. Each rank hashes its share of the files; answers combined."""
    if dist.is_main():  # temp files of a killed run: no rank writes before the collective below
        for stale in store.folder.glob(".chunk-*.tmp.*"):
            stale.unlink(missing_ok=True)
    done = torch.zeros(num_chunks, device=info.device)
    for c in range(info.rank, num_chunks, info.world_size):
        done[c] = float(store.verified(c))
    done = dist.all_reduce_sum(done).cpu().bool().tolist()
    corrupt = [c for c in range(num_chunks) if not done[c] and store.paths(c)[1].exists()]
    if corrupt and dist.is_main():
        print(f"[encode] {len(corrupt)} chunk(s) do not match their marker and are encoded again: "
              f"{[store.paths(c)[0].name for c in corrupt[:5]]}", flush=True)
    return done


def encode_chunks(cfg, run, encoder, source, store, chunks, mine, store_dtype):
    """The hot loop: batches in order -> outputs -> this rank's chunks -> the writer thread. Stops at a batch
    boundary on a preemption signal. Returns (counts of what was written, seconds)."""
    e, loader, key = cfg.encode, source.loader, source.key
    written = {"chunks": 0, "bytes": 0, "invalid": 0, "nonfinite": 0}
    if not mine:
        return written, 0.0
    t_start = time.perf_counter()

    def on_written(chunk, nbytes, meta):
        written["chunks"] += 1
        written["bytes"] += nbytes
        written["invalid"] += meta["invalid_rows"]
        written["nonfinite"] += meta["nonfinite_rows"]
        run.metrics.write(kind="chunk", rank=run.info.rank, chunk=chunk, samples=meta["samples"], bytes=nbytes,
                          seconds=round(time.perf_counter() - t_start, 3))

    device = run.info.device
    with torch.inference_mode():  # one forward before timing: kernel selection and allocator warm-up
        encoder(torch.zeros(min(e.batch_size, 8), source.in_channels, cfg.model.image_size, cfg.model.image_size,
                            device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    loader.set_epoch(0, indices=torch.cat([torch.arange(*chunks[c]) for c in mine]))
    t_start = time.perf_counter()
    writer = ChunkWriter(store, e.write_queue, on_written, e.write_threads)
    bar = tqdm(total=sum(chunks[c][1] - chunks[c][0] for c in mine), unit="img", disable=not dist.is_main(),
               desc="encode (rank 0)")
    pending = {k: [] for k in (*e.outputs, "index", key)}
    filled, slot = 0, 0
    try:
        for images, keys, index in loader:
            out = encoder(images)
            out.update({"index": index, key: keys})
            pos = 0
            while pos < len(index):  # a batch may end one chunk and start the next
                start, end = chunks[mine[slot]]
                take = min(len(index) - pos, end - start - filled)
                for k in pending:
                    pending[k].append(out[k][pos:pos + take])
                pos += take
                filled += take
                if filled == end - start:
                    writer.put(mine[slot], finish_chunk(pending, key, start, end, store_dtype))
                    pending = {k: [] for k in pending}
                    filled, slot = 0, slot + 1
            bar.update(len(index))
            if run.should_stop(collective=False):  # ranks never wait for each other here
                break
    finally:
        bar.close()
        writer.close()  # the chunks finished so far reach the disk, even when the loop failed
    if run.stopped:
        print(f"[encode] rank {run.info.rank} stopped by {run.preempt.received} after {written['chunks']} chunk(s); "
              f"run the same command again to encode the rest", flush=True)
    return written, time.perf_counter() - t_start


def combine_ranks(run, chunks, mine, written, seconds, done_before, weights):
    """Samples over all ranks and the slowest rank's time (the run's wall-clock); "stopped" if any rank stopped."""
    device = run.info.device
    totals = torch.tensor([float(sum(chunks[c][1] - chunks[c][0] for c in mine[:written["chunks"]])),
                           float(written["chunks"]), float(written["invalid"]), float(written["nonfinite"]),
                           float(run.stopped)], device=device, dtype=torch.float64)
    slowest = torch.tensor([seconds], device=device, dtype=torch.float64)
    dist.all_reduce_sum(totals)
    if dist.is_dist():
        torch.distributed.all_reduce(slowest, op=torch.distributed.ReduceOp.MAX)
    samples, chunks_written, invalid, nonfinite, any_stopped = totals.tolist()
    seconds = slowest.item()
    return {"samples": int(samples), "seconds": round(seconds, 3),
            "samples_per_s": round(samples / seconds, 1) if seconds else 0.0, "chunks_written": int(chunks_written),
            "chunks_done_before": done_before, "invalid_rows": int(invalid), "nonfinite_rows": int(nonfinite),
            "ranks": run.info.world_size, "random_weights": not weights, "complete": False,
            "stopped": bool(any_stopped)}


def finish_chunk(pending, key, start, end, store_dtype):
    """One chunk's rows on their way to the host: cast to the stored dtype and copied off the GPU asynchronously
    (into pinned memory), so the loop goes on without a host sync. Returns a function, run by the writer thread,
    that waits for the copies and gives (arrays, meta), the rows checked against the expected indices."""
    torch_dtype = torch.float16 if store_dtype == np.float16 else torch.float32
    out = {k: torch.cat(v) for k, v in pending.items()}
    nonfinite = None
    for k in [k for k in out if k not in ("index", key)]:
        out[k] = out[k].to(torch_dtype)
        bad = ~torch.isfinite(out[k]).flatten(1).all(1)
        nonfinite = bad if nonfinite is None else nonfinite | bad
    host = {k: to_host(v) for k, v in {**out, "nonfinite": nonfinite}.items()}
    copied = None
    if nonfinite.is_cuda:
        copied = torch.cuda.Event()
        copied.record()

    def arrays_and_meta():
        if copied is not None:
            copied.synchronize()
        expected = np.arange(start, end)
        valid = host.pop("index").numpy() == expected  # a skipped unreadable file was replaced: not this row's image
        arrays = {"index": expected, key: host.pop(key).numpy().astype(np.int64), "valid": valid}
        bad_rows = host.pop("nonfinite").numpy()
        for k, v in host.items():
            values = v.numpy()
            values[~valid] = 0
            arrays[k] = values
        meta = {"start": start, "end": end, "samples": end - start, "invalid_rows": int((~valid).sum()),
                "nonfinite_rows": int(bad_rows.sum())}
        return arrays, meta

    return arrays_and_meta


def to_host(tensor):
    """A CPU tensor as it is; a GPU tensor copied into pinned host memory without waiting (non_blocking)."""
    if not tensor.is_cuda:
        return tensor
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=True)


# ----------------------------------------------------------------------------- main
def main(cfg):
    """Encode the split into <out_dir>/<name>; returns this invocation's numbers (Preempted: exit 0, rerun)."""
    info = dist.setup(cfg.run.seed, cfg.run.device)
    try:
        with Run(cfg, info, may_change=MAY_CHANGE, work=WORK) as run:
            return encode(cfg, run)
    finally:
        dist.cleanup()


if __name__ == "__main__":
    run_script(main, Config(), __doc__)
