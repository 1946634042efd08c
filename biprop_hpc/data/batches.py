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

from biprop_hpc.data.augment import Augmentation, augment_batch
from biprop_hpc.data.datasets import DatasetInfo, Split


@dataclass
class Batch:
    images: torch.Tensor   # float32, normalised, B x C x H x W
    labels: torch.Tensor   # int64, B
    global_size: int       # samples in this step summed over all ranks
    # AugMix with the consistency loss (data.augment): 2 x B x C x H x W augmented views of `images`, else None
    views: torch.Tensor | None = None


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
    return normalise_unit(images.float() / 255.0, info)


def normalise_unit(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Floats in [0, 1] (channels in dimension -3), normalised with the dataset's mean and std."""
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return (images - mean) / std


def crop_and_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                  padding: int) -> torch.Tensor:
    """Per sample: zero-pad by `padding`, crop the original size at offset (dy, dx), flip where asked."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class TrainPlan:
    """Which samples each step of an epoch uses on one rank; the same plan serves every loader."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.bounds = global_batch_bounds(num_samples, batch_size, world_size)
        self._cached = (None, None)

    def __len__(self) -> int:
        return len(self.bounds)

    def steps(self, epoch: int) -> list[tuple[torch.Tensor, int]]:
        """(this rank's sample indices, global batch size) for every step of `epoch`."""
        if self._cached[0] != epoch:
            order = torch.randperm(self.num_samples, generator=epoch_generator(self.seed, epoch))
            self._cached = (epoch, [(order[start:end][self.rank::self.world_size], end - start)
                                    for start, end in self.bounds])
        return self._cached[1]

    def epoch_indices(self, epoch: int) -> list[torch.Tensor]:
        return [index for index, _ in self.steps(epoch)]


def eval_steps(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[tuple[torch.Tensor, int]]:
    """This rank's share of an evaluation split (samples rank, rank + world, ...), no padding."""
    index = torch.arange(rank, num_samples, world_size)
    return [(index[start:start + batch_size], num_samples) for start in range(0, len(index), batch_size)]


class TrainBatches:
    """The training batches of one rank from an in-memory split, epoch by epoch."""

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, rank: int, world_size: int,
                 seed: int, augment: bool, augmentation: Augmentation = Augmentation()):
        self.split, self.info, self.seed = split, info, seed
        self.augment = augment and info.crop_padding > 0
        self.augmentation = augmentation  # AugMix or noise after the crop and flip (data.augment)
        self.plan = TrainPlan(len(split), batch_size, rank, world_size, seed)

    def __len__(self) -> int:
        return len(self.plan)

    def epoch_indices(self, epoch: int) -> list[torch.Tensor]:
        return self.plan.epoch_indices(epoch)

    def steps(self, epoch: int) -> list[tuple[torch.Tensor, int]]:
        return self.plan.steps(epoch)

    def epoch(self, epoch: int, start: int = 0):
        """The batches of `epoch` from step `start` on (a resumed run starts mid-epoch)."""
        if self.augment:
            # Drawn for every sample (indexed by sample), so augmentation does not depend on sharding.
            generator = epoch_generator(self.seed + 1, epoch)
            pad = self.info.crop_padding
            offsets = torch.randint(0, 2 * pad + 1, (2, len(self.split)), generator=generator)
            flips = torch.rand(len(self.split), generator=generator) < 0.5
        for index, global_size in self.plan.steps(epoch)[start:]:
            images = self.split.images[index]
            if self.augment:
                images = crop_and_flip(images, offsets[0, index], offsets[1, index], flips[index], pad)
            if self.augmentation.kind == "none":
                yield Batch(normalise(images, self.info), self.split.labels[index], global_size)
                continue
            images, views = augment_batch(images, index.tolist(), epoch, self.seed, self.augmentation)
            yield Batch(normalise_unit(images, self.info), self.split.labels[index], global_size,
                        None if views is None else normalise_unit(views, self.info))


class EvalBatches:
    """This rank's share of an in-memory evaluation split."""

    def __init__(self, split: Split, info: DatasetInfo, batch_size: int, rank: int, world_size: int):
        self.split, self.info = split, info
        self.steps = eval_steps(len(split), batch_size, rank, world_size)

    def __iter__(self):
        for index, total in self.steps:
            yield Batch(normalise(self.split.images[index], self.info), self.split.labels[index], total)
