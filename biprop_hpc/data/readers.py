"""Readers for datasets stored as files: IDX (MNIST, Fashion-MNIST) and CIFAR-10 (python pickles).

Each returns uint8 images N x C x H x W and int64 labels, fully in memory. Nothing is downloaded.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# The python version of CIFAR-10: the pickled batches of each split.
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
IDX_DTYPES = {0x08: np.uint8}


class DatasetMissing(FileNotFoundError):
    """A dataset file is not where it was looked for; the message says where and how to get it."""


def _find(directory: Path, stem: str, how_to_get: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetMissing(f"{stem}[.gz] not found in {directory}. {how_to_get}")


def idx_files(directory: Path, split: str, how_to_get: str) -> list[Path]:
    """The images and labels files of an IDX split (gzipped or not); DatasetMissing names a missing one."""
    return [_find(directory, stem, how_to_get) for stem in IDX_FILES[split]]


def cifar10_files(directory: Path, split: str, how_to_get: str) -> list[Path]:
    """The pickled batches of a CIFAR-10 split; DatasetMissing names a missing one."""
    for name in CIFAR10_FILES[split]:
        if not (directory / name).is_file():
            raise DatasetMissing(f"{name} not found in {directory}. {how_to_get}")
    return [directory / name for name in CIFAR10_FILES[split]]


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (http://yann.lecun.com/exdb/mnist/ format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def read_idx_split(directory: Path, split: str, how_to_get: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch  # here: data.check imports this module for the command line, which starts without torch
    images, labels = map(read_idx, idx_files(directory, split, how_to_get))
    if len(images) != len(labels):
        raise ValueError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def read_cifar10_split(directory: Path, split: str, how_to_get: str) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    images, labels = [], []
    for path in cifar10_files(directory, split, how_to_get):
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64)
