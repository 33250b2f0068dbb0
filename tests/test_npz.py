"""lib/datasets.py .npz input: every malformed file is one clear error naming the file, the array, what was found
and what is expected; well-formed variants (float labels that are whole numbers) load as their integer twins."""
import io

import numpy as np
import pytest
import torch

from lib.config import ConfigError
from lib.data import DataConfig, build_data


def load(path, **kw):
    return build_data(DataConfig(name="npz", root=str(path), **kw), "cpu", batch_size=4)


def write(path, **arrays):
    np.savez(path, **arrays)
    return path


def images(n=12, dtype=np.uint8):
    return np.random.default_rng(0).integers(0, 256, (n, 6, 6, 3)).astype(dtype)


LABELS = np.arange(12) % 3


@pytest.mark.parametrize("content", [b"", b"not an archive, just text\n", b"PK\x03\x04 truncated zip"])
def test_a_file_that_is_not_an_npz_is_named(tmp_path, content):
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"garbage\.npz is not an \.npz file"):
        load(path)


def test_an_npy_file_is_named(tmp_path):
    path = tmp_path / "one_array.npz"
    buffer = io.BytesIO()
    np.save(buffer, images())
    path.write_bytes(buffer.getvalue())
    with pytest.raises(ConfigError, match=r"one_array\.npz is a \.npy file .*shape \(12, 6, 6, 3\)"):
        load(path)


def test_a_damaged_member_is_named(tmp_path):
    path = write(tmp_path / "damaged.npz", x=images(), y=LABELS)
    raw = bytearray(path.read_bytes())
    start = raw.index(b"\x93NUMPY", raw.index(b"x.npy"))  # the first member's array header
    raw[start + 10:start + 60] = b"\xff" * 50                # scribble over its header
    path.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"damaged\.npz: x cannot be read"):
        load(path)


def test_object_arrays_are_refused_not_unpickled(tmp_path):
    path = write(tmp_path / "objects.npz", x=images(), y=np.array([{"label": i} for i in LABELS], dtype=object))
    with pytest.raises(ConfigError, match=r"objects\.npz: y holds Python objects"):
        load(path)


def test_unused_arrays_are_not_read(tmp_path):
    path = write(tmp_path / "extra.npz", x=images(), y=LABELS, notes=np.array([None], dtype=object))
    assert load(path).num_train == 10


@pytest.mark.parametrize("key, value, found", [
    ("x", images().astype(str), r"x has dtype <U"),
    ("y", np.array(["cat", "dog", "owl"] * 4), r"y has dtype <U3.*class names"),
    ("y", np.arange(12) * 1j, r"y has dtype complex128"),
])
def test_strings_and_other_non_numbers_are_refused(tmp_path, key, value, found):
    arrays = {"x": images(), "y": LABELS, key: value}
    path = write(tmp_path / "strings.npz", **arrays)
    with pytest.raises(ConfigError, match=r"strings\.npz: " + found):
        load(path)


def test_float_labels_must_be_whole_numbers(tmp_path):
    half = write(tmp_path / "half.npz", x=images(), y=LABELS + 0.5)
    with pytest.raises(ConfigError, match=r"half\.npz: y holds labels that are not whole numbers \(e\.g\. 0\.5 at "
                                          r"index 0\)"):
        load(half)
    nan = LABELS.astype(np.float32)
    nan[5] = np.nan
    with pytest.raises(ConfigError, match=r"y holds labels that are not whole numbers \(e\.g\. nan at index 5\)"):
        load(write(tmp_path / "nan.npz", x=images(), y=nan))


def test_whole_float_labels_load_like_integer_labels(tmp_path):
    ints = load(write(tmp_path / "ints.npz", x=images(), y=LABELS), loader="resident")
    floats = load(write(tmp_path / "floats.npz", x=images(), y=LABELS.astype(np.float64)), loader="resident")
    assert floats.train.labels.dtype == torch.int64
    assert torch.equal(ints.train.labels, floats.train.labels) and torch.equal(ints.test.labels, floats.test.labels)
    assert torch.equal(ints.train.images, floats.train.images)


def test_one_hot_labels_are_refused_with_a_hint(tmp_path):
    path = write(tmp_path / "onehot.npz", x=images(), y=np.eye(3)[LABELS])
    with pytest.raises(ConfigError, match=r"onehot\.npz: y has shape \(12, 3\).*argmax"):
        load(path)


@pytest.mark.parametrize("value, found", [(1e6, r"values in \[0, 1e\+06\]"), (np.inf, r"1 non-finite"),
                                          (np.nan, r"1 non-finite")])
def test_float_pixels_outside_float16_or_not_finite_are_refused(tmp_path, value, found):
    x = images(dtype=np.float64)
    x[3, 2, 2, 1] = value
    x[0, 0, 0, 0] = 0
    path = write(tmp_path / "pixels.npz", x=x, y=LABELS)
    with pytest.raises(ConfigError, match=r"pixels\.npz: x holds " + found):
        load(path)


def test_wide_integer_pixels_outside_float16_are_refused(tmp_path):
    x = images(dtype=np.uint16)
    x[1, 1, 1, 1] = 65535  # a 16-bit image: float16 (where non-uint8 images are stored) ends at 65504
    with pytest.raises(ConfigError, match=r"wide\.npz: x holds values in \[0, 65535\]"):
        load(write(tmp_path / "wide.npz", x=x, y=LABELS))


def test_float64_pixels_in_range_load_as_float16(tmp_path):
    x = images(dtype=np.float64) / 255.0
    data = load(write(tmp_path / "unit.npz", x=x, y=LABELS), loader="resident")
    assert data.train.images.dtype == torch.float16
    all_images = torch.cat([data.train.images, data.test.images]).float()
    assert all_images.min() >= 0 and all_images.max() <= 1


def test_empty_image_arrays_are_named(tmp_path):
    path = write(tmp_path / "empty.npz", x_train=np.zeros((0, 6, 6), np.uint8), y_train=np.zeros(0, np.int64),
                 x_test=np.zeros((2, 6, 6), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(ConfigError, match=r"empty\.npz: x_train holds no images"):
        load(path)
