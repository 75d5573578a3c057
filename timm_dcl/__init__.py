"""timm-dcl: Knowledge Transfer Graphs (deep collaborative learning) for timm.

Importing the package registers the paper's CIFAR networks with timm and loads the
fused loss kernels. It deliberately imports neither ``datasets`` nor ``optuna``.
"""
from . import models  # noqa: F401  (registers resnet32, wrn28_2, … with timm)
from .gates import GATE_NAMES, Gate, encode_gates, parse_gates
from .graph import Graph, Node
from .ops import MAX_NODES, KTGLoss, KTGLossFunction, kernels_available, ktg_loss, ktg_loss_reference
from .task import KTGTask

__version__ = "0.1.0"

__all__ = [
    "ktg_loss", "ktg_loss_reference", "KTGLoss", "KTGLossFunction", "kernels_available", "MAX_NODES",
    "Gate", "GATE_NAMES", "encode_gates", "parse_gates", "Graph", "Node", "KTGTask", "__version__",
]
