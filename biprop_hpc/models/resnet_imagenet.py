"""ImageNet ResNets with torchvision's topology (He et al. 2016; wide: Zagoruyko & Komodakis 2016).

Follows the original BIPROP code layer for layer: models/resnet.py (`ResNet18`, `ResNet34`, `ResNet50`,
`WideResNet50_2`: class `ResNet`, torchvision's topology) and models/resnet_BinAct.py (`WideResNet34_2_BinAct`:
class `WideResNet_BinAct` with its sign-activation `BasicBlock`).

Stem: 7x7 stride-2 conv 64 (padding 3) -> BN, then ReLU -> 3x3 stride-2 max-pool (padding 1) in the MPT-1/32
nets, max-pool -> sign in the MPT-1/1 net (the original's `WideResNet_BinAct` pools before the activation:
the same forward, as sign is monotone, but the straight-through gradient is taken at the window's real
maximum). Four stages (stride 2 at the start of stages 2-4, on the 3x3 conv; a 1x1 conv -> BN shortcut where
the shape changes), global average pool, FC to the classes. Post-activation blocks: BasicBlock conv3x3 -> BN
-> act -> conv3x3 -> BN, + shortcut, -> act; Bottleneck 1x1 -> BN -> act -> 3x3 -> BN -> act -> 1x1 -> BN,
+ shortcut, -> act. All convs bias-free, the FC too (the original's FC is a 1x1 conv over the pooled map).

| name                | block      | blocks  | stage outputs          | conv + fc weights, 1000 classes |
|---------------------|------------|---------|------------------------|---------------------------------|
| resnet18            | BasicBlock | 2,2,2,2 | 64/128/256/512         | 11.68M                          |
| resnet34            | BasicBlock | 3,4,6,3 | 64/128/256/512         | 21.78M                          |
| resnet50            | Bottleneck | 3,4,6,3 | 256/512/1024/2048      | 25.50M                          |
| wide_resnet50_2     | Bottleneck | 3,4,6,3 | as resnet50, 3x3 x2    | 68.81M (68.88M with BN, bias)   |
| wide_resnet34_2_bin | BasicBlock | 3,4,6,3 | 64/192/384/768         | 48.27M                          |

The paper's WideResNet-50-2 (68.9M) is torchvision's wide_resnet50_2 (the original's `WideResNet50_2`,
`ResNet` with base_width 128), whose 68.9M counts every parameter (affine BN and fc bias included); its
conv + fc weights alone are 68.81M. The paper's WideResNet-34-2 (48.3M) is the original's
`WideResNet34_2_BinAct`: stem 64, stage widths 64, 64*(2+1), 128*(2+1), 256*(2+1), 1x1 conv shortcuts.
`wide_resnet34_2_bin` is MPT-1/1: every ReLU is the sign activation, the one after the residual sum included;
only the stem conv sees real pixels and the FC sees the average of +-1 features.

Names: the original's `conv1`, `bn1` are our `0`, `1`; its `layer{s}.{b}` are our blocks, one index each, in
order from `4`; its `fc` (a 1x1 conv, weight `[classes, in, 1, 1]`) is our last index (an nn.Linear, weight
`[classes, in]`). Inside a block the names are the original's (`conv1`, `bn1`, `conv2`, `bn2`, [`conv3`,
`bn3`]) except the shortcut: the original's `downsample.0`, `downsample.1` are our `shortcut.0`,
`shortcut.1`. The parameterised layers come in the original's order, so its state_dict maps onto ours in order.
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
    pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    layers: list[nn.Module] = [builder.conv(in_channels, stem, 7, stride=2, position="first"),
                               builder.batchnorm(stem)]
    # the original's binary ResNets pool before the sign (same forward: sign is monotone; the
    # straight-through gradient then flows through the window's real maximum), its ResNet after the ReLU
    layers += [pool, builder.activation(True)] if binary else [builder.activation(False), pool]
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
register("resnet18", made_for="imagenet", block="basic", blocks=(2, 2, 2, 2), widths=STANDARD)(resnet_imagenet)
register("resnet34", made_for="imagenet", block="basic", blocks=(3, 4, 6, 3), widths=STANDARD)(resnet_imagenet)
register("resnet50", made_for="imagenet", block="bottleneck", blocks=(3, 4, 6, 3), widths=STANDARD)(resnet_imagenet)
register("wide_resnet50_2", made_for="imagenet", block="bottleneck", blocks=(3, 4, 6, 3), widths=STANDARD,
         inner_mult=2)(resnet_imagenet)
register("wide_resnet34_2_bin", made_for="imagenet", block="basic", blocks=(3, 4, 6, 3), widths=(64, 192, 384, 768),
         binary=True)(resnet_imagenet)
