"""Fashion-MNIST composites: a seeded image task with exact foreground masks.

Each image is a ``size x size`` grey canvas (default 64 x 64) with clutter, and one Fashion-MNIST
object pasted at a random place and scale. The class of the image is the object's class; its
mask is exact: the pixels where the pasted (resized) object is ``> 0``. The clutter never decides
the class: a texture (sinusoidal gratings and smooth noise), fragments (small crops) of other
Fashion-MNIST images drawn independently of the label, and pixel noise over everything.

Item ``i`` of a split is a function of ``(seed, split, i)`` alone (random access, any order, any
number of workers). The train split draws its objects and fragments from the package's 60,000
training images, the test split from its 10,000 test images: no object of the test split was
seen in training. Test item ``i`` pastes test object ``permutation[i % 10000]`` (a seeded
permutation), so the first 10,000 test items hold 10,000 distinct objects.

The images come from the Debian package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``; ``FASHION_MNIST_DIR`` or ``root=`` point elsewhere). A
copy of the first test items is kept as PNGs in the repository (``data/fashion-composites/test``,
written by ``scripts/make_fashion_composites.py``) and read by :class:`CompositeFolder` where the
package is absent.

Pixels are floats in ``[0, 1]``, ``[1, H, W]``; :func:`normalize` maps them to the models' input
(``(x - MEAN) / STD``, so the data set's mean pixel is 0).
"""

from __future__ import annotations

import csv
import gzip
import lzma
import os
import struct
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")

#: The ten Fashion-MNIST classes, by label.
CLASSES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                            "Bag", "Ankle boot")

#: Files of each split in the package.
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}

_SPLIT_CODE = {"train": 1, "test": 2}

#: Mean and standard deviation of the composites' pixels in [0, 1] (default config; measured on
#: 2,000 train items, ``pixel_statistics``); :func:`normalize` uses them.
MEAN = 0.2155
STD = 0.1994

#: The IDX type codes (third byte of the magic number) and their numpy dtypes (big-endian).
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class FashionMNISTMissing(FileNotFoundError):
    """The Fashion-MNIST IDX files are not installed."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzip- or xz-compressed, or not) as a numpy array of its shape (``[N, 28, 28]`` images, ``[N]`` labels).

    The header is two zero bytes, a type code, the number of dimensions, then each dimension as
    a big-endian 32-bit integer; the data follows.
    """
    path = Path(path)
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(body)} bytes follow")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The directory of the IDX files: ``root``, else ``$FASHION_MNIST_DIR``, else :data:`DEFAULT_ROOT`."""
    return Path(root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_ROOT)


def _find(base: Path, name: str) -> Path | None:
    """``base / name``, or the same file recompressed with xz (``.xz`` for ``.gz``), or uncompressed."""
    stem = name.removesuffix(".gz")
    for candidate in (name, stem + ".xz", stem):
        if (base / candidate).is_file():
            return base / candidate
    return None


def fashion_mnist_available(root: str | os.PathLike | None = None) -> bool:
    """Whether both splits' IDX files are there (``.gz`` as packaged, ``.xz`` or uncompressed)."""
    base = fashion_mnist_root(root)
    return all(_find(base, name) is not None for files in FILES.values() for name in files)


@lru_cache(maxsize=4)
def _load(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    images_file, labels_file = FILES[split]
    base = Path(root)
    images_path, labels_path = _find(base, images_file), _find(base, labels_file)
    if images_path is None or labels_path is None:
        raise FashionMNISTMissing(
            f"Fashion-MNIST is not installed in {base} (no {images_file}): install the Debian package with "
            "'apt-get update && apt-get install -y dataset-fashion-mnist', or set FASHION_MNIST_DIR to a directory "
            "holding the four *-ubyte.gz files (or *-ubyte.xz); the first test composites are also in data/fashion-composites/test")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{base}: {split} images {images.shape} and labels {labels.shape} do not match")
    return images, labels.astype(np.int64)


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` of the package's ``"train"`` or ``"test"`` split."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _load(split, str(fashion_mnist_root(root)))


@dataclass(frozen=True)
class CompositeConfig:
    """How composites are drawn (all sizes in pixels of the canvas).

    Attributes:
        size: canvas side.
        scale: range of the object's side (28 pixels resized to ``[low, high]``).
        fragments: range of the number of fragments of other objects.
        fragment_crop: range of a fragment's side in the 28 x 28 source image (a crop, never a whole object).
        fragment_scale: range of the factor a fragment is resized by.
        texture: largest amplitude of the background texture (0..255 grey levels).
        noise: largest standard deviation of the pixel noise (grey levels).
    """

    size: int = 64
    scale: tuple[int, int] = (22, 46)
    fragments: tuple[int, int] = (1, 3)
    fragment_crop: tuple[int, int] = (6, 10)
    fragment_scale: tuple[float, float] = (0.8, 1.3)
    texture: float = 70.0
    noise: float = 8.0

    def to_dict(self) -> dict:
        return asdict(self)


def _resize(image: np.ndarray, side: tuple[int, int]) -> np.ndarray:
    """``image`` (uint8 ``[h, w]``) resized to ``side = (height, width)`` bilinearly (Pillow)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((side[1], side[0]), Image.BILINEAR))


def _texture(rng: np.random.Generator, size: int, amplitude: float) -> np.ndarray:
    """A float ``[size, size]`` background: a base level, 1-2 sinusoidal gratings and smooth noise."""
    y, x = np.mgrid[0:size, 0:size] / size
    out = np.full((size, size), rng.uniform(0, 0.4 * amplitude))
    for _ in range(rng.integers(1, 3)):
        fx, fy = rng.uniform(-8, 8, size=2)
        out += rng.uniform(0, 0.5 * amplitude) * (0.5 + 0.5 * np.sin(2 * np.pi * (fx * x + fy * y) + rng.uniform(0, 6.3)))
    coarse = (rng.uniform(0, 1, size=(6, 6)) * 255).astype(np.uint8)
    out += _resize(coarse, (size, size)).astype(np.float64) / 255 * rng.uniform(0, 0.6 * amplitude)
    return out


def _fragment(rng: np.random.Generator, source: np.ndarray, config: CompositeConfig) -> np.ndarray:
    """A crop of ``source`` [28, 28] centred on one of its object's pixels, resized and dimmed."""
    side = int(rng.integers(config.fragment_crop[0], config.fragment_crop[1] + 1))
    ys, xs = np.nonzero(source)
    k = int(rng.integers(len(ys))) if len(ys) else 0
    cy, cx = (int(ys[k]), int(xs[k])) if len(ys) else (14, 14)
    top = int(np.clip(cy - side // 2, 0, 28 - side))
    left = int(np.clip(cx - side // 2, 0, 28 - side))
    crop = source[top:top + side, left:left + side]
    scaled = max(2, round(side * rng.uniform(*config.fragment_scale)))
    return _resize(crop, (scaled, scaled)).astype(np.float64) * rng.uniform(0.5, 1.0)


def make_composite(rng: np.random.Generator, obj: np.ndarray, pool: np.ndarray,
                   config: CompositeConfig = CompositeConfig()) -> tuple[np.ndarray, np.ndarray]:
    """One composite: ``(image [S, S] uint8, mask [S, S] bool)``.

    ``obj``: the ``[28, 28]`` uint8 object pasted whole; ``pool``: ``[N, 28, 28]`` images the
    fragments are cut from (drawn with ``rng``, independently of the object's label). The
    object replaces the canvas where its resized pixels are ``> 0``: exactly the mask.
    """
    size = config.size
    canvas = _texture(rng, size, config.texture)
    for _ in range(int(rng.integers(config.fragments[0], config.fragments[1] + 1))):
        piece = _fragment(rng, pool[int(rng.integers(len(pool)))], config)
        h, w = piece.shape
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        region = canvas[top:top + h, left:left + w]
        np.maximum(region, piece, out=region)
    side = int(rng.integers(config.scale[0], config.scale[1] + 1))
    aspect = rng.uniform(0.85, 1.15)
    shape = (min(size, side), min(size, max(8, round(side * aspect))))
    pasted = _resize(obj, shape)
    top, left = int(rng.integers(0, size - shape[0] + 1)), int(rng.integers(0, size - shape[1] + 1))
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + shape[0], left:left + shape[1]] = pasted > 0
    canvas[top:top + shape[0], left:left + shape[1]] = np.where(
        pasted > 0, pasted.astype(np.float64), canvas[top:top + shape[0], left:left + shape[1]])
    canvas += rng.normal(0, rng.uniform(0, config.noise), size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), mask


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in ``[0, 1]`` -> the models' input ``(x - MEAN) / STD`` (the data set's mean becomes 0)."""
    return (pixels - MEAN) / STD


class FashionComposites(torch.utils.data.Dataset):
    """Composites generated on the fly from the package's ``split`` (``"train"`` or ``"test"``).

    Item ``i``: ``(pixels [1, S, S] float32 in [0, 1], label, mask [S, S] bool)``, a function of
    ``(seed, split, i)`` only. ``length`` defaults to the split's number of Fashion-MNIST images.
    """

    def __init__(self, split: str = "test", length: int | None = None, *, seed: int = 0,
                 config: CompositeConfig = CompositeConfig(), root: str | os.PathLike | None = None):
        self.images, self.labels = load_fashion_mnist(split, root)
        self.split, self.seed, self.config = split, seed, config
        self.length = len(self.images) if length is None else int(length)
        self.order = np.random.default_rng([seed, _SPLIT_CODE[split]]).permutation(len(self.images))

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        """``(image [S, S] uint8, label, mask [S, S] bool)`` of item ``index``."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} composites")
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])
        k = int(self.order[index % len(self.order)])
        image, mask = make_composite(rng, self.images[k], self.images, self.config)
        return image, int(self.labels[k]), mask

    def __getitem__(self, index: int):
        image, label, mask = self.raw(index)
        return torch.from_numpy(image).float().div(255).unsqueeze(0), label, torch.from_numpy(mask)


class CompositeFolder(torch.utils.data.Dataset):
    """Composites saved as PNGs (:func:`save_composites`): ``index.csv`` with ``file, mask, label``.

    Items as in :class:`FashionComposites`.
    """

    def __init__(self, path: str | os.PathLike, length: int | None = None):
        self.path = Path(path)
        index = self.path / "index.csv"
        if not index.is_file():
            raise FileNotFoundError(f"{self.path}: no index.csv (write the folder with "
                                    "scripts/make_fashion_composites.py)")
        with open(index, newline="", encoding="utf-8") as f:
            self.rows = list(csv.DictReader(f))
        if length is not None:
            self.rows = self.rows[:length]

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, index: int) -> tuple[np.ndarray, int, np.ndarray]:
        from PIL import Image

        row = self.rows[index]
        image = np.asarray(Image.open(self.path / row["file"]).convert("L"))
        mask = np.asarray(Image.open(self.path / row["mask"]).convert("L")) > 0
        return image, int(row["label"]), mask

    def __getitem__(self, index: int):
        image, label, mask = self.raw(index)
        return torch.from_numpy(image.copy()).float().div(255).unsqueeze(0), label, torch.from_numpy(mask.copy())


def save_composites(dataset: FashionComposites, out: str | os.PathLike, count: int) -> Path:
    """Write items ``0 .. count-1`` of ``dataset`` to ``out`` as ``NNNNN.png`` (8-bit grey),
    ``NNNNN_mask.png`` (1-bit) and ``index.csv`` (``file, mask, label, class``)."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, label, mask = dataset.raw(i)
        name = f"{i:05d}"
        Image.fromarray(image).save(out / f"{name}.png", optimize=True)
        Image.fromarray(mask).convert("1").save(out / f"{name}_mask.png", optimize=True)
        rows.append({"file": f"{name}.png", "mask": f"{name}_mask.png", "label": label, "class": CLASSES[label]})
    with open(out / "index.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "mask", "label", "class"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def pixel_statistics(dataset, count: int = 2000) -> tuple[float, float]:
    """Mean and standard deviation of the pixels of the first ``count`` items of ``dataset``."""
    values = np.stack([dataset.raw(i)[0] for i in range(min(count, len(dataset)))]).astype(np.float64) / 255
    return float(values.mean()), float(values.std())
