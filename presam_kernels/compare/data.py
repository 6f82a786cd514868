"""Data sets for the comparison: loading, splitting, label noise, batching.

Every data set is held whole in memory as uint8 images plus int64 labels
(digits is 1797 images, CIFAR 60000), so a batch is an index into tensors and
the whole pipeline is deterministic given a ``torch.Generator``. Images are
normalised per batch, which keeps CIFAR at 180 MB instead of 720 MB.

Nothing is ever downloaded: ``digits`` ships inside scikit-learn, CIFAR is
read from a folder the user points at, in the python-pickle release format.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, replace

import numpy as np
import torch

DATASETS = ("digits", "cifar10", "cifar100")

# The test split of digits (which has none of its own) and the --quick subsets
# are fixed by this seed, not by --seeds: every seed is scored on the same
# images, and the seeds vary only initialisation, batch order and label noise.
SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


class DatasetError(Exception):
    """A data set is missing or not in the expected format; the message says
    which path was read and what was expected there."""


@dataclass(frozen=True)
class ImageDataset:
    """Images (N, C, H, W) uint8 in [0, ``scale``] and labels (N,) int64, for
    both splits, plus the per-channel statistics of the training images used
    to normalise every batch."""

    name: str
    num_classes: int
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool  # random crop + horizontal flip while training (CIFAR only)

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_images.shape[-1]


def _channel_stats(images: torch.Tensor, scale: float) -> tuple[tuple, tuple]:
    x = images.double() / scale
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def _make_dataset(name, num_classes, train, test, scale, augment) -> ImageDataset:
    mean, std = _channel_stats(train[0], scale)
    return ImageDataset(
        name=name,
        num_classes=num_classes,
        train_images=train[0],
        train_labels=train[1],
        test_images=test[0],
        test_labels=test[1],
        scale=scale,
        mean=mean,
        std=std,
        augment=augment,
    )


def load_digits() -> ImageDataset:
    """scikit-learn's handwritten digits: 1797 real 8x8 scans with 17 grey
    levels (0..16), 10 classes. It has no test split, so a fixed quarter of it
    (450 images, chosen by ``SPLIT_SEED``) is held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = round(DIGITS_TEST_FRACTION * len(labels))
    test, train = order[:n_test], order[n_test:]
    return _make_dataset(
        "digits", 10, (images[train], labels[train]), (images[test], labels[test]), 16.0, False
    )


# --- CIFAR, python-pickle release format -------------------------------------

_CIFAR_LAYOUT = {
    # name: (folder inside the archive, training files, test file, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ("train",), "test", "fine_labels", 100),
}

# The only globals a CIFAR pickle refers to (numpy arrays and, in files
# written by Python 3, bytes). Anything else is refused instead of run:
# unpickling executes whatever a file names.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def resolve_cifar_dir(name: str, data_dir: str) -> str:
    """The folder holding the batch files: ``data_dir`` itself, or its
    subfolder named as in the release archive (``cifar-10-batches-py``,
    ``cifar-100-python``)."""
    folder, train_files, test_file, _, _ = _CIFAR_LAYOUT[name]
    expected = train_files + (test_file,)
    for candidate in (data_dir, os.path.join(data_dir, folder)):
        if os.path.isfile(os.path.join(candidate, expected[0])):
            return candidate
    if not os.path.isdir(data_dir):
        raise DatasetError(
            f"--data-dir {data_dir!r} does not exist; expected a folder holding the {name} "
            f"python release ({folder}/ with {', '.join(expected)})"
        )
    raise DatasetError(
        f"no {name} data in {data_dir!r}: expected the file {expected[0]!r} (one of "
        f"{', '.join(expected)}) in that folder or in {os.path.join(data_dir, folder)!r}; "
        f"{name} is read from the python-pickle release and never downloaded"
    )


def _read_cifar_file(path: str, label_key: str, num_classes: int):
    if not os.path.isfile(path):
        raise DatasetError(f"missing CIFAR file {path!r}")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unreadable file gets the same explanation
        raise DatasetError(
            f"{path!r} is not a CIFAR python-pickle batch (a pickled dict): {exc}"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path!r}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DatasetError(
            f"{path!r}: expected keys b'data' and b'{label_key}', found {sorted(batch)}"
        )
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path!r}: expected b'data' as uint8 of shape (N, 3072), "
            f"found {data.dtype} of shape {data.shape}"
        )
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path!r}: expected {data.shape[0]} integer labels under b'{label_key}', "
            f"found {labels.dtype} of shape {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{path!r}: labels must lie in [0, {num_classes}), found "
            f"[{labels.min()}, {labels.max()}]"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def load_cifar(name: str, data_dir: str) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 from the python release (``data_batch_1..5`` and
    ``test_batch``, or ``train`` and ``test`` with fine labels), as found in
    ``data_dir`` or in its ``cifar-10-batches-py`` / ``cifar-100-python``."""
    _, train_files, test_file, label_key, num_classes = _CIFAR_LAYOUT[name]
    folder = resolve_cifar_dir(name, data_dir)
    parts = [_read_cifar_file(os.path.join(folder, f), label_key, num_classes) for f in train_files]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    test = _read_cifar_file(os.path.join(folder, test_file), label_key, num_classes)
    return _make_dataset(name, num_classes, train, test, 255.0, True)


def load_dataset(name: str, data_dir: str | None = None) -> ImageDataset:
    if name == "digits":
        return load_digits()
    if name in _CIFAR_LAYOUT:
        if data_dir is None:
            raise DatasetError(f"--dataset {name} needs --data-dir (the data is never downloaded)")
        return load_cifar(name, data_dir)
    raise DatasetError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")


# --- subsets, label noise, batches --------------------------------------------


def subset(dataset: ImageDataset, n_train: int | None, n_test: int | None = None) -> ImageDataset:
    """A fixed random subset (``SPLIT_SEED``) of each split, for --quick. The
    normalisation statistics stay those of the full training set."""
    gen = torch.Generator().manual_seed(SPLIT_SEED)

    def pick(images, labels, n):
        if n is None or n >= len(labels):
            return images, labels
        keep = torch.randperm(len(labels), generator=gen)[:n]
        return images[keep], labels[keep]

    train_images, train_labels = pick(dataset.train_images, dataset.train_labels, n_train)
    test_images, test_labels = pick(dataset.test_images, dataset.test_labels, n_test)
    return replace(
        dataset,
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
    )


def inject_label_noise(
    labels: torch.Tensor, noise: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: exactly ``round(noise * N)`` labels, chosen by
    ``seed``, each replaced by a class drawn uniformly from the other
    ``num_classes - 1``. Returns the noisy copy and the boolean mask of the
    changed entries; ``labels`` itself is not modified."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"label noise must lie in [0, 1), got {noise}")
    if num_classes < 2 and noise > 0:
        raise ValueError("label noise needs at least two classes")
    n = labels.numel()
    gen = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(n, generator=gen)[: round(noise * n)]
    # y + k mod C with k uniform in 1..C-1 is uniform over the other classes.
    offsets = torch.randint(1, max(num_classes, 2), (flipped.numel(),), generator=gen)
    noisy = labels.clone()
    noisy[flipped] = (labels[flipped] + offsets) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[flipped] = True
    return noisy, mask


def normalise(images: torch.Tensor, dataset: ImageDataset) -> torch.Tensor:
    """uint8 batch -> float32, standardised with the training-set statistics."""
    shape = (1, -1, 1, 1)
    mean = torch.tensor(dataset.mean, device=images.device, dtype=torch.float32).view(shape)
    std = torch.tensor(dataset.std, device=images.device, dtype=torch.float32).view(shape)
    return (images.float() / dataset.scale - mean) / std


def augment(images: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The standard CIFAR augmentation on a normalised batch: a random
    ``pad``-pixel shift (zero padding, i.e. the mean colour) and a random
    horizontal flip, one draw per image from ``gen`` (kept on the CPU so the
    draws do not depend on the device)."""
    n, _, h, w = images.shape
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=gen).to(images.device)
    flips = (torch.rand(n, generator=gen) < 0.5).to(images.device)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = (torch.arange(h, device=images.device).view(1, h) + shifts[:, :1]).view(n, 1, h, 1)
    cols = (torch.arange(w, device=images.device).view(1, w) + shifts[:, 1:]).view(n, 1, 1, w)
    cols = torch.where(flips.view(n, 1, 1, 1), cols.flip(-1), cols)
    idx_n = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    idx_c = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[idx_n, idx_c, rows, cols]


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Index tensors of a shuffled epoch. An incomplete last batch is dropped
    (a batch of a few images gives BatchNorm, and the step, mostly noise),
    unless it is the only one."""
    order = torch.randperm(n, generator=gen)
    full = max(n // batch_size, 1) * batch_size
    return order[:full].split(batch_size)
