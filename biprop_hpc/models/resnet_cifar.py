"""ResNet-18 for CIFAR (He et al. 2016, in the common CIFAR form of Kuang Liu's pytorch-cifar).

Follows the original BIPROP code layer for layer: models/resnet_cifar.py (`cResNet18`: class `ResNet` with
`BasicBlock`) and models/resnet_cifar_BinAct.py (`cResNet18_BinAct`: class `ResNet_BinAct` with
`BasicBlock_BinAct`).

3x3 stem conv 64 (stride 1, padding 1) -> BN -> act (no max-pool), four stages of two post-activation
BasicBlocks (conv3x3 -> BN -> act -> conv3x3 -> BN, + shortcut, -> act) with 64/128/256/512 channels, stride 2
on the first conv of stages 2-4, a 1x1 conv -> BN shortcut where the shape changes, global average pool, FC
to the classes. The original pools with avg_pool2d(4) on the 4x4 map of a 32x32 (or 28x28) input, i.e. a
global average; ours is an adaptive global average, the same there and defined for other sizes.

`resnet18_cifar`     MPT-1/32: ReLU.
`resnet18_cifar_bin` MPT-1/1: every ReLU is the sign activation, as in the original code (stem included, and
                     after every residual sum). So every conv except the stem sees +-1 inputs, and the
                     classifier sees the average of +-1 features. The stem conv sees the real pixels.

Names: the original's `conv1`, `bn1` are our `0`, `1`; its `layer{s}.{b}` are our blocks `3`..`10` in order;
its `fc` (a 1x1 conv, weight `[classes, 512, 1, 1]`) is our `13` (an nn.Linear, weight `[classes, 512]`).
Inside a block the names are the original's (`conv1`, `bn1`, `conv2`, `bn2`, `shortcut.0`, `shortcut.1`), so
its state_dict maps onto ours in order.

`BasicBlock` is shared with the ImageNet ResNets (resnet_imagenet.py).
"""
from torch import nn

from biprop_hpc.models.registry import register, scaled


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> act -> conv3x3 -> BN, plus the shortcut, -> act."""
    expansion = 1

    def __init__(self, builder, in_channels: int, channels: int, stride: int = 1, binary: bool = False):
        super().__init__()
        out = channels * self.expansion
        self.conv1 = builder.conv3x3(in_channels, channels, stride)
        self.bn1 = builder.batchnorm(channels)
        self.act1 = builder.activation(binary)
        self.conv2 = builder.conv3x3(channels, out)
        self.bn2 = builder.batchnorm(out)
        self.shortcut = shortcut(builder, in_channels, out, stride)
        self.act2 = builder.activation(binary)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def shortcut(builder, in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity, or a 1x1 conv -> BN (a BIPROP layer like every other conv) where the shape changes."""
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    return nn.Sequential(builder.conv1x1(in_channels, out_channels, stride), builder.batchnorm(out_channels))


def resnet_cifar(builder, *, blocks: tuple[int, ...], binary: bool, in_channels: int, num_classes: int,
                 image_size: int, width_mult: float) -> nn.Module:
    stem = scaled(64, width_mult)
    layers: list[nn.Module] = [builder.conv3x3(in_channels, stem, position="first"),
                               builder.batchnorm(stem), builder.activation(binary)]
    channels = stem
    for stage, count in enumerate(blocks):
        width = scaled(64 * 2 ** stage, width_mult)
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            layers.append(BasicBlock(builder, channels, width, stride, binary))
            channels = width * BasicBlock.expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               builder.linear(channels, num_classes, position="last")]
    return nn.Sequential(*layers)


register("resnet18_cifar", blocks=(2, 2, 2, 2), binary=False)(resnet_cifar)
register("resnet18_cifar_bin", blocks=(2, 2, 2, 2), binary=True)(resnet_cifar)
