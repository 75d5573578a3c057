"""Loading the compiled KTG loss kernels, and the build options they are compiled with.

The kernels live in the extension module ``timm_dcl._C`` built by ``setup.py``. When it
is missing or unusable (never built, or built against another torch: undefined
symbols), :func:`load_extension` compiles the sources in ``<repo>/csrc`` once per process
with ``torch.utils.cpp_extension.load`` (set ``TIMM_DCL_JIT=0`` to skip that).

A library built for another torch version (a build-isolated ``pip install`` fetches the
newest torch into its build environment) is detected from a marker in the file and not
loaded. ``setup.py`` loads this file by path to share :func:`build_options` and
:func:`decide_cuda`, so keep it importable with the standard library alone (torch is
imported inside the functions).

Environment:
  TIMM_DCL_CUDA=0|1     build without / with the CUDA kernels (default: with them when torch
                        is a CUDA build and nvcc of the same CUDA release is found, and for
                        the JIT build a GPU is visible; 1 without nvcc is an error).
  TIMM_DCL_JIT=0        never JIT-compile at import time.
  TORCH_CUDA_ARCH_LIST  GPU architectures; when unset and no GPU is visible, DEFAULT_ARCH_LIST.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import subprocess
import threading
from pathlib import Path

__all__ = [
    "DEFAULT_ARCH_LIST",
    "build_options",
    "csrc_dir",
    "cuda_toolkit",
    "decide_cuda",
    "default_arch_list",
    "load_extension",
]

# Turing, Ampere (sm_80 code also runs on 8.6/8.9) and Hopper, plus Hopper PTX that the
# driver compiles for newer GPUs (Blackwell). CUDA 13 dropped everything before 7.5.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"

CPU_SOURCES = ("ktg_loss.cpp", "ktg_op.cpp")
CUDA_SOURCES = ("ktg_loss_cuda.cu",)
HEADERS = ("ktg_loss.h", "ktg_cpu_lanes.h")
JIT_NAME = "timm_dcl_C"

_lock = threading.Lock()
_result: tuple[bool, str | None] | None = None


def csrc_dir() -> Path | None:
    """The kernel sources: ``<repo>/csrc`` of a source checkout (editable install)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if all((candidate / f).is_file() for f in CPU_SOURCES + HEADERS):
            return candidate
    return None


def _nvidia_include_dirs() -> list[str]:
    """Header dirs of the pip CUDA packages (``nvidia/*/include``).

    torch's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack;
    the pip wheels ship them. They are passed with ``-isystem`` so that the toolkit's own
    ``-I`` headers keep precedence.
    """
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for root in spec.submodule_search_locations:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cublas_v2.h")) or os.path.isfile(os.path.join(inc, "cusparse.h")):
                dirs.append(inc)
    return dirs


def _is_toolkit(home: str | None) -> bool:
    return bool(home) and os.path.isfile(os.path.join(home, "bin", "nvcc")) and os.path.isfile(
        os.path.join(home, "include", "cuda_runtime.h"))


def cuda_toolkit() -> tuple[bool, str]:
    """Whether the CUDA kernels can be compiled here (torch CUDA build + nvcc), and why not.

    torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script outside
    the toolkit (e.g. /usr/local/bin/nvcc, giving a CUDA_HOME without headers); then the
    standard /usr/local/cuda is used when it is a complete toolkit.
    """
    import torch
    from torch.utils import cpp_extension

    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = cpp_extension.CUDA_HOME
    if _is_toolkit(home):
        return True, f"CUDA toolkit {home}"
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _is_toolkit("/usr/local/cuda"):
        cpp_extension.CUDA_HOME = "/usr/local/cuda"  # read by CUDAExtension and the build
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        return True, "CUDA toolkit /usr/local/cuda"
    if not home:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return False, f"CUDA_HOME={home} has no bin/nvcc or include/cuda_runtime.h (set CUDA_HOME to the toolkit)"


def _nvcc_version() -> str | None:
    from torch.utils import cpp_extension

    try:
        out = subprocess.run([os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def decide_cuda(*, need_gpu: bool = False) -> tuple[bool, str]:
    """Build the CUDA kernels? Honours TIMM_DCL_CUDA; raises if it demands an absent nvcc.

    Automatically (TIMM_DCL_CUDA unset) only when nvcc's CUDA release matches torch's:
    torch's pip CUDA headers of another release fail to compile under that nvcc. With
    ``need_gpu`` (the JIT build) also only when a GPU is visible.
    """
    import torch

    flag = os.environ.get("TIMM_DCL_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise RuntimeError(f"TIMM_DCL_CUDA must be 0 or 1, got {flag!r}")
    if flag == "0":
        return False, "TIMM_DCL_CUDA=0"
    ok, why = cuda_toolkit()
    if flag == "1":
        if not ok:
            raise RuntimeError(f"TIMM_DCL_CUDA=1 but the CUDA kernels cannot be built: {why}")
        return True, f"{why}; TIMM_DCL_CUDA=1"
    if not ok:
        return False, why
    nvcc = _nvcc_version()
    wanted = ".".join(str(torch.version.cuda).split(".")[:2])
    if nvcc != wanted:
        return False, (f"nvcc is CUDA {nvcc or '(unknown)'} but torch {torch.__version__} is built "
                       f"with CUDA {wanted}; set TIMM_DCL_CUDA=1 to try anyway")
    if need_gpu and not torch.cuda.is_available():
        return False, "no GPU visible (set TIMM_DCL_CUDA=1 to build the CUDA kernels anyway)"
    return True, why


def default_arch_list() -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set, or None to leave torch's choice (env or visible GPUs)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None  # torch builds for the visible GPUs
    return DEFAULT_ARCH_LIST


def build_options(with_cuda: bool) -> dict:
    """Compiler options shared by setup.py and the JIT build (WITH_CUDA marks a CUDA build)."""
    nvidia = _nvidia_include_dirs()
    isystem = [flag for d in nvidia for flag in ("-isystem", d)]
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"] + (["-DWITH_CUDA"] if with_cuda else [])
    # No --use_fast_math: the kernels' exp is an exact-enough polynomial already, and
    # fast-math would change logf/division accuracy of the float32 path.
    nvcc = ["-O3", "-lineinfo"] + isystem + (["-DWITH_CUDA"] if with_cuda else [])
    return {
        "extra_compile_args": {"cxx": cxx + isystem, "nvcc": nvcc},
        "extra_link_args": ["-fopenmp"] + loaded_cxx_runtime(),
    }


def loaded_cxx_runtime() -> list[str]:
    """The shared C++ runtime this process (with torch imported) runs on, to link by path.

    Why: a compiler whose own library directory holds only ``libstdc++.a`` links the C++
    runtime statically into the extension. The lent H200's ``/opt/gcc`` wrapper (GCC 13,
    ``-B`` to its lib directory) did: with two C++ runtimes in one process, every C++ error
    the op raised crashed Python (segfault) instead of becoming an exception. Naming the
    library torch already loaded makes the linker resolve the runtime there, so the
    driver's implicit ``-lstdc++`` after it pulls nothing from an archive.
    """
    import torch  # noqa: F401  (loads the runtime whose path is wanted)

    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so"):
                    return [path]
    except OSError:  # not Linux: the platform's default linking stands
        pass
    return []


def _ops_registered() -> bool:
    import torch

    try:
        torch.ops.timm_dcl.ktg_loss  # noqa: B018  (absent from libraries of an older layout)
        torch.ops.timm_dcl.ktg_loss_forward  # noqa: B018
        torch.ops.timm_dcl.ktg_loss_backward  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


_BUILD_MARK = re.compile(rb"timm_dcl-build:torch=(\d+)\.(\d+)\.(\d+);")


def _built_for(path: str) -> str | None:
    """The torch version a built library was compiled against (read from the file, not loaded)."""
    try:
        with open(path, "rb") as f:
            match = _BUILD_MARK.search(f.read())
    except OSError:
        return None
    return ".".join(g.decode() for g in match.groups()) if match else None


def _version_mismatch() -> str | None:
    """Why the installed timm_dcl._C must not be loaded, if it was built for another torch.

    A library built against one torch and loaded into another can fail on undefined
    symbols or, worse, load and crash; its registrations run as soon as it is loaded, so
    the check happens before the import.
    """
    import torch

    try:
        spec = importlib.util.find_spec("timm_dcl._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None  # the import reports it
    built = _built_for(spec.origin)
    running = torch.__version__.split("+")[0]
    if built is not None and built != running:
        return f"timm_dcl._C was built for torch {built} but torch {running} is running"
    return None


def _jit_build() -> tuple[bool, str | None]:
    src = csrc_dir()
    if src is None:
        return False, ("the kernel sources (csrc/ktg_loss.cpp) are not next to the package; "
                       "build from a source checkout with `pip install -e .`")
    try:
        with_cuda, _ = decide_cuda(need_gpu=True)
    except RuntimeError as exc:
        return False, str(exc)
    from torch.utils import cpp_extension

    opts = build_options(with_cuda)
    sources = [str(src / f) for f in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]
    arch = default_arch_list() if with_cuda else None
    saved_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        cpp_extension.load(
            name=JIT_NAME + ("_cuda" if with_cuda else ""),
            sources=sources,
            extra_include_paths=[str(src)],
            extra_cflags=opts["extra_compile_args"]["cxx"],
            extra_cuda_cflags=opts["extra_compile_args"]["nvcc"],
            extra_ldflags=opts["extra_link_args"],
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # a compiler error, a missing toolchain, a locked build dir…
        return False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    finally:
        if arch:
            if saved_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch
    if not _ops_registered():
        return False, "the JIT-built library registered no timm_dcl ops"
    return True, None


def _load() -> tuple[bool, str | None]:
    if _ops_registered():  # loaded some other way (torch.ops.load_library, an earlier JIT)
        return True, None
    reason = _version_mismatch()
    if reason is None:
        try:
            importlib.import_module("timm_dcl._C")
        except Exception as exc:  # ImportError, or OSError/undefined symbol from another torch
            reason = f"timm_dcl._C could not be imported: {exc}"
        else:
            if _ops_registered():
                return True, None
            reason = "timm_dcl._C was imported but registered no timm_dcl ops"
    if os.environ.get("TIMM_DCL_JIT", "").strip() == "0":
        return False, f"{reason}; JIT build disabled by TIMM_DCL_JIT=0"
    ok, why = _jit_build()
    if ok:
        return True, None
    return False, f"{reason}; the JIT build failed too ({why})"


def load_extension() -> tuple[bool, str | None]:
    """Make the ``timm_dcl::ktg_loss_*`` ops available: ``(True, None)`` or ``(False, reason)``.

    Tries ``timm_dcl._C``, then (once per process, unless ``TIMM_DCL_JIT=0``) a JIT build
    of ``<repo>/csrc``. Never warns: the caller reports the reason.
    """
    global _result
    with _lock:
        if _result is None:
            _result = _load()
        return _result
