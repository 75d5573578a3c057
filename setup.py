"""Builds timm_dcl._C, the fused Knowledge Transfer Graph loss kernels.

The CPU kernels are always built. The CUDA kernels are built whenever torch is a CUDA
build and nvcc is found, even on a machine without a GPU. Environment:
  TIMM_DCL_CUDA=0|1        force the CUDA kernels off / on (on without nvcc: an error)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: the visible GPUs', else 8.0;9.0+PTX)
  CUDA_HOME                where nvcc lives (e.g. /usr/local/cuda)
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"


def _cuda_include_dirs() -> list[str]:
    """Headers of the pip-installed CUDA libraries (cuBLAS, cuSPARSE...) that torch's CUDA headers include."""
    import importlib.util

    dirs = []
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _want_cuda() -> bool:
    import torch
    from torch.utils import cpp_extension

    forced = os.environ.get("TIMM_DCL_CUDA")
    nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    if forced == "0":
        return False
    if forced == "1":
        if torch.version.cuda is None:
            raise RuntimeError("TIMM_DCL_CUDA=1, but the installed torch is not a CUDA build")
        if not nvcc:
            raise RuntimeError("TIMM_DCL_CUDA=1, but nvcc was not found: set CUDA_HOME (e.g. /usr/local/cuda)")
        return True
    return torch.version.cuda is not None and nvcc


def _extensions():
    import torch
    from torch.utils import cpp_extension

    cxx = ["-O3", "-fopenmp", "-Wno-psabi", "-DTORCH_EXTENSION_NAME=_C"]
    sources = [f"{CSRC}/ktg_loss.cpp"]
    if not _want_cuda():
        return [cpp_extension.CppExtension("timm_dcl._C", sources, extra_compile_args={"cxx": cxx},
                                           extra_link_args=["-fopenmp"])]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: Ampere and Hopper, plus PTX that newer GPUs can JIT-compile.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DTORCH_EXTENSION_NAME=_C", "-DWITH_CUDA"]
    return [cpp_extension.CUDAExtension(
        "timm_dcl._C", sources + [f"{CSRC}/ktg_loss_cuda.cu"],
        include_dirs=_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"])]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
