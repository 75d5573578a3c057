"""Fixtures shared by the test files of timm-dcl."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Let the tests run from a plain checkout (no `pip install -e .`) too.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HAS_CUDA = torch.cuda.is_available()

#: Parametrise a test over devices with ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = (
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn: cpu, and cuda where a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (CIFAR-10 parquet, Tiny-ImageNet subset) beside the repository."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}")
    return path
