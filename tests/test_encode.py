"""encode_stream.py: outputs equal a plain forward; interrupted + resumed equals uninterrupted; 2 ranks equal 1;
the capsule TRM encoder (shapes, seeded bytes, no gradient through the early cycles); a build_cache.py cache as
input (kill -9 + resume byte-identical, 2 ranks equal 1, a corrupt shard named and not encoded)."""
import errno
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import encode_stream
from lib.config import ConfigError, merge
from lib.data import DataConfig, build_data, in_order
from lib.run import Preempted
from lib.storage import StorageError, sha256_file

ROOT = Path(__file__).resolve().parent.parent
ALL = ["embedding", "loop_embeddings", "tokens"]


def make_cfg(out_dir, name="enc", **sections):
    base = {"run": {"out_dir": str(out_dir), "name": name, "device": "cpu"},
            "data": {"name": "digits", "loader": "resident"},
            "model": {"image_size": 16, "patch_size": 4, "width": 32, "heads": 2, "blocks": 2, "loops": 2},
            "encode": {"outputs": ALL, "batch_size": 32, "chunk_samples": 64, "store_dtype": "float32"}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return merge(encode_stream.Config(), base)


def run(cfg):
    return encode_stream.main(cfg)


def outputs(cfg):
    found = encode_stream.read_outputs(os.path.join(cfg.run.out_dir, cfg.run.name))
    return {k: np.asarray(v) for k, v in found.items()}


def test_outputs_equal_a_plain_forward(tmp_path):
    cfg = make_cfg(tmp_path)
    result = run(cfg)
    assert result["complete"] and result["samples"] == 359 and result["chunks_written"] == 6
    got = outputs(cfg)
    assert not (tmp_path / "enc" / "chunks").exists()  # consolidated, chunks removed
    data = build_data(merge(DataConfig(), {"name": "digits", "image_size": 16, "augment": False,
                                           "loader": "resident"}), "cpu", batch_size=500)
    model = encode_stream.load_encoder(cfg.model, data.in_channels, seed=0).eval()
    images, labels, index = next(iter(in_order(data.test)))
    with torch.inference_mode():
        ref = model(images, ALL)
    assert np.array_equal(got["index"], np.arange(359)) and np.array_equal(got["label"], labels.numpy())
    assert got["valid"].all()
    for k in ALL:
        assert got[k].shape == tuple(ref[k].shape)
        np.testing.assert_allclose(got[k], ref[k].numpy(), rtol=1e-4, atol=1e-5)
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    for meta in manifest["files"].values():  # hashed while streamed out = hashed from the disk
        assert sha256_file(tmp_path / "enc" / meta["file"]) == meta["sha256"]


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    full = make_cfg(tmp_path, "full")
    run(full)
    cfg = make_cfg(tmp_path, "crash")
    real_write = encode_stream.ChunkStore.write
    calls = {"n": 0}

    def crash_on_third(self, chunk, arrays, meta):
        calls["n"] += 1
        if calls["n"] == 3:  # killed while writing: a temp file is left behind, no marker
            (self.folder / f".chunk-{chunk:06d}.npz.tmp.999").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_write(self, chunk, arrays, meta)

    monkeypatch.setattr(encode_stream.ChunkStore, "write", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(encode_stream.ChunkStore, "write", real_write)
    assert not (tmp_path / "crash" / "manifest.json").exists()
    # a chunk whose file no longer matches its marker is encoded again, not used
    data_file, _ = encode_stream.ChunkStore(tmp_path / "crash").paths(1)
    data_file.write_bytes(data_file.read_bytes()[:-10] + b"0123456789")
    result = run(cfg)
    assert result["complete"] and result["chunks_done_before"] == 1 and result["chunks_written"] == 5
    a, b = outputs(full), outputs(cfg)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert run(cfg)["samples"] == 0  # complete: nothing to do


def test_sigterm_stops_at_a_batch_boundary_and_the_rerun_finishes(tmp_path, monkeypatch):
    full = make_cfg(tmp_path, "full", encode={"outputs": ["embedding"]})
    run(full)
    cfg = make_cfg(tmp_path, "term", encode={"outputs": ["embedding"]})
    real_call = encode_stream.Encoder.__call__
    calls = {"n": 0}

    def term_on_fourth(self, images):
        calls["n"] += 1
        if calls["n"] == 4:  # the first call is the warm-up probe
            os.kill(os.getpid(), signal.SIGTERM)
        return real_call(self, images)

    monkeypatch.setattr(encode_stream.Encoder, "__call__", term_on_fourth)
    with pytest.raises(Preempted) as stop:  # exit status 0, the partial numbers on the exception
        run(cfg)
    result = stop.value.result
    assert stop.value.code == 0
    assert not result["complete"] and result["chunks_written"] == 1  # 3 batches of 32 = chunk 0 + half of 1
    monkeypatch.setattr(encode_stream.Encoder, "__call__", real_call)
    assert run(cfg)["complete"]
    assert np.array_equal(outputs(full)["embedding"], outputs(cfg)["embedding"])


def two_rank_job(rank, world, out_dir):
    """Two-rank job (tests/dist_env.py): the same encoding over two ranks; each rank's numbers to JSON."""
    cfg = make_cfg(out_dir, "two")
    result = run(cfg)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_two_ranks_equal_one(tmp_path, two_ranks):
    one = make_cfg(tmp_path, "one")
    run(one)
    r0, r1 = (json.loads((two_ranks / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["complete"] and r0["samples"] == 359 and r0["chunks_written"] == 6
    a, b = outputs(one), outputs(make_cfg(two_ranks, "two"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_configuration_and_resume_none(tmp_path):
    run(make_cfg(tmp_path, "a", encode={"outputs": ["embedding"], "limit": 100}))
    with pytest.raises(ConfigError, match="model"):
        run(make_cfg(tmp_path, "a", encode={"outputs": ["embedding"], "limit": 100}, model={"loops": 3}))
    with pytest.raises(ConfigError, match="run.resume=none"):
        run(make_cfg(tmp_path, "a", encode={"outputs": ["embedding"], "limit": 100}, run={"resume": "none"}))
    # the same weights path with other content: refused by encode_info.json's sha256 of the weights
    weights = tmp_path / "w.pt"
    small = make_cfg(tmp_path, "w", encode={"outputs": ["embedding"], "limit": 64})
    torch.save(encode_stream.load_encoder(small.model, 1, seed=0).state_dict(), weights)
    with_weights = make_cfg(tmp_path, "w", encode={"outputs": ["embedding"], "limit": 64},
                            model={"weights": str(weights)})
    assert not run(with_weights)["random_weights"]
    torch.save(encode_stream.load_encoder(small.model, 1, seed=1).state_dict(), weights)
    with pytest.raises(ConfigError, match="weights_sha256"):
        run(with_weights)


@pytest.mark.parametrize("section, updates, words", [
    ("encode", {"outputs": ["logits"]}, "encode.outputs"),
    ("encode", {"split": "val"}, "encode.split"),
    ("model", {"patch_size": 5}, "model.patch_size"),
    ("data", {"image_size": 32}, "model.image_size"),
])
def test_config_errors_say_what_to_fix(tmp_path, section, updates, words):
    with pytest.raises(ConfigError, match=words):
        make_cfg(tmp_path, **{section: updates})


def test_memory_disk_and_weights_are_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="encode.chunk_samples"):
        run(make_cfg(tmp_path, "ram", encode={"chunk_samples": 4096, "max_host_gb": 0.001}))
    torch.save({"other": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        run(make_cfg(tmp_path, "w", model={"weights": str(tmp_path / "w.pt")}))
    import shutil
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(StorageError, match="not enough disk space"):
        run(make_cfg(tmp_path, "disk"))
    assert not (tmp_path / "disk" / "chunks").exists() or not any((tmp_path / "disk" / "chunks").iterdir())


def test_disk_full_while_writing_keeps_earlier_chunks(tmp_path, monkeypatch):
    # one writer thread: which chunk is the third write is then fixed
    cfg = make_cfg(tmp_path, "full_disk", encode={"consolidate": False, "write_threads": 1})
    real = encode_stream.atomic_write_stream
    calls = {"n": 0}

    def fill_up(path, write, durable=True):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write, durable)

    monkeypatch.setattr(encode_stream, "atomic_write_stream", fill_up)
    with pytest.raises(StorageError, match="chunks written before it are intact"):
        run(cfg)
    monkeypatch.setattr(encode_stream, "atomic_write_stream", real)
    result = run(cfg)
    assert result["complete"] and result["chunks_done_before"] == 2
    assert outputs(cfg)["embedding"].shape == (359, 32)  # read from the chunks (not consolidated)


def test_unreadable_images_are_marked_invalid(tmp_path):
    from tools.make_imagefolder import MakeConfig, make_imagefolder
    root = tmp_path / "folder"
    make_imagefolder(MakeConfig(out=str(root), classes=2, train_per_class=6, val_per_class=3, width=40, height=32,
                                workers=1, truncated=1))
    cfg = make_cfg(tmp_path, "from_folder", data={"name": "imagefolder", "root": str(root), "loader": "dataloader",
                                             "workers": 0, "max_skipped_fraction": 0.5},
                   encode={"split": "train", "outputs": ["embedding"], "chunk_samples": 4, "batch_size": 4})
    result = run(cfg)
    got = outputs(cfg)
    assert result["complete"] and len(got["index"]) == 12  # 2 classes x 6, one of them truncated
    assert result["invalid_rows"] == (~got["valid"]).sum() == 1
    assert not got["embedding"][~got["valid"]].any()


def test_random_weights_are_said_loudly_and_recorded(tmp_path, capsys):
    cfg = make_cfg(tmp_path, "random", encode={"outputs": ["embedding"], "limit": 64})
    result = run(cfg)
    out = capsys.readouterr().out
    assert out.count("RANDOMLY INITIALIZED") == 2  # at the start and in the summary line
    manifest = json.loads((tmp_path / "random" / "manifest.json").read_text())
    assert manifest["random_weights"] and "RANDOMLY INITIALIZED" in manifest["warning"]
    assert result["random_weights"] and "storage: " in out  # the storage report closes the run


def test_a_chunk_that_rots_after_an_unconsolidated_run_is_encoded_again(tmp_path):
    full = make_cfg(tmp_path, "ref", encode={"outputs": ["embedding"], "consolidate": False})
    run(full)
    cfg = make_cfg(tmp_path, "rot", encode={"outputs": ["embedding"], "consolidate": False})
    run(cfg)
    data_file, _ = encode_stream.ChunkStore(tmp_path / "rot").paths(2)
    data_file.write_bytes(data_file.read_bytes()[:-10] + b"0123456789")  # bit rot after the run finished
    with pytest.raises(StorageError, match="run the same encode_stream.py command again"):
        outputs(cfg)
    result = run(cfg)
    assert result["complete"] and result["chunks_written"] == 1 and result["chunks_done_before"] == 5
    assert np.array_equal(outputs(full)["embedding"], outputs(cfg)["embedding"])
    assert run(cfg)["samples"] == 0  # every chunk verified: nothing to do


# ----------------------------------------------------------------------------- the plan's encoder (lib/trm.py)
TRM_TINY = {"image_size": 16, "patch_size": 4, "width": 32, "heads": 2, "blocks": 2, "h_cycles": 2, "l_cycles": 3}


def test_trm_outputs_have_the_stated_shapes_and_parameter_count():
    from lib.trm import OUTPUTS, CapsuleTRM, TRMConfig
    cfg = TRMConfig()  # the plan's sizes, on the meta device: shapes and counts without computing anything
    with torch.device("meta"):
        model = CapsuleTRM(cfg)
        out = model(torch.zeros(2, 3, 224, 224), OUTPUTS)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "sketches": (2, 12, 768), "checksums": (2, 12, 32), "children": (2, 12, 4, 768), "tokens": (2, 196, 768)}
    assert {k: (2, *v) for k, v in model.output_shapes().items()} == {k: tuple(v.shape) for k, v in out.items()}
    assert sum(p.numel() for p in model.parameters()) == 14_987_552  # the numbers lib/trm.py states
    assert cfg.layer_applications() == 16
    from lib.encoder import forward_flops
    assert forward_flops(lambda: CapsuleTRM(cfg), (1, 3, 224, 224), OUTPUTS[:3]) == 46_548_664_320


def test_trm_same_seed_same_bytes():
    from lib.encoder import load_encoder
    from lib.trm import OUTPUTS, TRMConfig
    cfg = TRMConfig(**TRM_TINY)
    x = torch.randn(3, 3, 16, 16)
    runs = [load_encoder(cfg, 3, seed=s).eval() for s in (7, 7, 8)]
    with torch.inference_mode():
        outs = [m(x, OUTPUTS) for m in runs]
    for k in OUTPUTS:
        assert outs[0][k].numpy().tobytes() == outs[1][k].numpy().tobytes(), k
        assert not torch.equal(outs[0][k], outs[2][k]), k
    assert all(torch.equal(a, b) for a, b in zip(runs[0].state_dict().values(), runs[1].state_dict().values()))


def test_trm_gradients_do_not_reach_the_no_grad_cycles():
    from lib.encoder import load_encoder
    from lib.trm import OUTPUTS, TRMConfig
    cfg = TRMConfig(**TRM_TINY)
    model = load_encoder(cfg, 3, seed=0).train()
    x = torch.randn(2, 3, 16, 16)

    def loss_of(out):
        return sum((v.float() ** 2).mean() for v in out.values())

    def grads():
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return g

    tracked = []  # per block application: does its output record autograd history?
    hooks = [b.register_forward_hook(lambda m, i, o: tracked.append(o.requires_grad)) for b in model.net]
    loss_of(model(x, OUTPUTS)).backward()
    for h in hooks:
        h.remove()
    per_cycle = (cfg.l_cycles + 1) * cfg.blocks
    assert tracked == [False] * per_cycle * (cfg.h_cycles - 1) + [True] * per_cycle
    got = grads()

    def by_hand(detach):  # the cycles written out, the states detached explicitly before the last cycle
        emb = model.patch_embed(x).flatten(2).transpose(1, 2) + model.position
        y, z = model.y_init.expand_as(emb), model.z_init.expand_as(emb)
        for cycle in range(cfg.h_cycles):
            if detach and cycle == cfg.h_cycles - 1:
                y, z = y.detach(), z.detach()
            for _ in range(cfg.l_cycles):
                z = model.net(z + y + emb)
            y = model.net(y + z)
        sketches, children, checksums = model.pool(y)
        loss_of({"sketches": sketches, "checksums": checksums, "children": children, "tokens": y}).backward()
        return grads()

    detached, through_all = by_hand(True), by_hand(False)
    for name, g in got.items():
        torch.testing.assert_close(g, detached[name], rtol=1e-6, atol=1e-7, msg=name)
    # backpropagating through every cycle gives other gradients: the comparison above can fail
    assert not torch.allclose(got["patch_embed.weight"], through_all["patch_embed.weight"], rtol=1e-3, atol=0)
    assert not torch.allclose(got["net.0.qkv.weight"], through_all["net.0.qkv.weight"], rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- end to end from a build_cache.py cache
def build_tiny_cache(out_dir, name="tinycache", limit=512):
    """configs/cache_tiny.yaml (64x64 grayscale, shards of 64), the first `limit` samples; returns the cache folder."""
    import build_cache
    from lib.config import parse
    build_cache.main(parse(build_cache.Config(), ["--config", os.path.join(ROOT, "configs", "cache_tiny.yaml"),
                                                  f"--run.out_dir={out_dir}", f"--run.name={name}",
                                                  f"--data.limit={limit}", "--cache.progress=false"]))
    return os.path.join(out_dir, name, "cache")


def cache_args(out_dir, name, cache, *extra):
    """The command line of a cache run: tiny TRM at 64 px, batches and chunks aligned with the shards of 64."""
    return ["--config", os.path.join(ROOT, "configs", "encode_text_cache.yaml"), f"--run.out_dir={out_dir}",
            f"--run.name={name}", "--run.device=cpu", f"--cache.dir={cache}", "--model.image_size=64",
            "--model.width=32", "--model.heads=2", "--encode.batch_size=16", "--encode.chunk_samples=16",
            "--encode.store_dtype=float32", *extra]


def cache_cfg(out_dir, name, cache, *extra):
    from lib.config import parse
    return parse(encode_stream.Config(), cache_args(out_dir, name, cache, *extra))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def cache_reference(tiny_cache, tmp_path_factory):
    """One uninterrupted encoding of the tiny cache: (cfg, its result, its outputs)."""
    cfg = cache_cfg(tmp_path_factory.mktemp("reference"), "uninterrupted", tiny_cache)
    result = run(cfg)
    return cfg, result, outputs(cfg)


def test_cache_loader_reads_any_order_across_shards_and_batches(tiny_cache):
    from lib.encode_input import CacheLoader
    from lib.textreader import TextImageCache
    ds = TextImageCache(tiny_cache, on_missing="error")
    loader = CacheLoader(ds, batch_size=24, device="cpu", readers=2, prefetch=2)
    order = torch.cat([torch.arange(10, 70), torch.arange(100, 130), torch.tensor([5, 4, 3]), torch.arange(500, 512)])
    loader.set_epoch(0, indices=order)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [24, 24, 24, 24, 9] == [24] * (len(loader) - 1) + [9]
    images, ids, index = (torch.cat(parts) for parts in zip(*batches))
    assert torch.equal(index, order) and torch.equal(ids, torch.as_tensor(ds.sample_ids)[order])
    expected = torch.stack([ds[i][0] for i in order.tolist()]).float().div(255).sub(0.5).div(0.5)
    torch.testing.assert_close(images, expected.expand(-1, 3, -1, -1), rtol=0, atol=1e-6)


def test_cache_outputs_equal_a_plain_forward_and_kill9_resume_is_byte_identical(tmp_path, tiny_cache,
                                                                                 cache_reference):
    import time

    from lib.textreader import TextImageCache
    ref, result, got = cache_reference
    assert result["complete"] and result["samples"] == 512 and result["random_weights"]
    manifest = json.loads((Path(ref.run.out_dir) / "uninterrupted" / "manifest.json").read_text())
    assert manifest["random_weights"] and manifest["key"] == "sample_id" and manifest["source"].startswith("cache:")
    # the stored rows equal the model on the cache's images, normalized as stated: (x / 255 - 0.5) / 0.5, 3 channels
    ds = TextImageCache(tiny_cache)
    rows = [0, 1, 63, 64, 300, 511]
    images = torch.stack([ds[i][0] for i in rows]).float().div(255).sub(0.5).div(0.5).expand(-1, 3, -1, -1)
    model = encode_stream.load_encoder(ref.model, 3, seed=0).eval()
    with torch.inference_mode():
        plain = model(images, ref.encode.outputs)
    for k in ref.encode.outputs:
        np.testing.assert_allclose(got[k][rows], plain[k].numpy(), rtol=1e-4, atol=1e-5)
    assert np.array_equal(got["sample_id"], ds.sample_ids) and got["valid"].all()

    # the same run in another process (forked: no second start of Python and torch), killed with SIGKILL after a
    # few chunks, then the same command again here
    pid = os.fork()
    if pid == 0:
        try:
            write = encode_stream.ChunkStore.write

            def slow_write(self, *args):  # time for the parent to see the markers (the bytes are unchanged)
                time.sleep(0.02)
                return write(self, *args)

            encode_stream.ChunkStore.write = slow_write
            run(cache_cfg(tmp_path, "killed", tiny_cache))
        finally:
            os._exit(0)
    chunks = tmp_path / "killed" / "chunks"
    deadline = time.time() + 60
    while time.time() < deadline:
        if chunks.is_dir() and len(list(chunks.glob("chunk-*.json"))) >= 3:
            break
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    written = len(list(chunks.glob("chunk-*.json")))
    assert 3 <= written < 32, written
    resumed = run(cache_cfg(tmp_path, "killed", tiny_cache))
    assert resumed["complete"] and resumed["chunks_done_before"] == written  # a marker is written after its chunk
    again = outputs(cache_cfg(tmp_path, "killed", tiny_cache))
    assert again.keys() == got.keys() and all(again[k].tobytes() == got[k].tobytes() for k in got)


def test_a_corrupt_or_missing_cache_shard_is_named_and_not_encoded(tmp_path, tiny_cache, cache_reference):
    import shutil

    import build_cache
    from lib.textcache import CacheMissError
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    shard = cache / "shards" / "shard-000002.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: found by the sha256 when the shard is read
    shard.write_bytes(bytes(data))
    cfg = cache_cfg(tmp_path, "corrupt", cache, "--encode.chunk_samples=64")
    with pytest.raises(CacheMissError, match=r"shard-000002\.bin .*fails its checksum"):
        run(cfg)
    done = sorted(p.name for p in (tmp_path / "corrupt" / "chunks").glob("chunk-*.json"))
    assert done == ["chunk-000000.json", "chunk-000001.json"]  # the shards before it; none of shard 2's samples
    (cache / "shards" / "shard-000005.bin").unlink()  # missing: named before any work
    with pytest.raises(CacheMissError, match=r"shard-000005\.bin.*nothing was encoded"):
        run(cfg)
    assert sorted(p.name for p in (tmp_path / "corrupt" / "chunks").glob("chunk-*.json")) == done
    # the fix the message gives: build_cache.py renders both again; the rerun completes the encoding
    from lib.config import parse
    build_cache.main(parse(build_cache.Config(), ["--config", os.path.join(ROOT, "configs", "cache_tiny.yaml"),
                                                  f"--run.out_dir={tmp_path}", f"--cache.dir={cache}",
                                                  "--cache.progress=false"]))
    result = run(cfg)
    assert result["complete"] and result["chunks_done_before"] == 2
    a, b = cache_reference[2], outputs(cfg)  # chunks of 64 here, of 16 there: the same batches of 16
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    # another cache (other samples) into the same folder: refused, with the reason
    other = build_tiny_cache(tmp_path, "othercache", limit=64)
    with pytest.raises(ConfigError, match="source"):
        run(cache_cfg(tmp_path, "corrupt", other, "--encode.chunk_samples=64"))


def two_rank_cache_job(rank, world, out_dir):
    """Two-rank job (tests/dist_env.py): rank 0 builds a tiny cache, both ranks encode it; numbers to JSON."""
    import time
    ready = os.path.join(out_dir, "cache_two.ready")
    if rank == 0:
        build_tiny_cache(out_dir, "cache_two", limit=256)
        open(ready, "w").close()
    deadline = time.time() + 300
    while not os.path.exists(ready) and time.time() < deadline:
        time.sleep(0.05)
    result = run(cache_cfg(out_dir, "two_cache", os.path.join(out_dir, "cache_two", "cache")))
    with open(os.path.join(out_dir, f"cache_rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_cache_two_ranks_equal_one(tmp_path, two_ranks):
    cache = two_ranks / "cache_two" / "cache"
    one = cache_cfg(tmp_path, "one", cache)
    run(one)
    r0, r1 = (json.loads((two_ranks / f"cache_rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and r0["complete"] and r0["samples"] == 256 and r0["chunks_written"] == 16
    a, b = outputs(one), outputs(cache_cfg(two_ranks, "two_cache", cache))
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
