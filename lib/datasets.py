"""Datasets: synthetic, scikit-learn digits, CIFAR-10/100 and .npz arrays as (N, C, H, W) uint8 (or float16)
tensors with int64 labels, and ImageFolder listings (relative paths + labels). lib/data.py's build_data wraps
them in the loaders of lib/loaders.py.
"""
import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lib.config import ConfigError
from lib.dist import barrier

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SYNTHETIC_DEFAULT_SIZE = 32     # px, when data.image_size = 0
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: .npz images other than uint8 are stored as float16
NPZ_LAYOUTS = (("x_train", "y_train", "x_test", "y_test"), ("x", "y"))


def mix_seed(*parts):
    """One 63-bit seed from several integers (seed, epoch, ...), stable across platforms and processes."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- in-memory datasets
def _synthetic(cfg, device=None):
    """Deterministic images whose class is a smooth color pattern plus noise: learnable, independent of run seed.

    With a CUDA `device` they are drawn there, in blocks (ImageNet-sized sets in seconds, not minutes on the CPU);
    the numbers then differ from the CPU's, as the two generators do.
    """
    size = cfg.image_size or SYNTHETIC_DEFAULT_SIZE
    on = torch.device(device) if device is not None and torch.device(device).type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=on).manual_seed(mix_seed(1234, cfg.num_classes, size))
    protos = torch.rand(cfg.num_classes, 3, 4, 4, generator=g, device=on) * 2 - 1
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False)  # (K, 3, S, S)
    block = 1024 if on.type == "cuda" else None  # CPU: one block, the sequence the CPU data always had

    def make(n):
        labels = torch.randperm(n, generator=g, device=on) % cfg.num_classes
        out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=on)
        for start in range(0, n, block or max(n, 1)):
            y = labels[start:start + (block or n)]
            coarse = torch.randn(len(y), 3, 8, 8, generator=g, device=on)
            x = 128 + 60 * protos[y] + 25 * F.interpolate(coarse, size=(size, size), mode="bilinear",
                                                           align_corners=False)
            x = x + 10 * torch.randn(len(y), 3, size, size, generator=g, device=on)
            out[start:start + len(y)] = x.round().clamp(0, 255).to(torch.uint8)
        return out, labels

    x_train, y_train = make(cfg.train_samples)
    x_test, y_test = make(cfg.test_samples)
    return x_train, y_train, x_test, y_test, cfg.num_classes


def _split(x, y, fraction, seed):
    """Deterministic held-out split: a permutation seeded by `seed`, the last `fraction` is the test set."""
    g = torch.Generator().manual_seed(mix_seed(seed, 7))
    perm = torch.randperm(len(y), generator=g)
    n_test = max(1, int(round(len(y) * fraction)))
    return x[perm[n_test:]], y[perm[n_test:]], x[perm[:n_test]], y[perm[:n_test]]


def _digits(cfg, seed):
    """scikit-learn's 8x8 digits (1797 images, shipped with the package): 0..16 scaled to uint8 0..255."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    return (*_split(x, y, cfg.test_fraction, seed), 10)


def _cifar(cfg, rank, world_size):
    """CIFAR-10/100 through torchvision; downloads only with data.download=true (rank 0 first under DDP)."""
    import torchvision
    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python"
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def load(train, download):
        try:
            return cls(root=cfg.root, train=train, download=download)
        except RuntimeError as e:
            raise FileNotFoundError(
                f"{cfg.name} not found (or damaged) under {os.path.join(cfg.root, folder)} ({e}). Set "
                f"data.download=true to download it, or set data.root to the folder that holds {folder}/"
            ) from None
        except OSError as e:  # no network, no permission
            raise FileNotFoundError(f"could not download {cfg.name} into {cfg.root}: {e}. Download it on a "
                                    f"machine with internet and copy {folder}/ into data.root") from None

    if cfg.download and distributed:  # one rank downloads, the others wait and then read
        if rank == 0:
            load(True, True)
        barrier()
    download = cfg.download and not distributed
    sets = [load(True, download), load(False, False)]
    out = []
    for s in sets:
        out.append(torch.from_numpy(np.ascontiguousarray(s.data.transpose(0, 3, 1, 2))))  # (N, H, W, C) -> NCHW
        out.append(torch.as_tensor(s.targets, dtype=torch.int64))
    return (*out, len(sets[0].classes))


def _to_nchw(x, key, path):
    """Arrays as (N, C, H, W): accepts (N, H, W), (N, H, W, C) and (N, C, H, W) with C in 1, 3, 4."""
    if x.dtype.kind not in "buif":
        raise ConfigError(f"{path}: {key} has dtype {x.dtype}; expected numbers: uint8 pixels 0..255, or integers / "
                          f"floats (stored as float16, so within +-{FLOAT16_MAX:g})")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise ConfigError(f"{path}: {key} has shape {x.shape}; expected (N, H, W), (N, H, W, C) or "
                              f"(N, C, H, W) with C in 1, 3 or 4")
    else:
        raise ConfigError(f"{path}: {key} has shape {x.shape}; expected images (N, H, W[, C])")
    if x.size == 0:
        raise ConfigError(f"{path}: {key} holds no images (shape {x.shape})")
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(x))
    lo, hi = x.min(), x.max()  # NaN propagates into both
    if np.issubdtype(x.dtype, np.integer) and lo >= 0 and hi <= 255:
        return torch.from_numpy(np.ascontiguousarray(x.astype(np.uint8)))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ConfigError(f"{path}: {key} holds {np.count_nonzero(~np.isfinite(x))} non-finite value(s) (NaN or inf); "
                          f"expected finite pixel values")
    if max(-float(lo), float(hi)) > FLOAT16_MAX:
        raise ConfigError(f"{path}: {key} holds values in [{lo:g}, {hi:g}]; images other than uint8 are stored as "
                          f"float16, which ends at +-{FLOAT16_MAX:g}: rescale them (e.g. to 0..1) or store uint8")
    return torch.from_numpy(np.ascontiguousarray(x.astype(np.float16)))  # floats kept in their own units


def _labels(y, key, path):
    """Class indices as int64 (N,): integers, or floats that are whole numbers; anything else is a clear error."""
    if y.dtype.kind == "f":
        whole = np.isfinite(y) & (y == np.round(y))
        if not whole.all():
            i = int(np.argmin(whole.reshape(-1)))
            raise ConfigError(f"{path}: {key} holds labels that are not whole numbers (e.g. {float(y.flat[i]):g} at "
                              f"index {i}); labels are class indices 0, 1, ...: store integers")
    elif y.dtype.kind in "US":
        raise ConfigError(f"{path}: {key} has dtype {y.dtype}; expected integer class indices 0, 1, ..., not class "
                          f"names: store np.unique(names, return_inverse=True)[1]")
    elif y.dtype.kind not in "biu":
        raise ConfigError(f"{path}: {key} has dtype {y.dtype}; expected integer class indices 0, 1, ...")
    if y.ndim > 1 and y.size != len(y):
        raise ConfigError(f"{path}: {key} has shape {y.shape}; expected one class index per sample (N,); for "
                          f"one-hot labels store their argmax(1)")
    return y.reshape(-1).astype(np.int64)


def _load_npz(path):
    """The arrays of the first layout of NPZ_LAYOUTS that the .npz at `path` holds; clear errors for other files."""
    hint = "write one with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) (or x=..., y=...)"
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError:  # neither zip nor .npy magic: numpy took it for a pickle, which is never loaded here
        raise ConfigError(f"data.root={path} is not an .npz file (it starts neither as a zip archive nor as a .npy "
                          f"array); {hint}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ConfigError(f"data.root={path} is not an .npz file ({type(e).__name__}: {e}); {hint}") from None
    if isinstance(npz, np.ndarray):
        raise ConfigError(f"data.root={path} is a .npy file (one array of shape {npz.shape}), not an .npz; {hint}")
    with npz:
        keys = next((layout for layout in NPZ_LAYOUTS if set(layout) <= set(npz.files)), None)
        if keys is None:
            raise ConfigError(f"{path} holds {sorted(npz.files)}; expected x_train, y_train, x_test, y_test (or x, y)")
        arrays = {}
        for key in keys:  # other arrays in the file are not read
            try:
                arrays[key] = npz[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise ConfigError(f"{path}: {key} holds Python objects (an object array), which are not loaded "
                                      f"(that would unpickle them); store numbers: images uint8 or float, labels "
                                      f"integers") from None
                raise ConfigError(f"{path}: {key} cannot be read, the file is damaged ({e}); write it again") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ConfigError(f"{path}: {key} cannot be read, the file is damaged ({type(e).__name__}: {e}); "
                                  f"write it again") from None
    return arrays


def _npz(cfg, seed):
    """Arrays from an .npz: x_train, y_train, x_test, y_test, or x, y split by data.test_fraction."""
    path = Path(cfg.root)
    if not path.is_file():
        raise FileNotFoundError(f"data.root={path} is not an .npz file; set data.root to a file holding "
                                f"x_train, y_train, x_test, y_test (or x, y)")
    arrays = _load_npz(path)
    if "x_train" in arrays:
        parts = [_to_nchw(arrays["x_train"], "x_train", path), _labels(arrays["y_train"], "y_train", path),
                 _to_nchw(arrays["x_test"], "x_test", path), _labels(arrays["y_test"], "y_test", path)]
    else:
        x, y = _to_nchw(arrays["x"], "x", path), _labels(arrays["y"], "y", path)
        if len(x) != len(y):
            raise ConfigError(f"{path}: x has {len(x)} samples but y has {len(y)}")
        parts = list(_split(x, torch.from_numpy(y), cfg.test_fraction, seed))
    x_train, y_train, x_test, y_test = (torch.as_tensor(p) for p in parts)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ConfigError(f"{path}: images and labels differ in length (train {len(x_train)} vs {len(y_train)}, "
                          f"test {len(x_test)} vs {len(y_test)})")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ConfigError(f"{path}: train images {tuple(x_train.shape[1:])} and test images "
                          f"{tuple(x_test.shape[1:])} differ in shape")
    if min(int(y_train.min()), int(y_test.min())) < 0:
        raise ConfigError(f"{path}: labels must be class indices >= 0")
    return x_train, y_train, x_test, y_test, int(max(y_train.max(), y_test.max())) + 1


def channel_stats(x):
    """Per-channel mean and std of (N, C, H, W) data in its stored units, computed in float64 chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(4096):
        c = chunk.to(torch.float64)
        total += c.sum((0, 2, 3))
        total_sq += (c * c).sum((0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp(min=1e-12).sqrt()
    return mean.cpu(), std.cpu()


# ----------------------------------------------------------------------------- long-tailed training sets
def long_tail_indices(labels, num_classes, ratio, seed):
    """The training samples a long-tailed subset keeps (sorted indices) and the per-class counts (source, kept).

    The exponential profile of CIFAR-LT (Cui et al., CVPR 2019, "Class-Balanced Loss Based on Effective Number of
    Samples"): class c, in label order, keeps floor(n_0 * ratio^(-c / (C - 1))) samples, where n_0 is class 0's
    count: the first class keeps all of them, the last 1/ratio of them; a class holding fewer than its share keeps
    all it has. Which samples: a random draw per class, a function of `seed` only.
    """
    labels = torch.as_tensor(labels).cpu().long()
    source = torch.bincount(labels, minlength=num_classes).tolist()
    if num_classes < 2:
        raise ConfigError(f"data.long_tail_ratio={ratio:g} needs at least 2 classes; the training set has "
                          f"{num_classes}")
    if source[0] == 0:
        raise ConfigError(f"data.long_tail_ratio={ratio:g}: class 0 has no training samples, so the profile (class 0 "
                          f"keeps all its samples, the others fewer) keeps nothing; check the data")
    kept = []
    for c, available in enumerate(source):
        share = math.floor(source[0] * ratio ** (-c / (num_classes - 1)) + 1e-9)  # 1e-9: 100 * 100^-1 is 1, not 0.99..
        if min(share, available) < 1:
            why = "has no training samples" if available == 0 else \
                f"would keep floor({source[0]} x {ratio:g}^(-{c}/{num_classes - 1})) = 0 samples"
            raise ConfigError(f"data.long_tail_ratio={ratio:g} leaves class {c} without samples: it {why}. The last "
                              f"class keeps class 0's {source[0]} samples / ratio: use a ratio <= {source[0]}")
        kept.append(min(share, available))
    g = torch.Generator().manual_seed(mix_seed(seed, 1019))
    picked = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    picked = [members[torch.randperm(len(members), generator=g)[:k]] for members, k in zip(picked, kept)]
    return torch.sort(torch.cat(picked)).values, source, kept


# ----------------------------------------------------------------------------- image folders
def scan_imagefolder(split_dir, classes=None):
    """List split_dir/<class>/<image>: (relative paths as a bytes array, labels, classes, empty class folders)."""
    split_dir = Path(split_dir)
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise FileNotFoundError(f"{split_dir} has class folders that train/ lacks: {unknown[:5]}; both splits "
                                    f"need the same class folder names")
    paths, labels, empty = [], [], []
    for label, name in enumerate(classes):
        folder = split_dir / name
        files = sorted(e.name for e in os.scandir(folder) if e.is_file()
                       and e.name.lower().endswith(IMAGE_EXTENSIONS)) if folder.is_dir() else []
        if not files:
            empty.append(name)
        paths.extend(os.fsencode(os.path.join(name, f)) for f in files)
        labels.extend([label] * len(files))
    # bytes in one numpy buffer: forked workers share it without touching per-string refcounts
    return np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64), list(classes), empty
