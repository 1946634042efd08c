"""Checkpoints: written atomically (temporary file, then rename), so a killed run never leaves a torn one.

A checkpoint holds everything needed to continue a run exactly: model (scores, frozen weights, BN state),
optimizer state, the number of finished epochs, the per-epoch metrics so far, the best validation result,
the config and the RNG state. Files in <run>/checkpoints/: initial.pt (before training), last.pt,
best.pt (best validation top-1) and epoch_<N>.pt every `save_every` epochs.
"""
import os
from pathlib import Path

import torch

FORMAT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format_version": FORMAT_VERSION, **state}, tmp)
    os.replace(tmp, path)


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
