"""Image datasets for the Vision Transformer (vaswani.vision): scikit-learn's bundled handwritten digits,
MNIST and CIFAR-10, in their published file formats; image files a user gives (.png, .npy); and the
training-time augmentation each dataset gets.

Every loader returns an `ImageSet`: uint8 pixels (N, C, H, W), integer labels and the class names. Files
are looked up in the data directory (`resolve_data_dir`) and, when missing there, downloaded into the
user cache and checked against their published MD5 (`ensure_file`). Every problem is a one-line DataError.

Fixed, seeded splits where a dataset has no validation split of its own:
- digits (1,797 8x8 images, pixel values 0-16): 70/10/20 train/valid/test, stratified by class (seed 0).
- MNIST: "valid" is 10% of the official 60,000 training images, stratified by class (seed 0); "test" is
  the official 10,000.
- CIFAR-10: "valid" is 10% of the official 50,000 training images, stratified (seed 0); "test" the
  official 10,000.

CIFAR-10 is read from its binary version (`cifar-10-binary.tar.gz`: fixed 3,073-byte records), never from
the Python version, whose pickles could run code when loaded. The archive's members are read in memory;
nothing is extracted to disk.
"""

from __future__ import annotations

import functools
import gzip
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaswani.data.datasets import SPLIT_SEED, PathLike, _canonical_split, _stratified_holdout
from vaswani.data.download import RemoteFile, ensure_file
from vaswani.data.paths import DataError, resolve_data_dir


@dataclass
class ImageSet:
    """Images with integer labels; `label_names[labels[i]]` is the class of `images[i]`.

    images: uint8 array (N, C, H, W); `pixel_max` is the value of a white pixel (255, or 16 for the digits).
    """

    images: np.ndarray
    labels: list[int]
    label_names: list[str]
    pixel_max: int = 255

    def __len__(self) -> int:
        return len(self.labels)

    def unit_tensor(self, indices: list[int] | None = None) -> Tensor:
        """The images (or those at `indices`) as float32 in [0, 1]."""
        images = self.images if indices is None else self.images[indices]
        return torch.from_numpy(np.ascontiguousarray(images)).float() / self.pixel_max

    def subset(self, indices: list[int]) -> ImageSet:
        return ImageSet(
            self.images[indices], [self.labels[i] for i in indices], self.label_names, self.pixel_max
        )

    @staticmethod
    def join(parts: Sequence[ImageSet]) -> ImageSet:
        """The parts one after another (the splits of one dataset: same labels, image shape, pixel range)."""
        if len(parts) == 1:
            return parts[0]
        images = np.concatenate([p.images for p in parts])
        return ImageSet(
            images, [y for p in parts for y in p.labels], parts[0].label_names, parts[0].pixel_max
        )


_SPLITS = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test"}
DIGIT_NAMES = [str(i) for i in range(10)]


def _split_off(data: ImageSet, split: str, fractions: dict[str, float]) -> ImageSet:
    return data.subset(_stratified_holdout(data.labels, fractions, SPLIT_SEED)[split])


# digits ------------------------------------------------------


def load_digits(split: str, data_dir: PathLike | None = None) -> ImageSet:
    """The 1,797 8x8 handwritten digits bundled with scikit-learn (UCI "Optical Recognition of Handwritten
    Digits", test part), pixel values 0-16. Splits "train" (1,259), "valid" (aliases "val", "dev"; 179),
    "test" (359): 70/10/20, stratified by class with seed 0. `data_dir` is unused: the data ship with
    scikit-learn (the `vision` extra)."""
    split = _canonical_split("digits", split, _SPLITS)
    images, labels = _sklearn_digits()
    data = ImageSet(images.copy(), list(labels), list(DIGIT_NAMES), pixel_max=16)
    return _split_off(data, split, {"valid": 0.1, "test": 0.2})


@functools.cache
def _sklearn_digits() -> tuple[np.ndarray, tuple[int, ...]]:
    """The images (1797, 1, 8, 8) and labels, read once per process (each split reads them)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'vaswani[vision]'") from None
    bunch = sklearn_digits()
    # The values are integers 0-16 stored as floats.
    return bunch.images.astype(np.uint8)[:, None], tuple(int(t) for t in bunch.target)


# MNIST -------------------------------------------------------

_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist"
# The MD5s torchvision checks (the files of Yann LeCun's page, mirrored).
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": RemoteFile(
        f"{_MNIST_BASE}/train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"
    ),
    "train-labels-idx1-ubyte.gz": RemoteFile(
        f"{_MNIST_BASE}/train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432"
    ),
    "t10k-images-idx3-ubyte.gz": RemoteFile(
        f"{_MNIST_BASE}/t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3"
    ),
    "t10k-labels-idx1-ubyte.gz": RemoteFile(
        f"{_MNIST_BASE}/t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c"
    ),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (gzipped or not): magic 0x0000 08 D (D = number of dimensions), D
    big-endian uint32 sizes, then the values in row-major order."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    dims = data[3]
    header = 4 + 4 * dims
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path}: {len(data)} bytes, but an IDX array of shape {shape} takes {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_mnist(split: str, data_dir: PathLike | None = None) -> ImageSet:
    """MNIST (LeCun et al. 1998), 28x28 grey handwritten digits, from `mnist/*-idx?-ubyte.gz`. Splits
    "train" (54,000) and "valid" (6,000; aliases "val", "dev") divide the official 60,000 training images,
    stratified with seed 0; "test" is the official 10,000."""
    split = _canonical_split("mnist", split, _SPLITS)
    root = resolve_data_dir(data_dir)
    prefix = "t10k" if split == "test" else "train"
    arrays = []
    for kind, dims in (("images", 3), ("labels", 1)):
        name = f"{prefix}-{kind}-idx{dims}-ubyte.gz"
        array = read_idx(ensure_file(root, f"mnist/{name}", MNIST_FILES[name]))
        if array.ndim != dims:
            raise DataError(f"mnist/{name}: expected {dims} dimensions, found {array.ndim}")
        arrays.append(array)
    images, labels = arrays
    if len(images) != len(labels) or (labels.size and labels.max() > 9):
        raise DataError(f"mnist/{prefix}: {len(images)} images but {len(labels)} labels in 0-9")
    data = ImageSet(images[:, None], labels.astype(int).tolist(), list(DIGIT_NAMES))
    return data if split == "test" else _split_off(data, split, {"valid": 0.1})


# CIFAR-10 ----------------------------------------------------

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The binary version's MD5, as published on https://www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_FILE = RemoteFile(
    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", md5="c32a1d4ab5d03f1284b67883e8d87530"
)
_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_DIR = "cifar-10-batches-bin"


def _cifar_batch(archive: tarfile.TarFile, name: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: records of 1 label byte, then 1,024 red, 1,024 green and 1,024 blue bytes, each
    32 rows of 32 pixels."""
    try:
        member = archive.getmember(f"{_CIFAR_DIR}/{name}")
    except KeyError:
        raise DataError(f"{path}: no {_CIFAR_DIR}/{name} in the archive") from None
    handle = archive.extractfile(member) if member.isfile() else None
    if handle is None:
        raise DataError(f"{path}: {_CIFAR_DIR}/{name} is not a regular file")
    data = handle.read()
    if not data or len(data) % _CIFAR_RECORD:
        raise DataError(f"{path}: {name} holds {len(data)} bytes, not whole {_CIFAR_RECORD}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise DataError(f"{path}: {name} has a label {int(labels.max())}, outside 0-9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def load_cifar10(split: str, data_dir: PathLike | None = None) -> ImageSet:
    """CIFAR-10 (Krizhevsky 2009), 32x32 colour images of 10 classes, from the binary version
    `cifar10/cifar-10-binary.tar.gz` (about 162 MB, downloaded into the user cache when missing). Splits
    "train" (45,000) and "valid" (5,000; aliases "val", "dev") divide data_batch_1-5, stratified with seed
    0; "test" is test_batch (10,000)."""
    split = _canonical_split("cifar10", split, _SPLITS)
    path = ensure_file(resolve_data_dir(data_dir), "cifar10/cifar-10-binary.tar.gz", CIFAR10_FILE)
    names = ["test_batch.bin"] if split == "test" else [f"data_batch_{i}.bin" for i in range(1, 6)]
    try:
        with tarfile.open(path, "r:gz") as archive:
            batches = [_cifar_batch(archive, name, path) for name in names]
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read the archive: {e}") from e
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches]).astype(int).tolist()
    data = ImageSet(images, labels, list(CIFAR10_LABELS))
    return data if split == "test" else _split_off(data, split, {"valid": 0.1})


# registry ----------------------------------------------------


@dataclass(frozen=True)
class ImageDatasetSpec:
    """A named image dataset: its loader and the shape and classes of its images (known without the data,
    so that a trained model can be rebuilt from its recipe alone)."""

    loader: Callable[..., ImageSet]
    image_size: int
    channels: int
    label_names: tuple[str, ...]
    description: str


IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
    "digits": ImageDatasetSpec(load_digits, 8, 1, tuple(DIGIT_NAMES), "8x8 digits, scikit-learn"),
    "mnist": ImageDatasetSpec(load_mnist, 28, 1, tuple(DIGIT_NAMES), "28x28 MNIST digits"),
    "cifar10": ImageDatasetSpec(load_cifar10, 32, 3, tuple(CIFAR10_LABELS), "32x32 CIFAR-10 colour images"),
}


def image_dataset(name: str) -> ImageDatasetSpec:
    if name not in IMAGE_DATASETS:
        raise DataError(f"unknown image dataset {name!r}; choose from {', '.join(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name]


def load_images(name: str, split: str, data_dir: PathLike | None = None) -> ImageSet:
    """Load an image dataset by name (see IMAGE_DATASETS)."""
    return image_dataset(name).loader(split, data_dir=data_dir)


# a user's image files ----------------------------------------


def read_image_file(path: PathLike, channels: int, image_size: int) -> Tensor:
    """One image file as a float32 (channels, image_size, image_size) tensor in [0, 1].

    .png: read with Pillow, converted to grey ("L") or RGB to match `channels`, 0-255 scaled to [0, 1].
    .npy: an array (H, W) or (C, H, W), uint8 (0-255) or float in [0, 1]; read without pickle.
    The image must already have the model's size: nothing is resized, so that what the model sees is
    what the file holds.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"{path}: cannot read the PNG: {e}") from e
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    elif suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: cannot read the array: {e}") from e
        array = array[None] if array.ndim == 2 else array
    else:
        raise DataError(f"{path}: an image must be a .png or .npy file")
    if array.ndim != 3 or array.shape[0] != channels:
        raise DataError(f"{path}: shape {array.shape}; the model takes {channels} channel(s)")
    if array.shape[1:] != (image_size, image_size):
        size = "x".join(map(str, array.shape[1:]))
        raise DataError(f"{path}: the image is {size}; the model takes {image_size}x{image_size}")
    if array.dtype == np.uint8:
        return torch.from_numpy(array.astype(np.float32) / 255.0)
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise DataError(f"{path}: pixels must be uint8 or finite floats, not {array.dtype}")
    if array.min() < 0.0 or array.max() > 1.0:
        raise DataError(f"{path}: float pixels must lie in [0, 1]")
    return torch.from_numpy(array.astype(np.float32))


# augmentation ------------------------------------------------

AUGMENTATIONS = ("none", "crop_flip")


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """The CIFAR-10 augmentation of ResNet training (He et al. 2016, §4.2): pad each image with `padding`
    zero pixels a side, crop a random window of the original size, flip it left-right with probability
    1/2. images (B, C, H, W); `generator` makes it reproducible."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).tolist()
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).tolist()
    flip = (torch.rand(b, generator=generator) < 0.5).tolist()
    out = torch.empty_like(images)
    for i in range(b):
        window = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = window.flip(-1) if flip[i] else window
    return out


def augment(images: Tensor, kind: str, padding: int, generator: torch.Generator) -> Tensor:
    """Apply the augmentation `kind` ("none" or "crop_flip") to a batch of images."""
    if kind == "none":
        return images
    if kind == "crop_flip":
        return random_crop_flip(images, padding, generator)
    raise ValueError(f"augmentation {kind!r} must be one of {AUGMENTATIONS}")
