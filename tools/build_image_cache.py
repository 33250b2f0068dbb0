"""Build the pre-resized image cache of an ImageFolder ahead of training (data.loader=cache builds it on first use).

    # every image of /data/imagenet/{train,val} re-encoded at shorter side <= 256 px, on every core
    python tools/build_image_cache.py --root=/data/imagenet --cache_dir=/data/imagenet_cache256
    # killed or out of disk? Run the same command again: finished shards are kept, the rest is built
    python train_ast.py --config configs/imagenet_resnet50.yaml --data.root=/data/imagenet \\
        --data.loader=cache --data.cache_dir=/data/imagenet_cache256

The cache format, resume and checks are lib/imagecache.py's. Prints one JSON line per split (images, bytes per
image, seconds, images per second, files converted or unreadable) and refuses a cache folder built with other
settings or from a folder that has changed since.
"""
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.config import ConfigError, parse  # noqa: E402
from lib.datasets import scan_imagefolder  # noqa: E402
from lib.imagecache import open_or_build  # noqa: E402
from lib.storage import StorageError  # noqa: E402


@dataclass
class BuildConfig:
    root: str = ""                  # ImageFolder root: <root>/train/<class>/*, <root>/val/<class>/*
    cache_dir: str = ""             # the cache folder (a train/ and a val/ inside); the same folder resumes
    side: int = 256                 # px: shorter side of the cached images (larger ones are scaled down)
    quality: int = 90               # JPEG quality of the re-encoded images
    workers: int = -1               # build processes; -1 = one per core, 0 = in this process
    verify: bool = True             # check the sha256 of every shard already there
    splits: list[str] = field(default_factory=lambda: ["train", "val"])

    def validate(self):
        if not self.root or not self.cache_dir:
            raise ConfigError("--root (the ImageFolder) and --cache_dir (where to build the cache) are required")


def main(cfg):
    """Build (or complete) the cache of each split; returns {split: report}."""
    reports, classes = {}, None
    workers = (os.cpu_count() or 1) if cfg.workers == -1 else cfg.workers
    for split in cfg.splits:
        split_dir = Path(cfg.root) / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} does not exist; --root must hold {', '.join(cfg.splits)}/")
        paths, _, classes, _ = scan_imagefolder(split_dir, classes)
        _, report = open_or_build(split_dir, paths, Path(cfg.cache_dir) / split, side=cfg.side, quality=cfg.quality,
                                  workers=workers, verify=cfg.verify, setting="--cache_dir",
                                  log=lambda msg: print(msg, file=sys.stderr, flush=True))
        reports[split] = report
        print(json.dumps({"split": split, **report}), flush=True)
    return reports


if __name__ == "__main__":
    try:
        main(parse(BuildConfig()))
    except (ConfigError, FileNotFoundError, StorageError) as err:  # what the user must fix: one line
        sys.exit(f"error: {err}")
