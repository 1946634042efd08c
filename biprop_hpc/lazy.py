"""A package's public names imported on first use (PEP 562 module __getattr__), so that importing one of its
modules for the command line (`biprop --help`, shell completion) does not import torch or h5py."""
from __future__ import annotations

import importlib


def lazy_names(package: str, sources: dict[str, str]):
    """The `__getattr__` of `package`, whose public names `sources` maps to the submodules defining them."""
    def __getattr__(name: str):
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{sources[name]}"), name)
    return __getattr__
