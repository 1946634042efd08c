"""`--pretrained CKPT` (the original's flag): start a search from the scores of a checkpoint, ours or the
original code's, instead of fresh random scores.

Every entry of the checkpoint whose name (the original's names mapped onto ours, see original.py) and shape
fit the new model is copied in: the frozen weights W and the scores of BIPROP layers, BN statistics and
affine parameters, dense layers. Entries that do not fit are left at their initial values and listed in the
log (as the original did, with "IGNORE"), so a model with another number of classes can start from a
checkpoint. A checkpoint none of whose scores fit is an error. A ticket cannot be a starting point: it holds
the found masks, signs and alphas, but neither |W| nor the scores a search continues from.
"""
from __future__ import annotations

import logging
from pathlib import Path

import h5py
import torch
from torch import nn

from biprop_hpc.config import ConfigError
from biprop_hpc.nn import biprop_layers
from biprop_hpc.ticket.file import TicketError
from biprop_hpc.ticket.original import is_original_checkpoint, original_state, translate

log = logging.getLogger("biprop_hpc")


def pretrained_state(path: str | Path, model: nn.Module) -> tuple[dict, str]:
    """(state under our names, what the file is) of a checkpoint given to --pretrained."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained: {path} does not exist")
    if h5py.is_hdf5(path):
        raise ConfigError(f"--pretrained {path}: an HDF5 file (a ticket?) cannot start a search: a ticket holds the "
                          "found masks, signs and alphas but not the frozen weights |W| nor the scores a search "
                          "continues from; give a checkpoint (a run's checkpoints/best.pt, or a .pth of the original "
                          "code). To evaluate a ticket: biprop evaluate --ticket TICKET")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ConfigError(f"--pretrained {path} is not a readable checkpoint ({type(error).__name__}: {error})") \
            from None
    if isinstance(raw, dict) and "format_version" in raw and isinstance(raw.get("model"), dict):
        return raw["model"], "biprop-hpc checkpoint"
    if is_original_checkpoint(raw):
        try:
            state, _ = original_state(raw, path)
            return translate(state, model, strict=False), "original biprop checkpoint"
        except TicketError as error:
            raise ConfigError(f"--pretrained {path}: {error}") from None
    raise ConfigError(f"--pretrained {path} is neither a biprop-hpc checkpoint nor one of the original code")


@torch.no_grad()
def load_pretrained(model: nn.Module, path: str | Path, quiet: bool = False) -> dict:
    """Copy every entry of the checkpoint at `path` that fits `model` (by name and shape) into it; returns
    {"loaded": [...], "ignored": [...], "source": ...}."""
    state, source = pretrained_state(path, model)
    own = model.state_dict()
    loaded, ignored = [], []
    for key, value in state.items():
        if key in own and tuple(own[key].shape) == tuple(value.shape):
            own[key].copy_(value)
            loaded.append(key)
        else:
            ignored.append(key)
    scores = [f"{name}.scores" for name, _ in biprop_layers(model)]
    if (scores and not any(key in loaded for key in scores)) or not loaded:
        raise ConfigError(f"--pretrained {path}: none of its {'scores' if scores else 'weights'} fit this model "
                          f"(a {source} of another architecture, width or input size?)")
    if not quiet:
        log.info("--pretrained: %d entries from %s (%s); %d of %d BIPROP layers' scores", len(loaded), path, source,
                 sum(key in loaded for key in scores), len(scores))
        missing = [key for key in scores if key not in loaded]
        if ignored or missing:
            log.warning("--pretrained: ignored %d entries of %s that do not fit (%s); %d score tensors keep their "
                        "random init (%s)", len(ignored), path, ", ".join(ignored[:5]) or "-", len(missing),
                        ", ".join(missing[:5]) or "-")
    return {"loaded": loaded, "ignored": ignored, "source": source}
