"""ResNet-18 for CIFAR (He et al. 2016, in the common CIFAR form of Kuang Liu's pytorch-cifar).

3x3 stem conv 64 -> BN -> act (no max-pool), four stages of two BasicBlocks with 64/128/256/512 channels,
stride 2 at the start of stages 2-4, a 1x1 conv -> BN shortcut where the shape changes, global average
pool, FC to the classes.

`resnet18_cifar`     MPT-1/32: ReLU.
`resnet18_cifar_bin` MPT-1/1: every ReLU is replaced by the sign activation, as in the original BIPROP code
                     (post-activation blocks: conv -> BN -> sign -> conv -> BN, + shortcut, -> sign). So
                     every conv except the stem sees +-1 inputs, and the classifier sees the average of
                     +-1 features. The stem conv sees the real pixels.

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
