"""lib/data.py (+ lib/datasets.py, lib/loaders.py, lib/jpeg.py): resumed vs uninterrupted epochs, resident vs
DataLoader, GPU-style vs PIL pipeline."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import jpeg
from lib.config import ConfigError, merge
from lib.data import DataConfig, build_data, mix_seed
from tools.make_imagefolder import MakeConfig, make_imagefolder, render

# torchvision >= 0.29 (this CPU machine) deprecates torchvision.io decoders; 0.26 on the GPU machines does not
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def cfg_of(**kw):
    return merge(DataConfig(), kw)


def collect(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        assert torch.equal(xa, xb)  # bitwise


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("updates, words", [
    ({"name": "mnist"}, "data.name"),
    ({"loader": "fast"}, "data.loader"),
    ({"name": "imagefolder", "loader": "resident"}, "loader=jpeg"),
    ({"name": "digits", "loader": "jpeg"}, "imagefolder"),
    ({"resize_schedule": {0: 0}}, "resize_schedule"),
    ({"test_fraction": 1.5}, "test_fraction"),
])
def test_config_errors_say_what_to_fix(updates, words):
    with pytest.raises(ConfigError, match=words):
        cfg_of(**updates)


# ----------------------------------------------------------------------------- in-memory datasets
def test_digits_resident_shapes_and_normalization():
    data = build_data(cfg_of(name="digits", augment=False), "cpu", batch_size=64, seed=0)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, 8)
    assert data.num_train + data.num_test == 1797
    x, y, index = next(iter(data.train))
    assert x.shape == (64, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    # train batches are normalized with the train-set statistics: full pass has mean 0 / std 1
    data.train.set_epoch(0)
    xs = torch.cat([b[0] for b in data.train])
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05
    # labels and indices line up with the stored dataset
    assert torch.equal(data.train.labels[index], y)


def test_resident_resume_is_bitwise_identical():
    data = build_data(cfg_of(name="synthetic", train_samples=300, image_size=16), "cpu", batch_size=32, seed=5)
    loader = data.train
    loader.set_epoch(3)
    full = collect(loader)
    assert len(full) == 300 // 32
    loader.set_epoch(3, start_batch=4)
    assert len(loader) == len(full) - 4
    assert_same_batches(collect(loader), full[4:])
    loader.set_epoch(4)
    assert not torch.equal(collect(loader)[0][2], full[0][2])  # a new epoch reshuffles
    subset = torch.arange(0, 300, 3)
    loader.set_epoch(2, indices=subset)
    part = collect(loader)
    seen = torch.cat([b[2] for b in part])
    assert len(part) == len(subset) // 32 and set(seen.tolist()) <= set(subset.tolist())
    loader.set_epoch(2, indices=subset, start_batch=1)
    assert_same_batches(collect(loader), part[1:])


def test_rank_shards_are_disjoint_and_equal_sized():
    cfg = cfg_of(name="synthetic", train_samples=103, test_samples=21)
    shards = [build_data(cfg, "cpu", batch_size=10, seed=1, rank=r, world_size=2) for r in range(2)]
    train = [torch.cat([b[2] for b in s.train]) for s in shards]
    assert len(train[0]) == len(train[1]) == 50 and not set(train[0].tolist()) & set(train[1].tolist())
    test = [torch.cat([b[2] for b in s.test]) for s in shards]
    assert len(test[0]) == len(test[1]) == 11  # 21 padded to 22 by wrapping
    assert set(test[0].tolist()) | set(test[1].tolist()) == set(range(21))


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_path_equals_resident_path(workers):
    cfg = cfg_of(name="synthetic", train_samples=96, test_samples=40, resize_schedule={1: 24})
    resident = build_data(cfg, "cpu", batch_size=16, seed=2)
    loader = build_data(merge(cfg, {"loader": "dataloader", "workers": workers}), "cpu", batch_size=16, seed=2)
    assert type(loader.train).__name__ == "ArrayLoader"
    for epoch in (0, 1):
        for a, b in ((resident.train, loader.train), (resident.test, loader.test)):
            a.set_epoch(epoch, start_batch=1 if a.train else 0)
            b.set_epoch(epoch, start_batch=1 if b.train else 0)
            assert_same_batches(collect(a), collect(b))


def test_progressive_resizing_changes_train_resolution_only():
    data = build_data(cfg_of(name="synthetic", train_samples=64, resize_schedule={0: 16, 2: 24}), "cpu",
                      batch_size=16)
    sizes = []
    for epoch in range(4):
        data.train.set_epoch(epoch)
        sizes.append(next(iter(data.train))[0].shape[-1])
        assert data.train.resolution == sizes[-1]
    assert sizes == [16, 16, 24, 24]
    assert next(iter(data.test))[0].shape[-1] == 32 == data.image_size


def test_synthetic_is_deterministic_and_resident_size_is_checked():
    a = build_data(cfg_of(name="synthetic", augment=False), "cpu", batch_size=64, seed=0)
    b = build_data(cfg_of(name="synthetic", augment=False), "cpu", batch_size=64, seed=9)
    assert torch.equal(a.train.images, b.train.images)  # the data does not depend on the run seed
    with pytest.raises(ConfigError, match="resident_max_gb"):
        build_data(cfg_of(name="synthetic", loader="resident", resident_max_gb=1e-6), "cpu", batch_size=8)
    auto = build_data(cfg_of(name="synthetic", resident_max_gb=1e-6, workers=0), "cpu", batch_size=8)
    assert type(auto.train).__name__ == "ArrayLoader"


def test_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, x=rng.integers(0, 256, (50, 12, 12, 3), dtype=np.uint8), y=rng.integers(0, 4, 50))
    data = build_data(cfg_of(name="npz", root=str(nhwc), test_fraction=0.2), "cpu", batch_size=8)
    assert (data.in_channels, data.image_size, data.num_train, data.num_test) == (3, 12, 40, 10)
    assert data.train.images.dtype == torch.uint8
    floats = tmp_path / "split.npz"
    np.savez(floats, x_train=rng.normal(size=(20, 1, 10, 10)).astype(np.float32), y_train=np.arange(20) % 3,
             x_test=rng.normal(size=(6, 1, 10, 10)).astype(np.float32), y_test=np.arange(6) % 3)
    data = build_data(cfg_of(name="npz", root=str(floats)), "cpu", batch_size=4)
    assert data.train.images.dtype == torch.float16 and data.num_classes == 3
    x, _, _ = next(iter(data.train))
    assert x.dtype == torch.float32 and x.shape == (4, 1, 10, 10)
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((2, 4, 4)))
    with pytest.raises(ConfigError, match="x_train"):
        build_data(cfg_of(name="npz", root=str(bad)), "cpu", batch_size=2)
    with pytest.raises(FileNotFoundError, match="npz"):
        build_data(cfg_of(name="npz", root=str(tmp_path / "missing.npz")), "cpu", batch_size=2)


def _write_fake_cifar(root, hundred):
    """A few images in the real CIFAR pickle layout (flat uint8 rows, 'labels' / 'fine_labels')."""
    rng = np.random.default_rng(0)
    key = "fine_labels" if hundred else "labels"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    for name in names + ["test"] if hundred else names + ["test_batch"]:
        entry = {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), key: list(rng.integers(0, 10, 6))}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]} if hundred else \
        {"label_names": [f"c{i}" for i in range(10)]}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f)


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_reads_the_real_pickle_format(tmp_path, monkeypatch, hundred):
    import torchvision
    name = "cifar100" if hundred else "cifar10"
    cls = torchvision.datasets.CIFAR100 if hundred else torchvision.datasets.CIFAR10
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        build_data(cfg_of(name=name, root=str(tmp_path)), "cpu", batch_size=4)
    _write_fake_cifar(tmp_path, hundred)
    # our fake files have other md5 sums than the real ones; everything else is torchvision's own loading code
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    data = build_data(cfg_of(name=name, root=str(tmp_path)), "cpu", batch_size=4)
    assert (data.num_train, data.num_test) == ((6, 6) if hundred else (30, 6))
    assert (data.in_channels, data.image_size, data.num_classes) == (3, 32, 100 if hundred else 10)
    x, y, _ = next(iter(data.train))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64


# ----------------------------------------------------------------------------- JPEG pipeline
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagefolder")
    make_imagefolder(MakeConfig(out=str(root), classes=3, train_per_class=8, val_per_class=3, width=72, height=56,
                                workers=1, grayscale=1, cmyk=1, progressive=1, png=1, truncated=1, empty=1))
    (root / "train" / "n00000009").mkdir()  # an empty class folder: kept as a label, training goes on
    return root


def folder_cfg(root, loader, **kw):
    kw = {"image_size": 32, "workers": 0, "max_skipped_fraction": 0.5, **kw}
    return cfg_of(name="imagefolder", root=str(root), loader=loader, **kw)


def test_sniff_classifies_awkward_files(folder):
    special = json.loads((folder / "manifest.json").read_text())["special"]
    expect = {"grayscale": "grayscale", "cmyk": "cmyk", "progressive": "progressive", "png": "not_jpeg",
              "truncated": "truncated", "empty": "not_jpeg"}
    for kind, reason in expect.items():
        assert jpeg.sniff_jpeg((folder / special[kind][0]).read_bytes())[0] == reason
    plain = (folder / "train" / "n00000002" / "n00000002_5.JPEG").read_bytes()
    assert jpeg.sniff_jpeg(plain) == ("baseline", 56, 72)


def test_resized_crop_batch_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF
    g = torch.Generator().manual_seed(0)
    shapes = [(375, 500), (500, 333), (40, 60), (224, 224)]
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in shapes]
    boxes = torch.tensor([[10, 20, 300, 400], [0, 0, 500, 333], [5, 7, 20, 30], [50, 60, 100, 90]])
    flips = torch.tensor([True, False, True, False])
    for size in (64, 112):
        out = jpeg.resized_crop_batch(images, boxes, flips, size)
        for k, img in enumerate(images):
            ref = TF.resized_crop(img.double(), *boxes[k].tolist(), [size, size], antialias=True)
            ref = ref.flip(-1) if flips[k] else ref
            assert (out[k].double() - ref).abs().max() < 1e-2


def test_jpeg_path_matches_pil_path_and_counts_fallbacks(folder, capsys):
    gpu_style = build_data(folder_cfg(folder, "jpeg"), "cpu", batch_size=6, seed=3)  # nvJPEG's path, CPU decode
    pil = build_data(folder_cfg(folder, "dataloader"), "cpu", batch_size=6, seed=3)
    assert gpu_style.num_classes == 4 and "empty class folders" in capsys.readouterr().out
    for a, b in ((gpu_style.train, pil.train), (gpu_style.test, pil.test)):
        a.set_epoch(1)
        b.set_epoch(1)
        batches_a, batches_b = collect(a), collect(b)
        assert len(batches_a) == len(batches_b) == len(a) > 0
        for (xa, ya, ia), (xb, yb, ib) in zip(batches_a, batches_b):
            assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
            assert xa.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(ya, yb) and torch.equal(ia, ib)
            # same crops, same filter: only decoder / uint8 rounding differences (1/255 = 0.017 after /std)
            assert (xa - xb).abs().mean() < 0.02 and (xa - xb).abs().max() < 0.3
        xs = torch.cat([b[0] for b in batches_a])
        assert -2.2 < xs.min() and xs.max() < 2.7  # ImageNet mean/std normalization
    # the four awkward-but-readable files were decoded by PIL (counted); truncated and empty ones skipped
    assert gpu_style.train.fallback == {"grayscale": 1, "cmyk": 1, "progressive": 1, "not_jpeg": 1}
    assert gpu_style.train.skipped == pil.train.skipped == 2
    special = json.loads((folder / "manifest.json").read_text())["special"]
    unreadable = sorted(str(folder / p) for p in special["truncated"] + special["empty"])
    assert sorted(gpu_style.train.skipped_files) == sorted(pil.train.skipped_files) == unreadable
    assert unreadable[0] in gpu_style.train.skip_report()


def test_cpu_decode_fraction_moves_files_to_the_workers(folder):
    shared = build_data(folder_cfg(folder, "jpeg", cpu_decode_fraction=0.5), "cpu", batch_size=6, seed=3)
    plain = build_data(folder_cfg(folder, "jpeg"), "cpu", batch_size=6, seed=3)
    a, b = collect(shared.train), collect(plain.train)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(ya, yb)
        assert (xa - xb).abs().mean() < 0.02  # same crops; PIL vs torch resize rounding only
    baseline_files = sum(len(x) for x, _, _ in b) - sum(plain.train.fallback.values())
    assert 0.3 * baseline_files <= shared.train.fallback["cpu_share"] <= 0.7 * baseline_files


def test_jpeg_resume_and_workers_are_bitwise_identical(folder):
    single = build_data(folder_cfg(folder, "jpeg", resize_schedule={2: 24}), "cpu", batch_size=4, seed=1)
    workers = build_data(folder_cfg(folder, "jpeg", resize_schedule={2: 24}, workers=2), "cpu", batch_size=4,
                         seed=1)
    single.train.set_epoch(2)
    full = collect(single.train)
    assert full[0][0].shape[-1] == 24
    workers.train.set_epoch(2, start_batch=3)
    assert_same_batches(collect(workers.train), full[3:])
    next(iter(workers.train))  # an abandoned iteration stops its thread; the next one starts clean
    workers.train.set_epoch(2)
    assert_same_batches(collect(workers.train), full)


def test_missing_folders_say_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_imagefolder"):
        build_data(folder_cfg(tmp_path / "nope", "dataloader"), "cpu", batch_size=4)
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="val/"):
        build_data(folder_cfg(tmp_path, "dataloader"), "cpu", batch_size=4)


def test_crop_params_are_a_function_of_seed_epoch_index():
    a = jpeg.crop_params(375, 500, True, 0, 3, 17)
    assert a == jpeg.crop_params(375, 500, True, 0, 3, 17) and a != jpeg.crop_params(375, 500, True, 0, 4, 17)
    top, left, h, w, _ = a
    assert 0 <= top <= 375 - h and 0 <= left <= 500 - w and 0.08 * 375 * 500 * 0.9 <= h * w
    assert jpeg.crop_params(375, 500, False, 0, 0, 0) == (23, 86, 328, 328, False)  # 0.875 * 375 = 328
    assert mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)


def test_synthetic_jpegs_are_imagenet_like():
    import io
    sizes = []
    for i in range(4):
        img = render(MakeConfig(), i, (0, i, i))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        sizes.append(len(buf.getvalue()))
        assert 300 <= img.width <= 500 and 300 <= img.height <= 500
    assert 60e3 < np.mean(sizes) < 200e3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG decode needs a CUDA GPU; the CPU tests above "
                    "run the same crop/resize code with a CPU decoder")
@pytest.mark.parametrize("subsampling, tolerance", [(0, 1.5), (-1, 8.0)])
def test_gpu_jpeg_path_matches_cpu_path(tmp_path, subsampling, tolerance):
    """nvJPEG + fp16 matmul resize vs libjpeg-turbo + fp32 (and vs PIL): same samples, same crops, same shape.

    With 4:4:4 files the decoders agree to rounding; with 4:2:0 they upsample chroma differently (libjpeg-turbo
    interpolates, nvJPEG does not), which on this noisy synthetic texture moves pixels by several levels.
    """
    make_imagefolder(MakeConfig(out=str(tmp_path), classes=3, train_per_class=6, val_per_class=2, width=72,
                                height=56, workers=1, subsampling=subsampling, grayscale=1, cmyk=1, truncated=1))
    gpu = build_data(folder_cfg(tmp_path, "jpeg"), "cuda", batch_size=6, seed=3)
    cpu = build_data(folder_cfg(tmp_path, "jpeg"), "cpu", batch_size=6, seed=3)
    pil = build_data(folder_cfg(tmp_path, "dataloader"), "cpu", batch_size=6, seed=3)
    std255 = torch.tensor(jpeg.IMAGENET_STD).view(1, 3, 1, 1) * 255
    for a, b, c in ((gpu.train, cpu.train, pil.train), (gpu.test, cpu.test, pil.test)):
        for (xa, ya, ia), (xb, yb, ib), (xc, _, _) in zip(collect(a), collect(b), collect(c)):
            assert xa.is_cuda and xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
            assert xa.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(ya.cpu(), yb) and torch.equal(ia.cpu(), ib)
            assert ((xa.cpu() - xb).abs() * std255).mean() < tolerance  # mean difference in 0..255 levels
            assert ((xa.cpu() - xc).abs() * std255).mean() < tolerance
    assert gpu.train.fallback == cpu.train.fallback == {"grayscale": 1, "cmyk": 1}
    assert gpu.train.skipped == cpu.train.skipped == 1


def test_rank_shards_rebuild_the_single_process_global_batches():
    """Interleaved shards: the union of the ranks' batch b is the single-process batch b of the global size."""
    from lib.data import DataConfig, build_data
    cfg = DataConfig(name="synthetic", image_size=8, train_samples=96, test_samples=16, loader="resident",
                     augment=False)
    single = build_data(cfg, "cpu", batch_size=24, seed=3)
    single.train.set_epoch(2)
    want = [idx.tolist() for _, _, idx in single.train]
    shards = []
    for rank in range(3):
        data = build_data(cfg, "cpu", batch_size=8, seed=3, rank=rank, world_size=3)
        data.train.set_epoch(2)
        shards.append([idx.tolist() for _, _, idx in data.train])
    for b, batch in enumerate(want):
        assert sorted(sum((s[b] for s in shards), [])) == sorted(batch)


@pytest.mark.parametrize("preset, expected", [(None, "32"), ("4", "4")])
def test_importing_data_sets_cuda_connections_unless_the_user_did(preset, expected):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if preset is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = preset
    code = "import os, lib.data; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == expected
