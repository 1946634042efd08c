"""Build (once) and load the project's C++ kernels as torch operator libraries (`torch.ops.<name>`).

Each `CppExtension` is compiled with torch.utils.cpp_extension into `<cache>/torch-extensions/<build name>/`,
where `<cache>` is $BIPROP_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/biprop-hpc) and the build name carries a
hash of the sources, the compiler flags and the torch version: a changed source or torch builds a new copy, an
unchanged one is only loaded. `env/install.sh` builds them; otherwise the first use does (about half a minute,
no network). Without ninja (which cpp_extension.load needs) the same compiler command is run directly (set
BIPROP_EXTENSION_BUILD=direct to choose that way). Binaries are compiled for the baseline x86-64; functions
that use newer instructions carry their own target attributes and are chosen at run time.

The extensions (sources next to the code that uses them):
- biprop_packed (biprop_hpc/packed/csrc/packed.cpp): packed binary inference.
- biprop_masks (biprop_hpc/nn/csrc/masks.cpp): the BIPROP layers' effective weight and score gradient on CPU.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sysconfig
import threading
from pathlib import Path

import torch

# -fopenmp: at::parallel_for is inline OpenMP code, serial unless the extension is compiled with it; it links
# libgomp.so.1, the soname of the copy torch ships and has loaded already, so one OpenMP runtime serves both.
CFLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]
PACKAGE = Path(__file__).parent


def cache_dir() -> Path:
    root = os.environ.get("BIPROP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "biprop-hpc")
    return Path(root) / "torch-extensions"


class CppExtension:
    """One torch operator library `name` built from `sources`; `ops()` loads it (building it if needed)."""

    def __init__(self, name: str, sources: list[Path]):
        self.name = name
        self.sources = sources
        self._lock = threading.Lock()
        self._loaded = False
        self._failure: str | None = None

    def build_name(self) -> str:
        digest = hashlib.sha256()
        for source in self.sources:
            digest.update(source.read_bytes())
        digest.update(" ".join(CFLAGS).encode())
        digest.update(torch.__version__.encode())
        return f"{self.name}_{digest.hexdigest()[:16]}"

    def library_path(self) -> Path:
        name = self.build_name()
        return cache_dir() / name / f"{name}.so"

    def load(self, verbose: bool = False):
        """Build if needed and load the library; returns its torch.ops namespace."""
        with self._lock:
            if not self._loaded:
                library = self.library_path()
                if not library.is_file():       # not built yet by install.sh or an earlier use
                    logging.getLogger(__name__).info("building the %s kernels into %s (once per source and "
                                                     "torch version)", self.name, library.parent)
                    library.parent.mkdir(parents=True, exist_ok=True)
                    self._build(library, verbose)
                torch.ops.load_library(str(library))
                self._loaded = True
        return getattr(torch.ops, self.name)

    def ops(self):
        return getattr(torch.ops, self.name) if self._loaded else self.load()

    def ops_if_available(self):
        """The ops, or None where the library cannot be built here (tried once; the reason is logged once)."""
        if self._loaded:
            return getattr(torch.ops, self.name)
        if self._failure is None:
            try:
                return self.load()
            except Exception as error:    # no compiler, no headers, ...: the caller has a torch fallback
                self._failure = str(error)
                logging.getLogger(__name__).warning(
                    "%s kernels unavailable, using the slower torch code instead: %s", self.name, error)
        return None

    def _build(self, library: Path, verbose: bool) -> None:
        from torch.utils import cpp_extension
        if os.environ.get("BIPROP_EXTENSION_BUILD") == "direct" or not cpp_extension.is_ninja_available():
            self._build_direct(library, verbose)
        else:
            cpp_extension.load(name=library.stem, sources=[str(s) for s in self.sources], extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], build_directory=str(library.parent),
                               is_python_module=False, verbose=verbose)

    def _build_direct(self, library: Path, verbose: bool) -> None:
        """Compile and link with the C++ compiler directly (no ninja), with cpp_extension's paths and flags."""
        from torch.utils import cpp_extension
        with open(library.parent / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if library.is_file():
                return
            abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
            includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
            libs = cpp_extension.library_paths()
            command = [os.environ.get("CXX", "c++"), "-shared", "-fPIC", "-std=c++20", *CFLAGS,
                       f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={library.stem}", *includes,
                       *[str(s) for s in self.sources], *[f"-L{p}" for p in libs], *[f"-Wl,-rpath,{p}" for p in libs],
                       "-lc10", "-ltorch_cpu", "-ltorch", "-o", str(library) + ".tmp"]
            if verbose:
                print(" ".join(command), flush=True)
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"building {self.name} failed:\n{' '.join(command)}\n{done.stderr[-4000:]}")
            os.replace(str(library) + ".tmp", library)


PACKED = CppExtension("biprop_packed", [PACKAGE / "packed" / "csrc" / "packed.cpp"])
MASKS = CppExtension("biprop_masks", [PACKAGE / "nn" / "csrc" / "masks.cpp"])
