"""The Knowledge Transfer Graph loss: fused kernels and their reference."""
from .fused import MAX_NODES, KTGLoss, KTGLossFunction, kernels_available, ktg_loss
from .reference import ktg_loss_reference

__all__ = ["ktg_loss", "ktg_loss_reference", "KTGLoss", "KTGLossFunction", "kernels_available", "MAX_NODES"]
