"""Write a deterministic subset of an ImageFolder (ImageNet layout) as links: ImageNet-100 style or a random fraction.

    # ImageNet-100 style: 100 classes drawn by the seed, all their train and val images
    python tools/make_subset.py --root /data/imagenet --out /data/imagenet100 --classes 100 --seed 0
    # named classes instead (one class folder name per line, e.g. a published ImageNet-100 list)
    python tools/make_subset.py --root /data/imagenet --out /data/imagenet100 --class_list in100.txt
    # a class-stratified random 10% of the train images of every class; val keeps all its images
    python tools/make_subset.py --root /data/imagenet --out /data/imagenet_10pct --fraction 0.1 --seed 0
    # 100 classes x 50 train images, val cut to 50 per class too, as hard links
    python tools/make_subset.py --root /data/imagenet --out /data/in100_50 --classes 100 --per_class 50 \\
        --val same --link hardlink
    # then train on it like on any ImageFolder
    python train_ast.py --config configs/imagenet100_arch_sweep.yaml --data.root=/data/imagenet100

The source is <root>/train/<class>/<image> and <root>/val/<class>/<image> (the files lib/data.py reads: image
extensions only). Classes: all, --classes N drawn by the seed, or the --class_list names. Images of each chosen
class: all, a --fraction of its train images (round(fraction x n), at least 1) or --per_class k of them; val keeps
all images of the chosen classes (--val all: the usual ImageNet-100 / 10%-ImageNet evaluation) or the same
fraction / k per class (--val same). Draws rank the candidates by sha256(seed, name): the same request gives the
same subset on any machine and numpy version, and subsets nest (the 100 classes of a seed hold its 50).

Written: <out>/{train,val}/<class>/<image> as absolute symlinks into the source (or hard links: same filesystem;
they add a link count to each source file, nothing else) and <out>/manifest.json (source root, seed, the request,
the class list, counts per class and split, sha256 of the sorted file list). Source files are never copied or
changed. Every check (missing classes, more classes or images than the source holds, an --out holding anything
but this same subset) runs before anything is written; the links go into a hidden folder next to --out that is
renamed to --out when complete, so --out is never half-written. Rerunning the same request is a no-op.
"""
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lib.config import ConfigError  # noqa: E402
from lib.datasets import scan_imagefolder  # noqa: E402
from lib.run import run_script  # noqa: E402

SPLITS = ("train", "val")
MANIFEST = "manifest.json"
PARTIAL_MARKER = ".make_subset_partial"  # in the hidden folder being written: safe to remove after a crash


@dataclass
class SubsetConfig:
    root: str = ""                  # source ImageFolder (train/<class>/*, val/<class>/*); only read
    out: str = ""                   # the subset folder to write; must not exist (or be empty), or hold this same
                                    # subset (then nothing is done)
    # which classes (default: all that have train images)
    classes: int = 0                # this many, drawn by the seed (0 = all, or those of class_list)
    class_list: str = ""            # text file: one class folder name per line ('#' comments, blank lines skipped)
    # which images of each chosen class (default: all)
    fraction: float = 0.0           # share of each class's train images: round(fraction x n), at least 1 (0 = all)
    per_class: int = 0              # ... or exactly this many train images per class (0 = all)
    val: str = "all"                # val images of the chosen classes: all | same (fraction / per_class as train)
    seed: int = 0                   # draws the classes and the images
    link: str = "symlink"           # symlink (absolute, into the source) | hardlink (same filesystem as the source)

    def validate(self):
        if self.classes < 0 or self.per_class < 0:
            raise ConfigError(f"--classes and --per_class must be >= 0 (0 = all), got {self.classes}, {self.per_class}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1] (0 = all images), got {self.fraction}")
        if self.fraction and self.per_class:
            raise ConfigError("give --fraction or --per_class, not both (a share of each class, or a fixed count)")
        if self.val not in ("all", "same"):
            raise ConfigError(f"--val must be all (every val image of the chosen classes) or same (the train "
                              f"fraction / per_class), got '{self.val}'")
        if self.link not in ("symlink", "hardlink"):
            raise ConfigError(f"--link must be symlink or hardlink, got '{self.link}'")


# ----------------------------------------------------------------------------- choosing
def _rank(seed, *parts):
    """A sort key that orders candidates pseudo-randomly by seed, identically on every machine and version."""
    return hashlib.sha256("\0".join([str(seed), *parts]).encode("utf-8", "surrogateescape")).hexdigest()


def _list_source(root):
    """{split: {class: [file names, sorted]}} of the source, with the files lib/data.py would read."""
    hint = "--root must hold train/<class>/<image> and val/<class>/<image> (ImageNet layout)"
    if not root.is_dir():
        raise FileNotFoundError(f"--root {root} does not exist; {hint}")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"{root} has no {split}/ folder; {hint}")
    listing, classes = {}, None
    for split in SPLITS:
        paths, labels, classes, _ = scan_imagefolder(root / split, classes)
        files = {name: [] for name in classes}
        for path, label in zip(paths, labels):
            files[classes[label]].append(os.path.basename(os.fsdecode(path)))
        listing[split] = files
    return listing


def _read_class_list(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--class_list {path} does not exist (a text file, one class folder name per line)")
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--class_list {path} names these classes more than once: {repeated[:5]}")
    if not names:
        raise ConfigError(f"--class_list {path} names no classes")
    return names


def choose_classes(cfg, listing):
    """The chosen class folder names, sorted (the order ImageFolder gives them labels in)."""
    train = listing["train"]
    candidates = sorted(c for c, files in train.items() if files)
    if cfg.class_list:
        names = _read_class_list(cfg.class_list)
        missing = [n for n in names if n not in train]
        if missing:
            raise ConfigError(f"--class_list names {len(missing)} class(es) that {cfg.root}/train lacks: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        empty = [n for n in names if not train[n]]
        if empty:
            raise ConfigError(f"--class_list names class(es) without train images in the source: {empty[:5]}")
        if cfg.classes and cfg.classes != len(names):
            raise ConfigError(f"--classes {cfg.classes} but --class_list names {len(names)} classes; give one of "
                              f"them, or make them agree")
        return sorted(names)
    if cfg.classes > len(candidates):
        raise ConfigError(f"--classes {cfg.classes} but {cfg.root}/train has only {len(candidates)} classes with "
                          f"images; ask for at most {len(candidates)}")
    if cfg.classes:
        return sorted(sorted(candidates, key=lambda c: _rank(cfg.seed, "class", c))[:cfg.classes])
    return candidates


def _count(cfg, n, split):
    """How many of a class's n images of `split` the subset keeps."""
    if split == "val" and cfg.val == "all":
        return n
    if cfg.per_class:
        return cfg.per_class
    if cfg.fraction:
        return min(n, max(1, int(cfg.fraction * n + 0.5))) if n else 0
    return n


def choose_files(cfg, listing, classes):
    """{split: {class: [chosen file names, sorted]}}; more images asked of a class than it holds is an error."""
    chosen = {}
    for split in SPLITS:
        chosen[split] = {}
        short = []
        for name in classes:
            files = listing[split].get(name, [])
            k = _count(cfg, len(files), split)
            if k > len(files):
                short.append(f"{name} ({len(files)})")
                continue
            ranked = sorted(files, key=lambda f: _rank(cfg.seed, split, name, f)) if k < len(files) else files
            chosen[split][name] = sorted(ranked[:k])
        if short:
            raise ConfigError(f"--per_class {cfg.per_class} but {len(short)} class(es) hold fewer {split} images: "
                              f"{', '.join(short[:5])}{' ...' if len(short) > 5 else ''}; lower --per_class"
                              + (" or use --val all" if split == "val" else ""))
    return chosen


def build_manifest(cfg, root, listing, classes, chosen):
    """What manifest.json records: the source, the request, the classes, counts and the hash of the file list."""
    files = sorted(f"{split}/{name}/{f}" for split in SPLITS for name in classes for f in chosen[split][name])
    request = {k: getattr(cfg, k) for k in ("classes", "class_list", "fraction", "per_class", "val", "seed", "link")}
    request["class_list"] = str(Path(cfg.class_list).resolve()) if cfg.class_list else ""
    return {
        "tool": "tools/make_subset.py", "source_root": str(root), "seed": cfg.seed, "request": request,
        "val_images": "all images of the chosen classes" if cfg.val == "all" else "the same fraction / per_class",
        "classes": classes,
        "counts": {split: {name: len(chosen[split][name]) for name in classes} for split in SPLITS},
        "totals": {split: sum(len(v) for v in chosen[split].values()) for split in SPLITS},
        "source_totals": {split: sum(len(v) for v in listing[split].values()) for split in SPLITS},
        "source_classes": len(listing["train"]),
        "files_sha256": hashlib.sha256("\n".join(files).encode("utf-8", "surrogateescape")).hexdigest(),
        "files_hashed": "the sorted relative paths split/class/file, one per line (utf-8); not the file contents",
    }


# ----------------------------------------------------------------------------- checking the output
def _inside(path, parent):
    return path == parent or parent in path.parents


def check_out(cfg, root, out, manifest):
    """'write' when --out can be written, 'done' when it holds this same subset; else a ConfigError."""
    if _inside(out, root) or _inside(root, out):
        raise ConfigError(f"--out {out} and --root {root} overlap; write the subset outside the source")
    if cfg.link == "hardlink":
        parent = next(p for p in [out, *out.parents] if p.exists())
        if parent.stat().st_dev != (root / "train").stat().st_dev:
            raise ConfigError(f"--link hardlink needs --out on the filesystem of --root ({root}); {parent} is on "
                              f"another one: use --link symlink or another --out")
    if not out.exists():
        return "write"
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return "write"
    old_path = out / MANIFEST
    try:
        old = json.loads(old_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"--out {out} exists and holds files but no readable {MANIFEST} of make_subset; choose "
                          f"a new --out, or remove that folder") from None
    if old.get("source_root") != manifest["source_root"] or old.get("request") != manifest["request"]:
        differ = [f"{k}: {old.get('request', {}).get(k)!r} -> {v!r}" for k, v in manifest["request"].items()
                  if old.get("request", {}).get(k) != v]
        if old.get("source_root") != manifest["source_root"]:
            differ.insert(0, f"root: {old.get('source_root')!r} -> {manifest['source_root']!r}")
        raise ConfigError(f"--out {out} holds a subset of another request ({'; '.join(differ)}); choose a new --out "
                          f"or remove that folder")
    if old.get("files_sha256") != manifest["files_sha256"]:
        raise ConfigError(f"--out {out} holds a subset of this request, but of another file list (the source changed "
                          f"since: {old.get('totals')} then, {manifest['totals']} now); remove it and run again")
    written = sum(len(files) for split in SPLITS for _, _, files in os.walk(out / split))
    if written != sum(manifest["totals"].values()):
        raise ConfigError(f"--out {out} holds {written} images, its manifest {sum(manifest['totals'].values())}: it "
                          f"was changed after writing; remove it and run again")
    return "done"


# ----------------------------------------------------------------------------- writing
def _partial_folder(out):
    partial = out.parent / f".{out.name}.partial"
    if partial.exists():
        if not (partial / PARTIAL_MARKER).is_file():
            raise ConfigError(f"{partial} exists and was not written by make_subset; remove it or choose another --out")
        shutil.rmtree(partial)  # an interrupted earlier write: links only (rmtree never follows them)
    return partial


def write_links(cfg, root, out, classes, chosen, manifest):
    """The links and the manifest into a hidden folder next to `out`, renamed to `out` when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_folder(out)
    partial.mkdir()
    (partial / PARTIAL_MARKER).write_text("")
    make_link = os.symlink if cfg.link == "symlink" else os.link
    try:
        for split in SPLITS:
            for name in classes:
                folder = partial / split / name
                folder.mkdir(parents=True)
                for f in chosen[split][name]:
                    make_link(root / split / name / f, folder / f)
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        (partial / PARTIAL_MARKER).unlink()
        os.replace(partial, out)  # onto a missing or empty folder
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"could not write the {cfg.link}s under {out} ({type(e).__name__}: {e}); nothing was "
                          f"written there" + ("; try --link symlink" if cfg.link == "hardlink" else "")) from None


def make_subset(cfg):
    """Check the request, then write the subset (or find it written); returns the manifest plus what was done."""
    cfg.validate()
    if not cfg.root or not cfg.out:
        raise ConfigError("--root (the source ImageFolder) and --out (the subset folder to write) are required")
    if not (cfg.classes or cfg.class_list or cfg.fraction or cfg.per_class):
        raise ConfigError("nothing to select: give --classes N, --class_list FILE, --fraction F or --per_class K")
    t0 = time.perf_counter()
    root, out = Path(cfg.root).resolve(), Path(cfg.out).resolve()
    listing = _list_source(root)
    classes = choose_classes(cfg, listing)
    chosen = choose_files(cfg, listing, classes)
    manifest = build_manifest(cfg, root, listing, classes, chosen)
    action = check_out(cfg, root, out, manifest)
    if action == "write":
        write_links(cfg, root, out, classes, chosen, manifest)
    return {**manifest, "out": str(out), "already_written": action == "done",
            "seconds": round(time.perf_counter() - t0, 2)}


def main(cfg):
    result = make_subset(cfg)
    keys = ("out", "source_root", "seed", "totals", "files_sha256", "already_written", "seconds")
    print(json.dumps({"classes": len(result["classes"]), **{k: result[k] for k in keys}}))
    return result


if __name__ == "__main__":  # --help, config errors and user errors as one line (lib/run.py)
    run_script(main, SubsetConfig(), __doc__)
