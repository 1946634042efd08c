"""Tests of the model zoo: every registered model builds, trains its scores only, and has the paper's size.

Expected sizes are computed here independently: from the layer lists of SPEC.md and from torchvision's
reference ResNets (built on the meta device, so no memory or init time is spent).
"""
import pytest
import torch
import torchvision
from torch import nn

from biprop_hpc.models import MODELS, LayerBuilder, build_model
from biprop_hpc.nn import BinaryActivation, BipropMixin

IMAGENET = {"resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet34_2_bin"}
CIFAR_ONLY = {"resnet18_cifar", "resnet18_cifar_bin"}   # built for 3x32x32 (they also run on 28x28)
# Behaviour is checked at a quarter of the paper's widths (same topology, fast on a CPU); the paper's
# full-width sizes are checked without a forward pass, on the meta device.
SMALL_WIDTH = 0.25


def input_shapes(name):
    """(in_channels, image_size, num_classes, width_mult) configurations to build `name` with."""
    if name in IMAGENET:
        return [(3, 64, 10, SMALL_WIDTH)]
    if name in CIFAR_ONLY:
        return [(3, 32, 10, SMALL_WIDTH)]
    return [(3, 32, 10, SMALL_WIDTH), (1, 28, 10, SMALL_WIDTH)]   # CIFAR-10 and Fashion-MNIST


def build(name, builder=None, in_channels=3, image_size=32, num_classes=10, width_mult=1.0):
    return build_model(name, builder or LayerBuilder(), in_channels=in_channels, num_classes=num_classes,
                       image_size=image_size, width_mult=width_mult)


def weight_layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def is_biprop(module):
    return isinstance(module, BipropMixin)


def weight_count(model):
    return sum(m.weight.numel() for m in weight_layers(model))


def expected_n_keep(numel, k):
    """numel - floor((1 - k) * numel) in integer arithmetic, with k = p / 10**6 exactly."""
    p = round(k * 10**6)
    return numel - ((10**6 - p) * numel) // 10**6


CASES = [(name, shape) for name in sorted(MODELS) for shape in input_shapes(name)]


def test_registry_contains_the_paper_models():
    for name in ("vgg_small", "vgg_small_bin", "vgg_small_textbook", "resnet18_cifar", "resnet18_cifar_bin", "resnet18",
                 "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet34_2_bin"):
        assert name in MODELS


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{s[0]}x{s[1]}" for n, s in CASES])
def test_forward_backward_trains_scores_only(name, shape):
    in_channels, size, classes, width_mult = shape
    k = 0.3
    torch.manual_seed(0)
    model = build(name, LayerBuilder(keep_ratio=k), in_channels, size, classes, width_mult)
    layers = weight_layers(model)
    assert layers, "a model without conv/linear layers"
    # every conv and linear is a bias-free BIPROP layer by default (first, last and shortcuts included)
    assert all(is_biprop(m) for m in layers)
    assert all(m.bias is None for m in layers)
    first = layers[0]
    assert (first.in_channels == in_channels if isinstance(first, nn.Conv2d)
            else first.in_features == in_channels * size * size)
    assert isinstance(layers[-1], nn.Linear) and layers[-1].out_features == classes
    # total kept weights = sum over layers of numel - floor((1 - k) * numel)
    kept = sum(int(m.mask().sum()) for m in layers)
    assert kept == sum(expected_n_keep(m.weight.numel(), k) for m in layers)

    model.train()
    x = torch.randn(2, in_channels, size, size)
    out = model(x)
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for m in layers:
        assert m.scores.grad is not None and torch.isfinite(m.scores.grad).all()
        assert m.weight.grad is None and not m.weight.requires_grad
    assert any(m.scores.grad.abs().sum() > 0 for m in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("scores")}
    # BN is non-affine by default
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert not m.affine


@pytest.mark.parametrize("name,size", [("vgg_small_bin", 32), ("resnet18_cifar_bin", 32),
                                       ("wide_resnet50_2", 64)])
def test_paper_models_at_full_width(name, size):
    torch.manual_seed(0)
    model = build(name, LayerBuilder(keep_ratio=0.2), 3, size, 10)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    layers = weight_layers(model)
    assert all(is_biprop(m) and m.scores.grad is not None and m.weight.grad is None for m in layers)


def test_eval_mode_output_is_deterministic_and_batch_independent():
    torch.manual_seed(0)
    model = build("resnet18_cifar", LayerBuilder(keep_ratio=0.5), width_mult=SMALL_WIDTH).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        assert torch.allclose(model(x[:1]), full[:1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- paper sizes

def basic_resnet_weights(stem, widths, blocks, classes, in_channels=3, stem_kernel=7):
    """conv + fc weights of a BasicBlock ResNet with 1x1 conv shortcuts where the shape changes."""
    total = in_channels * stem * stem_kernel ** 2
    channels = stem
    for stage, (width, count) in enumerate(zip(widths, blocks)):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            total += channels * width * 9 + width * width * 9
            if stride != 1 or channels != width:
                total += channels * width
            channels = width
    return total + channels * classes


def torchvision_layers(factory, num_classes=1000):
    with torch.device("meta"):
        reference = factory(num_classes=num_classes)
    return [(type(m).__name__ if isinstance(m, nn.Linear) else "Conv2d", tuple(m.weight.shape),
             getattr(m, "stride", None), getattr(m, "padding", None)) for m in weight_layers(reference)]


def our_layers(name, num_classes=1000):
    with torch.device("meta"):
        model = build(name, LayerBuilder(keep_ratio=0.2), 3, 224, num_classes)
    return [("Linear" if isinstance(m, nn.Linear) else "Conv2d", tuple(m.weight.shape),
             getattr(m, "stride", None), getattr(m, "padding", None)) for m in weight_layers(model)]


@pytest.mark.parametrize("name,factory", [
    ("resnet18", torchvision.models.resnet18), ("resnet34", torchvision.models.resnet34),
    ("resnet50", torchvision.models.resnet50), ("wide_resnet50_2", torchvision.models.wide_resnet50_2)])
def test_imagenet_resnets_have_torchvision_topology(name, factory):
    assert our_layers(name) == torchvision_layers(factory)


def test_wide_resnet50_2_has_68_9M_weights():
    with torch.device("meta"):
        model = build("wide_resnet50_2", LayerBuilder(), 3, 224, 1000)
        reference = torchvision.models.wide_resnet50_2()
    count = weight_count(model)
    assert count == weight_count(reference)
    # the paper's 68.9M is torchvision's parameter total (68.88M incl. BN affine and fc bias);
    # its conv + fc weights alone are 68.81M
    reference_total = sum(p.numel() for p in reference.parameters())
    assert round(reference_total / 1e6, 1) == 68.9
    assert abs(count - 68.9e6) < 0.1e6


def test_wide_resnet34_2_has_48_3M_weights():
    with torch.device("meta"):
        model = build("wide_resnet34_2_bin", LayerBuilder(), 3, 224, 1000)
    count = weight_count(model)
    assert count == basic_resnet_weights(64, (64, 192, 384, 768), (3, 4, 6, 3), 1000)
    assert abs(count - 48.3e6) < 0.05e6
    assert [m.weight.shape[0] for m in weight_layers(model) if isinstance(m, nn.Conv2d)
            and m.kernel_size == (3, 3)][::2] == [64] * 3 + [192] * 4 + [384] * 6 + [768] * 3


def vgg_small_weights(widths, in_channels, size, classes):
    a, b, c = widths
    convs = [(in_channels, a), (a, a), (a, b), (b, b), (b, c), (c, c)]
    return sum(i * o * 9 for i, o in convs) + c * (size // 8) ** 2 * classes


@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 28)])
def test_vgg_small_sizes(in_channels, size):
    assert weight_count(build("vgg_small", None, in_channels, size)) == \
        vgg_small_weights((128, 256, 512), in_channels, size, 10)
    assert weight_count(build("vgg_small_bin", None, in_channels, size)) == \
        vgg_small_weights((160, 320, 640), in_channels, size, 10)
    assert weight_count(build("vgg_small", None, in_channels, size, width_mult=0.5)) == \
        vgg_small_weights((64, 128, 256), in_channels, size, 10)
    assert weight_count(build("vgg_small_textbook", None, in_channels, size)) == \
        vgg_small_weights((128, 256, 512), in_channels, size, 10)


def test_vgg_small_textbook_layer_order():
    """The textbook VGG-Small: BN and ReLU after every conv (the paper's `vgg_small` is the original's,
    see test_models_original.py)."""
    model = build("vgg_small_textbook", LayerBuilder())
    kinds = [type(m).__name__ for m in model if not isinstance(m, nn.Flatten)]
    conv, bn, act, pool = "BipropConv2d", "BatchNorm2d", "ReLU", "MaxPool2d"
    plain, pooled = [conv, bn, act], [conv, pool, bn, act]
    assert kinds == (plain + pooled) * 3 + ["BipropLinear"]


def test_resnet18_cifar_size():
    model = build("resnet18_cifar", LayerBuilder())
    assert weight_count(model) == basic_resnet_weights(64, (64, 128, 256, 512), (2, 2, 2, 2), 10,
                                                       stem_kernel=3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    first = weight_layers(model)[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert weight_count(build("resnet18_cifar_bin", LayerBuilder())) == weight_count(model)


# ---------------------------------------------------------------- builder options

EDGE_CASES = ["conv4", "conv6_bin", "vgg_small", "vgg_small_bin", "resnet18_cifar", "resnet18_cifar_bin",
              "resnet18", "resnet50", "wide_resnet50_2", "wide_resnet34_2_bin"]


def small(name, builder, in_channels=3):
    return build(name, builder, in_channels, 64 if name in IMAGENET else 32, 10, SMALL_WIDTH)


@pytest.mark.parametrize("name", EDGE_CASES)
def test_dense_layer_type_trains_every_weight(name):
    model = small(name, LayerBuilder(layer_type="dense"))
    layers = weight_layers(model)
    assert not any(is_biprop(m) for m in layers)
    assert all(m.weight.requires_grad and m.bias is None for m in layers)
    assert not any(n.endswith("scores") for n, _ in model.named_parameters())
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.affine
    out = model(torch.randn(2, 3, 64 if name in IMAGENET else 32, 64 if name in IMAGENET else 32))
    out.sum().backward()
    assert all(m.weight.grad is not None for m in layers)


@pytest.mark.parametrize("name", EDGE_CASES)
@pytest.mark.parametrize("position", ["first", "last"])
@pytest.mark.parametrize("kind", ["frozen", "trained"])
def test_dense_first_or_last_layer(name, position, kind):
    in_channels = 1 if name not in IMAGENET and name not in CIFAR_ONLY else 3
    model = small(name, LayerBuilder(**{f"{position}_layer": kind}), in_channels)
    layers = weight_layers(model)
    plain = [i for i, m in enumerate(layers) if not is_biprop(m)]
    assert plain == ([0] if position == "first" else [len(layers) - 1])
    layer = layers[plain[0]]
    if position == "first":
        assert isinstance(layer, nn.Conv2d) and layer.in_channels == in_channels
    else:
        assert isinstance(layer, nn.Linear) and layer.out_features == 10
    assert layer.weight.requires_grad == (kind == "trained")
    assert layer.bias is None


@pytest.mark.parametrize("name", EDGE_CASES)
@pytest.mark.parametrize("learn", [False, True])
def test_learn_batchnorm_toggles_affine(name, learn):
    model = small(name, LayerBuilder(learn_batchnorm=learn))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms or name == "conv4"   # the MPT-1/32 Conv nets have no BN
    assert all(m.affine == learn for m in norms)
    assert all(p.requires_grad for m in norms for p in m.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {id(p) for m in weight_layers(model) for p in [m.scores]}
    expected |= {id(p) for m in norms for p in m.parameters()}
    assert trainable == expected
    assert all(is_biprop(m) for m in weight_layers(model))


def test_keep_ratio_reaches_every_layer():
    model = small("wide_resnet34_2_bin", LayerBuilder(keep_ratio=0.4, weight_init="sc"))
    for m in weight_layers(model):
        assert m.keep_ratio == 0.4 and m.weight_init == "sc"


BINARY = sorted(n for n in MODELS if "_bin" in n)


@pytest.mark.parametrize("name", BINARY)
def test_binary_models_are_binary_after_the_first_layer(name):
    """Every conv but the first and every hidden FC sees only +-1. At most one ReLU, as the last activation
    before the classifier (the original's VGG-Small x1.25 ends pool -> BN -> ReLU): the classifier sees
    values >= 0 there, and elsewhere +-1 or their average."""
    model = small(name, LayerBuilder())
    activations = [m for m in model.modules()
                   if isinstance(m, (BinaryActivation, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU))]
    assert any(isinstance(m, BinaryActivation) for m in activations)
    relus = [i for i, m in enumerate(activations) if not isinstance(m, BinaryActivation)]
    assert relus in ([], [len(activations) - 1])
    assert all(type(activations[i]) is nn.ReLU for i in relus)
    layers = weight_layers(model)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.__setitem__(mod, inp[0].detach()))
             for m in layers]
    size = 64 if name in IMAGENET else 32
    x = torch.randn(2, 3, size, size)
    model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(seen[layers[0]], x)   # the first layer sees real pixels
    for m in layers[1:-1]:
        assert torch.all(seen[m].abs() == 1), f"{name}: a hidden layer sees non-binary inputs"
    classifier = seen[layers[-1]]
    if relus:
        assert torch.all(classifier >= 0)
    else:
        assert torch.all(classifier.abs() <= 1)


@pytest.mark.parametrize("name", sorted(n for n in MODELS if "_bin" not in n))
def test_full_precision_models_use_relu(name):
    model = small(name, LayerBuilder())
    assert any(isinstance(m, nn.ReLU) for m in model.modules())
    assert not any(isinstance(m, BinaryActivation) for m in model.modules())


@pytest.mark.parametrize("name,width_mult", [("vgg_small_bin", 0.5), ("resnet18_cifar", 0.5),
                                             ("resnet50", 0.25), ("wide_resnet34_2_bin", 0.5)])
def test_width_mult_scales_every_width(name, width_mult):
    with torch.device("meta"):
        full = build(name, None, 3, 32, 10, 1.0)
        scaled = build(name, None, 3, 32, 10, width_mult)
        full_widths = [m.weight.shape[0] for m in weight_layers(full)[:-1]]
        scaled_widths = [m.weight.shape[0] for m in weight_layers(scaled)[:-1]]
        assert scaled_widths == [max(1, round(w * width_mult)) for w in full_widths]


def test_seeded_models_are_reproducible():
    def state(seed):
        torch.manual_seed(seed)
        model = build("resnet18_cifar_bin", LayerBuilder(keep_ratio=0.3), width_mult=SMALL_WIDTH)
        return model.state_dict()
    a, b, c = state(1), state(1), state(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not all(torch.equal(a[key], c[key]) for key in a if key.endswith(("weight", "scores")))


def test_unknown_model_name_suggests_a_close_one():
    with pytest.raises(ValueError, match="vgg_small"):
        build("vgg_smal", LayerBuilder())
    with pytest.raises(ValueError, match="wide_resnet50_2"):
        build("wide_resnet50-2", LayerBuilder())
    with pytest.raises(ValueError, match="unknown model"):
        build("no_such_model_xyz", LayerBuilder())


def test_too_small_images_are_rejected_by_vgg():
    with pytest.raises(ValueError):
        build("vgg_small", LayerBuilder(), 3, 4, 10)
    assert weight_count(build("vgg_small", LayerBuilder(), 3, 8, 10)) == \
        vgg_small_weights((128, 256, 512), 3, 8, 10)
