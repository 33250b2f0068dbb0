"""Issue 16: does AST's saving survive real JPEG input? Each AST mode's speedup on image files against its speedup on
GPU-resident data, same config, one run, through train_ast.train() itself.

    # CPU, about 2 min on 16 cores: write 50,048 ImageNet-like JPEGs (tools/make_imagefolder.py) and the cache
    python bench/ast_jpeg.py --prepare_only=true --root=/tmp/ast_jpeg
    # GPU, about 9 min (reuses --root; writes it first if missing, which takes longer)
    python bench/ast_jpeg.py --root=/tmp/ast_jpeg --out=$OUT/ast_jpeg.jsonl
    python bench/ast_jpeg.py --smoke=true          # CPU, seconds: every part runs, numbers mean nothing

Sources: `resident` (synthetic data on the GPU, data.loader=resident), `jpeg` (the generated folder, data.loader=jpeg)
and `cache` (its pre-resized cache, data.loader=cache, short side 256). Variants, each on every source, full first
(every ratio needs it), the others in an order rotated per source, after throwaway runs that take the one-time costs
(CUDA/cuDNN start-up, autotuning the full-batch and subset shapes): full, batch10 (10%, scoring batch 2048),
batch10_cheap (the same, scored at 112 px), epoch10 (10%); `epochs` epochs each (epoch 0 on all data, then sparse;
the last one timed = steady state; all of them = whole run). full_compiled (loop.compile=true): one epoch (it
compiles), then `compiled_steps` timed steps. Batch mode on image files uses data.selective_decode=auto
(batch10_cheap decodes selectively, half its scoring images in the workers; batch10 decodes all on the GPU); the
extras time the other decode paths (selective_decode=never / always, score_cpu_share=1.0) on 2 sparse epochs each,
the second timed, so that "best JPEG path" compares them all. Parts without training: decode rates (PIL per core,
nvJPEG per GPU) of the folder's files and the cache's, the cache's bytes per image and build rate, PSNR of the
re-encoded images and of the scoring images, the loader alone (plain vs selective batches), and an epoch start with a
10% plan (time to its first batch). A time budget skips what is left (and says so) rather than run past it; a run
still going at hard_stop_s (or a SIGTERM) is stopped and the summary written from the runs that finished.

Last line: {"summary": true, "ratio_batch10": r1, "ratio_batch10_cheap": r2, "ratio_epoch10": r3,
"full_compiled_jpeg_vs_resident": r4, "files": n, "device": ...}: ratio = steady-state speedup on image files (the
best of jpeg, cache and the extras) / steady-state speedup on resident data; r4 = compiled full images/s on image
files (best of jpeg and cache) / compiled resident.
"""
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_ast  # noqa: E402  (imports lib.data first: CUDA_DEVICE_MAX_CONNECTIONS is set before CUDA starts)
from lib import dist, jpeg  # noqa: E402
from lib.config import merge, parse  # noqa: E402
from lib.data import DataConfig, build_data  # noqa: E402
from lib.datasets import scan_imagefolder  # noqa: E402
from lib.imagecache import open_or_build, psnr, stored_size  # noqa: E402
from tools.make_imagefolder import MakeConfig, make_imagefolder  # noqa: E402


@dataclass
class BenchConfig:
    smoke: bool = False             # tiny CPU run that only checks that every part works
    prepare_only: bool = False      # write the folder and the cache, then stop (no GPU needed)
    root: str = ""                  # the generated ImageFolder (written once, reused); "" = /tmp/frugal_ast_jpeg[_smoke]
    classes: int = 128              # class folders
    train_per_class: int = 391      # 50,048 train files (~5.3 GB, ~105 KB each)
    val_per_class: int = 4          # 512 val files: whole evaluation batches (a compiled model sees one shape)
    awkward_per_kind: int = 2       # grayscale, CMYK, progressive, PNG named .JPEG, truncated, empty files each
    image_size: int = 224           # px
    batch_size: int = 256           # training batch of full / epoch modes
    score_batch: int = 2048         # batch mode: samples scored per step
    score_resolution: int = 112     # px, batch10_cheap's scoring
    target_rate: float = 0.1
    epochs: int = 3                 # per variant: epoch 0 on all data, then sparse; the last timed
    compiled_steps: int = 60        # full_compiled: one epoch (it compiles), then this many steps timed
    workers: int = 12               # jpeg / cache loader worker processes
    prefetch: int = 2
    cache_side: int = 256           # px, shorter side of the cached images
    cache_quality: int = 90
    sources: list[str] = field(default_factory=lambda: ["resident", "jpeg", "cache"])
    variants: list[str] = field(default_factory=lambda: ["full", "batch10", "batch10_cheap", "epoch10"])
    compiled: bool = True           # time full_compiled on every source
    extras: bool = True             # time the other batch-mode decode paths on jpeg and cache
    parts_files: int = 256          # files per decode / PSNR measurement
    time_budget_s: float = 560.0    # skip runs that would end past this many seconds after the start (listed in the
                                    # summary): the GPU machine stops a command at 600 s
    hard_stop_s: float = 580.0      # a run still going this many seconds after the start (a stall the estimate could
                                    # not foresee) is stopped and the summary written from what finished; so is SIGTERM
    seed: int = 0
    out: str = ""                   # also append the JSON lines to this file


VARIANTS = {  # name: ast overrides (the mode's own settings); every variant shares COMMON_AST
    "full": {"mode": "full"},
    "batch10": {"mode": "batch"},
    "batch10_cheap": {"mode": "batch", "score_resolution": -1},  # -1: BenchConfig.score_resolution
    "epoch10": {"mode": "epoch"},
}
EXTRAS = [  # (variant, source, data overrides): batch-mode decode paths other than the defaults (selective_decode
            # auto: selective for batch10_cheap with score_cpu_share 0.5, everything decoded on the GPU for batch10)
    ("batch10_cheap", "jpeg", {"selective_decode": "never"}),
    ("batch10_cheap", "cache", {"selective_decode": "never"}),
    ("batch10_cheap", "jpeg", {"score_cpu_share": 1.0}),
    ("batch10_cheap", "cache", {"score_cpu_share": 1.0}),
    ("batch10", "jpeg", {"selective_decode": "always"}),
    ("batch10", "cache", {"selective_decode": "always"}),
]


def emit(record, out):
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- data
def make_folder(cfg, root):
    """Write (or reuse) the generated ImageFolder; returns its summary."""
    k = cfg.awkward_per_kind
    spec = MakeConfig(out=str(root), classes=cfg.classes, train_per_class=cfg.train_per_class,
                      val_per_class=cfg.val_per_class, seed=cfg.seed, grayscale=k, cmyk=k, progressive=k, png=k,
                      truncated=k, empty=k, width=56 if cfg.smoke else 0, height=48 if cfg.smoke else 0)
    manifest = root / "manifest.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old["config"] == asdict(spec):
            return dict(old["summary"], reused=True)
        shutil.rmtree(root)  # another bench config wrote it: start over (the cache is derived from it)
    return dict(make_imagefolder(spec), reused=False)


def prepare_cache(cfg, root):
    """Build (or reuse and verify) the cache of both splits with every core; returns the train split's report."""
    reports, classes = {}, None
    for split in ("train", "val"):
        paths, _, classes, _ = scan_imagefolder(root / split, classes)
        _, reports[split] = open_or_build(root / split, paths, root / "cache" / split, side=cfg.cache_side,
                                          quality=cfg.cache_quality, workers=0 if cfg.smoke else os.cpu_count(),
                                          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return reports["train"]


# ----------------------------------------------------------------------------- parts (no training)
def per_core_rate(fn, items, seconds):
    """Items per second of fn over items (cycled) in this one process."""
    done, t0 = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
            done += 1
        if time.perf_counter() - t0 >= seconds:
            return done / (time.perf_counter() - t0)


def decode_parts(cfg, root, device, out):
    """PIL decode rates per core and nvJPEG rates per GPU, folder vs cache; PSNR of the cache and of scoring images."""
    paths, _, _, _ = scan_imagefolder(root / "train")
    cache, _ = open_or_build(root / "train", paths, root / "cache" / "train", side=cfg.cache_side,
                             quality=cfg.cache_quality, verify=False, log=lambda msg: None)
    picks = [i for i in range(0, len(paths), max(1, len(paths) // (4 * cfg.parts_files)))]
    files = []
    for i in picks:
        data = (root / "train" / os.fsdecode(paths[i])).read_bytes()
        kind, h, w = jpeg.sniff_jpeg(data)
        if kind == "baseline":
            small = cache.read(i)
            files.append((i, data, h, w, small, *jpeg.sniff_jpeg(small)[1:]))
        if len(files) == cfg.parts_files:
            break
    seconds = 0.02 if cfg.smoke else 1.0
    score_px = cfg.score_resolution

    def score(item, px, cached):
        i, data, h, w, small, sh, sw = item
        blob, hh, ww = (small, sh, sw) if cached else (data, h, w)
        top, left, ch, cw, flip = jpeg.crop_params(hh, ww, True, cfg.seed, 1, i)
        img, scale = jpeg.pil_draft_open(blob, hh, ww, (top, left, ch, cw), px)
        return jpeg.pil_scoring_image(img, (top, left, ch, cw), flip, px, scale)

    record = {"part": "decode", "files": len(files), "mean_kb_folder": round(np.mean([len(f[1]) for f in files]) / 1e3, 1),
              "mean_kb_cache": round(np.mean([len(f[4]) for f in files]) / 1e3, 1)}
    for name, fn in (("pil_full_folder", lambda f: jpeg.pil_open_rgb(f[1])),
                     ("pil_full_cache", lambda f: jpeg.pil_open_rgb(f[4])),
                     (f"pil_score{score_px}_folder", lambda f: score(f, score_px, False)),
                     (f"pil_score{score_px}_cache", lambda f: score(f, score_px, True)),
                     (f"pil_score{cfg.image_size}_folder", lambda f: score(f, cfg.image_size, False)),
                     (f"pil_score{cfg.image_size}_cache", lambda f: score(f, cfg.image_size, True))):
        record[f"{name}_img_per_s_per_core"] = round(per_core_rate(fn, files, seconds), 1)
    for name, col in (("folder", 1), ("cache", 4)):
        views = [torch.frombuffer(bytearray(f[col]), dtype=torch.uint8) for f in files]
        jpeg.decode_jpeg_list(views[:8], device)  # decoder start-up
        sync(device)
        t0, done = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            jpeg.decode_jpeg_list(views, device)
            done += len(views)
        sync(device)
        record[f"decode_{device.type}_{name}_img_per_s"] = round(done / (time.perf_counter() - t0), 1)
    # re-encoding: the cached image against the source decoded and resized the same way (PIL bilinear); the scoring
    # image from a DCT-scaled decode against one from the full decode (same crop box)
    from PIL import Image
    reenc, drafts = [], []
    for i, data, h, w, small, sh, sw in files:
        source = jpeg.pil_open_rgb(data)
        if (sh, sw) != (h, w):
            source_small = source.resize(stored_size(w, h, cfg.cache_side), Image.BILINEAR)
        else:
            source_small = source
        reenc.append(psnr(np.asarray(source_small), np.asarray(jpeg.pil_open_rgb(small))))
        top, left, ch, cw, flip = jpeg.crop_params(h, w, True, cfg.seed, 1, i)
        full = jpeg.pil_scoring_image(source, (top, left, ch, cw), flip, score_px)
        drafts.append(psnr(full, score((i, data, h, w, small, sh, sw), score_px, False)))
    for name, values in (("psnr_cache_reencode_db", reenc), (f"psnr_score{score_px}_draft_vs_full_db", drafts)):
        finite = [v for v in values if math.isfinite(v)]
        record[name] = round(float(np.mean(finite)), 2) if finite else None
        record[name.replace("_db", "_min_db")] = round(float(np.min(finite)), 2) if finite else None
    record["cache_stored_unchanged"] = sum(1 for v in reenc if not math.isfinite(v))
    emit(record, out)
    return record


def data_config(cfg, root, source, **overrides):
    if source == "resident":
        kw = dict(name="synthetic", image_size=cfg.image_size, num_classes=cfg.classes, loader="resident",
                  train_samples=cfg.classes * cfg.train_per_class, test_samples=cfg.classes * cfg.val_per_class,
                  resident_max_gb=60.0)
    else:
        kw = dict(name="imagefolder", root=str(root), image_size=cfg.image_size, loader=source, workers=cfg.workers,
                  prefetch=cfg.prefetch, cache_dir=str(root / "cache"), cache_side=cfg.cache_side,
                  cache_quality=cfg.cache_quality, cache_verify=False, max_skipped_fraction=0.01 if not cfg.smoke
                  else 0.5)
    return merge(DataConfig(), {**kw, **overrides})


def loader_parts(cfg, root, device, out):
    """The loader alone, no model: scoring batches per second, plain vs selective; an epoch start with a 10% plan."""
    batches = 3 if cfg.smoke else 6
    paths = (("plain", {}, None), ("selective", {}, cfg.score_resolution),
             ("selective_share1.0", {"score_cpu_share": 1.0}, cfg.score_resolution))
    for source in ("jpeg", "cache"):
        for name, overrides, score_px in paths[:2] if cfg.smoke else paths:
            data = build_data(data_config(cfg, root, source, **overrides), device, batch_size=cfg.score_batch,
                              seed=cfg.seed)
            loader, k = data.train, max(1, round(cfg.target_rate * cfg.score_batch))
            loader.decode_for_selection(score_px)
            count, full_s, t0 = 0, 0.0, None
            loader.set_epoch(1)
            for b, (x, y, _) in enumerate(loader):
                if b == 1:  # the first batch (worker start-up, decoder start-up) stays out
                    sync(device)
                    count, full_s, t0 = 0, 0.0, time.perf_counter()
                if score_px is not None:
                    t1 = time.perf_counter()
                    x.full(torch.randperm(len(y), device=y.device)[:k])
                    sync(device)
                    full_s += time.perf_counter() - t1
                count += len(y)
                if b == batches:
                    break
            sync(device)
            seconds = time.perf_counter() - t0
            emit({"part": "loader_only", "source": source, "path": name, "batch": cfg.score_batch,
                  "img_per_s": round(count / seconds, 1),
                  "full_ms_per_batch": round(1e3 * full_s / max(1, batches - 1), 2) if score_px is not None else None,
                  "selected_per_batch": k if score_px is not None else None, "workers": cfg.workers,
                  "fallback": loader.fallback, "skipped": loader.skipped,
                  "stats": {key: round(v, 3) for key, v in loader.stats.items()}}, out)
            data.close()  # its workers stop now, not in the middle of a later run (see _LoaderBase.close)
            del x, data, loader
        # epoch start: an epoch-mode plan of target_rate of the data, twice (the second with warm workers)
        data = build_data(data_config(cfg, root, source), device, batch_size=cfg.batch_size, seed=cfg.seed)
        loader, n = data.train, data.num_train
        starts, per_batch = [], []
        for epoch in (1, 2):
            plan = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))[:round(cfg.target_rate * n)]
            loader.set_epoch(epoch, indices=plan)
            before = loader.stats["epoch_start_s"]
            sync(device)
            t0 = time.perf_counter()
            for b, _ in enumerate(loader):
                if b == 0:
                    t_first = time.perf_counter()
            sync(device)
            starts.append(loader.stats["epoch_start_s"] - before)
            per_batch.append((time.perf_counter() - t_first) / max(1, b))
        emit({"part": "epoch_start", "source": source, "plan": len(plan), "batches": b + 1,
              "first_batch_s": [round(s, 4) for s in starts], "later_batch_s": [round(s, 4) for s in per_batch],
              "workers": cfg.workers}, out)
        data.close()
        del data, loader


# ----------------------------------------------------------------------------- training runs
def base_config(cfg, out_dir):
    smoke = cfg.smoke
    return merge(train_ast.Config(), {
        "run": {"out_dir": str(out_dir), "eval_every": 1, "resume": "none", "device": "cpu" if smoke else "auto"},
        "model": {"name": "small_cnn" if smoke else "resnet50", **({"width": 8} if smoke else {})},
        "optim": {"lr": 0.05, "warmup_steps": 2 if smoke else 20, "weight_decay": 5e-5},
        "loop": {"precision": "fp32" if smoke else "bf16", "global_batch": cfg.batch_size, "log_every": 20,
                 "channels_last": True},
        "ast": {"warmup_epochs": 1, "final_full_fraction": 0.0, "controller": {"target_rate": cfg.target_rate},
                "score_batch": cfg.score_batch, "round_to": 8 if smoke else 32},
    })


class BudgetExceeded(Exception):
    """The hard stop (SIGALRM at hard_stop_s) or SIGTERM arrived: stop the run in progress, summarize what finished."""


def _stop_now(signum, frame):
    raise BudgetExceeded(signal.Signals(signum).name)


class Runner:
    """train_ast.train() per (variant, source), with the loaders it built kept for their stats."""

    def __init__(self, cfg, root, info, out_dir, t_start):
        self.cfg, self.root, self.info, self.out_dir, self.t_start = cfg, root, info, out_dir, t_start
        self.base = base_config(cfg, out_dir)
        self.built = []
        self.skipped = []
        self.current, self.interrupted = None, None
        real_build_data = train_ast.build_data

        def build_and_keep(*args, **kwargs):  # the bench reads the loaders' stats after each run
            data = real_build_data(*args, **kwargs)
            self.built.append(data)
            return data
        train_ast.build_data = build_and_keep

    def config(self, name, source, epochs, ast=None, data=None, compile=False, max_steps=0):
        overrides = dict(VARIANTS[name.replace("_compiled", "")])
        if overrides.get("score_resolution") == -1:
            overrides["score_resolution"] = self.cfg.score_resolution
        overrides.update(ast or {})
        return merge(self.base, {"run": {"name": f"{name}_{source}", "epochs": epochs, "max_steps": max_steps},
                                 "ast": overrides, "loop": {"compile": compile},
                                 "data": asdict(data_config(self.cfg, self.root, source, **(data or {})))})

    def run(self, vcfg):
        self.built.clear()
        self.current = vcfg.run.name
        result = train_ast.train(vcfg, self.info, self.out_dir / vcfg.run.name)
        stats = dict(self.built[0].train.stats) if self.built and hasattr(self.built[0].train, "stats") else {}
        self.built.clear()
        shutil.rmtree(self.out_dir / vcfg.run.name, ignore_errors=True)
        return result, stats

    def fits(self, what, estimate_s):
        """False (and noted) if a run of about estimate_s seconds would end past the time budget."""
        left = self.cfg.time_budget_s - (time.perf_counter() - self.t_start)
        if estimate_s > left:
            self.skipped.append(what)
            return False
        return True


def timed(result, images_per_step):
    """(seconds, images/s) between the last two evaluations (the last epoch, or the steps after the first epoch of a
    run cut by max_steps), and the whole run's train_seconds."""
    a, b = result["curve"][-2:]
    seconds = b["train_seconds"] - a["train_seconds"]
    return seconds, (b["step"] - a["step"]) * images_per_step / seconds, result["train_seconds"]


def main(cfg):
    if cfg.smoke:
        cfg.classes, cfg.train_per_class, cfg.val_per_class, cfg.awkward_per_kind = 3, 16, 2, 1
        cfg.image_size, cfg.batch_size, cfg.score_batch, cfg.score_resolution = 32, 4, 8, 16
        cfg.workers, cfg.parts_files, cfg.cache_side, cfg.target_rate = 0, 8, 40, 0.25
        cfg.epochs, cfg.compiled_steps = 2, 4
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.smoke else "cpu")
    if device.type != "cuda" and not (cfg.smoke or cfg.prepare_only):
        raise SystemExit("no CUDA GPU here: run with --smoke=true for a CPU check, --prepare_only=true to write the "
                         "data, or on the GPU machine")
    torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    root = Path(cfg.root or f"/tmp/frugal_ast_jpeg{'_smoke' if cfg.smoke else ''}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    emit({"part": "env", "device": device_name, "torch": torch.__version__,
          "torchvision": __import__("torchvision").__version__, "cpus": os.cpu_count(),
          "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "unset (8)"),
          "config": asdict(cfg)}, cfg.out)
    t0 = time.perf_counter()
    folder = make_folder(cfg, root)
    emit({"part": "dataset", **folder, "make_seconds": round(time.perf_counter() - t0, 1)}, cfg.out)
    cache = prepare_cache(cfg, root)
    emit({"part": "cache", **cache}, cfg.out)
    if cfg.prepare_only:
        return
    decode = decode_parts(cfg, root, device, cfg.out)
    loader_parts(cfg, root, device, cfg.out)

    # run folders (checkpoints every epoch) in memory where there is room: their writes are not what is measured
    shm = Path("/dev/shm")
    scratch = shm if shm.is_dir() and shutil.disk_usage(shm).free > 8e9 else None
    out_dir = Path(tempfile.mkdtemp(prefix="ast_jpeg_", dir=scratch))
    info = dist.setup(cfg.seed, "cpu" if cfg.smoke else "auto")
    runner = Runner(cfg, root, info, out_dir, t_start)
    results = {}
    previous = {sig: signal.signal(sig, _stop_now) for sig in (signal.SIGTERM, signal.SIGALRM)}
    if not cfg.smoke:
        signal.alarm(max(1, math.ceil(cfg.hard_stop_s - (time.perf_counter() - t_start))))
    try:
        train_runs(cfg, runner, device_name, results)
    except BudgetExceeded as e:  # the summary from the runs that finished; the one cut short is named
        runner.interrupted = f"{runner.current} ({e.args[0]} at {time.perf_counter() - t_start:.0f} s)"
        print(f"[ast_jpeg] stopped: {runner.interrupted}; summarizing the runs that finished", file=sys.stderr)
    finally:
        signal.alarm(0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(out_dir, ignore_errors=True)
    emit({**summarize(cfg, results), "cache_bytes_per_image": cache["bytes_per_image"],
          "psnr_cache_reencode_db": decode["psnr_cache_reencode_db"],
          f"psnr_score{cfg.score_resolution}_draft_vs_full_db":
              decode[f"psnr_score{cfg.score_resolution}_draft_vs_full_db"],
          "skipped_runs": runner.skipped, "interrupted_run": runner.interrupted, "epochs": cfg.epochs,
          "smoke": cfg.smoke,
          "seconds": round(time.perf_counter() - t_start, 1), "files": folder["train_files"], "device": device_name},
         cfg.out)


def train_runs(cfg, runner, device_name, r):
    """Every (variant, source) run, then full_compiled per source, then the extras, filling `r` (what the summary
    needs) as they finish: a run stopped by the hard stop leaves the others' results in place."""
    r.update({"epoch_s": {}, "rate": {}, "whole": {}, "top1": {}, "activation": {}, "compiled": {}, "extra_s": {}})
    n = cfg.classes * cfg.train_per_class
    # one-time costs to throwaway runs: CUDA/cuDNN start-up, autotuning the full-batch and the subset shapes
    for name in ("full",) if cfg.smoke else ("full", "batch10_cheap", "batch10"):
        runner.run(runner.config(name, "resident", 1, ast={"warmup_epochs": 0}, max_steps=1 if cfg.smoke else 12))
    for s, source in enumerate(cfg.sources):
        # full first on every source (each ratio needs it); the others in an order rotated per source
        rest = [v for v in cfg.variants if v != "full"]
        order = ["full"] * ("full" in cfg.variants) + rest[s % max(1, len(rest)):] + rest[:s % max(1, len(rest))]
        for name in order:
            full_s = r["epoch_s"].get(("full", source), r["epoch_s"].get(("full", "resident"), 0.0))
            if not runner.fits(f"{name}_{source}", 0.8 * cfg.epochs * full_s):
                continue
            result, stats = runner.run(runner.config(name, source, cfg.epochs))
            last, images_per_s, whole_s = timed(result, cfg.score_batch if "batch" in name else cfg.batch_size)
            key = (name, source)
            r["epoch_s"][key], r["rate"][key], r["whole"][key] = last, images_per_s, whole_s
            r["top1"][key], r["activation"][key] = result.get("top1"), result["activation_rate"]
            emit({"part": "run", "variant": name, "source": source, "epoch_seconds": round(last, 3),
                  "images_per_s": round(images_per_s, 1), "whole_run_seconds": round(whole_s, 3),
                  "epochs": cfg.epochs, "activation_rate": round(result["activation_rate"], 4),
                  "backward_samples": result["backward_samples"], "top1": result.get("top1"),
                  "skipped_files": result["skipped_files"], "loader_stats": {k: round(v, 3) for k, v in stats.items()},
                  "device": device_name}, cfg.out)
    steps = n // cfg.batch_size
    for source in (cfg.sources[:2] if cfg.smoke else cfg.sources) if cfg.compiled else ():
        estimate = (1 + cfg.compiled_steps / steps) * r["epoch_s"].get(("full", source), 0.0) + \
            (15 if r["compiled"] else 60)  # the first compile is the long one; later ones hit inductor's cache
        if not runner.fits(f"full_compiled_{source}", estimate):
            continue
        result, stats = runner.run(runner.config("full_compiled", source, 2, compile=not cfg.smoke,
                                                 max_steps=steps + cfg.compiled_steps))
        last, images_per_s, whole_s = timed(result, cfg.batch_size)
        r["compiled"][source] = images_per_s
        emit({"part": "run", "variant": "full_compiled", "source": source, "timed_seconds": round(last, 3),
              "images_per_s": round(images_per_s, 1), "whole_run_seconds": round(whole_s, 3),
              "timed_steps": cfg.compiled_steps, "compiled": not cfg.smoke, "top1": result.get("top1"),
              "loader_stats": {k: round(v, 3) for k, v in stats.items()}, "device": device_name}, cfg.out)
    for name, source, data in (EXTRAS[:1] if cfg.smoke else EXTRAS) if cfg.extras else ():
        if source not in cfg.sources or name not in cfg.variants:
            continue
        label = f"{name}_{source}_" + "_".join(f"{k}={v}" for k, v in data.items())
        estimate = 2 * r["epoch_s"].get((name, source), 0.0) + 0.3 * r["epoch_s"].get(("full", source), 0.0)
        if not runner.fits(label, estimate):
            continue
        result, stats = runner.run(runner.config(name, source, 2, ast={"warmup_epochs": 0}, data=data))
        last, images_per_s, _ = timed(result, cfg.score_batch)
        r["extra_s"][(name, source, label)] = last
        emit({"part": "extra", "variant": name, "source": source, "data": data, "epoch_seconds": round(last, 3),
              "images_per_s": round(images_per_s, 1), "activation_rate": round(result["activation_rate"], 4),
              "loader_stats": {k: round(v, 3) for k, v in stats.items()}, "device": device_name}, cfg.out)


def summarize(cfg, r):
    """The summary keys: ratios (best image-file path over resident, steady state), per-source speedups."""
    epoch_s, whole = r["epoch_s"], r["whole"]

    def speedup(name, source, seconds=None):
        full = epoch_s.get(("full", source))
        seconds = seconds if seconds is not None else epoch_s.get((name, source))
        return full / seconds if full and seconds else None

    ratios, best, by_path, detail, impossible = {}, {}, {}, {}, []
    for name in cfg.variants:
        if name == "full":
            continue
        for source in cfg.sources:
            s = speedup(name, source)
            detail[f"speedup_{name}_{source}"] = round(s, 3) if s else None
            full_whole, var_whole = whole.get(("full", source)), whole.get((name, source))
            w = full_whole / var_whole if full_whole and var_whole else None
            detail[f"whole_run_speedup_{name}_{source}"] = round(w, 3) if w else None
            if w and w > 1.05 / r["activation"][(name, source)]:
                impossible.append(f"{name}_{source}")  # faster than its backward share allows: charged costs
        paths = {source: speedup(name, source) for source in ("jpeg", "cache")}
        paths.update({label: speedup(name, source, sec) for (v, source, label), sec in r["extra_s"].items()
                      if v == name})
        paths = {k: v for k, v in paths.items() if v}
        resident = speedup(name, "resident")
        ratios[name] = None
        if paths and resident:
            best[name] = max(paths, key=paths.get)
            ratios[name] = round(paths[best[name]] / resident, 3)
            by_path.update({f"{name}:{label}": round(v / resident, 3) for label, v in paths.items()})
    compiled = r["compiled"]
    files = [v for k, v in compiled.items() if k != "resident"]
    r4 = max(files) / compiled["resident"] if files and "resident" in compiled else None
    return {"summary": True, "ratio_batch10": ratios.get("batch10"), "ratio_batch10_cheap": ratios.get("batch10_cheap"),
            "ratio_epoch10": ratios.get("epoch10"), "full_compiled_jpeg_vs_resident": round(r4, 3) if r4 else None,
            "best_path": best, "ratio_by_path": by_path,
            "full_compiled_img_per_s": {k: round(v, 1) for k, v in compiled.items()}, **detail,
            "impossible": impossible,
            "full_images_per_s": {src: round(r["rate"][("full", src)], 1) for src in cfg.sources
                                  if ("full", src) in r["rate"]},
            "top1_full": {src: r["top1"].get(("full", src)) for src in cfg.sources}}


if __name__ == "__main__":
    main(parse(BenchConfig()))
