"""Packed binary inference for MPT-1/1 tickets: +-1 activations as bits, ternary weights as mask + sign bits,
conv/linear layers as XOR/AND-popcount integer arithmetic (C++ kernels: csrc/packed.cpp).

    from biprop_hpc import ticket
    from biprop_hpc.packed import pack_model
    network = pack_model(ticket.load("best.ticket.h5"))      # an nn.Module: images -> logits
    logits = network(images)

- `pack_model(model, example_input=None)`: a ticket's network (eval mode, ternary weights) -> PackedNetwork.
- `cpu_path()`, `set_cpu_path(name)`, `supported_cpu_paths()`, `forced_cpu_path(name)`: the kernel path
  ("avx512": AVX-512 VPOPCNTDQ, "avx2", "scalar": portable), chosen at run time from the CPU's features;
  BIPROP_PACKED_CPU=avx2 (say) forces one for a whole process.
- `load_extension()`: build (once, cached; biprop_hpc.extensions) and load the C++ kernels; the first call of
  anything above does it.
"""
from __future__ import annotations

import contextlib

from biprop_hpc.lazy import lazy_names

# Imported on first use: the command line imports packed.infer without torch.
__getattr__ = lazy_names(__name__, {**dict.fromkeys(("PackedNetwork", "binary_inputs", "dense_ternary", "model_bytes",
                                                     "pack_model"), "convert"),
                                    **dict.fromkeys(("PackedBits", "PackedConv", "pack_sign"), "layers")})


def cpu_path() -> str:
    """The kernel path in use: 'avx512', 'avx2' or 'scalar'."""
    from biprop_hpc.extensions import PACKED
    return PACKED.ops().get_cpu_path()


def set_cpu_path(name: str) -> str:
    """Use kernel path `name` ('auto' = the best this CPU supports); returns the previous one. Raises if
    this CPU cannot run it."""
    from biprop_hpc.extensions import PACKED
    return PACKED.ops().set_cpu_path(name)


def supported_cpu_paths() -> list[str]:
    """The kernel paths this CPU can run, best first."""
    from biprop_hpc.extensions import PACKED
    return list(PACKED.ops().supported_cpu_paths())


def load_extension(verbose: bool = False):
    from biprop_hpc.extensions import PACKED
    return PACKED.load(verbose)


@contextlib.contextmanager
def forced_cpu_path(name: str):
    previous = set_cpu_path(name)
    try:
        yield
    finally:
        set_cpu_path(previous)


__all__ = ["PackedBits", "PackedConv", "PackedNetwork", "binary_inputs", "cpu_path", "dense_ternary",
           "forced_cpu_path", "load_extension", "model_bytes", "pack_model", "pack_sign", "set_cpu_path",
           "supported_cpu_paths"]
