"""ImageFolderLoader: image files (a folder, or the pre-resized cache of lib/imagecache.py) -> batches on the device.

decode="gpu" (data.loader=jpeg or cache): worker processes read the encoded files of a batch and parse their headers
(`jpeg.read_chunk`; a batch of more than CHUNK images, and the first batch of every iteration, is cut into chunks read
by several workers at once); in this process one thread decodes each batch with nvJPEG, a second crops, resizes and
normalizes it, each on its own high-priority CUDA stream, `prefetch` batches ahead of training. The two streams are
made once per loader, not per epoch: the caching allocator keeps a freed block for the stream it was allocated on, so
new streams every epoch would send each epoch's first batches to cudaMalloc. decode="pil" (data.loader=dataloader):
PIL in the workers, the standard CPU path.

Selective decoding (batch mode; `decode_for_selection`): the loader yields (SelectiveBatch, labels, index). The
SelectiveBatch holds every sample's scoring image at a low resolution, made in the workers from a DCT-scaled decode
for data.score_cpu_share of the batch and from a whole-image nvJPEG decode for the rest, and
`batch.full(selected)` returns the full-resolution training crops of the selected samples only: their files are
decoded whole when asked for. The crops are the ones the plain path makes: the same boxes and flips (functions of
seed, epoch, index), the same decoder and resize code.
"""
import contextlib
import faulthandler
import queue
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

from lib import jpeg
from lib.loaders import MAX_SKIP_MESSAGES, _LoaderBase, _make_dataloader, _Normalizer, _Specs

CHUNK = 256                     # images per worker task at most: a batch of 2048 is read by 8 workers at once
FIRST_CHUNK = 32                # an iteration's first batch in chunks of at least this many images, one per worker:
                                # the first batch (the epoch's start-up wait) arrives in a fraction of the time
DECODE_PIECE = 256              # selective decoding: the GPU share is decoded in calls of at most this many images, so
                                # that a batch's full() (which waits for the one nvJPEG decoder a process has) goes
                                # next after at most one of them
STALL_REPORT_S = 60.0          # a worker task, or the wait for a batch, this long prints the stacks (stderr)
SELECTIVE_POLICIES = ("auto", "always", "never")
_READY, _CPU, _LATER = 0, 1, 2  # SelectiveBatch: where a position's training crop comes from


class _FolderBatches(torch.utils.data.Dataset):
    """Worker side of ImageFolderLoader: one item = one chunk of a batch (bytes for nvJPEG, or PIL pixels)."""

    def __init__(self, source, labels, seed, gpu_decode, cpu_fraction=0.0, score_cpu_share=0.5):
        self.source, self.labels, self.seed = source, labels, seed
        self.gpu_decode, self.cpu_fraction, self.score_cpu_share = gpu_decode, cpu_fraction, score_cpu_share

    def __getitem__(self, spec):
        batch, chunks, first_pos, index, epoch, resolution, augment, score_px = spec
        # a chunk takes well under a second; one stuck this long prints where it is (the worker keeps going)
        watch = torch.utils.data.get_worker_info() is not None
        if watch:
            faulthandler.dump_traceback_later(STALL_REPORT_S, exit=False, file=sys.__stderr__)
        chunk = jpeg.read_chunk(self.source, self.labels, index, first_pos=first_pos, epoch=epoch,
                                resolution=resolution, augment=augment, seed=self.seed, gpu_decode=self.gpu_decode,
                                cpu_fraction=self.cpu_fraction, score_px=score_px,
                                score_cpu_share=self.score_cpu_share)
        if watch:
            faulthandler.cancel_dump_traceback_later()
        chunk.update(batch=batch, chunks=chunks, resolution=resolution, score_px=score_px)
        return chunk


def _merge(chunks):
    """One batch from its chunks (in position order): fields concatenated, encoded files as a list of views."""
    views = [v for c in chunks if c["blob"] is not None for v in jpeg.split_blob(c["blob"], c["offsets"])]
    out = {key: np.concatenate([c[key] for c in chunks])
           for key in ("boxes", "sizes", "flip", "gpu_pos", "now", "cpu_pos", "score_pos", "labels", "index")}
    for key in ("cpu_images", "score_images"):
        parts = [c[key] for c in chunks if c[key] is not None]
        out[key] = (parts[0] if len(parts) == 1 else torch.cat(parts)) if parts else None
    fallback = {}
    for c in chunks:
        for reason, count in c["fallback"].items():
            fallback[reason] = fallback.get(reason, 0) + count
    out.update(views=views, skipped=[s for c in chunks for s in c["skipped"]], fallback=fallback,
               resolution=chunks[0]["resolution"], score_px=chunks[0]["score_px"])
    return out


def _batches(chunks):
    """Join the chunks of each batch (the DataLoader yields them in spec order) as soon as the last one arrives."""
    group = []
    for chunk in chunks:
        group.append(chunk)
        if len(group) == chunk["chunks"]:
            yield _merge(group)
            group = []


class _Pipeline:
    """Runs `stages` in threads, one thread and one high-priority CUDA stream per stage, `depth` items ahead.

    stage 0 takes items from `source`; stage i > 0 takes stage i-1's results, after its stream waited for the
    previous stage's work. Stage threads release the GIL inside torch ops, so a blocking nvJPEG call in one
    stage overlaps with the crop/resize issue of the other and with the training loop.
    """

    _END = object()

    def __init__(self, source, stages, device, depth, stats, streams):
        self.device, self.stats, self.streams = device, stats, streams
        self.stop = threading.Event()
        self.queues = [queue.Queue(maxsize=depth) for _ in stages]
        self.threads = []
        for i, stage in enumerate(stages):
            inbox = None if i == 0 else self.queues[i - 1]
            t = threading.Thread(target=self._run, args=(i, stage, source, inbox, self.queues[i]),
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

    def _get(self, q, report=False):
        t0 = time.perf_counter()
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if report and t0 is not None and time.perf_counter() - t0 > STALL_REPORT_S:
                    t0 = None  # once per wait
                    print(f"[loader] no batch for {STALL_REPORT_S:.0f} s; this process's threads are at:",
                          file=sys.stderr, flush=True)
                    with contextlib.suppress(OSError, ValueError):  # a stderr without a file descriptor
                        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        return self._END

    def _items(self, source, inbox):
        if inbox is None:
            it = iter(source)
            while True:
                t0 = time.perf_counter()
                item = next(it, self._END)
                waited = time.perf_counter() - t0
                self.stats["worker_wait_s"] += waited
                self.stats["worker_wait_max_s"] = max(self.stats.get("worker_wait_max_s", 0.0), waited)
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

    def _run(self, i, stage, source, inbox, outbox):
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
        item = self._get(self.queues[-1], report=True)
        waited = time.perf_counter() - t0
        self.stats["consumer_wait_s"] += waited
        self.stats["consumer_wait_max_s"] = max(self.stats.get("consumer_wait_max_s", 0.0), waited)
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


class SelectiveBatch:
    """One batch-mode batch of image files: the scoring images now, full-resolution training crops on request.

    scoring: (B, 3, S, S) normalized images on the device (None when nothing is scored: the random control);
    full(positions) -> (k, 3, R, R) normalized training crops of those batch positions (a tensor of indices into
    the batch, in any order), the crops the plain path would have made; resolution = R.
    """

    def __init__(self, loader, batch, ready, now):
        self.loader, self.batch, self.ready = loader, batch, ready
        self.resolution = batch["resolution"]
        n = len(batch["labels"])
        gpu_pos, later = batch["gpu_pos"], np.flatnonzero(~batch["now"])
        self._source = np.full(n, -1)
        self._row = np.zeros(n, dtype=np.int64)
        self._source[gpu_pos[now]], self._row[gpu_pos[now]] = _READY, np.arange(len(now))
        self._source[gpu_pos[later]], self._row[gpu_pos[later]] = _LATER, later  # row = index into the gpu files
        self._source[batch["cpu_pos"]], self._row[batch["cpu_pos"]] = _CPU, np.arange(len(batch["cpu_pos"]))
        self.scoring = self._scoring(now) if batch["score_px"] else None

    def __len__(self):
        return len(self._source)

    def _scoring(self, now):
        """(B, 3, S, S) normalized: the workers' scoring images, and those of the images decoded whole already."""
        b, size, device = self.batch, self.batch["score_px"], self.loader.device
        raw = torch.empty(len(self), 3, size, size, device=device)
        if b["score_images"] is not None:
            raw.index_copy_(0, torch.from_numpy(b["score_pos"]).to(device),
                            b["score_images"].to(device, non_blocking=True).float())
        if len(now):  # its training crop, made smaller with the same antialiased filter
            small = F.interpolate(self.ready.float(), size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=True)
            raw.index_copy_(0, torch.from_numpy(b["gpu_pos"][now]).to(device), small)
        return self.loader.normalize.into_format(raw)

    def record_stream(self, stream):
        for t in (self.scoring, self.ready):
            if t is not None:
                t.record_stream(stream)

    def full(self, positions):
        """(k, 3, R, R) normalized full-resolution training crops of the batch positions `positions`."""
        loader, b = self.loader, self.batch
        pos = torch.as_tensor(positions).cpu().numpy()
        source, row = self._source[pos], self._row[pos]
        size, device = self.resolution, loader.device
        out = torch.empty(len(pos), 3, size, size, device=device)

        def put(kind, crops_of):
            where = np.flatnonzero(source == kind)
            if len(where):
                out.index_copy_(0, torch.from_numpy(where).to(device), crops_of(row[where]).float())

        put(_READY, lambda rows: self.ready[torch.from_numpy(rows).to(device)])
        put(_CPU, lambda rows: b["cpu_images"][torch.from_numpy(rows)].to(device, non_blocking=True))

        def decode(files):  # the selected files nobody decoded yet: decoded whole now, cropped as the plain path
            fallback, skipped = {}, []
            with loader.decoder(priority=True):
                images = loader.decode_files(b, files, fallback, skipped)
            loader.account(fallback, skipped)
            return jpeg.resized_crop_batch(images, b["boxes"][files], b["flip"][files], size)

        put(_LATER, decode)
        return loader.normalize.into_format(out)


class ImageFolderLoader(_LoaderBase):
    """Image files of one split. decode="gpu": nvJPEG batches on the GPU (CPU torchvision when no GPU),
    crop/resize/flip as batched matmuls, in two threads a few batches ahead; decode="pil": PIL in the workers.

    `source` is a jpeg.FileSource (a folder) or an imagecache.CacheSplit (the pre-resized cache): the same batches,
    crops at the same relative places. `stats` adds up where the time went: worker_wait_s (decode thread waiting
    for workers), stage0_s (nvJPEG), stage1_s (crop/resize issue), consumer_wait_s (the training loop waiting for a
    batch: input-bound time), epoch_start_s (iteration start to its first batch, summed over `epochs`); the *_max_s
    entries hold the longest single wait (a stall shows there, not in a sum).
    """

    def __init__(self, source, labels, batch_size, *, device, decode, augment, workers, prefetch, channels_last,
                 max_skipped_fraction, seed, rank, world_size, resolution, train, resize_schedule=None,
                 cpu_decode_fraction=0.0, selective_decode="auto", score_cpu_share=0.5):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # the stage threads need the index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.decode = decode
        self.augment = augment and train
        self.source = source
        self.root = str(source.root)
        self.workers = workers
        self.prefetch = prefetch
        self.max_skipped_fraction = max_skipped_fraction
        self.selective_decode = selective_decode
        self.score_cpu_share = score_cpu_share
        self.normalize = _Normalizer(tuple(255 * m for m in jpeg.IMAGENET_MEAN),
                                     tuple(255 * s for s in jpeg.IMAGENET_STD), self.device, channels_last)
        self.stats = dict.fromkeys(("batches", "worker_wait_s", "worker_wait_max_s", "stage0_s", "stage1_s",
                                    "consumer_wait_s", "consumer_wait_max_s", "epochs", "epoch_start_s"), 0)
        self._skipped_set = set()
        self._lock = threading.Lock()
        self._decoder_lock = threading.Lock()   # torchvision's nvJPEG decoder serves one call at a time per process
        self._wanted = threading.Event()        # full() waits for the decoder: the pipeline lets it go first
        self._score_px = None       # selective decoding requested for the next iterations (None = plain batches)
        self._streams = None        # the pipeline's two CUDA streams, made on first use
        super().__init__(len(labels), batch_size, train=train, seed=seed, rank=rank, world_size=world_size,
                         resolution=resolution, resize_schedule=resize_schedule)
        dataset = _FolderBatches(source, labels, seed, gpu_decode=decode == "gpu",
                                 cpu_fraction=cpu_decode_fraction if decode == "gpu" else 0.0,
                                 score_cpu_share=score_cpu_share)
        pin = self.device.type == "cuda" and decode == "pil"  # nvJPEG reads the encoded bytes from host memory
        self._loader = _make_dataloader(dataset, _Specs(self._specs), workers, prefetch, pin_memory=pin,
                                        collate_fn=_identity)

    # -- selective decoding (batch mode)
    def decode_for_selection(self, score_px):
        """From the next iteration on, yield (SelectiveBatch, labels, index) scored at `score_px` px (0: nothing
        is scored, only selected samples are decoded) if data.selective_decode allows it; None: plain batches.
        auto decodes selectively when scoring below the training resolution or not at all; returns whether on."""
        self._score_px = score_px
        return self._selective_px() is not None

    def _selective_px(self):
        px = self._score_px
        if px is None or self.decode != "gpu" or self.selective_decode == "never":
            return None
        if self.selective_decode == "auto" and px >= self.resolution:
            return None  # scoring at the training resolution: decoding everything once on the GPU costs less
        return px

    # -- worker tasks
    def _chunk_sizes(self, n, first):
        pieces = -(-n // CHUNK)
        if first and self.workers > 1:  # the first batch waits on one worker's reads: spread it over several
            pieces = max(pieces, min(self.workers, n // FIRST_CHUNK))
        base, extra = divmod(n, max(1, pieces))
        return [base + (i < extra) for i in range(max(1, pieces))]

    def _specs(self):
        order = self._order.numpy()  # a list of specs, not a generator (see ArrayLoader._specs)
        score_px = self._selective_px()
        specs = []
        for b, (start, end) in enumerate(self._batch_ranges()):
            sizes = self._chunk_sizes(end - start, first=b == 0)
            first = 0
            for size in sizes:
                specs.append((b, len(sizes), first, order[start + first:start + first + size], self.epoch,
                              self.resolution, self.augment, score_px))
                first += size
        return specs

    # -- iteration
    def __iter__(self):
        t0 = time.perf_counter()
        source = _batches(iter(self._loader))  # created here, in the caller's thread: worker processes fork from it
        if self.decode == "pil":
            stages = None
        else:
            if self._streams is None:
                self._streams = [None, None]
                if self.device.type == "cuda":
                    # High priority: a training step keeps every SM busy, and this pipeline's small kernels would
                    # otherwise queue behind each of its kernels in turn, making a batch arrive late
                    highest = min(torch.cuda.Stream.priority_range())  # lower number = higher priority
                    self._streams = [torch.cuda.Stream(self.device, priority=highest) for _ in range(2)]
            stages = _Pipeline(source, (self.decode_stage, self.finish), self.device, self.prefetch, self.stats,
                               self._streams)
        try:
            batches = stages if stages is not None else (self.finish(self.decode_stage(b, None), None)
                                                         for b in source)
            for i, out in enumerate(batches):
                if i == 0:
                    self.stats["epochs"] += 1
                    self.stats["epoch_start_s"] += time.perf_counter() - t0
                yield out
        finally:
            if stages is not None:
                stages.close()

    def account(self, fallback, skipped):
        """Add a batch's PIL fallbacks and unreadable files to the loader's counts; stop when too many are bad."""
        with self._lock:
            for reason, count in fallback.items():
                self.fallback[reason] = self.fallback.get(reason, 0) + count
            for entry in skipped:
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

    def decode_files(self, batch, files, fallback, skipped):
        """Decode the GPU-bound files `files` (indices into batch["views"]) of a batch: one nvJPEG call for all;
        a file it refuses goes to PIL (counted as decode_error); one neither reads becomes a flat gray image and
        is listed in `skipped` (found only after the worker filled the batch, so the batch stays full)."""
        views = [batch["views"][i] for i in files]
        if not views:
            return []
        try:
            return jpeg.decode_jpeg_list(views, self.device)
        except RuntimeError:
            pass
        images = []
        for i, data in zip(files, views):
            try:
                images.extend(jpeg.decode_jpeg_list([data], self.device))
                continue
            except RuntimeError:
                pass
            try:
                img = jpeg.pil_open_rgb(data.numpy().tobytes())
                images.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).to(self.device))
                fallback["decode_error"] = fallback.get("decode_error", 0) + 1
            except (OSError, ValueError, SyntaxError) as e:
                h, w = batch["sizes"][i].tolist()
                images.append(torch.full((3, h, w), 128, dtype=torch.uint8, device=self.device))
                name = self.source.name(int(batch["index"][int(batch["gpu_pos"][i])]))
                skipped.append(f"{name} ({type(e).__name__}: {e})")
        return images

    @contextlib.contextmanager
    def decoder(self, priority=False):
        """Hold the process's nvJPEG decoder; priority (SelectiveBatch.full: training waits for it) goes before the
        pipeline's next piece, which waits while a priority caller waits."""
        if priority:
            self._wanted.set()
        else:
            while self._wanted.is_set():
                time.sleep(0.0005)
        try:
            with self._decoder_lock:
                yield
        finally:
            if priority:
                self._wanted.clear()

    def decode_stage(self, batch, stream):
        """Stage 0: nvJPEG on the batch's files to decode now (blocks this thread until decoded). In selective
        decoding, in pieces that let a waiting full() go first."""
        files = np.flatnonzero(batch["now"])
        if batch["score_px"] is None:
            return batch, self.decode_files(batch, files, batch["fallback"], batch["skipped"])
        images = []
        for start in range(0, len(files), DECODE_PIECE):
            with self.decoder():
                images += self.decode_files(batch, files[start:start + DECODE_PIECE], batch["fallback"],
                                            batch["skipped"])
        return batch, images

    def finish(self, payload, stream):
        """Stage 1: crop/resize/flip the decoded images, add the CPU-decoded ones, normalize: (images, labels,
        index), or (SelectiveBatch, labels, index) in selective decoding."""
        batch, decoded = payload
        if stream is not None:
            for img in decoded:  # allocated on stage 0's stream
                img.record_stream(stream)
        size = batch["resolution"]
        now = np.flatnonzero(batch["now"])
        ready = jpeg.resized_crop_batch(decoded, batch["boxes"][now], batch["flip"][now], size) if len(now) else None
        self.account(batch["fallback"], batch["skipped"])
        labels = torch.from_numpy(batch["labels"]).to(self.device, non_blocking=True)
        index = torch.from_numpy(batch["index"]).to(self.device, non_blocking=True)
        if batch["score_px"] is not None:
            return SelectiveBatch(self, batch, ready, now), labels, index
        gpu_pos, cpu_pos = torch.from_numpy(batch["gpu_pos"]), torch.from_numpy(batch["cpu_pos"])
        n = len(batch["labels"])
        parts = []
        if len(gpu_pos):
            parts.append((gpu_pos, ready))
        if len(cpu_pos):
            parts.append((cpu_pos, batch["cpu_images"].to(self.device, non_blocking=True)))
        if len(parts) == 1 and len(parts[0][0]) == n:
            raw = parts[0][1]
        else:  # some files took the CPU path: put both parts back in batch order
            raw = torch.empty(n, 3, size, size, device=self.device)
            for pos, x in parts:
                raw.index_copy_(0, pos.to(self.device), x.float())
        return self.normalize.into_format(raw), labels, index
