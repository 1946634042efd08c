#!/usr/bin/env bash
# Idempotent installer for biprop-hpc on a Debian-like machine with Python 3.11.
#
#   bash env/install.sh            # from anywhere; the repo root is found from this file's path
#
# Steps (each one prints what it does or why it is skipped):
#   1. system packages (root + apt-get only): Open MPI, Slurm, munge, Fashion-MNIST
#   2. the virtual environment, torch/torchvision, the package itself (editable, [dev,dali,onnx]), mpi4py
#   3. Horovod, built from the 0.28.1 sdist (patched for C++17/20) against the venv's torch,
#      cached as a wheel keyed by the Horovod AND torch versions, so a torch change rebuilds it
#   4. `horovodrun --check-build` and a one-line summary
#
# Options (environment variables):
#   BIPROP_WITH_HOROVOD=1|0   build/install Horovod (default 1)
#   BIPROP_VENV=DIR           virtual environment (default <repo>/.venv)
#   BIPROP_CACHE=DIR          cache for built wheels and build logs
#                             (default ${XDG_CACHE_HOME:-$HOME/.cache}/biprop-hpc)
#   BIPROP_WITH_TORCH=1|0     pip-install the pinned torch/torchvision into the venv (default 1);
#                             0 = use the torch the environment already has (site builds)
#   BIPROP_WITH_APT=1|0       install the Debian packages when root (default 1)
#   BIPROP_HOROVOD_NCCL=1|0   try NCCL GPU operations in the Horovod build when nvcc and torch's
#                             nvidia-nccl wheel are present (default 1; falls back to a build
#                             without NCCL if that fails)
#   BIPROP_BUILD_JOBS=N       parallel compile jobs for Horovod (default: nproc)
#   BIPROP_PYTHON=EXE         interpreter used to create the venv (default python3)
#   BIPROP_CHECK_BUILD=1      always run the full `horovodrun --check-build` (by default it runs
#                             when Horovod or torch changed in this run; else a quick equivalent)
set -Eeuo pipefail
trap 'printf "\nERROR: install.sh failed at line %s: %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------- pinned versions (edit here)
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
HOROVOD_VERSION=0.28.1
APT_PACKAGES=(dataset-fashion-mnist libopenmpi-dev openmpi-bin slurmctld slurmd slurm-client munge)
# Pure-Python packages Horovod needs to build with --no-build-isolation and to run (its wheel is
# installed with --no-deps).
HOROVOD_PY_DEPS=(setuptools wheel packaging psutil pyyaml cloudpickle cffi)

# ---------------------------------------------------------------- settings
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
BIPROP_WITH_HOROVOD="${BIPROP_WITH_HOROVOD:-1}"
BIPROP_WITH_TORCH="${BIPROP_WITH_TORCH:-1}"
BIPROP_WITH_APT="${BIPROP_WITH_APT:-1}"
BIPROP_HOROVOD_NCCL="${BIPROP_HOROVOD_NCCL:-1}"
BIPROP_VENV="${BIPROP_VENV:-$REPO_ROOT/.venv}"
BIPROP_CACHE="${BIPROP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/biprop-hpc}"
BIPROP_PYTHON="${BIPROP_PYTHON:-python3}"
BIPROP_BUILD_JOBS="${BIPROP_BUILD_JOBS:-$(nproc 2>/dev/null || echo 2)}"

T_START=$SECONDS
step() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf '    WARNING: %s\n' "$*" >&2; }
die()  { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

echo "biprop-hpc installer"
info "repo:   $REPO_ROOT"
info "venv:   $BIPROP_VENV"
info "cache:  $BIPROP_CACHE"
info "horovod: $([[ $BIPROP_WITH_HOROVOD == 1 ]] && echo "yes ($HOROVOD_VERSION)" || echo "no (BIPROP_WITH_HOROVOD=$BIPROP_WITH_HOROVOD)")"

# ---------------------------------------------------------------- 1. system packages
step "1/5 system packages: ${APT_PACKAGES[*]}"
pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == "installed" ]]
}
if [[ $BIPROP_WITH_APT != 1 ]]; then
    info "skipped (BIPROP_WITH_APT=$BIPROP_WITH_APT)"
elif [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
    if [[ ${#missing[@]} -eq 0 ]]; then
        info "all installed already, skipping apt-get"
    else
        info "missing: ${missing[*]}"
        info "running apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        info "running apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
else
    info "not root or no apt-get: skipping system packages. The site must supply:"
    info "  - an MPI implementation with its compiler wrappers (mpicc/mpicxx) and mpirun"
    info "    (Debian: libopenmpi-dev openmpi-bin; HPC: e.g. 'module load openmpi' / 'spectrum-mpi')"
    info "  - Fashion-MNIST IDX files (Debian: dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)"
    info "  - optionally Slurm (slurmctld slurmd slurm-client munge) for the local cluster tests"
fi

# ---------------------------------------------------------------- 2. venv + torch
step "2/5 virtual environment and torch"
PY="$BIPROP_VENV/bin/python"
if [[ -x $PY ]] && "$PY" -c 'import sys' >/dev/null 2>&1; then
    info "venv exists: $("$PY" -c 'import sys; print(sys.version.split()[0])') at $BIPROP_VENV"
elif [[ -e $BIPROP_VENV/pyvenv.cfg ]]; then
    die "$BIPROP_VENV exists but its python does not run (base interpreter moved or unreadable?): remove it or set BIPROP_VENV"
else
    command -v "$BIPROP_PYTHON" >/dev/null 2>&1 || die "no '$BIPROP_PYTHON' found (set BIPROP_PYTHON to a Python 3.11 interpreter)"
    info "creating venv with $BIPROP_PYTHON ($("$BIPROP_PYTHON" -c 'import sys; print(sys.version.split()[0])'))"
    "$BIPROP_PYTHON" -m venv "$BIPROP_VENV" \
        || die "'$BIPROP_PYTHON -m venv' failed (Debian: apt-get install python3-venv)"
fi
PIP=("$PY" -m pip --disable-pip-version-check)

# One Python process reports everything the steps below test (importing torch takes seconds, so
# it is done once per run, and again only after something was installed). Each line is
# key=value; a key that is missing (e.g. the process crashed on a broken import) reads "none".
# MPI is not initialised: library version only, which is safe on login nodes.
PROBE_PY='
import sys, importlib.metadata as md
def out(k, v):
    print(f"{k}={v}", flush=True)
out("python", sys.version.split()[0])
out("pytag", f"cp{sys.version_info[0]}{sys.version_info[1]}")
try:
    out("biprop", md.version("biprop-hpc"))
except Exception:
    pass
try:
    import mpi4py
    out("mpi4py", mpi4py.__version__)
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI
    out("mpi", MPI.Get_library_version().replace(chr(0), "").strip().splitlines()[0].strip())
except Exception:
    pass
try:
    import torch, torchvision
    out("torch", torch.__version__)
    out("torchvision", torchvision.__version__)
except Exception:
    pass
try:
    import horovod
    out("horovod_dist", horovod.__version__)
    import horovod.torch as hvd
    out("horovod", horovod.__version__)
    x = lambda f: "X" if f() else " "
    out("hvd_flags", f"PyTorch[X] MPI[{x(hvd.mpi_built)}] Gloo[{x(hvd.gloo_built)}] "
        f"NCCL[{x(hvd.nccl_built)}] CUDA[{x(hvd.cuda_built)}] ROCm[{x(hvd.rocm_built)}] "
        f"DDL[{x(hvd.ddl_built)}] CCL[{x(hvd.ccl_built)}]")
except Exception:
    pass
'
declare -A P=()
PROBED=0
probe() {
    local line
    P=()
    while IFS= read -r line; do
        [[ $line == *=* ]] && P[${line%%=*}]=${line#*=}
    done < <("$PY" -c "$PROBE_PY" 2>/dev/null || true)
    PROBED=1
}
p() { echo "${P[$1]:-none}"; }   # probe value or "none"
CHANGED=()                       # what this run installed

probe
if [[ $BIPROP_WITH_TORCH != 1 ]]; then
    [[ $(p torch) != none && $(p torchvision) != none ]] \
        || die "BIPROP_WITH_TORCH=0 but the environment has no importable torch + torchvision"
    info "using the environment's torch $(p torch) / torchvision $(p torchvision) (BIPROP_WITH_TORCH=0)"
elif [[ $(p torch) != none && $(p torch | cut -d+ -f1) == "$TORCH_VERSION" \
        && $(p torchvision | cut -d+ -f1) == "$TORCHVISION_VERSION" ]]; then
    info "torch $(p torch) and torchvision $(p torchvision) already installed, skipping"
else
    info "have: torch=$(p torch) torchvision=$(p torchvision); pip install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
    CHANGED+=(torch)
    probe
    [[ $(p torch) != none ]] || die "torch/torchvision still do not import after pip install"
fi

# ---------------------------------------------------------------- 3. the package + mpi4py
step "3/5 biprop-hpc (editable, [dev,dali,onnx]) and mpi4py"
if [[ -f $REPO_ROOT/setup.cfg || -f $REPO_ROOT/pyproject.toml || -f $REPO_ROOT/setup.py ]]; then
    # Skip pip when the metadata files are unchanged since the last editable install.
    stamp="$BIPROP_VENV/.biprop-editable.sha256"
    want="$( { echo "$REPO_ROOT"; for f in setup.cfg pyproject.toml setup.py; do
                   [[ ! -f $REPO_ROOT/$f ]] || cat "$REPO_ROOT/$f"; done; } | sha256sum | cut -d' ' -f1)"
    if [[ -f $stamp && "$(cat "$stamp")" == "$want" && $(p biprop) != none ]]; then
        info "biprop-hpc $(p biprop) already installed in editable mode and its metadata is unchanged, skipping"
    else
        info "pip install -e \"$REPO_ROOT[dev,dali,onnx]\""
        "${PIP[@]}" install -e "$REPO_ROOT[dev,dali,onnx]"
        echo "$want" >"$stamp"
        CHANGED+=(biprop-hpc)
    fi
else
    info "no setup.cfg/pyproject.toml in $REPO_ROOT yet: skipping 'pip install -e .[dev,dali,onnx]'"
fi
if [[ $(p mpi4py) != none ]]; then
    info "mpi4py $(p mpi4py) already installed, skipping"
else
    info "pip install mpi4py"
    "${PIP[@]}" install mpi4py
    CHANGED+=(mpi4py)
fi
# pip may have touched torch's dependencies: look again before building against torch.
[[ ${#CHANGED[@]} -eq 0 ]] || probe
TORCH_FULL="$(p torch)"
TORCHVISION_FULL="$(p torchvision)"

# ---------------------------------------------------------------- 4. Horovod
step "4/5 Horovod $HOROVOD_VERSION for torch $TORCH_FULL"
HVD_KEY="horovod-${HOROVOD_VERSION}-torch${TORCH_FULL//+/-}"
HVD_CACHE_DIR="$BIPROP_CACHE/wheels/$HVD_KEY"
HVD_MARKER="$BIPROP_VENV/.biprop-horovod"   # holds $HVD_KEY of the installed wheel
PYTAG="$(p pytag)"

horovod_ok() {  # Horovod imports with torch, is the pinned version, and was built for this torch
    [[ -f $HVD_MARKER && "$(cat "$HVD_MARKER")" == "$HVD_KEY" && $(p horovod) == "$HOROVOD_VERSION" ]]
}
cached_wheel() {
    local w
    for w in "$HVD_CACHE_DIR"/horovod-"$HOROVOD_VERSION"-"$PYTAG"-*.whl; do
        [[ -f $w ]] && { echo "$w"; return 0; }
    done
    return 1
}
ensure_py_deps() {
    if "$PY" -c 'import setuptools, wheel, packaging, psutil, yaml, cloudpickle, cffi' >/dev/null 2>&1; then
        info "Horovod's Python prerequisites present: ${HOROVOD_PY_DEPS[*]}"
    else
        info "pip install ${HOROVOD_PY_DEPS[*]}"
        "${PIP[@]}" install "${HOROVOD_PY_DEPS[@]}"
    fi
}
install_wheel() {
    info "pip install --no-deps --force-reinstall $1"
    "${PIP[@]}" install --no-deps --force-reinstall "$1"
    echo "$HVD_KEY" >"$HVD_MARKER"
    CHANGED+=(horovod)
}

# Build one wheel from the patched source tree $1 into directory $2; $3 = 1 to try NCCL.
build_horovod() {
    local src=$1 out=$2 nccl=$3 log=$4 nccl_root nccl_shim
    local -a envs=(
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
        MAKEFLAGS="-j$BIPROP_BUILD_JOBS"
    )
    if command -v nvcc >/dev/null 2>&1; then
        # torch is a CUDA build and nvcc exists, so Horovod turns CUDA on by itself; it must then
        # be told where the toolkit is. The result also runs on machines without a GPU.
        local cuda_home="${CUDA_HOME:-}"
        if [[ -z $cuda_home ]]; then
            if [[ -d /usr/local/cuda ]]; then cuda_home=/usr/local/cuda
            else cuda_home="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"; fi
        fi
        envs+=(CUDA_HOME="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home"
               HOROVOD_BUILD_CUDA_CC_LIST="${HOROVOD_BUILD_CUDA_CC_LIST:-80,90}")
        info "nvcc found: building with CUDA from $cuda_home (CC list ${HOROVOD_BUILD_CUDA_CC_LIST:-80,90})"
        if [[ $nccl == 1 ]]; then
            # NCCL ops against torch's nvidia-nccl wheel: it ships include/nccl.h and
            # lib/libnccl.so.2 only, so give CMake a libnccl.so link in a shim directory. The
            # shim lives in the venv (not in a temp dir) because its path ends up in the
            # library's RUNPATH; at run time libnccl.so.2 is normally the copy torch has
            # already loaded (import horovod.torch imports torch first).
            nccl_root="$("$PY" -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)"
            nccl_shim="$BIPROP_VENV/lib/biprop-nccl-shim"
            mkdir -p "$nccl_shim"
            ln -sfn "$nccl_root/lib/libnccl.so.2" "$nccl_shim/libnccl.so"
            ln -sfn "$nccl_root/lib/libnccl.so.2" "$nccl_shim/libnccl.so.2"
            envs+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
                   HOROVOD_NCCL_INCLUDE="$nccl_root/include" HOROVOD_NCCL_LIB="$nccl_shim")
            info "NCCL GPU operations against $nccl_root"
        fi
    fi
    info "pip wheel --no-build-isolation --no-deps --no-cache-dir (log: $log)"
    info "env: ${envs[*]}"
    local t0=$SECONDS
    if ! env "${envs[@]}" "${PIP[@]}" wheel -v --no-build-isolation --no-deps --no-cache-dir \
            -w "$out" "$src" >"$log" 2>&1; then
        warn "build failed after $((SECONDS - t0)) s; last lines of $log:"
        tail -n 40 "$log" | sed 's/^/      | /' >&2
        return 1
    fi
    info "built in $((SECONDS - t0)) s"
    {
        echo "key=$HVD_KEY"
        echo "horovod=$HOROVOD_VERSION"
        echo "torch=$TORCH_FULL"
        echo "python=$(p python)"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) host=$(uname -n) arch=$(uname -m)"
        echo "build_seconds=$((SECONDS - t0))"
        echo "env=${envs[*]}"
    } >"$out/BUILD_INFO"
}

if [[ $BIPROP_WITH_HOROVOD != 1 ]]; then
    info "skipped (BIPROP_WITH_HOROVOD=$BIPROP_WITH_HOROVOD)"
    if [[ $(p horovod) != none ]]; then
        info "a Horovod is importable with torch in this environment: $(p horovod)"
    elif [[ $(p horovod_dist) != none ]]; then
        warn "horovod $(p horovod_dist) is installed but 'import horovod.torch' fails"
    fi
elif horovod_ok; then
    info "Horovod $HOROVOD_VERSION already installed for this torch ($HVD_KEY), skipping"
else
    ensure_py_deps
    if whl="$(cached_wheel)"; then
        info "using cached wheel $whl"
        install_wheel "$whl"
    else
        info "no cached wheel in $HVD_CACHE_DIR: building from source"
        command -v cmake >/dev/null 2>&1 || { info "no cmake on PATH: pip install cmake"; "${PIP[@]}" install cmake; }
        if ! command -v mpicxx >/dev/null 2>&1; then
            die "Horovod is built with MPI but no 'mpicxx' is on PATH: install libopenmpi-dev (Debian), 'module load' your site's MPI, or set BIPROP_WITH_HOROVOD=0"
        fi
        mkdir -p "$BIPROP_CACHE/logs" "$BIPROP_CACHE/wheels"
        TMP_BUILD="$(mktemp -d "${TMPDIR:-/tmp}/biprop-horovod.XXXXXX")"
        trap 'rm -rf "$TMP_BUILD"' EXIT
        info "pip download --no-deps --no-binary :all: horovod==$HOROVOD_VERSION"
        "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$TMP_BUILD"
        tar -xzf "$TMP_BUILD/horovod-$HOROVOD_VERSION.tar.gz" -C "$TMP_BUILD"
        SRC="$TMP_BUILD/horovod-$HOROVOD_VERSION"
        # The 0.28.1 release does not build against torch >= 2.1 as is: the core must be C++17
        # (the bundled gloo must stay at 17) and the torch extension C++20 (torch 2.14 headers).
        info "patching CMAKE_CXX_STANDARD: 14 -> 17 in CMakeLists.txt, 14 -> 20 in horovod/torch/CMakeLists.txt"
        patch_std() {  # file new-standard
            grep -q 'set(CMAKE_CXX_STANDARD 14)' "$1" || die "pattern 'set(CMAKE_CXX_STANDARD 14)' not found in $1"
            sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $2)/" "$1"
            grep -q "set(CMAKE_CXX_STANDARD $2)" "$1" || die "patching $1 to C++$2 failed"
        }
        patch_std "$SRC/CMakeLists.txt" 17
        patch_std "$SRC/horovod/torch/CMakeLists.txt" 20

        try_nccl=0
        if [[ $BIPROP_HOROVOD_NCCL == 1 ]] && command -v nvcc >/dev/null 2>&1 \
            && "$PY" -c 'import nvidia.nccl, os, sys; p = list(nvidia.nccl.__path__)[0]; sys.exit(not (os.path.exists(p + "/lib/libnccl.so.2") and os.path.exists(p + "/include/nccl.h")))' >/dev/null 2>&1; then
            try_nccl=1
        fi
        OUT="$TMP_BUILD/wheel"
        LOG="$BIPROP_CACHE/logs/$HVD_KEY.log"
        info "building (takes ~5-10 min on 2 cores)"
        built=0
        if [[ $try_nccl == 1 ]]; then
            if build_horovod "$SRC" "$OUT" 1 "$LOG"; then
                built=1
            else
                warn "Horovod build with NCCL failed: retrying without NCCL GPU operations (CPU/MPI/Gloo is what matters)"
                rm -rf "$OUT" "$SRC/build"
            fi
        fi
        if [[ $built == 0 ]]; then
            build_horovod "$SRC" "$OUT" 0 "$LOG" || die "Horovod build failed; see $LOG"
        fi
        # Move into the cache only after a successful build, so that a broken build never caches.
        mkdir -p "$HVD_CACHE_DIR"
        mv "$OUT"/horovod-*.whl "$OUT/BUILD_INFO" "$HVD_CACHE_DIR"/
        whl="$(cached_wheel)" || die "the build produced no horovod-$HOROVOD_VERSION-$PYTAG wheel"
        info "cached $whl"
        install_wheel "$whl"
    fi
    probe
    horovod_ok || die "Horovod installed but 'import horovod.torch' fails; remove $HVD_CACHE_DIR and rerun"
fi

# ---------------------------------------------------------------- 5. check + summary
step "5/5 check"
# The C++ kernels (biprop_hpc/extensions.py: the CPU masks of the BIPROP layers, biprop_hpc/nn/csrc, and the
# packed inference of `biprop infer`, biprop_hpc/packed/csrc): compiled once per source and torch version into
# $BIPROP_CACHE/torch-extensions (local compiler, no network); later runs only load them (a few seconds).
# A failure leaves training working: the masks fall back to torch code, and the first use retries and says why.
if out="$(BIPROP_CACHE="$BIPROP_CACHE" "$PY" -c 'import logging; logging.disable(logging.WARNING)
from biprop_hpc.extensions import MASKS
from biprop_hpc.packed import load_extension, supported_cpu_paths
MASKS.load(); load_extension(); print(" ".join(supported_cpu_paths()))' 2>&1)"; then
    info "C++ kernels ready in $BIPROP_CACHE/torch-extensions (packed CPU paths here: $(tail -n 1 <<<"$out"))"
else
    warn "building the C++ kernels failed (the CPU masks use torch code; biprop infer --engine packed retries):"
    tail -n 20 <<<"$out" | sed 's/^/      | /' >&2
fi
HVDRUN="$BIPROP_VENV/bin/horovodrun"
if [[ -x $HVDRUN ]]; then
    # The real check starts a process per framework and takes ~10 s; run it when Horovod changed
    # in this run (or on request), else show the same facts from the probe's horovod.torch import.
    if [[ " ${CHANGED[*]} " == *" horovod "* || " ${CHANGED[*]} " == *" torch "* || ${BIPROP_CHECK_BUILD:-0} == 1 ]]; then
        info "$HVDRUN --check-build"
        "$HVDRUN" --check-build
    else
        info "Horovod $(p horovod) built with: $(p hvd_flags)"
        info "(unchanged in this run; full report: $HVDRUN --check-build, or BIPROP_CHECK_BUILD=1)"
    fi
else
    info "no horovodrun in $BIPROP_VENV/bin"
fi
echo
echo "biprop-hpc env OK in $((SECONDS - T_START)) s: venv=$BIPROP_VENV python=$(p python) torch=$(p torch) torchvision=$(p torchvision) horovod=$(p horovod) biprop-hpc=$(p biprop) mpi4py=$(p mpi4py) mpi=[$(p mpi)] changed=[${CHANGED[*]:-nothing}]"
