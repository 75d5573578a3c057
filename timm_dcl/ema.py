"""EMAs of a graph's nodes: timm's ``ModelEmaV3`` per network, and the ``ema:N`` nodes they feed.

``--model-ema`` keeps an EMA of every trainable node (metrics gain ``top1_ema``, node files
``state_dict_ema``); an ``ema:N`` node keeps node N's whether or not the flag is given, and
teaches with its logits on the batch the other nodes see (a mean teacher when node 0 learns
from it). The EMA copy is evaluated as timm evaluates its EMAs: in eval mode, without
gradients, so its BatchNorm uses the averaged running statistics and it draws no random
numbers (a resume stays bit-identical). It is updated after every optimiser step with
``step`` = the run's iteration, as timm's train.py does (``--model-ema-warmup``: timm's warm-up).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

__all__ = ["NodeEmas", "EmaState", "ema_node_indices"]


def ema_node_indices(graph, cfg) -> tuple[int, ...]:
    """The nodes that keep an EMA: every trainable one with ``--model-ema``, else those an ``ema:N``
    node reads."""
    wanted = set(graph.trainable_nodes) if cfg.model_ema else set()
    wanted.update(graph.ema_source(i) for i in graph.ema_nodes)
    return tuple(sorted(wanted))


class NodeEmas:
    """One ``ModelEmaV3`` per node index (of the unwrapped model, so DDP and compile wrappers are
    not copied into it)."""

    def __init__(self, models: dict[int, nn.Module], *, decay: float, warmup: bool):
        from timm.utils import ModelEmaV3

        self.emas = {i: ModelEmaV3(m, decay=decay, use_warmup=warmup) for i, m in models.items()}
        for ema in self.emas.values():
            ema.requires_grad_(False)

    def __contains__(self, index: int) -> bool:
        return index in self.emas

    def __bool__(self) -> bool:
        return bool(self.emas)

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(self.emas)

    @torch.no_grad()
    def update(self, models: dict[int, nn.Module], step: int) -> None:
        for i, ema in self.emas.items():
            ema.update(models[i], step=step)

    @torch.no_grad()
    def logits(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Node ``index``'s EMA on the batch ``x`` (eval mode, detached)."""
        return self.emas[index].module(x)

    def module(self, index: int) -> nn.Module:
        return self.emas[index].module

    def state_dict(self) -> dict[int, dict]:
        return {i: ema.state_dict() for i, ema in self.emas.items()}

    def load_state_dict(self, state: Optional[dict]) -> list[int]:
        """Load the EMAs ``state`` has; returns the nodes it has none for (they keep the current weights)."""
        state = state or {}
        for i, ema in self.emas.items():
            if i in state:
                ema.load_state_dict(state[i])
        return [i for i in self.emas if i not in state]


def count_correct(emas: NodeEmas, batches: Iterable, inputs_of, norm_keys: dict[int, tuple], autocast,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct predictions of every EMA (in ``emas.indices`` order) and the image count, over ``batches``."""
    correct = torch.zeros(len(emas.indices), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        with autocast():
            inputs = inputs_of(images)
            for k, i in enumerate(emas.indices):
                z = emas.logits(i, inputs[norm_keys[i]]).float()
                correct[k] += (z.argmax(dim=1) == labels).sum()
        count += labels.shape[0]
    return correct, count


class EmaState:
    """The EMA part of :class:`~timm_dcl.trainer.GraphTrainer` (a mixin: it uses the trainer's nodes,
    graph, config, accelerator and evaluation loaders)."""

    emas: NodeEmas = NodeEmas({}, decay=0.0, warmup=False)

    def _setup_emas(self) -> None:
        """The task's EMAs (it holds them: its forward reads them for the ``ema:N`` nodes), built
        from ``ema_node_indices`` with the run's decay and warm-up."""
        self.emas = self.task.node_emas

    def _load_emas(self, state: Optional[dict]) -> None:
        missing = self.emas.load_state_dict(state)
        if missing and self.accelerator.is_main_process:
            self.accelerator.print(f"resume: the checkpoint has no EMA of node(s) {', '.join(map(str, missing))}: "
                                   "they start from the current weights")

    def _update_emas(self) -> None:
        if self.emas:
            self.task.update_ema(step=self.iteration)

    def _ema_record(self, split: str) -> dict:
        """``top1_ema``: every node's EMA top-1 (%) on ``split`` (None where a node keeps none). Runs
        after :meth:`evaluate` of the same split, whose cached loader it reads."""
        if not self.emas:
            return {}
        acc = self.accelerator
        for i in self.emas.indices:
            self.emas.module(i).eval()
        correct, count = count_correct(self.emas, self._eval_loaders[split], self._inputs,
                                       {i: self.nodes[i].norm_key for i in self.emas.indices}, acc.autocast,
                                       acc.device)
        correct, count = acc.reduce(correct, reduction="sum"), acc.reduce(count, reduction="sum")
        top1 = (correct * 100.0 / count).tolist()
        out: list = [None] * len(self.nodes)
        for k, i in enumerate(self.emas.indices):
            out[i] = top1[k]
        return {"top1_ema": out}
