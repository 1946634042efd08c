"""Every layer's top-k mask and W_eff at once: a radix select over one flat buffer cut into chunks.

The engine's "batched" method. The scores of all layers are laid end to end in one float32 buffer, and the
buffer is cut into chunks of at most `chunk` elements that never straddle two layers. The key of an element is
the bit pattern of |S| (non-negative floats order like their bits). Each layer's threshold, the n_keep-th
largest key, is found by four passes of an 8-bit most-significant-digit radix select:

    pass p:  every chunk counts the digit p of its keys that match its layer's prefix (digits fixed so far);
             per layer, the counts of its chunks are summed; the digit holding the n_keep-th largest key joins
             the prefix, and the keys above it are subtracted from what is still needed.

After four passes the prefix is the threshold and `need` is the number of keys equal to it that are kept: the
first `need` in flat-index order. The last pass's counts already hold each chunk's number of such ties, so a
cumulative sum over the chunks of a layer gives every chunk the ties before it, and one pass over the chunks
marks the kept ties without crossing chunk borders. alpha is the sum of the kept |W| per chunk in float64,
summed per layer; a last pass writes W_eff = sign(W) * alpha * M.

The per-chunk work is done by one of two kernel sets with the same signatures: `TorchKernels` below (any device;
the CPU path and the reference) and the Triton kernels of radix_triton.py (CUDA: every pass is one launch over
all chunks, counting in registers and shared memory, not global atomics). The rest is a few small torch ops on
(layers x 256) tensors. Nothing is read back to the host; a fixed number of kernels whatever the layer count.
"""
from __future__ import annotations

import functools

import torch

DIGIT_BITS = 8
DIGITS = 1 << DIGIT_BITS
SHIFTS = (24, 16, 8, 0)          # the digits of a 31-bit key (bit 31, the sign, is cleared), most significant first
ABS_BITS = 0x7FFFFFFF
CHUNK = 16384                    # elements a chunk (one Triton program)
BLOCK = 1024                     # elements a Triton program handles at a time


def as_int32(value: int) -> int:
    """A 32-bit pattern as the signed int32 that has it."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class ChunkLayout:
    """Constant for a list of layer sizes on a device: the chunks (first element, length, layer) of the flat buffer,
    and for each layer the rows of its chunks (padded with the index of an extra zero row) for per-layer sums."""

    def __init__(self, numels: list[int], device: torch.device, chunk: int = CHUNK, block: int = BLOCK):
        if chunk % block:
            raise ValueError(f"chunk ({chunk}) must be a multiple of block ({block})")
        starts, lengths, layers, rows = [], [], [], []
        first = 0
        for layer, numel in enumerate(numels):
            rows.append(list(range(len(starts), len(starts) + -(-numel // chunk))))
            for offset in range(0, numel, chunk):
                starts.append(first + offset)
                lengths.append(min(chunk, numel - offset))
                layers.append(layer)
            first += numel
        width = max(map(len, rows))
        padded = [r + [len(starts)] * (width - len(r)) for r in rows]
        self.numels, self.chunk, self.block, self.chunks = numels, chunk, block, len(starts)
        self.start = torch.tensor(starts, dtype=torch.int64, device=device)
        self.length = torch.tensor(lengths, dtype=torch.int32, device=device)
        self.layer = torch.tensor(layers, dtype=torch.int64, device=device)
        self.rows = torch.tensor(padded, dtype=torch.int64, device=device)
        self.first_chunk = self.rows[:, 0]

    def per_layer_sum(self, per_chunk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-layer sums of per-chunk values (rows), in chunk order: deterministic, no atomics."""
        zero = per_chunk.new_zeros((1,) + per_chunk.shape[1:])
        return torch.cat([per_chunk, zero])[self.rows].sum(1, dtype=dtype)

    @functools.cached_property
    def chunk_of(self) -> torch.Tensor:
        """The chunk of every element (for the torch kernels only)."""
        return torch.repeat_interleave(torch.arange(self.chunks, device=self.start.device),
                                       self.length.long(), output_size=sum(self.numels))


class TorchKernels:
    """The per-chunk kernels in torch operations, on any device: what radix_triton.py computes, element-wise."""

    @staticmethod
    def histograms(keys, layout, prefix, high_bits, shift):
        """(chunks, 256) int32: per chunk, how often each digit `(key >> shift) & 255` occurs among the keys whose
        bits `high_bits` equal their layer's prefix (keys: the raw int32 bits of S; the sign bit is ignored)."""
        key = keys & ABS_BITS
        chunk = layout.chunk_of
        match = (key & high_bits) == prefix[layout.layer][chunk]
        spare = layout.chunks * DIGITS                       # the keys that do not match are counted here
        index = torch.where(match, chunk * DIGITS + ((key >> shift) & (DIGITS - 1)), spare)
        counts = torch.zeros(spare + 1, dtype=torch.int32, device=keys.device)
        counts.index_add_(0, index, torch.ones(1, dtype=torch.int32, device=keys.device).expand(len(index)))
        return counts[:-1].view(layout.chunks, DIGITS)

    @staticmethod
    def _kept(keys, layout, threshold, need, ties_before):
        key = keys & ABS_BITS
        chunk = layout.chunk_of
        limit = threshold[layout.layer][chunk]
        tied = key == limit
        running = torch.cumsum(tied, 0)
        before_chunk = torch.where(layout.start > 0, running[(layout.start - 1).clamp(min=0)], 0)
        rank = running - before_chunk[chunk] + ties_before[chunk]      # the tie's rank in its layer, from 1
        return (key > limit) | (tied & (rank <= need[layout.layer][chunk]))

    @classmethod
    def kept_magnitudes(cls, keys, weight, layout, threshold, need, ties_before):
        """(chunks,) float64: per chunk, the sum of |W| over the kept elements."""
        kept = cls._kept(keys, layout, threshold, need, ties_before)
        magnitude = torch.where(kept, weight.abs(), 0.0).double()
        # summed chunk by chunk in a padded (chunks, chunk) grid: deterministic on every device
        offset = torch.arange(len(keys), device=keys.device) - layout.start[layout.chunk_of]
        grid = torch.zeros(layout.chunks * layout.chunk, dtype=torch.float64, device=keys.device)
        grid[layout.chunk_of * layout.chunk + offset] = magnitude
        return grid.view(layout.chunks, layout.chunk).sum(1)

    @classmethod
    def effective_weight(cls, keys, weight, layout, threshold, need, ties_before, alpha):
        """sign(W) * alpha * M, element-wise over the flat buffer."""
        kept = cls._kept(keys, layout, threshold, need, ties_before)
        return torch.sign(weight).mul_(alpha[layout.layer][layout.chunk_of]).mul_(kept)


@functools.cache
def triton_kernels():
    """radix_triton's kernels where Triton can be imported, else None (then the torch kernels run on CUDA too)."""
    try:
        from biprop_hpc.nn import radix_triton
    except ImportError:
        return None
    return radix_triton


def kernels_for(device: torch.device):
    return (device.type == "cuda" and triton_kernels()) or TorchKernels


@torch.no_grad()
def masked_weights(scores: torch.Tensor, weight: torch.Tensor, layout: ChunkLayout, n_keep: torch.Tensor,
                   kernels=None) -> torch.Tensor:
    """The flat W_eff of all layers (float32), from their flat scores and weights laid out as `layout` says and
    the kept counts (int64, one per layer, on the device)."""
    if scores.dtype != torch.float32 or weight.dtype != torch.float32:
        raise TypeError(f"the radix select takes float32 scores and weights, got {scores.dtype} and {weight.dtype}")
    kernels = kernels or kernels_for(scores.device)
    keys = scores.view(torch.int32)
    prefix = torch.zeros(len(layout.numels), dtype=torch.int32, device=scores.device)
    need = n_keep
    for shift in SHIFTS:
        high_bits = as_int32(~((1 << (shift + DIGIT_BITS)) - 1))    # the digits fixed before this pass
        counts = kernels.histograms(keys, layout, prefix, high_bits, shift)
        at_least = layout.per_layer_sum(counts, torch.int64).flip(1).cumsum(1).flip(1)   # keys with digit >= d
        digit = (at_least >= need[:, None]).sum(1) - 1      # the largest digit with at least `need` keys at or above
        above = torch.nn.functional.pad(at_least, (0, 1)).gather(1, (digit + 1)[:, None]).squeeze(1)
        need = need - above
        prefix = prefix | (digit << shift).to(torch.int32)
    # The last pass counted, per chunk, the keys equal to the threshold: the ties before each chunk in its layer.
    ties = counts.gather(1, digit[layout.layer][:, None]).squeeze(1).long()
    before = torch.cumsum(ties, 0) - ties               # ties before each chunk in the whole buffer
    ties_before = before - before[layout.first_chunk][layout.layer]
    kept_sum = layout.per_layer_sum(kernels.kept_magnitudes(keys, weight, layout, prefix, need, ties_before),
                                    torch.float64)
    alpha = (kept_sum / n_keep).to(weight.dtype)
    return kernels.effective_weight(keys, weight, layout, prefix, need, ties_before, alpha)
