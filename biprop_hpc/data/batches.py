"""Batches of in-memory images, sharded across ranks so that each sample is used exactly once.

Training: each epoch the whole training set is permuted with a generator seeded by (seed, epoch), the same
on every rank; the permutation is cut into global batches of batch_size * world_size samples, and rank r
takes positions r, r + world, ... of each global batch. A remainder too small to give every rank two samples
(BatchNorm needs two) joins the last global batch, so every sample is used once per epoch and every rank
takes the same number of steps. Each Batch carries the size of its global batch: the loop divides the summed
loss by it, so gradients summed across ranks equal one process's gradient on the whole global batch.

Augmentation (random crop with padding + horizontal flip) is drawn per sample from the epoch's generator,
so a sample is augmented the same way whatever the number of ranks.

Evaluation: rank r takes samples r, r + world, ...; no padding, so metrics reduced as sums count each
sample exactly once.
"""
from dataclasses import dataclass

import torch

from biprop_hpc.data.datasets import DatasetInfo, Split


@dataclass
class Batch:
    images: torch.Tensor   # float32, normalised, B x C x H x W
    labels: torch.Tensor   # int64, B
    global_size: int       # samples in this step summed over all ranks


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100003 + epoch)


def global_batch_bounds(num_samples: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of each global batch over an epoch's permutation; covers every sample once."""
    if num_samples < 2 * world_size:
        raise ValueError(f"{num_samples} training samples cannot give each of {world_size} ranks two "
                         "samples per step; use more data (train_subset) or fewer ranks")
    size = batch_size * world_size
    bounds = [(start, min(start + size, num_samples)) for start in range(0, num_samples, size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2 * world_size:
        bounds[-2:] = [(bounds[-2][0], num_samples)]
    return bounds


def normalise(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean) / std


def crop_and_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  padding: int) -> torch.Tensor:
    """Per sample: zero-pad by `padding`, crop the original size at offset (dy, dx), flip where asked."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class TrainBatches:
    """The training batches of one rank, epoch by epoch."""

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, rank: int, world_size: int,
                 seed: int, augment: bool):
        self.split, self.info = split, info
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.augment = augment and info.crop_padding > 0
        self.bounds = global_batch_bounds(len(split), batch_size, world_size)

    def __len__(self) -> int:
        return len(self.bounds)

    def epoch_indices(self, epoch: int) -> list[torch.Tensor]:
        """The sample indices this rank uses at each step of `epoch`."""
        order = torch.randperm(len(self.split), generator=epoch_generator(self.seed, epoch))
        return [order[start:end][self.rank::self.world_size] for start, end in self.bounds]

    def epoch(self, epoch: int):
        generator = epoch_generator(self.seed, epoch)
        order = torch.randperm(len(self.split), generator=generator)
        if self.augment:
            pad = self.info.crop_padding
            # Drawn for every sample (indexed by sample), so augmentation does not depend on sharding.
            offsets = torch.randint(0, 2 * pad + 1, (2, len(self.split)), generator=generator)
            flips = torch.rand(len(self.split), generator=generator) < 0.5
        for start, end in self.bounds:
            index = order[start:end][self.rank::self.world_size]
            images = self.split.images[index]
            if self.augment:
                images = crop_and_flip(images, offsets[0, index], offsets[1, index], flips[index], pad)
            yield Batch(normalise(images, self.info), self.split.labels[index], end - start)


class EvalBatches:
    """This rank's share of an evaluation split: samples rank, rank + world, ... in order."""

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, rank: int, world_size: int):
        self.index = torch.arange(rank, len(split), world_size)
        self.split, self.info, self.batch_size = split, info, batch_size
        self.total = len(split)

    def __iter__(self):
        for start in range(0, len(self.index), self.batch_size):
            index = self.index[start:start + self.batch_size]
            yield Batch(normalise(self.split.images[index], self.info), self.split.labels[index],
                        self.total)
