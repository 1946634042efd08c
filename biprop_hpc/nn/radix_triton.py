"""The per-chunk kernels of radix.py in Triton, for CUDA: one program a chunk, one launch a pass over all layers.

The same signatures and results as radix.TorchKernels (tests/test_radix.py runs both, the Triton ones in Triton's
interpreter on the CPU; tests/test_gpu.py compiled on a GPU). A program walks its chunk `layout.block` elements
at a time: digit counts in registers (tl.histogram), the ties' ranks by an in-block cumulative sum carried from
block to block, the kept |W| summed in float64.
"""
import torch
import triton
import triton.language as tl

from biprop_hpc.nn.radix import ABS_BITS, DIGITS

_ABS_BITS = tl.constexpr(ABS_BITS)

@triton.jit
def _histograms(keys, starts, lengths, layers, prefix, counts, high_bits, shift,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr, BINS: tl.constexpr):
    chunk = tl.program_id(0)
    start = tl.load(starts + chunk)
    length = tl.load(lengths + chunk)
    wanted = tl.load(prefix + tl.load(layers + chunk))
    # Keys that do not match are counted in bins BINS.. (twice the bins: tl.histogram takes a mask only in newer
    # Triton releases), and dropped by the caller.
    total = tl.full([2 * BINS], 0, tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        valid = index < length
        key = tl.load(keys + start + index, mask=valid, other=0) & _ABS_BITS
        match = valid & ((key & high_bits) == wanted)
        total += tl.histogram(tl.where(match, (key >> shift) & (BINS - 1), BINS), 2 * BINS)
    tl.store(counts + chunk * 2 * BINS + tl.arange(0, 2 * BINS), total)


@triton.jit
def _kept(keys, weight, starts, lengths, layers, threshold, need, ties_before, alpha, sums, out,
          CHUNK: tl.constexpr, BLOCK: tl.constexpr, WRITE: tl.constexpr):
    chunk = tl.program_id(0)
    start = tl.load(starts + chunk)
    length = tl.load(lengths + chunk)
    layer = tl.load(layers + chunk)
    limit = tl.load(threshold + layer)
    wanted = tl.load(need + layer)
    ranked = tl.load(ties_before + chunk)       # ties of the layer before this block
    if WRITE:
        scale = tl.load(alpha + layer)
    total = tl.full([BLOCK], 0, tl.float64)
    for offset in range(0, CHUNK, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        valid = index < length
        key = tl.load(keys + start + index, mask=valid, other=0) & _ABS_BITS
        w = tl.load(weight + start + index, mask=valid, other=0.0)
        tied = valid & (key == limit)
        rank = ranked + tl.cumsum(tied.to(tl.int64), 0)
        kept = valid & ((key > limit) | (tied & (rank <= wanted)))
        ranked += tl.sum(tied.to(tl.int64), 0)
        if WRITE:
            sign = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
            tl.store(out + start + index, sign * scale * kept.to(tl.float32), mask=valid)
        else:
            total += tl.where(kept, tl.abs(w), 0.0).to(tl.float64)
    if not WRITE:
        tl.store(sums + chunk, tl.sum(total, 0))


def histograms(keys, layout, prefix, high_bits, shift):
    counts = torch.empty(layout.chunks, 2 * DIGITS, dtype=torch.int32, device=keys.device)
    _histograms[(layout.chunks,)](keys, layout.start, layout.length, layout.layer, prefix, counts, high_bits, shift,
                                  CHUNK=layout.chunk, BLOCK=layout.block, BINS=DIGITS)
    return counts[:, :DIGITS]


def _launch(keys, weight, layout, threshold, need, ties_before, alpha, sums, out, write):
    _kept[(layout.chunks,)](keys, weight, layout.start, layout.length, layout.layer, threshold, need, ties_before,
                            alpha, sums, out, CHUNK=layout.chunk, BLOCK=layout.block, WRITE=write)


def kept_magnitudes(keys, weight, layout, threshold, need, ties_before):
    sums = torch.empty(layout.chunks, dtype=torch.float64, device=keys.device)
    _launch(keys, weight, layout, threshold, need, ties_before, sums, sums, weight, False)   # alpha, out unused
    return sums


def effective_weight(keys, weight, layout, threshold, need, ties_before, alpha):
    out = torch.empty_like(weight)
    _launch(keys, weight, layout, threshold, need, ties_before, alpha, alpha, out, True)     # sums unused
    return out
