"""Checkpoints of the original BIPROP code as tickets: the imported network computes the original's function.

The fixture (../shared/fixtures/original-biprop/) is a checkpoint written by the original code with its own
outputs. For the other families, checkpoints in the original's format are made here: their state_dict names
and shapes are written out from the original's model definitions (chrundle/biprop: models/frankle.py,
models/resnet_cifar*.py, models/resnet*.py), and a reference forward written the way the original's runs
(FC layers as 1x1 convs over an (N, C, 1, 1) view, torch.sign activations, its mask and alpha rules) gives the
outputs the imported ticket must reproduce.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from biprop_hpc.config import ConfigError, build_config
from biprop_hpc.ticket import TicketError, import_original, load, module_from_ticket, read, write_ticket
from biprop_hpc.ticket.export import build, check_shapes
from biprop_hpc.ticket.original import original_kept, original_mask, translate
from biprop_hpc.ticket.pretrained import load_pretrained
from biprop_hpc.train.loop import model_from_config

ROOT = Path(__file__).parent.parent
SHARED = Path(os.environ.get("BIPROP_SHARED", ROOT.parent / "shared"))
FIXTURE = SHARED / "fixtures/original-biprop"


@pytest.fixture
def fixture_dir():
    if not (FIXTURE / "conv4_k0.5.pth").is_file():
        pytest.fail(f"the original-format fixture is missing: {FIXTURE}/conv4_k0.5.pth (set BIPROP_SHARED to the "
                    "directory holding fixtures/original-biprop)")
    return FIXTURE


def biprop(*args):
    return subprocess.run([sys.executable, "-m", "biprop_hpc", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------ the fixture

def test_imported_fixture_computes_the_originals_logits(fixture_dir, tmp_path):
    out = tmp_path / "conv4.h5"
    done = biprop("import-original", fixture_dir / "conv4_k0.5.pth", "--model", "conv4", "--out", out)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ticket_bytes"] == out.stat().st_size
    reference = np.load(fixture_dir / "conv4_k0.5.npz")
    net = load(out)
    with torch.no_grad():
        logits = net(torch.from_numpy(reference["x"]))
    torch.testing.assert_close(logits, torch.from_numpy(reference["logits"]), rtol=1e-5, atol=1e-5)
    ticket = read(out)
    assert ticket.config["model"] == "conv4" and ticket.config["keep_ratio"] == 0.5
    assert (ticket.in_channels, ticket.num_classes, ticket.image_size) == (3, 10, 32)
    assert ticket.attrs["source"] == "original biprop checkpoint" and ticket.attrs["original_arch"] == "Conv4"
    state = torch.load(fixture_dir / "conv4_k0.5.pth", weights_only=False)["state_dict"]
    ours = {"convs.0": "0", "convs.2": "2", "convs.5": "5", "convs.7": "7", "linear.0": "11", "linear.2": "13",
            "linear.4": "15"}
    for theirs, name in ours.items():
        layer = next(layer for layer in ticket.layers if layer.name == name)
        n = state[f"{theirs}.weight"].numel()
        assert layer.kept == n - int((1 - 0.5) * n)
        assert torch.equal(layer.mask().flatten(), original_mask(state[f"{theirs}.scores"], 0.5).flatten())
    info = biprop("ticket", "info", out)
    assert info.returncode == 0 and "original biprop checkpoint" in info.stdout


def test_module_prefix_and_bare_state_dicts_import_the_same(fixture_dir, tmp_path):
    checkpoint = torch.load(fixture_dir / "conv4_k0.5.pth", weights_only=False)
    expected = import_original(fixture_dir / "conv4_k0.5.pth")        # arch and prune_rate from the file
    wrapped = {**checkpoint, "state_dict": {f"module.{k}": v for k, v in checkpoint["state_dict"].items()}}
    torch.save(wrapped, tmp_path / "dataparallel.pth")
    torch.save(checkpoint["state_dict"], tmp_path / "bare.pth")
    for ticket in (import_original(tmp_path / "dataparallel.pth"),
                   import_original(tmp_path / "bare.pth", "Conv4", keep_ratio=0.5)):
        for a, b in zip(expected.layers, ticket.layers):
            assert a.name == b.name and torch.equal(a.effective_weight(), b.effective_weight())
    with pytest.raises(ConfigError, match="--model"):
        import_original(tmp_path / "bare.pth", keep_ratio=0.5)
    with pytest.raises(ConfigError, match="--keep-ratio"):
        import_original(tmp_path / "bare.pth", "conv4")


def test_another_architecture_or_shape_is_a_clear_error_and_nothing_is_written(fixture_dir, tmp_path):
    out = tmp_path / "t.h5"
    done = biprop("import-original", fixture_dir / "conv4_k0.5.pth", "--model", "conv6", "--out", out)
    assert done.returncode == 2 and "Conv4" in done.stderr and "another architecture" in done.stderr
    checkpoint = torch.load(fixture_dir / "conv4_k0.5.pth", weights_only=False)
    bare = tmp_path / "bare.pth"
    torch.save(checkpoint["state_dict"], bare)
    done = biprop("import-original", bare, "--model", "conv6", "--keep-ratio", "0.5", "--out", out)
    assert done.returncode == 2 and "conv6" in done.stderr and "Traceback" not in done.stderr
    state = dict(checkpoint["state_dict"])
    state["linear.2.weight"] = torch.randn(256, 200, 1, 1)       # a layer of another shape
    state["linear.2.scores"] = torch.randn(256, 200, 1, 1)
    torch.save({**checkpoint, "state_dict": state}, bare)
    done = biprop("import-original", bare, "--out", out)
    assert done.returncode == 2 and "linear.2" in done.stderr and "(256, 200)" in done.stderr
    done = biprop("import-original", fixture_dir / "conv4_k0.5.pth", "--model", "vgg_small_textbook", "--out", out)
    assert done.returncode == 2 and "supported" in done.stderr
    torch.save({**checkpoint, "conv_type": "SampleSubnetConv"}, bare)   # edge-popup's sampled masks: not BIPROP
    done = biprop("import-original", bare, "--out", out)
    assert done.returncode == 2 and "SampleSubnetConv" in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".t.h5*"))


def test_the_originals_float_rules_are_reproduced():
    assert original_kept(5120, 0.9) == 4609             # int((1 - 0.9) * 5120) = int(511.99999999999994) = 511
    torch.manual_seed(0)
    scores = torch.randn(5120)
    mask = original_mask(scores, 0.9)
    assert int(mask.sum()) == 4609
    assert bool(scores.abs()[mask].min() >= scores.abs()[~mask].max())
    weight = torch.randn(5120)
    from biprop_hpc.ticket.original import original_alpha
    alpha = original_alpha(weight, mask, 0.9)
    assert alpha == torch.sum(weight.abs() * mask) / 4608   # int(0.9 * 5120) = 4608, not the kept 4609


def test_ties_in_the_originals_mask_go_to_the_higher_index_as_a_stable_sort_ranks_them():
    scores = torch.tensor([0.5, -0.2, 0.2, 0.9, 0.2, -0.1, 0.2, 0.7])
    expected = torch.zeros(8, dtype=torch.bool)
    expected[torch.sort(scores.abs(), stable=True).indices[int((1 - 0.5) * 8):]] = True
    assert torch.equal(original_mask(scores, 0.5), expected)
    assert original_mask(scores, 0.5).tolist() == [True, False, False, True, False, False, True, True]
    big = torch.randint(0, 50, (100_000,)).float()          # many ties, the sampled selection path
    expected = torch.zeros(100_000, dtype=torch.bool)
    expected[torch.sort(big, stable=True).indices[int((1 - 0.3) * 100_000):]] = True
    assert torch.equal(original_mask(big, 0.3), expected)


def test_pretrained_from_the_originals_checkpoint_computes_its_function(fixture_dir):
    cfg = build_config(None, {"model": "conv4", "keep_ratio": 0.5, "dataset": "cifar10"})
    model = model_from_config(cfg, 3, 10, 32).eval()
    report = load_pretrained(model, fixture_dir / "conv4_k0.5.pth")
    assert not report["ignored"] and report["source"] == "original biprop checkpoint"
    reference = np.load(fixture_dir / "conv4_k0.5.npz")
    with torch.no_grad():    # at k = 0.5 and even layer sizes our kept count and alpha are the original's
        logits = model(torch.from_numpy(reference["x"]))
    torch.testing.assert_close(logits, torch.from_numpy(reference["logits"]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ every family

class Original:
    """A checkpoint in the original's format (names, shapes) and the original's forward over it."""

    def __init__(self, arch, make):
        self.arch, self.make, self.state, self.ops = arch, make, {}, []

    def conv(self, name, cout, cin, k=3, scores=True):
        self.state[f"{name}.weight"] = self.make((cout, cin, k, k), weight=True)
        if scores:
            self.state[f"{name}.scores"] = self.make((cout, cin, k, k))

    def bn(self, name, c):
        self.state[f"{name}.running_mean"] = self.make((c,)) * 0.1
        self.state[f"{name}.running_var"] = self.make((c,)).abs() + 0.5
        self.state[f"{name}.num_batches_tracked"] = torch.tensor(7)


def weff(state, name, k):
    w, s = state[f"{name}.weight"], state.get(f"{name}.scores")
    if s is None:
        return w                                              # a dense layer
    n = w.numel()
    order = s.abs().flatten().sort(stable=True).indices
    m = torch.zeros(n)
    m[order[int((1 - k) * n):]] = 1
    m = m.view_as(w)
    alpha = torch.sum(w.abs() * m) / int(k * n)
    return torch.sign(w) * (alpha * m)


def bn(x, state, name):
    return F.batch_norm(x, state[f"{name}.running_mean"], state[f"{name}.running_var"], training=False, eps=1e-5)


def sequential_net(arch, convs, linear, make):
    """models/frankle.py: `convs` and `linear` (1x1 convs) as lists of ("conv", cin, cout) / ("fc", cin, cout) /
    ("bn", c) / ("relu",) / ("sign",) / ("pool",) in the original's order."""
    net = Original(arch, make)
    for prefix, ops in (("convs", convs), ("linear", linear)):
        for i, op in enumerate(ops):
            if op[0] in ("conv", "fc"):
                net.conv(f"{prefix}.{i}", op[2], op[1], 3 if op[0] == "conv" else 1)
            elif op[0] == "bn":
                net.bn(f"{prefix}.{i}", op[1])

    def forward(x, state, k):
        for prefix, ops in (("convs", convs), ("linear", linear)):
            if prefix == "linear":
                x = x.reshape(x.shape[0], -1, 1, 1)
            for i, op in enumerate(ops):
                name = f"{prefix}.{i}"
                if op[0] in ("conv", "fc"):
                    x = F.conv2d(x, weff(state, name, k), padding=1 if op[0] == "conv" else 0)
                elif op[0] == "bn":
                    x = bn(x, state, name)
                elif op[0] == "relu":
                    x = F.relu(x)
                elif op[0] == "sign":
                    x = torch.sign(x)
                else:
                    x = F.max_pool2d(x, 2)
        return x.squeeze()
    net.forward = forward
    return net


def conv_spec(depth, binary, widths=(64, 128, 256, 512), hidden=256, classes=10):
    convs, cin = [], 3
    for stage in range(depth // 2):
        c = widths[stage]
        if binary:
            convs += [("conv", cin, c), ("bn", c), ("sign",), ("conv", c, c), ("pool",), ("bn", c), ("sign",)]
        else:
            convs += [("conv", cin, c), ("relu",), ("conv", c, c), ("relu",), ("pool",)]
        cin = c
    flat = cin * (32 >> (depth // 2)) ** 2
    act = [("bn", hidden), ("sign",)] if binary else [("relu",)]
    linear = [("fc", flat, hidden), *act, ("fc", hidden, hidden), *act, ("fc", hidden, classes)]
    return convs, linear


VGG_SMALL = ([("conv", 3, 128), ("relu",), ("conv", 128, 128), ("pool",), ("bn", 128), ("conv", 128, 256),
              ("conv", 256, 256), ("pool",), ("bn", 256), ("conv", 256, 512), ("conv", 512, 512), ("pool",),
              ("bn", 512), ("relu",)], [("fc", 512 * 16, 10)])
WIDE_VGG_SMALL = ([("conv", 3, 160), ("bn", 160), ("sign",), ("conv", 160, 160), ("pool",), ("bn", 160), ("sign",),
                   ("conv", 160, 320), ("bn", 320), ("sign",), ("conv", 320, 320), ("pool",), ("bn", 320), ("sign",),
                   ("conv", 320, 640), ("bn", 640), ("sign",), ("conv", 640, 640), ("pool",), ("bn", 640),
                   ("relu",)], [("fc", 640 * 16, 10)])


def cifar_resnet(arch, binary, make, classes=10):
    """models/resnet_cifar.py / resnet_cifar_BinAct.py: cResNet18[_BinAct]."""
    net = Original(arch, make)
    net.conv("conv1", 64, 3)
    net.bn("bn1", 64)
    blocks, cin = [], 64
    for s, planes in enumerate((64, 128, 256, 512), start=1):
        for b in range(2):
            stride = 2 if s > 1 and b == 0 else 1
            name = f"layer{s}.{b}"
            net.conv(f"{name}.conv1", planes, cin)
            net.bn(f"{name}.bn1", planes)
            net.conv(f"{name}.conv2", planes, planes)
            net.bn(f"{name}.bn2", planes)
            short = stride != 1 or cin != planes
            if short:
                net.conv(f"{name}.shortcut.0", planes, cin, 1)
                net.bn(f"{name}.shortcut.1", planes)
            blocks.append((name, stride, short))
            cin = planes
    net.conv("fc", classes, 512, 1)
    act = torch.sign if binary else F.relu

    def forward(x, state, k):
        out = act(bn(F.conv2d(x, weff(state, "conv1", k), padding=1), state, "bn1"))
        for name, stride, short in blocks:
            o = act(bn(F.conv2d(out, weff(state, f"{name}.conv1", k), stride=stride, padding=1), state, f"{name}.bn1"))
            o = bn(F.conv2d(o, weff(state, f"{name}.conv2", k), padding=1), state, f"{name}.bn2")
            if short:
                o = o + bn(F.conv2d(out, weff(state, f"{name}.shortcut.0", k), stride=stride), state,
                           f"{name}.shortcut.1")
            else:
                o = o + out
            out = act(o)
        out = F.avg_pool2d(out, 4)
        return F.conv2d(out, weff(state, "fc", k)).flatten(1)
    net.forward = forward
    return net


def imagenet_resnet(arch, block, layers, make, widths=(64, 128, 256, 512), base_width=64, binary=False,
                    classes=1000):
    """models/resnet.py (ResNet: conv1 -> bn1 -> relu -> maxpool) and models/resnet_BinAct.py (WideResNet_BinAct:
    conv1 -> bn1 -> maxpool -> sign), with `downsample` shortcuts."""
    net = Original(arch, make)
    net.conv("conv1", 64, 3, 7)
    net.bn("bn1", 64)
    blocks, cin = [], 64
    expansion = 4 if block == "bottleneck" else 1
    for s, (count, planes) in enumerate(zip(layers, widths), start=1):
        for b in range(count):
            stride = 2 if s > 1 and b == 0 else 1
            name = f"layer{s}.{b}"
            if block == "bottleneck":
                width = int(planes * base_width / 64)
                net.conv(f"{name}.conv1", width, cin, 1)
                net.bn(f"{name}.bn1", width)
                net.conv(f"{name}.conv2", width, width)
                net.bn(f"{name}.bn2", width)
                net.conv(f"{name}.conv3", planes * 4, width, 1)
                net.bn(f"{name}.bn3", planes * 4)
            else:
                net.conv(f"{name}.conv1", planes, cin)
                net.bn(f"{name}.bn1", planes)
                net.conv(f"{name}.conv2", planes, planes)
                net.bn(f"{name}.bn2", planes)
            down = stride != 1 or cin != planes * expansion
            if down:
                net.conv(f"{name}.downsample.0", planes * expansion, cin, 1)
                net.bn(f"{name}.downsample.1", planes * expansion)
            blocks.append((name, stride, down))
            cin = planes * expansion
    net.conv("fc", classes, cin, 1)
    act = torch.sign if binary else F.relu

    def forward(x, state, k):
        x = bn(F.conv2d(x, weff(state, "conv1", k), stride=2, padding=3), state, "bn1")
        x = act(F.max_pool2d(x, 3, 2, 1)) if binary else F.max_pool2d(act(x), 3, 2, 1)
        for name, stride, down in blocks:
            if block == "bottleneck":
                o = act(bn(F.conv2d(x, weff(state, f"{name}.conv1", k)), state, f"{name}.bn1"))
                o = act(bn(F.conv2d(o, weff(state, f"{name}.conv2", k), stride=stride, padding=1), state,
                           f"{name}.bn2"))
                o = bn(F.conv2d(o, weff(state, f"{name}.conv3", k)), state, f"{name}.bn3")
            else:
                o = act(bn(F.conv2d(x, weff(state, f"{name}.conv1", k), stride=stride, padding=1), state,
                           f"{name}.bn1"))
                o = bn(F.conv2d(o, weff(state, f"{name}.conv2", k), padding=1), state, f"{name}.bn2")
            residual = (bn(F.conv2d(x, weff(state, f"{name}.downsample.0", k), stride=stride), state,
                           f"{name}.downsample.1") if down else x)
            x = act(o + residual)
        x = F.adaptive_avg_pool2d(x, 1)
        return F.conv2d(x, weff(state, "fc", k)).view(x.shape[0], -1)
    net.forward = forward
    return net


FAMILIES = {   # arch -> (the original-format net for a tensor maker, our model, input size)
    "Conv2": (lambda make: sequential_net("Conv2", *conv_spec(2, False), make), "conv2", 32),
    "Conv4_BinAct": (lambda make: sequential_net("Conv4_BinAct", *conv_spec(4, True), make), "conv4_bin", 32),
    "Conv6": (lambda make: sequential_net("Conv6", *conv_spec(6, False), make), "conv6", 32),
    "Conv8_BinAct": (lambda make: sequential_net("Conv8_BinAct", *conv_spec(8, True), make), "conv8_bin", 32),
    # Conv4Wide_BinAct at the original's width_mult 1: our conv4_bin_wide (x2) at width_mult 0.5
    "Conv4Wide_BinAct": (lambda make: sequential_net("Conv4Wide_BinAct", *conv_spec(4, True), make),
                         "conv4_bin_wide", 32),
    "VGG_Small": (lambda make: sequential_net("VGG_Small", *VGG_SMALL, make), "vgg_small", 32),
    "Wide_VGG_Small": (lambda make: sequential_net("Wide_VGG_Small", *WIDE_VGG_SMALL, make), "vgg_small_bin", 32),
    "cResNet18": (lambda make: cifar_resnet("cResNet18", False, make), "resnet18_cifar", 32),
    "cResNet18_BinAct": (lambda make: cifar_resnet("cResNet18_BinAct", True, make), "resnet18_cifar_bin", 32),
    "ResNet18": (lambda make: imagenet_resnet("ResNet18", "basic", (2, 2, 2, 2), make), "resnet18", 64),
    "ResNet34": (lambda make: imagenet_resnet("ResNet34", "basic", (3, 4, 6, 3), make), "resnet34", 224),
    "ResNet50": (lambda make: imagenet_resnet("ResNet50", "bottleneck", (3, 4, 6, 3), make), "resnet50", 224),
    "WideResNet50_2": (lambda make: imagenet_resnet("WideResNet50_2", "bottleneck", (3, 4, 6, 3), make,
                                                    base_width=128), "wide_resnet50_2", 224),
    "WideResNet34_2_BinAct": (lambda make: imagenet_resnet("WideResNet34_2_BinAct", "basic", (3, 4, 6, 3), make,
                                                           widths=(64, 192, 384, 768), binary=True),
                              "wide_resnet34_2_bin", 224),
}


def family(arch, make):
    net, model, size = FAMILIES[arch]
    return net(make), model, size


def random_tensor(shape, weight=False):
    return torch.randn(shape) * (0.05 if weight else 1.0)


def meta_tensor(shape, weight=False):
    return torch.empty(shape, device="meta")


ARCHS = list(FAMILIES)
# computed end to end (the others' names and shapes are checked above; the same code imports them)
RUN = ["Conv2", "Conv4_BinAct", "Conv8_BinAct", "Conv4Wide_BinAct", "VGG_Small", "Wide_VGG_Small", "cResNet18_BinAct",
       "ResNet18"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_originals_family_maps_onto_our_model(arch):
    """Names and shapes of the original's state_dict map one to one onto our model's (meta tensors: no memory)."""
    net, model, size = family(arch, meta_tensor)
    imagenet = model.startswith(("resnet", "wide")) and not model.startswith("resnet18_cifar")
    classes = 1000 if imagenet else 10
    width = 0.5 if arch == "Conv4Wide_BinAct" else 1.0
    cfg = build_config(None, {"model": model, "width_mult": width})
    ours = build(cfg, 3, classes, size, "meta")
    translated = translate(net.state, ours)
    assert len(translated) == len(net.state)
    check_shapes(ours, {k: tuple(v.shape) for k, v in translated.items()}, arch, model)


@pytest.mark.parametrize("arch", RUN)
def test_imported_family_computes_the_originals_function(arch, tmp_path):
    torch.manual_seed(sum(map(ord, arch)))
    net, model, size = family(arch, random_tensor)
    k = 0.3                                  # int((1 - k) n) and int(k n) differ from our own rounding here
    path = tmp_path / f"{arch}.pth"
    prefix = "module." if arch.startswith("c") else ""      # as with DataParallel
    torch.save({"epoch": 3, "arch": arch, "state_dict": {prefix + k_: v for k_, v in net.state.items()},
                "prune_rate": k, "conv_type": "SubnetConv"}, path)
    ticket = import_original(path, image_size=size if size != 224 else None)
    assert ticket.config["model"] == model
    if arch == "Conv4Wide_BinAct":
        assert ticket.config["width_mult"] == 0.5
    write_ticket(tmp_path / "t.h5", ticket)
    ours = load(tmp_path / "t.h5")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = net.forward(x, net.state, k)
        got = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    for layer in ticket.layers:
        assert layer.kept == original_kept(layer.numel, k)


def test_a_dense_first_layer_and_learned_bn_are_imported(tmp_path):
    torch.manual_seed(5)
    net = sequential_net("Conv2_BinAct", *conv_spec(2, True), random_tensor)
    state = dict(net.state)
    del state["convs.0.scores"]                              # the original's first_layer_dense / DenseConv
    for key in [k for k in state if k.endswith("running_mean")]:
        c = state[key].shape[0]
        state[key.replace("running_mean", "weight")] = torch.rand(c) + 0.5   # AffineBatchNorm
        state[key.replace("running_mean", "bias")] = torch.randn(c) * 0.1
    torch.save({"arch": "Conv2_BinAct", "state_dict": state, "prune_rate": 0.4}, tmp_path / "c.pth")
    ticket = import_original(tmp_path / "c.pth")
    assert ticket.config["first_layer"] == "frozen" and ticket.config["learn_batchnorm"]
    assert ticket.layers[0].name == "3" and "0.weight" in ticket.tensors
    ours = module_from_ticket(ticket)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = ours(x)
    # the reference: BN with its affine parameters, the dense first conv as it is
    y = F.conv2d(x, state["convs.0.weight"], padding=1)
    for i, op in list(enumerate(conv_spec(2, True)[0]))[1:]:
        name = f"convs.{i}"
        if op[0] == "conv":
            y = F.conv2d(y, weff(state, name, 0.4), padding=1)
        elif op[0] == "bn":
            y = F.batch_norm(y, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                             state[f"{name}.bias"], training=False)
        elif op[0] == "sign":
            y = torch.sign(y)
        else:
            y = F.max_pool2d(y, 2)
    y = y.reshape(2, -1, 1, 1)
    for i, op in enumerate(conv_spec(2, True)[1]):
        name = f"linear.{i}"
        if op[0] == "fc":
            y = F.conv2d(y, weff(state, name, 0.4))
        elif op[0] == "bn":
            y = F.batch_norm(y, state[f"{name}.running_mean"], state[f"{name}.running_var"], state[f"{name}.weight"],
                             state[f"{name}.bias"], training=False)
        else:
            y = torch.sign(y)
    torch.testing.assert_close(got, y.squeeze(), rtol=1e-4, atol=1e-4 * y.abs().max().item())


def test_unknown_architectures_are_refused(tmp_path):
    torch.save({"arch": "cResNet20", "state_dict": {"conv1.weight": torch.zeros(16, 3, 3, 3)}, "prune_rate": 0.5},
               tmp_path / "r20.pth")
    with pytest.raises(TicketError, match="cResNet20.*no counterpart"):
        import_original(tmp_path / "r20.pth")
    with pytest.raises(TicketError, match="biprop-hpc checkpoint"):
        from biprop_hpc.ticket.original import original_state
        original_state({"format_version": 1, "model": {}}, "x.pt")
