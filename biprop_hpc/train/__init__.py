"""Training: the loop, schedules, checkpoints and evaluation."""
from biprop_hpc.lazy import lazy_names

# Imported on first use: the command line imports train.stopping without torch.
__getattr__ = lazy_names(__name__, {"Run": "loop", "evaluate_checkpoint": "loop", "train": "loop"})

__all__ = ["Run", "evaluate_checkpoint", "train"]
