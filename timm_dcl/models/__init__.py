"""The KTG paper's CIFAR networks; importing this package registers them with timm."""
from .cifar_resnet import CIFAR100_MEAN, CIFAR100_STD, CifarResNet
from .wide_resnet import WideResNet

__all__ = ["CifarResNet", "WideResNet", "CIFAR_MODELS", "CIFAR100_MEAN", "CIFAR100_STD"]

# every name registered here; none of them exists in timm itself
CIFAR_MODELS = (
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "wrn16_2", "wrn28_2", "wrn28_10", "wrn40_2",
)
