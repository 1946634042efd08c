"""From a run's checkpoint to a ticket, and from a ticket back to a network (`load`), with nothing but the ticket.

`dense_ternary(model)` is the one place where BIPROP layers become plain layers: every BipropConv2d /
BipropLinear is replaced by a bias-free nn.Conv2d / nn.Linear of the same geometry whose weight is W_eff
(values in {-alpha, 0, +alpha}, float32), frozen; every other module stays. `load(path)` builds the ticket's
architecture from its config and geometry, makes it dense-ternary and fills it from the ticket, in eval mode.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

import h5py
import torch
from torch import nn

import biprop_hpc
from biprop_hpc.config import Config
from biprop_hpc.nn import BipropMixin, biprop_layers, detach_mask_engine
from biprop_hpc.nn.global_prune import set_run_pruning, trained_epoch
from biprop_hpc.nn.layers import binary_masked_weight
from biprop_hpc.ticket.file import LayerRecord, Ticket, TicketError, read, write_ticket
from biprop_hpc.train.checkpoint import load_checkpoint

log = logging.getLogger("biprop_hpc")

# The input size of the in-memory datasets (image trees: the config's crop_size).
DATASET_IMAGE_SIZE = {"fashion-mnist": 28, "mnist": 28, "cifar10": 32}


# --------------------------------------------------------------------------------- BIPROP -> plain layers

def plain_like(layer: nn.Module) -> nn.Module:
    """A bias-free nn.Conv2d / nn.Linear with `layer`'s geometry, on its device (no init cost on meta)."""
    device = layer.weight.device
    if isinstance(layer, nn.Conv2d):
        return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                         layer.dilation, layer.groups, bias=False, padding_mode=layer.padding_mode, device=device)
    return nn.Linear(layer.in_features, layer.out_features, bias=False, device=device)


def _replace(model: nn.Module, weight_of) -> nn.Module:
    for name, layer in biprop_layers(model):
        plain = plain_like(layer)
        weight = weight_of(name, layer)
        if weight is not None:
            plain.weight = nn.Parameter(weight.to(plain.weight.device), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    detach_mask_engine(model)
    return model


@torch.no_grad()
def effective_weight(layer: BipropMixin) -> torch.Tensor:
    """A BIPROP layer's W_eff as an evaluation computes it, with -0.0 made +0.0 (the ticket's convention)."""
    return binary_masked_weight(layer.scores, layer.weight, layer.n_keep) + 0.0


def dense_ternary(model: nn.Module, weights: dict | None = None) -> nn.Module:
    """Replace, in place, every BIPROP layer of `model` by a plain bias-free nn.Conv2d / nn.Linear (same
    stride, padding, dilation, groups) whose weight is W_eff: `weights[name]` when given, else computed from
    the layer's scores and frozen weights. Module names stay, so the state_dict keys are the model's own
    ("<name>.weight"; scores are gone). Returns the model in eval mode with every requires_grad False."""
    weights = weights or {}
    _replace(model, lambda name, layer: weights[name] if name in weights else effective_weight(layer))
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------- checkpoint -> ticket

def records(model: nn.Module, kept=None) -> list[LayerRecord]:
    """The ticket records of every BIPROP layer of `model` (its W_eff as evaluated on the CPU)."""
    out = []
    for name, layer in biprop_layers(model):
        geometry = {}
        if isinstance(layer, nn.Conv2d):
            geometry = {"stride": tuple(layer.stride), "padding": tuple(layer.padding),
                        "dilation": tuple(layer.dilation), "groups": layer.groups}
        weight = effective_weight(layer)
        out.append(LayerRecord.from_effective_weight(name, weight, layer.n_keep if kept is None else kept[name],
                                                     **geometry))
    return out


def other_tensors(model: nn.Module) -> dict:
    """Every state_dict entry of `model` that does not belong to a BIPROP layer's weight or scores."""
    skip = {f"{name}.{part}" for name, _ in biprop_layers(model) for part in ("weight", "scores")}
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items() if key not in skip}


def build(cfg: Config | dict, in_channels: int, num_classes: int, image_size: int, device="cpu") -> nn.Module:
    """The config's architecture (on `device`; "meta" costs nothing and draws no random numbers)."""
    from biprop_hpc.train.loop import model_from_config
    cfg = cfg if isinstance(cfg, Config) else Config.from_dict(cfg, origin="ticket config")
    if str(device) == "meta":
        with torch.device("meta"):
            return model_from_config(cfg, in_channels, num_classes, image_size)
    with torch.random.fork_rng(devices=[]):   # building draws random W and S: leave the caller's RNG alone
        return model_from_config(cfg, in_channels, num_classes, image_size).to(device)


def _shapes(model: nn.Module) -> dict:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def first_linear_in(cfg: Config, in_channels: int, num_classes: int, image_size: int) -> int | None:
    """in_features of the first nn.Linear of the model at this image size (None if too small to build)."""
    try:
        model = build(cfg, in_channels, num_classes, image_size, "meta")
    except ValueError:
        return None
    return next((m.in_features for m in model.modules() if isinstance(m, nn.Linear)), None)


def solve_geometry(cfg: Config, shapes: dict, default_size: int, what: str,
                   names: dict | None = None) -> tuple[int, int, int]:
    """(in_channels, num_classes, image_size) under which the config's model has exactly `shapes` (state_dict
    key -> shape, our names): channels from the first layer, classes from the last, and the image size from
    the first fully connected layer where the model flattens a feature map (else `default_size`). `names`
    (our key -> the file's key) makes messages name the file's entries."""
    probe = build(cfg, 1, 1, default_size, "meta")
    weighted = [(name, m) for name, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not weighted:
        raise TicketError(f"{what}: model {cfg.model} has no conv or linear layer")
    first, last = f"{weighted[0][0]}.weight", f"{weighted[-1][0]}.weight"
    for key in (first, last):
        if key not in shapes:
            raise TicketError(f"{what} has no entry for layer {key.rpartition('.')[0]} of model {cfg.model}: it is "
                              f"not a {cfg.model} checkpoint (another architecture?)")
    in_channels, num_classes = shapes[first][1], shapes[last][0]
    size = default_size
    linear = next((name for name, m in weighted if isinstance(m, nn.Linear)), None)
    wanted = shapes.get(f"{linear}.weight", (0, 0))[1] if linear else None
    if linear and first_linear_in(cfg, in_channels, num_classes, default_size) != wanted:
        size = _smallest_size(cfg, in_channels, num_classes, wanted) or default_size
    check_shapes(build(cfg, in_channels, num_classes, size, "meta"), shapes, what, cfg.model, names)
    return in_channels, num_classes, size


def _smallest_size(cfg: Config, in_channels: int, num_classes: int, wanted: int, limit: int = 4096) -> int | None:
    """The smallest image size whose first linear layer has `wanted` inputs (it grows with the size)."""
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if (first_linear_in(cfg, in_channels, num_classes, mid) or 0) >= wanted:
            hi = mid
        else:
            lo = mid + 1
    return lo if first_linear_in(cfg, in_channels, num_classes, lo) == wanted else None


def check_shapes(model: nn.Module, shapes: dict, what: str, model_name: str, names: dict | None = None) -> None:
    """Every state_dict entry of `model` must be in `shapes` with the same shape, and nothing more; the
    TicketError names the first layer that differs (`names`: our key -> the file's key, for messages)."""
    names = names or {}

    def called(key: str) -> str:
        layer = key.rpartition(".")[0]
        return f"layer {layer}" + (f" (the checkpoint's {names[key].rpartition('.')[0]})" if key in names else "")

    ours = _shapes(model)
    for key, shape in ours.items():
        if key not in shapes:
            raise TicketError(f"{what} has no {key.rpartition('.')[2]} for {called(key)} of model {model_name}: "
                              f"it is not a {model_name} checkpoint (another architecture?)")
        if tuple(shapes[key]) != shape:
            raise TicketError(f"{what}: {called(key)}: its {key.rpartition('.')[2]} has shape {tuple(shapes[key])}, "
                              f"model {model_name} needs {shape} (another architecture, width or input size?)")
    extra = [key for key in shapes if key not in ours]
    if extra:
        raise TicketError(f"{what} holds {names.get(extra[0], extra[0])}, which model {model_name} does not have "
                          f"({len(extra)} such entries): a checkpoint of another architecture?")


def ticket_from_model(model: nn.Module, cfg: Config | dict, geometry: tuple, attrs: dict,
                      kept: dict | None = None) -> Ticket:
    """The ticket of a BIPROP model (its current masks, signs, alphas and other state)."""
    cfg = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    return Ticket(cfg, *geometry, records(model, kept), other_tensors(model), ticket_attrs(attrs))


def ticket_attrs(attrs: dict) -> dict:
    """A ticket's provenance attributes: `attrs` plus creation time and versions."""
    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "biprop_hpc_version": biprop_hpc.__version__, "torch_version": torch.__version__, **attrs}


def ticket_from_checkpoint(path: str | Path) -> tuple[Ticket, nn.Module]:
    """The ticket of a biprop-hpc checkpoint (and the checkpoint's model, BIPROP layers and all), with the
    input geometry read from the checkpoint's shapes, so that no dataset has to be read."""
    path = Path(path)
    if path.is_file() and h5py.is_hdf5(path):
        raise TicketError(f"{path} is an HDF5 file (a ticket or a run archive), not a checkpoint: export a run's "
                          "checkpoints/best.pt, or convert a ticket with `biprop export --ticket TICKET --format "
                          "torch|onnx`")
    try:
        checkpoint = load_checkpoint(path)
    except ValueError as error:
        if _is_original(path):
            raise TicketError(f"{path} is a checkpoint of the original biprop code: make a ticket of it with "
                              "`biprop import-original CKPT --out TICKET`") from None
        raise TicketError(str(error)) from None
    cfg = Config.from_dict(checkpoint["config"], origin=str(path))
    if cfg.layer_type != "biprop":
        raise TicketError(f"{path} is a dense run (layer_type {cfg.layer_type}): it has no ticket to export; "
                          "export a BIPROP run's checkpoint")
    state = checkpoint["model"]
    default = DATASET_IMAGE_SIZE.get(cfg.dataset, cfg.crop_size)
    geometry = solve_geometry(cfg, {k: tuple(v.shape) for k, v in state.items()}, default, str(path))
    model = build(cfg, *geometry, device="meta").to_empty(device="cpu")   # no random init: all of it is loaded
    model.load_state_dict(state)
    # global pruning: each layer's own kept count, from the scores and the schedule of the checkpoint's epoch
    set_run_pruning(model, cfg, trained_epoch(checkpoint.get("state", {})))
    ticket = ticket_from_model(model, cfg, geometry, {"source": "biprop-hpc checkpoint", "source_file": path.name,
                                                      "source_bytes": path.stat().st_size})
    return ticket, model


def _is_original(path: Path) -> bool:
    from biprop_hpc.ticket.original import is_original_checkpoint
    try:
        return is_original_checkpoint(torch.load(path, map_location="cpu", weights_only=False))
    except Exception:
        return False


def export_ticket(checkpoint: str | Path, out: str | Path) -> dict:
    """Write the ticket of a checkpoint; returns its sizes (see `sizes`)."""
    ticket, _ = ticket_from_checkpoint(checkpoint)
    write_ticket(out, ticket)
    return sizes(out, ticket)


def sizes(path: str | Path, ticket: Ticket) -> dict:
    """How big the ticket is: bits per BIPROP weight, and the ratios of the checkpoint and of the fp32
    weights (4 bytes per conv/linear weight, BIPROP and dense) to the ticket file."""
    size = Path(path).stat().st_size
    weights = ticket.biprop_weights
    dense = sum(v.numel() for k, v in ticket.tensors.items() if k.endswith("weight") and v.dim() in (2, 4))
    result = {"ticket": str(path), "ticket_bytes": size, "biprop_weights": weights, "kept_weights": ticket.kept_weights,
              "bits_per_weight": 8 * size / weights if weights else float("nan"),
              "bits_per_weight_masks_and_signs": 8 * ticket.bit_bytes() / weights if weights else float("nan"),
              "fp32_weight_bytes": 4 * (weights + dense), "ratio_to_fp32_weights": 4 * (weights + dense) / size}
    if ticket.attrs.get("source_bytes"):
        result["source_bytes"] = int(ticket.attrs["source_bytes"])
        result["ratio_to_source"] = int(ticket.attrs["source_bytes"]) / size
    return result


# --------------------------------------------------------------------------------- ticket -> network

def module_from_ticket(ticket: Ticket, device="cpu") -> nn.Module:
    """The ticket's network with plain layers holding W_eff, on `device`, in eval mode, nothing trainable."""
    model = build(ticket.config, ticket.in_channels, ticket.num_classes, ticket.image_size, "meta")
    _replace(model, lambda name, layer: None)
    state = ticket.state_dict()
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise TicketError(f"the ticket does not fit model {ticket.config['model']}: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, value in state.items():
        if tuple(value.shape) != tuple(model.state_dict()[key].shape):
            raise TicketError(f"the ticket's {key} has shape {tuple(value.shape)}, model "
                              f"{ticket.config['model']} has {tuple(model.state_dict()[key].shape)}")
    model = model.to_empty(device=device)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def load(path: str | Path, device="cpu") -> nn.Module:
    """The network of a ticket file, rebuilt from the ticket alone: its architecture (the ticket's config),
    every BIPROP layer a plain bias-free nn.Conv2d / nn.Linear with weight W_eff in {-alpha, 0, +alpha}
    (float32), BN with its statistics and everything else as the config builds it; in eval mode, nothing
    trainable. Module names are the original model's, so `load(path).state_dict()` is exactly what
    `biprop export --format torch` writes."""
    return module_from_ticket(read(path), device)
