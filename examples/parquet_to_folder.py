#!/usr/bin/env python3
"""Write a Hugging Face parquet copy out as an image folder, the layout timm reads.

    python examples/parquet_to_folder.py ../shared/data/tiny-imagenet-200 output/tiny_folder --classes 50

gives output/tiny_folder/train/<class>/<k>.JPEG and output/tiny_folder/val/<class>/<k>.JPEG
(the original JPEG bytes, unchanged), for trying ``train_dcl.py --dataset folder`` on real
images. Class folders are named from classes.txt when the copy has one (Tiny-ImageNet's
wnids), else from the label column's ClassLabel names, else by index.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _class_names(src: Path, table, label_col: str) -> list[str] | None:
    if (src / "classes.txt").is_file():
        rows = [line.split("\t") for line in (src / "classes.txt").read_text().splitlines() if line.strip()]
        return [r[1] for r in rows]
    meta = (table.schema.metadata or {}).get(b"huggingface")
    if meta:
        feature = json.loads(meta)["info"]["features"].get(label_col, {})
        return feature.get("names")
    return None


def main() -> None:
    import pyarrow.parquet as pq

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", type=Path, help="folder of parquet split files (train.parquet, valid/test.parquet)")
    ap.add_argument("dst", type=Path, help="image folder to write")
    ap.add_argument("--classes", type=int, default=None, help="keep only the first N classes")
    ap.add_argument("--image-column", default=None, help="default: image or img")
    ap.add_argument("--label-column", default="label")
    args = ap.parse_args()

    splits = {"train": "train"}
    for name in ("valid", "validation", "test"):
        if (args.src / f"{name}.parquet").is_file():
            splits["val"] = name
            break
    for out_split, file in splits.items():
        table = pq.read_table(args.src / f"{file}.parquet")
        image_col = args.image_column or next(c for c in ("image", "img") if c in table.column_names)
        names = _class_names(args.src, table, args.label_column)
        columns = table.select([image_col, args.label_column]).to_pydict()
        written = 0
        for k, (image, label) in enumerate(zip(columns[image_col], columns[args.label_column])):
            if args.classes is not None and label >= args.classes:
                continue
            folder = args.dst / out_split / (names[label] if names else f"{label:04d}")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{k:06d}.JPEG").write_bytes(image["bytes"])
            written += 1
        print(f"{out_split}: {written} images from {file}.parquet")


if __name__ == "__main__":
    main()
