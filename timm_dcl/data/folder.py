"""An image folder (``DIR/<split>/<class>/<image>``) as a source, read by timm's folder reader.

timm's reader finds the files (its image extensions, natural sort, leaf folder = class), which is
what timm users expect of ``--data-dir``. What it lacks is written here: the eval split reuses the
train split's class indices (timm would number each folder's classes on its own), and the
mistakes timm passes over silently (a class folder with no images, which would shift every later
class index; an eval class the train split does not have, whose images timm drops) are errors.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .sources import DatasetUnavailableError, Source, SourceSplit, pil_rgb

__all__ = ["FolderSplit", "open_folder"]

#: Subfolders tried, in order, for the eval split when none is named.
EVAL_FOLDERS = ("val", "validation", "valid", "test")


def _image_extensions() -> set[str]:
    from timm.data.readers.img_extensions import get_img_extensions
    return get_img_extensions(as_set=True)


class FolderSplit(SourceSplit):
    """One split folder; ``class_to_idx`` fixes the class indices (the train split's)."""

    def __init__(self, root: Path, name: str, class_to_idx: Optional[dict] = None):
        from timm.data import create_dataset
        self.root, self.name = root, name
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        exts = _image_extensions()
        loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
        if loose:
            raise ValueError(f"{str(root)!r} holds images outside class folders (e.g. {loose[0]!r}); put each "
                             f"class's images in {root}/<class>/")
        if class_to_idx is not None:
            unknown = [d for d in subdirs if d not in class_to_idx]
            if unknown:
                raise ValueError(f"class folder(s) {', '.join(map(repr, unknown[:5]))} in {str(root)!r} are not "
                                 f"classes of the train split")
        try:
            # search_split=False: the split folder was resolved by open_folder, with its own errors.
            ds = create_dataset("", root=str(root), search_split=False, class_map=class_to_idx)
        except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
            raise ValueError(f"split {name!r}: {e}") from e
        self.samples = list(ds.reader.samples)
        self.class_to_idx = dict(ds.reader.class_to_idx)
        present = set(int(t) for _, t in self.samples)
        empty = [d for d in subdirs if d in self.class_to_idx and self.class_to_idx[d] not in present]
        empty += [d for d in subdirs if class_to_idx is None and d not in self.class_to_idx]
        if empty:
            raise ValueError(f"class folder(s) {', '.join(map(repr, sorted(set(empty))[:5]))} in {str(root)!r} "
                             f"hold no images (extensions: {', '.join(sorted(exts))})")
        self.labels = np.array([t for _, t in self.samples], dtype=np.int64)

    def fingerprint(self) -> list:
        h = hashlib.sha256()
        for path, _ in self.samples:
            st = os.stat(path)
            h.update(json.dumps([path, st.st_mtime_ns, st.st_size]).encode())
        return [str(self.root.resolve()), len(self.samples), h.hexdigest()]

    def encoded(self, rows: np.ndarray) -> tuple[list, list]:
        rows = np.asarray(rows).tolist()
        return [None] * len(rows), [self.samples[r][0] for r in rows]

    def open_image(self, row: int):
        # Not timm's ImageDataset.__getitem__: on an unreadable file it silently returns the next
        # sample, whose label would then not match ours. A broken file should be an error naming it.
        return pil_rgb(None, self.samples[row][0], row)


def open_folder(root: Path, roles: Sequence[str], train_split: Optional[str], val_split: Optional[str]) -> Source:
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    found = ", ".join(subdirs) or "none"
    train_name = train_split or "train"
    if not (root / train_name).is_dir():
        raise DatasetUnavailableError(f"no train folder {train_name!r} in {str(root)!r} (subfolders: {found}); "
                                      f"expected {root}/{train_name}/<class>/<image>")
    train = FolderSplit(root / train_name, train_name)
    splits: dict[str, SourceSplit] = {}
    if "train" in roles:
        splits["train"] = train
    if "eval" in roles:
        names = (val_split,) if val_split else EVAL_FOLDERS
        eval_name = next((n for n in names if (root / n).is_dir()), None)
        if eval_name is None:
            raise DatasetUnavailableError(f"no eval folder in {str(root)!r}: looked for {', '.join(names)} "
                                          f"(subfolders: {found})")
        splits["eval"] = FolderSplit(root / eval_name, eval_name, train.class_to_idx)
    classes = [c for c, _ in sorted(train.class_to_idx.items(), key=lambda kv: kv[1])]
    return Source("folder", classes, splits)
