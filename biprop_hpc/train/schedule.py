"""Learning-rate schedules. The rate changes once per epoch (as in the paper's code); warmup is linear."""
import math


def lr_at_epoch(schedule: str, base_lr: float, epoch: int, epochs: int, warmup_epochs: int = 0,
                milestones=(), gamma: float = 0.1) -> float:
    """Learning rate for 0-based `epoch` of `epochs`.

    constant:       base_lr
    cosine:         base_lr * (1 + cos(pi * e / E)) / 2
    warmup_cosine:  base_lr * (e + 1) / W for e < W, then cosine over the remaining E - W epochs
    multistep:      base_lr * gamma ** (number of milestones <= e)
    """
    if schedule == "constant":
        return base_lr
    if schedule == "multistep":
        return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
    warmup = warmup_epochs if schedule == "warmup_cosine" else 0
    if epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    progress = (epoch - warmup) / (epochs - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
