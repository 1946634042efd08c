"""The paper configs' models are the original BIPROP code's networks, layer for layer.

Each expected sequence below is written out here from the original's model definitions (chrundle/biprop,
models/frankle.py, models/resnet_cifar*.py, models/resnet*.py), independently of the model code: one
entry per layer, in the order the original's forward runs them. The original's FC layers are 1x1 convs over
a flattened (or pooled) map; ours are nn.Linear after an nn.Flatten, which is the same function, so an FC is
written ("fc", in, out) and the flatten is written where the original reshapes. The original's FC BNs are
BatchNorm2d over a 1x1 map, ours BatchNorm1d: both are ("bn", C).

A model is checked twice: the order in which its leaf layers run (forward hooks; dense layers on the meta
device, so full widths cost nothing), and the order in which they are registered, so that the original's
state_dict entries map onto ours in order.
"""
import pytest
import torch
from torch import nn

from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import BinaryActivation

RELU, SIGN, FLAT, AVG = ("relu",), ("sign",), ("flatten",), ("avgpool",)
POOL2 = ("maxpool", 2, 2, 0)               # nn.MaxPool2d((2, 2))
POOL3 = ("maxpool", 3, 2, 1)               # nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def conv3(cin, cout, stride=1):            # builder.conv3x3: padding 1
    return ("conv", cin, cout, 3, stride, 1)


def conv1(cin, cout, stride=1):            # builder.conv1x1: no padding
    return ("conv", cin, cout, 1, stride, 0)


def bn(c):
    return ("bn", c)


def fc(cin, cout):
    return ("fc", cin, cout)


# ---------------------------------------------------------------- reading our models

def _int(value):
    value = value if isinstance(value, tuple) else (value, value)
    assert value[0] == value[1], "non-square kernel, stride or padding"
    return value[0]


def describe(m: nn.Module) -> tuple:
    if isinstance(m, nn.Conv2d):
        return ("conv", m.in_channels, m.out_channels, _int(m.kernel_size), _int(m.stride), _int(m.padding))
    if isinstance(m, nn.Linear):
        return fc(m.in_features, m.out_features)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return bn(m.num_features)
    if isinstance(m, nn.ReLU):
        return RELU
    if isinstance(m, BinaryActivation):
        return SIGN
    if isinstance(m, nn.MaxPool2d):
        return ("maxpool", _int(m.kernel_size), _int(m.stride), _int(m.padding))
    if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
        return AVG
    if isinstance(m, nn.Flatten):
        return FLAT
    return ("unexpected", type(m).__name__)


def leaves(model):
    """Leaf modules in registration order; an identity shortcut is no layer."""
    return [m for m in model.modules() if not list(m.children()) and not isinstance(m, nn.Identity)]


def build(name, builder, size, classes):
    return build_model(name, builder, in_channels=3, num_classes=classes, image_size=size)


def executed(name, size=32, classes=10):
    """The leaf layers in the order the forward runs them (dense layers, meta device: no compute)."""
    with torch.device("meta"):
        model = build(name, LayerBuilder(layer_type="dense"), size, classes).eval()
        ran = []
        for m in leaves(model):
            m.register_forward_hook(lambda module, inputs, output: ran.append(describe(module)))
        out = model(torch.empty(2, 3, size, size))
    assert out.shape == (2, classes)
    return ran


def registered(name, size=32, classes=10):
    """The leaf layers of the default (BIPROP) model in registration (state_dict) order."""
    with torch.device("meta"):
        return [describe(m) for m in leaves(build(name, LayerBuilder(), size, classes))]


def check(name, expected, size=32, classes=10):
    assert executed(name, size, classes) == expected
    assert registered(name, size, classes) == expected


# ---------------------------------------------------------------- VGG-Small (models/frankle.py)

# Wide_VGG_Small with width_mult 10: scale(16), scale(32), scale(64) = 160, 320, 640 (the paper's x1.25)
WIDE_VGG_SMALL = [
    conv3(3, 160), bn(160), SIGN,
    conv3(160, 160), POOL2, bn(160), SIGN,
    conv3(160, 320), bn(320), SIGN,
    conv3(320, 320), POOL2, bn(320), SIGN,
    conv3(320, 640), bn(640), SIGN,
    conv3(640, 640), POOL2, bn(640), RELU,          # pool -> BN -> ReLU before the classifier
    FLAT, fc(640 * 4 * 4, 10),
]

VGG_SMALL = [
    conv3(3, 128), RELU,
    conv3(128, 128), POOL2, bn(128),
    conv3(128, 256),
    conv3(256, 256), POOL2, bn(256),
    conv3(256, 512),
    conv3(512, 512), POOL2, bn(512), RELU,
    FLAT, fc(512 * 4 * 4, 10),
]


def test_vgg_small_bin_matches_the_originals_wide_vgg_small():
    check("vgg_small_bin", WIDE_VGG_SMALL)


def test_vgg_small_bin_runs_the_originals_sequence_with_biprop_layers():
    """The real (BIPROP, CPU) model runs the same sequence as its dense twin on the meta device."""
    torch.manual_seed(0)
    model = build("vgg_small_bin", LayerBuilder(keep_ratio=0.25), 32, 10).eval()
    ran = []
    for m in leaves(model):
        m.register_forward_hook(lambda module, inputs, output: ran.append(describe(module)))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert ran == WIDE_VGG_SMALL
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_vgg_small_matches_the_originals_vgg_small():
    check("vgg_small", VGG_SMALL)


def test_vgg_small_on_28x28_inputs_keeps_the_original_layers():
    expected = VGG_SMALL[:-1] + [fc(512 * 3 * 3, 10)]   # 28 -> 14 -> 7 -> 3
    with torch.device("meta"):
        model = build_model("vgg_small", LayerBuilder(layer_type="dense"), in_channels=1, num_classes=10,
                            image_size=28)
    assert [describe(m) for m in leaves(model)] == [conv3(1, 128)] + expected[1:]


# ---------------------------------------------------------------- Conv2/4/6/8 (models/frankle.py)

def relu_stage(cin, cout):        # ConvN: conv, ReLU, conv, ReLU, MaxPool
    return [conv3(cin, cout), RELU, conv3(cout, cout), RELU, POOL2]


def sign_stage(cin, cout):        # ConvN_BinAct: conv, BN, act, conv, MaxPool, BN, act
    return [conv3(cin, cout), bn(cout), SIGN, conv3(cout, cout), POOL2, bn(cout), SIGN]


def relu_head(flat):              # linear: FC 256, ReLU, FC 256, ReLU, FC 10
    return [FLAT, fc(flat, 256), RELU, fc(256, 256), RELU, fc(256, 10)]


def sign_head(flat):              # linear: FC 256, BN, act, FC 256, BN, act, FC 10
    return [FLAT, fc(flat, 256), bn(256), SIGN, fc(256, 256), bn(256), SIGN, fc(256, 10)]


ORIGINAL_CONV = {   # the flattened sizes as the original writes them
    "conv2": relu_stage(3, 64) + relu_head(64 * 16 * 16),
    "conv4": relu_stage(3, 64) + relu_stage(64, 128) + relu_head(32 * 32 * 8),
    "conv6": relu_stage(3, 64) + relu_stage(64, 128) + relu_stage(128, 256) + relu_head(256 * 4 * 4),
    "conv8": relu_stage(3, 64) + relu_stage(64, 128) + relu_stage(128, 256) + relu_stage(256, 512)
    + relu_head(512 * 2 * 2),
    "conv2_bin": sign_stage(3, 64) + sign_head(64 * 16 * 16),
    "conv4_bin": sign_stage(3, 64) + sign_stage(64, 128) + sign_head(32 * 32 * 8),
    "conv6_bin": sign_stage(3, 64) + sign_stage(64, 128) + sign_stage(128, 256) + sign_head(256 * 4 * 4),
    "conv8_bin": sign_stage(3, 64) + sign_stage(64, 128) + sign_stage(128, 256) + sign_stage(256, 512)
    + sign_head(512 * 2 * 2),
}


def test_conv2_bin_written_out():
    assert ORIGINAL_CONV["conv2_bin"] == [
        conv3(3, 64), bn(64), SIGN, conv3(64, 64), POOL2, bn(64), SIGN,
        FLAT, fc(16384, 256), bn(256), SIGN, fc(256, 256), bn(256), SIGN, fc(256, 10)]
    check("conv2_bin", ORIGINAL_CONV["conv2_bin"])


@pytest.mark.parametrize("name", sorted(ORIGINAL_CONV))
def test_conv_nets_match_the_originals(name):
    check(name, ORIGINAL_CONV[name])


def test_wide_conv_nets_are_the_originals_convwide_at_width_mult_2():
    # Conv4Wide_BinAct with width_mult 2: scale(64) = 128, scale(128) = 256, scale(256) = 512
    expected = (sign_stage(3, 128) + sign_stage(128, 256)
                + [FLAT, fc(256 * 8 * 8, 512), bn(512), SIGN, fc(512, 512), bn(512), SIGN, fc(512, 10)])
    check("conv4_bin_wide", expected)


# ---------------------------------------------------------------- ResNets (models/resnet_cifar*.py, resnet*.py)

def basic_block(cin, cout, stride, act):
    """BasicBlock / BasicBlock_BinAct forward: conv1 bn1 act conv2 bn2, shortcut (1x1 conv, BN) where the
    shape changes, the sum, act."""
    seq = [conv3(cin, cout, stride), bn(cout), act, conv3(cout, cout), bn(cout)]
    if stride != 1 or cin != cout:
        seq += [conv1(cin, cout, stride), bn(cout)]
    return seq + [act]


def stages(block, widths, counts, cin, act, **kwargs):
    seq = []
    for stage, (width, count) in enumerate(zip(widths, counts)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            out, layers = block(cin, width, stride, act, **kwargs)
            seq += layers
            cin = out
    return seq


def basic(cin, width, stride, act):
    return width, basic_block(cin, width, stride, act)


def cifar_resnet18(act):
    # cResNet18 / cResNet18_BinAct: conv1 (3x3, stride 1) -> bn1 -> act, layer1..4, avg_pool2d(4), fc
    return ([conv3(3, 64), bn(64), act] + stages(basic, (64, 128, 256, 512), (2, 2, 2, 2), 64, act)
            + [AVG, FLAT, fc(512, 10)])


@pytest.mark.parametrize("name,act", [("resnet18_cifar", RELU), ("resnet18_cifar_bin", SIGN)])
def test_resnet18_cifar_matches_the_original(name, act):
    seq = executed(name)
    assert seq[:3] == [conv3(3, 64), bn(64), act]                                # stem, no max-pool
    assert seq[3:9] == [conv3(64, 64), bn(64), act, conv3(64, 64), bn(64), act]  # layer1.0, no shortcut
    assert seq[15:23] == [conv3(64, 128, 2), bn(128), act, conv3(128, 128), bn(128),
                          conv1(64, 128, 2), bn(128), act]                       # layer2.0, 1x1 shortcut
    assert seq[-3:] == [AVG, FLAT, fc(512, 10)]                                  # head
    assert seq == cifar_resnet18(act)
    assert registered(name) == seq


def wrn34_2_bin():
    # WideResNet34_2_BinAct: conv1 (7x7/2) -> bn1 -> maxpool -> act, layer1..4 with planes 64, 64*(2+1),
    # 128*(2+1), 256*(2+1), avgpool, fc
    return ([("conv", 3, 64, 7, 2, 3), bn(64), POOL3, SIGN]
            + stages(basic, (64, 192, 384, 768), (3, 4, 6, 3), 64, SIGN) + [AVG, FLAT, fc(768, 1000)])


def test_wide_resnet34_2_bin_matches_the_original():
    seq = executed("wide_resnet34_2_bin", 224, 1000)
    assert seq[:4] == [("conv", 3, 64, 7, 2, 3), bn(64), POOL3, SIGN]            # stem: pool before sign
    assert seq[4:10] == [conv3(64, 64), bn(64), SIGN, conv3(64, 64), bn(64), SIGN]   # layer1.0
    assert seq[22:30] == [conv3(64, 192, 2), bn(192), SIGN, conv3(192, 192), bn(192),
                          conv1(64, 192, 2), bn(192), SIGN]                      # layer2.0
    assert seq[-3:] == [AVG, FLAT, fc(768, 1000)]                                # head
    assert seq == wrn34_2_bin()
    assert registered("wide_resnet34_2_bin", 224, 1000) == seq


def bottleneck(cin, planes, stride, act, inner_mult):
    """Bottleneck forward (stride on the 3x3): 1x1 bn act 3x3 bn act 1x1 bn, shortcut, the sum, act."""
    width, out = planes * inner_mult, planes * 4
    seq = [conv1(cin, width), bn(width), act, conv3(width, width, stride), bn(width), act,
           conv1(width, out), bn(out)]
    if stride != 1 or cin != out:
        seq += [conv1(cin, out, stride), bn(out)]
    return out, seq + [act]


def test_wide_resnet50_2_matches_the_original():
    # WideResNet50_2: ResNet(Bottleneck, [3, 4, 6, 3], base_width=128): conv1 (7x7/2) -> bn1 -> relu ->
    # maxpool, layer1..4 (planes 64..512, 3x3 width 2 x planes, output 4 x planes), avgpool, fc
    seq = executed("wide_resnet50_2", 224, 1000)
    assert seq[:4] == [("conv", 3, 64, 7, 2, 3), bn(64), RELU, POOL3]
    assert seq[-3:] == [AVG, FLAT, fc(2048, 1000)]
    assert seq == ([("conv", 3, 64, 7, 2, 3), bn(64), RELU, POOL3]
                   + stages(bottleneck, (64, 128, 256, 512), (3, 4, 6, 3), 64, RELU, inner_mult=2)
                   + [AVG, FLAT, fc(2048, 1000)])
    assert registered("wide_resnet50_2", 224, 1000) == seq

