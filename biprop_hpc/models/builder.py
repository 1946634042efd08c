"""LayerBuilder: how a model asks for its layers, so model files read like the paper's tables.

A model never decides whether a conv is BIPROP, dense or frozen; it asks the builder, which applies the
run's choices (layer type, keep ratio, weight init and its fan scaling, BN affinity, dense first/last layer)
in one place.
"""
from dataclasses import dataclass

from torch import nn

from biprop_hpc.choices import EDGE_LAYER_TYPES, LAYER_TYPES  # the whole network; first / last layer
from biprop_hpc.nn import FAN_SCALES, BinaryActivation, BipropConv2d, BipropLinear, check_keep_ratio, init_weight_



@dataclass(frozen=True)
class LayerBuilder:
    keep_ratio: float = 0.5
    weight_init: str = "kn"
    layer_type: str = "biprop"
    learn_batchnorm: bool = False
    first_layer: str = "biprop"
    last_layer: str = "biprop"
    fan_scale: str = "kept_fraction"   # how kn/sc/uc scale the fan of BIPROP layers (biprop_hpc.nn.init)

    def __post_init__(self):
        check_keep_ratio(self.keep_ratio)
        if self.fan_scale not in FAN_SCALES:
            raise ValueError(f"fan_scale must be one of {FAN_SCALES}, got {self.fan_scale!r}")
        if self.layer_type not in LAYER_TYPES:
            raise ValueError(f"layer_type must be one of {LAYER_TYPES}, got {self.layer_type!r}")
        for key in ("first_layer", "last_layer"):
            if getattr(self, key) not in EDGE_LAYER_TYPES:
                raise ValueError(f"{key} must be one of {EDGE_LAYER_TYPES}, got {getattr(self, key)!r}")

    def _kind(self, position: str | None) -> str:
        """'biprop', 'trained' or 'frozen' for a layer at position None, 'first' or 'last'."""
        if self.layer_type == "dense":
            return "trained"
        return {"first": self.first_layer, "last": self.last_layer}.get(position, "biprop")

    def _dense(self, layer: nn.Module, kind: str) -> nn.Module:
        # Dense layers draw W from the same init family with nothing pruned: the plain fan, whatever fan_scale.
        init_weight_(layer.weight, self.weight_init, keep_ratio=1.0, fan_scale="none")
        layer.weight.requires_grad_(kind == "trained")
        return layer

    def conv(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
             padding: int | None = None, position: str | None = None) -> nn.Module:
        """A bias-free conv; `padding` defaults to kernel_size // 2 ('same' for odd kernels)."""
        padding = kernel_size // 2 if padding is None else padding
        kind = self._kind(position)
        if kind == "biprop":
            return BipropConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                keep_ratio=self.keep_ratio, weight_init=self.weight_init, fan_scale=self.fan_scale)
        return self._dense(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                     bias=False), kind)

    def conv3x3(self, in_channels, out_channels, stride=1, position=None):
        return self.conv(in_channels, out_channels, 3, stride, 1, position)

    def conv1x1(self, in_channels, out_channels, stride=1, position=None):
        return self.conv(in_channels, out_channels, 1, stride, 0, position)

    def linear(self, in_features: int, out_features: int, position: str | None = None) -> nn.Module:
        """A bias-free fully connected layer (the paper's FC layers are bias-free 1x1 convs)."""
        kind = self._kind(position)
        if kind == "biprop":
            return BipropLinear(in_features, out_features, keep_ratio=self.keep_ratio,
                                weight_init=self.weight_init, fan_scale=self.fan_scale)
        return self._dense(nn.Linear(in_features, out_features, bias=False), kind)

    def batchnorm(self, channels: int) -> nn.Module:
        """BN, non-affine unless the run learns BN (the paper's '+BN' results) or trains dense."""
        return nn.BatchNorm2d(channels, affine=self.learn_batchnorm or self.layer_type == "dense")

    def batchnorm1d(self, features: int) -> nn.Module:
        return nn.BatchNorm1d(features, affine=self.learn_batchnorm or self.layer_type == "dense")

    @staticmethod
    def activation(binary: bool) -> nn.Module:
        return BinaryActivation() if binary else nn.ReLU(inplace=True)
