"""Issue 19: how fast does the plan's encoder (lib/trm.py) encode, alone and end to end, against ViT-B/16?

Everything runs in one process on one GPU, at the same batch and precision:

  flops       FLOPs per sample of both models (torch.utils.flop_counter at the model's size, forward, batch 1,
              on the meta device with SDPA's math backend so that attention matmuls are counted)
  disk        the output disk's sequential write: `disk_mb` MB written in 16 MB blocks, then fsync, MB/s
  encoder     (a) the capsule TRM (random init: speed does not depend on the weights) on a GPU-resident batch,
              through lib/encoder.Encoder (inference_mode, autocast): samples/s
  vit_b16     (d) torchvision vit_b_16 (random init) on the same batch, same autocast: samples/s
  cache       (b) encode_stream.main over a build_cache.py cache on local disk (built here first: `cache_samples`
              numbered lines of the built-in corpus, 224x224 grayscale, shards of 1024), the plan's three outputs
              as fp16 chunks on the same disk; the shards are evicted from the page cache first
              (posix_fadvise DONTNEED), so they are read from the disk
  imagefolder (c) encode_stream.main over an ImageFolder of JPEG files (tools/make_imagefolder.py, ImageNet-like
              sizes) through the JPEG loader (nvJPEG on the GPU; PIL in a DataLoader on CPU), same outputs
Each encode_stream run records its loop's samples/s (first batch to the last chunk fsynced: reading, encoding,
copying off the GPU, writing) and its whole wall time (model build, warm-up, consolidation into one .npy per
output included), and the peak host RSS of this process during it (VmHWM, reset before each phase; the JPEG
loader's worker processes are not counted).

Last line: {"summary": true, "encoder_vs_vitb16": r1, "end_to_end_vs_encoder": r2, "end_to_end_samples_per_s": x,
"peak_rss_gb": m, "disk_write_mb_s": w, "bytes_per_sample": b, "device": ...}. encoder_vs_vitb16 is at equal FLOPs:
(samples/s x FLOPs per sample) of the encoder over vit_b_16's (both raw rates are in the summary). Bars (issue 19):
encoder_vs_vitb16 >= 1.0; end_to_end_vs_encoder >= 0.8, unless the disk cannot take the encoder's rate
(disk_write_mb_s / bytes_per_sample < the encoder's samples/s): then end_to_end_vs_disk >= 0.9.

    python bench/encode_speed.py                            # GPU machine: about 5 minutes
    python bench/encode_speed.py --compile=true             # + torch.compile of both models
    python bench/encode_speed.py --smoke                    # CPU, seconds: every part runs, numbers mean nothing
"""
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import build_cache  # noqa: E402
import encode_stream  # noqa: E402
from lib.config import merge, parse  # noqa: E402
from lib.encoder import Encoder, EncoderConfig, autocast_dtype, forward_flops, load_encoder  # noqa: E402
from lib.textcorpus import CorpusConfig, read_corpus  # noqa: E402
from tools.make_imagefolder import MakeConfig, make_imagefolder  # noqa: E402

PLAN_MODEL = {"name": "trm", "image_size": 224, "patch_size": 16, "width": 768, "heads": 12, "blocks": 2,
              "h_cycles": 2, "l_cycles": 3, "capsules": 12, "children": 4, "checksum_dim": 32}
SMOKE_MODEL = {**PLAN_MODEL, "image_size": 32, "patch_size": 8, "width": 32, "heads": 2}
OUTPUTS = ["sketches", "checksums", "children"]


@dataclass
class BenchConfig:
    smoke: bool = False             # tiny CPU run that only checks that every part works
    root: str = ""                  # scratch folder (cache, ImageFolder, outputs, disk test); "" = /tmp/frugal_encode_speed
    batch_size: int = 192           # images per forward, every phase (the plan's T4 batch)
    precision: str = "bf16"         # autocast of every model: bf16 | fp16 | fp32
    compile: bool = False           # torch.compile the encoder (every phase) and vit_b_16
    warmup_steps: int = 5           # (a), (d): forwards before timing
    steps: int = 30                 # (a), (d): timed forwards per round
    rounds: int = 2                 # (a), (d) alternate this many times; the best round of each is reported
    cache_samples: int = 98304      # (b): samples in the cache (96 shards of 1024, 32 chunks): long enough that the
                                    # pipeline's fill and the last chunks' writes are a small part of the loop time
                                    # (24,576 on the H200 run of 2026-12-02: an 8-chunk run of 5 s)
    folder_classes: int = 32        # (c): ImageFolder classes
    folder_per_class: int = 192     # (c): val JPEGs per class (6144 files, ~0.7 GB)
    chunk_samples: int = 3072       # encode_stream chunks: a multiple of the batch and of the shards
    readers: int = 2                # (b): cache reader threads
    jpeg_workers: int = 8           # (c): JPEG loader worker processes
    disk_mb: int = 1024             # MB written for the disk's sequential write speed
    keep: bool = False              # keep the scratch folder at the end
    seed: int = 0
    out: str = ""                   # also append the JSON lines to this file


def emit(record, out):
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- host memory, disk
def reset_peak_rss():
    """Reset this process's peak RSS (Linux: VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb():
    """Peak RSS of this process since the last reset (VmHWM), in GB (1e9 bytes); ru_maxrss where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) * 1024 / 1e9, 3)
    except OSError:
        pass
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)


def disk_write_mb_s(folder, megabytes):
    """Sequential write speed of the disk under `folder`: write `megabytes` MB in 16 MB blocks, fsync; MB/s."""
    block = np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()  # incompressible
    path = Path(folder) / "disk_write_test.bin"
    blocks = max(1, megabytes // 16)
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(blocks):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return round(blocks * len(block) / 1e6 / seconds, 1), blocks * len(block)


def evict_from_page_cache(folder):
    """Drop the files under `folder` from the page cache (posix_fadvise DONTNEED), so the next read hits the disk."""
    count = 0
    for path in Path(folder).rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                count += 1
            finally:
                os.close(fd)
    return count


# ----------------------------------------------------------------------------- the inputs
def build_text_cache(cfg, root):
    """A build_cache.py cache of `cache_samples` numbered lines of the built-in corpus; (cache dir, report, s)."""
    texts = read_corpus(CorpusConfig()).texts
    source = root / "texts.txt"
    source.write_text("".join(f"{i}. {texts[i % len(texts)]}\n" for i in range(cfg.cache_samples)))
    args = ["--config", str(Path(__file__).resolve().parent.parent / "configs" / "cache_default.yaml"),
            f"--run.out_dir={root}", "--run.name=textcache", f"--data.source={source}", "--cache.progress=false"]
    if cfg.smoke:
        args += ["--render.width=32", "--render.height=32", "--render.font_size=8", "--render.margin_x=1",
                 "--render.margin_y=1", "--cache.shard_size=32", "--cache.workers=0"]
    start = time.perf_counter()
    report = build_cache.main(parse(build_cache.Config(), args))
    return root / "textcache" / "cache", report, time.perf_counter() - start


# ----------------------------------------------------------------------------- (a), (d): models alone
def time_forward(forward, x, cfg, device):
    """samples/s of `forward(x)` over cfg.steps calls, after cfg.warmup_steps."""
    for _ in range(cfg.warmup_steps):
        forward(x)
    sync(device)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        forward(x)
    sync(device)
    return len(x) * cfg.steps / (time.perf_counter() - start)


def models_alone(cfg, model_cfg, device, dtype, out):
    """(a) the encoder and (d) vit_b_16 on one GPU-resident batch, alternating rounds; best round of each."""
    size = model_cfg.image_size
    x = torch.randn(cfg.batch_size, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    encoder = Encoder(load_encoder(model_cfg, 3, cfg.seed).to(device).eval(), OUTPUTS, device, dtype,
                      cfg.batch_size, compile=cfg.compile)
    vit = vit_model(cfg.smoke).to(device).eval()
    vit_forward = torch.compile(vit, dynamic=False) if cfg.compile else vit

    @torch.inference_mode()
    def run_vit(images):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return vit_forward(images)

    best = {"encoder": 0.0, "vit_b16": 0.0}
    for r in range(cfg.rounds):
        for name, forward in (("encoder", encoder), ("vit_b16", run_vit)):
            rate = time_forward(forward, x, cfg, device)
            best[name] = max(best[name], rate)
            emit({"phase": name, "round": r, "samples_per_s": round(rate, 1), "batch": cfg.batch_size}, out)
    return best


def vit_model(smoke):
    import torchvision
    if smoke:
        return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                    hidden_dim=32, mlp_dim=128)
    return torchvision.models.vit_b_16()


# ----------------------------------------------------------------------------- (b), (c): encode_stream end to end
def encode_run(cfg, root, name, model, inputs, device, out, split="test"):
    """One fresh encode_stream.main run; its numbers, wall time and this process's peak RSS during it."""
    shutil.rmtree(root / "out" / name, ignore_errors=True)
    stream_cfg = merge(encode_stream.Config(), {
        "run": {"out_dir": str(root / "out"), "name": name, "device": device.type, "seed": cfg.seed},
        "model": model, **inputs,
        "encode": {"outputs": OUTPUTS, "batch_size": cfg.batch_size, "chunk_samples": cfg.chunk_samples,
                   "store_dtype": "float16", "precision": cfg.precision, "compile": cfg.compile, "split": split}})
    reset = reset_peak_rss()
    start = time.perf_counter()
    result = encode_stream.main(stream_cfg)
    wall = time.perf_counter() - start
    record = {"phase": name, "samples": result["samples"], "samples_per_s": result["samples_per_s"],
              "loop_s": result["seconds"], "wall_s": round(wall, 2),
              "wall_samples_per_s": round(result["samples"] / wall, 1), "bytes_per_sample": result["bytes_per_sample"],
              "peak_rss_gb": peak_rss_gb(), "peak_rss_reset": reset, "random_weights": result["random_weights"]}
    emit(record, out)
    shutil.rmtree(root / "out" / name, ignore_errors=True)  # the next phase gets the disk space back
    return record


# ----------------------------------------------------------------------------- main
def main(cfg):
    device = torch.device("cpu" if cfg.smoke or not torch.cuda.is_available() else "cuda")
    if cfg.smoke:
        cfg.batch_size, cfg.precision, cfg.warmup_steps, cfg.steps, cfg.rounds = 8, "fp32", 1, 2, 1
        cfg.cache_samples, cfg.folder_classes, cfg.folder_per_class, cfg.chunk_samples = 64, 2, 8, 32
        cfg.disk_mb, cfg.jpeg_workers, cfg.readers = 16, 0, 1
    root = Path(cfg.root or ("/tmp/frugal_encode_speed" + ("_smoke" if cfg.smoke else "")))
    shutil.rmtree(root, ignore_errors=True)
    (root / "out").mkdir(parents=True)
    dtype = autocast_dtype(cfg.precision, device)
    model = SMOKE_MODEL if cfg.smoke else PLAN_MODEL
    model_cfg = merge(EncoderConfig(), model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    emit({"phase": "setup", "device": name, "torch": torch.__version__, "batch_size": cfg.batch_size,
          "precision": cfg.precision, "compile": cfg.compile, "model": model,
          "layer_applications": model_cfg.model_config().layer_applications()}, cfg.out)

    size = model_cfg.image_size
    flops = {"encoder": forward_flops(lambda: load_encoder(model_cfg, 3, 0), (1, 3, size, size), tuple(OUTPUTS)),
             "vit_b16": forward_flops(lambda: vit_model(cfg.smoke), (1, 3, size, size))}
    params = {"encoder": sum(p.numel() for p in load_encoder(model_cfg, 3, 0).parameters()),
              "vit_b16": sum(p.numel() for p in vit_model(cfg.smoke).parameters())}
    emit({"phase": "flops", "flops_per_sample": flops, "parameters": params,
          "encoder_over_vitb16_flops": round(flops["encoder"] / flops["vit_b16"], 4)}, cfg.out)
    disk, disk_bytes = disk_write_mb_s(root / "out", cfg.disk_mb)
    emit({"phase": "disk", "write_mb_s": disk, "bytes": disk_bytes, "folder": str(root / "out")}, cfg.out)

    cache_dir, cache_report, cache_s = build_text_cache(cfg, root)
    emit({"phase": "build_cache", "samples": cache_report["images_present"], "seconds": round(cache_s, 2),
          "bytes_per_image": cache_report["bytes_per_image"], "workers": cache_report.get("workers")}, cfg.out)
    folder = root / "folder"
    small = {"width": 48, "height": 40, "workers": 1} if cfg.smoke else {}  # else ImageNet-like sizes, every core
    make_imagefolder(MakeConfig(out=str(folder), classes=cfg.folder_classes, train_per_class=1,
                                val_per_class=cfg.folder_per_class, seed=cfg.seed, **small))

    alone = models_alone(cfg, model_cfg, device, dtype, cfg.out)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    emit({"phase": "evict", "files": evict_from_page_cache(cache_dir)}, cfg.out)
    cache_run = encode_run(cfg, root, "cache", model, {"cache": {"dir": str(cache_dir), "readers": cfg.readers}},
                           device, cfg.out)
    evict_from_page_cache(folder)
    folder_run = encode_run(cfg, root, "imagefolder", model, {
        "data": {"name": "imagefolder", "root": str(folder), "loader": "auto", "workers": cfg.jpeg_workers}},
        device, cfg.out)  # the val/ split
    summarize(cfg, name, flops, alone, disk, cache_run, folder_run, cache_report)
    if not cfg.keep:
        shutil.rmtree(root, ignore_errors=True)


def summarize(cfg, device_name, flops, alone, disk, cache_run, folder_run, cache_report):
    encoder, vit = alone["encoder"], alone["vit_b16"]
    bytes_per_sample = cache_run["bytes_per_sample"]
    disk_allows = disk * 1e6 / bytes_per_sample
    disk_bound = disk_allows < encoder
    e2e = cache_run["samples_per_s"]
    ratios = {"encoder_vs_vitb16": encoder * flops["encoder"] / (vit * flops["vit_b16"]),
              "end_to_end_vs_encoder": e2e / encoder, "end_to_end_vs_disk": e2e / disk_allows}
    bar = ("end_to_end_vs_disk", 0.9) if disk_bound else ("end_to_end_vs_encoder", 0.8)
    emit({"summary": True, **{k: round(v, 4) for k, v in ratios.items()},
          "end_to_end_samples_per_s": e2e, "peak_rss_gb": cache_run["peak_rss_gb"], "disk_write_mb_s": disk,
          "bytes_per_sample": bytes_per_sample, "device": device_name,
          "encoder_samples_per_s": round(encoder, 1), "vitb16_samples_per_s": round(vit, 1),
          "encoder_vs_vitb16_samples": round(encoder / vit, 4), "encoder_flops": flops["encoder"],
          "vitb16_flops": flops["vit_b16"], "disk_allows_samples_per_s": round(disk_allows, 1),
          "disk_bound": disk_bound, "end_to_end_wall_samples_per_s": cache_run["wall_samples_per_s"],
          "imagefolder_samples_per_s": folder_run["samples_per_s"],
          "imagefolder_vs_encoder": round(folder_run["samples_per_s"] / encoder, 4),
          "imagefolder_peak_rss_gb": folder_run["peak_rss_gb"], "cache_samples": cache_report["images_present"],
          "bars": {"encoder_vs_vitb16": 1.0, bar[0]: bar[1]},
          "bars_met": {"encoder_vs_vitb16": ratios["encoder_vs_vitb16"] >= 1.0, bar[0]: ratios[bar[0]] >= bar[1]},
          "batch_size": cfg.batch_size, "precision": cfg.precision, "compile": cfg.compile,
          "torch": torch.__version__, "command": " ".join(sys.argv)}, cfg.out)


if __name__ == "__main__":
    main(parse(BenchConfig()))
