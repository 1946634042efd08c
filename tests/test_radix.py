"""The batched mask method's radix select (biprop_hpc.nn.radix) with small chunks, so that layers span many chunks
and chunks many blocks: against the sort-based reference of test_nn, for the torch kernels and for the Triton
kernels run in Triton's interpreter on the CPU (compiled on a GPU: tests/test_gpu.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biprop_hpc.nn import kept_count, radix
from test_nn import reference_effective_weight

# layer sizes: one element, a chunk exactly, a chunk plus one, several chunks and a ragged end
NUMELS = [1, 2048, 2049, 9000, 300, 7]
CHUNK, BLOCK = 2048, 512


def layers(kind: str, numels=NUMELS, seed: int = 0):
    """random: continuous; tied: seven distinct |S|, ties straddle thresholds and chunk borders; skewed: one
    layer inside one 8-bit bucket of the first three passes, zeros, -0.0, subnormals and huge values."""
    generator = torch.Generator().manual_seed(seed)
    scores = []
    for index, numel in enumerate(numels):
        if kind == "random":
            s = torch.randn(numel, generator=generator)
        elif kind == "tied":
            s = torch.randint(-3, 4, (numel,), generator=generator).float() / 8
        elif index % 2:
            s = 1.0 + torch.randint(0, 200, (numel,), generator=generator).float() * 2.0 ** -23
        else:
            s = torch.exp(torch.randn(numel, generator=generator) * 12)
            s[:6] = torch.tensor([0.0, -0.0, 1e-40, -1e-42, 1e30, -3e-39])[:numel]
        scores.append(s)
    weights = [torch.randn(n, generator=generator) for n in numels]
    return scores, weights


def check_against_reference(kernels, kind, keep_ratio, device="cpu"):
    scores, weights = layers(kind)
    layout = radix.ChunkLayout(NUMELS, torch.device(device), chunk=CHUNK, block=BLOCK)
    n_keep = [kept_count(n, keep_ratio) for n in NUMELS]
    flat = radix.masked_weights(torch.cat(scores).to(device), torch.cat(weights).to(device), layout,
                                torch.tensor(n_keep, device=device), kernels=kernels)
    for index, (out, s, w, k) in enumerate(zip(flat.cpu().split(NUMELS), scores, weights, n_keep)):
        expected, _, mask = reference_effective_weight(w, s, k)
        assert torch.equal(out != 0, mask), (index, int((out != 0).sum()), k)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=0, msg=f"layer {index}")


@pytest.mark.parametrize("kind", ["random", "tied", "skewed"])
@pytest.mark.parametrize("keep_ratio", [0.01, 0.3, 0.5, 0.999, 1.0])
def test_torch_kernels_equal_the_sort_reference(kind, keep_ratio):
    check_against_reference(radix.TorchKernels, kind, keep_ratio)


def test_the_layout_cuts_chunks_inside_layers_and_sums_per_layer():
    layout = radix.ChunkLayout(NUMELS, torch.device("cpu"), chunk=CHUNK, block=BLOCK)
    sizes = [-(-n // CHUNK) for n in NUMELS]
    assert layout.chunks == sum(sizes) and layout.length.sum() == sum(NUMELS)
    assert layout.layer.tolist() == [layer for layer, size in enumerate(sizes) for _ in range(size)]
    ends = torch.cumsum(torch.tensor(NUMELS), 0)
    assert torch.all(layout.start + layout.length <= ends[layout.layer])      # no chunk crosses a layer's end
    assert torch.equal(layout.chunk_of[layout.start], torch.arange(layout.chunks))
    assert torch.all(layout.chunk_of.diff() >= 0)
    assert torch.equal(torch.bincount(layout.chunk_of), layout.length.long())
    values = torch.randn(layout.chunks, 3, dtype=torch.float64)
    expected = torch.stack([values[layout.layer == layer].sum(0) for layer in range(len(NUMELS))])
    assert torch.equal(layout.per_layer_sum(values, torch.float64), expected)


def test_bad_dtypes_and_chunk_sizes_are_refused_with_the_reason():
    layout = radix.ChunkLayout([10], torch.device("cpu"), chunk=CHUNK, block=BLOCK)
    with pytest.raises(TypeError, match="float32 scores and weights, got torch.float64"):
        radix.masked_weights(torch.ones(10, dtype=torch.float64), torch.ones(10), layout, torch.tensor([3]))
    with pytest.raises(ValueError, match="multiple of block"):
        radix.ChunkLayout([10], torch.device("cpu"), chunk=1000, block=512)


# ---------------------------------------------------------------- the Triton kernels, interpreted
# Triton's interpreter must be chosen before triton.language is imported, so these checks run in a child process
# started with TRITON_INTERPRET=1 (test_triton_kernels_in_the_interpreter below).

def interpreted_checks():
    from biprop_hpc.nn import radix_triton
    check_each_triton_kernel_against_its_torch_counterpart(radix_triton)
    for kind in ("tied", "skewed"):
        for keep_ratio in (0.01, 0.5, 1.0):
            check_against_reference(radix_triton, kind, keep_ratio)


def check_each_triton_kernel_against_its_torch_counterpart(kernels, device="cpu"):
    """Pass by pass on the same inputs (including a prefix that matches only some keys, and tie offsets), so a
    difference is pinned to one kernel."""
    scores, weights = layers("tied")
    layout = radix.ChunkLayout(NUMELS, torch.device(device), chunk=CHUNK, block=BLOCK)
    keys, weight = torch.cat(scores).to(device).view(torch.int32), torch.cat(weights).to(device)
    prefix = (keys[layout.start[layout.first_chunk]] & radix.ABS_BITS) & radix.as_int32(0xFFFF0000)
    for shift, high in ((24, 0), (8, radix.as_int32(0xFFFF0000))):
        assert torch.equal(kernels.histograms(keys, layout, prefix, high, shift),
                           radix.TorchKernels.histograms(keys, layout, prefix, high, shift)), shift
    threshold = torch.full((len(NUMELS),), torch.tensor(0.25).view(torch.int32).item(), dtype=torch.int32,
                           device=device)
    need = torch.tensor([1, 100, 3, 700, 50, 2], device=device)
    ties_before = torch.randint(0, 40, (layout.chunks,), generator=torch.Generator().manual_seed(3)).to(device)
    arguments = (keys, weight, layout, threshold, need, ties_before)
    torch.testing.assert_close(kernels.kept_magnitudes(*arguments),
                               radix.TorchKernels.kept_magnitudes(*arguments), rtol=1e-12, atol=0)
    alpha = torch.rand(len(NUMELS), generator=torch.Generator().manual_seed(4)).to(device)
    assert torch.equal(kernels.effective_weight(*arguments, alpha),
                       radix.TorchKernels.effective_weight(*arguments, alpha))


def test_triton_kernels_in_the_interpreter():
    pytest.importorskip("triton")
    here = Path(__file__).parent
    child = subprocess.run([sys.executable, "-c", "import test_radix; test_radix.interpreted_checks()"],
                           cwd=here, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, check=False,
                           timeout=600)
    assert child.returncode == 0, child.stdout + child.stderr[-5000:]
