"""Conv2/4/6/8 (Frankle & Carbin; Ramanujan et al.; Diffenderfer & Kailkhura), for small images.

Follows the original BIPROP code layer for layer (models/frankle.py: `Conv2`..`Conv8`, `Conv2_BinAct`..
`Conv8_BinAct`, `Conv4Wide`..`Conv8Wide[_BinAct]`). Stages of two 3x3 convs (padding 1) and a 2x2 max-pool:
64,64,P | 128,128,P | 256,256,P | 512,512,P (2, 4, 6 or 8 convs), then flatten and FC 256, FC 256, FC classes.

`convN`      MPT-1/32, no BN:  conv -> ReLU, conv -> ReLU -> pool per stage;  FC -> ReLU, FC -> ReLU, FC.
`convN_bin`  MPT-1/1:          conv -> BN -> sign, conv -> pool -> BN -> sign per stage (BN after the pool);
                               FC -> BN -> sign, FC -> BN -> sign, FC. Only the first conv sees real values.
`convN_wide`, `convN_bin_wide`: every width doubled (further scaled by width_mult), i.e. the original's
                               `Conv{4,6,8}Wide[_BinAct]` run with `width_mult: 2` (it has no Conv2Wide). The
                               original's plain `ConvN` ignore width_mult; here it scales every width of every
                               variant.

Names: the original holds the convs in `convs` and the FCs in `linear` (two nn.Sequential); here they are
one flat nn.Sequential in the same order, with an nn.Flatten between them. The parameterised layers come
in the original's order, so its `convs.i.*` then `linear.j.*` state_dict entries map one to one, in order,
onto ours. The original's FCs are 1x1 convs over the flattened map (weight `[out, in, 1, 1]`) and its FC BNs
are BatchNorm2d over a 1x1 map; ours are nn.Linear (weight `[out, in]`) and BatchNorm1d: the same functions,
the same state_dict entries up to that reshape.
"""
from torch import nn

from biprop_hpc.models.registry import register, scaled

STAGES = (64, 128, 256, 512)


def conv_net(builder, *, depth: int, binary: bool, wide: bool, in_channels: int, num_classes: int,
             image_size: int, width_mult: float) -> nn.Module:
    width_mult = width_mult * (2 if wide else 1)
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for stage in range(depth // 2):
        out = scaled(STAGES[stage], width_mult)
        for conv_index in range(2):
            first = stage == 0 and conv_index == 0
            pooled = conv_index == 1
            layers.append(builder.conv3x3(channels, out, position="first" if first else None))
            if binary:      # conv [-> pool] -> BN -> sign
                layers += ([nn.MaxPool2d(2)] if pooled else []) + [builder.batchnorm(out),
                                                                   builder.activation(True)]
            else:           # conv -> ReLU [-> pool]
                layers += [builder.activation(False)] + ([nn.MaxPool2d(2)] if pooled else [])
            channels = out
        size //= 2
    if size < 1:
        raise ValueError(f"images of size {image_size} are too small for Conv{depth} ({depth // 2} poolings)")
    hidden = scaled(256, width_mult)
    layers += [nn.Flatten(), builder.linear(channels * size * size, hidden)]
    if binary:
        layers.append(builder.batchnorm1d(hidden))
    layers += [builder.activation(binary), builder.linear(hidden, hidden)]
    if binary:
        layers.append(builder.batchnorm1d(hidden))
    layers += [builder.activation(binary), builder.linear(hidden, num_classes, position="last")]
    return nn.Sequential(*layers)


for _depth in (2, 4, 6, 8):
    register(f"conv{_depth}", depth=_depth, binary=False, wide=False)(conv_net)
    register(f"conv{_depth}_wide", depth=_depth, binary=False, wide=True)(conv_net)
    register(f"conv{_depth}_bin", depth=_depth, binary=True, wide=False)(conv_net)
    register(f"conv{_depth}_bin_wide", depth=_depth, binary=True, wide=True)(conv_net)
