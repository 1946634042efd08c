"""Global pruning ("A Winning Hand", NeurIPS 2021): one |S| threshold over all BIPROP layers together.

Instead of every layer keeping the fraction k of its own weights, the K = kept_count(N, k) largest |S| of all N
scores of the model stay, so layers keep different fractions. How a step computes it:

    1. the |S| of all BIPROP layers laid end to end, in module order (the engine's fixed layer order);
    2. the threshold T, the K-th largest entry, by one selection over all of them (never a sort of all scores):
       on the CPU the C++ kernel (csrc/masks.cpp) reads the layers where they lie, one strided sample over all
       layers and one pass collecting the band around T; elsewhere torch_global_kept_counts concatenates the |S|
       into one buffer and takes layers.kth_largest (topk's radix select on CUDA);
    3. per layer, its count of |S| > T, plus the ties |S| == T, kept in flat-index order over the concatenated
       buffer (so the first layers' ties go first) until K is reached;
    4. a layer that would keep nothing keeps 1 weight, its largest |S| (ties: lower flat index): alpha would be
       0/0 otherwise (the original printed a warning and computed NaN). The model then keeps K plus the number of
       such layers.

Each layer's mask is then its own top-n_l of |S| (ties to the lower flat index), which is exactly the global
mask above, and alpha = sum(|W| M) / n_l over what the layer keeps; the gradient is unchanged. On the CPU
(global_effective_weights, float32/float64 layers) the masks come straight from T and each layer's last kept tie,
in the same pass that finds T: no second selection per layer, so the global masks cost about the layerwise ones.

The kept fraction follows the original's schedule (its main.py, per epoch, from the 0-based epoch index before
the epoch trains): for a target k <= 0.5 and epoch e < E (prune_rate_epoch) the pruned fraction is
(1 - k) + (0.5 - (1 - k)) * (1 - e / E) ** 3, i.e. the kept fraction decays from 0.5 at epoch 0 to k at epoch E
and stays there; a target k > 0.5 is used from the start.
"""
from __future__ import annotations

import torch

from biprop_hpc.extensions import MASKS
from biprop_hpc.nn.layers import check_keep_ratio, kept_count, kth_largest

PRUNING_MODES = ("layerwise", "global")


def scheduled_keep_ratio(target: float, epoch: int, prune_rate_epoch: int) -> float:
    """The kept fraction global pruning uses in (0-based) `epoch`, by the original's formula (module doc)."""
    check_keep_ratio(target)
    if epoch < 0 or prune_rate_epoch < 0:
        raise ValueError(f"epoch ({epoch}) and prune_rate_epoch ({prune_rate_epoch}) must be >= 0")
    if target > 0.5 or epoch >= prune_rate_epoch:
        return target
    decay = (1 - epoch / prune_rate_epoch) ** 3
    pruned = (1 - target) + (0.5 - (1 - target)) * decay
    return 1 - pruned


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _cpu_kernels(tensors: list[torch.Tensor], dtypes: tuple):
    """The C++ kernels (csrc/masks.cpp) where they apply to these tensors: all on the CPU with one dtype of
    `dtypes` (else, and where they cannot be built, None: the torch code runs)."""
    if not tensors or any(t.device.type != "cpu" or t.dtype != tensors[0].dtype for t in tensors):
        return None
    return MASKS.ops_if_available() if tensors[0].dtype in dtypes else None


@torch.no_grad()
def global_kept_counts(scores: list[torch.Tensor], keep_ratio: float) -> list[int]:
    """Each layer's kept count under one global threshold over the |S| of all `scores` (module doc, steps 1-4).

    On the CPU (one dtype, float16 to float64) the C++ kernel reads the layers where they lie: one sampled
    selection over all of them and the per-layer counts, never a concatenation (csrc/masks.cpp); elsewhere
    torch_global_kept_counts."""
    kernels = _cpu_kernels(scores, KERNEL_DTYPES)
    if kernels is None:
        return torch_global_kept_counts(scores, keep_ratio)
    total = kept_count(sum(s.numel() for s in scores), keep_ratio)
    return list(kernels.global_kept_counts([s.detach() for s in scores], total))


@torch.no_grad()
def global_effective_weights(layers: list, keep_ratio: float) -> list[torch.Tensor] | None:
    """Every layer's W_eff under global pruning, and each layer's kept count set, by the C++ kernel in one go
    (float32/float64 CPU layers of one dtype; else None): the threshold T and each layer's ties at T come from
    one selection over all layers, and each layer's mask straight from them (its keys > T and its kept ties),
    in the passes of the layerwise kernel, with no second selection per layer."""
    weights = [layer.weight for layer in layers]
    scores = [layer.scores.detach() for layer in layers]
    kernels = _cpu_kernels(weights + scores, (torch.float32, torch.float64))
    if kernels is None:
        return None
    total = kept_count(sum(w.numel() for w in weights), keep_ratio)
    effective, counts = kernels.global_effective_weights(scores, weights, total)
    for layer, count in zip(layers, counts):
        layer.set_kept_count(count)
    return effective


@torch.no_grad()
def torch_global_kept_counts(scores: list[torch.Tensor], keep_ratio: float) -> list[int]:
    """global_kept_counts in torch operations, on every device (the CUDA path; the CPU kernel's reference)."""
    sizes = [s.numel() for s in scores]
    total = kept_count(sum(sizes), keep_ratio)
    if total >= sum(sizes):
        return sizes
    flat = torch.cat([s.detach().reshape(-1) for s in scores]).abs_()
    threshold = kth_largest(flat, total)
    # Per layer, the entries >= T: one comparison pass and one host read. Only when more than `total` entries
    # tie at T (rare: the K-th largest itself is one of them) do the ties need counting apart.
    at_least = flat >= threshold
    counts = torch.stack([part.sum() for part in at_least.split(sizes)]).tolist()
    if sum(counts) > total:
        tied = flat == threshold
        ties = torch.stack([part.sum() for part in tied.split(sizes)]).tolist()
        need = total - sum(c - t for c, t in zip(counts, ties))    # ties to keep, lower flat index first
        counts = [count - t for count, t in zip(counts, ties)]
        for index, t in enumerate(ties):
            taken = min(t, need)
            need -= taken
            counts[index] += taken
    return [max(count, 1) for count in counts]


def apply_global_counts(layers: list, keep_ratio: float) -> list[int]:
    """Set every layer's kept count from the global threshold over their current scores; returns the counts."""
    counts = global_kept_counts([layer.scores for layer in layers], keep_ratio)
    for layer, count in zip(layers, counts):
        layer.set_kept_count(count)
    return counts


def trained_epoch(state: dict) -> int:
    """The 0-based epoch whose schedule the model of a checkpoint's run state was trained with: the epoch in
    progress for a mid-epoch checkpoint (step > 0), else the last finished one (0 for initial.pt)."""
    epoch, step = int(state.get("epoch", 0)), int(state.get("step", 0))
    return epoch if step else max(epoch - 1, 0)


def set_model_pruning(model, pruning: str, keep_ratio: float, prune_rate_epoch: int, epoch: int) -> None:
    """Give `model`'s mask engine the pruning of a run at `epoch` (layerwise: nothing to do). The engine then
    applies the global counts before every forward."""
    if pruning not in PRUNING_MODES:
        raise ValueError(f"pruning must be one of {PRUNING_MODES}, got {pruning!r}")
    if pruning == "layerwise":
        return
    engine = getattr(model, "mask_engine", None)
    if engine is None:
        raise ValueError("global pruning needs the model's mask engine (models built by the zoo have one)")
    engine.set_global_keep_ratio(scheduled_keep_ratio(keep_ratio, epoch, prune_rate_epoch))


def at_target_keep_ratio(cfg, epoch: int) -> bool:
    """Whether a run's model keeps its keep_ratio in (0-based) `epoch`: always with layerwise pruning; with global
    pruning once the schedule has reached it. Only such an epoch's checkpoint can be a run's best."""
    return cfg.pruning != "global" or (
        scheduled_keep_ratio(cfg.keep_ratio, epoch, cfg.prune_rate_epoch) == cfg.keep_ratio)


def set_run_pruning(model, cfg, epoch: int) -> None:
    """set_model_pruning with a run config's pruning, keep_ratio and prune_rate_epoch (a Config or its dict)."""
    get = cfg.get if isinstance(cfg, dict) else lambda key, default: getattr(cfg, key, default)
    set_model_pruning(model, get("pruning", "layerwise"), get("keep_ratio", 0.5), get("prune_rate_epoch", 10), epoch)
