"""Where images come from, row by row, without decoding anything up front.

A source is a set of splits (roles ``"train"`` and ``"eval"``) that share one class list. Each
split knows its labels (read without touching the images), hands out the encoded bytes of any
rows (for the in-memory decoder) and opens any single row as a PIL image (for the streaming
path). Kinds of source:

- the named data sets ``cifar10``, ``cifar100``, ``tiny-imagenet``: their hub copy, or an offline
  folder in the same parquet layout (``data_dir``);
- ``parquet``: any folder of parquet split files in the Hugging Face layout, the image and label
  columns read from the schema's ``datasets`` features (or named by the caller);
- ``hfds/<hub id or local path>``: ``datasets.load_dataset`` of it, then the same code as parquet;
- ``folder``: an image folder read by timm's reader (:mod:`.folder`).
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["DATASETS", "DatasetUnavailableError", "Source", "SourceSplit", "open_source"]


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
#: Kinds of source besides the named data sets.
GENERIC = ("folder", "parquet", "hfds/<hub id>")
_IMAGE_COLUMNS = ("img", "image")
# Held-out split names tried, after the data set's own, in an offline folder.
_EVAL_SPLIT_NAMES = ("test", "valid", "validation")
# For generic sources (folders, parquet, hub): the first of these that exists is the eval split.
_GENERIC_EVAL_NAMES = ("val", "validation", "valid", "test")
# timm's create_dataset prefixes whose readers are iterable (no random access, no label column
# up front): class-balanced subsets and epoch-seeded shuffling need both.
_ITERABLE_PREFIXES = ("hfids", "tfds", "wds")


class DatasetUnavailableError(RuntimeError):
    """The requested data could not be found or loaded (offline hub, missing files)."""


def _import_datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency of the data path
        raise ImportError("loading image data needs the `datasets` package (pip install datasets)") from e
    return datasets


def pil_rgb(blob: Optional[bytes], path: Optional[str], row: int):
    """Open encoded bytes (or, without them, a file) as an RGB PIL image; pixels decoded."""
    from PIL import Image
    if blob is None:
        if not path or not os.path.isfile(path):
            raise ValueError(f"row {row} has no image bytes and its path {path!r} is not a file")
        with open(path, "rb") as f:
            blob = f.read()
    im = Image.open(io.BytesIO(blob))
    if im.mode != "RGB":  # greyscale, CMYK, palette, RGBA
        return im.convert("RGB")
    im.load()
    return im


# ---------------------------------------------------------------------------------------------
# the split and source interfaces


class SourceSplit:
    """One split: ``labels`` (int64, every row) and row-wise access to its encoded images."""
    name: str
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> list:
        """What the decoded-image cache is keyed by: changes when the files change."""
        raise NotImplementedError

    def encoded(self, rows: np.ndarray) -> tuple[list, list]:
        """``(blobs, paths)`` of ``rows``: encoded bytes, or None and a file to read."""
        raise NotImplementedError

    def open_image(self, row: int):
        """Row ``row`` as an RGB PIL image."""
        blobs, paths = self.encoded(np.array([row]))
        return pil_rgb(blobs[0], paths[0], row)

    def image_size(self, row: int) -> tuple[int, int]:
        """``(height, width)`` of row ``row`` from its header, without decoding the pixels."""
        from PIL import Image
        blobs, paths = self.encoded(np.array([row]))
        with Image.open(io.BytesIO(blobs[0]) if blobs[0] is not None else paths[0]) as im:
            return im.size[1], im.size[0]


@dataclass
class Source:
    key: str                          # names the source in cache files
    classes: list[str]
    splits: dict[str, SourceSplit] = field(default_factory=dict)  # role ("train"/"eval") -> split


# ---------------------------------------------------------------------------------------------
# Arrow-backed splits: named data sets, parquet folders, hub data sets


def _file_fingerprint(paths: Sequence[Path]) -> list:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([str(Path(p).resolve()), st.st_mtime_ns, st.st_size])
    return out


class ArrowSplit(SourceSplit):
    """A ``datasets.Dataset`` (memory-mapped Arrow) with an image and a label column."""

    def __init__(self, ds, name: str, image_col: str, label_col: str, fingerprint: list):
        self.ds, self.name, self.image_col, self.label_col = ds, name, image_col, label_col
        self._fingerprint = fingerprint
        self.labels = _labels(ds, name, label_col)
        self._arrow = None

    def fingerprint(self) -> list:
        return self._fingerprint

    def encoded(self, rows: np.ndarray) -> tuple[list, list]:
        import pyarrow as pa
        if self._arrow is None:  # built lazily: a worker process makes its own view of the memory map
            self._arrow = self.ds.with_format("arrow")
        table = self._arrow[np.asarray(rows).tolist()]
        column = table.column(self.image_col).combine_chunks()
        if pa.types.is_struct(column.type):  # the Image feature's storage: {bytes, path}
            names = [column.type.field(i).name for i in range(column.type.num_fields)]
            blobs = column.field("bytes").to_pylist() if "bytes" in names else [None] * len(column)
            paths = column.field("path").to_pylist() if "path" in names else [None] * len(column)
        elif pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            blobs, paths = column.to_pylist(), [None] * len(column)
        elif pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            blobs, paths = [None] * len(column), column.to_pylist()
        else:
            raise ValueError(f"image column {self.image_col!r} of split {self.name!r} has unsupported type "
                             f"{column.type} (need encoded image bytes or file paths)")
        return blobs, paths

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_arrow"] = None
        return state


def _labels(ds, split_name: str, label_col: str) -> np.ndarray:
    column = ds.with_format("arrow")[label_col]
    labels = np.asarray(column.to_numpy() if hasattr(column, "to_numpy") else column)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label column {label_col!r} of split {split_name!r} is not integer ({labels.dtype})")
    return labels.astype(np.int64, copy=False)


def class_list(splits: Sequence[SourceSplit], names: Optional[Sequence[str]], what: str) -> list[str]:
    """The class names (``names``, or ``"0"…"K-1"`` for plain integer labels), checked against every split."""
    for split in splits:
        if len(split.labels) == 0:
            raise ValueError(f"split {split.name!r} is empty")
    if names is None:  # plain integer labels: as many classes as the largest label says
        names = [str(i) for i in range(max(int(s.labels.max()) for s in splits) + 1)]
    names = list(names)
    for split in splits:
        lo, hi = int(split.labels.min()), int(split.labels.max())
        if lo < 0 or hi >= len(names):
            hint = " (hub data sets mark unlabelled rows with -1)" if lo < 0 else ""
            raise ValueError(f"split {split.name!r}: labels in {what} span [{lo}, {hi}], outside the "
                             f"{len(names)} classes{hint}")
    return names


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


def _check_dir(data_dir) -> Path:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetUnavailableError(f"data_dir {str(root)!r} is not a directory")
    return root


def _load_parquet_dir(root: Path, label: str, candidates: dict[str, Sequence[str]]) -> dict:
    """role -> (split name, datasets.Dataset, fingerprint) for the first split file stem that exists."""
    files: dict[str, tuple[str, list[Path]]] = {}
    for role, names in candidates.items():
        for split in names:
            found = _find_split_files(root, split)
            if found:
                files[role] = (split, found)
                break
        else:
            raise DatasetUnavailableError(
                f"no {role} split for {label!r} in {str(root)!r}: looked for "
                + "; ".join(_split_patterns(s) for s in names))
    datasets = _import_datasets()
    # The parquet builder reads the Image/ClassLabel features from the schema metadata, exactly
    # as for the hub copy.
    loaded = datasets.load_dataset(
        "parquet", data_files={split: [str(p) for p in paths] for split, paths in files.values()})
    return {role: (split, loaded[split], _file_fingerprint(paths)) for role, (split, paths) in files.items()}


def _eval_names(val_split: Optional[str], own: Sequence[str]) -> tuple[str, ...]:
    if val_split is not None:
        return (val_split,)
    return tuple(dict.fromkeys(own))


# ---------------------------------------------------------------------------------------------
# columns


def _pick_named_columns(ds, split_name: str, spec: _DatasetSpec, image_column, label_column) -> tuple[str, str]:
    cols = list(ds.column_names)
    image = image_column or next((c for c in _IMAGE_COLUMNS if c in cols), None)
    label = label_column or next((c for c in spec.label_columns if c in cols), None)
    if image is None or label is None:
        missing = "image column (" + "/".join(_IMAGE_COLUMNS) + ")" if image is None else \
            "label column (" + "/".join(spec.label_columns) + ")"
        raise ValueError(f"split {split_name!r} has no {missing}; columns found: {', '.join(cols)}")
    _check_override(cols, split_name, image_column, label_column)
    return image, label


def _check_override(cols: Sequence[str], split_name: str, image_column, label_column) -> None:
    for what, col in (("image_column", image_column), ("label_column", label_column)):
        if col is not None and col not in cols:
            raise ValueError(f"{what} {col!r} is not a column of split {split_name!r}; columns: {', '.join(cols)}")


def _pick_feature_columns(ds, split_name: str, image_column, label_column) -> tuple[str, str]:
    """Image and label columns from the ``datasets`` features: an Image feature; a ClassLabel or
    integer column. Overrides win; an ambiguous or missing choice is an error naming the flag."""
    datasets = _import_datasets()
    cols = list(ds.column_names)
    _check_override(cols, split_name, image_column, label_column)
    feats = ds.features

    def choose(found: list[str], what: str, flag: str, preferred: Sequence[str]) -> str:
        if len(found) == 1:
            return found[0]
        pick = next((c for c in preferred if c in found), None)
        if pick is not None:
            return pick
        kind = "several" if found else "no"
        listed = f" ({', '.join(found)})" if found else ""
        raise ValueError(f"split {split_name!r} has {kind} {what} columns{listed}; columns: {', '.join(cols)}. "
                         f"Name one with {flag}")

    image = image_column or choose([c for c in cols if isinstance(feats[c], datasets.Image)],
                                   "image (Image feature)", "image_column (--image-column)", _IMAGE_COLUMNS)
    if label_column is None:
        class_labels = [c for c in cols if isinstance(feats[c], datasets.ClassLabel)]
        ints = [c for c in cols if c != image and isinstance(feats[c], datasets.Value)
                and feats[c].dtype.startswith(("int", "uint"))]
        label_column = choose(class_labels or ints, "label (ClassLabel or integer)",
                              "label_column (--label-column)", ("label", "labels", "fine_label", "target"))
    return image, label_column


def _class_names(ds, label_col: str) -> Optional[list[str]]:
    names = getattr(ds.features[label_col], "names", None)  # ClassLabel
    return list(names) if names else None


def _arrow_source(key: str, opened: dict, pick) -> Source:
    """role -> (split name, Dataset, fingerprint) into a Source, columns chosen by ``pick`` on train."""
    train_name, train_ds, _ = opened.get("train", next(iter(opened.values())))
    image_col, label_col = pick(train_ds, train_name)
    splits = {}
    for role, (name, ds, fp) in opened.items():
        if (image_col, label_col) != pick(ds, name):
            raise ValueError(f"splits {train_name!r} and {name!r} use different columns")
        splits[role] = ArrowSplit(ds, name, image_col, label_col, fp)
    classes = class_list(list(splits.values()), _class_names(train_ds, label_col), repr(label_col))
    return Source(key, classes, splits)


# ---------------------------------------------------------------------------------------------
# opening a source by name


def _open_named(name: str, spec: _DatasetSpec, data_dir, roles, train_split, val_split,
                image_column, label_column) -> Source:
    def pick(ds, split_name):
        return _pick_named_columns(ds, split_name, spec, image_column, label_column)
    candidates = {"train": (train_split or "train",),
                  "eval": _eval_names(val_split, (spec.eval_split,) + _EVAL_SPLIT_NAMES)}
    candidates = {role: candidates[role] for role in roles}
    if data_dir is not None:
        return _arrow_source(name, _load_parquet_dir(_check_dir(data_dir), name, candidates), pick)
    held_out = "valid.parquet" if spec.eval_split == "valid" else "test.parquet"
    hint = (f"Pass --data-dir DIR with train.parquet and {held_out} in the hub's parquet layout "
            f"(e.g. {spec.example})")
    return _arrow_source(name, _load_hub(spec.hub_name, None, candidates, hint), pick)


def _load_hub(hub_id: str, cache_dir, candidates: dict[str, Sequence[str]], hint: str) -> dict:
    datasets = _import_datasets()
    try:
        loaded = datasets.load_dataset(hub_id, cache_dir=None if cache_dir is None else str(cache_dir))
    except (ConnectionError, OSError) as e:  # OfflineModeIsEnabled, DatasetNotFoundError, DNS, ...
        raise DatasetUnavailableError(
            f"could not load {hub_id!r} from the Hugging Face hub (offline?): {e}. {hint}") from e
    except ValueError as e:  # e.g. a local folder with no data files datasets can read
        raise DatasetUnavailableError(f"could not load {hub_id!r} with datasets.load_dataset: {e}") from e
    if not hasattr(loaded, "keys"):
        raise DatasetUnavailableError(f"{hub_id!r} did not load as a set of splits")
    out = {}
    for role, names in candidates.items():
        split = next((s for s in names if s in loaded), None)
        if split is None:
            raise DatasetUnavailableError(
                f"{hub_id!r} has no {role} split (looked for {', '.join(names)}; found {', '.join(loaded)}). {hint}")
        ds = loaded[split]
        # The arrow files datasets prepared from the download stand for the source.
        fp = _file_fingerprint([f["filename"] for f in ds.cache_files]) or [[hub_id, split]]
        out[role] = (split, ds, fp)
    return out


def parse_dataset(dataset: str) -> tuple[str, Optional[str]]:
    """``(kind, argument)``: ("cifar10", None), ("folder", None), ("parquet", None), ("hfds", id)."""
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a string, got {type(dataset).__name__}")
    prefix, sep, rest = dataset.strip().partition("/")
    if sep:
        prefix = prefix.lower()
        if prefix == "hfds":
            if not rest:
                raise ValueError("dataset 'hfds/' needs a hub id after the prefix, e.g. hfds/uoft-cs/cifar10")
            return "hfds", rest
        if prefix in _ITERABLE_PREFIXES:
            raise ValueError(f"dataset {dataset!r}: timm's {prefix}/ reader is iterable (no random access), and "
                             f"timm-dcl draws class-balanced subsets and seeded epoch orders; use hfds/, "
                             f"parquet or folder instead")
        if prefix == "torch":
            raise ValueError(f"dataset {dataset!r}: torchvision data sets are not supported; use an image folder "
                             f"(folder), parquet files (parquet) or a hub id (hfds/...)")
    name = dataset.strip().lower().replace("_", "-")
    if name in DATASETS or name in ("folder", "parquet"):
        return name, None
    raise ValueError(f"unknown dataset {dataset!r}; valid names: {', '.join(DATASETS)}, {', '.join(GENERIC)}")


def open_source(dataset: str, *, data_dir: Optional[Union[str, os.PathLike]] = None,
                roles: Sequence[str] = ("train", "eval"), train_split: Optional[str] = None,
                val_split: Optional[str] = None, image_column: Optional[str] = None,
                label_column: Optional[str] = None) -> Source:
    """Open the splits ``roles`` of ``dataset`` (see the module docstring); nothing is decoded."""
    kind, arg = parse_dataset(dataset)
    if kind in DATASETS:
        return _open_named(kind, DATASETS[kind], data_dir, roles, train_split, val_split, image_column, label_column)
    if kind == "folder":
        if image_column is not None or label_column is not None:
            raise ValueError("image_column/label_column apply to parquet and hub data, not to an image folder")
        from .folder import open_folder
        return open_folder(_require_dir(kind, data_dir), roles, train_split, val_split)

    def pick(ds, split_name):
        return _pick_feature_columns(ds, split_name, image_column, label_column)
    candidates = {"train": (train_split or "train",), "eval": _eval_names(val_split, _GENERIC_EVAL_NAMES)}
    candidates = {role: candidates[role] for role in roles}
    if kind == "parquet":
        root = _require_dir(kind, data_dir)
        return _arrow_source("parquet", _load_parquet_dir(root, str(root), candidates), pick)
    # hfds: datasets.load_dataset of a hub id or a local path, data_dir is its cache (as in timm)
    hint = "Pass --dataset parquet --data-dir DIR with the data set's parquet files to run offline"
    key = "hfds-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in arg)[-80:]
    return _arrow_source(key, _load_hub(arg, data_dir, candidates, hint), pick)


def _require_dir(kind: str, data_dir) -> Path:
    if data_dir is None:
        raise ValueError(f"dataset {kind!r} needs data_dir (--data-dir DIR)")
    return _check_dir(data_dir)
