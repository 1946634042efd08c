"""Initialisations of the frozen random weights W and of the trainable scores S.

Weight inits (SPEC.md): std = gain / sqrt(fan), gain = sqrt(2) for ReLU, fan = fan_in by default.
The "scaled" inits (kn, sc, uc) multiply the fan by a factor that `fan_scale` names (FAN_SCALES):
- kept_fraction (the default): fan x k, k the keep ratio, so that the kept weights of a layer have roughly
  the variance of a dense layer of the same width (our correction);
- pruned_fraction: fan x (1 - k), the original code's formula (utils/builder.py `_init_conv`, scale_fan,
  with its prune_rate being the KEPT fraction): the paper's numbers were obtained with it, so the paper
  configs use it; undefined at k = 1;
- none: the plain fan.
The "unscaled" inits (ukn, usc, uuc) use the plain fan whatever `fan_scale` says.

- kn / ukn:  kaiming normal,   W ~ N(0, std^2)
- sc / usc:  signed constant,  W = +-std with random signs, p = 1/2
- uc / uuc:  unsigned constant, W = std
"""
import math

import torch
from torch import nn

# WEIGHT_INITS: name -> (distribution, fan scaled by the keep ratio?); FAN_SCALES: how the scaled inits scale
# the fan (see the module docstring), kept_fraction the default. Kept in biprop_hpc.choices, free of torch.
from biprop_hpc.choices import FAN_SCALES, WEIGHT_INITS


def fan_factor(fan_scale: str, keep_ratio: float) -> float:
    """What a scaled init multiplies the fan by: k, 1 - k or 1."""
    if fan_scale not in FAN_SCALES:
        raise ValueError(f"unknown fan_scale {fan_scale!r}; choose one of {', '.join(FAN_SCALES)}")
    if fan_scale == "pruned_fraction" and keep_ratio >= 1.0:
        raise ValueError("fan_scale pruned_fraction multiplies the fan by 1 - keep_ratio, which is 0 at "
                         f"keep_ratio {keep_ratio}; use fan_scale kept_fraction or none (or a keep ratio < 1)")
    return {"kept_fraction": keep_ratio, "pruned_fraction": 1.0 - keep_ratio, "none": 1.0}[fan_scale]


def weight_std(weight: torch.Tensor, keep_ratio: float, scaled: bool,
               fan_mode: str = "fan_in", nonlinearity: str = "relu", fan_scale: str = "kept_fraction") -> float:
    fan = nn.init._calculate_correct_fan(weight, fan_mode)
    if scaled:
        fan = fan * fan_factor(fan_scale, keep_ratio)
    return nn.init.calculate_gain(nonlinearity) / math.sqrt(fan)


@torch.no_grad()
def init_weight_(weight: torch.Tensor, method: str, keep_ratio: float = 1.0,
                 fan_mode: str = "fan_in", nonlinearity: str = "relu",
                 fan_scale: str = "kept_fraction") -> torch.Tensor:
    """Fill `weight` in place with the named init (its fan scaled as `fan_scale` says); returns it."""
    if method not in WEIGHT_INITS:
        raise ValueError(f"unknown weight init {method!r}; choose one of {sorted(WEIGHT_INITS)}")
    if fan_scale not in FAN_SCALES:
        raise ValueError(f"unknown fan_scale {fan_scale!r}; choose one of {', '.join(FAN_SCALES)}")
    distribution, scaled = WEIGHT_INITS[method]
    std = weight_std(weight, keep_ratio, scaled, fan_mode, nonlinearity, fan_scale)
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
