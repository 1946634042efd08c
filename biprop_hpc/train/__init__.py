"""Training: the loop, schedules, checkpoints and evaluation."""
from biprop_hpc.train.loop import Run, evaluate_checkpoint, train

__all__ = ["Run", "evaluate_checkpoint", "train"]
