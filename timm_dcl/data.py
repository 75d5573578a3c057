"""Image data for timm-dcl: decode once, keep uint8 in memory, augment whole batches on the device.

A per-sample ``DataLoader`` spends most of a small-image epoch in Python (PIL decode, crop, flip,
collate per image). Here a split is decoded once into a uint8 tensor ``[N, 3, H, W]`` (optionally
cached on disk), :class:`BatchLoader` slices batches out of it, and :func:`augment_batch` pads,
crops and flips a whole batch with one gather on whichever device the batch lives on.

Sources are the Hugging Face hub copies (``uoft-cs/cifar10``, ``uoft-cs/cifar100``,
``zh-plus/tiny-imagenet``) or an offline folder in the same parquet layout (``data_dir``).
``datasets`` is imported only when data is loaded, so ``import timm_dcl`` stays light.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "DATASETS", "ImageData", "DataSplits", "DatasetUnavailableError",
    "build_data", "load_dataset_split", "balanced_subset_indices", "split_train_val",
    "decode_images", "default_cache_dir",
    "default_padding", "sample_augment_params", "apply_crop_flip", "augment_batch", "GPUAugment",
    "normalize", "Normalize", "BatchLoader",
    "ImageTensorDataset", "make_torch_dataset", "per_sample_train_transform",
]


# ---------------------------------------------------------------------------------------------
# data sets


@dataclass(frozen=True)
class _DatasetSpec:
    hub_name: str
    eval_split: str                 # the hub's held-out split: evaluation data
    label_columns: tuple[str, ...]  # first present wins
    example: str                    # an offline folder with this layout, for the "offline?" error


DATASETS: dict[str, _DatasetSpec] = {
    "cifar10": _DatasetSpec("uoft-cs/cifar10", "test", ("label", "fine_label"), "../shared/data/cifar10"),
    "cifar100": _DatasetSpec("uoft-cs/cifar100", "test", ("fine_label", "label"),
                             "../shared/data/cifar10, with columns img and fine_label"),
    "tiny-imagenet": _DatasetSpec("zh-plus/tiny-imagenet", "valid", ("label",), "../shared/data/tiny-imagenet-200"),
}
_IMAGE_COLUMNS = ("img", "image")
# Held-out split names tried, after the data set's own, in an offline folder.
_EVAL_SPLIT_NAMES = ("test", "valid", "validation")
# Decoding this few rows is cheaper than a cache round-trip; below it nothing is cached.
MIN_CACHED_ROWS = 4096
# Rows below which a process pool costs more than it saves.
_MIN_POOL_ROWS = 4096
_CACHE_FORMAT = 1


class DatasetUnavailableError(RuntimeError):
    """The requested data could not be found or loaded (offline hub, missing files)."""


def _spec(dataset: str) -> tuple[str, _DatasetSpec]:
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a string, got {type(dataset).__name__}")
    name = dataset.strip().lower().replace("_", "-")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}")
    return name, DATASETS[name]


@dataclass
class ImageData:
    """One decoded split: uint8 RGB images ``[N, 3, H, W]`` and int64 labels ``[N]``."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    #: Row of each image in its source split (for subsets: which rows were drawn).
    indices: Optional[torch.Tensor] = None

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dim() != 1 \
                or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be a tensor [N] with N = {self.images.shape[0]} (the image count)")
        if self.labels.dtype != torch.int64:
            self.labels = self.labels.long()
        if len(self.classes) < 1:
            raise ValueError("classes must name at least one class")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels must lie in [0, {len(self.classes)}), got "
                             f"[{int(self.labels.min())}, {int(self.labels.max())}]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class DataSplits:
    """Train, evaluation (the hub's test/valid split) and optional validation (held out of train)."""
    train: ImageData
    eval: ImageData
    val: Optional[ImageData]
    num_classes: int
    input_size: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# opening the source: hub or offline parquet folder


@dataclass
class _Split:
    ds: "object"            # datasets.Dataset
    name: str               # split name in the source
    fingerprint: list       # what the decoded-image cache is keyed by


def _import_datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency of the data path
        raise ImportError("loading image data needs the `datasets` package (pip install datasets)") from e
    return datasets


def _file_fingerprint(paths: Sequence[Path]) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_mtime_ns, st.st_size])
    return out


def _find_split_files(root: Path, split: str) -> list[Path]:
    # The hub stores splits as train.parquet, train-00000-of-00001.parquet, or either one level
    # down (plain_text/, data/); the first pattern that matches anything wins.
    for pattern in (f"{split}.parquet", f"{split}-*.parquet", f"*/{split}.parquet", f"*/{split}-*.parquet"):
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if found:
            return found
    return []


def _split_patterns(split: str) -> str:
    return f"{split}.parquet, {split}-*.parquet, */{split}.parquet or */{split}-*.parquet"


def _open_local(name: str, spec: _DatasetSpec, data_dir: Union[str, os.PathLike], splits: Sequence[str]) -> dict:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetUnavailableError(f"data_dir {str(root)!r} is not a directory")
    files: dict[str, tuple[str, list[Path]]] = {}
    for role in splits:
        names = ("train",) if role == "train" else (spec.eval_split,) + tuple(
            s for s in _EVAL_SPLIT_NAMES if s != spec.eval_split)
        for split in names:
            found = _find_split_files(root, split)
            if found:
                files[role] = (split, found)
                break
        else:
            raise DatasetUnavailableError(
                f"no {role} split for {name!r} in {str(root)!r}: looked for "
                + "; ".join(_split_patterns(s) for s in names))
    datasets = _import_datasets()
    # The parquet builder reads the Image/ClassLabel features from the schema metadata, exactly
    # as for the hub copy.
    loaded = datasets.load_dataset(
        "parquet", data_files={split: [str(p) for p in paths] for split, paths in files.values()})
    return {role: _Split(loaded[split], split, _file_fingerprint(paths)) for role, (split, paths) in files.items()}


def _open_hub(name: str, spec: _DatasetSpec, splits: Sequence[str]) -> dict:
    datasets = _import_datasets()
    held_out = "valid.parquet" if spec.eval_split == "valid" else "test.parquet"
    hint = (f"Pass --data-dir DIR with train.parquet and {held_out} in the hub's parquet layout "
            f"(e.g. {spec.example})")
    try:
        loaded = datasets.load_dataset(spec.hub_name)
    except (ConnectionError, OSError) as e:  # OfflineModeIsEnabled, DatasetNotFoundError, DNS, ...
        raise DatasetUnavailableError(
            f"could not load {spec.hub_name!r} from the Hugging Face hub (offline?): {e}. {hint}") from e
    out = {}
    for role in splits:
        split = "train" if role == "train" else spec.eval_split
        if split not in loaded:
            raise DatasetUnavailableError(
                f"{spec.hub_name!r} has no {split!r} split (found {', '.join(loaded)}). {hint}")
        ds = loaded[split]
        # The arrow files datasets prepared from the download stand for the source.
        fp = _file_fingerprint([f["filename"] for f in ds.cache_files]) or [[spec.hub_name, split]]
        out[role] = _Split(ds, split, fp)
    return out


def _open(name: str, spec: _DatasetSpec, data_dir, splits: Sequence[str]) -> dict:
    if data_dir is not None:
        return _open_local(name, spec, data_dir, splits)
    return _open_hub(name, spec, splits)


def _columns(split: _Split, spec: _DatasetSpec) -> tuple[str, str]:
    cols = list(split.ds.column_names)
    image = next((c for c in _IMAGE_COLUMNS if c in cols), None)
    label = next((c for c in spec.label_columns if c in cols), None)
    if image is None or label is None:
        missing = "image column (" + "/".join(_IMAGE_COLUMNS) + ")" if image is None else \
            "label column (" + "/".join(spec.label_columns) + ")"
        raise ValueError(f"split {split.name!r} has no {missing}; columns found: {', '.join(cols)}")
    return image, label


def _class_names(split: _Split, label_col: str) -> Optional[list[str]]:
    feature = split.ds.features[label_col]
    names = getattr(feature, "names", None)  # ClassLabel
    return list(names) if names else None


def _labels(split: _Split, label_col: str) -> np.ndarray:
    column = split.ds.with_format("arrow")[label_col]
    labels = np.asarray(column.to_numpy() if hasattr(column, "to_numpy") else column)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label column {label_col!r} of split {split.name!r} is not integer ({labels.dtype})")
    return labels.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------
# subset selection (on the labels, before any image is decoded)


def _check_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    return int(n)


def _balanced_counts(available: np.ndarray, n: int) -> np.ndarray:
    """Per-class counts summing to ``n``: as even as ``available`` allows, extras to low class ids."""
    counts = np.zeros_like(available)
    remaining = n
    while remaining > 0:
        open_ = np.flatnonzero(counts < available)
        share, extra = divmod(remaining, len(open_))
        give = np.full(len(open_), share, dtype=available.dtype)
        give[:extra] += 1
        give = np.minimum(give, available[open_] - counts[open_])
        counts[open_] += give
        remaining -= int(give.sum())
    return counts


def _class_permutations(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.cumsum(np.bincount(labels, minlength=num_classes))[:-1]
    return [rng.permutation(rows) for rows in np.split(order, bounds)]


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Separate streams so the eval subset does not move when the train selection changes.
    return np.random.default_rng([_check_count("seed", seed) & 0xFFFFFFFFFFFFFFFF, stream])


def balanced_subset_indices(labels, n: int, *, num_classes: Optional[int] = None, seed: int = 0,
                            _stream: int = 1) -> np.ndarray:
    """Sorted row indices of a seeded, class-balanced subset of ``n`` rows.

    Each class gets ``n // C`` rows, the remainder going one each to the lowest class ids; a class
    with too few rows gives its shortfall to the others.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = _check_count("subset size", n)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    if n < 1:
        raise ValueError(f"subset size must be ≥ 1, got {n}")
    if n > len(labels):
        raise ValueError(f"subset of {n} requested but only {len(labels)} images are available")
    perms = _class_permutations(labels, num_classes, _rng(seed, _stream))
    counts = _balanced_counts(np.array([len(p) for p in perms]), n)
    return np.sort(np.concatenate([p[:k] for p, k in zip(perms, counts)]))


def split_train_val(labels, *, val_size: int = 0, train_subset: Optional[int] = None,
                    num_classes: Optional[int] = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-balanced ``(train_rows, val_rows)`` of one training split, disjoint.

    ``val_size`` rows are held out first; the train rows (all the rest, or a balanced
    ``train_subset`` of them) come from what remains.
    """
    labels = np.asarray(labels, dtype=np.int64)
    val_size = _check_count("val_size", val_size)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    total = len(labels)
    if val_size < 0:
        raise ValueError(f"val_size must be ≥ 0, got {val_size}")
    if val_size >= total:
        raise ValueError(f"val_size={val_size} leaves no training images (the split has {total})")
    perms = _class_permutations(labels, num_classes, _rng(seed, 0))
    available = np.array([len(p) for p in perms])
    val_counts = _balanced_counts(available, val_size)
    rest = available - val_counts
    if train_subset is None:
        train_counts = rest
    else:
        train_subset = _check_count("train_subset", train_subset)
        if train_subset < 1:
            raise ValueError(f"train_subset must be ≥ 1, got {train_subset}")
        if train_subset > int(rest.sum()):
            held = f" after holding out val_size={val_size}" if val_size else ""
            raise ValueError(f"train_subset={train_subset} exceeds the {int(rest.sum())} training images "
                             f"available{held}")
        train_counts = _balanced_counts(rest, train_subset)
    val = np.concatenate([p[:v] for p, v in zip(perms, val_counts)])
    train = np.concatenate([p[v:v + t] for p, v, t in zip(perms, val_counts, train_counts)])
    return np.sort(train), np.sort(val)


# ---------------------------------------------------------------------------------------------
# decoding


def _decode_one(blob: Optional[bytes], path: Optional[str], row: int) -> np.ndarray:
    from PIL import Image
    if blob is None:
        if not path or not os.path.isfile(path):
            raise ValueError(f"row {row} has no image bytes and its path {path!r} is not a file")
        with open(path, "rb") as f:
            blob = f.read()
    with Image.open(io.BytesIO(blob)) as im:
        if im.mode != "RGB":  # greyscale, CMYK, palette, RGBA
            im = im.convert("RGB")
        return np.asarray(im)


def _decode_chunk(args) -> np.ndarray:
    blobs, paths, first_row = args
    out = None
    for i, (blob, path) in enumerate(zip(blobs, paths)):
        arr = _decode_one(blob, path, first_row + i)
        if out is None:
            out = np.empty((len(blobs),) + arr.shape, dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise ValueError(f"images differ in size: row {first_row} is {out.shape[1:3]}, "
                             f"row {first_row + i} is {arr.shape[:2]}")
        out[i] = arr
    return out


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def decode_images(blobs: Sequence[Optional[bytes]], paths: Optional[Sequence[Optional[str]]] = None, *,
                  num_workers: Optional[int] = None) -> torch.Tensor:
    """Decode encoded images (JPEG/PNG, …) with PIL into one uint8 tensor ``[N, 3, H, W]`` (RGB).

    All images must share one size. Large batches are decoded by a pool of forked processes.
    """
    n = len(blobs)
    paths = [None] * n if paths is None else list(paths)
    if n == 0:
        raise ValueError("no images to decode")
    workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    import multiprocessing as mp
    if workers > 1 and n >= _MIN_POOL_ROWS and "fork" in mp.get_all_start_methods():
        from concurrent.futures import ProcessPoolExecutor
        step = math.ceil(n / (workers * 4))
        jobs = [(list(blobs[i:i + step]), paths[i:i + step], i) for i in range(0, n, step)]
        # fork: the workers need only PIL/numpy, and spawning would re-import torch in each.
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
            chunks = list(pool.map(_decode_chunk, jobs))
    else:
        chunks = [_decode_chunk((list(blobs), paths, 0))]
    sizes = {c.shape[1:] for c in chunks}
    if len(sizes) > 1:
        raise ValueError(f"images differ in size: {sorted(s[:2] for s in sizes)}")
    arr = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _encoded_rows(split: _Split, image_col: str, rows: np.ndarray) -> tuple[list, list]:
    import pyarrow as pa
    table = split.ds.with_format("arrow")[rows.tolist()]
    column = table.column(image_col).combine_chunks()
    if pa.types.is_struct(column.type):  # the Image feature's storage: {bytes, path}
        names = [column.type.field(i).name for i in range(column.type.num_fields)]
        blobs = column.field("bytes").to_pylist() if "bytes" in names else [None] * len(column)
        paths = column.field("path").to_pylist() if "path" in names else [None] * len(column)
    elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        blobs, paths = column.to_pylist(), [None] * len(column)
    elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        blobs, paths = [None] * len(column), column.to_pylist()
    else:
        raise ValueError(f"image column {image_col!r} has unsupported type {column.type}")
    return blobs, paths


# ---------------------------------------------------------------------------------------------
# on-disk cache of decoded images


def default_cache_dir() -> Optional[Path]:
    """``$TIMM_DCL_CACHE`` or ``~/.cache/timm_dcl``; None when the variable is set to off/0/none/''."""
    env = os.environ.get("TIMM_DCL_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none", "false") else Path(env).expanduser()
    return Path.home() / ".cache" / "timm_dcl"


def _cache_path(cache_dir: Path, name: str, split: _Split, image_col: str, rows: np.ndarray) -> tuple[Path, str]:
    rows_hash = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()
    key = hashlib.sha256(json.dumps(
        [_CACHE_FORMAT, split.fingerprint, split.name, image_col, len(rows), rows_hash]).encode()).hexdigest()
    return cache_dir / f"{name}-{split.name}-{len(rows)}-{key[:20]}.pt", key


def _cache_load(path: Path, key: str, n: int) -> Optional[torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # truncated/corrupt: decode again and overwrite
        warnings.warn(f"ignoring unreadable image cache {path}: {e}")
        return None
    images = blob.get("images") if isinstance(blob, dict) else None
    if blob.get("key") != key or not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 \
            or images.dim() != 4 or images.shape[0] != n:
        return None
    return images


def _cache_save(path: Path, key: str, images: torch.Tensor) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: readers in other processes never see a partial file.
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": key, "images": images}, f)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache should be readable
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:  # a read-only or full cache disk must not stop training
        warnings.warn(f"could not write image cache {path}: {e}")


def _decode_split(name: str, split: _Split, image_col: str, rows: np.ndarray, labels: np.ndarray,
                  classes: list[str], *, cache_dir: Optional[Path], num_workers: Optional[int]) -> ImageData:
    if len(rows) == 0:
        raise ValueError(f"split {split.name!r} selects no images")
    images = None
    use_cache = cache_dir is not None and len(rows) >= MIN_CACHED_ROWS
    if use_cache:
        path, key = _cache_path(cache_dir, name, split, image_col, rows)
        images = _cache_load(path, key, len(rows))
    if images is None:
        blobs, paths = _encoded_rows(split, image_col, rows)
        images = decode_images(blobs, paths, num_workers=num_workers)
        if use_cache:
            _cache_save(path, key, images)
    return ImageData(images=images, labels=torch.from_numpy(labels[rows].copy()), classes=classes,
                     indices=torch.from_numpy(np.asarray(rows, dtype=np.int64)))


# ---------------------------------------------------------------------------------------------
# public loaders


def _resolve_cache(cache_dir, cache: bool) -> Optional[Path]:
    if not cache:
        return None
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _classes_and_count(splits: Sequence[_Split], label_col: str, labels: Sequence[np.ndarray]) -> list[str]:
    names = _class_names(splits[0], label_col)
    if names is None:  # plain integer labels: as many classes as the largest label says
        names = [str(i) for i in range(max(int(lab.max()) for lab in labels) + 1)]
    for split, lab in zip(splits, labels):
        if len(lab) == 0:
            raise ValueError(f"split {split.name!r} is empty")
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= len(names):
            raise ValueError(f"split {split.name!r}: labels in {label_col!r} span [{lo}, {hi}], outside the "
                             f"{len(names)} classes")
    return names


def build_data(dataset: str, *, data_dir: Optional[Union[str, os.PathLike]] = None,
               train_subset: Optional[int] = None, eval_subset: Optional[int] = None, val_size: int = 0,
               seed: int = 0, cache_dir: Optional[Union[str, os.PathLike]] = None, cache: bool = True,
               num_workers: Optional[int] = None) -> DataSplits:
    """Load and decode the train, eval (test/valid) and optional validation split of ``dataset``.

    ``data_dir`` is an offline folder in the hub's parquet layout; without it the hub copy is
    loaded through ``datasets``. Subsets and the validation split are seeded and class-balanced,
    and are drawn from the labels before any image is decoded. Decoded splits of at least
    ``MIN_CACHED_ROWS`` images are cached in ``cache_dir`` (default :func:`default_cache_dir`).
    """
    name, spec = _spec(dataset)
    for what, value in (("train_subset", train_subset), ("eval_subset", eval_subset)):
        if value is not None and _check_count(what, value) < 1:
            raise ValueError(f"{what} must be ≥ 1, got {value}")
    if _check_count("val_size", val_size) < 0:
        raise ValueError(f"val_size must be ≥ 0, got {val_size}")
    _check_count("seed", seed)
    source = _open(name, spec, data_dir, ("train", "eval"))
    train_split, eval_split = source["train"], source["eval"]
    image_col, label_col = _columns(train_split, spec)
    if _columns(eval_split, spec) != (image_col, label_col):
        raise ValueError(f"splits {train_split.name!r} and {eval_split.name!r} use different columns")
    train_labels, eval_labels = _labels(train_split, label_col), _labels(eval_split, label_col)
    classes = _classes_and_count((train_split, eval_split), label_col, (train_labels, eval_labels))
    num_classes = len(classes)

    train_rows, val_rows = split_train_val(train_labels, val_size=val_size, train_subset=train_subset,
                                           num_classes=num_classes, seed=seed)
    if eval_subset is None:
        eval_rows = np.arange(len(eval_labels))
    else:
        if eval_subset > len(eval_labels):
            raise ValueError(f"eval_subset={eval_subset} exceeds the {len(eval_labels)} images of split "
                             f"{eval_split.name!r}")
        eval_rows = balanced_subset_indices(eval_labels, eval_subset, num_classes=num_classes, seed=seed)

    cache_path = _resolve_cache(cache_dir, cache)
    kw = dict(cache_dir=cache_path, num_workers=num_workers)
    train = _decode_split(name, train_split, image_col, train_rows, train_labels, classes, **kw)
    val = _decode_split(name, train_split, image_col, val_rows, train_labels, classes, **kw) if val_size else None
    evaluation = _decode_split(name, eval_split, image_col, eval_rows, eval_labels, classes, **kw)
    if evaluation.input_size != train.input_size:
        raise ValueError(f"train images are {train.input_size} but {eval_split.name!r} images are "
                         f"{evaluation.input_size}")
    return DataSplits(train=train, eval=evaluation, val=val, num_classes=num_classes, input_size=train.input_size)


def load_dataset_split(dataset: str, split: str = "train", *, data_dir: Optional[Union[str, os.PathLike]] = None,
                       subset: Optional[int] = None, seed: int = 0,
                       cache_dir: Optional[Union[str, os.PathLike]] = None, cache: bool = True,
                       num_workers: Optional[int] = None) -> ImageData:
    """Decode one split (``"train"`` or ``"eval"``, the latter being test/valid), optionally a subset."""
    name, spec = _spec(dataset)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    src = _open(name, spec, data_dir, (split,))[split]
    image_col, label_col = _columns(src, spec)
    labels = _labels(src, label_col)
    classes = _classes_and_count((src,), label_col, (labels,))
    rows = np.arange(len(labels)) if subset is None else balanced_subset_indices(
        labels, subset, num_classes=len(classes), seed=seed, _stream=0 if split == "train" else 1)
    return _decode_split(name, src, image_col, rows, labels, classes,
                         cache_dir=_resolve_cache(cache_dir, cache), num_workers=num_workers)


# ---------------------------------------------------------------------------------------------
# batched augmentation on the device


def default_padding(height: int, width: Optional[int] = None) -> int:
    """Crop padding for an image size: 4 for 32×32 (the paper), an eighth of the side in general."""
    return min(height, height if width is None else width) // 8


def sample_augment_params(n: int, *, padding: int, flip: bool = True,
                          generator: Optional[torch.Generator] = None,
                          device: Union[str, torch.device, None] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop offsets ``[n, 2]`` (row, col) in ``[0, 2·padding]`` and flip flags ``[n]``.

    Offsets are drawn first, then flips, from ``generator`` (which must live on ``device``).
    """
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but the images are on {device}")
    if padding > 0:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=device)
    else:
        offsets = torch.zeros(n, 2, dtype=torch.long, device=device)
    if flip:
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=device)
    return offsets, flips


def _reflect(coords: torch.Tensor, size: int) -> torch.Tensor:
    # Index into the reflect-padded image without building it: -1 → 1, size → size-2 (no edge repeat).
    coords = coords.abs()
    return torch.where(coords >= size, 2 * (size - 1) - coords, coords)


def apply_crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, *, padding: int) -> torch.Tensor:
    """Crop each image out of its reflect-padded version at ``offsets``, then mirror where ``flips``.

    One gather for the whole batch; works for any dtype and device.
    """
    if images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    n, c, h, w = images.shape
    if tuple(offsets.shape) != (n, 2) or tuple(flips.shape) != (n,):
        raise ValueError(f"need offsets [{n}, 2] and flips [{n}], got {tuple(offsets.shape)} and {tuple(flips.shape)}")
    dev = images.device
    top = offsets[:, 0:1].to(dev) - padding
    left = offsets[:, 1:2].to(dev) - padding
    rows = _reflect(torch.arange(h, device=dev)[None] + top, h)              # [n, h]
    cols = _reflect(torch.arange(w, device=dev)[None] + left, w)             # [n, w]
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    index = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return images.reshape(n, c, h * w).gather(2, index).reshape(n, c, h, w)


def augment_batch(images: torch.Tensor, *, padding: Optional[int] = None, flip: bool = True,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Reflect-pad, random-crop back to H×W and randomly h-flip every image of a batch ``[N, C, H, W]``.

    Same dtype out as in (uint8 stays uint8). Randomness comes from ``generator`` only (on the
    images' device), so seeding it reproduces an epoch bit for bit.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a tensor [N, C, H, W]")
    n, _, h, w = images.shape
    padding = default_padding(h, w) if padding is None else int(padding)
    if padding < 0 or padding >= min(h, w):
        raise ValueError(f"padding must lie in [0, {min(h, w) - 1}] for {h}×{w} images, got {padding}")
    offsets, flips = sample_augment_params(n, padding=padding, flip=flip, generator=generator, device=images.device)
    return apply_crop_flip(images, offsets, flips, padding=padding)


class GPUAugment:
    """The paper's augmentation (reflect-pad, random crop, h-flip) for whole batches on any device."""

    def __init__(self, padding: Optional[int] = None, flip: bool = True):
        if padding is not None and padding < 0:
            raise ValueError(f"padding must be ≥ 0, got {padding}")
        self.padding = padding
        self.flip = flip

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return augment_batch(images, padding=self.padding, flip=self.flip, generator=generator)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, flip={self.flip})"


# ---------------------------------------------------------------------------------------------
# normalisation


def _stats(values, channels: int, name: str, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=dtype, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the images have {channels} channels")
    return t.view(1, channels, 1, 1)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Float ``(x − mean) / std`` per channel; uint8 input is scaled to [0, 1] first."""
    if images.dim() not in (3, 4):
        raise ValueError("images must be [C, H, W] or [N, C, H, W]")
    x = images.float().div_(255) if images.dtype == torch.uint8 else images
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    c = x.shape[-3]
    m = _stats(mean, c, "mean", x.device, x.dtype)
    s = _stats(std, c, "std", x.device, x.dtype)
    if bool((s <= 0).any()):
        raise ValueError("std must be > 0")
    if x.dim() == 3:
        m, s = m[0], s[0]
    return (x - m) / s


class Normalize(nn.Module):
    """``normalize`` as a module, to prepend to a node that has its own mean/std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(f"mean has {mean_t.numel()} values but std has {std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError("std must be > 0")
        # Not persistent: fixed by the model's config, so checkpoints stay plain model weights.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div(255) if x.dtype == torch.uint8 else x
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise ValueError(f"Normalize has {self.mean.shape[1]} channels, input has {x.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# ---------------------------------------------------------------------------------------------
# batching


class BatchLoader:
    """Batches ``(images_uint8, labels)`` out of an in-memory :class:`ImageData`.

    The order of an epoch is a permutation drawn from ``torch.Generator().manual_seed(seed + epoch)``,
    identical on every rank; with ``num_shards`` > 1 each rank takes its own contiguous,
    equal-size slice of it (the last ``N % num_shards`` images of the permutation are left out
    that epoch). ``device`` moves the whole split there once, so batches are sliced on the device.
    """

    def __init__(self, data: ImageData, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                 seed: int = 0, num_shards: int = 1, shard_index: int = 0,
                 device: Union[str, torch.device, None] = None, pin_memory: bool = False):
        if not isinstance(data, ImageData):
            raise TypeError(f"data must be an ImageData, got {type(data).__name__}")
        batch_size = _check_count("batch_size", batch_size)
        num_shards, shard_index = _check_count("num_shards", num_shards), _check_count("shard_index", shard_index)
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(f"need num_shards ≥ 1 and 0 ≤ shard_index < num_shards, got {shard_index}/{num_shards}")
        if len(data) < num_shards:
            raise ValueError(f"{len(data)} images cannot be split over {num_shards} shards")
        self.images, self.labels = data.images, data.labels
        if device is not None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.pin_memory = bool(pin_memory) and self.images.device.type == "cpu"
        if self.pin_memory and not torch.cuda.is_available():
            warnings.warn("pin_memory=True but no CUDA device is available; not pinning")
            self.pin_memory = False
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed = _check_count("seed", seed)
        self.num_shards, self.shard_index = num_shards, shard_index
        self.epoch = 0
        self.per_shard = len(data) // num_shards

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_count("epoch", epoch)

    def epoch_indices(self, epoch: Optional[int] = None) -> torch.Tensor:
        """This shard's row order for ``epoch`` (default: the current one), int64 on the CPU."""
        epoch = self.epoch if epoch is None else epoch
        n = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
        else:
            order = torch.arange(n)
        start = self.shard_index * self.per_shard
        return order[start:start + self.per_shard]

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_shard // self.batch_size
        return math.ceil(self.per_shard / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_indices().to(self.images.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images, labels = self.images[idx], self.labels[idx]
            if self.pin_memory:
                images, labels = images.pin_memory(), labels.pin_memory()
            yield images, labels


# ---------------------------------------------------------------------------------------------
# per-sample baseline (a standard Dataset for a torch DataLoader)


class ImageTensorDataset(Dataset):
    """``(transform(image_uint8_chw), label)`` per index, for a per-sample ``DataLoader``."""

    def __init__(self, data: ImageData, transform=None):
        self.images, self.labels, self.transform = data.images, data.labels, transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int):
        image = self.images[i]
        return (self.transform(image) if self.transform is not None else image), int(self.labels[i])


def make_torch_dataset(data: ImageData, transform=None) -> ImageTensorDataset:
    return ImageTensorDataset(data, transform)


def per_sample_train_transform(size: Union[int, tuple[int, int]] = 32, *, padding: Optional[int] = None,
                               flip: bool = True, mean=None, std=None):
    """torchvision (v2) version of the same augmentation, applied one image at a time."""
    from torchvision.transforms import v2
    h, w = (size, size) if isinstance(size, int) else size
    ops = [v2.RandomCrop((h, w), padding=default_padding(h, w) if padding is None else padding,
                         padding_mode="reflect")]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.ToDtype(torch.float32, scale=True))
    if mean is not None and std is not None:
        ops.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(ops)
