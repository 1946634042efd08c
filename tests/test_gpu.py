"""On a CUDA GPU (skipped without one): both mask engine methods against the CPU's sort-based reference, and full
training steps that never synchronise the host with the device (torch.cuda.set_sync_debug_mode("error")).

Run them with `python -m pytest -q tests/test_gpu.py` on a GPU node; CI has no GPU.
"""
import pytest
import torch
from torch import nn

from biprop_hpc.models import LayerBuilder, build_model
from biprop_hpc.nn import biprop_layers, set_keep_ratio
from test_engine import fill_scores
from test_nn import reference_effective_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def model_on_gpu(name="resnet18_cifar_bin", keep_ratio=0.3, width_mult=0.25, size=32):
    torch.manual_seed(0)
    model = build_model(name, LayerBuilder(keep_ratio=keep_ratio), in_channels=3, num_classes=10, image_size=size,
                        width_mult=width_mult)
    return model.cuda()


@pytest.mark.parametrize("method", ["layerwise", "batched", "graphed"])
@pytest.mark.parametrize("kind", ["random", "tied", "skewed"])
@pytest.mark.parametrize("keep_ratio", [0.01, 0.2, 0.5, 1.0])
def test_masks_on_cuda_equal_the_cpu_reference(method, kind, keep_ratio):
    model = model_on_gpu(keep_ratio=keep_ratio)
    fill_scores(model, kind)
    model.mask_engine.method = method
    weights = model.mask_engine.effective_weights()
    for (name, layer), weight in zip(biprop_layers(model), weights):
        expected, _, mask = reference_effective_weight(layer.weight.cpu(), layer.scores.cpu(), layer.n_keep)
        assert weight.is_cuda
        assert torch.equal(weight.cpu() != 0, mask), name
        torch.testing.assert_close(weight.cpu(), expected, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("method", ["layerwise", "batched", "graphed"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_training_steps_never_synchronise(method, amp):
    model = model_on_gpu("wide_resnet34_2_bin", width_mult=0.125, size=64)
    model.mask_engine.method = method
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                                weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device="cuda")
    totals = torch.zeros(2, dtype=torch.float64, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        loss_sum = criterion(logits.float(), y)
        (loss_sum / len(y)).backward()
        optimizer.step()
        optimizer.zero_grad()
        totals.add_(torch.stack([loss_sum.detach().double(), (logits.argmax(1) == y).sum().double()]))

    step()  # the first step builds the engine's layout on the device (a host-to-device copy, once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(totals).all()


def test_the_compiled_triton_kernels_equal_the_torch_kernels_and_the_reference():
    """radix_triton compiled (small chunks: layers over many chunks, chunks over many blocks); tests/test_radix.py
    runs the same checks in Triton's interpreter on the CPU."""
    from biprop_hpc.nn import radix_triton
    from test_radix import check_against_reference as check_radix
    from test_radix import check_each_triton_kernel_against_its_torch_counterpart as check_kernels
    check_kernels(radix_triton, "cuda")
    for kind in ("random", "tied", "skewed"):
        for keep_ratio in (0.01, 0.5, 0.999, 1.0):
            check_radix(radix_triton, kind, keep_ratio, "cuda")


@pytest.mark.parametrize("method", ["layerwise", "batched", "graphed"])
def test_channels_last_weights_get_channels_last_effective_weights(method):
    model = model_on_gpu(keep_ratio=0.3).to(memory_format=torch.channels_last)
    model.mask_engine.method = method
    weights = model.mask_engine.effective_weights()
    check_against_reference(model, weights)
    assert all(w.stride() == l.weight.stride() for w, (_, l) in zip(weights, biprop_layers(model)))


def test_the_batched_method_runs_the_triton_kernels_on_cuda():
    from biprop_hpc.nn import radix, radix_triton
    assert radix.kernels_for(torch.device("cuda")) is radix_triton
    assert radix.kernels_for(torch.device("cpu")) is radix.TorchKernels


def check_against_reference(model, weights):
    for (name, layer), weight in zip(biprop_layers(model), weights):
        expected, _, mask = reference_effective_weight(layer.weight.cpu(), layer.scores.cpu(), layer.n_keep)
        assert torch.equal(weight.cpu() != 0, mask), name
        torch.testing.assert_close(weight.cpu(), expected, rtol=1e-6, atol=0, msg=name)


def test_the_graph_follows_the_scores_and_is_captured_again_when_the_layers_change():
    model = model_on_gpu(keep_ratio=0.3)
    engine = model.mask_engine
    engine.method = "graphed"
    check_against_reference(model, engine.effective_weights())
    first = engine._graphed
    fill_scores(model, "random", seed=5)               # in place, as the optimizer writes them: a replay
    earlier = engine.effective_weights()
    check_against_reference(model, earlier)
    assert engine._graphed is first
    kept = [w.clone() for w in earlier]
    fill_scores(model, "tied", seed=6)
    check_against_reference(model, engine.effective_weights())
    assert all(torch.equal(a, b) for a, b in zip(earlier, kept))   # a later replay leaves earlier W_eff alone
    set_keep_ratio(model, 0.6)                         # other kept counts: a new graph
    check_against_reference(model, engine.effective_weights())
    assert engine._graphed is not first
    model.to(memory_format=torch.channels_last)        # moved storage and strides: a new graph, same layout
    weights = engine.effective_weights()
    check_against_reference(model, weights)
    assert all(w.stride() == l.weight.stride() for w, (_, l) in zip(weights, biprop_layers(model)))


def test_graphed_training_equals_layerwise_training_bit_for_bit():
    """The same kernels run, replayed or launched: three SGD steps give identical scores."""
    x = torch.randn(8, 3, 32, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    y = torch.arange(8, device="cuda") % 10
    scores = {}
    for method in ("layerwise", "graphed"):
        model = model_on_gpu("resnet18_cifar", keep_ratio=0.3)
        model.mask_engine.method = method
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
        for _ in range(3):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        scores[method] = [layer.scores.detach().clone() for _, layer in biprop_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(scores["layerwise"], scores["graphed"]))
