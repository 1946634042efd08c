"""The model zoo's registry: name -> factory(builder, in_channels, num_classes, image_size, width_mult), and the
input each model is made for (`biprop models` counts its parameters on that input)."""
import difflib
from typing import Callable

import torch
from torch import nn

from biprop_hpc.models.builder import LayerBuilder
from biprop_hpc.nn.engine import attach_mask_engine

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}

# The inputs models are made for: dataset -> (in_channels, image_size, num_classes).
INPUTS = {"cifar10": (3, 32, 10), "imagenet": (3, 224, 1000)}
MADE_FOR: dict[str, str] = {}   # model name -> a key of INPUTS


def register(name: str, made_for: str = "cifar10", **preset):
    """Register `factory` under `name`, made for the input `made_for` (a key of INPUTS); `preset` keyword
    arguments are bound (e.g. depth, binary)."""
    def decorate(factory):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = lambda *args, **kwargs: factory(*args, **preset, **kwargs)
        MADE_FOR[name] = made_for
        return factory
    return decorate


def build_model(name: str, builder: LayerBuilder, *, in_channels: int, num_classes: int,
                image_size: int, width_mult: float = 1.0) -> nn.Module:
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} Known models: {', '.join(sorted(MODELS))}")
    model = MODELS[name](builder, in_channels=in_channels, num_classes=num_classes,
                         image_size=image_size, width_mult=width_mult)
    return attach_mask_engine(model)  # all BIPROP layers' W_eff computed together at each forward


def parameter_counts(name: str) -> tuple[int, int]:
    """(weights of the BIPROP layers, each with one score; all other parameters) of model `name` at width_mult 1
    with every layer BIPROP, on the input it is made for. Built on the meta device: no memory, no random numbers."""
    from biprop_hpc.models.builder import LayerBuilder
    from biprop_hpc.nn import biprop_layers
    in_channels, image_size, num_classes = INPUTS[MADE_FOR[name]]
    with torch.device("meta"):
        model = build_model(name, LayerBuilder(), in_channels=in_channels, num_classes=num_classes,
                            image_size=image_size)
    searched = {id(p) for _, layer in biprop_layers(model) for p in (layer.weight, layer.scores)}
    weights = sum(layer.weight.numel() for _, layer in biprop_layers(model))
    return weights, sum(p.numel() for p in model.parameters() if id(p) not in searched)


def describe_models() -> str:
    """The text `biprop models` prints: every model, its input, its parameter counts."""
    lines = ["Parameter counts at width_mult 1, every layer BIPROP, on the input each model is made for:",
             "  " + "; ".join(f"{dataset} {c}x{size}x{size}, {classes} classes"
                         for dataset, (c, size, classes) in INPUTS.items()) + ".",
             "Another input changes the first and last layers (and the flattened feature map of conv and vgg "
             "models).", "",
             f"{'model':<22} {'made for':<10} {'BIPROP weights (= scores)':>26} {'other parameters':>17}"]
    for name in sorted(MODELS):
        weights, other = parameter_counts(name)
        lines.append(f"{name:<22} {MADE_FOR[name]:<10} {weights:>26,} {other:>17,}")
    return "\n".join(lines)


def scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))
