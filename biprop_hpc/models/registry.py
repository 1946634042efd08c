"""The model zoo's registry: name -> factory(builder, in_channels, num_classes, image_size, width_mult)."""
import difflib
from typing import Callable

from torch import nn

from biprop_hpc.models.builder import LayerBuilder
from biprop_hpc.nn.engine import attach_mask_engine

ModelFactory = Callable[..., nn.Module]
MODELS: dict[str, ModelFactory] = {}


def register(name: str, **preset):
    """Register `factory` under `name`; `preset` keyword arguments are bound (e.g. depth, binary)."""
    def decorate(factory):
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = lambda *args, **kwargs: factory(*args, **preset, **kwargs)
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


def scaled(channels: int, width_mult: float) -> int:
    return max(1, int(round(channels * width_mult)))
