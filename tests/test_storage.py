"""lib/storage.py: crash-safe consolidation, LRU cap and recency, size report, name checks, keep_last."""
import os

import pytest
import torch

from lib import storage


def _pt_shards(folder, n=4, rows=3):
    shards = []
    for i in range(n):
        path = folder / f"shard-{i:03d}.pt"
        torch.save({"x": torch.arange(rows * 2).reshape(rows, 2) + 100 * i,  # (rows, 2)
                    "y": torch.full((rows,), i)}, path)
        shards.append(path)
    return shards


def _byte_shards(folder, n=5):
    shards = []
    for i in range(n):
        path = folder / f"part-{i}.bin"
        path.write_bytes(os.urandom(1000 + 37 * i))
        shards.append(path)
    return shards


def test_consolidate_pt_concatenates_along_dim0(tmp_path):
    shards = _pt_shards(tmp_path)
    expected = [torch.load(s, weights_only=True) for s in shards]
    out = storage.consolidate(shards, tmp_path / "all.pt")
    assert not any(s.exists() for s in shards)
    assert storage.verify(out)
    merged = torch.load(out, weights_only=True)
    assert torch.equal(merged["x"], torch.cat([e["x"] for e in expected]))
    assert torch.equal(merged["y"], torch.cat([e["y"] for e in expected]))


def test_consolidate_bytes_container_round_trip(tmp_path):
    shards = _byte_shards(tmp_path)
    expected = {s.name: s.read_bytes() for s in shards}
    out = storage.consolidate(shards, tmp_path / "all.bin", manifest=False)
    assert storage.read_container(out) == expected
    assert not any(s.exists() for s in shards)


@pytest.mark.parametrize("kind", ["pt", "bytes"])
def test_crash_between_consolidation_and_deletion_then_rerun(tmp_path, monkeypatch, kind):
    shards = _pt_shards(tmp_path) if kind == "pt" else _byte_shards(tmp_path)
    expected = {s.name: s.read_bytes() for s in shards}
    out = tmp_path / ("all.pt" if kind == "pt" else "all.bin")
    deleted = []
    real_delete = storage._delete_shard

    def crash_after_two(shard):
        if len(deleted) == 2:
            raise KeyboardInterrupt("simulated kill during deletion")
        real_delete(shard)
        deleted.append(shard)

    monkeypatch.setattr(storage, "_delete_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        storage.consolidate(shards, out)
    monkeypatch.undo()
    assert storage.verify(out) and sum(s.exists() for s in shards) == len(shards) - 2

    # rerun, once with the original list and once (like a glob would) with only the survivors
    survivors = [s for s in shards if s.exists()]
    assert storage.consolidate(survivors, out) == out
    assert storage.consolidate(shards, out) == out
    assert not any(s.exists() for s in shards)
    # every shard's data is in the output exactly once
    if kind == "pt":
        merged = torch.load(out, weights_only=True)
        assert merged["x"].shape == (3 * len(shards), 2)
        expected_x = torch.cat([torch.arange(6).reshape(3, 2) + 100 * i for i in range(len(shards))])
        assert torch.equal(merged["x"], expected_x)
    else:
        assert storage.read_container(out) == expected


def test_partial_output_without_marker_is_redone(tmp_path):
    shards = _byte_shards(tmp_path)
    expected = {s.name: s.read_bytes() for s in shards}
    out = tmp_path / "all.bin"
    out.write_bytes(b"FRUGALC1 half-written")  # crashed before the marker: must not count
    assert not storage.verify(out)
    storage.consolidate(shards, out)
    assert storage.read_container(out) == expected and storage.verify(out)


def test_corrupt_output_with_deleted_shards_deletes_nothing(tmp_path):
    shards = _byte_shards(tmp_path, n=3)
    out = storage.consolidate(shards[:2], tmp_path / "all.bin")
    data = bytearray(out.read_bytes())
    data[-1] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises(storage.StorageError, match="already deleted"):
        storage.consolidate(shards[:2], out)
    assert shards[2].exists()


def test_rewritten_shard_is_not_deleted_by_rerun(tmp_path, monkeypatch):
    shards = _byte_shards(tmp_path, n=2)
    monkeypatch.setattr(storage, "_delete_shard", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        storage.consolidate(shards, tmp_path / "all.bin")
    monkeypatch.undo()
    shards[0].write_bytes(b"new data written after the consolidation")
    with pytest.warns(UserWarning, match="content changed"):
        storage.consolidate(shards, tmp_path / "all.bin")
    assert shards[0].read_bytes() == b"new data written after the consolidation"
    assert not shards[1].exists()


def test_consolidate_bad_input(tmp_path):
    with pytest.raises(storage.StorageError, match="not found"):
        storage.consolidate([tmp_path / "missing.bin"], tmp_path / "out.bin")
    (tmp_path / "a.pt").write_bytes(b"junk")
    with pytest.raises(storage.StorageError, match="corrupt"):
        storage.consolidate([tmp_path / "a.pt"], tmp_path / "out.pt")
    assert (tmp_path / "a.pt").exists() and not (tmp_path / "out.pt").exists()
    with pytest.raises(ValueError, match="also listed as a shard"):
        storage.consolidate([tmp_path / "a.pt"], tmp_path / "a.pt")


def test_lru_cap_holds_and_recent_survive(tmp_path):
    cache = storage.LRUCache(tmp_path / "cache", max_bytes=10_000)
    for i in range(60):
        cache.put(f"item-{i}", bytes([i % 256]) * (500 + 13 * (i % 7)))
        if i >= 5:
            assert cache.get("item-0") is not None  # keep one old item hot
        assert cache.size_bytes() <= 10_000
        on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
        assert on_disk == cache.size_bytes()
    assert cache.get("item-0") == bytes([0]) * 500  # survived 55 puts because it was used
    assert cache.get("item-59") is not None and cache.get("item-58") is not None
    assert cache.get("item-10") is None  # old and unused: evicted
    # recency survives a restart (it lives in the index, not in atime)
    cache.get("item-50")
    reopened = storage.LRUCache(tmp_path / "cache", max_bytes=10_000)
    reopened.put("big", b"z" * 9000)
    assert reopened.get("item-50") is not None and reopened.size_bytes() <= 10_000


def test_lru_rejects_bad_names_and_oversized_items(tmp_path):
    cache = storage.LRUCache(tmp_path / "cache", max_bytes=100)
    for bad in ["../escape", "a/b", "/etc/passwd", "..", ".", "", ".lru-index.json", "a\\b"]:
        with pytest.raises(ValueError):
            cache.put(bad, b"x")
        with pytest.raises(ValueError):
            cache.get(bad)
    with pytest.raises(ValueError, match="more than the whole cache cap"):
        cache.put("huge", b"x" * 101)
    assert not (tmp_path / "escape").exists()
    with pytest.raises(ValueError, match="positive"):
        storage.LRUCache(tmp_path / "c2", max_bytes=0)


def test_storage_report_equals_sum_of_file_sizes(tmp_path):
    sizes = {"checkpoints/step-1/state.pt": 1234, "checkpoints/step-2/state.pt": 99,
             "metrics/log.jsonl": 17, "metrics/deep/a/b.txt": 5}
    for rel, n in sizes.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x" * n)
    report = storage.storage_report({"checkpoints": tmp_path / "checkpoints", "metrics": tmp_path / "metrics",
                                     "single": tmp_path / "metrics/log.jsonl", "missing": tmp_path / "nope"})
    assert report == {"checkpoints": 1234 + 99, "metrics": 17 + 5, "single": 17, "missing": 0}
    assert storage.format_report({"checkpoints": 1_200_000_000, "metrics": 3100}) == \
        "storage: checkpoints 1.2 GB | metrics 3.1 KB | total 1.2 GB"


def test_check_free_space_message(tmp_path, monkeypatch):
    storage.check_free_space(tmp_path, 1, "a tiny file")  # fits
    usage = storage.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage._replace(free=2_000_000))
    with pytest.raises(storage.StorageError, match=r"need 5.0 MB, only 2.0 MB free on .*free space") as info:
        storage.check_free_space(tmp_path / "not" / "yet", 5_000_000, "the cache")
    assert isinstance(info.value, OSError) and info.value.errno == storage.errno.ENOSPC


def test_keep_last_by_step_then_mtime(tmp_path):
    for s in [5, 40, 100, 7]:  # step order differs from name sort order and creation order
        (tmp_path / f"ckpt-step{s}.pt").write_bytes(b"x")
    deleted = storage.keep_last(tmp_path, "ckpt-step*.pt", 2)
    assert sorted(p.name for p in deleted) == ["ckpt-step5.pt", "ckpt-step7.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-step100.pt", "ckpt-step40.pt"]
    for i, name in enumerate(["b.log", "a.log", "c.log"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + i, 10**18 + i))
    assert [p.name for p in storage.keep_last(tmp_path, "*.log", 1)] == ["b.log", "a.log"]
    with pytest.raises(ValueError):
        storage.keep_last(tmp_path, "../*", 1)


def test_run_report_counts_each_file_once(tmp_path):
    from lib.storage import run_report
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "checkpoints" / "step-000001" / "state.pt").write_bytes(b"x" * 1000)
    (run / "sub").mkdir()
    (run / "sub" / "metrics.jsonl").write_bytes(b"y" * 30)
    (run / "config.yaml").write_bytes(b"z" * 7)
    (run / "acc.png").write_bytes(b"p" * 5)
    report = run_report(run)
    assert report == {"checkpoints": 1000, "metrics": 30, "config": 7, "plots": 5}
    assert sum(report.values()) == sum(f.stat().st_size for f in run.rglob("*") if f.is_file())


def test_atomic_write_stream_hashes_what_reaches_the_disk(tmp_path):
    import numpy as np
    from lib.storage import atomic_write_stream, sha256_file
    arrays = {"a": np.arange(100_000, dtype=np.float16).reshape(100, 1000), "b": np.arange(7)}
    path = tmp_path / "x.npz"
    nbytes, sha = atomic_write_stream(path, lambda f: np.savez(f, **arrays))
    assert nbytes == path.stat().st_size and sha == sha256_file(path)  # hashed on the way == hashed from the disk
    with np.load(path) as z:  # an unseekable stream still gives a valid .npz
        assert all(np.array_equal(z[k], v) for k, v in arrays.items())
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]  # no temp file left
