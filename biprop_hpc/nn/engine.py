"""The mask engine: every BIPROP layer's effective weight for one forward, computed together.

A model built by the zoo carries a `MaskEngine` (attached as a forward pre-hook on the whole model). Before
each forward it computes W_eff = sign(W) * alpha * M for ALL BIPROP layers and hands each layer its own, with
no host-device synchronisation inside a training step. Three methods, the same results:

- "layerwise" (the default, `auto`, on every device): layer after layer with layers.binary_masked_weight (on
  the CPU the C++ kernels of csrc/masks.cpp; on a GPU topk's multi-block radix select and the tie-break).
- "graphed" (CUDA; elsewhere the same as layerwise): the layerwise computation captured once in a CUDA graph
  and replayed before each forward, so the ~10 small kernels per layer cost one launch. The layerwise masks take
  about the same time for WideResNet-50-2 (69M scores) as for ResNet-50 (25M) on an H200, which says they are
  bound by launches, not by work: this removes the launches. Not yet measured on a GPU (bench/gpu_check.sh).
- "batched": all layers at once in a fixed number of kernels, whatever the layer count: the |S| of all layers in
  one flat buffer; per-layer thresholds by a two-pass radix select (a histogram over (layer, high 16 bits of |S|),
  then one over the low 16 bits within the chosen bucket), which gives each layer's n_keep-th largest |S|
  exactly; ties at the threshold kept in lower-flat-index order through one cumulative sum; alpha by one
  segmented sum; W_eff by one elementwise pass. Integer histograms and the segmented sum are deterministic.
  Measured on an H200 (bench/results/h200-2026-11-29) it is SLOWER than layerwise for WideResNet-50-2 (62 vs
  22-35 ms): its histograms are atomic adds that collide on the few buckets the scores of a layer occupy. A
  fused kernel (per-block shared-memory histograms) is the way to make one pass of this method cheap.

Either way the semantics are SPEC.md's and layers.py's: the kept count n_keep, ties to the lower flat index,
alpha = sum(|W| M) / n_keep (accumulated in float64), and the gradient dL/dS = dL/dW_eff * W * sign(S), per
layer, so that gradients reach Horovod's hooks layer by layer during backward.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from biprop_hpc.nn.layers import BipropMixin, binary_masked_weight, score_gradient

RADIX_BITS = 16
BUCKETS = 1 << RADIX_BITS


class _StraightThrough(torch.autograd.Function):
    """Returns the given W_eff; backward dL/dS = g * W * sign(S); nothing to W."""

    @staticmethod
    def forward(ctx, scores, weight, effective):
        ctx.save_for_backward(scores, weight)
        return effective.view_as(effective)

    @staticmethod
    def backward(ctx, grad_output):
        scores, weight = ctx.saved_tensors
        return score_gradient(grad_output, scores, weight), None, None


class _Segments:
    """Constant per-device layout of the flat buffer: the layer of every element, sizes, first and last index."""

    def __init__(self, numels: list[int], device: torch.device):
        sizes = torch.tensor(numels, dtype=torch.int64)
        ends = torch.cumsum(sizes, 0)
        self.numels = numels
        self.first = (ends - sizes).to(device)
        self.last = (ends - 1).to(device)
        self.layer_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), sizes).to(device)


def _histogram(index: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each value of an int32 index in [0, bins); integer atomics (deterministic), and unlike
    torch.bincount no read of the maximum back to the host."""
    counts = torch.zeros(bins, dtype=torch.int32, device=index.device)
    return counts.index_add_(0, index, torch.ones(1, dtype=torch.int32, device=index.device).expand(len(index)))


def _take(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    return rows.gather(1, columns[:, None]).squeeze(1)


def segmented_top_masks(magnitude: torch.Tensor, segments: _Segments, n_keep: torch.Tensor) -> torch.Tensor:
    """Boolean mask over a flat buffer of non-negative float32 values cut into segments: in each segment the
    n_keep[l] largest values, ties at the threshold to the lower index. A fixed number of kernels, no sync."""
    layers = len(segments.numels)
    n_keep = n_keep.to(torch.int32)
    bits = magnitude.contiguous().view(torch.int32)          # non-negative floats sort like their bits
    layer = segments.layer_of
    # Pass 1: per layer, the bucket of high bits holding the n_keep-th largest value, and how many lie above it.
    high = bits >> RADIX_BITS
    hist = _histogram(layer * BUCKETS + high, layers * BUCKETS).view(layers, BUCKETS)
    from_top = hist.flip(1).cumsum(1, dtype=torch.int32)
    position = (from_top < n_keep[:, None]).sum(1)           # buckets (from the top) kept entirely
    bucket = BUCKETS - 1 - position
    above = _take(from_top, position) - _take(hist, bucket)
    # Pass 2: the low bits of the n_keep-th largest value, among the values of that bucket only.
    in_bucket = high == bucket.to(torch.int32)[layer]
    spare = layers * BUCKETS                                  # values outside the bucket are counted here
    index = torch.where(in_bucket, layer * BUCKETS + (bits & (BUCKETS - 1)), spare)
    hist = _histogram(index, spare + 1)[:-1].view(layers, BUCKETS)
    from_top = hist.flip(1).cumsum(1, dtype=torch.int32)
    position = (from_top < (n_keep - above)[:, None]).sum(1)
    low = BUCKETS - 1 - position
    above = above + _take(from_top, position) - _take(hist, low)
    limit = ((bucket << RADIX_BITS) | low).to(torch.int32)[layer]   # each element's layer threshold, as bits
    tied = bits == limit
    # Ties kept in lower-index order: their rank within the layer, from one cumulative sum over the buffer.
    rank = torch.cumsum(tied, 0, dtype=torch.int32)
    before = torch.where(segments.first > 0, rank[(segments.first - 1).clamp(min=0)], 0)
    return (bits > limit) | (tied & (rank - before[layer] <= (n_keep - above)[layer]))


def segment_sums(values: torch.Tensor, segments: _Segments) -> torch.Tensor:
    """Per-segment sums, accumulated in float64 (deterministic; alpha rounds the same as layers.py's)."""
    running = torch.cumsum(values, 0, dtype=torch.float64)
    before = torch.where(segments.first > 0, running[(segments.first - 1).clamp(min=0)], 0.0)
    return running[segments.last] - before


class _GraphedLayers:
    """The layerwise W_eff of all layers captured once in a CUDA graph, replayed before each forward: one launch
    instead of about ten small kernels per layer. Valid while the layers' scores and weights stay where they are
    (in-place updates by the optimizer, Horovod's broadcast or load_state_dict keep them there) with the same
    kept counts and layouts: `key`; the engine captures a new graph when it changes."""

    def __init__(self, layers: list, key: tuple):
        self.layers, self.key = layers, key
        weights = [layer.weight for layer in layers]
        self.sizes = [w.numel() for w in weights]
        self.flat = torch.empty(sum(self.sizes), dtype=weights[0].dtype, device=weights[0].device)
        self.outputs = self._views(self.flat)
        side = torch.cuda.Stream(weights[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.autocast("cuda", enabled=False), torch.no_grad():
            with torch.cuda.stream(side):
                self._compute()                # warm-up outside the capture (kernels' lazy initialisation)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: loader threads may use the device meanwhile (pinned copies), which is allowed
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._compute()

    @staticmethod
    def key_of(layers: list) -> tuple:
        return tuple((l.scores.data_ptr(), l.weight.data_ptr(), l.n_keep, l.weight.dtype, l.weight.stride())
                     for l in layers)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        # each layer's W_eff with its weight's strides (channels_last stays channels_last)
        return [part.as_strided(l.weight.size(), l.weight.stride())
                for part, l in zip(flat.split(self.sizes), self.layers)]

    def _compute(self) -> None:
        for layer, out in zip(self.layers, self.outputs):
            out.copy_(binary_masked_weight(layer.scores, layer.weight, layer.n_keep))

    def run(self) -> list[torch.Tensor]:
        self.graph.replay()
        # This forward's own copy (one kernel): autograd keeps W_eff for backward, and the next replay rewrites
        # the graph's buffer.
        return self._views(self.flat.clone())


class MaskEngine:
    """Computes the effective weights of all BIPROP layers of a model for each forward (see the module doc)."""

    METHODS = ("auto", "batched", "graphed", "layerwise")

    def __init__(self, model: nn.Module, method: str = "auto"):
        if method not in self.METHODS:
            raise ValueError(f"mask engine method must be one of {self.METHODS}, got {method!r}")
        self.layers = [m for m in model.modules() if isinstance(m, BipropMixin)]
        self.method = method         # auto: layerwise (measured faster; see the module docstring)
        self._segments: dict = {}
        self._n_keep_cache: tuple = (None, None)   # (device, kept counts) -> the counts on that device
        self._graphed: _GraphedLayers | None = None
        self._owns = False           # the layers' current weights were set by this engine for one forward

    # --- computing ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def effective_weights(self) -> list[torch.Tensor]:
        """Every layer's W_eff (no autograd), by the engine's method."""
        if not self.layers:
            return []
        if self.method == "batched":
            return self.batched_effective_weights()
        if self.method == "graphed" and self.layers[0].weight.is_cuda:
            return self.graphed_effective_weights()
        return [binary_masked_weight(l.scores, l.weight, l.n_keep) for l in self.layers]

    @torch.no_grad()
    def graphed_effective_weights(self) -> list[torch.Tensor]:
        """The layerwise computation replayed from a CUDA graph (captured at the first call, and again when the
        layers' storage, kept counts or layouts change). Layers of one dtype on one CUDA device."""
        key = _GraphedLayers.key_of(self.layers)
        if self._graphed is None or self._graphed.key != key:
            devices = {(l.weight.device, l.weight.dtype) for l in self.layers}
            if len(devices) != 1:
                raise ValueError(f"the graphed mask engine needs all BIPROP layers on one device with one dtype, "
                                 f"got {sorted(map(str, devices))}; use method 'layerwise'")
            self._graphed = None               # free the old graph's memory before capturing the new one
            self._graphed = _GraphedLayers(self.layers, key)
        return self._graphed.run()

    @torch.no_grad()
    def batched_effective_weights(self) -> list[torch.Tensor]:
        """All layers at once in a fixed number of kernels (on any device)."""
        scores = [l.scores for l in self.layers]
        weights = [l.weight for l in self.layers]
        device = scores[0].device
        segments = self._layout(device)
        n_keep = self._n_keep(device)
        magnitude = torch.cat([s.detach().reshape(-1) for s in scores]).abs_()
        mask = segmented_top_masks(magnitude, segments, n_keep)
        flat_weight = torch.cat([w.reshape(-1) for w in weights])
        alpha = (segment_sums(torch.where(mask, flat_weight.abs(), 0.0), segments) / n_keep).to(flat_weight.dtype)
        flat = torch.sign(flat_weight).mul_(alpha[segments.layer_of]).mul_(mask)
        return [part.view_as(w) for part, w in zip(flat.split(segments.numels), weights)]

    def _layout(self, device: torch.device) -> _Segments:
        numels = [l.weight.numel() for l in self.layers]
        key = (device, tuple(numels))
        if key not in self._segments:
            self._segments = {key: _Segments(numels, device)}
        return self._segments[key]

    def _n_keep(self, device: torch.device) -> torch.Tensor:
        counts = tuple(l.n_keep for l in self.layers)     # keep ratios may change between forwards
        key = (device, counts)
        if self._n_keep_cache[0] != key:
            self._n_keep_cache = (key, torch.tensor(counts, dtype=torch.int64).to(device))
        return self._n_keep_cache[1]

    # --- hooks ----------------------------------------------------------------------------------------------
    def before_forward(self, module, args) -> None:
        if not self._owns and any(l._fixed_weight is not None for l in self.layers):
            return  # weights fixed from outside for this block (fixed_effective_weights: evaluation)
        effective = self.effective_weights()
        graph = torch.is_grad_enabled()
        for layer, weight in zip(self.layers, effective):
            if graph and layer.scores.requires_grad:
                weight = _StraightThrough.apply(layer.scores, layer.weight, weight)
            layer._fixed_weight = weight
        self._owns = True

    def after_forward(self, module, args, output) -> None:
        if self._owns:
            for layer in self.layers:
                layer._fixed_weight = None
            self._owns = False


@contextlib.contextmanager
def fixed_effective_weights(model: nn.Module):
    """Compute every BIPROP layer's W_eff once, on entry, and use it for every forward inside the block.

    For evaluation: masks are not recomputed per batch. Nothing is cached beyond the block, so no write to
    the scores or weights (an optimizer step, a load_state_dict, a collective writing in place) can leave
    a stale W_eff behind; inside the block the scores must not change, and no gradient reaches them.
    The model's own engine computes them (a model without one, e.g. hand-built, gets a temporary one).
    """
    engine = getattr(model, "mask_engine", None) or MaskEngine(model)
    try:
        for layer, weight in zip(engine.layers, engine.effective_weights()):
            layer._fixed_weight = weight
        engine._owns = False     # set from outside: the engine's hooks leave them alone in the block
        yield model
    finally:
        for layer in engine.layers:
            layer._fixed_weight = None


def attach_mask_engine(model: nn.Module) -> nn.Module:
    """Give `model` a MaskEngine (one per model; its layers' W_eff come from it at every forward)."""
    if getattr(model, "mask_engine", None) is None and any(isinstance(m, BipropMixin) for m in model.modules()):
        engine = MaskEngine(model)
        model.mask_engine = engine
        engine.hooks = (model.register_forward_pre_hook(engine.before_forward),
                        model.register_forward_hook(engine.after_forward))
    return model


def detach_mask_engine(model: nn.Module) -> nn.Module:
    """Remove `model`'s MaskEngine and its hooks (e.g. once its BIPROP layers have been replaced)."""
    engine = getattr(model, "mask_engine", None)
    if engine is not None:
        for handle in engine.hooks:
            handle.remove()
        model.mask_engine = None
    return model
