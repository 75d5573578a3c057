"""Pre-activation wide ResNets WRN-d-k for small images (Zagoruyko & Komodakis 2016).

A 3×3 conv stem with 16 channels, three groups of (d−4)/6 pre-activation basic blocks
(BN-ReLU-conv-BN-ReLU-[dropout]-conv) at widths 16k, 32k and 64k (stride 2 at the start
of groups 2 and 3), a 1×1 conv shortcut where the shape changes, a final BN-ReLU, global
pooling and a linear classifier. WRN-28-2 has 1.479M parameters with 100 classes.

Registered names: ``wrn16_2``, ``wrn28_2``, ``wrn28_10``, ``wrn40_2`` (no clash with timm,
whose ImageNet wide ResNets are ``wide_resnet50_2``/``wide_resnet101_2``). Unlike timm's
usual head dropout, ``drop_rate`` here is the paper's dropout between the two convs of
every block (default 0, as in the KTG paper).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from timm.layers import DropPath, create_classifier, get_act_layer, get_norm_layer
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from .cifar_resnet import CIFAR100_MEAN, CIFAR100_STD

__all__ = ["WideResNet", "PreActBlock"]


class PreActBlock(nn.Module):
    """Pre-activation basic block; a projecting shortcut sees the pre-activated input."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int = 1,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.ReLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.bn1 = norm_layer(in_chs)
        self.act1 = act_layer(inplace=True)
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_chs)
        self.act2 = act_layer(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0. else nn.Identity()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, stride=1, padding=1, bias=False)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0. else nn.Identity()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
        else:
            self.shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_pre = self.act1(self.bn1(x))
        # the identity path carries the raw input; a projection takes the normalised one
        shortcut = x if self.shortcut is None else self.shortcut(x_pre)
        x = self.conv1(x_pre)
        x = self.conv2(self.drop(self.act2(self.bn2(x))))
        return self.drop_path(x) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen_factor; any input size works (global pooling)."""

    def __init__(
            self,
            depth: int = 28,
            widen_factor: int = 2,
            num_classes: int = 100,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Union[str, Type[nn.Module]] = nn.ReLU,
            norm_layer: Union[str, Type[nn.Module]] = nn.BatchNorm2d,
            paper_init: bool = False,
    ):
        """
        Args:
            depth: Total depth 6n+4 (n blocks per group).
            widen_factor: k; the groups have 16k, 32k and 64k channels.
            num_classes: Classifier outputs (0 for no classifier).
            in_chans: Input image channels.
            global_pool: timm global pooling type ('avg', 'max', 'avgmax', ...).
            drop_rate: Dropout between the two convs of every block.
            drop_path_rate: Stochastic depth, linearly increasing over the blocks.
            paper_init: The authors' released initialisation (SPEC §8): the classifier keeps
                PyTorch's default init (its bias is not zeroed).
        """
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"WRN widen_factor must be a positive integer, got {widen_factor!r}")
        if not 0. <= drop_rate < 1.:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        blocks_per_group = (depth - 4) // 6
        act_layer = get_act_layer(act_layer)
        norm_layer = get_norm_layer(norm_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        stem_chs = 16
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 3, stride=1, padding=1, bias=False)
        self.feature_info = [dict(num_chs=stem_chs, reduction=1, module='conv1')]

        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        num_blocks = 3 * blocks_per_group
        dpr = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        stages = []
        prev_chs, reduction = stem_chs, 1
        for stage_idx, out_chs in enumerate(widths):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(blocks_per_group):
                blocks.append(PreActBlock(
                    prev_chs,
                    out_chs,
                    stride=stride if block_idx == 0 else 1,
                    drop_rate=drop_rate,
                    drop_path_rate=dpr[stage_idx * blocks_per_group + block_idx],
                    act_layer=act_layer,
                    norm_layer=norm_layer,
                ))
                prev_chs = out_chs
            stages.append(nn.Sequential(*blocks))
            module = 'norm' if stage_idx == len(widths) - 1 else f'stages.{stage_idx}'
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=module))
        self.stages = nn.Sequential(*stages)
        # pre-activation: the last block's output still needs its BN-ReLU
        self.norm = norm_layer(prev_chs)
        self.act = act_layer(inplace=True)

        self.num_features = self.head_hidden_size = prev_chs
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.init_weights(paper_init=paper_init)

    @torch.jit.ignore
    def init_weights(self, paper_init: bool = False) -> None:
        # the WRN reference: convs N(0, 2/fan_out), BN at identity, zero classifier bias
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and not paper_init:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1',
            blocks=[
                (r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

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
        """Features of the stem (index 0) and the three groups (1-3).

        Pre-activation features are un-normalised; ``norm=True`` applies the final BN-ReLU to
        the last group's output (the only one it is sized for).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        last_idx = len(self.stages)
        intermediates = []
        x = self.conv1(x)
        if 0 in take_indices:
            intermediates.append(x)
        stages = self.stages[:max_index] if stop_early else self.stages
        feat_idx = 0
        for feat_idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.act(self.norm(x)) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.act(self.norm(x))
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_norm or prune_end:
            self.norm = nn.Identity()
            self.act = nn.Identity()
        self.stages = self.stages[:max_index]
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x, flatten=True)
        else:
            x = self.stages(x)
        return self.act(self.norm(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_wide_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> WideResNet:
    return build_model_with_cfg(
        WideResNet,
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
        'paper_ids': 'arXiv:1605.07146',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'wrn16_2': _cfg(),
    'wrn28_2': _cfg(),
    'wrn28_10': _cfg(),
    'wrn40_2': _cfg(),
})


@register_model
def wrn16_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-16-2."""
    return _create_wide_resnet('wrn16_2', pretrained, **dict(dict(depth=16, widen_factor=2), **kwargs))


@register_model
def wrn28_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-2, a node of the KTG paper's searched graphs."""
    return _create_wide_resnet('wrn28_2', pretrained, **dict(dict(depth=28, widen_factor=2), **kwargs))


@register_model
def wrn28_10(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-28-10."""
    return _create_wide_resnet('wrn28_10', pretrained, **dict(dict(depth=28, widen_factor=10), **kwargs))


@register_model
def wrn40_2(pretrained: bool = False, **kwargs: Any) -> WideResNet:
    """WRN-40-2."""
    return _create_wide_resnet('wrn40_2', pretrained, **dict(dict(depth=40, widen_factor=2), **kwargs))
