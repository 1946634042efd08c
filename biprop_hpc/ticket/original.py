"""Checkpoints of the original BIPROP code (LLNL biprop, `main.py`): read them, map them onto our models, and
turn them into tickets that compute the same function as the original model.

The original's checkpoint is a `torch.save` of a dict with `arch`, `state_dict`, `prune_rate` (the fraction of
weights KEPT), `conv_type`, ... (or a bare state_dict). What the import reproduces, as the original computed it
(utils/conv_type.py, `GetQuantnet_binary`):
- the mask keeps the weights ranked at or above index j = int((1 - k) * n) of an ascending sort of |scores|,
  i.e. n - int((1 - k) * n) of them, with `int` of a FLOAT product (k = 0.9 and n = 5120 keep 4609, where our
  own rule keeps 4608); ties in |scores| (which the original's unstable sort leaves to the device) go to the
  higher flat index, as a stable ascending sort ranks them;
- alpha = sum(|W| * M) / int(k * n), in float32 (the denominator can differ from the kept count);
- W_eff = sign(W) * alpha * M.
Global pruning (conv_type GlobalSubnetConv; "A Winning Hand"): the original recomputes, before every forward, one
threshold T over the |scores| of all layers from the checkpoint's prune_rate k (trainers/default.py,
global_prune_threshold: z = ascending sort of all |S|, T = z[int((1 - k) N) - 1]); each layer keeps |S| > T
strictly and alpha = sum(|W| * M) / (its kept count) (utils/conv_type.py, GetGlobalSubnet). The import computes
the same (the threshold by selection) and records each layer's own kept count. The prune_rate main.py saves is
the schedule's value at that epoch, so a checkpoint saved during the decay imports at that kept fraction.
Names (see the docstrings of biprop_hpc/models/*.py): `module.` prefixes (DataParallel) are dropped; in the
Conv/VGG nets the original's `convs.i` is our `i` and its `linear.j` our `len(convs) + 1 + j`; in the ResNets
its `conv1`, `bn1` are our `0`, `1`, its `layer{s}.{b}` our residual blocks in order (`downsample.*` is our
`shortcut.*`), its `fc` our last layer. The original's FC layers are 1x1 convs (weights `[out, in, 1, 1]`), ours
nn.Linear (`[out, in]`); its FC BatchNorm2d over a 1x1 map is our BatchNorm1d (the same entries).
Its sign activation is torch.sign (0 at exactly 0); ours maps 0 to +1: the two differ only on inputs that are
exactly 0.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from biprop_hpc.config import Config, ConfigError
from biprop_hpc.nn import BipropMixin, topk_mask
from biprop_hpc.nn.layers import kth_largest
from biprop_hpc.ticket.export import build, check_shapes, solve_geometry, ticket_attrs
from biprop_hpc.ticket.file import LayerRecord, Ticket, TicketError

log = logging.getLogger("biprop_hpc")

# The original's architecture names (models/__init__.py) -> our models. The original's Wide nets are ours at
# width_mult 2 of the plain net (our `_wide` doubles); widths are read from the checkpoint's shapes anyway.
ORIGINAL_ARCHS = {
    **{f"Conv{d}": f"conv{d}" for d in (2, 4, 6, 8)},
    **{f"Conv{d}_BinAct": f"conv{d}_bin" for d in (2, 4, 6, 8)},
    **{f"Conv{d}Wide": f"conv{d}_wide" for d in (4, 6, 8)},
    **{f"Conv{d}Wide_BinAct": f"conv{d}_bin_wide" for d in (4, 6, 8)},
    "VGG_Small": "vgg_small", "Wide_VGG_Small": "vgg_small_bin",
    "cResNet18": "resnet18_cifar", "cResNet18_BinAct": "resnet18_cifar_bin",
    "ResNet18": "resnet18", "ResNet34": "resnet34", "ResNet50": "resnet50", "WideResNet50_2": "wide_resnet50_2",
    "WideResNet34_2_BinAct": "wide_resnet34_2_bin",
}
SUPPORTED = sorted(set(ORIGINAL_ARCHS.values()))
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50", "wide_resnet50_2", "wide_resnet34_2_bin")
BIPROP_CONV_TYPES = ("SubnetConv", "GlobalSubnetConv")


def original_kept(numel: int, keep_ratio: float) -> int:
    """The original's kept count: n - int((1 - k) * n), with a float product."""
    return numel - int((1 - keep_ratio) * numel)


def original_mask(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The original's mask (GetQuantnet_binary): 1 from index int((1 - k) n) of the ascending sort of |S| on,
    as a stable sort ranks ties (to the higher flat index). Found by selection, not by sorting: the largest
    n - int((1 - k) n) of |S| with ties to the lower index, over the flat tensor reversed."""
    flat = scores.detach().abs().flatten()
    return topk_mask(flat.flip(0), original_kept(flat.numel(), keep_ratio)).flip(0).view_as(scores)


def original_alpha(weight: torch.Tensor, mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The original's alpha: sum(|W| * M) / int(k * n), in W's dtype."""
    denominator = int(keep_ratio * weight.numel())
    if denominator < 1:
        raise TicketError(f"keep ratio {keep_ratio} keeps int(k * n) = 0 of {weight.numel()} weights: the "
                          "original's alpha is 0/0 (NaN) there")
    return torch.sum(weight.abs() * mask.to(weight.dtype)) / denominator


def original_global_threshold(scores: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
    """The original's global pruning threshold (trainers/default.py, global_prune_threshold, run before every
    forward, evaluation included): with z the ascending sort of the |S| of all layers together and
    p = int((1 - k) * N), T = z[p - 1] (z[-1], the largest, when p = 0). Found by selection, not by a sort."""
    flat = torch.cat([s.detach().abs().flatten() for s in scores])
    position = int((1 - keep_ratio) * flat.numel())
    return kth_largest(flat, flat.numel() - position + 1 if position else 1)


def original_global_effective_weight(weight: torch.Tensor, scores: torch.Tensor, threshold: torch.Tensor,
                                     name: str) -> tuple[torch.Tensor, int]:
    """(W_eff, kept count) of one GlobalSubnetConv (GetGlobalSubnet): M = |S| > T (strictly), alpha =
    sum(|W| * M) / sum(M)."""
    mask = scores.detach().abs() > threshold.to(scores.dtype)
    kept = int(mask.sum())
    if kept == 0:
        raise TicketError(f"layer {name} keeps no weight under the global threshold {float(threshold):g}: the "
                          "original's alpha is 0/0 (NaN) there, so its outputs are NaN; nothing to import")
    alpha = torch.sum(weight.abs() * mask.to(weight.dtype)) / kept
    return torch.sign(weight) * (alpha * mask.to(weight.dtype)), kept


def original_effective_weight(weight: torch.Tensor, scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    mask = original_mask(scores, keep_ratio)
    return torch.sign(weight) * (original_alpha(weight, mask, keep_ratio) * mask.to(weight.dtype))


# --------------------------------------------------------------------------------- reading

def read_original(path: str | Path) -> tuple[dict, dict]:
    """(state_dict without `module.` prefixes, the checkpoint's other entries) of an original checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise TicketError(f"{path} is not a readable torch checkpoint ({type(error).__name__}: {error})") from None
    return original_state(raw, path)


def original_state(raw, path) -> tuple[dict, dict]:
    """(state_dict without `module.` prefixes, other entries) of a loaded original checkpoint."""
    if isinstance(raw, dict) and "format_version" in raw and "model" in raw:
        raise TicketError(f"{path} is a biprop-hpc checkpoint, not one of the original code: export it with "
                          "`biprop export --checkpoint PATH --out TICKET`")
    if not is_original_checkpoint(raw):
        raise TicketError(f"{path} is not a checkpoint of the original biprop code (no `state_dict`)")
    if isinstance(raw.get("state_dict"), dict):
        state, meta = raw["state_dict"], {k: v for k, v in raw.items() if k not in ("state_dict", "optimizer")}
    else:
        state, meta = raw, {}
    return {_strip(key): value for key, value in state.items()}, meta


def _strip(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def our_model_name(requested: str | None, arch: str | None) -> str:
    """Our model for `requested` (ours or the original's name) and the checkpoint's `arch`; they must agree."""
    if requested is None and arch is None:
        raise ConfigError("the checkpoint does not say its architecture: give --model NAME (one of "
                          f"{', '.join(SUPPORTED)})")
    from_arch = None
    if arch is not None:
        from_arch = ORIGINAL_ARCHS.get(arch)
        if from_arch is None and requested is None:
            raise TicketError(f"the checkpoint's architecture {arch!r} has no counterpart here; supported: "
                              f"{', '.join(sorted(ORIGINAL_ARCHS))} (ours: {', '.join(SUPPORTED)})")
    if requested is None:
        return from_arch
    name = ORIGINAL_ARCHS.get(requested, requested)
    if name not in SUPPORTED:
        raise ConfigError(f"--model {requested}: the original code has no counterpart of it that can be imported; "
                          f"supported: {', '.join(SUPPORTED)} (or the original's names: "
                          f"{', '.join(sorted(ORIGINAL_ARCHS))})")
    if from_arch is not None and from_arch != name:
        raise TicketError(f"the checkpoint holds the original's {arch} (our {from_arch}), not {requested}: a "
                          "checkpoint of another architecture; give --model " + from_arch)
    if arch is not None and from_arch is None:
        log.warning("the checkpoint's architecture %r is not one the importer knows; reading it as %s", arch, name)
    return name


# --------------------------------------------------------------------------------- names

def _blocks(model: nn.Module) -> list[str]:
    return [name for name, child in model.named_children() if hasattr(child, "conv1") and hasattr(child, "shortcut")]


def name_map(keys, model: nn.Module, strict: bool = True) -> dict:
    """Original state_dict key -> our key, for a model of ours (any width, any device); TicketError naming
    the first key that maps nowhere (with strict=False such keys are left out)."""
    children = list(model.named_children())
    flatten = next((i for i, (_, child) in enumerate(children) if isinstance(child, nn.Flatten)), None)
    blocks = _blocks(model)
    pairs = sorted({(int(m[1]), int(m[2])) for k in keys if (m := re.match(r"layer(\d+)\.(\d+)\.", k))})
    if strict and blocks and pairs and len(pairs) != len(blocks):
        raise TicketError(f"the checkpoint has {len(pairs)} residual blocks, our model has {len(blocks)}: a "
                          "checkpoint of another depth or architecture")
    block_of = dict(zip(pairs, blocks))
    out = {}
    for key in keys:
        if (m := re.match(r"convs\.(\d+)\.(.+)$", key)) and flatten is not None and not blocks:
            out[key] = f"{int(m[1])}.{m[2]}"
        elif (m := re.match(r"linear\.(\d+)\.(.+)$", key)) and flatten is not None and not blocks:
            out[key] = f"{flatten + 1 + int(m[1])}.{m[2]}"
        elif (m := re.match(r"layer(\d+)\.(\d+)\.(.+)$", key)) and blocks:
            rest = re.sub(r"^downsample\.", "shortcut.", m[3])
            if (int(m[1]), int(m[2])) in block_of:
                out[key] = f"{block_of[(int(m[1]), int(m[2]))]}.{rest}"
            elif strict:
                raise TicketError(f"the checkpoint's {key} maps onto no residual block of our model")
        elif (m := re.match(r"(conv1|bn1|fc)\.(.+)$", key)) and blocks:
            index = {"conv1": 0, "bn1": 1, "fc": len(children) - 1}[m[1]]
            out[key] = f"{children[index][0]}.{m[2]}"
        elif strict:
            raise TicketError(f"the checkpoint's {key} maps onto no layer of our model: a checkpoint of another "
                              "architecture?")
    return out


def translate(state: dict, model: nn.Module, strict: bool = True) -> dict:
    """The original's state_dict under our names, with 1x1-conv FC weights reshaped to nn.Linear's [out, in]
    (strict=False: entries that map nowhere are left out)."""
    names = name_map(list(state), model, strict)
    modules = dict(model.named_modules())
    out = {}
    for key, value in state.items():
        if key not in names:
            continue
        ours = names[key]
        owner = modules.get(ours.rpartition(".")[0])
        if isinstance(owner, nn.Linear) and value.dim() == 4:
            if tuple(value.shape[2:]) != (1, 1):
                raise TicketError(f"the checkpoint's {key} has shape {tuple(value.shape)}; our layer "
                                  f"{ours.rpartition('.')[0]} is fully connected and needs [out, in, 1, 1]")
            value = value.reshape(value.shape[0], value.shape[1])
        out[ours] = value
    return out


# --------------------------------------------------------------------------------- import

def _layer_flags(state: dict, probe: nn.Module) -> dict:
    """Config choices that the checkpoint's entries decide: BN affine, dense first / last layer."""
    modules = dict(probe.named_modules())
    weighted = [name for name, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    affine = any(isinstance(modules.get(k.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)
                 and k.endswith((".weight", ".bias")) for k in state)
    flags = {"learn_batchnorm": affine}
    for position, name in (("first_layer", weighted[0]), ("last_layer", weighted[-1])):
        if f"{name}.weight" in state and f"{name}.scores" not in state:
            if f"{name}.bias" in state:
                raise TicketError(f"the checkpoint's {position.replace('_', ' ')} ({name}) is a dense conv with a "
                                  "bias (the original's last_layer_dense); our layers are bias-free, so it cannot be "
                                  "imported")
            flags[position] = "frozen"
    return flags


def import_original(path: str | Path, model: str | None = None, *, keep_ratio: float | None = None,
                    in_channels: int | None = None, image_size: int | None = None, num_classes: int | None = None,
                    width_mult: float | None = None, dataset: str | None = None, data: str = "") -> Ticket:
    """The ticket of an original checkpoint: the same function as the original model (see the module doc)."""
    path = Path(path)
    state, meta = read_original(path)
    conv_type = meta.get("conv_type")
    if conv_type is not None and conv_type not in BIPROP_CONV_TYPES:
        raise TicketError(f"{path}: conv_type {conv_type!r}; only BIPROP checkpoints ({', '.join(BIPROP_CONV_TYPES)}: "
                          "a per-layer top-k mask or one global threshold) can be imported")
    name = our_model_name(model, meta.get("arch"))
    k = keep_ratio if keep_ratio is not None else meta.get("prune_rate")
    if k is None:
        raise ConfigError(f"{path} does not say its keep ratio (the original's prune_rate): give --keep-ratio K")
    k = float(k)
    if not 0.0 < k <= 1.0:
        raise ConfigError(f"keep ratio {k} must be in (0, 1] (the fraction of weights KEPT, the original's "
                          "prune_rate); give --keep-ratio K")
    if keep_ratio is not None and meta.get("prune_rate") not in (None, keep_ratio):
        log.warning("%s says prune_rate %s; using --keep-ratio %s", path, meta.get("prune_rate"), keep_ratio)
    imagenet = name in IMAGENET_MODELS
    dataset = dataset or ("imagenet" if imagenet else "cifar10")
    base = {"model": name, "keep_ratio": k, "dataset": dataset, "data": data or "", "config_name": f"original-{name}",
            "name": path.stem, "weight_init": "kn",
            "pruning": "global" if conv_type == "GlobalSubnetConv" else "layerwise",
            "prune_rate_epoch": 0}  # the saved prune_rate is the fraction the checkpoint keeps: no schedule
    probe = build(Config.from_dict(base), 3, 10, 224 if imagenet else 32, "meta")
    ours = translate(state, probe)
    base.update(_layer_flags(ours, probe))
    if width_mult is None:
        first = next(n for n, m in probe.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
        width_mult = ours[f"{first}.weight"].shape[0] / dict(probe.named_modules())[first].out_channels
    cfg = Config.from_dict({**base, "width_mult": width_mult}, origin=str(path))
    shapes = {key: tuple(value.shape) for key, value in ours.items()}
    names = {our: theirs for theirs, our in name_map(list(state), probe).items()}
    default_size = image_size or (224 if imagenet else 32)
    geometry = solve_geometry(cfg, shapes, default_size, str(path), names)
    given = (in_channels, num_classes, image_size)
    geometry = tuple(g if g is not None else s for g, s in zip(given, geometry))
    target = build(cfg, *geometry, device="meta")
    check_shapes(target, shapes, str(path), name, names)
    return _ticket(path, cfg, geometry, ours, target, k, meta)


def _ticket(path: Path, cfg: Config, geometry: tuple, ours: dict, target: nn.Module, k: float, meta: dict) -> Ticket:
    layers, biprop = [], set()
    threshold = None
    if cfg.pruning == "global":   # GlobalSubnetConv: one threshold over all layers' scores, from prune_rate
        threshold = original_global_threshold([ours[f"{name}.scores"].float() for name, layer in
                                               target.named_modules() if isinstance(layer, BipropMixin)], k)
    for name, layer in target.named_modules():
        if not isinstance(layer, BipropMixin):
            continue
        weight, scores = ours[f"{name}.weight"].float(), ours[f"{name}.scores"].float()
        conv = {}
        if isinstance(layer, nn.Conv2d):
            conv = {"stride": tuple(layer.stride), "padding": tuple(layer.padding),
                    "dilation": tuple(layer.dilation), "groups": layer.groups}
        if threshold is None:
            effective, kept = original_effective_weight(weight, scores, k), original_kept(weight.numel(), k)
        else:
            effective, kept = original_global_effective_weight(weight, scores, threshold, name)
        layers.append(LayerRecord.from_effective_weight(name, effective + 0.0, kept, **conv))
        biprop |= {f"{name}.weight", f"{name}.scores"}
    tensors = {key: value.detach().clone() for key, value in ours.items() if key not in biprop}
    attrs = ticket_attrs({"source": "original biprop checkpoint", "source_file": path.name,
                          "source_bytes": path.stat().st_size, "original_arch": str(meta.get("arch", "")),
                          "original_prune_rate": k, "original_conv_type": str(meta.get("conv_type", ""))})
    return Ticket(cfg.to_dict(), *geometry, layers, tensors, attrs)


def is_original_checkpoint(raw) -> bool:
    """A dict with a `state_dict` (what the original's main.py saves), or a bare state_dict of tensors."""
    if not isinstance(raw, dict) or "format_version" in raw or not raw:
        return False
    return isinstance(raw.get("state_dict"), dict) or all(isinstance(v, torch.Tensor) for v in raw.values())

