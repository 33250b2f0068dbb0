"""Write a synthetic ImageFolder (ImageNet layout) of real JPEG files, for tests and benchmarks.

    # ImageNet-like files (about 400x350 px mean, ~110 KB): 100 classes x 100 train + 10 val images
    python tools/make_imagefolder.py --out=/tmp/imagefolder --classes=100 --train_per_class=100 --val_per_class=10
    # tiny folder with one file of each awkward kind in train/ (grayscale, CMYK, progressive, PNG named .JPEG,
    # truncated, empty)
    python tools/make_imagefolder.py --out=data/tiny --classes=4 --train_per_class=8 --val_per_class=2 \\
        --width=64 --height=48 --grayscale=1 --cmyk=1 --progressive=1 --png=1 --truncated=1 --empty=1

Images are smooth multi-scale color noise + a few class-colored shapes + fine grain, so JPEG sizes come out
like photos (not like flat test patterns); the class decides the palette, so a model can learn it. Files are
root/{train,val}/n<8 digits>/n<8 digits>_<i>.JPEG; root/manifest.json lists the awkward files by kind.
Written by a process pool; the same arguments write the same bytes.
"""
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.config import ConfigError, parse  # noqa: E402

# (width, height) px of typical ImageNet train images; chosen per file when --width/--height are 0
IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (400, 350), (350, 400), (500, 400), (300, 300),
                       (450, 300))
SPECIAL_KINDS = ("grayscale", "cmyk", "progressive", "png", "truncated", "empty")


@dataclass
class MakeConfig:
    out: str = ""                   # root folder to write (train/ and val/ inside); must not hold other files
    classes: int = 10               # class folders
    train_per_class: int = 20       # images per class in train/
    val_per_class: int = 5          # images per class in val/
    width: int = 0                  # px; 0 = ImageNet-like mix of sizes (mean about 430x380)
    height: int = 0                 # px; 0 = ImageNet-like mix
    quality: int = 90               # JPEG quality (1..95); 90 gives ~110 KB at ImageNet sizes
    subsampling: int = -1           # JPEG chroma subsampling: -1 = PIL's default (4:2:0), 0 = 4:4:4, 2 = 4:2:0
    grain: float = 28.0             # std of the per-pixel noise (0..255 units): more grain, larger files
    seed: int = 0
    workers: int = 0                # processes; 0 = all cores
    grayscale: int = 0              # awkward train files of each kind (placed in the first classes)
    cmyk: int = 0
    progressive: int = 0
    png: int = 0                    # PNG bytes in a .JPEG file
    truncated: int = 0              # JPEG cut at 60% of its bytes
    empty: int = 0                  # zero-byte file

    def validate(self):
        if self.classes < 1 or self.train_per_class < 1 or self.val_per_class < 0:
            raise ConfigError("need classes >= 1, train_per_class >= 1 and val_per_class >= 0")
        if (self.width == 0) != (self.height == 0) or self.width < 0 or self.height < 0:
            raise ConfigError("set both --width and --height in px (> 0), or neither for ImageNet-like sizes")
        if self.subsampling not in (-1, 0, 1, 2):
            raise ConfigError(f"--subsampling must be -1 (default), 0 (4:4:4), 1 (4:2:2) or 2 (4:2:0), got "
                              f"{self.subsampling}")
        if not 1 <= self.quality <= 95:
            raise ConfigError(f"--quality must be in 1..95, got {self.quality}")
        special = sum(getattr(self, k) for k in SPECIAL_KINDS)
        if special > self.classes * self.train_per_class:
            raise ConfigError(f"{special} awkward files requested but train/ has only "
                              f"{self.classes * self.train_per_class} files")


def class_name(label):
    """ImageNet-style synset-like folder name of a class index."""
    return f"n{label:08d}"


def _smooth_noise(rng, height, width, cell):
    """(H, W, 3) float noise in [-1, 1], smooth over `cell` px (bicubic upsampling of a coarse grid)."""
    coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2, 3), dtype=np.uint8)
    big = Image.fromarray(coarse).resize((width + 2 * cell, height + 2 * cell), Image.BICUBIC)
    arr = np.asarray(big, dtype=np.float32)[cell:cell + height, cell:cell + width]
    return arr / 127.5 - 1.0


def render(cfg, label, seed_parts):
    """One RGB image (PIL) of class `label`: palette from the class, layout and noise from `seed_parts`."""
    rng = np.random.default_rng([cfg.seed, *seed_parts])
    palette = np.random.default_rng([cfg.seed, 99, label]).integers(30, 226, (4, 3))
    if cfg.width:
        width, height = cfg.width, cfg.height
    else:
        width, height = IMAGENET_LIKE_SIZES[int(rng.integers(len(IMAGENET_LIKE_SIZES)))]
    base = palette[0].astype(np.float32)
    img = (base + 70 * _smooth_noise(rng, height, width, max(4, width // 6))
           + 35 * _smooth_noise(rng, height, width, max(2, width // 24))
           + 60 * _smooth_noise(rng, height, width, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):
        color = tuple(int(c) for c in palette[1 + int(rng.integers(3))])
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((x0, y0, x1 + 2, y1 + 2), fill=color)
        elif shape == 1:
            draw.rectangle((x0, y0, x1 + 2, y1 + 2), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(2, 12)))
    arr = np.asarray(canvas, dtype=np.float32) + rng.normal(0, cfg.grain, (height, width, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _write_one(job):
    cfg, path, label, seed_parts, kind = job
    img = render(cfg, label, seed_parts)
    path = Path(path)
    jpeg_args = {"format": "JPEG", "quality": cfg.quality, "subsampling": cfg.subsampling}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":
        img.save(path, format="PNG")
    elif kind == "grayscale":
        img.convert("L").save(path, **jpeg_args)
    elif kind == "cmyk":
        img.convert("CMYK").save(path, **jpeg_args)
    elif kind == "progressive":
        img.save(path, progressive=True, **jpeg_args)
    else:
        img.save(path, **jpeg_args)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[:int(len(data) * 0.6)])
    return path.stat().st_size, img.width, img.height


def make_imagefolder(cfg):
    """Write the folder described by `cfg` (a MakeConfig); returns a summary dict (counts, sizes, seconds)."""
    cfg.validate()
    if not cfg.out:
        raise ConfigError("--out is required: the root folder to write, e.g. --out=/tmp/imagefolder")
    root = Path(cfg.out)
    t0 = time.perf_counter()
    kinds = [k for k in SPECIAL_KINDS for _ in range(getattr(cfg, k))]
    jobs, manifest = [], {k: [] for k in SPECIAL_KINDS}
    for split, per_class, split_id in (("train", cfg.train_per_class, 0), ("val", cfg.val_per_class, 1)):
        for label in range(cfg.classes):
            folder = root / split / class_name(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                path = folder / f"{class_name(label)}_{i}.JPEG"
                kind = "jpeg"
                # awkward files: the i-th goes to class i % classes, so that one per class comes first
                slot = i * cfg.classes + label
                if split == "train" and slot < len(kinds):
                    kind = kinds[slot]
                    manifest[kind].append(str(path.relative_to(root)))
                jobs.append((cfg, str(path), label, (split_id, label, i), kind))
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 64:
        results = [_write_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_write_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    sizes = np.array([r[0] for r in results if r[0] > 0], dtype=np.float64)
    summary = {
        "root": str(root), "files": len(jobs), "classes": cfg.classes,
        "train_files": cfg.classes * cfg.train_per_class, "val_files": cfg.classes * cfg.val_per_class,
        "mean_kb": round(float(sizes.mean()) / 1e3, 1) if len(sizes) else 0.0,
        "mean_width": round(float(np.mean([r[1] for r in results])), 1),
        "mean_height": round(float(np.mean([r[2] for r in results])), 1),
        "total_mb": round(float(sizes.sum()) / 1e6, 1), "seconds": round(time.perf_counter() - t0, 2),
        "workers": workers,
    }
    with open(root / "manifest.json", "w") as f:
        json.dump({"config": asdict(cfg), "summary": summary, "special": manifest}, f, indent=1)
    return summary


def main(cfg):
    print(json.dumps(make_imagefolder(cfg)))


if __name__ == "__main__":
    main(parse(MakeConfig()))
