"""From a ticket (an eval-mode network with ternary conv/linear weights) to a packed binary network.

Which layers are packed is decided from the structure, in module order: a conv/linear is packed when its
input is exactly +-1, i.e. it follows a BinaryActivation, possibly through max-pools (the max of +-1 values
is +-1), nn.Flatten, Identity/Dropout, or a binary BasicBlock (whose output is its last sign activation),
and its weight is ternary. Everything else stays a float computation, as in the model: the first layer on
pixels, a classifier after a ReLU or an average pool, BN and activations that do not end in a sign.
`pack_model(model, example_input=x)` also checks this against the float model: every packed layer must see
only +-1 values there for `x`.

Models: the zoo's nn.Sequential models (conv2..8_bin[_wide], vgg_small_bin, resnet18_cifar_bin,
wide_resnet34_2_bin, and their MPT-1/32 versions, which have nothing to pack). Inside a binary BasicBlock,
conv1 -> BN -> sign becomes one packed layer with a sign epilogue; conv2 -> BN -> (+ identity) -> sign too,
the block input's bit choosing between two thresholds; with a 1x1 conv shortcut, conv2 and the shortcut conv
give float outputs and the BNs, the sum and the sign run as in the model.
"""
from __future__ import annotations

import torch
from torch import nn

from biprop_hpc.nn import BinaryActivation
from biprop_hpc.packed.layers import (
    BitMaxPool,
    PackedBits,
    PackedConv,
    SignPack,
    TernaryFloat,
    ThresholdPack,
    and_directions,
    effective_weight,
    pack_sign,
    ternary_parts,
)


class FloatStep(nn.Module):
    """A module of the float model, run as it is (a packed +-1 input is unpacked first)."""

    def __init__(self, module: nn.Module, name: str = ""):
        super().__init__()
        self.module, self.name = module, name

    def forward(self, x):
        if isinstance(x, PackedBits):
            x = x.unpack()
        return self.module(x)


class PackedBasicBlock(nn.Module):
    """biprop_hpc.models BasicBlock with sign activations, on packed input and output."""

    def __init__(self, block: nn.Module, name: str):
        super().__init__()
        self.conv1 = PackedConv(block.conv1, "bits", [block.bn1], name=f"{name}.conv1")
        if isinstance(block.shortcut, nn.Identity):
            self.conv2 = PackedConv(block.conv2, "bits", [block.bn2], residuals=(1.0, -1.0), name=f"{name}.conv2")
            self.shortcut = None
        else:
            shortcut_conv, shortcut_bn = block.shortcut
            self.conv2 = PackedConv(block.conv2, "float", name=f"{name}.conv2")
            self.bn2 = block.bn2
            self.shortcut = PackedConv(shortcut_conv, "float", name=f"{name}.shortcut.0")
            self.shortcut_bn = shortcut_bn

    def forward(self, x: PackedBits) -> PackedBits:
        h = self.conv1(x)
        if self.shortcut is None:
            return self.conv2(h, residual=x)
        return pack_sign(self.bn2(self.conv2(h)) + self.shortcut_bn(self.shortcut(x)))


class PackedNetwork(nn.Module):
    """The packed network: a sequence of steps on float tensors or PackedBits; returns float logits."""

    def __init__(self, steps: list[nn.Module], packed: list[str], floating: list[str]):
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.packed_layers, self.float_layers = packed, floating

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x.unpack() if isinstance(x, PackedBits) else x


def _elementwise(module: nn.Module) -> bool:
    """Modules that act per element and channel, monotone (what may sit between a conv and its sign)."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return not module.training and module.running_mean is not None
    return isinstance(module, (nn.Identity, nn.Dropout, nn.ReLU))


def _chain_to_sign(modules, start: int, allow_pool: bool):
    """The modules from `start` up to a BinaryActivation: (chain without the pool, pool, chain after the
    pool, index of the activation), or None if something else comes first."""
    before, after, pool = [], [], None
    for j in range(start, len(modules)):
        module = modules[j][1]
        if isinstance(module, BinaryActivation):
            return before + after, pool, after, j
        if isinstance(module, nn.MaxPool2d) and allow_pool and pool is None:
            pool = module
        elif _elementwise(module):
            (after if pool is not None else before).append(module)
        else:
            return None
    return None


def _is_binary_basic_block(module: nn.Module) -> bool:
    from biprop_hpc.models.resnet_cifar import BasicBlock
    if not isinstance(module, BasicBlock):
        return False
    if not (isinstance(module.act1, BinaryActivation) and isinstance(module.act2, BinaryActivation)):
        return False
    if not all(_elementwise(bn) for bn in (module.bn1, module.bn2)):
        return False
    shortcut = module.shortcut
    return isinstance(shortcut, nn.Identity) or (
        isinstance(shortcut, nn.Sequential) and len(shortcut) == 2 and isinstance(shortcut[0], nn.Conv2d)
        and _elementwise(shortcut[1]))


class _Converter:
    def __init__(self, model: nn.Sequential, pack_classifier: bool = False):
        self.modules = list(model.named_children())
        self.pack_classifier = pack_classifier
        self.steps: list[nn.Module] = []
        self.packed: list[str] = []
        self.floating: list[str] = []
        self.binary = False      # is the current value exactly +-1?
        self.flat = False        # is it [N, C] (after a linear or a flatten)?
        self.channels = None     # its channels, where known

    def run(self) -> PackedNetwork:
        i = 0
        while i < len(self.modules):
            i = self.step(i)
        return PackedNetwork(self.steps, self.packed, self.floating)

    def float_step(self, name: str, module: nn.Module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)) and getattr(module, "bias", None) is None \
                and ternary_parts(effective_weight(module)) is not None:
            self.steps.append(TernaryFloat(module, name))
        else:
            self.steps.append(FloatStep(module, name))
        for sub_name, sub in module.named_modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                self.floating.append(f"{name}.{sub_name}" if sub_name else name)
        self.binary = False
        if isinstance(module, nn.Conv2d):
            self.channels, self.flat = module.out_channels, False
        elif isinstance(module, nn.Linear):
            self.channels, self.flat = module.out_features, True
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self.channels = module.num_features
        elif isinstance(module, nn.Flatten):
            self.flat, self.channels = True, None
        elif hasattr(module, "conv2"):   # a residual block
            self.channels, self.flat = module.conv2.out_channels, False

    def step(self, i: int) -> int:
        name, module = self.modules[i]
        if isinstance(module, BinaryActivation):
            if not self.binary:
                self.steps.append(SignPack())
                self.binary = True
            return i + 1
        if not self.binary:
            if (_elementwise(module) or isinstance(module, nn.MaxPool2d)) and self.channels:
                done = self.threshold_pack(i)
                if done is not None:
                    return done
            self.float_step(name, module)
            return i + 1
        # the current value is +-1
        if isinstance(module, (nn.Identity, nn.Dropout)):
            return i + 1
        if isinstance(module, nn.Flatten):
            if self.flat:
                return i + 1
            nxt = self.modules[i + 1][1] if i + 1 < len(self.modules) else None
            if isinstance(nxt, nn.Linear) and self.channels and nxt.in_features % self.channels == 0:
                done = self.layer(i + 1, flatten_hw=nxt.in_features // self.channels)
                if done is not None:
                    return done
            self.float_step(name, module)
            return i + 1
        if isinstance(module, nn.MaxPool2d) and not self.flat and self.channels:
            try:
                self.steps.append(BitMaxPool(module, channels=self.channels))
            except ValueError:      # ceil_mode or return_indices: run it as the model does
                pass
            else:
                return i + 1
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            done = self.layer(i)
            if done is not None:
                return done
        if _is_binary_basic_block(module):
            try:
                self.steps.append(PackedBasicBlock(module, name))
            except ValueError:
                pass
            else:
                self.packed += [f"{name}.{n}" for n, m in module.named_modules()
                                if isinstance(m, (nn.Conv2d, nn.Linear))]
                self.channels, self.flat = module.conv2.out_channels, False
                return i + 1
        self.float_step(name, module)
        return i + 1

    def threshold_pack(self, i: int) -> int | None:
        """Float elementwise modules [with a max-pool] ending in a sign activation -> one thresholding pass."""
        found = _chain_to_sign(self.modules, i, allow_pool=not self.flat)
        if found is None:
            return None
        chain, pool, after_pool, end = found
        try:
            steps = [ThresholdPack(chain, self.channels)]
            if pool is not None:
                big = float(torch.finfo(torch.float32).max)
                steps.append(BitMaxPool(pool, and_directions(-big, big, self.channels, after_pool)))
        except ValueError:
            return None
        self.steps += steps
        self.binary = True
        return end + 1

    def layer(self, i: int, flatten_hw: int | None = None) -> int | None:
        """Pack the conv/linear at i (input +-1); returns the next index, or None if it cannot be packed."""
        name, module = self.modules[i]
        if isinstance(module, nn.Linear) and not self.flat and flatten_hw is None:
            return None
        found = _chain_to_sign(self.modules, i + 1, allow_pool=isinstance(module, nn.Conv2d))
        if found is None and i == len(self.modules) - 1 and not self.pack_classifier:
            return None   # the classifier: computed as the float model computes it (see pack_model)
        try:
            if found is None:
                layer = PackedConv(module, "float", flatten_hw=flatten_hw, name=name)
                self.steps.append(layer)
                self.binary, nxt = False, i + 1
            else:
                chain, pool, after_pool, end = found
                layer = PackedConv(module, "bits", chain, flatten_hw=flatten_hw, name=name)
                steps = [layer]
                if pool is not None:
                    extreme = layer.alpha * layer.fan_in
                    directions = and_directions(-extreme, extreme, layer.out_channels, after_pool)
                    steps.append(BitMaxPool(pool, directions))
                self.steps += steps
                self.binary, nxt = True, end + 1
        except ValueError:
            return None
        self.packed.append(name)
        self.channels = layer.out_channels
        self.flat = isinstance(module, nn.Linear)
        return nxt


@torch.no_grad()
def pack_model(model: nn.Module, example_input: torch.Tensor | None = None,
               pack_classifier: bool = False) -> PackedNetwork:
    """The packed binary network computing what `model` (a ticket: eval mode, ternary weights) computes.

    The model is put in eval mode; its float modules (first layer's BN, ...) are shared, not copied. With
    `example_input`, checks in the float model that every packed layer's input is +-1 (raises otherwise).

    The classifier (the model's last module), when its input is +-1 (Conv-N_bin), is by default computed as
    the float model computes it, on the unpacked +-1 input: its logits are alpha times integers, which tie
    often, and the float model breaks those ties by the rounding of its float sums; computing the same float
    operation gives the same logits bit for bit, hence the same predictions and top-5. It costs a
    [N, 256] x [256, classes] product. `pack_classifier=True` packs it too (exact integer logits times alpha).
    """
    if not isinstance(model, nn.Sequential):
        raise ValueError("pack_model expects an nn.Sequential model of the zoo (biprop_hpc.models)")
    model.eval()
    packed = _Converter(model, pack_classifier).run()
    if example_input is not None:
        inputs = binary_inputs(model, example_input)
        wrong = [name for name in packed.packed_layers if not inputs.get(name, False)]
        if wrong:
            raise ValueError(f"layers packed although their input is not +-1: {', '.join(wrong)}")
    return packed


@torch.no_grad()
def binary_inputs(model: nn.Module, example_input: torch.Tensor) -> dict[str, bool]:
    """{conv/linear name: is its input exactly +-1 in the float model for this input}."""
    seen: dict[str, bool] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, args, name=name):
                x = args[0]
                seen[name] = seen.get(name, True) and bool(torch.all((x == 1) | (x == -1)))
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def model_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer a module holds (each tensor once), plus the packed layers'
    cached padding tables."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    for sub in module.modules():
        for tables in getattr(sub, "_tables", {}).values():
            total += sum(t.numel() * t.element_size() for t in tables[:3])
    return total


@torch.no_grad()
def dense_ternary(model: nn.Module) -> nn.Module:
    """Replace every BIPROP layer of `model` (in place) by a plain bias-free nn.Conv2d / nn.Linear holding its
    W_eff, the form `biprop_hpc.ticket.load` returns; eval mode. (The same as biprop_hpc.ticket.dense_ternary,
    which is used instead where it exists.)"""
    try:
        from biprop_hpc.ticket import dense_ternary as ticket_dense_ternary
    except ImportError:
        ticket_dense_ternary = None
    if ticket_dense_ternary is not None:
        return ticket_dense_ternary(model)
    from biprop_hpc.nn import BipropConv2d, BipropLinear
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BipropConv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, child.dilation, child.groups, bias=False,
                                  padding_mode=child.padding_mode)
            elif isinstance(child, BipropLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False)
            else:
                continue
            plain.weight.requires_grad_(False)
            plain.weight.copy_(child.effective_weight())
            setattr(parent, child_name, plain)
    return model.eval()
