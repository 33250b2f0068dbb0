"""encode_stream.py: outputs equal a plain forward; interrupted + resumed equals uninterrupted; 2 ranks equal 1."""
import errno
import json
import os
import signal

import numpy as np
import pytest
import torch

import encode_stream
from lib.config import ConfigError, merge
from lib.data import DataConfig, build_data, in_order
from lib.run import Preempted
from lib.storage import StorageError

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
    cfg = make_cfg(tmp_path, "full_disk", encode={"consolidate": False})
    real = encode_stream.atomic_write_bytes
    calls = {"n": 0}

    def fill_up(path, data, durable=True):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data, durable)

    monkeypatch.setattr(encode_stream, "atomic_write_bytes", fill_up)
    with pytest.raises(StorageError, match="chunks written before it are intact"):
        run(cfg)
    monkeypatch.setattr(encode_stream, "atomic_write_bytes", real)
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
