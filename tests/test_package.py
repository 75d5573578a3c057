"""Package-level contracts: what importing timm_dcl does and does not pull in."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_import_stays_free_of_datasets_and_optuna():
    # A GPU machine may have neither installed: the op, the models and the graph must load without them.
    code = ("import json, sys, timm, timm_dcl, timm_dcl.graph, timm_dcl.trainer, timm_dcl.config; "
            "print(json.dumps({'heavy': sorted(m for m in ('datasets', 'optuna') if m in sys.modules), "
            "'resnet32': 'resnet32' in timm.list_models('resnet32')}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "resnet32": True}


def test_extension_links_the_shared_cxx_runtime():
    # A second, static copy of the C++ runtime inside the extension made every C++ error the op
    # raises crash the process on the lent H200 (ops/_extension.py: loaded_cxx_runtime); the
    # library must take the runtime from the shared libstdc++ that torch runs on.
    import shutil

    import timm_dcl
    from timm_dcl.ops._extension import JIT_NAME

    assert "cpu" in timm_dcl.kernels_available()
    libs = {line.split()[-1] for line in open("/proc/self/maps")
            if line.rstrip().endswith(".so") and ("timm_dcl/_C." in line or JIT_NAME in line)}
    assert len(libs) == 1, libs
    lib = libs.pop()
    readelf = shutil.which("readelf")
    if readelf is None:  # binutils comes with every compiler that can build the extension
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run([readelf, "-d", "-W", lib], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in dynamic, f"{lib} does not link the shared libstdc++"
    symbols = subprocess.run([readelf, "--dyn-syms", "-W", lib], capture_output=True, text=True, check=True).stdout
    defined = [line for line in symbols.splitlines()
               if line.split() and line.split()[-1].split("@")[0] == "__cxa_throw" and " UND " not in line]
    assert not defined, f"{lib} carries its own C++ runtime: {defined}"
