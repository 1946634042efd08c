"""The C++ CPU kernels of the BIPROP layers (biprop_hpc/nn/csrc/masks.cpp) against the torch code they replace
(layers.torch_binary_masked_weight, itself checked against the sort reference of test_nn) and that reference.

Layers large enough for the kernel's sampled band (> 32768 entries) and small ones (selection over the whole
layer); scores random, tied across the threshold, spread over many orders of magnitude (zeros, subnormals),
and adversarial for the sample (the band misses the threshold, so the whole-layer fallback must answer);
float32 and float64; 1 and 2 threads; the fallback to the torch code where the kernels cannot be built.
"""
import logging

import pytest
import torch

from biprop_hpc import extensions
from biprop_hpc.nn import layers
from biprop_hpc.nn.layers import (
    binary_masked_weight,
    kept_count,
    score_gradient,
    torch_binary_masked_weight,
)
from test_nn import reference_effective_weight

SIZES = (1, 7, 1000, 40_000, 300_001)
KEEP_RATIOS = (0.01, 0.3, 0.5, 0.9, 1.0)


def scores_of(kind: str, size: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        values = torch.randn(size, generator=generator, dtype=torch.float64)
    elif kind == "tied":                           # 7 distinct magnitudes: ties straddle every threshold
        values = torch.randint(-3, 4, (size,), generator=generator).double() / 8
    elif kind == "skewed":
        values = torch.exp(torch.randn(size, generator=generator, dtype=torch.float64) * 12)
        special = torch.tensor([0.0, 1e-40, 1e-42, 0.0, 3e-39, 1e30, 1e-30], dtype=torch.float64)
        values[:7] = special[:min(size, 7)]
    else:                                          # "misleading": the strided sample sees only small values
        values = 1.0 + torch.rand(size, generator=generator, dtype=torch.float64)
        values[::max(size // 8192, 1)] = 1e-3
    return values.to(dtype)


@pytest.fixture(scope="module")
def kernels():
    return extensions.MASKS.ops()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "tied", "skewed", "misleading"])
@pytest.mark.parametrize("size", SIZES)
def test_effective_weight_equals_the_torch_code_and_the_sort_reference(kernels, size, kind, dtype):
    weight = torch.randn(size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    scores = scores_of(kind, size, dtype)
    for keep_ratio in KEEP_RATIOS:
        n_keep = kept_count(size, keep_ratio)
        result = kernels.effective_weight(scores, weight, n_keep)
        torch_result = torch_binary_masked_weight(scores, weight, n_keep)
        if dtype == torch.float32:    # alpha summed in float64 either way: the float32 result is the same
            assert torch.equal(result, torch_result), keep_ratio
        else:                         # float64 sums in another order: alpha within rounding
            assert torch.equal(result != 0, torch_result != 0), keep_ratio
            torch.testing.assert_close(result, torch_result, rtol=1e-13, atol=0)
        expected, _, mask = reference_effective_weight(weight, scores, n_keep)
        assert torch.equal(result != 0, mask) and int(mask.sum()) == n_keep, keep_ratio   # ties included
        torch.testing.assert_close(result, expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_layers_use_the_kernels_on_the_cpu(kernels, monkeypatch):
    """binary_masked_weight and score_gradient go through the kernels (counted), for a conv-shaped layer."""
    calls = []
    monkeypatch.setattr(layers, "cpu_kernels", lambda weight: calls.append(weight.dtype) or kernels)
    scores, weight, grad = (torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(i)) for i in range(3))
    binary_masked_weight(scores, weight, 5000)
    score_gradient(grad, scores, weight)
    assert calls == [torch.float32, torch.float32]


@pytest.mark.parametrize("kind", ["random", "tied"])
def test_score_gradient_equals_the_formula(kernels, kind):
    scores = scores_of(kind, 300_001)
    scores[:3] = 0.0                                     # sign(0) = 0: no gradient there
    weight, grad = (torch.randn(300_001, generator=torch.Generator().manual_seed(i)) for i in (1, 2))
    result = kernels.score_gradient(grad, scores, weight)
    assert torch.equal(result, torch.sign(scores) * weight * grad)
    assert torch.equal(result[:3], torch.zeros(3))


def test_results_do_not_depend_on_the_thread_count(kernels):
    scores, weight = scores_of("random", 1 << 21), torch.randn(1 << 21, generator=torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(kernels.effective_weight(scores, weight, 777_777))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], other) for other in results[1:])


def test_bad_arguments_are_refused_with_the_reason(kernels):
    weight = torch.randn(10)
    with pytest.raises(RuntimeError, match="n_keep out of range"):
        kernels.effective_weight(torch.randn(10), weight, 11)
    with pytest.raises(RuntimeError, match="shapes differ"):
        kernels.effective_weight(torch.randn(11), weight, 3)
    with pytest.raises(RuntimeError, match="float or double only"):
        kernels.effective_weight(torch.randn(10).half(), weight.half(), 3)


def test_without_the_kernels_the_torch_code_runs_and_says_why_once(tmp_path, monkeypatch, caplog):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setenv("BIPROP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(layers, "MASKS", extensions.CppExtension("biprop_broken", [broken]))
    scores, weight = torch.randn(5000), torch.randn(5000)
    expected, _, _ = reference_effective_weight(weight, scores, 1234)
    with caplog.at_level(logging.WARNING, logger="biprop_hpc.extensions"):
        for _ in range(2):
            torch.testing.assert_close(binary_masked_weight(scores, weight, 1234), expected, rtol=1e-6, atol=0)
    warnings = [r for r in caplog.records if "biprop_broken kernels unavailable" in r.getMessage()]
    assert len(warnings) == 1
