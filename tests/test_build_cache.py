"""build_cache.py: deterministic shards; killed + resumed equals uninterrupted; corrupt shards rendered again;
the size cap holds under reads; bad input counted; a full disk or missing font fails cleanly; the reader."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import build_cache
from lib import storage
from lib.config import merge
from lib.storage import StorageError
from lib.textcache import CacheError, CacheMissError, ShardStore
from lib.textreader import ShardOrderSampler, TextImageCache
from lib.textrender import FontNotFoundError

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"data": {"limit": 96, "max_words": 6},
         "render": {"width": 48, "height": 32, "font_size": 9, "margin_x": 2, "margin_y": 2},
         "cache": {"shard_size": 16, "workers": 0, "chunk_size": 8, "progress": False, "max_gb": 1.0}}


def make_cfg(tmp, name, **sections):
    base = {"run": {"out_dir": str(tmp), "name": name}, **{k: dict(v) for k, v in SMALL.items()}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return merge(build_cache.Config(), base)


def cache_dir(cfg):
    return Path(cfg.run.out_dir) / cfg.run.name / "cache"


def cache_files(root):
    """Everything that defines a cache's content: shard and marker bytes, texts, index, the manifest's settings."""
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("shards/shard-*.bin"))}
    files.update({p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("markers/*.json"))})
    for name in ("texts.bin", "index.npy"):
        files[name] = (root / name).read_bytes()
    manifest = json.loads((root / "manifest.json").read_text())
    files["manifest"] = {k: v for k, v in manifest.items() if k != "created"}
    return files


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process build of the SMALL config: (cfg, report, files)."""
    cfg = make_cfg(tmp_path_factory.mktemp("ref"), "ref")
    report = build_cache.main(cfg)
    return cfg, report, cache_files(cache_dir(cfg))


def test_build_is_deterministic_and_two_workers_equal_one(tmp_path, reference):
    ref_cfg, report, ref_files = reference
    assert report["shards_present"] == 6 and report["images_present"] == 96 and report["shards_missing"] == 0
    assert not report["cap_reached"] and report["bytes_per_image"] > 0
    again = build_cache.main(make_cfg(tmp_path, "again"))
    pooled = build_cache.main(make_cfg(tmp_path, "pooled", cache={"workers": 2, "chunk_size": 5}))
    assert again["images_rendered"] == 96 and pooled["workers"] == 2
    assert cache_files(cache_dir(make_cfg(tmp_path, "again"))) == ref_files
    assert cache_files(cache_dir(make_cfg(tmp_path, "pooled"))) == ref_files  # 2 spawned workers == 1 process
    # a second run over a complete cache renders nothing
    assert build_cache.main(make_cfg(tmp_path, "again"))["images_rendered"] == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_mid_run_then_resume_equals_uninterrupted(tmp_path, sig):
    """SIGKILL: completed shards survive; SIGTERM (preemption): the run stops between chunks, exits 0."""
    killed = {"data": {"limit": 480}}  # 30 shards of 16: each costs a few fsyncs, so the kill lands mid-run
    ref = make_cfg(tmp_path, "uninterrupted", **killed)
    build_cache.main(ref)
    cfg = make_cfg(tmp_path, "killed", **killed)
    args = [f"--run.out_dir={tmp_path}", "--run.name=killed", "--data.limit=480", "--data.max_words=6"]
    args += [f"--render.{k}={v}" for k, v in SMALL["render"].items()]
    args += [f"--cache.{k}={v}" for k, v in SMALL["cache"].items()]
    proc = subprocess.Popen([sys.executable, "build_cache.py", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    markers = cache_dir(cfg) / "markers"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.glob("*.json"))) >= 3:
            os.kill(proc.pid, sig)
            break
        time.sleep(0.002)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 0
    assert proc.wait() == expected, proc.stderr.read().decode()[-2000:]
    written = len(list(markers.glob("*.json")))
    assert 3 <= written < 30, written
    leftover = cache_dir(cfg) / "shards" / f".shard-000029.bin.tmp.{proc.pid}"
    leftover.write_bytes(b"half a shard")  # what a kill inside a write leaves
    resumed = build_cache.main(cfg)
    assert resumed["shards_rendered"] == 30 - written and resumed["removed_temps"] >= 1
    assert not list(cache_dir(cfg).rglob("*.tmp.*"))  # temp files of the killed run are gone
    assert cache_files(cache_dir(cfg)) == cache_files(cache_dir(ref))


def test_corrupt_shards_are_rendered_again(tmp_path, reference):
    _, _, ref_files = reference
    cfg = make_cfg(tmp_path, "corrupt")
    build_cache.main(cfg)
    root = cache_dir(cfg)
    flipped = root / "shards" / "shard-000001.bin"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(data))
    (root / "shards" / "shard-000004.bin").write_bytes(b"truncated")
    report = build_cache.main(cfg)
    assert report["corrupt_rerendered"] == 2 and report["shards_rendered"] == 2
    assert cache_files(root) == ref_files
    # the reader finds corruption too: by sha256 on whole-shard reads, by zlib's checksum on random reads
    ds = TextImageCache(root)
    good = ds.read_shard(2)[0]
    flipped = root / "shards" / "shard-000002.bin"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0xFF  # inside the last image's blob
    flipped.write_bytes(bytes(data))
    assert torch.equal(TextImageCache(root)[47][0], good[-1])  # sample 47 = last of shard 2: re-rendered
    assert cache_files(root) == ref_files


def test_size_cap_holds_under_reads_and_evicts_least_recently_used(tmp_path, reference):
    ref_cfg, ref_report, ref_files = reference
    cap = sum(len(ref_files[f"shards/shard-00000{s}.bin"]) for s in range(3))  # exactly 3 shards fit
    cfg = make_cfg(tmp_path, "capped", cache={"max_gb": cap / 1e9})
    report = build_cache.main(cfg)
    assert report["cap_reached"] and report["shards_present"] == 3 and report["shards_missing"] == 3
    root = cache_dir(cfg)
    full = TextImageCache(cache_dir(ref_cfg))
    with pytest.raises(CacheMissError, match="shard-000003"):
        TextImageCache(root, on_missing="error")[3 * 16]
    ds = TextImageCache(root, touch_every_s=0.0)
    store = ShardStore(root, ds.max_bytes)
    ds[0]  # shard 0 is now the most recently used: shard 1 is evicted first
    for shard in (3, 4):
        images, ids = ds.read_shard(shard)  # missing: rendered by the reader, written back under the cap
        assert torch.equal(images, full.read_shard(shard)[0]) and torch.equal(ids, full.read_shard(shard)[1])
        assert store.used_bytes() <= cap
        if shard == 3:
            assert store.present(0) and not store.present(1)
    for i in range(0, len(ds), 7):  # random reads over everything: the cap holds throughout
        assert torch.equal(ds[i][0], full[i][0])
        assert store.used_bytes() <= cap
    assert ds.stats["shards_rendered"] >= 3


def test_bad_input_is_counted_and_rendered(tmp_path):
    text = tmp_path / "texts.txt"
    long_word = "x" * 5000
    text.write_bytes(b"".join([
        b"first line\n",
        b"\n",                                      # empty: skipped
        b"   \t  \r\n",                             # whitespace only: skipped
        b"bad \xff\xfe utf8\n",                     # invalid UTF-8: replaced
        b"ctrl\x00\x07 chars\tand tab\x1b[0m\n",    # control characters: cleaned
        ("long " * 3000).encode() + b"\n",          # 15000 chars: truncated to max_chars
        long_word.encode() + b"\n",                 # one word wider than a line: split, overflows the page
        "caf\u00e9 \u65e5\u672c \ufffd".encode() + b"\r\n",
        b"last line without newline"]))
    cfg = make_cfg(tmp_path, "bad", data={"source": str(text), "limit": 0})
    report = build_cache.main(cfg)
    c = report["input_counts"]
    assert c["lines"] == 9 and c["samples"] == 7 and c["empty_skipped"] == 2
    assert c["invalid_utf8_replaced"] == 1 and c["control_chars_cleaned"] == 2  # the tab line and the ctrl line
    assert c["truncated"] == 2  # the 15000-character text and the 5000-character word
    assert report["overflow_in_present_shards"] >= 2  # the long text and the long word do not fit 48x32
    ds = TextImageCache(cache_dir(cfg))
    assert list(ds.sample_ids) == [0, 3, 4, 5, 6, 7, 8]  # input line numbers
    assert ds.locate(4) == 2 and ds.shard_of(ds.locate(4)) == (0, 2)
    with pytest.raises(KeyError):
        ds.locate(1)  # the empty line
    assert ds.text(1) == "bad \ufffd\ufffd utf8" and ds.text(2) == "ctrl chars and tab[0m"
    assert len(ds.text(3)) <= 2000
    skip = make_cfg(tmp_path, "skip", data={"source": str(text), "limit": 0, "invalid_utf8": "skip"})
    assert build_cache.main(skip)["input_counts"]["invalid_utf8_skipped"] == 1
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_bytes(b'{"text": "one"}\n{"text": 3}\nnot json\n["list"]\n{"other": "x"}\n\n'
                      b'{"text": "two \\u0000 \\ud800"}\n')
    report = build_cache.main(make_cfg(tmp_path, "jsonl", data={"source": str(jsonl), "limit": 0}))
    c = report["input_counts"]
    assert c["samples"] == 2 and c["bad_json_skipped"] == 4 and c["empty_skipped"] == 1
    assert c["control_chars_cleaned"] == 1 and c["invalid_utf8_replaced"] == 1


def test_full_disk_and_missing_font_fail_cleanly(tmp_path, reference, monkeypatch):
    _, _, ref_files = reference
    with pytest.raises(FontNotFoundError, match="render.font"):
        build_cache.main(make_cfg(tmp_path, "nofont", render={"font": str(tmp_path / "missing.ttf")}))
    assert not (cache_dir(make_cfg(tmp_path, "nofont")) / "manifest.json").exists()
    cfg = make_cfg(tmp_path, "full")
    real = storage.atomic_write_bytes
    calls = {"n": 0}

    def disk_fills_up(path, data, durable=True):  # the third shard file hits a full disk
        if Path(path).suffix == ".bin":
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, durable)

    monkeypatch.setattr(storage, "atomic_write_bytes", disk_fills_up)
    with pytest.raises(StorageError, match="disk full"):
        build_cache.main(cfg)
    root = cache_dir(cfg)
    assert sorted(p.name for p in (root / "markers").iterdir()) == ["shard-000000.json", "shard-000001.json"]
    assert not (root / "shards" / "shard-000002.bin").exists()
    monkeypatch.setattr(storage, "atomic_write_bytes", real)
    report = build_cache.main(cfg)  # same command again: the rest is rendered
    assert report["shards_rendered"] == 4 and cache_files(root) == ref_files
    with pytest.raises(CacheError, match="other settings.*font_size"):
        build_cache.main(make_cfg(tmp_path, "full", render={"font_size": 10}))


def test_reader_is_a_torch_dataset(reference):
    ref_cfg, _, _ = reference
    ds = TextImageCache(cache_dir(ref_cfg))
    assert len(ds) == 96 and isinstance(ds, torch.utils.data.Dataset)
    image, sample_id = ds[17]
    assert image.dtype == torch.uint8 and image.shape == (1, 32, 48) and sample_id == 17
    shard, ids = ds.read_shard(1)
    assert shard.shape == (16, 1, 32, 48) and torch.equal(shard[1], image) and ids.tolist() == list(range(16, 32))
    sampler = ShardOrderSampler(ds, shuffle=True, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(96)) and order != list(range(96))
    assert all(len({i // 16 for i in order[k:k + 16]}) == 1 for k in range(0, 96, 16))  # one shard at a time
    loader = torch.utils.data.DataLoader(ds, batch_size=32, sampler=sampler, num_workers=2)
    seen = []
    for images, sample_ids in loader:
        assert images.shape[1:] == (1, 32, 48)
        for img, i in zip(images, sample_ids.tolist()):
            assert torch.equal(img, ds[i][0])
        seen += sample_ids.tolist()
    assert seen == order
    batches = list(ds.iter_shards())
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([ds[i][0] for i in range(96)]))


def test_bench_smoke():
    out = subprocess.run([sys.executable, "bench/build_cache_speed.py", "--smoke"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    summary = lines[-1]
    assert summary["summary"] is True and summary["max_workers"] >= 1 and summary["bytes_per_image"] > 0
    for key in ("speedup_vs_naive_1worker", "scaling_efficiency_max_workers", "device"):
        assert key in summary
    assert {line.get("pattern") for line in lines} >= {"naive", "fast"} and summary["identical_output"]


def test_renderer_bytes_do_not_depend_on_its_caches_and_denoisers_match_pillow():
    from PIL import Image, ImageFilter

    from lib.textrender import DenoiseConfig, Denoiser, RenderConfig, Renderer
    texts = ["the quick brown fox jumps over the lazy dog " * 3, "a " + "y" * 80, "", "one two three the the"]
    cfg = RenderConfig(word_cache_size=3)  # tiny cache: entries dropped and rebuilt all the time
    warm = Renderer(cfg)
    for text in texts * 2:
        warm.render(text)
    for text in texts:
        fresh_image, fresh_cut = Renderer(RenderConfig()).render(text)
        image, cut = warm.render(text)
        assert np.array_equal(image, fresh_image) and cut == fresh_cut
    assert Renderer(RenderConfig()).render(texts[0] * 20)[1]  # too long for the page: overflow
    rgb = RenderConfig(mode="RGB", foreground=[200, 0, 0], background=[250, 250, 230], wrap="char")
    image, _ = Renderer(rgb).render("\u65e5\u672c\u8a9e" * 30)  # no spaces: broken between characters
    assert image.shape == (3, 224, 224) and tuple(image[:, 0, 0]) == (250, 250, 230)
    page = Renderer(RenderConfig()).render(texts[0])[0]
    median = Denoiser(DenoiseConfig("median"), RenderConfig())(page)
    assert np.array_equal(median[0], np.asarray(Image.fromarray(page[0]).filter(ImageFilter.MedianFilter(3))))
    smooth = Denoiser(DenoiseConfig("smooth"), RenderConfig())(page)
    kernel = ImageFilter.Kernel((3, 3), [1, 2, 1, 2, 4, 2, 1, 2, 1], 16)
    assert np.array_equal(smooth[0], np.asarray(Image.fromarray(page[0]).filter(kernel)))
    despeckle = Denoiser(DenoiseConfig("despeckle"), RenderConfig())
    assert np.array_equal(despeckle(page), page)  # clean text: no stroke pixel is a speck
    noisy = page.copy()
    noisy[0, 200, [10, 50, 90]] = 0  # isolated dots on the empty bottom of the page
    assert np.array_equal(despeckle(noisy), page)
