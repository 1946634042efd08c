"""The mask engine (biprop_hpc.nn.engine) against an independent sort-based reference, on every model of the zoo,
and a training step that reads nothing back from the device.

The reference (test_nn.reference_effective_weight) sorts |S| of each layer with a stable descending sort, so ties
go to the lower flat index; alpha is the mean |W| of the kept weights, W_eff = sign(W) * alpha * M, and the score
gradient is dL/dW_eff * W * sign(S), computed here by autograd through a leaf W_eff. Both engine methods are
checked on the CPU: "layerwise" (the default) and "batched" (all layers at once by radix select).
"""
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from biprop_hpc.models import MODELS, LayerBuilder, build_model
from biprop_hpc.nn import BipropConv2d, MaskEngine, biprop_layers, kept_count
from test_nn import reference_effective_weight

METHODS = ("layerwise", "batched", "graphed")     # graphed is layerwise off CUDA (tests/test_gpu.py)
KEEP_RATIOS = (0.01, 0.05, 0.2, 0.5, 0.77, 1.0)
IMAGENET = {"resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet34_2_bin"}


def small_model(name: str, keep_ratio: float, seed: int = 0):
    torch.manual_seed(seed)
    size = 64 if name in IMAGENET else 32
    return build_model(name, LayerBuilder(keep_ratio=keep_ratio), in_channels=3, num_classes=10, image_size=size,
                       width_mult=0.125), size


def fill_scores(model, kind: str, seed: int = 1) -> None:
    """random: continuous scores; tied: few distinct values, so ties straddle the threshold; skewed: magnitudes
    spread over many orders (some layers all within one radix bucket, zeros and subnormals included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for index, (_, layer) in enumerate(biprop_layers(model)):
            shape = layer.scores.shape
            if kind == "random":
                values = torch.randn(shape, generator=generator)
            elif kind == "tied":
                values = torch.randint(-3, 4, shape, generator=generator).float() / 8
            elif index % 2:  # one radix bucket: the second pass decides
                values = 1.0 + torch.rand(shape, generator=generator) * 1e-3
            else:
                values = torch.exp(torch.randn(shape, generator=generator) * 12)
                values.view(-1)[:7] = torch.tensor([0.0, 1e-40, 1e-42, 0.0, 3e-39, 1e30, 1e-30])
            layer.scores.copy_(values)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["random", "tied", "skewed"])
@pytest.mark.parametrize("keep_ratio", KEEP_RATIOS)
def test_masks_alpha_and_weights_equal_the_sort_reference(method, kind, keep_ratio):
    model, _ = small_model("resnet18_cifar", keep_ratio)
    fill_scores(model, kind)
    engine = MaskEngine(model, method)
    for (name, layer), weight in zip(biprop_layers(model), engine.effective_weights()):
        expected, alpha, mask = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
        assert torch.equal(weight != 0, mask), name                       # the mask, ties included
        assert int(mask.sum()) == kept_count(layer.weight.numel(), keep_ratio)
        torch.testing.assert_close(weight, expected, rtol=1e-6, atol=0, msg=name)
        kept_alpha = weight.abs().max()
        torch.testing.assert_close(kept_alpha, alpha, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_of_the_zoo_both_methods_agree_with_the_reference(name):
    model, _ = small_model(name, 0.3)
    fill_scores(model, "tied" if len(name) % 2 else "random")
    results = {method: MaskEngine(model, method).effective_weights() for method in METHODS}
    for index, (layer_name, layer) in enumerate(biprop_layers(model)):
        expected, _, mask = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
        for method, weights in results.items():
            assert torch.equal(weights[index] != 0, mask), (method, layer_name)
            torch.testing.assert_close(weights[index], expected, rtol=1e-6, atol=0)
        assert torch.equal(results["batched"][index], results["layerwise"][index]), layer_name


@pytest.mark.parametrize("method", METHODS)
def test_score_gradients_equal_the_straight_through_reference(method):
    model, size = small_model("resnet18_cifar_bin", 0.4)
    fill_scores(model, "tied")
    model.mask_engine.method = method
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    model.train()
    model(x).square().sum().backward()
    engine_grads = [layer.scores.grad.clone() for _, layer in biprop_layers(model)]
    # Reference: the same forward with each layer's W_eff (checked against the sort reference above) a leaf
    # tensor, then the formula. (The same values: with sign activations a last-bit difference can flip a sign.)
    model.zero_grad()
    leaves = [weight.clone().requires_grad_() for weight in model.mask_engine.effective_weights()]
    for (_, layer), leaf in zip(biprop_layers(model), leaves):
        layer._fixed_weight = leaf
    model.mask_engine._owns = False
    model(x).square().sum().backward()
    for (name, layer), leaf, grad in zip(biprop_layers(model), leaves, engine_grads):
        layer._fixed_weight = None
        expected = leaf.grad * layer.weight * torch.sign(layer.scores.detach())
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_layers_get_the_same_weights(method):
    """Ties go to the lower index of the logical (N, C, H, W) order, whatever the memory format."""
    model, _ = small_model("resnet18_cifar", 0.3)
    fill_scores(model, "tied")
    expected = MaskEngine(model, "layerwise").effective_weights()
    model.to(memory_format=torch.channels_last)
    weights = MaskEngine(model, method).effective_weights()
    for (name, layer), weight, reference in zip(biprop_layers(model), weights, expected):
        assert torch.equal(weight, reference), name


def test_batched_on_float64_layers_computes_them_layer_by_layer():
    model, _ = small_model("conv4", 0.3)
    model.double()
    fill_scores(model, "tied")
    for (name, layer), weight in zip(biprop_layers(model), MaskEngine(model, "batched").effective_weights()):
        expected, _, mask = reference_effective_weight(layer.weight, layer.scores, layer.n_keep)
        assert weight.dtype == torch.float64 and torch.equal(weight != 0, mask), name
        torch.testing.assert_close(weight, expected, rtol=1e-12, atol=0)


def test_keep_ratio_changes_between_forwards_are_followed():
    model, size = small_model("conv4", 0.5)
    model.mask_engine.method = "batched"
    for keep_ratio in (0.5, 0.1, 0.9):
        for _, layer in biprop_layers(model):
            layer.keep_ratio = keep_ratio
        weights = model.mask_engine.effective_weights()
        for (_, layer), weight in zip(biprop_layers(model), weights):
            assert int((weight != 0).sum()) == kept_count(layer.weight.numel(), keep_ratio)


def test_a_standalone_layer_keeps_working_without_an_engine():
    torch.manual_seed(0)
    layer = BipropConv2d(4, 6, 3, padding=1, keep_ratio=0.3)
    out = layer(torch.randn(2, 4, 5, 5))
    out.sum().backward()
    assert layer.scores.grad is not None and layer.weight.grad is None


# ---------------------------------------------------------------- host reads during a training step

HOST_READS = {"item", "__bool__", "tolist", "__int__", "__float__", "__index__", "numpy", "cpu"}


class HostReads(TorchFunctionMode):
    """Records every call that reads tensor values back to the host, with the function that made it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            caller = sys._getframe(1)
            self.calls.append((name, caller.f_code.co_name))
        return func(*args, **(kwargs or {}))


def test_a_training_epoch_reads_back_only_the_documented_values(tmp_path, tiny_idx_dir):
    """With the batched method (pure torch ops, as on a GPU), one epoch of the real training loop reads back only
    the TensorBoard step loss every log_interval steps and the epoch's totals once (documented in README). (The
    layerwise method selects with numpy on the CPU, where that is no transfer; on a GPU both methods are checked
    with torch.cuda.set_sync_debug_mode("error") in tests/test_gpu.py.)"""
    from biprop_hpc.config import build_config
    from biprop_hpc.dist import Local
    from biprop_hpc.train import Run
    cfg = build_config(None, {"dataset": "mnist", "data": str(tiny_idx_dir), "model": "conv2_bin", "width_mult": 0.25,
                              "epochs": 1, "batch_size": 16, "out": str(tmp_path), "threads": 1, "log_interval": 5,
                              "val_fraction": 0.2})
    run = Run(cfg, Local())
    run.model.mask_engine.method = "batched"
    steps = len(run.data.train)
    with HostReads() as reads:
        run._train_epoch(0)
    # the step losses for TensorBoard, and the epoch's totals: copied to the host once and reduced over ranks
    expected = ([("item", "_train_epoch")] * len(range(0, steps, 5))
                + [("cpu", "_train_epoch"), ("tolist", "_train_epoch")])
    assert sorted(reads.calls) == sorted(expected), reads.calls
