"""Building a graph's nodes: the input size, each timm model, and where its weights come from.

A node starts from random weights, timm's pretrained weights (``pretrained``: the hub, or
``pretrained_file``: a local timm weight file), or a checkpoint (a frozen teacher, or a warm
start for a trainable node). timm's own pretrained loader is used for pretrained weights, so
its checkpoint filters apply (a ViT's position embedding is resampled to the input size) and
the classifier is re-initialised when the class count differs; what it leaves unchecked
(a file whose keys do not fit the model loads with ``strict=False``) is checked here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .checkpoint import load_node_weights
from .config import DATASETS, TrainConfig

__all__ = ["NATIVE_INPUT_SIZES", "resolve_input_size", "resolve_eval_crop", "model_kwargs_for",
           "check_models_run", "create_node_model", "pretrained_stats", "takes_paper_init", "UNNORMALISED"]

# The decoded size of the named data sets: their default input size (CIFAR 32, Tiny-ImageNet 64).
NATIVE_INPUT_SIZES = {"cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "tiny-imagenet": (3, 64, 64)}


def _pretrained_cfg(model_name: str):
    import timm

    from . import models  # noqa: F401  (the CIFAR networks' cfgs)

    try:
        return timm.models.get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError, KeyError):  # an unknown name: Graph.check_models says so
        return None


def resolve_input_size(cfg: TrainConfig, target_model: str) -> tuple[int, int, int]:
    """``--img-size``/``--input-size``, else the data's own size, else node 0's pretrained_cfg."""
    requested = cfg.requested_input_size
    if requested is not None:
        return requested
    if cfg.dataset in DATASETS:
        return NATIVE_INPUT_SIZES[cfg.dataset]
    pc = _pretrained_cfg(target_model)
    if pc is not None and getattr(pc, "input_size", None):
        return tuple(int(v) for v in pc.input_size)  # type: ignore[return-value]
    return (3, 224, 224)  # timm's default when a model declares nothing


def resolve_eval_crop(cfg: TrainConfig, target_model: str) -> tuple[Optional[float], str]:
    """Evaluation crop fraction and interpolation: the flag, else node 0's pretrained_cfg."""
    pc = _pretrained_cfg(target_model)
    crop = cfg.crop_pct if cfg.crop_pct is not None else (getattr(pc, "crop_pct", None) if pc else None)
    interpolation = (getattr(pc, "interpolation", None) if pc else None) or "bilinear"
    return crop, interpolation


def model_kwargs_for(spec, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """The node's model kwargs, with ``img_size`` added for models built for one input size
    (ViT, Swin, ...: ``fixed_input_size`` in their pretrained_cfg) when the input differs."""
    kwargs = dict(spec.model_kwargs)
    pc = _pretrained_cfg(spec.model)
    if (pc is not None and getattr(pc, "fixed_input_size", False) and "img_size" not in kwargs
            and tuple(pc.input_size[1:]) != tuple(input_size[1:])):
        kwargs["img_size"] = tuple(input_size[1:])
    return kwargs


#: The networks of the paper built here, which take ``paper_init`` (the authors' initialisation).
PAPER_INIT_MODULES = ("timm_dcl.models.cifar_resnet", "timm_dcl.models.wide_resnet")


def takes_paper_init(model_name: str) -> bool:
    import timm

    from . import models  # noqa: F401  (registers them)

    arch, _ = timm.models.split_model_name_tag(model_name)
    try:
        return timm.models.model_entrypoint(arch).__module__ in PAPER_INIT_MODULES
    except (RuntimeError, KeyError):
        return False


def _create(spec, where: str, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(spec.model, **kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: bad model keyword arguments {spec.model_kwargs}: {e}") from None


def check_models_run(graph, input_size: tuple[int, int, int]) -> None:
    """Build every node on the meta device and run one image of ``input_size`` through it, so
    a model that cannot run at that size fails now, with its name, not after the data loaded."""
    from .features import WithFeatures

    x_shape = (1, *input_size)
    feature_nodes = set(graph.feature_nodes)
    for i, spec in enumerate(graph.nodes):
        if spec.is_virtual:
            continue  # virtual: no model to build
        where = f"node {i} ({spec.model})"
        kwargs = model_kwargs_for(spec, input_size)
        try:
            with torch.device("meta"):
                model = _create(spec, where, num_classes=2, **kwargs)
                model.eval()
                with torch.no_grad():
                    model(torch.empty(x_shape))
                    if i in feature_nodes:
                        _check_features(WithFeatures(model, graph.feature_stage), x_shape, where)
        except NotImplementedError:
            continue  # an op without a meta kernel: the real forward will tell
        except ValueError as e:
            if str(e).startswith(where):
                raise
            raise ValueError(f"{where} cannot run at input size {tuple(input_size)}: {e}") from None
        except (RuntimeError, AssertionError, IndexError) as e:
            hint = "" if "img_size" in kwargs else " (set its size with --model-kwargs N:img_size=...)"
            raise ValueError(f"{where} cannot run at input size {tuple(input_size)}: "
                             f"{' '.join(str(e).split()) or type(e).__name__}{hint}") from None


def _check_features(module, x_shape, where: str) -> None:
    """The stage a feature edge reads must exist and be an NCHW map."""
    from .features import check_feature_model

    check_feature_model(module.model, where)
    try:
        _, feature = module(torch.empty(x_shape))
    except (AssertionError, IndexError, RuntimeError, ValueError) as e:
        raise ValueError(f"{where} cannot give the features of stage {module.stage} (--feature-stage): "
                         f"{' '.join(str(e).split()) or type(e).__name__}") from None
    if feature.dim() != 4:
        raise ValueError(f"{where}: stage {module.stage} gives features of shape {tuple(feature.shape)}, "
                         "not an NCHW map, so it cannot be in a feature edge")


def _classifier_rows(state: dict, classifier) -> Optional[int]:
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in names:
        w = state.get(f"{name}.weight")
        if isinstance(w, torch.Tensor) and w.dim() >= 1:
            return int(w.shape[0])
    return None


def _classifier_keys(model: nn.Module) -> tuple[str, ...]:
    pc = getattr(model, "pretrained_cfg", None) or {}
    names = pc.get("classifier")
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return tuple(f"{n}.{p}" for n in names for p in ("weight", "bias"))


def _from_pretrained_file(spec, path: str, *, num_classes: int, kwargs: dict, where: str) -> tuple[nn.Module, bool]:
    """timm's pretrained loader on a local file; returns (model, whether the classifier was kept)."""
    from timm.models import load_state_dict

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{where}: pretrained file {path} does not exist")
    try:
        state = load_state_dict(str(file))
    except Exception as e:  # a corrupt or foreign file: any unpickling/parsing error is bad input
        raise ValueError(f"{where}: cannot read pretrained file {path}: {' '.join(str(e).split())}") from None
    pc = _pretrained_cfg(spec.model)
    rows = _classifier_rows(state, pc.classifier if pc is not None else None)
    # Check the keys on a meta-device copy first: timm loads a file whose classifier it drops
    # with strict=False, which would accept a file of another architecture without a word.
    with torch.device("meta"):
        skeleton = _create(spec, where, num_classes=num_classes, **kwargs)
    head = set(_classifier_keys(skeleton))
    missing = sorted(k for k in skeleton.state_dict() if k not in state and k not in head)
    if missing:
        raise ValueError(f"{where}: pretrained file {path} does not fit {spec.model!r}: {len(missing)} of the "
                         f"model's tensors are not in it (e.g. {missing[:3]})")
    # Tell timm the file's own class count, so it keeps the classifier exactly when it fits.
    overlay = {"file": str(file), "num_classes": rows if rows is not None else -1}
    try:
        model = _create(spec, where, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes,
                        **kwargs)
    except RuntimeError as e:
        raise ValueError(f"{where}: pretrained file {path} does not fit {spec.model!r}: "
                         f"{' '.join(str(e).split())[:400]}") from None
    return model, rows == num_classes


def create_node_model(spec, index: int, *, num_classes: int, input_size: tuple[int, int, int],
                      log=print, paper_init: bool = False) -> nn.Module:
    """Node ``index``'s timm model with its weights: pretrained, a checkpoint, or random.

    ``paper_init``: the CIFAR networks of this package start from the authors' initialisation
    (``--recipe paper``; no zero-initialised last BN), unless the node's kwargs say otherwise.
    """
    where = f"node {index} ({spec.model})"
    kwargs = model_kwargs_for(spec, input_size)
    if paper_init and takes_paper_init(spec.model):
        kwargs.setdefault("paper_init", True)
    if spec.pretrained_file is not None:
        model, head_kept = _from_pretrained_file(spec, spec.pretrained_file, num_classes=num_classes,
                                                 kwargs=kwargs, where=where)
        source = f"pretrained file {spec.pretrained_file}"
    elif spec.pretrained:
        try:
            model = _create(spec, where, pretrained=True, num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError) as e:  # offline hub, unknown tag, no weights for the model
            raise ValueError(f"{where}: cannot load timm's pretrained weights ({' '.join(str(e).split())[:300]}); "
                             f"offline, give a local weight file with --pretrained-file {index}:PATH") from None
        pc = getattr(model, "pretrained_cfg", None) or {}
        head_kept = pc.get("num_classes") == num_classes
        source = "timm pretrained weights"
    else:
        model = _create(spec, where, pretrained=False, num_classes=num_classes, **kwargs)
        head_kept, source = True, None
        if spec.checkpoint is not None:
            # A frozen teacher must fit exactly; a warm start may bring another class count,
            # and then starts with a fresh classifier.
            meta = load_node_weights(spec.checkpoint, model, model_name=spec.model, num_classes=num_classes,
                                     where=where, new_head_ok=not spec.frozen,
                                     head_keys=_classifier_keys(model))
            head_kept = not meta.get("_head_reset", False)
            source = f"checkpoint {spec.checkpoint}"
    if spec.frozen and not head_kept:
        raise ValueError(f"{where} is frozen, but its weights ({source}) do not classify this data's {num_classes} "
                         "classes: a frozen teacher needs a classifier trained for them (or give it an open gate "
                         "so that it trains)")
    if source is not None:
        role = "frozen" if spec.frozen else "starts from"
        log(f"{where}: {role} {source}" + ("" if head_kept else f" (classifier re-initialised for {num_classes} classes)"))
    return model


#: (mean, std) that leave pixels in [0, 1], as the authors' code fed every node (``--recipe paper``).
UNNORMALISED = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def pretrained_stats(model: nn.Module, *, normalise: bool = True) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the node expects its input normalised with: its own pretrained_cfg
    (``normalise=False``: mean 0, std 1, i.e. pixels in [0, 1])."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if not normalise:
        return UNNORMALISED
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
