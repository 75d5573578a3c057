"""Where images come from: the named data sets (hub copy or offline parquet folder)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

__all__ = ["DATASETS", "DatasetUnavailableError"]


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

