"""AugMix's Jensen-Shannon consistency loss (Hendrycks et al., 2020), as "A Winning Hand"'s trainer used it.

For a sample's clean and two augmented views with predicted distributions p1, p2, p3 and their mean M:
JS = (KL(p1 || M) + KL(p2 || M) + KL(p3 || M)) / 3, with M clamped to [1e-7, 1] before its log (as the AugMix
code and the original's trainer do, so that a vanishing probability cannot make the loss explode). The training
loss of a sample is CE(clean logits, label) + jsd_weight * JS; the loop sums it over the batch and divides by
the global batch, as for plain cross-entropy (the original: mean CE + 12 * batch-mean JS).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIXTURE_FLOOR = 1e-7


def js_divergence(logits: torch.Tensor) -> torch.Tensor:
    """Per sample (shape B): the JS divergence among the V views of `logits`, shaped V x B x classes."""
    probabilities = F.softmax(logits.float(), dim=-1)
    log_mixture = probabilities.mean(0).clamp(MIXTURE_FLOOR, 1.0).log()
    # kl_div(input=log M, target=p) is sum p * (log p - log M) = KL(p || M), elementwise before the sum.
    kl = F.kl_div(log_mixture.expand_as(probabilities), probabilities, reduction="none").sum(-1)
    return kl.mean(0)


def consistency_loss_sum(criterion, logits: torch.Tensor, labels: torch.Tensor, jsd_weight: float) -> torch.Tensor:
    """CE of the clean logits (the first third of `logits`: clean, view 1, view 2 stacked) summed by
    `criterion`, plus jsd_weight times the summed JS divergence over the three."""
    views = logits.float().view(3, len(labels), -1)
    return criterion(views[0], labels) + jsd_weight * js_divergence(views).sum()
