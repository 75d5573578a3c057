"""Package-level contracts: what importing timm_dcl does and does not pull in."""
from __future__ import annotations

import json
import subprocess
import sys

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
