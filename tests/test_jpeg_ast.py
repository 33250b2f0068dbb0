"""Issue 16 on CPU: the reduced-resolution decode, selective decoding in batch mode (the same samples and crops as the
plain loader), the pre-resized image cache (round trip, kill -9 resume, corruption, a changed folder), and the awkward
files in every new path."""
import io
import json
import multiprocessing
import os
import signal
import time
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import train_ast
from lib import dist, folderloader, imagecache, jpeg
from lib.config import merge
from lib.data import DataConfig, SelectiveBatch, build_data
from lib.datasets import scan_imagefolder
from lib.imagecache import CacheError, open_or_build, psnr, stored_size
from tools.make_imagefolder import MakeConfig, make_imagefolder, render

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 8 tiny JPEGs, one of each awkward kind (grayscale, CMYK, progressive, PNG, truncated, empty)."""
    root = tmp_path_factory.mktemp("awkward")
    make_imagefolder(MakeConfig(out=str(root), classes=3, train_per_class=8, val_per_class=2, width=72, height=56,
                                workers=1, grayscale=1, cmyk=1, progressive=1, png=1, truncated=1, empty=1))
    return root


def data_cfg(root, loader="jpeg", **kw):
    return merge(DataConfig(), {"name": "imagefolder", "root": str(root), "loader": loader, "image_size": 32,
                                "workers": 0, "max_skipped_fraction": 0.5, "cache_workers": 0, **kw})


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def unreadable(root):
    special = json.loads((root / "manifest.json").read_text())["special"]
    return sorted(str(root / p) for p in special["truncated"] + special["empty"])


# ----------------------------------------------------------------------------- reduced-resolution decode
@pytest.mark.parametrize("subsampling, floor_db", [(0, {2: 44, 4: 44, 8: 44}), (-1, {2: 28, 4: 35, 8: 42})])
def test_reduced_resolution_decode_matches_a_full_decode_resized(subsampling, floor_db):
    """DCT-scaled decodes vs the full decode resized to the same size with a box filter (what DCT scaling averages):
    4:4:4 files agree within 1 level (>= 44 dB); 4:2:0 ones differ by the full decoder's chroma upsampling, least
    at 1/8. The scoring image the model sees (crop + antialiased resize) is within 2 levels (>= 38 dB) either way."""
    for i in range(2):
        buf = io.BytesIO()
        render(MakeConfig(width=256, height=192), i, (0, i, i)).save(buf, format="JPEG", quality=90,
                                                                       subsampling=subsampling)
        data = buf.getvalue()
        full = jpeg.pil_open_rgb(data)
        for scale, floor in floor_db.items():
            img = Image.open(io.BytesIO(data))
            img.draft("RGB", (256 // scale, 192 // scale))
            img.load()
            assert img.size == (256 // scale, 192 // scale)
            assert psnr(np.asarray(img), np.asarray(full.resize(img.size, Image.BOX))) >= floor
        for size in (16, 32):
            box = jpeg.crop_params(192, 256, True, 0, 1, i)
            reduced, scale = jpeg.pil_draft_open(data, 192, 256, box[:4], size)
            assert scale > 1 and min(box[2], box[3]) / scale >= size  # reduced, yet the crop keeps >= size px
            a = jpeg.pil_scoring_image(reduced, box[:4], box[4], size, scale)
            b = jpeg.pil_scoring_image(full, box[:4], box[4], size)
            assert a.shape == (size, size, 3) and psnr(a, b) >= 38
            assert np.abs(a.astype(int) - b).mean() <= 2.0


# ----------------------------------------------------------------------------- selective decoding
@pytest.mark.parametrize("score_px, share", [(16, 1.0), (16, 0.5), (0, 1.0)])
def test_selective_batches_give_the_plain_loaders_samples_and_crops(folder, score_px, share):
    plain = build_data(data_cfg(folder), "cpu", batch_size=8, seed=3).train
    lazy = build_data(data_cfg(folder, score_cpu_share=share), "cpu", batch_size=8, seed=3).train
    assert lazy.decode_for_selection(score_px)
    for epoch in (0, 1):
        for (x, y, idx), (b, yb, ib) in zip(batches(plain, epoch), batches(lazy, epoch)):
            assert isinstance(b, SelectiveBatch) and len(b) == len(y) and b.resolution == 32
            assert torch.equal(y, yb) and torch.equal(idx, ib)
            picked = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch))[:5]
            torch.testing.assert_close(b.full(picked), x[picked], rtol=0, atol=1e-5)  # same decoder, same crop
            if score_px == 0:
                assert b.scoring is None  # the random control scores nothing
                continue
            assert b.scoring.shape == (len(y), 3, score_px, score_px)
            # the scoring image is the training crop made small: from the workers' reduced decode (PIL filter,
            # uint8) or, for the GPU share, the same crop downscaled (the same antialiased filter, no rounding)
            small = F.interpolate(x, size=score_px, mode="bilinear", align_corners=False, antialias=True)
            assert (b.scoring - small).abs().mean() < 0.1
            now = b.batch["gpu_pos"][b.batch["now"]]
            assert (len(now) > 0) == (share < 1)
            torch.testing.assert_close(b.scoring[now], small[now], rtol=0, atol=1e-4)
    # the awkward files: decoded by PIL and counted, or skipped and listed, as the plain loader does
    assert lazy.fallback == plain.fallback == {"grayscale": 2, "cmyk": 2, "progressive": 2, "not_jpeg": 2}
    assert sorted(lazy.skipped_files) == sorted(plain.skipped_files) == unreadable(folder)


@pytest.mark.parametrize("chunk, first_chunk, sizes", [(3, 32, [3, 3, 2, 3, 3, 2]),  # a large batch
                                                       (256, 2, [4, 4, 8])])  # the first batch over both workers
def test_chunked_reads_give_the_same_batches(folder, monkeypatch, chunk, first_chunk, sizes):
    """A batch read as several worker tasks (a large batch; every iteration's first batch) equals one read whole."""
    whole = build_data(data_cfg(folder), "cpu", batch_size=8, seed=5).train
    monkeypatch.setattr(folderloader, "CHUNK", chunk)
    monkeypatch.setattr(folderloader, "FIRST_CHUNK", first_chunk)
    chunked = build_data(data_cfg(folder, workers=2), "cpu", batch_size=8, seed=5).train
    assert [len(s[3]) for s in chunked._specs()][:len(sizes)] == sizes
    for epoch in (1, 2):
        for (xa, ya, ia), (xb, yb, ib) in zip(batches(whole, epoch), batches(chunked, epoch), strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.equal(xa, xb)
    assert chunked.stats["epochs"] == 2 and chunked.stats["epoch_start_s"] > 0


def ast_run(root, tmp_path, name, ast, data=None, epochs=2):
    cfg = merge(train_ast.Config(), {
        "run": {"name": name, "out_dir": str(tmp_path), "epochs": epochs, "resume": "none", "device": "cpu"},
        "data": {**data_cfg(root).__dict__, **(data or {})},
        "model": {"name": "small_cnn", "width": 4}, "loop": {"global_batch": 4, "precision": "fp32"},
        "optim": {"lr": 0.05},
        "ast": {"score_batch": 8, "round_to": 2, "warmup_epochs": 1, "final_full_fraction": 0.0,
                "controller": {"target_rate": 0.5}, **ast}})
    return train_ast.train(cfg, dist.setup(0, "cpu"), tmp_path / name)


def final_weights(run_dir):
    from lib import checkpoint
    newest = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    return checkpoint.load(newest, map_location="cpu")["model"]


def test_random_control_decodes_only_what_it_trains_with_the_same_result(folder, tmp_path):
    """The random control with selective decoding (nothing scored, only the selected decoded) trains exactly what
    the plain loader's run trains: the same subsets, the same weights."""
    plain = ast_run(folder, tmp_path, "plain", {"mode": "random"}, {"selective_decode": "never"})
    lazy = ast_run(folder, tmp_path, "lazy", {"mode": "random"})
    assert plain["counts"] == lazy["counts"] and lazy["score_forward_samples"] == 0
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "lazy")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_batch_mode_trains_the_plain_loaders_crops_of_the_samples_it_selects(folder, tmp_path, monkeypatch):
    """Batch mode scoring at 16 px: every trained image is the crop the plain loader makes for that sample and
    epoch (the selection itself follows scores of the low-resolution images)."""
    trained = []
    real = train_ast.select_batch

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        trained.append((args[-1]["epoch"], isinstance(args[3], SelectiveBatch), out[0].clone(), out[2].clone()))
        return out
    monkeypatch.setattr(train_ast, "select_batch", recording)
    ast_run(folder, tmp_path, "batch", {"mode": "batch", "score_resolution": 16}, epochs=3)
    assert trained and all(lazy for _, lazy, _, _ in trained)  # epochs 1 and 2 (epoch 0: warm-up on all data)
    plain = build_data(data_cfg(folder), "cpu", batch_size=8, seed=0).train
    for epoch in (1, 2):
        crops = {int(i): x[k] for x, _, idx in batches(plain, epoch) for k, i in enumerate(idx)}
        steps = [(x, idx) for e, _, x, idx in trained if e == epoch]
        assert len(steps) == 3 and sum(len(idx) for _, idx in steps) == 12
        for x, idx in steps:
            torch.testing.assert_close(x, torch.stack([crops[int(i)] for i in idx]), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the image cache
def build(root, cache_dir, split="train", **kw):
    paths, _, _, _ = scan_imagefolder(root / split)
    return open_or_build(root / split, paths, cache_dir, **{"side": 48, "log": lambda msg: None, **kw})


def test_cache_round_trips_the_folder(folder, tmp_path):
    """Re-encoded images (JPEG quality 90, 4:2:0) within 22 dB PSNR of the source decoded and resized the same way
    (these tiny grain-heavy images give about 24 dB; ImageNet-sized ones about 30: bench/ast_jpeg.py); small baseline
    JPEGs stored byte for byte; awkward files converted once (counted), unreadable ones recorded and skipped."""
    cache, report = build(folder, tmp_path / "c48")
    paths, _, _, _ = scan_imagefolder(folder / "train")
    assert report["unreadable"] == 2 and report["converted"] == {"grayscale": 1, "cmyk": 1, "progressive": 1,
                                                                  "not_jpeg": 1}
    for i, rel in enumerate(paths):
        source = (folder / "train" / os.fsdecode(rel)).read_bytes()
        if cache.length[i] < 0:
            with pytest.raises(OSError, match="unreadable when the cache was built"):
                cache.read(i)
            continue
        stored = cache.read(i)
        assert jpeg.sniff_jpeg(stored)[0] == "baseline"  # everything goes to nvJPEG's batched path
        ref = jpeg.pil_open_rgb(source)
        ref = ref.resize(stored_size(*ref.size, 48), Image.BILINEAR)
        assert psnr(np.asarray(ref), np.asarray(jpeg.pil_open_rgb(stored))) >= 22
    unchanged, _ = build(folder, tmp_path / "c256", side=256)  # 72x56 files: smaller than the cap
    for i, rel in enumerate(paths):
        source = (folder / "train" / os.fsdecode(rel)).read_bytes()
        if jpeg.sniff_jpeg(source)[0] == "baseline":
            assert unchanged.read(i) == source


def test_cache_loader_gives_the_jpeg_loaders_batches(folder, tmp_path):
    cache = build_data(data_cfg(folder, "cache", cache_dir=str(tmp_path / "c"), cache_side=48), "cpu", batch_size=8,
                       seed=3)
    files = build_data(data_cfg(folder), "cpu", batch_size=8, seed=3)
    for a, b in ((cache.train, files.train), (cache.test, files.test)):
        for (xa, ya, ia), (xb, yb, ib) in zip(batches(a, 1), batches(b, 1), strict=True):
            assert torch.equal(ia, ib) and torch.equal(ya, yb) and xa.shape == xb.shape
            assert (xa - xb).abs().mean() < 0.25  # the same crop places, one more resampling
    assert cache.train.fallback == {}  # converted when the cache was built: all baseline now
    assert sorted(cache.train.skipped_files) == sorted(files.train.skipped_files) == unreadable(folder)


def killed_build(root, cache_dir):
    """Build a cache of 5-image shards and kill -9 this process right after the second shard is durable."""
    written = []

    def log(msg):
        written.append(msg)
        if sum("written" in m for m in written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    build(root, cache_dir, shard_images=5, log=log)


def test_cache_build_resumes_after_kill_9_and_rebuilds_a_corrupted_shard(folder, tmp_path):
    cache_dir = tmp_path / "killed"
    child = multiprocessing.get_context("fork").Process(target=killed_build, args=(folder, cache_dir))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert len(list((cache_dir / "markers").glob("*.json"))) == 2 and not (cache_dir / "index.npz").exists()
    # what a crash inside the next write leaves: a shard without its marker, a temp file of a dead process
    (cache_dir / "shards" / "shard-000002.bin").write_bytes(b"half a shard")
    (cache_dir / "shards" / ".shard-000003.bin.tmp.999999999").write_bytes(b"junk")
    resumed, report = build(folder, cache_dir, shard_images=5)
    assert report["shards_built"] == 3 and report["corrupt_rebuilt"] == 0  # shards 2, 3, 4 of 5
    assert not list((cache_dir / "shards").glob(".*.tmp.*"))
    whole, _ = build(folder, tmp_path / "whole", shard_images=5)
    for name in ("shard", "offset", "length", "height", "width"):
        assert np.array_equal(getattr(resumed, name), getattr(whole, name))
    assert all(resumed.read(i) == whole.read(i) for i in range(len(whole)) if whole.length[i] >= 0)
    # a damaged shard fails its checksum when the cache is opened, and is built again from the folder
    shard = cache_dir / "shards" / "shard-000001.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    messages = []
    paths, _, _, _ = scan_imagefolder(folder / "train")
    _, report = open_or_build(folder / "train", paths, cache_dir, side=48, shard_images=5, log=messages.append)
    assert report["corrupt_rebuilt"] == 1 and any("fails its checksum" in m for m in messages)
    assert shard.read_bytes() == (tmp_path / "whole" / "shards" / "shard-000001.bin").read_bytes()


def test_cache_refuses_a_changed_folder_and_other_settings(folder, tmp_path):
    copy = tmp_path / "copy"
    make_imagefolder(MakeConfig(out=str(copy), classes=2, train_per_class=3, val_per_class=1, width=40, height=32,
                                workers=1))
    cache_dir = tmp_path / "cache"
    build_data(data_cfg(copy, "cache", cache_dir=str(cache_dir), cache_side=48), "cpu", batch_size=2)
    with pytest.raises(CacheError, match="side: 48 -> 64"):
        build(copy, cache_dir / "train", side=64)
    target = copy / "train" / "n00000001" / "n00000001_2.JPEG"
    os.utime(target, ns=(0, 10 ** 9))  # touched: same bytes, other mtime
    with pytest.raises(CacheError, match=r"changed since.*1 changed.*n00000001_2.JPEG"):
        build(copy, cache_dir / "train")
    with pytest.raises(CacheError, match="changed since"):  # through build_data: one clear line for the user
        build_data(data_cfg(copy, "cache", cache_dir=str(cache_dir), cache_side=48), "cpu", batch_size=2)
    (copy / "train" / "n00000000" / "extra.JPEG").write_bytes(target.read_bytes())
    with pytest.raises(CacheError, match="1 added, e.g. n00000000/extra.JPEG"):
        build(copy, cache_dir / "train")
    assert imagecache.FORMAT in (cache_dir / "train" / "manifest.json").read_text()


def test_a_stuck_worker_task_prints_where_it_is(folder, monkeypatch, capfd):
    """A worker task past STALL_REPORT_S dumps its stack to stderr (and the loader still delivers the batch)."""
    real = jpeg.read_chunk

    def slow(*args, **kwargs):
        time.sleep(0.6)
        return real(*args, **kwargs)

    monkeypatch.setattr(folderloader, "STALL_REPORT_S", 0.2)
    monkeypatch.setattr(jpeg, "read_chunk", slow)  # the forked workers inherit both
    loader = build_data(data_cfg(folder, workers=1), "cpu", batch_size=8, seed=5).train
    x, y, _ = next(iter(batches(loader, 1)))
    assert len(y) == 8
    err = capfd.readouterr().err
    assert "in slow" in err and "__getitem__" in err


def test_close_stops_the_workers_of_an_abandoned_epoch_and_a_run_leaves_none(folder, tmp_path):
    """A loader left mid-epoch keeps its persistent workers (in a cycle: only the garbage collector would stop them,
    at 5 s per worker, in the middle of whatever runs then); close() stops them at once and the loader still
    iterates afterwards; train_ast.train() closes its loaders itself."""
    loader = build_data(data_cfg(folder, workers=2), "cpu", batch_size=8, seed=5).train
    loader.set_epoch(1)
    for first in loader:
        break
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    loader.close()
    assert not any(w.is_alive() for w in workers)
    again = batches(loader, 1)
    assert torch.equal(again[0][2], first[2])
    loader.close()
    ast_run(folder, tmp_path, "closed", {"mode": "random"}, {"workers": 2})
    assert not multiprocessing.active_children()
