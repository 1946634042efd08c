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
- "batched": all layers at once in a fixed number of kernels, whatever the layer count (radix.py): the scores of
  all layers in one flat buffer cut into chunks; per-layer thresholds by a four-pass 8-bit radix select whose
  digit counts are made per chunk; ties at the threshold kept in lower-flat-index order; alpha from per-chunk
  float64 sums. On CUDA the per-chunk passes are Triton kernels (radix_triton.py), one launch a pass; elsewhere
  torch operations. float32 layers (other dtypes: layerwise). The first version of this method counted digits
  with global atomic adds and was measured SLOWER than layerwise on an H200 for WideResNet-50-2 (62 vs 22-35 ms,
  bench/results/h200-2026-11-29): the atomics collide on the few buckets a layer's scores occupy. The Triton
  kernels count in registers per chunk instead; not yet measured on a GPU (bench/gpu_check.sh).

Global pruning (`set_global_keep_ratio`, nn/global_prune.py): before every computation the engine sets each layer's
kept count from one threshold over all layers' |S| (one selection over all of them), then any method above
computes the masks with those counts (graphed then runs as layerwise: the counts change between steps). On the CPU
(float32/float64 layers, not batched) one C++ call does it all: each layer's mask comes straight from the global
threshold and its ties, without a second selection per layer.

Either way the semantics are SPEC.md's and layers.py's: the kept count n_keep, ties to the lower flat index,
alpha = sum(|W| M) / n_keep (accumulated in float64), and the gradient dL/dS = dL/dW_eff * W * sign(S), per
layer, so that gradients reach Horovod's hooks layer by layer during backward.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from biprop_hpc.nn.global_prune import apply_global_counts, global_effective_weights
from biprop_hpc.nn.layers import BipropMixin, binary_masked_weight, score_gradient
from biprop_hpc.nn.radix import ChunkLayout, masked_weights


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
        self._layout: ChunkLayout | None = None    # the batched method's chunks, for the current layers
        self._n_keep_cache: tuple = (None, None)   # (device, kept counts) -> the counts on that device
        self._graphed: _GraphedLayers | None = None
        self._owns = False           # the layers' current weights were set by this engine for one forward
        self.global_keep_ratio: float | None = None   # global pruning's kept fraction (None: layerwise)

    def set_global_keep_ratio(self, keep_ratio: float | None) -> None:
        """Global pruning at this kept fraction from now on (nn/global_prune.py); None: back to layerwise (each
        layer's counts from its own keep_ratio)."""
        self.global_keep_ratio = keep_ratio
        if keep_ratio is None:
            for layer in self.layers:
                layer.keep_ratio = layer.keep_ratio
        else:
            self.apply_global_counts()

    def apply_global_counts(self) -> None:
        """Global pruning: every layer's kept count from one threshold over all layers' current scores."""
        if self.global_keep_ratio is not None and self.layers:
            apply_global_counts(self.layers, self.global_keep_ratio)

    # --- computing ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def effective_weights(self) -> list[torch.Tensor]:
        """Every layer's W_eff (no autograd), by the engine's method."""
        if not self.layers:
            return []
        if self.global_keep_ratio is not None and self.method != "batched":
            # CPU: the threshold, the counts and the masks in one C++ call (None where it does not apply)
            effective = global_effective_weights(self.layers, self.global_keep_ratio)
            if effective is not None:
                return effective
        self.apply_global_counts()
        if self.method == "batched":
            return self.batched_effective_weights()
        # global counts change from step to step: a graph would be captured again at each change
        if self.method == "graphed" and self.layers[0].weight.is_cuda and self.global_keep_ratio is None:
            return self.graphed_effective_weights()
        return self.layerwise_effective_weights()

    def layerwise_effective_weights(self) -> list[torch.Tensor]:
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
        """All layers at once in a fixed number of kernels (radix.py; float32 layers, else layerwise)."""
        weights = [l.weight for l in self.layers]
        if any(w.dtype != torch.float32 or l.scores.dtype != torch.float32 for w, l in zip(weights, self.layers)):
            return self.layerwise_effective_weights()
        device = weights[0].device
        numels = [w.numel() for w in weights]
        if self._layout is None or (self._layout.numels, self._layout.start.device) != (numels, device):
            self._layout = ChunkLayout(numels, device)
        flat = masked_weights(torch.cat([l.scores.detach().reshape(-1) for l in self.layers]),
                              torch.cat([w.reshape(-1) for w in weights]), self._layout, self._n_keep(device))
        # in each weight's memory format (channels_last stays channels_last), as the other methods give them
        return [part.view(w.shape) if w.is_contiguous() else torch.empty_like(w).copy_(part.view(w.shape))
                for part, w in zip(flat.split(numels), weights)]

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
