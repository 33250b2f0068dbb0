"""tools/make_subset.py: deterministic subsets of an ImageFolder as links, read by the ImageFolder loader; the source
is never copied or changed; bad requests fail before anything is written."""
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from lib.config import ConfigError
from lib.data import DataConfig, build_data
from lib.run import run_script
from tools import make_subset
from tools.make_imagefolder import MakeConfig, make_imagefolder
from tools.make_subset import SubsetConfig


@pytest.fixture
def source(tmp_path):
    """A tiny ImageFolder of real JPEGs: 4 classes x 6 train + 3 val images of 16x16 px."""
    root = tmp_path / "source"
    make_imagefolder(MakeConfig(out=str(root), classes=4, train_per_class=6, val_per_class=3, width=16, height=16,
                                workers=1))
    return root


def tree_state(root):
    """{relative path: (sha256 of the bytes, size, mtime)} of every file under root."""
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            path = Path(folder) / f
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[str(path.relative_to(root))] = (digest, st.st_size, st.st_mtime_ns)
    return out


def images(out):
    return sorted(str(p.relative_to(out)) for p in Path(out).glob("*/*/*"))


def test_class_subset_links_into_the_source_and_the_loader_reads_it(source, tmp_path):
    before = tree_state(source)
    out = tmp_path / "in2"
    manifest = make_subset.make_subset(SubsetConfig(root=str(source), out=str(out), classes=2, seed=0))
    assert tree_state(source) == before  # nothing in the source copied, moved or changed
    files = images(out)
    assert len(files) == 2 * 6 + 2 * 3 == sum(manifest["totals"].values())
    for rel in files:
        link = out / rel
        assert link.is_symlink() and os.readlink(link) == str(source.resolve() / rel)  # absolute, into the source
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["source_root"] == str(source.resolve()) and on_disk["seed"] == 0
    assert on_disk["counts"] == {"train": {c: 6 for c in on_disk["classes"]}, "val": {c: 3 for c in on_disk["classes"]}}
    assert on_disk["files_sha256"] == hashlib.sha256("\n".join(files).encode()).hexdigest()
    # the ImageFolder loader reads it like any folder
    data = build_data(DataConfig(name="imagefolder", root=str(out), loader="dataloader", workers=0, image_size=16),
                      "cpu", batch_size=4)
    assert data.classes == on_disk["classes"] and data.num_train == 12 and data.num_test == 6
    x, y, _ = next(iter(data.train))
    assert x.shape == (4, 3, 16, 16) and y.max() < 2


def test_fraction_is_class_stratified_and_the_same_seed_gives_the_same_subset(source, tmp_path):
    cfg = SubsetConfig(root=str(source), out=str(tmp_path / "a"), fraction=0.5, seed=3)
    first = make_subset.make_subset(cfg)
    again = make_subset.make_subset(replace(cfg, out=str(tmp_path / "b")))
    other = make_subset.make_subset(replace(cfg, out=str(tmp_path / "c"), seed=4))
    assert first["files_sha256"] == again["files_sha256"] and images(tmp_path / "a") == images(tmp_path / "b")
    assert other["files_sha256"] != first["files_sha256"]
    assert set(first["counts"]["train"].values()) == {3} and len(first["classes"]) == 4  # half of each class
    assert set(first["counts"]["val"].values()) == {3}                                   # --val all
    same_val = make_subset.make_subset(replace(cfg, out=str(tmp_path / "d"), val="same"))
    assert set(same_val["counts"]["val"].values()) == {2}  # round(0.5 x 3) = 2 (halves round up)
    # subsets nest: 2 classes of a seed are among its 3
    two = make_subset.make_subset(replace(cfg, out=str(tmp_path / "e"), fraction=0.0, classes=2))
    three = make_subset.make_subset(replace(cfg, out=str(tmp_path / "f"), fraction=0.0, classes=3))
    assert set(two["classes"]) < set(three["classes"])


def test_hard_links_share_the_source_inodes(source, tmp_path):
    before = {k: v[0] for k, v in tree_state(source).items()}
    out = tmp_path / "hard"
    make_subset.make_subset(SubsetConfig(root=str(source), out=str(out), per_class=2, link="hardlink"))
    for rel in images(out):
        assert not (out / rel).is_symlink() and (out / rel).stat().st_ino == (source / rel).stat().st_ino
    assert {k: v[0] for k, v in tree_state(source).items()} == before  # contents unchanged


def test_a_rerun_is_a_no_op_and_another_request_is_refused(source, tmp_path):
    cfg = SubsetConfig(root=str(source), out=str(tmp_path / "s"), classes=3, seed=1)
    make_subset.make_subset(cfg)
    state = tree_state(tmp_path / "s")
    assert make_subset.make_subset(cfg)["already_written"]
    with pytest.raises(ConfigError, match=r"another request \(seed: 1 -> 2\)"):
        make_subset.make_subset(replace(cfg, seed=2))
    assert tree_state(tmp_path / "s") == state
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no readable manifest.json"):
        make_subset.make_subset(replace(cfg, out=str(tmp_path / "other")))
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert not make_subset.make_subset(replace(cfg, out=str(tmp_path / "empty")))["already_written"]


@pytest.mark.parametrize("request_, message", [
    ({"classes": 5}, r"--classes 5 but .* has only 4 classes"),
    ({"per_class": 7}, r"--per_class 7 but 4 class\(es\) hold fewer train images"),
    ({"per_class": 4, "val": "same"}, r"hold fewer val images.*or use --val all"),
    ({"class_list": "LIST", "list": "n00000001\nn00000099\n"}, r"names 1 class\(es\) that .* lacks: \['n00000099'\]"),
    ({"class_list": "LIST", "list": "n00000001\n", "classes": 2}, r"--classes 2 but --class_list names 1"),
    ({"fraction": 0.5, "per_class": 2}, "not both"),
    ({}, "nothing to select"),
    ({"classes": 2, "out": "INSIDE"}, "overlap"),
])
def test_bad_requests_fail_before_anything_is_written(source, tmp_path, request_, message):
    request_ = dict(request_)
    if request_.pop("class_list", None):
        (tmp_path / "list.txt").write_text(request_.pop("list"))
        request_["class_list"] = str(tmp_path / "list.txt")
    out = source / "train" / "sub" if request_.pop("out", None) else tmp_path / "out"
    before = tree_state(source)
    with pytest.raises(ConfigError, match=message):
        make_subset.make_subset(SubsetConfig(root=str(source), out=str(out), **request_))
    assert not out.exists() and not list(tmp_path.glob(".*partial")) and tree_state(source) == before


def test_an_interrupted_write_leaves_no_output_and_the_rerun_completes(source, tmp_path, monkeypatch):
    cfg = SubsetConfig(root=str(source), out=str(tmp_path / "s"), classes=2)
    real, calls = os.symlink, []

    def fail_on_the_fifth(*args):
        calls.append(args)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args)
    monkeypatch.setattr(os, "symlink", fail_on_the_fifth)
    with pytest.raises(ConfigError, match="No space left.*nothing was written"):
        make_subset.make_subset(cfg)
    assert not (tmp_path / "s").exists() and not list(tmp_path.glob(".s.partial"))
    monkeypatch.setattr(os, "symlink", real)
    stale = tmp_path / ".s.partial"  # what a killed process leaves: its marked hidden folder, removed on the rerun
    (stale / "train").mkdir(parents=True)
    (stale / make_subset.PARTIAL_MARKER).write_text("")
    assert len(images(make_subset.make_subset(cfg)["out"])) == 18 and not stale.exists()


def test_the_command_line_gives_one_line_errors_and_help(source, tmp_path, capsys):
    argv = ["--root", str(source), "--out", str(tmp_path / "o"), "--classes", "9"]
    with pytest.raises(SystemExit, match=r"^error: --classes 9 but .* only 4 classes"):
        run_script(make_subset.main, SubsetConfig(), make_subset.__doc__, argv=argv)
    with pytest.raises(SystemExit, match="config error: unknown config key 'clases'"):
        run_script(make_subset.main, SubsetConfig(), make_subset.__doc__, argv=["--clases=2"])
    run_script(make_subset.main, SubsetConfig(), make_subset.__doc__, argv=argv[:-1] + ["2"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["totals"] == {"train": 12, "val": 6}
