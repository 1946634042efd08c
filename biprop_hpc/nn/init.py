"""Initialisations of the frozen random weights W and of the trainable scores S.

Weight inits (SPEC.md): std = gain / sqrt(fan), gain = sqrt(2) for ReLU, fan = fan_in by default.
The "scaled" inits (kn, sc, uc) multiply the fan by the keep ratio k, so that the kept weights of a
layer have roughly the variance of a dense layer of the same width. (The original code multiplied by
1 - k, the pruned fraction; a reported bug. We use k.) The "unscaled" inits (ukn, usc, uuc) use the plain fan.

- kn / ukn:  kaiming normal,   W ~ N(0, std^2)
- sc / usc:  signed constant,  W = +-std with random signs, p = 1/2
- uc / uuc:  unsigned constant, W = std
"""
import math

import torch
from torch import nn

# name -> (distribution, fan scaled by the keep ratio?)
WEIGHT_INITS = {
    "kn": ("normal", True),
    "ukn": ("normal", False),
    "sc": ("signed_constant", True),
    "usc": ("signed_constant", False),
    "uc": ("constant", True),
    "uuc": ("constant", False),
}


def weight_std(weight: torch.Tensor, keep_ratio: float, scaled: bool,
               fan_mode: str = "fan_in", nonlinearity: str = "relu") -> float:
    fan = nn.init._calculate_correct_fan(weight, fan_mode)
    if scaled:
        fan = fan * keep_ratio
    return nn.init.calculate_gain(nonlinearity) / math.sqrt(fan)


@torch.no_grad()
def init_weight_(weight: torch.Tensor, method: str, keep_ratio: float = 1.0,
                 fan_mode: str = "fan_in", nonlinearity: str = "relu") -> torch.Tensor:
    """Fill `weight` in place with the named init; returns it."""
    if method not in WEIGHT_INITS:
        raise ValueError(f"unknown weight init {method!r}; choose one of {sorted(WEIGHT_INITS)}")
    distribution, scaled = WEIGHT_INITS[method]
    std = weight_std(weight, keep_ratio, scaled, fan_mode, nonlinearity)
    if distribution == "normal":
        weight.normal_(0.0, std)
    elif distribution == "signed_constant":
        # Bernoulli(1/2) signs: 2*b - 1 in {-1, +1}
        weight.bernoulli_(0.5).mul_(2).sub_(1).mul_(std)
    else:
        weight.fill_(std)
    return weight


@torch.no_grad()
def init_scores_(scores: torch.Tensor) -> torch.Tensor:
    """Scores: kaiming uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whatever the weight init."""
    return nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
