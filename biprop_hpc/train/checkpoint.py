"""Checkpoints: written atomically (temporary file, fsync, rename), so a killed run never leaves a torn one.

A checkpoint holds everything needed to continue a run exactly: model (scores, frozen weights, BN state),
optimizer and gradient-scaler state, the run state (finished epochs, steps done in the current epoch,
per-epoch metrics, best validation result, restart records), the config, and every rank's own state
(RNG, BN statistics and partial epoch totals for a mid-epoch checkpoint). Files in <run>/checkpoints/:
initial.pt (before training), best.pt (best validation top-1), epoch_<N>.pt every `save_every` epochs and
last.pt. At the end of an epoch they are written in that order, and last.pt (what a resume reads) last, so
a kill between two writes leaves files that agree with what last.pt says.
"""
from pathlib import Path

import torch

from biprop_hpc.files import replace_atomically

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    replace_atomically(path, lambda tmp: torch.save({"format_version": FORMAT_VERSION, **state}, tmp))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint ({error}); use another one, e.g. last.pt "
                         "or an epoch_<N>.pt beside it") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a biprop-hpc checkpoint (format {FORMAT_VERSION})")
    return state


def resume_path(resume: str, checkpoint_dir: Path) -> Path | None:
    """The checkpoint to continue from: None for a fresh run; `auto` takes last.pt when it exists."""
    if not resume:
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.pt"
        return last if last.is_file() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume: checkpoint {resume} does not exist (use --resume auto to continue "
                                f"the run in {checkpoint_dir.parent} if it has one)")
    return Path(resume)
