"""Tests of the BIPROP primitives (biprop_hpc.nn) against independently computed expectations.

Every expectation is computed here from SPEC.md's definitions with plain torch (torch.sort, F.conv2d,
F.linear, autograd on a leaf W_eff), never by calling the code under test a second time.
"""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from biprop_hpc.nn import (BinaryActivation, BipropConv2d, BipropLinear, biprop_layers, check_keep_ratio,
                           init_scores_, init_weight_, kept_count, set_keep_ratio, topk_mask)

SHAPES = [(10,), (3, 7), (64, 3, 3, 3), (17, 5, 3, 3), (1000,)]
KEEP_RATIOS = [0.01, 0.05, 0.2, 0.3, 0.5, 0.77, 0.9, 1.0]


def expected_n_keep(numel, k):
    """numel - floor((1 - k) * numel) in integer arithmetic, with k = p / 10**6 exactly."""
    p = round(k * 10**6)
    return numel - ((10**6 - p) * numel) // 10**6


def reference_mask(scores, n_keep):
    """Top-n_keep of |S| by a full stable descending sort: ties go to the lower flat index."""
    order = torch.sort(scores.detach().abs().flatten(), descending=True, stable=True).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[order[:n_keep]] = True
    return mask.view_as(scores)


def reference_effective_weight(weight, scores, n_keep):
    mask = reference_mask(scores, n_keep)
    alpha = weight.abs()[mask].mean()
    return torch.sign(weight) * alpha * mask.to(weight.dtype), alpha, mask


def make_conv(k=0.5, init="kn", seed=0, **kwargs):
    torch.manual_seed(seed)
    return BipropConv2d(kwargs.pop("cin", 6), kwargs.pop("cout", 8), kwargs.pop("kernel", 3),
                        stride=kwargs.pop("stride", 1), padding=kwargs.pop("padding", 1),
                        keep_ratio=k, weight_init=init)


def make_linear(k=0.5, init="kn", seed=0, fin=20, fout=12):
    torch.manual_seed(seed)
    return BipropLinear(fin, fout, keep_ratio=k, weight_init=init)


# ---------------------------------------------------------------- kept count and mask

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", KEEP_RATIOS)
def test_kept_count_and_mask_size(shape, k):
    numel = math.prod(shape)
    n = expected_n_keep(numel, k)
    assert kept_count(numel, k) == n
    assert 1 <= n <= numel
    scores = torch.randn(shape)
    mask = topk_mask(scores, n)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == n


@pytest.mark.parametrize("k", KEEP_RATIOS)
def test_layer_n_keep_and_mask_count(k):
    for layer in (make_conv(k), make_linear(k)):
        n = expected_n_keep(layer.weight.numel(), k)
        assert layer.n_keep == n
        assert int(layer.mask().sum()) == n


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [0.05, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_is_top_n_of_abs_scores(shape, k, seed):
    torch.manual_seed(seed)
    scores = torch.randn(shape)
    n = expected_n_keep(scores.numel(), k)
    assert torch.equal(topk_mask(scores, n), reference_mask(scores, n))


@pytest.mark.parametrize("shape", [(40,), (8, 9), (16, 4, 3, 3)])
@pytest.mark.parametrize("k", [0.1, 0.25, 0.5, 0.6, 0.95])
def test_mask_ties_go_to_lower_flat_index(shape, k):
    torch.manual_seed(3)
    # |S| takes only three values, with both signs: almost every threshold falls inside a tie
    scores = torch.randint(1, 4, shape).float() * torch.where(torch.rand(shape) < 0.5, -1.0, 1.0)
    n = expected_n_keep(scores.numel(), k)
    mask = topk_mask(scores, n)
    assert torch.equal(mask, reference_mask(scores, n))
    # all entries equal: exactly the first n in flat order are kept
    flat = topk_mask(torch.full(shape, -0.5), n).flatten()
    assert flat[:n].all() and not flat[n:].any()


def test_mask_of_layer_matches_reference_for_tied_scores():
    layer = make_linear(0.3)
    with torch.no_grad():
        layer.scores.copy_(torch.randint(-2, 3, layer.scores.shape).float())
    assert torch.equal(layer.mask(), reference_mask(layer.scores, layer.n_keep))


# ---------------------------------------------------------------- alpha, effective weight, outputs

@pytest.mark.parametrize("init", ["kn", "ukn", "sc", "usc"])
@pytest.mark.parametrize("k", [0.1, 0.5, 1.0])
def test_alpha_and_effective_weight(init, k):
    for layer in (make_conv(k, init), make_linear(k, init)):
        expected, alpha, mask = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
        assert torch.allclose(layer.alpha(), alpha, rtol=1e-6, atol=0)
        assert torch.allclose(layer.effective_weight(), expected, rtol=1e-6, atol=0)
        with torch.no_grad():
            assert torch.allclose(layer.effective_weight(), expected, rtol=1e-6, atol=0)
        # values in {-alpha, 0, +alpha}; zero exactly off the mask, sign of W on it
        w_eff = layer.effective_weight().detach()
        assert torch.all(w_eff[~mask] == 0)
        assert torch.allclose(w_eff[mask].abs(), alpha.expand(int(mask.sum())), rtol=1e-6, atol=0)
        assert torch.equal(torch.sign(w_eff[mask]), torch.sign(layer.weight[mask]))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (1, 0)])
def test_conv_output_matches_functional(stride, padding):
    layer = make_conv(0.3, stride=stride, padding=padding)
    x = torch.randn(3, 6, 9, 9)
    expected, _, _ = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
    ref = F.conv2d(x, expected, None, stride, padding)
    for train in (True, False):
        layer.train(train)
        assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_linear_output_matches_functional():
    layer = make_linear(0.4)
    x = torch.randn(5, 20)
    expected, _, _ = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
    assert torch.allclose(layer(x), F.linear(x, expected), rtol=1e-5, atol=1e-6)


def test_layers_are_bias_free():
    assert make_conv().bias is None and make_linear().bias is None
    with pytest.raises(ValueError):
        BipropConv2d(3, 4, 3, bias=True, keep_ratio=0.5)
    with pytest.raises(ValueError):
        BipropLinear(3, 4, bias=True, keep_ratio=0.5)


# ---------------------------------------------------------------- backward

def _reference_score_grad(layer, x, upstream, functional):
    w_eff, _, _ = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
    leaf = w_eff.clone().requires_grad_(True)
    (functional(x, leaf) * upstream).sum().backward()
    return leaf.grad * layer.weight * torch.sign(layer.scores.detach())


@pytest.mark.parametrize("init", ["kn", "sc"])
@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_conv_score_gradient_is_straight_through_times_weight(init, k):
    layer = make_conv(k, init)
    x = torch.randn(2, 6, 7, 7)
    upstream = torch.randn(2, 8, 7, 7)
    expected = _reference_score_grad(layer, x, upstream, lambda inp, w: F.conv2d(inp, w, None, 1, 1))
    (layer(x) * upstream).sum().backward()
    assert layer.scores.grad is not None
    assert torch.allclose(layer.scores.grad, expected, rtol=1e-4, atol=1e-6)
    # the gradient reaches pruned entries too (straight-through), and never the frozen weight
    assert (layer.scores.grad[~layer.mask()] != 0).any() or k == 1.0
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_linear_score_gradient_is_straight_through_times_weight():
    layer = make_linear(0.3)
    x = torch.randn(4, 20)
    upstream = torch.randn(4, 12)
    expected = _reference_score_grad(layer, x, upstream, F.linear)
    (layer(x) * upstream).sum().backward()
    assert torch.allclose(layer.scores.grad, expected, rtol=1e-4, atol=1e-6)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_only_scores_are_parameters_that_require_grad():
    for layer in (make_conv(), make_linear()):
        trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
        assert trainable == ["scores"]
        assert layer.scores.shape == layer.weight.shape


# ---------------------------------------------------------------- keep ratio validation and changes

@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 1.0000001])
def test_invalid_keep_ratio_raises(bad):
    with pytest.raises(ValueError):
        check_keep_ratio(bad)
    with pytest.raises(ValueError):
        kept_count(100, bad)
    with pytest.raises(ValueError):
        BipropConv2d(3, 4, 3, keep_ratio=bad)
    with pytest.raises(ValueError):
        BipropLinear(3, 4, keep_ratio=bad)
    layer = make_linear(0.5)
    with pytest.raises(ValueError):
        layer.keep_ratio = bad
    assert layer.keep_ratio == 0.5


def test_keep_ratio_one_keeps_everything():
    for layer in (make_conv(1.0), make_linear(1.0)):
        assert layer.n_keep == layer.weight.numel()
        assert layer.mask().all()
        assert torch.allclose(layer.alpha(), layer.weight.abs().mean(), rtol=1e-6, atol=0)


def test_changing_keep_ratio_changes_n_keep_and_mask():
    layer = make_conv(0.5)
    numel = layer.weight.numel()
    weight_before = layer.weight.clone()
    for k in (0.1, 0.7, 0.25):
        layer.keep_ratio = k
        assert layer.n_keep == expected_n_keep(numel, k)
        assert torch.equal(layer.mask(), reference_mask(layer.scores, expected_n_keep(numel, k)))
        with torch.no_grad():
            expected, _, _ = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
            assert torch.allclose(layer.effective_weight(), expected, rtol=1e-6, atol=0)
    assert torch.equal(layer.weight, weight_before)


def test_set_keep_ratio_on_a_model():
    model = torch.nn.Sequential(make_conv(0.5), torch.nn.Flatten(), make_linear(0.5, fin=8 * 4 * 4))
    set_keep_ratio(model, 0.2)
    layers = biprop_layers(model)
    assert len(layers) == 2
    for _, layer in layers:
        assert layer.keep_ratio == 0.2
        assert int(layer.mask().sum()) == expected_n_keep(layer.weight.numel(), 0.2)
    with pytest.raises(ValueError):
        set_keep_ratio(model, 0)


# ---------------------------------------------------------------- evaluation: W_eff always follows the scores

def _eval_output(layer, x):
    with torch.no_grad():
        return layer(x)


def _reference_output(layer, x):
    expected, _, _ = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
    return F.conv2d(x, expected, None, 1, 1)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_foreach", "adam", "adam_foreach"])
def test_eval_output_follows_an_optimizer_step(optimizer):
    layer = make_conv(0.3).eval()
    x = torch.randn(2, 6, 6, 6)
    before = _eval_output(layer, x)
    assert torch.equal(_eval_output(layer, x), before)   # a repeated call is stable
    mask_before = layer.mask()
    name, _, foreach = optimizer.partition("_")
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    opt = cls([layer.scores], lr=1.0, foreach=bool(foreach))
    layer.scores.grad = torch.randn_like(layer.scores)
    opt.step()
    assert not torch.equal(layer.mask(), mask_before)
    after = _eval_output(layer, x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, _reference_output(layer, x), rtol=1e-5, atol=1e-6)


def test_eval_output_follows_inplace_copies_and_keep_ratio():
    layer = make_conv(0.5).eval()
    x = torch.randn(2, 6, 6, 6)
    before = _eval_output(layer, x)
    with torch.no_grad():
        layer.scores.copy_(torch.randn_like(layer.scores))
    after = _eval_output(layer, x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, _reference_output(layer, x), rtol=1e-5, atol=1e-6)
    layer.keep_ratio = 0.1
    assert torch.allclose(_eval_output(layer, x), _reference_output(layer, x), rtol=1e-5, atol=1e-6)
    layer.load_state_dict({"weight": layer.weight.clone(), "scores": torch.randn_like(layer.scores)})
    assert torch.allclose(_eval_output(layer, x), _reference_output(layer, x), rtol=1e-5, atol=1e-6)


def test_eval_output_follows_writes_that_do_not_bump_the_version():
    """Horovod's broadcast writes parameters in place through `.data`, leaving `_version` unchanged."""
    layer = make_conv(0.4).eval()
    x = torch.randn(2, 6, 6, 6)
    before = _eval_output(layer, x)
    version = layer.scores._version
    layer.scores.data.copy_(torch.randn_like(layer.scores))
    assert layer.scores._version == version
    after = _eval_output(layer, x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, _reference_output(layer, x), rtol=1e-5, atol=1e-6)


def test_fixed_effective_weights_compute_once_and_are_dropped_on_exit(monkeypatch):
    from biprop_hpc.nn import engine as engine_module
    from biprop_hpc.nn import fixed_effective_weights
    model = nn.Sequential(make_conv(0.4), nn.ReLU(), make_conv(0.4, seed=1, cin=8)).eval()
    x = torch.randn(2, 6, 6, 6)
    calls = []
    original = engine_module.binary_masked_weight
    monkeypatch.setattr(engine_module, "binary_masked_weight", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad(), fixed_effective_weights(model):
        inside = [model(x) for _ in range(3)]
    assert len(calls) == 2   # once per layer, not once per forward
    assert all(torch.equal(out, inside[0]) for out in inside)
    model[0].scores.data.copy_(torch.randn_like(model[0].scores))
    with torch.no_grad():
        second = reference_effective_weight(model[2].weight, model[2].scores, model[2].n_keep)[0]
        expected = F.conv2d(torch.relu(_reference_output(model[0], x)), second, None, 1, 1)
        assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- binary activation

def test_binary_activation_forward_is_plus_minus_one():
    x = torch.tensor([-3.0, -1.0, -1e-8, -0.0, 0.0, 1e-8, 0.5, 2.0])
    out = BinaryActivation()(x)
    assert torch.equal(out, torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 1.0, 1.0]))
    big = torch.randn(4, 5, 6, 7)
    big[0, 0, 0, :3] = 0
    out = BinaryActivation()(big)
    assert out.dtype == big.dtype and out.shape == big.shape
    assert torch.equal(out, torch.where(big >= 0, torch.ones_like(big), -torch.ones_like(big)))


def test_binary_activation_backward_is_bireal():
    x = (torch.randn(3, 4, 5, 5) * 1.5).requires_grad_(True)
    with torch.no_grad():
        x[0, 0, 0, :4] = torch.tensor([-1.0, 0.0, 1.0, 0.999])
    g = torch.randn_like(x)
    BinaryActivation()(x).backward(g)
    xd = x.detach()
    expected = g * 2 * (1 - torch.clamp(xd, -1, 1).abs())
    assert torch.allclose(x.grad, expected, rtol=1e-6, atol=1e-7)
    assert torch.all(x.grad[xd.abs() >= 1] == 0)


# ---------------------------------------------------------------- initialisation

def _big_conv(init, k):
    torch.manual_seed(11)
    return BipropConv2d(128, 256, 3, keep_ratio=k, weight_init=init)   # fan_in 1152, 294912 weights


@pytest.mark.parametrize("init,scaled", [("kn", True), ("ukn", False)])
@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_kaiming_normal_std(init, scaled, k):
    layer = _big_conv(init, k)
    fan_in = 128 * 9
    std = math.sqrt(2) / math.sqrt(fan_in * k) if scaled else math.sqrt(2 / fan_in)
    w = layer.weight
    assert abs(w.std().item() / std - 1) < 0.02
    assert abs(w.mean().item()) < 0.02 * std
    # normal, not constant: a fair share of entries beyond one std
    assert 0.28 < (w.abs() > std).float().mean().item() < 0.36


@pytest.mark.parametrize("init,scaled", [("sc", True), ("usc", False)])
@pytest.mark.parametrize("k", [0.2, 0.5, 1.0])
def test_signed_constant(init, scaled, k):
    layer = _big_conv(init, k)
    fan_in = 128 * 9
    std = math.sqrt(2) / math.sqrt(fan_in * k) if scaled else math.sqrt(2 / fan_in)
    w = layer.weight
    assert torch.allclose(w.abs(), torch.full_like(w, std), rtol=1e-6, atol=0)
    assert abs((w > 0).float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("init,scaled", [("uc", True), ("uuc", False)])
@pytest.mark.parametrize("k", [0.2, 1.0])
def test_unsigned_constant(init, scaled, k):
    layer = _big_conv(init, k)
    fan_in = 128 * 9
    std = math.sqrt(2) / math.sqrt(fan_in * k) if scaled else math.sqrt(2 / fan_in)
    assert torch.allclose(layer.weight, torch.full_like(layer.weight, std), rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [0.2, 0.4])
def test_fan_scale_gives_the_originals_std_or_the_corrected_one(k):
    # By hand, for a 3x3 conv 128 -> 256: kaiming normal, fan_in = 128 * 9, relu gain sqrt(2).
    # The original (utils/builder.py `_init_conv` with scale_fan): std = gain / sqrt(fan_in x (1 - k)), its
    # prune_rate k being the KEPT fraction; corrected: fan_in x k; none: the plain fan_in.
    fan_in, gain = 128 * 9, math.sqrt(2)
    by_hand = {"pruned_fraction": gain / math.sqrt(fan_in * (1 - k)), "kept_fraction": gain / math.sqrt(fan_in * k),
               "none": gain / math.sqrt(fan_in)}
    for fan_scale, std in by_hand.items():
        torch.manual_seed(11)
        w = BipropConv2d(128, 256, 3, keep_ratio=k, weight_init="kn", fan_scale=fan_scale).weight
        assert abs(w.std().item() / std - 1) < 0.02, fan_scale
        torch.manual_seed(11)
        w = BipropConv2d(128, 256, 3, keep_ratio=k, weight_init="sc", fan_scale=fan_scale).weight
        assert torch.allclose(w.abs(), torch.full_like(w, std), rtol=1e-6, atol=0), fan_scale
    assert by_hand["pruned_fraction"] != pytest.approx(by_hand["kept_fraction"], rel=0.05)
    # the default is the corrected formula, and the unscaled inits ignore fan_scale
    torch.manual_seed(11)
    assert torch.allclose(BipropConv2d(128, 256, 3, keep_ratio=k, weight_init="sc").weight.abs(),
                          torch.full((256, 128, 3, 3), by_hand["kept_fraction"]), rtol=1e-6, atol=0)
    w = BipropConv2d(128, 256, 3, keep_ratio=k, weight_init="usc", fan_scale="pruned_fraction").weight
    assert torch.allclose(w.abs(), torch.full_like(w, by_hand["none"]), rtol=1e-6, atol=0)


def test_fan_scale_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown fan_scale 'k'; choose one of kept_fraction, pruned_fraction"):
        BipropConv2d(4, 4, 3, keep_ratio=0.5, fan_scale="k")
    with pytest.raises(ValueError, match="1 - keep_ratio, which is 0 at keep_ratio 1.0"):
        BipropConv2d(4, 4, 3, keep_ratio=1.0, weight_init="kn", fan_scale="pruned_fraction")


def test_linear_init_uses_in_features_as_fan():
    torch.manual_seed(5)
    layer = BipropLinear(500, 800, keep_ratio=0.25, weight_init="sc")
    assert torch.allclose(layer.weight.abs(), torch.full_like(layer.weight, math.sqrt(2 / (500 * 0.25))))


@pytest.mark.parametrize("init", ["kn", "sc", "uuc"])
def test_scores_are_uniform_in_one_over_sqrt_fan_in(init):
    layer = _big_conv(init, 0.3)
    bound = 1 / math.sqrt(128 * 9)
    s = layer.scores.detach().flatten()
    assert s.abs().max().item() <= bound * (1 + 1e-6)
    assert abs(s.mean().item()) < 0.01 * bound
    assert abs(s.var().item() / (bound ** 2 / 3) - 1) < 0.02
    counts = torch.histc(s, bins=10, min=-bound, max=bound) / s.numel()
    assert torch.all((counts - 0.1).abs() < 0.01)


def test_init_functions_directly():
    w = torch.empty(64, 32)
    init_weight_(w, "usc")
    assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / 32)))
    with pytest.raises(ValueError):
        init_weight_(w, "xavier")
    s = init_scores_(torch.empty(64, 32))
    assert s.abs().max() <= 1 / math.sqrt(32) + 1e-7


def test_seeded_construction_is_reproducible():
    for init in ("kn", "sc"):
        a, b = make_conv(0.4, init, seed=123), make_conv(0.4, init, seed=123)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scores, b.scores)
        c = make_conv(0.4, init, seed=124)
        assert not torch.equal(a.weight, c.weight) and not torch.equal(a.scores, c.scores)
        la, lb = make_linear(0.4, init, seed=7), make_linear(0.4, init, seed=7)
        assert torch.equal(la.weight, lb.weight) and torch.equal(la.scores, lb.scores)
