"""Packed layers of the binary inference engine: bit-packed activations, compressed ternary weights.

A +-1 activation map travels as `PackedBits`: int64 words [N, H, W, Cw] (channel c is bit c % 64 of word
c // 64, 1 = -1, 0 = +1; Cw = ceil(C / 64); padding bits are 0). A conv/linear layer whose input is such a
map and whose weight is ternary (W_eff in {-alpha, 0, +alpha}) becomes a `PackedConv`, which computes the
integer d = sum(a * sign(w) * mask) with popcounts (see csrc/packed.cpp) and returns:

- `mode="bits"`: the next binary activation directly. What the float model does between this layer and its
  next sign activation (BatchNorm in eval mode, optionally a residual +-1 added, optionally a max-pool, see
  below) is folded into two integer thresholds per output channel: sign(chain(alpha * d)) = -1 iff
  d < lo or d > hi. The thresholds are found by evaluating the model's own modules (in float32, as the float
  model does) on alpha * d for every possible integer d, so they reproduce the float model's decisions on
  those values exactly. A max-pool between the conv and the BN commutes with the monotone chain and becomes
  an AND (non-decreasing BN) or OR (non-increasing BN) of the window's sign bits (`BitMaxPool`).
- `mode="float"`: alpha * d in float32 (the exact value, rounded once), for float layers that follow.
- `mode="int"` (tests): d itself.

Weights are stored compressed: one mask bit per weight and the sign bits of the kept weights only, i.e.
(1 + keep ratio) bits per weight, in the kernel's panel order; the kernel expands the signs at each call.
Ternary layers on real-valued inputs (the first layer, a classifier after an average pool) stay float
computations but store the same compressed form and rebuild W_eff (bit for bit) at each call: `TernaryFloat`.

Zero padding: the float model pads a +-1 map with 0, contributing nothing. The kernel reads 0 bits (+1) in
the padding and subtracts, per output position class (which taps are in the padding) and output channel, the
sum of the signs of the kept weights of those taps: exact.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from biprop_hpc.extensions import PACKED

OB = 16                 # output channels per weight block (the kernel's unit)
INT16_MIN, INT16_MAX = -(2 ** 15), 2 ** 15 - 1
MAX_FAN_IN = INT16_MAX  # |d| <= fan-in must fit the int16 tables
MODES = {"int": 0, "float": 1, "bits": 2}


class PackedBits:
    """A +-1 map as bits: words int64 [N, H, W, Cw]; `flat`: the map of a linear layer ([N, C] in float)."""
    __slots__ = ("channels", "flat", "words")

    def __init__(self, words: torch.Tensor, channels: int, flat: bool = False):
        self.words, self.channels, self.flat = words, channels, flat

    def unpack(self) -> torch.Tensor:
        """The float +-1 tensor the float model holds here: [N, C, H, W] (NCHW), or [N, C] if flat."""
        out = PACKED.ops().unpack_bits(self.words, self.channels)
        return out.view(out.shape[0], -1) if self.flat else out


def pack_sign(x: torch.Tensor) -> PackedBits:
    """BinaryActivation (x >= 0 -> +1, else -1) of a float tensor [N, C, H, W] or [N, C], packed."""
    return PackedBits(PACKED.ops().pack_sign(x), x.shape[1], flat=x.dim() == 2)


# ---------------------------------------------------------------- ternary weights
def ternary_parts(weight: torch.Tensor):
    """(alpha, kept, negative) of a weight in {-alpha, 0, +alpha} (alpha = max |W|), or None if it is not."""
    w = weight.detach().to("cpu", torch.float32)
    magnitude = w.abs()
    alpha = magnitude.max()
    if not torch.isfinite(alpha) or alpha <= 0:
        return None
    kept = magnitude != 0
    if not bool(torch.all((magnitude == alpha) | ~kept)):
        return None
    return float(alpha), kept, w < 0


def _pack_bits_little(bits: np.ndarray) -> np.ndarray:
    """bool [..., 64 * n] -> uint64 [..., n]: bit j of word i is element 64 * i + j."""
    packed = np.packbits(bits, axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u8")


def _stream(bits: np.ndarray) -> torch.Tensor:
    """A flat bool array as int64 words (bit j of word i = element 64 i + j), plus one spare word."""
    words = (bits.size + 63) // 64 + 1
    padded = np.zeros(words * 64, dtype=bool)
    padded[:bits.size] = bits
    return torch.from_numpy(_pack_bits_little(padded).view(np.int64).copy())


class CompressedTernary(nn.Module):
    """Weights [O, T, C] (T taps, C input channels) as the kernel's compressed panels.

    mask_panel int64 [nob, Kw, 16] (Kw = T * ceil(C / 64) words per output channel, 16 channels per block),
    sign_stream (the sign bits of the kept weights, in panel order), offsets [nob + 1] (bit offset of each
    block's signs); kept int16 [Opad] (kept weights per output channel) and, for padded convs, tap_sums
    int16 [O, T] (sum of the signs of each tap's kept weights, for the padding correction).
    """

    def __init__(self, kept: torch.Tensor, negative: torch.Tensor, with_tap_sums: bool):
        super().__init__()
        O, T, C = kept.shape
        if C * T > MAX_FAN_IN:
            raise ValueError(f"fan-in {C * T} is larger than {MAX_FAN_IN}")
        Cw = (C + 63) // 64
        nob = (O + OB - 1) // OB
        kept_np = np.zeros((nob * OB, T, Cw * 64), dtype=bool)
        kept_np[:O, :, :C] = kept.numpy()
        neg_np = np.zeros_like(kept_np)
        neg_np[:O, :, :C] = negative.numpy() & kept.numpy()
        mask_words = _pack_bits_little(kept_np).reshape(nob, OB, T * Cw)       # [nob, 16, Kw]
        sign_words = _pack_bits_little(neg_np).reshape(nob, OB, T * Cw)
        mask_panel = np.ascontiguousarray(mask_words.transpose(0, 2, 1))       # [nob, Kw, 16]
        sign_panel = np.ascontiguousarray(sign_words.transpose(0, 2, 1))
        mask_bits = np.unpackbits(mask_panel.view(np.uint8), bitorder="little").astype(bool)
        sign_bits = np.unpackbits(sign_panel.view(np.uint8), bitorder="little").astype(bool)
        per_block = mask_bits.reshape(nob, -1).sum(axis=1)
        self.out_channels, self.taps, self.in_channels, self.words = O, T, C, T * Cw
        self.register_buffer("mask_panel", torch.from_numpy(mask_panel.view(np.int64).copy()))
        self.register_buffer("sign_stream", _stream(sign_bits[mask_bits]))
        self.register_buffer("offsets", torch.from_numpy(np.concatenate([[0], np.cumsum(per_block)]).astype(np.int64)))
        counts = np.count_nonzero(kept_np.reshape(nob * OB, -1), axis=1).astype(np.int16)
        self.register_buffer("kept", torch.from_numpy(counts))
        if with_tap_sums:   # per output channel and tap: kept positive weights minus kept negative ones
            sums = np.count_nonzero(kept_np[:O], axis=2) - 2 * np.count_nonzero(neg_np[:O], axis=2)
            self.register_buffer("tap_sums", torch.from_numpy(sums.astype(np.int16)))
        else:
            self.tap_sums = None


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_geometry(conv: nn.Conv2d) -> tuple[int, ...] | None:
    """(kh, kw, sh, sw, ph, pw, dh, dw) of a conv the kernel computes, or None."""
    if conv.groups != 1 or conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    (kh, kw), (sh, sw) = _pair(conv.kernel_size), _pair(conv.stride)
    (ph, pw), (dh, dw) = _pair(conv.padding), _pair(conv.dilation)
    return kh, kw, sh, sw, ph, pw, dh, dw


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """W_eff of a plain conv/linear (a ticket) or of a BIPROP layer."""
    from biprop_hpc.nn import BipropMixin
    if isinstance(layer, BipropMixin):
        with torch.no_grad():
            return layer.effective_weight().detach()
    return layer.weight.detach()


# ---------------------------------------------------------------- thresholds
def _apply_chain(chain: list[nn.Module], values: torch.Tensor) -> torch.Tensor:
    """Apply elementwise modules (BN in eval mode, ReLU, Identity, ...) to values [D, O] as the model would
    to a map of O channels."""
    out = values
    for module in chain:
        if isinstance(module, nn.BatchNorm2d):
            out = module(out.view(*out.shape, 1, 1)).view(out.shape)
        else:
            out = module(out)
    return out


@torch.no_grad()
def sign_thresholds(alpha: float, fan_in: int, out_channels: int, chain: list[nn.Module],
                    residuals: tuple = (None,)) -> torch.Tensor:
    """int16 [2 * len(residuals), Opad]: per output channel (lo, hi) such that, for every integer d with
    |d| <= fan_in, BinaryActivation(chain(alpha * d) [+ residual]) is -1 exactly when d < lo or d > hi.

    Found by bisection on d, evaluating the model's own modules on float32 alpha * d (the value the kernel's
    d stands for), so the decision is the float model's on that value. The chain (BN in eval mode, ReLU,
    Identity, a constant residual) is monotone per channel, and so is its float32 evaluation (rounding is
    monotone): -1 below a threshold and +1 above it, or the reverse, or constant."""
    a = torch.tensor(alpha, dtype=torch.float32)
    nob = (out_channels + OB - 1) // OB
    rows = []
    for residual in residuals:
        def negative(d, residual=residual):
            y = _apply_chain(chain, (d.to(torch.float32) * a)[None].contiguous())[0]
            if residual is not None:
                y = y + residual
            return ~(y >= 0)                                    # BinaryActivation: x >= 0 -> +1
        low = torch.full((out_channels,), -fan_in, dtype=torch.int64)
        high = torch.full((out_channels,), fan_in, dtype=torch.int64)
        neg_low, neg_high = negative(low), negative(high)
        increasing, decreasing = neg_low & ~neg_high, ~neg_low & neg_high
        changing = increasing | decreasing
        while True:   # increasing: negative(low) and not negative(high); decreasing: the reverse
            active = changing & (high - low > 1)
            if not bool(active.any()):
                break
            middle = torch.div(low + high, 2, rounding_mode="floor")
            neg_middle = negative(middle)
            to_high = active & (neg_middle != increasing)       # the middle is on the high side's
            high = torch.where(to_high, middle, high)
            low = torch.where(active & ~to_high, middle, low)
        lo = torch.full((nob * OB,), INT16_MIN, dtype=torch.int32)
        hi = torch.full((nob * OB,), INT16_MAX, dtype=torch.int32)
        real = slice(0, out_channels)
        lo[real] = torch.where(increasing, high, INT16_MIN).to(torch.int32)     # -1 iff d < first +1
        hi[real] = torch.where(decreasing, low, INT16_MAX).to(torch.int32)      # -1 iff d > last +1
        hi[real] = torch.where(neg_low & neg_high, INT16_MIN, hi[real])        # always -1
        rows += [lo, hi]
    return torch.stack(rows).to(torch.int16).contiguous()


@torch.no_grad()
def and_directions(low: float, high: float, out_channels: int, chain: list[nn.Module]) -> torch.Tensor:
    """Max-pool before `chain` -> sign, in bits: per channel AND (chain non-decreasing on [low, high]) or OR
    (non-increasing) of the window's bits (1 = -1). Returns int64 [ceil(O / 64)] words with 1 = AND."""
    ends = torch.tensor([low, high], dtype=torch.float32)
    y = _apply_chain(chain, ends[:, None].expand(2, out_channels).contiguous())
    use_and = ~(y[1] < y[0])
    return words_of(use_and)


def words_of(flags: torch.Tensor) -> torch.Tensor:
    """bool [C] -> int64 [ceil(C / 64)] (bit c % 64 of word c // 64)."""
    C = flags.numel()
    bits = np.zeros(((C + 63) // 64) * 64, dtype=bool)
    bits[:C] = flags.numpy()
    return torch.from_numpy(_pack_bits_little(bits).view(np.int64).copy())


# ---------------------------------------------------------------- layers
class PackedConv(nn.Module):
    """A conv (or linear) on a +-1 map with ternary weights, computed with popcounts.

    `flatten_hw`: a linear layer after nn.Flatten of a [C, H, W] map; its weight columns are reordered to
    the packed map's (H, W, C) order at conversion. `chain` (bits mode): the modules between this layer and
    its sign activation (BN, ...), `residuals`: (None,) or (+1.0, -1.0) for a residual +-1 added before the
    sign (BasicBlock with an identity shortcut; the residual's bit picks the threshold pair).
    """

    def __init__(self, layer: nn.Module, mode: str = "float", chain: list[nn.Module] | None = None,
                 residuals: tuple = (None,), flatten_hw: int | None = None, name: str = ""):
        super().__init__()
        parts = ternary_parts(effective_weight(layer))
        if parts is None:
            raise ValueError(f"{name or layer}: the weight is not ternary")
        alpha, kept, negative = parts
        self.name, self.alpha = name, alpha
        if isinstance(layer, nn.Conv2d):
            geometry = conv_geometry(layer)
            if geometry is None:
                raise ValueError(f"{name}: unsupported conv (groups, bias, padding mode)")
            O, C, kh, kw = kept.shape
            to_otc = lambda t: t.permute(0, 2, 3, 1).reshape(O, kh * kw, C)
            self.linear = False
        elif isinstance(layer, nn.Linear):
            if layer.bias is not None:
                raise ValueError(f"{name}: linear layers with a bias are not packed")
            O, features = kept.shape
            hw = flatten_hw or 1
            if features % hw:
                raise ValueError(f"{name}: {features} features are not C x {hw} positions")
            C = features // hw
            # one "tap" per flattened position, C channels (padded to 64 bits) each: the packed map's order
            to_otc = self._flatten_layout(C, hw)
            geometry = (1, 1, 1, 1, 0, 0, 1, 1)
            self.linear = True
        else:
            raise ValueError(f"{name}: not a conv or linear layer")
        self.geometry = geometry
        self.in_channels, self.out_channels, self.flatten_hw = C, O, flatten_hw
        self.fan_in = C * geometry[0] * geometry[1] * (flatten_hw or 1)
        padded = geometry[4] > 0 or geometry[5] > 0
        self.weights = CompressedTernary(to_otc(kept), to_otc(negative), with_tap_sums=padded)
        self.mode = mode
        if mode == "bits":
            self.register_buffer("thresholds", sign_thresholds(alpha, self.fan_in, O, chain or [], residuals))
        else:
            self.register_buffer("thresholds", torch.zeros(2, self.weights.kept.numel(), dtype=torch.int16))
        self._tables: dict = {}

    @staticmethod
    def _flatten_layout(C: int, hw: int):
        """[O, C * hw] (flatten of [C, H, W]) -> [O, hw, C]: one tap per position, C channels each."""
        def convert(t):
            O = t.shape[0]
            return t.reshape(O, C, hw).permute(0, 2, 1).contiguous()
        return convert

    # -- padding correction tables, per input size
    def tables(self, H: int, W: int):
        key = (H, W)
        if key not in self._tables:
            self._tables[key] = self._make_tables(H, W)
        return self._tables[key]

    def _make_tables(self, H: int, W: int):
        kh, kw, sh, sw, ph, pw, dh, dw = self.geometry
        Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if Ho <= 0 or Wo <= 0:
            raise ValueError(f"{self.name}: input {H}x{W} is too small")
        kept = self.weights.kept.to(torch.int32)
        if self.weights.tap_sums is None:
            zero_y, zero_x = torch.zeros(Ho, dtype=torch.int32), torch.zeros(Wo, dtype=torch.int32)
            return kept.to(torch.int16)[None].contiguous(), zero_y, zero_x, 1

        def classes(size, out, k, s, p, d):
            pos = torch.arange(out)[:, None] * s - p + torch.arange(k)[None] * d
            valid = (pos >= 0) & (pos < size)
            patterns, inverse = torch.unique(valid, dim=0, return_inverse=True)
            return patterns.to(torch.int32), inverse.to(torch.int32)

        rows, cls_y = classes(H, Ho, kh, sh, ph, dh)
        cols, cls_x = classes(W, Wo, kw, sw, pw, dw)
        sums = self.weights.tap_sums.to(torch.int32).view(-1, kh, kw)               # [O, kh, kw]
        outside = 1 - rows[:, None, :, None] * cols[None, :, None, :]                # [ny, nx, kh, kw]
        correction = torch.einsum("yxij,oij->yxo", outside, sums).reshape(-1, sums.shape[0])
        table = kept[None].repeat(correction.shape[0], 1)
        table[:, :sums.shape[0]] -= correction
        return table.to(torch.int16).contiguous(), cls_y.contiguous(), cls_x.contiguous(), cols.shape[0]

    def forward(self, x: PackedBits, residual: PackedBits | None = None, mode: str | None = None):
        mode = mode or self.mode
        words = x.words
        if self.linear:
            words = words.reshape(words.shape[0], 1, 1, -1)
        btab, cls_y, cls_x, ncx = self.tables(words.shape[1], words.shape[2])
        w = self.weights
        out = PACKED.ops().binary_conv(words, w.mask_panel, w.sign_stream, w.offsets, self.out_channels,
                                list(self.geometry), btab, cls_y, cls_x, ncx, MODES[mode], self.alpha,
                                self.thresholds, None if residual is None else residual.words)
        if mode == "bits":
            return PackedBits(out, self.out_channels, flat=self.linear)
        if self.linear:
            return out.view(out.shape[0], self.out_channels)
        return out.permute(0, 3, 1, 2)          # NCHW view of the NHWC result (channels_last)

    def extra_repr(self) -> str:
        return (f"{self.name}: {self.in_channels} -> {self.out_channels}, geometry={self.geometry}, "
                f"alpha={self.alpha:.6g}, mode={self.mode}")


class BitMaxPool(nn.Module):
    """nn.MaxPool2d on packed +-1 bits (see and_directions)."""

    def __init__(self, pool: nn.MaxPool2d, and_words: torch.Tensor | None = None, channels: int = 0):
        super().__init__()
        if pool.ceil_mode or pool.return_indices:
            raise ValueError("max-pool with ceil_mode or return_indices is not packed")
        (kh, kw), (sh, sw) = _pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size)
        (ph, pw), (dh, dw) = _pair(pool.padding), _pair(pool.dilation)
        self.geometry = [kh, kw, sh, sw, ph, pw, dh, dw]
        if and_words is None:   # the max of +-1 values: -1 iff all are -1
            and_words = torch.full(((channels + 63) // 64,), -1, dtype=torch.int64)
        self.register_buffer("and_words", and_words)

    def forward(self, x: PackedBits) -> PackedBits:
        return PackedBits(PACKED.ops().bit_maxpool(x.words, self.and_words, self.geometry), x.channels, x.flat)


class SignPack(nn.Module):
    """BinaryActivation of a float tensor, packed to bits."""

    def forward(self, x):
        return x if isinstance(x, PackedBits) else pack_sign(x)


def _float_keys(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 keys ordered as the floats (-0.0 just below +0.0)."""
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)


def _from_keys(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of _float_keys."""
    as_int32 = torch.where(keys >= 0, keys, -(keys + 1) - 2 ** 31).to(torch.int32)
    return as_int32.view(torch.float32)


@torch.no_grad()
def float_thresholds(chain: list[nn.Module], channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel float32 (lo, hi) with BinaryActivation(chain(x)) = +1 exactly when lo <= x <= hi, for every
    finite float32 x: found by bisection over the float32 values, evaluating the model's own modules."""
    big = torch.finfo(torch.float32).max
    def positive(x):
        return _apply_chain(chain, x[None].contiguous())[0] >= 0
    low_key = _float_keys(torch.full((channels,), -big))
    high_key = _float_keys(torch.full((channels,), big))
    pos_low, pos_high = positive(_from_keys(low_key)), positive(_from_keys(high_key))
    increasing, decreasing = ~pos_low & pos_high, pos_low & ~pos_high
    lo_key, hi_key = low_key.clone(), high_key.clone()        # pos(lo_key) != pos(hi_key) on the changing channels
    changing = increasing | decreasing
    while True:
        gap = (hi_key - lo_key) > 1
        active = changing & gap
        if not bool(active.any()):
            break
        mid = (lo_key + hi_key) // 2
        pos_mid = positive(_from_keys(mid))
        # increasing: keep pos(hi) true, pos(lo) false; decreasing: pos(lo) true, pos(hi) false
        move_hi = active & torch.where(increasing, pos_mid, ~pos_mid)
        move_lo = active & ~move_hi
        hi_key = torch.where(move_hi, mid, hi_key)
        lo_key = torch.where(move_lo, mid, lo_key)
    inf = torch.tensor(float("inf"))
    lo = torch.where(increasing, _from_keys(hi_key), -inf)
    hi = torch.where(decreasing, _from_keys(lo_key), inf)
    never = ~changing & ~pos_low                                  # constant -1
    lo = torch.where(never, inf, lo)
    hi = torch.where(never, -inf, hi)
    return lo.to(torch.float32).contiguous(), hi.to(torch.float32).contiguous()


class ThresholdPack(nn.Module):
    """Elementwise float modules (BN in eval mode, ...) followed by BinaryActivation, on a float map,
    fused into one pass that writes the bits: -1 unless lo[c] <= x <= hi[c] (float_thresholds)."""

    def __init__(self, chain: list[nn.Module], channels: int):
        super().__init__()
        lo, hi = float_thresholds(chain, channels)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)

    def forward(self, x):
        if isinstance(x, PackedBits):
            x = x.unpack()
        return PackedBits(PACKED.ops().pack_threshold(x, self.lo, self.hi), x.shape[1], flat=x.dim() == 2)


class TernaryFloat(nn.Module):
    """A ternary conv/linear on real-valued input (the first layer, a classifier after an average pool):
    computed in float32 as the float model does, with W_eff rebuilt bit for bit at each call from the
    compressed form (mask bits and the sign bits of the kept weights)."""

    def __init__(self, layer: nn.Module, name: str = ""):
        super().__init__()
        parts = ternary_parts(effective_weight(layer))
        if parts is None or getattr(layer, "bias", None) is not None:
            raise ValueError(f"{name}: not a bias-free ternary layer")
        alpha, kept, negative = parts
        self.name, self.shape, self.alpha = name, tuple(kept.shape), alpha
        self.conv = None
        if isinstance(layer, nn.Conv2d):
            self.conv = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation,
                         "groups": layer.groups}
            if layer.padding_mode != "zeros":
                raise ValueError(f"{name}: padding mode {layer.padding_mode} is not supported")
        flat_kept = kept.flatten().numpy()
        self.register_buffer("mask_bytes", torch.from_numpy(np.packbits(flat_kept, bitorder="little")))
        self.register_buffer("sign_bytes", torch.from_numpy(
            np.packbits(negative.flatten().numpy()[flat_kept], bitorder="little")))
        self.n_kept = int(flat_kept.sum())

    def weight(self) -> torch.Tensor:
        numel = int(np.prod(self.shape))
        return PACKED.ops().expand_ternary(self.mask_bytes, self.sign_bytes, numel, self.alpha).view(self.shape)

    def forward(self, x):
        if isinstance(x, PackedBits):
            x = x.unpack()
        if self.conv is None:
            return F.linear(x, self.weight())
        return F.conv2d(x, self.weight(), None, **self.conv)

    def extra_repr(self) -> str:
        return f"{self.name}: shape={self.shape}, alpha={self.alpha:.6g}"
