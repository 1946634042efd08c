"""Build (once) and load the C++ kernels of the packed engine (csrc/packed.cpp) as `torch.ops.biprop_packed`.

Built with torch.utils.cpp_extension into `<cache>/torch-extensions/<name>/`, where `<cache>` is $BIPROP_CACHE
(default ${XDG_CACHE_HOME:-~/.cache}/biprop-hpc) and `<name>` carries a hash of the sources, the compiler flags
and the torch version: a changed source or torch builds a new copy, an unchanged one is only loaded.
`env/install.sh` builds it; otherwise the first use does (about half a minute, no network). Without ninja
(which cpp_extension.load needs) the same compiler command is run directly (set BIPROP_PACKED_BUILD=direct to
choose that way). The binary holds every CPU path (AVX-512 VPOPCNTDQ, AVX2, portable): it is compiled for the
baseline x86-64 and the vector functions carry their own target attributes, so one build runs on any x86-64
CPU and picks its path at run time.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sysconfig
import threading
from pathlib import Path

import torch

SOURCES = [Path(__file__).parent / "csrc" / "packed.cpp"]
CFLAGS = ["-O3", "-fno-math-errno"]
_lock = threading.Lock()
_loaded = False


def cache_dir() -> Path:
    root = os.environ.get("BIPROP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "biprop-hpc")
    return Path(root) / "torch-extensions"


def build_name() -> str:
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"biprop_packed_{digest.hexdigest()[:16]}"


def _build_direct(name: str, directory: Path, verbose: bool) -> Path:
    """Compile and link with the C++ compiler directly (no ninja), with cpp_extension's paths and flags."""
    from torch.utils import cpp_extension
    library = directory / f"{name}.so"
    with open(directory / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.is_file():
            return library
        abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
        includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
        libs = cpp_extension.library_paths()
        command = [os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-std=c++20", *CFLAGS,
                   f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={name}", *includes,
                   *[str(s) for s in SOURCES], *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
                   "-lc10", "-ltorch_cpu", "-ltorch", "-o", str(library) + ".tmp"]
        if verbose:
            print(" ".join(command), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"building the packed kernels failed:\n{' '.join(command)}\n{done.stderr[-4000:]}")
        os.replace(str(library) + ".tmp", library)
    return library


def load(verbose: bool = False):
    """Build if needed and load the extension; returns torch.ops.biprop_packed."""
    global _loaded
    with _lock:
        if not _loaded:
            name = build_name()
            directory = cache_dir() / name
            built = directory / f"{name}.so"
            if built.is_file():                 # built before (by install.sh or a first use): just load it
                torch.ops.load_library(str(built))
                _loaded = True
                return torch.ops.biprop_packed
            directory.mkdir(parents=True, exist_ok=True)
            from torch.utils import cpp_extension
            direct = os.environ.get("BIPROP_PACKED_BUILD") == "direct" or not cpp_extension.is_ninja_available()
            if direct:
                torch.ops.load_library(str(_build_direct(name, directory, verbose)))
            else:
                cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                                   build_directory=str(directory), is_python_module=False, verbose=verbose)
            _loaded = True
    return torch.ops.biprop_packed


def ops():
    return torch.ops.biprop_packed if _loaded else load()
