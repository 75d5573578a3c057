"""Builds timm_dcl._C, the fused Knowledge Transfer Graph loss kernels.

Package metadata lives in pyproject.toml; this file only declares the extension. The
CPU kernels are always built. The CUDA kernels are built whenever torch is a CUDA build
and an nvcc of the same CUDA release is found, even on a machine without a GPU.
Environment:
  TIMM_DCL_CUDA=0|1        force the CUDA kernels off / on (on without nvcc: an error)
  TORCH_CUDA_ARCH_LIST     GPU architectures (default: the visible GPUs', else 7.5;8.0;9.0+PTX)
  CUDA_HOME                the CUDA toolkit (default: torch's guess, else /usr/local/cuda)

Build against the installed torch with `pip install -e . --no-build-isolation`: an
isolated build compiles against whatever torch pip fetches for it, and a library built
for another torch version is not loaded (timm_dcl then JIT-compiles the kernels once).
The compiler flags and the CUDA decision are shared with that JIT build through
timm_dcl/ops/_extension.py.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_helpers():
    # Load timm_dcl/ops/_extension.py by path: importing the package would import timm,
    # which an isolated build environment does not have.
    path = ROOT / "timm_dcl" / "ops" / "_extension.py"
    spec = importlib.util.spec_from_file_location("_timm_dcl_build_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    helpers = _build_helpers()
    with_cuda, why = helpers.decide_cuda()
    sources = [f"csrc/{f}" for f in helpers.CPU_SOURCES]
    if with_cuda:
        sources += [f"csrc/{f}" for f in helpers.CUDA_SOURCES]
        arch = helpers.default_arch_list()
        if arch:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch
        print(f"timm_dcl: building the CPU and CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST="
              f"{os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPUs')})", file=sys.stderr)
    else:
        print(f"timm_dcl: building the CPU kernels only ({why})", file=sys.stderr)
    options = helpers.build_options(with_cuda)
    make = CUDAExtension if with_cuda else CppExtension
    extension = make(
        name="timm_dcl._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=options["extra_compile_args"],
        extra_link_args=options["extra_link_args"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
