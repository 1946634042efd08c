"""Render an in-memory dataset as an ImageNet-style JPEG tree, to exercise the image-tree input path.

`prepare_fashion_mnist` writes <out>/{train,val,test}/<class>/<index>.jpg from the Fashion-MNIST IDX
files: val/ is held out from the IDX training set with the same fixed permutation as
`biprop_hpc.data.datasets.load_splits` (so a run on the tree sees the same validation images as a run on
the IDX files), test/ is the IDX t10k set. <index> is the image's index in its IDX file, zero-padded so
that a sorted walk keeps the IDX order. The tree is written beside <out> and renamed into place once
`check_tree` has validated it and written its file lists, so <out> is either absent, the old tree, or
complete.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from biprop_hpc.data.datasets import DATASETS, held_out_split
from biprop_hpc.data.readers import DatasetMissing, read_idx_split

log = logging.getLogger("biprop_hpc")

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CHUNK = 2000   # images per task handed to a writer process


class OutputExists(ValueError):
    """The output directory exists and is not empty (and force was not given)."""


def safe_class_names(names) -> list[str]:
    """"T-shirt/top" -> "0_t-shirt_top": lower case, [a-z0-9-] kept, runs of anything else -> "_",
    prefixed with the zero-padded label so that sorted folder names are in label order."""
    width = len(str(len(names) - 1))
    out = []
    for label, name in enumerate(names):
        cleaned = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "_" for c in name.lower())
        cleaned = "_".join(part for part in cleaned.split("_") if part)
        out.append(f"{label:0{width}d}_{cleaned}")
    return out


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def _write_jpegs(images: np.ndarray, paths: list[str], quality: int) -> int:
    for image, path in zip(images, paths):
        Image.fromarray(np.ascontiguousarray(image)).save(path, format="JPEG", quality=quality)
    return len(paths)


def _select(labels: np.ndarray, limit: int, num_classes: int) -> np.ndarray:
    """Positions to keep: all, or the first `limit` plus the first of each class they miss (an image
    tree must not have an empty class folder)."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    keep = set(range(limit))
    present = set(labels[:limit].tolist())
    for label in range(num_classes):
        if label not in present:
            hits = np.flatnonzero(labels == label)
            if len(hits):
                keep.add(int(hits[0]))
    return np.array(sorted(keep), dtype=np.int64)


def _check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise OutputExists(f"{out_dir} exists and is not a directory; choose another --out")
        if any(out_dir.iterdir()) and not force:
            raise OutputExists(f"{out_dir} exists and is not empty; pass --force to replace it "
                                  "(its contents are deleted), or choose another --out")


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    _check_out_dir(out_dir, force)   # again: something may have appeared while rendering
    old = None
    if out_dir.is_dir():
        if any(out_dir.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            out_dir.replace(old / "tree")
        else:
            out_dir.rmdir()
    tmp.replace(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_fashion_mnist_tree(out_dir, source_dir="", val_fraction=0.1, quality=95, limit_per_split=0,
                               force=False, workers=0):
    """prepare_fashion_mnist, returning (counts, CheckReport)."""
    from biprop_hpc.data.check import check_tree   # check imports this module for the CLI

    start = time.perf_counter()
    info = DATASETS["fashion-mnist"]
    out_dir = Path(out_dir).expanduser().absolute()
    source = Path(source_dir or info.default_dir)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}: val/ is held out from train")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if limit_per_split < 0:
        raise ValueError(f"limit_per_split must be >= 0 (0: all), got {limit_per_split}")
    _check_out_dir(out_dir, force)
    if not source.is_dir():
        raise DatasetMissing(f"dataset fashion-mnist: directory {str(source)!r} does not exist. {info.how_to_get}")
    train_images, train_labels = read_idx_split(source, "train", info.how_to_get)
    test_images, test_labels = read_idx_split(source, "test", info.how_to_get)
    train_images, test_images = train_images[:, 0].numpy(), test_images[:, 0].numpy()
    train_labels, test_labels = train_labels.numpy(), test_labels.numpy()
    train_idx, val_idx = (index.numpy() for index in held_out_split(len(train_labels), val_fraction))
    classes = safe_class_names(FASHION_MNIST_CLASSES)
    width = len(str(max(len(train_labels), len(test_labels)) - 1))

    plan = {}   # split -> (images, labels, IDX indices)
    for split, images, labels, indices in (("train", train_images, train_labels, train_idx),
                                           ("val", train_images, train_labels, val_idx),
                                           ("test", test_images, test_labels, np.arange(len(test_labels)))):
        indices = indices[_select(labels[indices], limit_per_split, len(classes))]
        plan[split] = (images, labels, indices)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        tasks = []
        for split, (images, labels, indices) in plan.items():
            for name in classes:
                (tmp / split / name).mkdir(parents=True)
            paths = [str(tmp / split / classes[labels[i]] / f"{i:0{width}d}.jpg") for i in indices]
            for begin in range(0, len(indices), _CHUNK):
                tasks.append((images[indices[begin:begin + _CHUNK]], paths[begin:begin + _CHUNK]))
        workers = workers or min(_cpu_count(), 16)
        total = sum(len(p) for _, p in tasks)
        if workers <= 1 or len(tasks) <= 1:
            for images, paths in tasks:
                _write_jpegs(images, paths, quality)
        else:
            with ProcessPoolExecutor(workers) as pool:
                list(pool.map(_write_jpegs, *zip(*tasks), [quality] * len(tasks)))
        written = time.perf_counter()
        log.info("wrote %d JPEGs in %.1fs; checking them", total, written - start)
        report = check_tree(tmp, skip_bad=False, write_lists=True, workers=workers)
        _move_into_place(tmp, out_dir, force)
        report.root = out_dir
        report.file_lists = {split: out_dir / path.relative_to(tmp) for split, path in report.file_lists.items()}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = {split: len(indices) for split, (_, _, indices) in plan.items()}
    log.info("fashion-mnist tree in %s: %s (%.1fs)", out_dir, counts, time.perf_counter() - start)
    return counts, report


def prepare_fashion_mnist(out_dir, source_dir="", val_fraction=0.1, quality=95, limit_per_split=0,
                          force=False) -> dict:
    """Render Fashion-MNIST's IDX files as out_dir/{train,val,test}/<class>/<index>.jpg (grayscale JPEGs),
    val held out from train as load_splits does; check it, write its file lists; return {split: count}.

    source_dir: the IDX files (default: DATASETS['fashion-mnist'].default_dir). limit_per_split: keep the
    first N of each split (0: all), plus the first image of any class those miss. A non-empty out_dir is
    refused unless force, which replaces it.
    """
    counts, _ = prepare_fashion_mnist_tree(out_dir, source_dir, val_fraction, quality, limit_per_split, force)
    return counts
