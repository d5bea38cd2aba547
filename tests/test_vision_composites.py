"""The Fashion-MNIST composites: the IDX reader, the generator's masks, the saved PNGs.

Tests that need the Debian package dataset-fashion-mnist skip with that reason where it is absent;
the rest run on the PNGs kept in data/fashion-composites/test and on hand-made arrays.
"""

from __future__ import annotations

import gzip
import lzma
import struct
from pathlib import Path

import numpy as np
import pytest

from implicit_attention.vision.composites import (
    CLASSES,
    FILES,
    MEAN,
    STD,
    CompositeConfig,
    CompositeFolder,
    FashionComposites,
    FashionMNISTMissing,
    fashion_mnist_available,
    load_fashion_mnist,
    make_composite,
    pixel_statistics,
    read_idx,
)

SAVED = Path(__file__).resolve().parents[1] / "data" / "fashion-composites" / "test"
needs_package = pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian package "
                                   "dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)(path, "wb").write(body)
    return path


@pytest.mark.parametrize("suffix", [".gz", ".xz", ""])
def test_read_idx_reads_shape_and_values(tmp_path, suffix):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(read_idx(write_idx(tmp_path / f"x{suffix}", images)), images)
    wide = np.array([-5, 70000], dtype=np.int32)
    assert read_idx(write_idx(tmp_path / f"y{suffix}", wide, code=0x0C)).tolist() == [-5, 70000]


def test_read_idx_refuses_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((2, 2), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(tmp_path / "short")


def test_xz_recompressed_files_are_found(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    for split, (image_file, label_file) in FILES.items():
        write_idx(tmp_path / image_file.replace(".gz", ".xz"), images)
        write_idx(tmp_path / label_file.replace(".gz", ""), np.array([0, 1, 9], dtype=np.uint8))
    assert fashion_mnist_available(tmp_path)
    loaded, labels = load_fashion_mnist("train", root=tmp_path)
    assert np.array_equal(loaded, images) and labels.tolist() == [0, 1, 9]


def test_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(FashionMNISTMissing, match="apt-get update && apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("test", root=tmp_path)


def test_mask_is_exactly_the_pasted_object():
    rng = np.random.default_rng(0)
    obj = np.zeros((28, 28), np.uint8)
    obj[4:24, 8:20] = 200                                               # a bright block on black
    pool = rng.integers(0, 256, size=(5, 28, 28)).astype(np.uint8)
    # no clutter at all: the non-zero pixels are the object's
    bare = CompositeConfig(fragments=(0, 0), texture=0.0, noise=0.0)
    image, mask = make_composite(np.random.default_rng(1), obj, pool, bare)
    assert image.shape == mask.shape == (64, 64) and image.dtype == np.uint8 and mask.dtype == bool
    assert np.array_equal(image > 0, mask) and 0 < mask.sum() < mask.size
    # with clutter and noise the mask is the same footprint for the same draws of place and scale
    cluttered, mask2 = make_composite(np.random.default_rng(1), obj, pool, CompositeConfig(noise=0.0))
    ys, xs = np.nonzero(mask2)
    assert mask2.sum() > 0 and (cluttered[mask2] == 200).mean() > 0.5   # the block's inside is pasted as is
    again = make_composite(np.random.default_rng(1), obj, pool, CompositeConfig(noise=0.0))
    assert np.array_equal(again[0], cluttered) and np.array_equal(again[1], mask2)


def test_saved_composites_load_with_masks_and_labels():
    folder = CompositeFolder(SAVED)
    assert len(folder) >= 200
    assert sum(f.stat().st_size for f in SAVED.iterdir()) < 2_000_000
    labels = []
    for i in range(0, len(folder), 25):
        pixels, label, mask = folder[i]
        assert pixels.shape == (1, 64, 64) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
        assert mask.shape == (64, 64) and mask.dtype.is_floating_point is False
        assert 0.02 < float(mask.float().mean()) < 0.6
        labels.append(label)
    assert set(labels) <= set(range(10)) and len(set(labels)) > 3
    assert folder.rows[0]["class"] == CLASSES[int(folder.rows[0]["label"])]
    assert len(CompositeFolder(SAVED, length=5)) == 5


@needs_package
def test_generator_reproduces_the_saved_pngs():
    generated = FashionComposites("test")
    folder = CompositeFolder(SAVED)
    for i in (0, 1, 57, len(folder) - 1):
        image, label, mask = generated.raw(i)
        saved_image, saved_label, saved_mask = folder.raw(i)
        assert np.array_equal(image, saved_image) and label == saved_label and np.array_equal(mask, saved_mask)


@needs_package
def test_splits_use_their_own_images_and_items_are_random_access():
    train, test = FashionComposites("train", length=50), FashionComposites("test", length=50)
    assert len(train.images) == 60000 and len(test.images) == 10000
    assert not np.array_equal(train.raw(3)[0], test.raw(3)[0])
    assert np.array_equal(test.raw(7)[0], FashionComposites("test", length=50).raw(7)[0])
    assert not np.array_equal(test.raw(7)[0], FashionComposites("test", length=50, seed=1).raw(7)[0])
    # the test items' objects are distinct test images
    assert len(set(test.order[:10000].tolist())) == 10000
    with pytest.raises(IndexError):
        test.raw(50)


@needs_package
def test_normalisation_constants_match_the_data():
    mean, std = pixel_statistics(FashionComposites("train"), count=300)
    assert abs(mean - MEAN) < 0.01 and abs(std - STD) < 0.01
