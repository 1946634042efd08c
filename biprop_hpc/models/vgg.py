"""VGG-Small (Zhang et al., LQ-Nets; the usual binary-network CIFAR baseline), for small images.

Six 3x3 convs with a 2x2 max-pool after every second one: 128,128,P | 256,256,P | 512,512,P, then one FC
to the classes on the flattened 512 x (s/8) x (s/8) features (no global pooling, no hidden FC).
Every conv is followed by BN and the activation; pooled convs are conv -> pool -> BN -> act.

`vgg_small`     MPT-1/32: ReLU.
`vgg_small_bin` MPT-1/1 at width 1.25 (160,160,P | 320,320,P | 640,640,P): sign activations; the first
                conv still sees the real pixels, and every later layer sees +-1 inputs.
"""
from torch import nn

from biprop_hpc.models.registry import register, scaled

STAGES = (128, 256, 512)


def vgg_small(builder, *, binary: bool, width: float, in_channels: int, num_classes: int,
              image_size: int, width_mult: float) -> nn.Module:
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for stage, base in enumerate(STAGES):
        out = scaled(base, width * width_mult)
        for conv_index in range(2):
            first = stage == 0 and conv_index == 0
            layers.append(builder.conv3x3(channels, out, position="first" if first else None))
            if conv_index == 1:
                layers.append(nn.MaxPool2d(2))
            layers += [builder.batchnorm(out), builder.activation(binary)]
            channels = out
        size //= 2
    if size < 1:
        raise ValueError(f"images of size {image_size} are too small for VGG-Small (3 poolings)")
    layers += [nn.Flatten(), builder.linear(channels * size * size, num_classes, position="last")]
    return nn.Sequential(*layers)


register("vgg_small", binary=False, width=1.0)(vgg_small)
register("vgg_small_bin", binary=True, width=1.25)(vgg_small)
