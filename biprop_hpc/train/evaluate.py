"""Evaluation with metrics reduced as sums over ranks, so every sample counts exactly once."""
import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, batches, device: torch.device, ctx, autocast) -> dict:
    """Loss, top-1 and top-5 (percent) over all ranks' shares of an evaluation split."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    for batch in batches:
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with autocast():
            logits = model(images)
        logits = logits.float()
        totals[0] += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += len(labels)
    loss, top1, top5, count = ctx.allreduce_sum(totals.cpu()).tolist()
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "count": 0}
    return {"loss": loss / count, "top1": 100 * top1 / count, "top5": 100 * top5 / count, "count": int(count)}
