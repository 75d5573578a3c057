"""Per-image transforms (PIL in, uint8 CHW tensor out, not normalised) for the streaming path and
for resizing while decoding into memory.

timm's ``create_transform(..., use_prefetcher=True)`` gives the training crop (random-resized-crop,
flip) and the eval resize + centre crop (``crop_pct``), ending in a uint8 tensor that timm's
``fast_collate`` batches; each node normalises on the device with its own mean/std. timm has no
reflect-pad crop (the paper's CIFAR augmentation), so for images trained at their own small size
that one crop is torchvision's ``RandomCrop(padding_mode="reflect")``, followed by the same flip.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .augment import default_padding, uses_pad_crop

__all__ = ["train_transform", "eval_transform", "storage_transform"]


def _to_uint8_tensor():
    from timm.data.transforms import MaybePILToTensor
    return MaybePILToTensor()


def train_transform(native_hw: Optional[Sequence[int]], input_size: Sequence[int], *,
                    interpolation: str = "bilinear", auto_augment: Optional[str] = None,
                    color_jitter: Optional[float] = None, train_interpolation: Optional[str] = None):
    """The per-image training transform: reflect-pad crop + flip when the images are trained at
    their own small size (see :func:`.augment.uses_pad_crop`), else timm's random-resized-crop + flip;
    then timm's ``auto_augment`` policy (RandAugment, AutoAugment, AugMix) or colour jitter
    (off under a policy, as in timm), at ``train_interpolation`` (default ``interpolation``)."""
    from torchvision import transforms
    h, w = input_size[-2:]
    interp = train_interpolation or interpolation
    if auto_augment:
        _timm_policies_on_this_pillow()
    if native_hw is not None and uses_pad_crop(native_hw, (h, w)):
        return transforms.Compose([
            # pad_if_needed: an image smaller than the sampled ones must not stop an epoch
            transforms.RandomCrop((h, w), padding=default_padding(h, w), pad_if_needed=True, padding_mode="reflect"),
            transforms.RandomHorizontalFlip(),
            *_pixel_policy((h, w), auto_augment, color_jitter, interp),
            _to_uint8_tensor(),
        ])
    from timm.data import create_transform
    # color_jitter=None unless asked: the same augmentation as the in-memory path's batched crop and flip.
    return create_transform((3, h, w), is_training=True, use_prefetcher=True, color_jitter=color_jitter,
                            auto_augment=auto_augment, interpolation=interp)


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, also for 0 bits: timm's policies ask for 0 at their top magnitudes (a
    black image, as Pillow gave before 11), which Pillow ≥ 11 refuses with a ValueError."""
    if bits_to_keep <= 0:
        from PIL import Image
        return Image.new(img.mode, img.size)
    from timm.data.auto_augment import posterize
    return posterize(img, bits_to_keep, **kwargs)


def _timm_policies_on_this_pillow() -> None:
    """Route timm's Posterize ops through :func:`_posterize` (ops are looked up when a policy is
    built, so this must run before)."""
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = _posterize


def _pixel_policy(hw: Sequence[int], auto_augment: Optional[str], color_jitter: Optional[float], interpolation: str):
    """timm's colour stage of ``transforms_imagenet_train`` (its auto-augment policy, or else colour
    jitter), for the pad-crop path, which timm's factory has no crop for."""
    if auto_augment:
        from timm.data import IMAGENET_DEFAULT_MEAN
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        # the hyper-parameters timm's factory gives its policies
        params = dict(translate_const=int(min(hw) * 0.45),
                      img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN))
        if interpolation != "random":
            params["interpolation"] = str_to_pil_interp(interpolation)
        if auto_augment.startswith("rand"):
            return [rand_augment_transform(auto_augment, params)]
        if auto_augment.startswith("augmix"):
            params["translate_pct"] = 0.3
            return [augment_and_mix_transform(auto_augment, params)]
        return [auto_augment_transform(auto_augment, params)]
    if color_jitter is not None:
        from torchvision import transforms
        return [transforms.ColorJitter(*(float(color_jitter),) * 3)]
    return []


def eval_transform(native_hw: Optional[Sequence[int]], input_size: Sequence[int], *,
                   crop_pct: Optional[float] = None, interpolation: str = "bilinear"):
    """Images already at the input size pass unchanged (the paper evaluates CIFAR as stored) unless
    ``crop_pct`` is given; otherwise timm's eval transform: resize to ``input / crop_pct`` and
    centre-crop the input size."""
    from torchvision import transforms
    h, w = input_size[-2:]
    if crop_pct is None and native_hw is not None and tuple(native_hw) == (h, w):
        # CenterCrop is the identity on images of the input size, and keeps a stray other size
        # from breaking the batch.
        return transforms.Compose([transforms.CenterCrop((h, w)), _to_uint8_tensor()])
    from timm.data import create_transform
    return create_transform((3, h, w), is_training=False, use_prefetcher=True, crop_pct=crop_pct,
                            interpolation=interpolation)


def storage_transform(side: int, *, interpolation: str = "bilinear"):
    """For training images of mixed sizes kept in memory: shorter side resized to ``side``, centre
    square kept, so the batched random-resized-crop can draw from one tensor."""
    from timm.data import create_transform
    return create_transform((3, side, side), is_training=False, use_prefetcher=True, crop_pct=1.0,
                            interpolation=interpolation)
