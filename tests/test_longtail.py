"""data.long_tail_ratio: the stated per-class counts of the exponential profile, the test set untouched, clear
errors; a long-tailed compare's per-class report, also when matplotlib is broken."""
import math

import numpy as np
import pytest
import torch

from lib.config import ConfigError, merge
from lib.data import DataConfig, build_data


def _build(**kw):
    return build_data(merge(DataConfig(), {"loader": "resident", **kw}), "cpu", batch_size=32, seed=3)


def _rows(x):
    return {bytes(row.numpy().tobytes()) for row in x}


def test_digits_ratio_10_keeps_the_stated_counts_and_leaves_the_test_set_alone():
    plain, tail = _build(name="digits"), _build(name="digits", long_tail_ratio=10)
    source = torch.bincount(plain.train.labels, minlength=10).tolist()
    # the CIFAR-LT profile: class c keeps floor(n_0 * 10^(-c/9)), class 0 all of its samples, class 9 a tenth
    expected = [min(source[c], math.floor(source[0] * 10 ** (-c / 9) + 1e-9)) for c in range(10)]
    assert torch.bincount(tail.train.labels, minlength=10).tolist() == expected
    assert expected[0] == source[0] and expected[9] == source[0] // 10
    assert tail.num_train == sum(expected)
    # the test split is the one without the option, sample for sample
    assert torch.equal(tail.test.images, plain.test.images) and torch.equal(tail.test.labels, plain.test.labels)
    # the kept training images are training images of the full split (a subset, not new or test data)
    assert _rows(tail.train.images) <= _rows(plain.train.images)
    assert not _rows(tail.train.images) & _rows(plain.test.images)
    # deterministic: the same seed draws the same subset
    again = _build(name="digits", long_tail_ratio=10)
    assert torch.equal(again.train.images, tail.train.images)


@pytest.mark.parametrize("name", ["synthetic", "npz"])
def test_every_in_memory_dataset_takes_the_profile(tmp_path, name):
    kw = {"name": name}
    if name == "npz":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (400, 8, 8, 3), dtype=np.uint8),
                 y_train=np.arange(400) % 4, x_test=rng.integers(0, 255, (40, 8, 8, 3), dtype=np.uint8),
                 y_test=np.arange(40) % 4)
        kw["root"] = str(tmp_path / "d.npz")
    else:
        kw.update(num_classes=4, train_samples=400, test_samples=40, image_size=8)
    data = _build(long_tail_ratio=8, **kw)
    assert torch.bincount(data.train.labels, minlength=4).tolist() == [100, 50, 25, 12]
    assert data.num_test == 40


def test_imagefolder_subsamples_its_file_list(tmp_path):
    from tools.make_imagefolder import MakeConfig, make_imagefolder
    root = tmp_path / "folder"
    make_imagefolder(MakeConfig(out=str(root), classes=3, train_per_class=8, val_per_class=2, width=16, height=16,
                                workers=1))
    cfg = merge(DataConfig(), {"name": "imagefolder", "root": str(root), "loader": "dataloader", "workers": 0,
                               "image_size": 16, "long_tail_ratio": 4})
    data = build_data(cfg, "cpu", batch_size=4, seed=0)
    labels = data.train._loader.dataset.labels
    assert np.bincount(labels, minlength=3).tolist() == [8, 4, 2] and data.num_train == 14
    assert data.num_test == 6  # val: every file
    x, _, _ = next(iter(data.train))  # the kept files load
    assert x.shape == (4, 3, 16, 16)


def test_bad_ratios_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="long_tail_ratio must be a number >= 1"):
        merge(DataConfig(), {"long_tail_ratio": 0.5})
    with pytest.raises(ConfigError, match=r"leaves class \d+ without samples.*use a ratio <= \d+"):
        _build(name="digits", long_tail_ratio=1000)


def test_a_long_tailed_compare_reports_per_class_and_survives_a_broken_matplotlib(tmp_path, monkeypatch, capsys):
    """End to end through train_ast: the head-vs-tail table is written, and a plot that fails (matplotlib missing,
    or failing inside) never fails the run: compare.md, compare.csv and per_class.csv are still written."""
    import sys
    import types

    import train_ast
    from lib import compare
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    runs = {"full": {"ast": {"mode": "full"}}, "ast": {}, "random": {"ast": {"mode": "random", "match": "ast"}}}
    cfg = merge(train_ast.Config(), {
        "run": {"out_dir": str(tmp_path), "name": "lt", "device": "cpu", "epochs": 2, "resume": "none"},
        "data": {"name": "digits", "image_size": 8, "loader": "resident", "long_tail_ratio": 10},
        "model": {"name": "small_cnn", "width": 8}, "loop": {"precision": "fp32", "global_batch": 64},
        "ast": {"mode": "epoch", "final_full_fraction": 0.0, "controller": {"target_rate": 0.3}},
        "compare": {"enabled": True, "runs": runs}})
    results = train_ast.main(cfg)
    root = tmp_path / "lt"
    out = capsys.readouterr().out
    assert "plots skipped: ModuleNotFoundError" in out and "train samples per class [" in out
    assert (root / "compare.md").is_file() and (root / "compare.csv").is_file() and not list(root.glob("*.png"))
    rows = (root / "per_class.csv").read_text().splitlines()
    assert rows[0].startswith("class,full,ast,random") and len(rows) == 11  # every class of the balanced test set

    broken = types.ModuleType("matplotlib")  # importable, but failing when used

    def use(_backend):
        raise RuntimeError("no backend")
    broken.use = use
    monkeypatch.setitem(sys.modules, "matplotlib", broken)
    (root / "compare.md").unlink()
    predictions = {(0, name): compare.load_predictions(root / name) for name in runs}
    compare.write_comparison(root, {0: results}, predictions, say=print)
    assert "plots skipped: RuntimeError: no backend" in capsys.readouterr().out and (root / "compare.md").is_file()
