"""Evaluation with metrics reduced as sums over ranks, so every sample counts exactly once."""
import torch
from torch import nn

from biprop_hpc.nn import fixed_effective_weights


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host batches go to a GPU from pinned memory, so that the copy is asynchronous (no stall)."""
    if device.type == "cuda" and not tensor.is_cuda and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, ctx, autocast, on_batch=None) -> dict:
    """Loss, top-1 and top-5 (percent) over all ranks' shares of an evaluation split; NaN metrics and
    count 0 for an empty split. `on_batch()` after each batch: progress, for the training run's watchdog."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, top-1, top-5
    count = 0
    with fixed_effective_weights(model):  # the masks are computed once per evaluation, not per batch
        for batch in batches:
            images, labels = to_device(batch.images, device), to_device(batch.labels, device)
            with autocast():
                logits = model(images)
            logits = logits.float()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top == labels[:, None]
            totals += torch.stack([nn.functional.cross_entropy(logits, labels, reduction="sum").double(),
                                   hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
            count += len(batch.labels)
            if on_batch:
                on_batch()
    reduced = torch.cat([totals.cpu(), torch.tensor([count], dtype=torch.float64)])
    loss, top1, top5, count = ctx.allreduce_sum(reduced, "eval_totals").tolist()
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "count": 0}
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}
