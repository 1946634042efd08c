"""Conv2/4/6/8 (Frankle & Carbin; Ramanujan et al.; Diffenderfer & Kailkhura), for small images.

Blocks of two 3x3 convs and a 2x2 max-pool: 64,64,P | 128,128,P | 256,256,P | 512,512,P (2, 4, 6 or 8 convs),
then FC 256, FC 256, FC classes. MPT-1/32 models use ReLU and no BN. MPT-1/1 variants (`_bin`) use
conv -> BN -> sign, and conv -> pool -> BN -> sign on pooled convs; hidden FCs use FC -> BN -> sign.
The `_wide` variants double every width (further scaled by width_mult).
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
            layers.append(builder.conv3x3(channels, out, position="first" if first else None))
            if conv_index == 1:
                layers.append(nn.MaxPool2d(2))
            if binary:
                layers.append(builder.batchnorm(out))
            layers.append(builder.activation(binary))
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
