"""Datasets known by name: where they live, how to read them, their statistics and augmentation.

`load_splits` returns the train / validation / test images in memory. The validation split is held out
from the training data (a fixed permutation, independent of the run's seed, so runs with different seeds
are compared on the same images); the test set is only used once, at the end of a run.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from biprop_hpc.data.readers import (DatasetMissing, cifar10_files, idx_files, read_cifar10_split,
                                     read_idx_split)

VAL_SPLIT_SEED = 20210501


@dataclass(frozen=True)
class DatasetInfo:
    reader: object
    files: object       # (directory, split, how_to_get) -> the paths `reader` opens; DatasetMissing if one is not
    default_dir: str
    how_to_get: str
    mean: tuple
    std: tuple
    num_classes: int
    crop_padding: int   # random crop with this padding (0: none) + horizontal flip when augmenting


DATASETS = {
    "fashion-mnist": DatasetInfo(
        read_idx_split, idx_files, "/usr/share/datasets/fashion-mnist",
        "Install it with `apt-get install dataset-fashion-mnist` (Debian) or point --data at a directory "
        "with the four IDX files.", (0.2860,), (0.3530,), 10, 0),
    "mnist": DatasetInfo(
        read_idx_split, idx_files, "",
        "Point --data at a directory with the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...).",
        (0.1307,), (0.3081,), 10, 0),
    "cifar10": DatasetInfo(
        read_cifar10_split, cifar10_files, "",
        "Point --data at the extracted `cifar-10-batches-py` directory of the python version of CIFAR-10 "
        "(nothing is downloaded at run time).", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10, 4),
}


def held_out_split(num_samples: int, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices, sorted: a fixed permutation (independent of the run's seed) of which
    the first round(val_fraction * num_samples) are held out for validation."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    n_val = int(round(val_fraction * num_samples))
    return order[n_val:].sort().values, order[:n_val].sort().values


@dataclass
class Split:
    images: torch.Tensor   # uint8, N x C x H x W
    labels: torch.Tensor   # int64, N

    def __len__(self):
        return len(self.labels)


@dataclass
class DataSplits:
    train: Split
    val: Split
    test: Split
    info: DatasetInfo

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]


def dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise ValueError(f"dataset: unknown {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_directory(dataset: str, data_dir: str = "") -> Path:
    """Where `dataset` is read from: `data_dir`, else its standard directory; DatasetMissing when there is none."""
    info = dataset_info(dataset)
    location = data_dir or info.default_dir
    if not location:  # Path("") would be the working directory
        raise DatasetMissing(f"dataset {dataset}: no --data given, and it has no standard directory. "
                             f"{info.how_to_get}")
    if not Path(location).is_dir():
        raise DatasetMissing(f"dataset {dataset}: directory {location!r} does not exist. {info.how_to_get}")
    return Path(location)


def check_dataset_files(dataset: str, data_dir: str = "") -> None:
    """DatasetMissing, in the words training would use, unless every file `dataset` reads is there (nothing read)."""
    info, directory = dataset_info(dataset), dataset_directory(dataset, data_dir)
    for split in ("train", "test"):
        info.files(directory, split, info.how_to_get)


def load_splits(dataset: str, data_dir: str = "", val_fraction: float = 0.1,
                train_subset: int = 0, test_subset: int = 0) -> DataSplits:
    info = dataset_info(dataset)
    directory = dataset_directory(dataset, data_dir)
    train = Split(*info.reader(directory, "train", info.how_to_get))
    test = Split(*info.reader(directory, "test", info.how_to_get))
    if train_subset:
        train = Split(train.images[:train_subset], train.labels[:train_subset])
    if test_subset:
        test = Split(test.images[:test_subset], test.labels[:test_subset])
    train_idx, val_idx = held_out_split(len(train), val_fraction)
    return DataSplits(Split(train.images[train_idx], train.labels[train_idx]),
                      Split(train.images[val_idx], train.labels[val_idx]), test, info)
