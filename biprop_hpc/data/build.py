"""From a config to this rank's train / validation / test batches, whatever the dataset and loader."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from biprop_hpc.choices import IMAGE_TREE_DATASETS
from biprop_hpc.data.augment import Augmentation
from biprop_hpc.data.batches import EvalBatches, TrainBatches, TrainPlan, eval_steps
from biprop_hpc.data.datasets import held_out_split, load_splits
from biprop_hpc.data.images import DaliLoader, Preprocess, TorchLoader, dali_available
from biprop_hpc.data.readers import DatasetMissing
from biprop_hpc.data.tree import load_split

log = logging.getLogger("biprop_hpc")



@dataclass
class Data:
    train: object          # .epoch(e, start_step) -> iterator of Batch; .steps(e) -> the plan; len() = steps per epoch
    val: object            # iterable of Batch (this rank's share)
    test: object
    in_channels: int
    num_classes: int
    image_size: int
    loader: str            # which loader serves the batches
    skipped: list = field(default_factory=list)   # files skipped on request (skip_bad_images)


def build_data(cfg, rank: int, world_size: int, device: torch.device) -> Data:
    if cfg.dataset in IMAGE_TREE_DATASETS:
        return _image_tree(cfg, rank, world_size, device)
    splits = load_splits(cfg.dataset, cfg.data, cfg.val_fraction, cfg.train_subset, cfg.test_subset)
    return Data(TrainBatches(splits.train, splits.info, cfg.batch_size, rank, world_size, cfg.seed, cfg.augment,
                             Augmentation.from_config(cfg)),
                EvalBatches(splits.val, splits.info, cfg.eval_batch_size, rank, world_size),
                EvalBatches(splits.test, splits.info, cfg.eval_batch_size, rank, world_size),
                splits.in_channels, splits.info.num_classes, splits.image_size, "memory")


def choose_loader(requested: str) -> str:
    if requested in ("dali", "dali-cpu") and not dali_available():
        raise DatasetMissing(f"loader {requested}: NVIDIA DALI is not installed (pip install "
                             "nvidia-dali-cuda130, or nvidia-dali-cuda120 for older drivers); or use --loader torch")
    if requested == "auto":
        if dali_available():
            return "dali"
        log.warning("NVIDIA DALI is not installed: reading images with the torch loader (--loader torch)")
        return "torch"
    return requested


def image_tree_root(dataset: str, data: str) -> Path:
    if not data:
        raise DatasetMissing(f"dataset {dataset}: give the image tree's root with --data DIR "
                             "(DIR/train/<class>/*.jpg, DIR/val/..., optionally DIR/test/...)")
    return Path(data)


def _image_tree(cfg, rank: int, world_size: int, device: torch.device) -> Data:
    root = image_tree_root(cfg.dataset, cfg.data)
    train = load_split(root, "train", skip_bad=cfg.skip_bad_images)
    if (root / "test").is_dir():
        val = load_split(root, "val", train.classes, cfg.skip_bad_images)
        test = load_split(root, "test", train.classes, cfg.skip_bad_images)
        skipped = train.skipped + val.skipped + test.skipped
    else:  # val/ is the test set (as for ImageNet); hold a validation split out of train/
        test = load_split(root, "val", train.classes, cfg.skip_bad_images)
        skipped = train.skipped + test.skipped
        train_idx, val_idx = held_out_split(len(train), cfg.val_fraction)
        train, val = train.subset(train_idx.tolist()), train.subset(val_idx.tolist())
    if cfg.train_subset:
        train = train.subset(range(min(cfg.train_subset, len(train))))
    if cfg.test_subset:
        test = test.subset(range(min(cfg.test_subset, len(test))))
    loader = choose_loader(cfg.loader)
    if cfg.augmentation != "none" and loader != "torch":  # only `auto` gets here: config.validate refuses dali
        log.info("augmentation %s runs in the torch loader: reading images with it", cfg.augmentation)
        loader = "torch"
    prep = Preprocess(cfg.crop_size, cfg.resize_size, cfg.random_area_min, cfg.channels_last)
    plan = TrainPlan(len(train), cfg.batch_size, rank, world_size, cfg.seed)

    def evaluation(images):
        steps = eval_steps(len(images), cfg.eval_batch_size, rank, world_size)
        return make(images, lambda epoch: steps, False)

    def make(images, steps_of_epoch, training):
        # Augmentation is keyed by (seed, epoch, sample), not by rank: see images.crop_window.
        if loader == "torch":
            return TorchLoader(images, steps_of_epoch, training, prep, cfg.loader_workers, cfg.seed,
                               pin_memory=device.type == "cuda",
                               augmentation=Augmentation.from_config(cfg) if training else Augmentation())
        return DaliLoader(images, steps_of_epoch, training, prep, device, cfg.loader_workers, cfg.seed,
                          cpu_only=loader == "dali-cpu")

    if skipped and rank == 0:
        log.warning("%d files skipped (listed in %s/filelist/*.skipped.txt), e.g. %s", len(skipped), root,
                    "; ".join(skipped[:3]))
    return Data(make(train, plan.steps, True), evaluation(val), evaluation(test), 3, len(train.classes),
                cfg.crop_size, loader, skipped)

