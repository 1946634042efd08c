"""The packed binary engine (biprop_hpc.packed) against the float BIPROP network it replaces.

What "exact" means here. The float network computes conv(x, W_eff) in float32 with W_eff in {-alpha, 0, +alpha}
and x in {-1, +1}: a sum of +-alpha terms, rounded as float32 sums are. The packed layer computes the integer
d = sum(x * sign(W) * mask) with popcounts. Exact means: d equals the float output divided by alpha, rounded to
the nearest integer, and equals the same convolution done in float64 on the integers (no rounding at all);
the float output of a packed layer is float32(d * alpha), the exact value rounded once. Sign activations after
BN are decided by thresholds on d that the model's own BN modules produce, so every bit equals the float
network's sign. Whole networks: the logits equal the float network's (the classifier is computed as the float
network computes it) and so do the predictions; `biprop infer` gives the same predictions and metrics with
both engines. Every CPU path this machine has is forced in turn (avx512, avx2, scalar); a process started
with BIPROP_PACKED_CPU=avx2 (a CPU without AVX-512) runs and matches as well.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ticket_damage as damage

from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import BinaryActivation, BipropConv2d, BipropLinear
from biprop_hpc.packed import (
    binary_inputs,
    cpu_path,
    dense_ternary,
    forced_cpu_path,
    model_bytes,
    pack_model,
    pack_sign,
    set_cpu_path,
    supported_cpu_paths,
)
from biprop_hpc.packed.layers import PackedConv, ThresholdPack

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["avx512", "avx2", "scalar"]


def cpu_paths():
    return [pytest.param(p, marks=pytest.mark.skipif(p not in supported_cpu_paths(), reason=f"no {p} on this CPU"))
            for p in PATHS]


@pytest.fixture(autouse=True)
def _auto_path():
    yield
    set_cpu_path("auto")


def signs(shape, generator):
    return torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)


def plain_conv(layer: BipropConv2d) -> nn.Conv2d:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, bias=False)
    conv.weight.data = layer.effective_weight().detach().clone()
    return conv


def plain_linear(layer: BipropLinear) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False)
    linear.weight.data = layer.effective_weight().detach().clone()
    return linear


def random_bn(bn, generator, zero_scale=True):
    """Running statistics far from the defaults; affine BNs also get negative and zero scales."""
    bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 3)
    bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) * 4 + 0.2)
    if bn.affine:
        bn.weight.data = torch.randn(bn.num_features, generator=generator)
        if zero_scale:
            bn.weight.data[0] = 0.0
        bn.bias.data = torch.randn(bn.num_features, generator=generator)
    return bn.eval()


CONVS = [  # in, out, kernel, stride, padding, dilation, H, W, keep
    (3, 5, 3, 1, 1, 1, 7, 9, 0.5),
    (33, 17, 3, 2, 1, 1, 9, 8, 0.05),
    (65, 70, 3, 1, 2, 2, 11, 10, 1.0),
    (130, 33, 1, 2, 0, 1, 7, 7, 0.3),
    (64, 64, 3, 1, 1, 1, 16, 16, 0.2),
    (1, 129, 5, 2, 2, 1, 13, 6, 0.7),
    (200, 48, 3, 2, 1, 1, 5, 5, 0.1),
]


@pytest.mark.parametrize("path", cpu_paths())
@pytest.mark.parametrize("geometry", CONVS, ids=lambda g: "x".join(map(str, g)))
def test_packed_conv_integer_outputs_equal_the_float_layer(geometry, path):
    C, O, k, s, p, d, H, W, keep = geometry
    g = torch.Generator().manual_seed(sum(geometry[:8]))
    torch.manual_seed(int(keep * 100) + C)
    layer = BipropConv2d(C, O, k, s, p, d, keep_ratio=keep)
    w = layer.effective_weight().detach()
    alpha = w.abs().max()
    x = signs((3, C, H, W), g)
    reference = F.conv2d(x, w, None, s, p, d)                                   # what the float model computes
    integers = F.conv2d(x.double(), torch.sign(w).double(), None, s, p, d)     # the same with no rounding
    packed = PackedConv(plain_conv(layer), "int")
    with forced_cpu_path(path):
        assert cpu_path() == path
        out = packed(pack_sign(x))
        assert out.dtype == torch.int32 and out.shape == reference.shape
        assert torch.equal(out.double(), integers)
        assert torch.equal(out, torch.round(reference / alpha).to(torch.int32))
        values = packed(pack_sign(x), mode="float")
        assert torch.equal(values, out.float() * alpha)
        # the float model's sums round: at most about fan-in float32 roundings of partial sums <= fan-in * alpha
        torch.testing.assert_close(values, reference, rtol=0, atol=C * k * k * 2 ** -23 * float(alpha))


@pytest.mark.parametrize("path", cpu_paths())
@pytest.mark.parametrize("channels,hw,out,keep",
                         [(7, 9, 13, 0.5), (65, 4, 33, 0.05), (128, 1, 17, 1.0), (3, 25, 40, 0.3)])
def test_packed_linear_after_flatten_equals_the_float_layer(channels, hw, out, keep, path):
    g = torch.Generator().manual_seed(channels + hw)
    torch.manual_seed(out)
    layer = BipropLinear(channels * hw, out, keep_ratio=keep)
    w = layer.effective_weight().detach()
    side = int(hw ** 0.5)
    x = signs((5, channels, side, side), g)                      # a +-1 map, flattened as the model does
    flat = x.flatten(1)
    integers = F.linear(flat.double(), torch.sign(w).double())
    packed = PackedConv(plain_linear(layer), "int", flatten_hw=hw if hw > 1 else None)
    with forced_cpu_path(path):
        got = packed(pack_sign(x)) if hw > 1 else packed(pack_sign(flat))
    assert torch.equal(got.double(), integers)
    assert torch.equal(got, torch.round(F.linear(flat, w) / w.abs().max()).to(torch.int32))


@pytest.mark.parametrize("path", cpu_paths())
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_sign_epilogue_gives_the_float_networks_bits(path, pool, affine):
    """conv [-> max-pool] -> BN -> sign, with BN scales of both signs and zero: every bit as the float model."""
    g = torch.Generator().manual_seed(3 + pool + 2 * affine)
    torch.manual_seed(7)
    C, O = 37, 70
    conv = plain_conv(BipropConv2d(C, O, 3, 1, 1, keep_ratio=0.3))
    bn = random_bn(nn.BatchNorm2d(O, affine=affine), g)
    # running means near the conv outputs, so that many outputs sit near the threshold
    bn.running_mean.copy_((torch.randint(-9, 10, (O,), generator=g) + 0.5) * conv.weight.detach().abs().max())
    modules = [conv] + ([nn.MaxPool2d(2)] if pool else []) + [bn, BinaryActivation()]
    model = nn.Sequential(nn.Identity(), BinaryActivation(), *modules).eval()   # input already +-1
    x = signs((4, C, 10, 12), g)
    packed = pack_model(model, example_input=x)
    assert packed.packed_layers == ["2"]
    with forced_cpu_path(path):
        got = packed(x)
    assert torch.equal(got, model(x))


@pytest.mark.parametrize("residuals", [(None,), (1.0, -1.0)])
def test_integer_thresholds_give_the_float_decision_for_every_d(residuals):
    """sign(BN(alpha * d) [+ residual]) for every d in [-fan_in, fan_in], BN means on the grid alpha * d (exact
    ties: BN gives 0, the sign +1), scales of both signs and zero: the thresholds decide every d the same."""
    from biprop_hpc.packed.layers import sign_thresholds
    g = torch.Generator().manual_seed(5)
    O, fan_in, alpha = 50, 300, 0.0371
    bn = random_bn(nn.BatchNorm2d(O, affine=True), g)
    a = torch.tensor(alpha, dtype=torch.float32)
    bn.running_mean.copy_(torch.randint(-fan_in, fan_in + 1, (O,), generator=g).float() * a)
    bn.running_var.fill_(1.0 - bn.eps)
    bn.bias.data[: O // 2] = 0.0                                  # BN(alpha * d) is exactly 0 at one d
    thresholds = sign_thresholds(alpha, fan_in, O, [bn], residuals).to(torch.int32)
    d = torch.arange(-fan_in, fan_in + 1)
    values = (d.float() * a)[:, None].expand(-1, O).contiguous()
    y = bn(values[:, :, None, None])[:, :, 0, 0]
    for row, residual in enumerate(residuals):
        expected = BinaryActivation()(y if residual is None else y + residual) < 0
        lo, hi = thresholds[2 * row, :O], thresholds[2 * row + 1, :O]
        got = (d[:, None] < lo[None]) | (d[:, None] > hi[None])
        assert torch.equal(got, expected)


def test_threshold_pack_decides_like_bn_then_sign():
    """Float map -> BN -> sign fused into one pass: the same bits on values at and around each threshold."""
    g = torch.Generator().manual_seed(0)
    bn = random_bn(nn.BatchNorm2d(40, affine=True), g)
    chain = nn.Sequential(bn, BinaryActivation()).eval()
    fused = ThresholdPack([bn], 40)
    lo, hi = fused.lo, fused.hi
    edges = torch.stack([lo, hi]).nan_to_num(0.0, 1.0, -1.0)
    near = torch.cat([edges + delta for delta in (-1e-3, 0.0, 1e-3)]
                     + [torch.nextafter(edges, torch.full_like(edges, float("inf"))),
                        torch.nextafter(edges, torch.full_like(edges, -float("inf")))])
    x = torch.cat([near, torch.randn(50, 40, generator=g) * 5, torch.zeros(1, 40), -torch.zeros(1, 40)])
    x = x[:, :, None, None].repeat(1, 1, 2, 3)
    for path in supported_cpu_paths():
        with forced_cpu_path(path):
            for layout in (x, x.contiguous(memory_format=torch.channels_last)):
                bits = fused(layout)
                assert torch.equal(bits.unpack(), chain(layout)), (path, layout.is_contiguous())


def test_pack_sign_follows_binary_activation():
    """x >= 0 -> +1 (-0.0 included), x < 0 and NaN -> -1, for NCHW, channels_last and [N, C] inputs."""
    x = torch.tensor([[0.0, -0.0, 1e-38, -1e-38, float("inf"), -float("inf"), float("nan"), 3.0, -2.0] * 9])
    act = BinaryActivation()
    for path in supported_cpu_paths():
        with forced_cpu_path(path):
            assert torch.equal(pack_sign(x).unpack(), act(x))
            image = x.view(1, 81, 1, 1).repeat(2, 1, 3, 5)
            assert torch.equal(pack_sign(image).unpack(), act(image))
            assert torch.equal(pack_sign(image.contiguous(memory_format=torch.channels_last)).unpack(), act(image))


def ticket_like(name, keep, image_size, in_channels=3, width_mult=1.0, learn_batchnorm=True, seed=0):
    """A model in the form biprop_hpc.ticket.load returns (plain layers holding W_eff), with BN statistics that
    are not the defaults."""
    torch.manual_seed(seed)
    model = build_model(name, LayerBuilder(keep_ratio=keep, learn_batchnorm=learn_batchnorm),
                        in_channels=in_channels, num_classes=10, image_size=image_size, width_mult=width_mult)
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            random_bn(module, g, zero_scale=False)
    return dense_ternary(model)


NETWORKS = [  # model, keep, image size, width, logits bit for bit
    ("conv4_bin", 0.5, 32, 0.5, True),
    ("conv2_bin", 0.05, 28, 0.25, True),
    ("conv6_bin_wide", 0.3, 16, 0.125, True),
    # the last conv's output goes through pool -> BN -> ReLU to the classifier: float values, where the packed
    # layer gives alpha * d exactly and the float model its rounded sum; equal up to that rounding
    ("vgg_small_bin", 0.25, 16, 0.1, False),
    ("resnet18_cifar_bin", 0.25, 32, 0.25, True),
    ("wide_resnet34_2_bin", 0.4, 40, 0.125, True),
]


@pytest.mark.parametrize("network", NETWORKS, ids=lambda n: n[0])
def test_packed_networks_compute_what_the_float_networks_compute(network):
    name, keep, size, width, bit_for_bit = network
    model = ticket_like(name, keep, size, width_mult=width)
    x = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    packed = pack_model(model, example_input=x)
    # exactly the layers whose input is +-1 in the float model are packed (the classifier is computed as the
    # float model does, see pack_model)
    plus_minus_one = binary_inputs(model, x)
    classifier = list(dict(model.named_modules()))[-1]
    assert set(packed.packed_layers) == {n for n, yes in plus_minus_one.items() if yes} - {classifier}
    assert "0" in packed.float_layers                               # the first layer sees pixels
    with torch.no_grad():
        reference = model(x)
        for path in supported_cpu_paths():
            with forced_cpu_path(path):
                got = packed(x)
            if bit_for_bit:
                assert torch.equal(got, reference), path
            else:
                torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.argmax(1), reference.argmax(1))
    # every sign activation inside: the bits each packed layer receives are the float model's +-1 inputs
    seen = {}
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0]))
             for name, module in model.named_modules() if name in packed.packed_layers]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    received = {}
    for step in packed.modules():
        if isinstance(step, PackedConv):
            step.register_forward_pre_hook(lambda m, a, name=step.name: received.__setitem__(name, a[0].unpack()))
    with torch.no_grad():
        packed(x)
    assert set(received) == set(seen)
    for name, bits in received.items():
        expected = seen[name]
        assert torch.equal(bits.flatten(1) if expected.dim() == 2 else bits, expected), name


def test_packed_classifier_is_exact_integer_logits():
    model = ticket_like("conv4_bin", 0.5, 32, width_mult=0.25)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    packed = pack_model(model, example_input=x, pack_classifier=True)
    assert packed.packed_layers[-1] == "21"
    with torch.no_grad():
        reference, got = model(x), packed(x)
    alpha = model[21].weight.abs().max()
    assert torch.equal(torch.round(got / alpha), torch.round(reference / alpha))
    torch.testing.assert_close(got, reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", ["conv4", "resnet18_cifar"])
def test_mpt_1_32_networks_have_nothing_to_pack(name):
    model = ticket_like(name, 0.5, 32, width_mult=0.25)
    x = torch.randn(2, 3, 32, 32)
    packed = pack_model(model, example_input=x)
    assert packed.packed_layers == []
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_threads_do_not_change_results():
    model = ticket_like("resnet18_cifar_bin", 0.25, 32, width_mult=0.25)
    packed = pack_model(model)
    x = torch.randn(3, 3, 32, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed(x)
        torch.set_num_threads(2)
        two = packed(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_weights_are_over_20x_smaller_at_half_kept():
    """mask bits + the signs of the kept weights: 1.5 bits per weight at keep ratio 0.5 (the first layer too)."""
    model = ticket_like("conv4_bin", 0.5, 32)
    packed = pack_model(model)
    packed(torch.randn(1, 3, 32, 32))                              # padding tables are made at the first call
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights / model_bytes(packed) >= 20
    assert model_bytes(model) / model_bytes(packed) >= 20


def test_unsupported_or_unknown_path_is_refused():
    with pytest.raises(RuntimeError, match="unknown CPU path"):
        set_cpu_path("neon")
    for path in PATHS:
        if path not in supported_cpu_paths():
            with pytest.raises(RuntimeError, match="does not support"):
                set_cpu_path(path)


def run_python(code: str, env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("path", ["avx2", "scalar"])
def test_a_cpu_without_avx512_runs_and_matches(path):
    """BIPROP_PACKED_CPU forces the path for the whole process, as on a CPU without AVX-512 (or without AVX2)."""
    if path not in supported_cpu_paths():
        pytest.skip(f"no {path} here")
    code = (
        "import torch, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_packed import ticket_like\n"
        "from biprop_hpc.packed import pack_model, cpu_path\n"
        "model = ticket_like('resnet18_cifar_bin', 0.25, 32, width_mult=0.25)\n"
        "x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))\n"
        "packed = pack_model(model, example_input=x)\n"
        "with torch.no_grad():\n"
        "    print(cpu_path(), torch.equal(packed(x), model(x)))\n")
    assert run_python(code, {"BIPROP_PACKED_CPU": path}).split() == [path, "True"]


# ---------------------------------------------------------------- biprop infer on a trained ticket
@pytest.fixture(scope="module")
def trained_conv4_bin(tmp_path_factory):
    from biprop_hpc.config import build_config
    from biprop_hpc.dist import Local
    from biprop_hpc.train import train
    fashion = Path("/usr/share/datasets/fashion-mnist")
    if not (fashion / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist (env/install.sh does it)")
    out = tmp_path_factory.mktemp("packed-run")
    cfg = build_config(None, {"dataset": "fashion-mnist", "model": "conv4_bin", "width_mult": 0.25,
                              "train_subset": 3000, "test_subset": 1000, "epochs": 2, "batch_size": 64,
                              "eval_batch_size": 200, "threads": 1, "val_fraction": 0.1, "keep_ratio": 0.5,
                              "optimizer": "adam", "lr": 0.01, "weight_decay": 0.0, "out": str(out)})
    result = train(cfg, Local())
    return Path(result["run_dir"]) / "checkpoints" / "best.pt", result


def biprop(*args):
    done = subprocess.run([sys.executable, "-m", "biprop_hpc", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_biprop_infer_gives_the_same_predictions_and_accuracy_with_both_engines(trained_conv4_bin, tmp_path):
    checkpoint, trained = trained_conv4_bin
    ticket = tmp_path / "conv4.ticket.h5"
    subprocess.run([sys.executable, "-m", "biprop_hpc", "export", "--checkpoint", str(checkpoint), "--out",
                    str(ticket)], cwd=ROOT, check=True, capture_output=True)
    results = {}
    for engine in ("packed", "float"):
        results[engine] = biprop("infer", "--ticket", str(ticket), "--engine", engine, "--threads", "1",
                                 "--predictions", str(tmp_path / f"{engine}.npy"))
    packed, floating = results["packed"], results["float"]
    assert packed["count"] == floating["count"] == 1000
    assert packed["packed_layers"] == 5 and packed["cpu_path"] == supported_cpu_paths()[0]
    predictions = np.load(tmp_path / "packed.npy")
    assert np.array_equal(predictions, np.load(tmp_path / "float.npy"))
    for key in ("top1", "top5", "loss"):
        assert packed[key] == floating[key], key
    assert packed["top1"] == trained["test_top1"]                 # what training reported for this checkpoint
    assert packed["top1"] > 30                                    # trained: better than chance (10%)
    assert floating["weights_bytes"] / packed["weights_bytes"] > 10


def test_biprop_infer_from_a_checkpoint_with_avx2_forced(trained_conv4_bin, tmp_path):
    checkpoint, trained = trained_conv4_bin
    if "avx2" not in supported_cpu_paths():
        pytest.skip("no AVX2 here")
    result = biprop("infer", "--checkpoint", str(checkpoint), "--cpu-path", "avx2", "--batch-size", "64",
                    "--predictions", str(tmp_path / "avx2.npy"))
    assert result["cpu_path"] == "avx2" and result["top1"] == trained["test_top1"]
    floating = biprop("infer", "--checkpoint", str(checkpoint), "--engine", "float", "--batch-size", "64",
                      "--predictions", str(tmp_path / "float.npy"))
    assert np.array_equal(np.load(tmp_path / "avx2.npy"), np.load(tmp_path / "float.npy"))
    assert result["top5"] == floating["top5"]


def test_biprop_infer_refuses_a_damaged_ticket_naming_the_damage(trained_conv4_bin, tmp_path):
    """One bit flipped on disk in a layer's alpha or in a BN running mean gave other metrics and exit 0; infer
    now refuses the ticket before it builds anything: exit 2, one line naming the damaged part."""
    checkpoint, _ = trained_conv4_bin
    ticket = tmp_path / "conv4.ticket.h5"
    subprocess.run([sys.executable, "-m", "biprop_hpc", "export", "--checkpoint", str(checkpoint), "--out",
                    str(ticket)], cwd=ROOT, check=True, capture_output=True)
    cases = (("alpha", lambda path: damage.flip_in_layer(path, 1, "alpha", 0x40),
              r"/layers row of layer 1 \(\S+\)"),
             ("running_mean", lambda path: damage.flip_in_dataset(path, "tensors/1.running_mean", byte=3, mask=0x40),
              r"/tensors/1\.running_mean"))
    for name, spoil, part in cases:
        path = damage.copy(ticket, tmp_path, f"{name}.h5")
        spoil(path)
        done = subprocess.run([sys.executable, "-m", "biprop_hpc", "infer", "--ticket", str(path), "--threads", "1"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
        errors = [line for line in done.stderr.splitlines() if line.startswith("biprop")]
        assert done.returncode == 2 and not done.stdout and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert len(errors) == 1, done.stderr
        assert re.fullmatch(rf"biprop: error: {re.escape(str(path))} is damaged: {part} no longer matches its SHA-256 "
                            r"digest; do not use it: .*", errors[0]), errors[0]


def test_the_extension_builds_without_ninja_into_its_cache(tmp_path):
    """The build env/install.sh runs, the way taken where ninja is missing: a direct compiler call."""
    code = ("from biprop_hpc.packed import load_extension, cpu_path\n"
            "from biprop_hpc.extensions import PACKED\n"
            "load_extension()\n"
            "print(cpu_path(), PACKED.library_path().is_file())\n")
    out = run_python(code, {"BIPROP_CACHE": str(tmp_path), "BIPROP_EXTENSION_BUILD": "direct"})
    assert out.split() == [supported_cpu_paths()[0], "True"]
    assert str(tmp_path) in str(next(tmp_path.glob("torch-extensions/biprop_packed_*/*.so")))


def test_a_model_with_biprop_layers_packs_as_its_ticket_does():
    """pack_model also takes the BIPROP model itself (W_eff from the scores), signed-constant init included (its
    frozen W is +-std everywhere, which must not be mistaken for the ternary W_eff)."""
    torch.manual_seed(3)
    model = build_model("conv4_bin", LayerBuilder(keep_ratio=0.3, weight_init="sc"), in_channels=3, num_classes=10,
                        image_size=16, width_mult=0.25).eval()
    g = torch.Generator().manual_seed(3)
    for module in model.modules():   # statistics as training leaves them (see the next test for the defaults')
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            random_bn(module, g)
    x = torch.randn(4, 3, 16, 16)
    packed = pack_model(model, example_input=x)
    assert packed.packed_layers == ["3", "7", "10", "15", "18"]
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


def test_exact_ties_are_decided_exactly():
    """With a BN mean exactly on alpha * d (the defaults of an untrained model: mean 0, so d = 0), the float
    model's sign depends on the rounding of its float sum, which can land a few ulps either side of 0; the
    packed layer has the exact d = 0, BN(0) = 0, and gives +1 as BinaryActivation does for 0."""
    torch.manual_seed(3)
    conv = plain_conv(BipropConv2d(32, 32, 3, 1, 1, keep_ratio=0.3, weight_init="sc"))
    bn = nn.BatchNorm2d(32).eval()                      # running mean 0, variance 1
    model = nn.Sequential(nn.Identity(), BinaryActivation(), conv, bn, BinaryActivation()).eval()
    x = signs((4, 32, 8, 8), torch.Generator().manual_seed(0))
    packed = pack_model(model)
    with torch.no_grad():
        float_sums = conv(x)
        exact = F.conv2d(x.double(), torch.sign(conv.weight).double(), None, 1, 1)
        got = packed(x)
    assert torch.equal(got, torch.where(exact >= 0, 1.0, -1.0).float())
    ties = exact == 0
    assert bool(ties.any())
    # the float model: what its rounding says at the ties, and the same as exact arithmetic everywhere else
    assert torch.equal(model(x)[~ties], got[~ties])
    assert float_sums[ties].abs().max() < 1e-5
