"""VGG-Small (Zhang et al., LQ-Nets), for small images, as the original BIPROP code builds it.

Six bias-free 3x3 convs (padding 1) with a 2x2 max-pool after every second one, 128,128,P | 256,256,P |
512,512,P, then one FC to the classes on the flattened 512 x (s/8) x (s/8) map (no global pooling, no hidden
FC). Where BN and the activations go is not the textbook one; the paper configs' names follow the original
code (models/frankle.py) layer for layer (C = conv3x3, P = max-pool 2x2, B = BN, R = ReLU, S = sign):

`vgg_small`      MPT-1/32, the original's `VGG_Small`: ReLU after the first conv and before the classifier
                 only, BN only after each max-pool (the max-pools are the only other nonlinearities):
                 C R C P B | C C P B | C C P B R | flatten, FC.
`vgg_small_bin`  MPT-1/1 at width 1.25 (160,160,P | 320,320,P | 640,640,P), the original's `Wide_VGG_Small`
                 with `width_mult: 10` (it scales 16/32/64): BN -> sign after every conv (after the pool where
                 there is one) except the last, which ends pool -> BN -> ReLU before the classifier:
                 C B S C P B S | C B S C P B S | C B S C P B R | flatten, FC.
                 Every conv but the first sees +-1 inputs; the classifier sees the ReLU of the last BN.

`vgg_small_textbook` is the usual VGG-Small of the binary-network literature, MPT-1/32: BN and ReLU after
every conv (after the pool where there is one): C B R C P B R | C B R C P B R | C B R C P B R | flatten, FC.
It is not in the original code; it is kept as a conventional baseline (e.g. for `layer_type: dense`).

Names: the original holds the layers before the classifier in `convs` (nn.Sequential) and the classifier in
`linear.0`, a 1x1 conv over the flattened map (weight `[classes, in, 1, 1]`). Ours is one flat
nn.Sequential in the same order with an nn.Flatten before the classifier, so the original's `convs.i` is
our `i`, and its `linear.0` is our `len(convs) + 1` (an nn.Linear, weight `[classes, in]`).
"""
from torch import nn

from biprop_hpc.models.registry import register, scaled

STAGES = (128, 256, 512)
STYLES = ("original", "original_bin", "textbook")


def after_conv(builder, style: str, index: int, channels: int) -> list[nn.Module]:
    """The layers after conv `index` (0..5) of a VGG-Small in `style`; convs 1, 3, 5 are pooled."""
    pooled, last = index % 2 == 1, index == 5
    pool = [nn.MaxPool2d(2)] if pooled else []
    if style == "original":      # VGG_Small: C R C P B | C C P B | C C P B R
        layers = [builder.activation(False)] if index == 0 else []
        if pooled:
            layers += pool + [builder.batchnorm(channels)]
        if last:
            layers.append(builder.activation(False))
        return layers
    if style == "original_bin":  # Wide_VGG_Small: [P] B S after every conv, P B R after the last
        return pool + [builder.batchnorm(channels), builder.activation(binary=not last)]
    return pool + [builder.batchnorm(channels), builder.activation(False)]   # textbook: [P] B R


def vgg_small(builder, *, style: str, width: float, in_channels: int, num_classes: int,
              image_size: int, width_mult: float) -> nn.Module:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    for index in range(2 * len(STAGES)):
        out = scaled(STAGES[index // 2], width * width_mult)
        layers.append(builder.conv3x3(channels, out, position="first" if index == 0 else None))
        layers += after_conv(builder, style, index, out)
        channels = out
        if index % 2 == 1:
            size //= 2
    if size < 1:
        raise ValueError(f"images of size {image_size} are too small for VGG-Small (3 poolings)")
    layers += [nn.Flatten(), builder.linear(channels * size * size, num_classes, position="last")]
    return nn.Sequential(*layers)


register("vgg_small", style="original", width=1.0)(vgg_small)
register("vgg_small_bin", style="original_bin", width=1.25)(vgg_small)
register("vgg_small_textbook", style="textbook", width=1.0)(vgg_small)
