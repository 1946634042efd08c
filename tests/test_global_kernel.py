"""The CPU kernels of global pruning (csrc/masks.cpp global_kept_counts and global_effective_weights, called by
nn/global_prune.py and the mask engine) against the plain torch version (torch_global_kept_counts, the CUDA path)
and a stable sort of all |S| together. Layers above 4 x 8192 scores in all take the sampled-band way (the kernel's
sample is 8192 keys over all layers), smaller ones the whole-buffer way; the periodic case makes the sample miss."""
import pytest
import torch

import biprop_hpc.nn.global_prune as global_prune
from biprop_hpc.extensions import MASKS
from biprop_hpc.nn import BipropConv2d, BipropLinear, attach_mask_engine, kept_count
from biprop_hpc.nn.global_prune import global_kept_counts, torch_global_kept_counts
from biprop_hpc.nn.layers import torch_binary_masked_weight

SIZES = [(3000,), (40, 1700), (7,), (250, 120), (1,)]     # 131008 scores: the sampled way


def sorted_counts(scores: list[torch.Tensor], keep_ratio: float) -> list[int]:
    """Each layer's count by a stable sort of all |S| laid end to end, then the collapse rule (0 -> 1)."""
    flat = torch.cat([s.float().abs().flatten() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.sort(-flat, stable=True).indices[:kept_count(flat.numel(), keep_ratio)]] = True
    return [max(int(part.sum()), 1) for part in keep.split([s.numel() for s in scores])]


def make_scores(kind: str, sizes=SIZES, dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [torch.Size(s) for s in sizes]
    total = sum(s.numel() for s in shapes)
    if kind == "random":
        flat = torch.randn(total, generator=generator)
    elif kind == "ties":            # 9 values, signs mixed: ties at the threshold inside and across layers
        flat = torch.randint(-4, 5, (total,), generator=generator) / 4
    elif kind == "equal":
        flat = torch.full((total,), -0.5)
    elif kind == "periodic":        # every sampled entry is large, all others small: the band misses
        flat = torch.rand(total, generator=generator) * 0.5
        flat[::max(total // 8192, 1)] = 1.0
    else:
        raise ValueError(kind)
    return [part.view(shape).to(dtype) for part, shape in zip(flat.split([s.numel() for s in shapes]), shapes)]


KEEPS = [1e-5, 0.003, 0.1, 0.5, 0.9, 0.99999, 1.0]


@pytest.mark.parametrize("kind", ["random", "ties", "equal", "periodic"])
@pytest.mark.parametrize("keep_ratio", KEEPS)
def test_counts_equal_the_torch_version_and_a_sort(kind, keep_ratio):
    scores = make_scores(kind)
    expected = sorted_counts(scores, keep_ratio)
    assert torch_global_kept_counts(scores, keep_ratio) == expected
    assert global_kept_counts(scores, keep_ratio) == expected
    small = make_scores(kind, sizes=[(30, 20), (5,), (400,)])       # the whole-buffer way
    assert global_kept_counts(small, keep_ratio) == sorted_counts(small, keep_ratio)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_counts_of_other_dtypes(dtype, kind):
    scores = make_scores(kind, dtype=dtype, seed=3)       # 16-bit scores tie often even when drawn at random
    for keep_ratio in (0.003, 0.2, 0.7):
        expected = sorted_counts(scores, keep_ratio)
        assert torch_global_kept_counts(scores, keep_ratio) == expected
        assert global_kept_counts(scores, keep_ratio) == expected


def test_the_kernel_runs_and_bad_input_is_refused():
    ops = MASKS.ops()
    scores = make_scores("random", sizes=[(10,), (20,)])
    assert global_kept_counts([s.requires_grad_() for s in scores], 0.5) == sorted_counts(scores, 0.5)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        ops.global_kept_counts([scores[0].detach(), scores[1].detach().double()], 3)
    with pytest.raises(RuntimeError, match="n_keep out of range"):
        ops.global_kept_counts([s.detach() for s in scores], 31)
    # mixed dtypes in Python: the torch version (which promotes) answers
    assert global_kept_counts([scores[0].detach(), scores[1].detach().double()], 0.5) == sorted_counts(scores, 0.5)


def model_of(kind: str, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(BipropConv2d(3, 40, 3, keep_ratio=0.5), torch.nn.Flatten(),
                                BipropLinear(40 * 4 * 4, 50, keep_ratio=0.5), BipropLinear(50, 10, keep_ratio=0.5))
    model = attach_mask_engine(model.to(dtype))
    layers = model.mask_engine.layers
    with torch.no_grad():
        for layer, scores in zip(layers, make_scores(kind, [tuple(l.scores.shape) for l in layers], dtype, seed)):
            layer.scores.copy_(scores)
    return model, layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "periodic"])
@pytest.mark.parametrize("keep_ratio", [1e-5, 0.05, 0.5, 1.0])
def test_the_engines_global_masks_are_each_layers_top_n(kind, keep_ratio, dtype, monkeypatch):
    model, layers = model_of(kind, dtype)
    scores = [layer.scores.detach() for layer in layers]
    expected_counts = sorted_counts(scores, keep_ratio)
    model.mask_engine.global_keep_ratio = keep_ratio
    # the fused kernel does it all: no torch threshold, no separate count
    monkeypatch.setattr(global_prune, "torch_global_kept_counts", None)
    monkeypatch.setattr(model.mask_engine, "apply_global_counts", None)
    effective = model.mask_engine.effective_weights()
    assert [layer.n_keep for layer in layers] == expected_counts
    for layer, weight, count in zip(layers, effective, expected_counts):
        reference = torch_binary_masked_weight(layer.scores, layer.weight, count)   # top-n, ties to lower index
        assert torch.equal(weight != 0, reference != 0)
        torch.testing.assert_close(weight, reference, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
