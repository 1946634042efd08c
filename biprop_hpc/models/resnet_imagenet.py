"""ImageNet ResNets with torchvision's topology (He et al. 2016; wide: Zagoruyko & Komodakis 2016).

7x7 stride-2 stem conv 64 -> BN -> act -> 3x3 stride-2 max-pool, four stages (stride 2 at the start of
stages 2-4; a 1x1 conv -> BN shortcut where the shape changes), global average pool, FC to the classes.
All convs bias-free, the FC too (the paper's FC layers are 1x1 convs).

| name                | block      | blocks  | stage outputs          | conv + fc weights, 1000 classes |
|---------------------|------------|---------|------------------------|---------------------------------|
| resnet18            | BasicBlock | 2,2,2,2 | 64/128/256/512         | 11.68M                          |
| resnet34            | BasicBlock | 3,4,6,3 | 64/128/256/512         | 21.78M                          |
| resnet50            | Bottleneck | 3,4,6,3 | 256/512/1024/2048      | 25.50M                          |
| wide_resnet50_2     | Bottleneck | 3,4,6,3 | as resnet50, 3x3 x2    | 68.81M (68.88M with BN, bias)   |
| wide_resnet34_2_bin | BasicBlock | 3,4,6,3 | 64/192/384/768         | 48.27M                          |

The paper's WideResNet-50-2 (68.9M) is torchvision's wide_resnet50_2, whose 68.9M counts every parameter
(affine BN and fc bias included); its conv + fc weights alone are 68.81M. The paper's WideResNet-34-2
(48.3M) is the original BIPROP code's: stem 64, stage widths 64, 64*(2+1), 128*(2+1), 256*(2+1), 1x1 conv
shortcuts. `wide_resnet34_2_bin` is MPT-1/1: every ReLU becomes the sign activation (post-activation
blocks, as in the original code; see resnet_cifar.py); only the stem conv sees real pixels.
"""
from torch import nn

from biprop_hpc.models.registry import register, scaled
from biprop_hpc.models.resnet_cifar import BasicBlock, shortcut


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3): 1x1 -> BN -> act -> 3x3 -> BN -> act -> 1x1 -> BN,
    plus the shortcut, -> act. `inner` is the 3x3 width (planes, or 2 x planes for the wide ResNet)."""

    def __init__(self, builder, in_channels: int, inner: int, out: int, stride: int = 1,
                 binary: bool = False):
        super().__init__()
        self.conv1 = builder.conv1x1(in_channels, inner)
        self.bn1 = builder.batchnorm(inner)
        self.act1 = builder.activation(binary)
        self.conv2 = builder.conv3x3(inner, inner, stride)
        self.bn2 = builder.batchnorm(inner)
        self.act2 = builder.activation(binary)
        self.conv3 = builder.conv1x1(inner, out)
        self.bn3 = builder.batchnorm(out)
        self.shortcut = shortcut(builder, in_channels, out, stride)
        self.act3 = builder.activation(binary)

    def forward(self, x):
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


def resnet_imagenet(builder, *, block: str, blocks: tuple[int, ...], widths: tuple[int, ...],
                    inner_mult: int = 1, binary: bool = False, in_channels: int, num_classes: int,
                    image_size: int, width_mult: float) -> nn.Module:
    """`widths`: the planes of each stage (BasicBlock: its output; Bottleneck: output / 4, 3x3 width
    planes * inner_mult)."""
    stem = scaled(64, width_mult)
    layers: list[nn.Module] = [builder.conv(in_channels, stem, 7, stride=2, position="first"),
                               builder.batchnorm(stem), builder.activation(binary),
                               nn.MaxPool2d(kernel_size=3, stride=2, padding=1)]
    channels = stem
    for stage, (count, planes) in enumerate(zip(blocks, widths)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            if block == "basic":
                width = scaled(planes, width_mult)
                layers.append(BasicBlock(builder, channels, width, stride, binary))
                channels = width
            else:
                inner, out = scaled(planes * inner_mult, width_mult), scaled(planes * 4, width_mult)
                layers.append(Bottleneck(builder, channels, inner, out, stride, binary))
                channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               builder.linear(channels, num_classes, position="last")]
    return nn.Sequential(*layers)


STANDARD = (64, 128, 256, 512)
register("resnet18", block="basic", blocks=(2, 2, 2, 2), widths=STANDARD)(resnet_imagenet)
register("resnet34", block="basic", blocks=(3, 4, 6, 3), widths=STANDARD)(resnet_imagenet)
register("resnet50", block="bottleneck", blocks=(3, 4, 6, 3), widths=STANDARD)(resnet_imagenet)
register("wide_resnet50_2", block="bottleneck", blocks=(3, 4, 6, 3), widths=STANDARD,
         inner_mult=2)(resnet_imagenet)
register("wide_resnet34_2_bin", block="basic", blocks=(3, 4, 6, 3), widths=(64, 192, 384, 768),
         binary=True)(resnet_imagenet)
