"""CIFAR ResNets of depth 6n+2 (He et al. 2016, §4.2), the ResNet32/ResNet110 of the KTG paper.

A 3×3 conv stem with 16 channels, three stages of n basic blocks at 16/32/64 channels
(stride 2 at the start of stages 2 and 3), parameter-free "option A" shortcuts (stride-2
subsampling plus zero channels), global pooling and a linear classifier. ResNet32 has
0.470M parameters and ResNet110 1.734M with 100 classes.

Registered names: ``resnet20``, ``resnet32``, ``resnet44``, ``resnet56``, ``resnet110``.
timm 1.0 has no model of these names (its ImageNet ResNets are resnet18/26/34/50/...;
``resnet32ts`` is a different, unrelated name), so importing this module adds them
without overwriting anything, and ``timm.create_model("resnet32")`` returns the CIFAR
network. Were timm ever to add one of these names, timm's registry would warn and this
module's definition (imported later) would win.

No pretrained weights exist (no hub): ``pretrained=True`` fails in timm's builder unless a
local file is given with ``pretrained_cfg_overlay=dict(file=...)``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from timm.layers import DropPath, create_classifier, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

__all__ = ["CifarResNet", "CifarBasicBlock", "ZeroPadShortcut", "CIFAR100_MEAN", "CIFAR100_STD"]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by the stride, then zero-pad the new channels on both sides."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(f"an option-A shortcut cannot reduce channels ({in_chs} -> {out_chs})")
        self.stride = stride
        self.pad_lo = (out_chs - in_chs) // 2
        self.pad_hi = out_chs - in_chs - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # matches the 3×3/stride-2/pad-1 conv of the residual branch for odd sizes too: ceil(H/2)
            x = x[:, :, ::self.stride, ::self.stride]
        if self.pad_lo or self.pad_hi:
            x = F.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))
        return x


class CifarBasicBlock(nn.Module):
    """Post-activation basic block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            drop_path_rate: float = 0.,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(out_chs)
        self.act1 = act_layer(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()
        self.act2 = act_layer(inplace=True)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = ZeroPadShortcut(in_chs, out_chs, stride)
        else:
            self.shortcut = nn.Identity()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(self.drop_path(x) + shortcut)


class CifarResNet(nn.Module):
    """ResNet of depth 6n+2 for small (32×32) images; any input size works (global pooling)."""

    def __init__(
            self,
            depth: int = 32,
            channels: Sequence[int] = (16, 32, 64),
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            norm_layer: Union[str, Type[nn.Module]] = nn.BatchNorm2d,
            zero_init_last: bool = True,
            paper_init: bool = False,
    ):
        """
        Args:
            depth: Total depth 6n+2 (n basic blocks per stage).
            channels: Widths of the three stages; the stem has ``channels[0]``.
            num_classes: Classifier outputs (0 for no classifier).
            in_chans: Input image channels.
            global_pool: timm global pooling type ('avg', 'max', 'avgmax', ...).
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth, linearly increasing over the blocks.
            zero_init_last: Zero the last BN of each residual branch, so every block starts as
                its shortcut (timm's ResNet default). At the paper's lr 0.1 with no warm-up the
                post-activation network's logits otherwise reach |z| ≈ 100 within five steps, and
                under deep mutual learning both nodes then collapse to uniform predictions for
                epochs. ``False`` gives the plain He-init network.
            paper_init: The authors' released initialisation (SPEC §8): no zero-initialised last
                BN (whatever ``zero_init_last`` says) and a Kaiming-normal classifier weight whose
                bias keeps PyTorch's default (the SPEC names no bias init).
        """
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
        channels = tuple(int(c) for c in channels)
        if len(channels) != 3 or min(channels) < 1:
            raise ValueError(f"channels must be three positive widths, got {channels}")
        blocks_per_stage = (depth - 2) // 6
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_chs = channels[0]
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm_layer(stem_chs)
        self.act1 = act_layer(inplace=True)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module='act1')]

        num_blocks = 3 * blocks_per_stage
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        stages = []
        prev_chs, reduction = stem_chs, 1
        for stage_idx, out_chs in enumerate(channels):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_stage):
                blocks.append(CifarBasicBlock(
                    prev_chs,
                    out_chs,
                    stride=stride if block_idx == 0 else 1,
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                    drop_path_rate=dpr[stage_idx * blocks_per_stage + block_idx],
                ))
                prev_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f'stages.{stage_idx}'))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = prev_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.init_weights(zero_init_last=zero_init_last and not paper_init, paper_init=paper_init)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = False, paper_init: bool = False) -> None:
        # as fb.resnet.torch (He et al.): convs N(0, 2/n) with n = k·k·out_channels (fan_out),
        # BN at identity, the classifier's default uniform weights with a zero bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                if paper_init:
                    nn.init.kaiming_normal_(m.weight)
                else:
                    nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, CifarBasicBlock):
                    m.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^conv1|bn1', blocks=r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)')

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        device, dtype = self.conv1.weight.device, self.conv1.weight.dtype
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, device=device, dtype=dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features of the stem (index 0) and the three stages (1-3); ``norm`` is a no-op here."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        intermediates = []
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_cifar_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 100, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': CIFAR100_MEAN, 'std': CIFAR100_STD,
        'first_conv': 'conv1', 'classifier': 'fc',
        'paper_ids': 'arXiv:1512.03385',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet20': _cfg(),
    'resnet32': _cfg(),
    'resnet44': _cfg(),
    'resnet56': _cfg(),
    'resnet110': _cfg(),
})


@register_model
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage)."""
    return _create_cifar_resnet('resnet20', pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage), node 0 of the KTG paper."""
    return _create_cifar_resnet('resnet32', pretrained, **dict(dict(depth=32), **kwargs))


@register_model
def resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (7 blocks per stage)."""
    return _create_cifar_resnet('resnet44', pretrained, **dict(dict(depth=44), **kwargs))


@register_model
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage)."""
    return _create_cifar_resnet('resnet56', pretrained, **dict(dict(depth=56), **kwargs))


@register_model
def resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (18 blocks per stage)."""
    return _create_cifar_resnet('resnet110', pretrained, **dict(dict(depth=110), **kwargs))
