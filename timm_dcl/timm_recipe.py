"""timm's training recipe on a graph: the flags, their checks, and which data path they need.

The flags keep the names and meanings of timm's ``train.py``: mixup and CutMix (``--mixup``,
``--cutmix``, ``--cutmix-minmax``, ``--mixup-prob``, ``--mixup-switch-prob``, ``--mixup-mode``,
``--mixup-off-epoch``) and label smoothing (``--smoothing``) through ``timm.data.Mixup``, whose
soft targets the fused loss op takes directly; per-image augmentation (``--aa``,
``--color-jitter``, ``--train-interpolation``) through timm's transforms in the streaming
path; random erasing (``--reprob``, ``--remode``, ``--recount``) through timm's
``RandomErasing`` on the device, for both paths; and ``--grad-accum-steps``. Defaults are
the paper's recipe (all off), not timm's (smoothing 0.1, colour jitter 0.4).
"""
from __future__ import annotations

import argparse
from typing import Optional

__all__ = ["add_timm_recipe_args", "check_timm_recipe", "needs_streaming", "streaming_reason", "MIXUP_MODES",
           "RE_MODES", "TRAIN_INTERPOLATIONS"]

MIXUP_MODES = ("batch", "pair", "elem")
RE_MODES = ("pixel", "rand", "const")
# timm's str_to_interp_mode names, and "random" (a random one per image), as its train.py takes them.
TRAIN_INTERPOLATIONS = ("random", "bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
# Fields of TrainConfig these flags fill (also what a search compares between runs).
FIELDS = ("mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob", "mixup_mode", "mixup_off_epoch",
          "smoothing", "aa", "reprob", "remode", "recount", "color_jitter", "train_interpolation", "grad_accum_steps")


def add_timm_recipe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("timm's training recipe (timm train.py's flags; default: off, as the paper)")
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup alpha, mixup on when > 0")
    g.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="CutMix alpha, CutMix on when > 0")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="CutMix box ratio bounds (overrides --cutmix alpha and enables CutMix)")
    g.add_argument("--mixup-prob", type=float, default=1.0, metavar="P",
                   help="probability of mixup or CutMix per batch (or element)")
    g.add_argument("--mixup-switch-prob", type=float, default=0.5, metavar="P",
                   help="probability of CutMix instead of mixup when both are on")
    g.add_argument("--mixup-mode", default="batch", choices=MIXUP_MODES,
                   help="how mixup/CutMix parameters are drawn: per batch, pair or element")
    g.add_argument("--mixup-off-epoch", type=int, default=0, metavar="N",
                   help="turn mixup/CutMix off from 0-based epoch N on (0: never)")
    g.add_argument("--smoothing", type=float, default=0.0, metavar="EPS",
                   help="label smoothing of the label edges (soft targets; timm's train.py default is 0.1)")
    g.add_argument("--aa", default=None, metavar="NAME",
                   help="timm's AutoAugment/RandAugment/AugMix policy, e.g. rand-m9-mstd0.5-inc1, v0r, "
                        "augmix-m5-w4-d2 (per image: the training split streams)")
    g.add_argument("--color-jitter", type=float, default=None, metavar="F",
                   help="colour jitter factor (per image: the training split streams; off with --aa, as in timm)")
    g.add_argument("--train-interpolation", default=None, choices=TRAIN_INTERPOLATIONS,
                   help="interpolation of the training crop and --aa (per image: the training split streams; "
                        "default: the evaluation's)")
    g.add_argument("--reprob", type=float, default=0.0, metavar="P", help="random erasing probability")
    g.add_argument("--remode", default="pixel", choices=RE_MODES, help="random erasing fill mode")
    g.add_argument("--recount", type=int, default=1, metavar="N", help="random erasing count (at most N boxes)")
    g.add_argument("--grad-accum-steps", type=int, default=1, metavar="N",
                   help="accumulate the gradients of N batches per optimiser update (the lr schedule and "
                        "the linear gates' k/K count updates)")


def _check_aa(name: str) -> None:
    """Build the policy once (timm parses the name there) so that a bad one fails at the flags."""
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

    hparams = dict(translate_const=14, img_mean=(124, 116, 104))
    try:
        if name.startswith("rand"):
            rand_augment_transform(name, hparams)
        elif name.startswith("augmix"):
            augment_and_mix_transform(name, hparams)
        else:
            auto_augment_transform(name, hparams)
    except Exception as e:  # timm signals a bad policy with asserts, KeyErrors, ValueErrors
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"--aa {name!r}: not a policy timm knows ({detail}); e.g. rand-m9-mstd0.5-inc1, v0, "
                         "augmix-m5-w4-d2") from None


def check_timm_recipe(cfg) -> None:
    """The one-line errors of these flags (ValueError; the scripts print it and exit 2)."""
    for name in ("mixup", "cutmix", "smoothing", "mixup_prob", "mixup_switch_prob", "reprob"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a number ≥ 0, got {value!r}")
    for name in ("smoothing", "mixup_prob", "mixup_switch_prob", "reprob"):
        if getattr(cfg, name) > 1:
            raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1], got {getattr(cfg, name)}")
    if cfg.smoothing == 1:
        raise ValueError("--smoothing must be below 1 (1 leaves no trace of the label), got 1")
    if cfg.cutmix_minmax is not None:
        lo_hi = list(cfg.cutmix_minmax)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] < lo_hi[1] <= 1:
            raise ValueError(f"--cutmix-minmax must be MIN MAX with 0 < MIN < MAX ≤ 1, got {cfg.cutmix_minmax}")
    if cfg.mixup_mode not in MIXUP_MODES:
        raise ValueError(f"--mixup-mode must be one of {', '.join(MIXUP_MODES)}, got {cfg.mixup_mode!r}")
    if isinstance(cfg.mixup_off_epoch, bool) or not isinstance(cfg.mixup_off_epoch, int) or cfg.mixup_off_epoch < 0:
        raise ValueError(f"--mixup-off-epoch must be an epoch ≥ 0 (0: never), got {cfg.mixup_off_epoch!r}")
    if mixes(cfg) and cfg.batch_size % 2:
        raise ValueError(f"--mixup/--cutmix pair the samples of a batch: --batch-size must be even, got {cfg.batch_size}")
    if cfg.remode not in RE_MODES:
        raise ValueError(f"--remode must be one of {', '.join(RE_MODES)}, got {cfg.remode!r}")
    if isinstance(cfg.recount, bool) or not isinstance(cfg.recount, int) or cfg.recount < 1:
        raise ValueError(f"--recount must be an integer ≥ 1, got {cfg.recount!r}")
    if cfg.color_jitter is not None and not cfg.color_jitter >= 0:
        raise ValueError(f"--color-jitter must be ≥ 0, got {cfg.color_jitter}")
    if cfg.train_interpolation is not None and cfg.train_interpolation not in TRAIN_INTERPOLATIONS:
        raise ValueError(f"--train-interpolation must be one of {', '.join(TRAIN_INTERPOLATIONS)}, "
                         f"got {cfg.train_interpolation!r}")
    if cfg.aa is not None:
        if not isinstance(cfg.aa, str) or not cfg.aa.strip():
            raise ValueError(f"--aa must name a policy, got {cfg.aa!r}")
        _check_aa(cfg.aa)
    if isinstance(cfg.grad_accum_steps, bool) or not isinstance(cfg.grad_accum_steps, int) or cfg.grad_accum_steps < 1:
        raise ValueError(f"--grad-accum-steps must be an integer ≥ 1, got {cfg.grad_accum_steps!r}")
    reason = streaming_reason(cfg)
    if reason and cfg.in_memory is True:
        raise ValueError(f"--in-memory yes: {reason} is a per-image transform, which only the streaming path "
                         "runs; drop --in-memory yes (or pass --in-memory no)")


def mixes(cfg) -> bool:
    """Whether timm's Mixup mixes samples (mixup or CutMix on), as its train.py decides."""
    return cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None


def streaming_reason(cfg) -> Optional[str]:
    """The flag that needs the per-image (streaming) path, or None."""
    for flag, value in (("--aa", cfg.aa), ("--color-jitter", cfg.color_jitter),
                        ("--train-interpolation", cfg.train_interpolation)):
        if value is not None:
            return f"{flag} {value}"
    return None


def needs_streaming(cfg) -> bool:
    return streaming_reason(cfg) is not None
