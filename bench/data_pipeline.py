"""Issue 4: can the GPU JPEG pipeline keep a ResNet-50 fed? Everything below runs in one process, one GPU:

  check      GPU pipeline output vs the PIL path on the same crops (0..255 units), nvJPEG vs PIL decode
  parts      nvJPEG batched decode alone; crop/resize as batched matmuls vs per-image torchvision v2
  pipeline   lib.data ImageFolderLoader(decode="gpu") alone, no model: images/s
  resident   (a) ResNet-50 train steps (224 px, bf16 autocast, channels_last, SGD) on tensors already on the GPU
  standard   (b) the same steps fed by torchvision ImageFolder + DataLoader + PIL transforms, a worker per core
  new        (c) the same steps fed by the GPU JPEG pipeline, once per cpu_decode_fractions entry (the share of
             each batch the workers decode with PIL instead of nvJPEG); the summary's new_* numbers are the
             fastest entry's, and it names that fraction
  profile    (--profile=true) GPU kernel time per CUDA stream during (c) at the first fraction
  (--compile=true adds (a) and (c) at the best fraction with torch.compile; the summary's ratios are eager)

    python bench/data_pipeline.py                         # GPU machine: 100 classes x 100 JPEGs, batch 256
    python bench/data_pipeline.py --compile=true          # + compiled model
    python bench/data_pipeline.py --smoke=true            # CPU, seconds: every part runs, numbers mean nothing

The synthetic ImageFolder (ImageNet-like sizes, ~110 KB JPEGs, a few grayscale/CMYK/progressive/PNG files) is
written first with tools/make_imagefolder.py into `root`. It is read from the page cache, as a warm ImageNet
epoch on a machine with enough RAM would be. One JSON object per line; the last is {"summary": true, ...}.
"""
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib import jpeg  # noqa: E402
from lib.config import parse  # noqa: E402
from lib.data import DataConfig, build_data  # noqa: E402
from tools.make_imagefolder import MakeConfig, make_imagefolder  # noqa: E402


@dataclass
class BenchConfig:
    smoke: bool = False             # tiny CPU run that only checks that every part works
    root: str = ""                  # scratch folder for the synthetic ImageFolder; "" = /tmp/frugal_bench_if[_smoke]
    classes: int = 100              # class folders
    train_per_class: int = 160      # JPEGs per class (16k files, ~1.7 GB; 62 batches per epoch)
    awkward_per_kind: int = 4       # grayscale, CMYK, progressive and PNG-named-.JPEG files each (CPU fallback)
    batch_size: int = 256           # images per step
    image_size: int = 224           # px
    warmup_steps: int = 10          # train steps before timing (cudnn autotune, worker start, compile)
    steps: int = 40                 # timed train steps per variant
    pipeline_batches: int = 60      # timed batches for the pipeline-only number
    workers: int = 0                # (b) DataLoader workers; 0 = one per core
    jpeg_workers: list[int] = field(default_factory=lambda: [6, 12])  # (c) worker counts to try (pipeline
                                    # alone); (c) uses the fastest. Workers only read files and parse headers
    prefetch: int = 2               # (c): batches each worker reads ahead and GPU batches decoded ahead
    cpu_decode_fractions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.4, 0.5])  # (c) variants:
                                    # data.cpu_decode_fraction, the share of each batch decoded by PIL in workers
    cpu_workers: int = 0            # (c) worker processes when that fraction is > 0; 0 = cores - 2
    switch_intervals_ms: list[float] = field(default_factory=lambda: [0.0])  # (c) variants: the interpreter's
                                    # thread switch interval (sys.setswitchinterval) in ms; 0 = leave it as is
    profile: bool = False           # emit GPU kernel time per CUDA stream over a few steps of (c)
    compile: bool = False           # also time (a) and (c) with torch.compile
    time_budget_s: float = 330.0    # skip the compiled variants when the eager part took longer than this
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


def make_folder(cfg, root, smoke):
    """Write (or reuse) the synthetic ImageFolder; returns its summary."""
    spec = MakeConfig(out=str(root), classes=cfg.classes, train_per_class=cfg.train_per_class, val_per_class=2,
                      seed=cfg.seed, grayscale=cfg.awkward_per_kind, cmyk=cfg.awkward_per_kind,
                      progressive=cfg.awkward_per_kind, png=cfg.awkward_per_kind,
                      width=96 if smoke else 0, height=72 if smoke else 0)
    manifest = root / "manifest.json"
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        if old["config"] == asdict(spec):
            return dict(old["summary"], reused=True)
    return make_imagefolder(spec)


def train_step_fn(model, optimizer, device):
    """One plain SGD step: bf16 autocast on CUDA (fp32 on CPU), cross-entropy, backward, step."""
    def step(images, labels):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def time_steps(step, batches, warmup, steps, device):
    """Images/s of `steps` train steps fed by the iterator `batches` of (images, labels), after `warmup` steps."""
    for _ in range(warmup):
        images, labels = next(batches)
        step(images, labels)
    sync(device)
    count = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels = next(batches)
        step(images, labels)
        count += len(labels)
    sync(device)
    return count / (time.perf_counter() - t0)


def epochs_of(loader):
    """Endless (images, labels) from a lib.data loader, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for images, labels, _ in loader:
            yield images, labels
        epoch += 1


def resident_batches(cfg, num_classes, device, channels_last):
    """Endless batches that already sit on the GPU: the ceiling no input pipeline can beat."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    pool = []
    for _ in range(4):
        x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
        x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        pool.append((x, torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(device)))
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def standard_batches(root, cfg, workers, device):
    """torchvision's reference ImageNet input pipeline: ImageFolder + PIL transforms in DataLoader workers."""
    import torchvision
    from torchvision import transforms as T
    tf = T.Compose([T.RandomResizedCrop(cfg.image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize(jpeg.IMAGENET_MEAN, jpeg.IMAGENET_STD)])
    dataset = torchvision.datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0,
                                         prefetch_factor=2 if workers > 0 else None)
    while True:
        for images, labels in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            yield images, labels.to(device, non_blocking=True)


def check_against_cpu(data_cfg, device, batch_size, out):
    """GPU pipeline vs PIL path on identical crops; nvJPEG vs PIL on whole images. Differences in 0..255 units."""
    gpu = build_data(data_cfg, device, batch_size=batch_size, seed=1)
    pil = build_data(DataConfig(**{**asdict(data_cfg), "loader": "dataloader", "workers": 2}), "cpu",
                     batch_size=batch_size, seed=1)
    std255 = torch.tensor(jpeg.IMAGENET_STD).view(1, 3, 1, 1) * 255
    diffs = []
    for name in ("train", "test"):
        a, b = getattr(gpu, name), getattr(pil, name)
        a.set_epoch(0)
        b.set_epoch(0)
        (xa, ya, ia), (xb, yb, ib) = next(iter(a)), next(iter(b))
        assert torch.equal(ia.cpu(), ib) and torch.equal(ya.cpu(), yb), "GPU and CPU paths chose other samples"
        d = (xa.cpu() - xb).abs() * std255
        diffs.append({"split": name, "mean_abs_255": round(d.mean().item(), 4), "p99_abs_255":
                      round(d.flatten().kthvalue(int(0.99 * d.numel())).values.item(), 3),
                      "max_abs_255": round(d.max().item(), 3)})
    # whole-image decode, nvJPEG against PIL (libjpeg-turbo), on the same pictures encoded with 4:4:4 and 4:2:0
    # chroma: where only 4:2:0 differs, the decoders differ in chroma upsampling, not in correctness
    import io
    import numpy as np
    from tools.make_imagefolder import render
    record = {"part": "check", "pipeline_vs_pil": diffs}
    for subsampling, name in ((0, "444"), (2, "420")):
        blobs, refs = [], []
        for i in range(16):
            buf = io.BytesIO()
            render(MakeConfig(seed=7), i % 4, (5, i)).save(buf, format="JPEG", quality=90, subsampling=subsampling)
            blobs.append(buf.getvalue())
            refs.append(torch.from_numpy(np.array(jpeg.pil_open_rgb(blobs[-1]))).permute(2, 0, 1).int())
        offsets = np.cumsum([0] + [len(b) for b in blobs])
        blob = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8)
        errs = torch.cat([(d.cpu().int() - r).abs().flatten().float()
                          for d, r in zip(jpeg.decode_jpegs(blob, offsets, device), refs)])
        record[f"decode_vs_pil_{name}_mean_abs_255"] = round(errs.mean().item(), 4)
        record[f"decode_vs_pil_{name}_max_abs_255"] = int(errs.max().item())
    emit(record, out)
    gpu.close()
    pil.close()


def time_parts(root, cfg, device, out):
    """nvJPEG decode alone (batch 64 and 256) and crop+resize alone: batched matmuls vs per-image torchvision."""
    from torchvision.transforms.v2 import functional as TF
    files = [p for p in sorted((root / "train").rglob("*.JPEG"))]
    blobs = []
    for p in files:
        b = p.read_bytes()
        if jpeg.sniff_jpeg(b)[0] == "baseline":
            blobs.append(b)
        if len(blobs) == 4 * cfg.batch_size:
            break
    record = {"part": "parts"}
    for k in sorted({min(64, cfg.batch_size), cfg.batch_size}):
        groups = [blobs[i:i + k] for i in range(0, len(blobs) - k + 1, k)]
        packed = []
        for g in groups:
            offsets = torch.tensor([0] + [len(b) for b in g]).cumsum(0)
            packed.append((torch.frombuffer(bytearray(b"".join(g)), dtype=torch.uint8), offsets))
        jpeg.decode_jpegs(*packed[0], device)  # warm-up: decoder creation
        sync(device)
        t0 = time.perf_counter()
        reps = 0
        while time.perf_counter() - t0 < (0.5 if cfg.smoke else 3.0):
            jpeg.decode_jpegs(*packed[reps % len(packed)], device)
            reps += 1
        sync(device)
        record[f"decode_img_per_s_batch{k}"] = round(reps * k / (time.perf_counter() - t0), 1)
    offsets = torch.tensor([0] + [len(b) for b in blobs[:cfg.batch_size]]).cumsum(0)
    images = jpeg.decode_jpegs(torch.frombuffer(bytearray(b"".join(blobs[:cfg.batch_size])), dtype=torch.uint8),
                               offsets, device)
    params = [jpeg.crop_params(int(im.shape[1]), int(im.shape[2]), True, 0, 0, i) for i, im in enumerate(images)]
    boxes = torch.tensor([p[:4] for p in params])
    flips = torch.tensor([p[4] for p in params])

    def matmul():
        return jpeg.resized_crop_batch(images, boxes, flips, cfg.image_size)

    def per_image():
        out = []
        for im, (t, left, h, w, flip) in zip(images, params):
            x = TF.resized_crop(im, t, left, h, w, [cfg.image_size, cfg.image_size], antialias=True)
            out.append(TF.horizontal_flip(x) if flip else x)
        return torch.stack(out)

    for name, fn in (("crop_resize_matmul", matmul), ("crop_resize_per_image_v2", per_image)):
        fn()
        sync(device)
        reps = 3 if cfg.smoke else 20
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        record[f"{name}_img_per_s"] = round(reps * len(images) / (time.perf_counter() - t0), 1)
    emit(record, out)


def time_pipeline(loader, cfg, device):
    """Images/s of the JPEG loader alone (no model), and of its worker processes alone (bytes, no decode)."""
    source = iter(loader._loader)  # the DataLoader under the loader: what the workers deliver
    count, t0 = 0, None
    for i, batch in enumerate(source):
        if i == 3:
            count, t0 = 0, time.perf_counter()
        count += len(batch["labels"])
    worker_rate = count / (time.perf_counter() - t0)
    batches = epochs_of(loader)
    for _ in range(5):  # first batches stay out of the number
        next(batches)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg.pipeline_batches):
        next(batches)
    sync(device)
    return cfg.pipeline_batches * cfg.batch_size / (time.perf_counter() - t0), worker_rate


def profile_streams(step, batches, device, steps=8):
    """GPU kernel time per CUDA stream over `steps` train steps: who competes with the model for the GPU."""
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    if device.type != "cuda":
        return {"skipped": "no CUDA"}
    sync(device)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            images, labels = next(batches)
            step(images, labels)
        sync(device)
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    streams, decode_ms = {}, []
    for e in events:
        if e.get("cat") == "cpu_op" and "decode_jpeg" in e.get("name", ""):
            decode_ms.append(e.get("dur", 0) / 1000)
        if e.get("cat") != "kernel":
            continue
        s = streams.setdefault(str(e.get("args", {}).get("stream")),
                               {"kernels": 0, "busy_ms": 0.0, "queued_ms": [], "top": {}})
        s["kernels"] += 1
        s["busy_ms"] += e.get("dur", 0) / 1000
        launched = launches.get(e.get("args", {}).get("correlation"))
        if launched is not None:  # launch call to kernel start: time spent waiting for the GPU
            s["queued_ms"].append((e["ts"] - launched) / 1000)
        name = e.get("name", "?")[:80]
        s["top"][name] = s["top"].get(name, 0.0) + e.get("dur", 0) / 1000
    for s in streams.values():
        s["busy_ms"] = round(s["busy_ms"], 2)
        q = sorted(s.pop("queued_ms"))
        if q:
            s["queued_ms_median"], s["queued_ms_max"] = round(q[len(q) // 2], 3), round(q[-1], 3)
        s["top"] = {k: round(v, 2) for k, v in sorted(s["top"].items(), key=lambda kv: -kv[1])[:3]}
    decode = {"calls": len(decode_ms), "mean_ms": round(sum(decode_ms) / max(1, len(decode_ms)), 2)}
    return {"steps": steps, "wall_ms": round(wall * 1000, 1), "decode_calls": decode, "streams": streams}


def main(cfg):
    if cfg.smoke:
        cfg.classes, cfg.train_per_class, cfg.awkward_per_kind = 4, 12, 1
        cfg.batch_size, cfg.image_size, cfg.warmup_steps, cfg.steps, cfg.pipeline_batches = 8, 32, 1, 2, 3
        cfg.workers, cfg.jpeg_workers = cfg.workers or 2, [2]
        cfg.cpu_decode_fractions = [0.0, 0.5]  # both paths: decode in the main process, and a share in workers
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.smoke else "cpu")
    if device.type != "cuda" and not cfg.smoke:
        raise SystemExit("no CUDA GPU here: run with --smoke=true for a CPU check, or on the GPU machine")
    torch.backends.cudnn.benchmark = True
    t_start = time.perf_counter()
    workers = cfg.workers or os.cpu_count() or 1
    root = Path(cfg.root or f"/tmp/frugal_bench_if{'_smoke' if cfg.smoke else ''}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    emit({"part": "env", "device": device_name, "torch": torch.__version__,
          "torchvision": __import__("torchvision").__version__, "cpus": os.cpu_count(), "workers": workers,
          "jpeg_workers": cfg.jpeg_workers,
          "cuda_device_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "unset (8)"),
          "config": asdict(cfg)}, cfg.out)
    folder = make_folder(cfg, root, cfg.smoke)
    emit({"part": "dataset", **folder}, cfg.out)

    data_cfg = DataConfig(name="imagefolder", root=str(root), loader="jpeg", image_size=cfg.image_size,
                          workers=cfg.jpeg_workers[0], prefetch=cfg.prefetch)
    check_against_cpu(data_cfg, device, min(64, cfg.batch_size), cfg.out)
    time_parts(root, cfg, device, cfg.out)

    pipeline_rates = {}
    for count in cfg.jpeg_workers:
        data = build_data(DataConfig(**{**asdict(data_cfg), "workers": count}), device, batch_size=cfg.batch_size,
                          seed=cfg.seed)
        rate, worker_rate = time_pipeline(data.train, cfg, device)
        pipeline_rates[count] = rate
        emit({"part": "pipeline_only", "jpeg_workers": count, "img_per_s": round(rate, 1),
              "workers_alone_img_per_s": round(worker_rate, 1), "batch_size": cfg.batch_size,
              "fallback": data.train.fallback, "skipped": data.train.skipped,
              "stats": {k: round(v, 3) for k, v in data.train.stats.items()}}, cfg.out)
        data.close()  # its workers stop now, not in the middle of a later measurement (see _LoaderBase.close)
        del data
    jpeg_workers = max(pipeline_rates, key=pipeline_rates.get)
    pipeline = pipeline_rates[jpeg_workers]
    cpu_workers = cfg.cpu_workers or max(1, (os.cpu_count() or 2) - 2)

    def new_loader(fraction):
        """(c) at one cpu_decode_fraction: nvJPEG only with the fastest worker count, else a worker per spare core."""
        count = jpeg_workers if fraction == 0 else cpu_workers
        data = build_data(DataConfig(**{**asdict(data_cfg), "workers": count, "cpu_decode_fraction": fraction}),
                          device, batch_size=cfg.batch_size, seed=cfg.seed)
        return data, count

    import torchvision
    num_classes = cfg.classes
    if cfg.smoke:  # a tiny CNN: the smoke run checks that every part runs, its numbers mean nothing
        from lib.models import SmallCNN
        model = SmallCNN(3, num_classes, width=8).to(device)
    else:
        model = torchvision.models.resnet50(num_classes=num_classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-5)
    step = train_step_fn(model, optimizer, device)
    # Loaders hold batches read ahead (workers x prefetch, + the GPU stages' queues): warm-up consumes at least
    # that many, so that the timed steps see the steady-state rate rather than a buffer filled during warm-up.
    warmup_standard = cfg.warmup_steps + workers * 2

    def warmup_new(count):
        return cfg.warmup_steps + count * cfg.prefetch + 2 * cfg.prefetch

    results = {}
    rate = time_steps(step, resident_batches(cfg, num_classes, device, True), cfg.warmup_steps, cfg.steps, device)
    results["resident"] = rate
    emit({"part": "resident", "compiled": False, "img_per_s": round(rate, 1), "steps": cfg.steps,
          "batch_size": cfg.batch_size}, cfg.out)
    rate = time_steps(step, standard_batches(root, cfg, workers, device), warmup_standard, cfg.steps, device)
    results["standard"] = rate
    emit({"part": "standard", "compiled": False, "img_per_s": round(rate, 1), "steps": cfg.steps,
          "batch_size": cfg.batch_size, "workers": workers}, cfg.out)
    new_rates = {}
    default_switch = sys.getswitchinterval()
    for fraction in cfg.cpu_decode_fractions:
        for switch_ms in cfg.switch_intervals_ms:
            sys.setswitchinterval(switch_ms / 1000 if switch_ms > 0 else default_switch)
            data, count = new_loader(fraction)
            batches = epochs_of(data.train)
            before = dict(data.train.stats)
            rate = time_steps(step, batches, warmup_new(count), cfg.steps, device)
            new_rates[(fraction, switch_ms)] = rate
            # where the pipeline's time went during these steps (seconds, summed per thread)
            emit({"part": "new", "compiled": False, "cpu_decode_fraction": fraction, "switch_interval_ms":
                  round(sys.getswitchinterval() * 1000, 3), "jpeg_workers": count, "img_per_s": round(rate, 1),
                  "steps": cfg.steps, "batch_size": cfg.batch_size,
                  "stats": {k: round(v - before[k], 3) for k, v in data.train.stats.items()}}, cfg.out)
            if cfg.profile and not new_rates.keys() - {(fraction, switch_ms)}:
                emit({"part": "profile", "cpu_decode_fraction": fraction,
                      **profile_streams(step, batches, device)}, cfg.out)
            batches.close()  # ends the suspended epoch (the loader's pipeline threads), then the workers
            data.close()
            del batches, data
    sys.setswitchinterval(default_switch)
    best = max(new_rates, key=new_rates.get)
    results["new"] = new_rates[best]
    best_fraction, best_switch_ms = best

    summary = {"summary": True, "new_vs_resident": round(results["new"] / results["resident"], 3),
               "standard_vs_resident": round(results["standard"] / results["resident"], 3),
               "pipeline_only_img_per_s": round(pipeline, 1),
               "resident_img_per_s": round(results["resident"], 1),
               "standard_img_per_s": round(results["standard"], 1), "new_img_per_s": round(results["new"], 1),
               "new_cpu_decode_fraction": best_fraction, "new_switch_interval_ms": best_switch_ms,
               "new_img_per_s_by_variant": {f"fraction={f} switch_ms={m}": round(r, 1)
                                            for (f, m), r in new_rates.items()}}
    if cfg.compile:  # compiling takes minutes: keep the eager result on record first
        emit({"part": "summary_eager", **{k: v for k, v in summary.items() if k != "summary"}}, cfg.out)
        if time.perf_counter() - t_start < cfg.time_budget_s:
            step_c = train_step_fn(torch.compile(model), optimizer, device)
            compiled = {}
            data, count = new_loader(best_fraction)
            if best_switch_ms > 0:
                sys.setswitchinterval(best_switch_ms / 1000)
            for name, batches, warmup in (
                    ("resident", resident_batches(cfg, num_classes, device, True), cfg.warmup_steps),
                    ("new", epochs_of(data.train), warmup_new(count))):
                rate = time_steps(step_c, batches, warmup, cfg.steps, device)
                compiled[name] = rate
                emit({"part": name, "compiled": True, "img_per_s": round(rate, 1), "steps": cfg.steps,
                      "batch_size": cfg.batch_size, **({"cpu_decode_fraction": best_fraction,
                                                        "switch_interval_ms": best_switch_ms}
                                                       if name == "new" else {})}, cfg.out)
            sys.setswitchinterval(default_switch)
            summary.update(compiled_new_vs_resident=round(compiled["new"] / compiled["resident"], 3),
                           compiled_resident_img_per_s=round(compiled["resident"], 1),
                           compiled_new_img_per_s=round(compiled["new"], 1))
        else:
            emit({"part": "compile_skipped", "reason": f"eager part took over time_budget_s={cfg.time_budget_s}"},
                 cfg.out)
    summary.update(batch_size=cfg.batch_size, image_size=cfg.image_size, workers=workers,
                   jpeg_workers=jpeg_workers, cpu_workers=cpu_workers,
                   files=folder["train_files"], mean_kb=folder["mean_kb"], smoke=cfg.smoke,
                   seconds=round(time.perf_counter() - t_start, 1), device=device_name)
    emit(summary, cfg.out)


if __name__ == "__main__":
    main(parse(BenchConfig()))
