"""timm_dcl.data sources beyond the named data sets: an image folder (timm's reader), a parquet
folder with other column names, ``hfds/`` routing, and every bad input's error. The data is
made from the Tiny-ImageNet subset in ../shared/data (see conftest). The unreachable hub
(``hfds/...`` offline) is tested with the named data sets' in test_data.py, in one interpreter."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch

from conftest import TINY_MADE_CLASSES, TINY_MADE_PER_CLASS, tiny_wnids, write_tiny_parquet
from timm_dcl.data import DatasetUnavailableError, build_data


def _rgb_chw(blob: bytes) -> torch.Tensor:
    from PIL import Image
    return torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert("RGB"))).permute(2, 0, 1)


def _eval_batches(data, **kw):
    xs, ys = zip(*data.eval_loader("eval", 7, workers=0, **kw))
    return torch.cat(xs), torch.cat(ys)


N_TRAIN, N_VAL = TINY_MADE_CLASSES * TINY_MADE_PER_CLASS[0], TINY_MADE_CLASSES * TINY_MADE_PER_CLASS[1]


# ---------------------------------------------------------------------------------------------
# image folder


@pytest.mark.parametrize("in_memory", [True, False])
def test_image_folder_both_paths(tiny_image_folder, tiny_rows, shared_data, in_memory):
    s = build_data("folder", data_dir=tiny_image_folder, in_memory=in_memory, cache=False)
    assert s.in_memory is in_memory
    assert s.classes == tiny_wnids(shared_data) and s.num_classes == TINY_MADE_CLASSES
    assert s.input_size == (3, 64, 64)
    assert len(s.train) == N_TRAIN and s.split_size("eval") == N_VAL and s.val is None
    # timm's reader sorts files by path; our folder names are <wnid>/<k>.JPEG in row order
    expected_labels = torch.tensor([lab for _, lab in tiny_rows["val"]])
    images, labels = _eval_batches(s)
    assert torch.equal(labels, expected_labels) and labels.dtype == torch.int64
    assert images.dtype == torch.uint8 and images.shape == (N_VAL, 3, 64, 64)
    for k in (0, 13, N_VAL - 1):  # the files' pixels, unchanged at their own size
        assert torch.equal(images[k], _rgb_chw(tiny_rows["val"][k][0]))
    assert torch.equal(s.train.labels, torch.tensor([lab for _, lab in tiny_rows["train"]]))


def test_image_folder_split_names(tmp_path, tiny_image_folder):
    root = tmp_path / "renamed"
    shutil.copytree(tiny_image_folder / "train", root / "training")
    shutil.copytree(tiny_image_folder / "val", root / "validation")  # found without being named
    s = build_data("folder", data_dir=root, train_split="training", in_memory=True, cache=False)
    assert len(s.train) == N_TRAIN and len(s.eval) == N_VAL
    # val_split names any folder, e.g. evaluate on the training images
    s = build_data("folder", data_dir=root, train_split="training", val_split="training", in_memory=True,
                   cache=False)
    assert len(s.eval) == N_TRAIN
    with pytest.raises(DatasetUnavailableError, match=r"no eval folder .*looked for holdout"):
        build_data("folder", data_dir=root, train_split="training", val_split="holdout")


# ---------------------------------------------------------------------------------------------
# parquet with other column names, and hfds/ routing


@pytest.mark.parametrize("in_memory", [True, False])
def test_parquet_other_columns_both_paths(tiny_parquet_renamed, tiny_image_folder, tiny_rows, shared_data,
                                          in_memory):
    s = build_data("parquet", data_dir=tiny_parquet_renamed, in_memory=in_memory, cache=False)
    assert s.in_memory is in_memory
    # picture (Image) and category (ClassLabel) found from the schema, not the integer source_row
    assert s.classes == tiny_wnids(shared_data)
    assert torch.equal(s.train.labels, torch.tensor([lab for _, lab in tiny_rows["train"]]))
    images, labels = _eval_batches(s)
    folder_images, folder_labels = _eval_batches(build_data("folder", data_dir=tiny_image_folder, in_memory=True,
                                                            cache=False))
    assert torch.equal(images, folder_images) and torch.equal(labels, folder_labels)


def test_parquet_column_overrides(tiny_parquet_renamed):
    # an integer column named as the label: plain integer classes "0".."K-1"
    s = build_data("parquet", data_dir=tiny_parquet_renamed, image_column="picture", label_column="source_row",
                   in_memory=False)
    assert s.num_classes == N_TRAIN and s.classes[:3] == ["0", "1", "2"]
    assert s.train.labels.tolist() == list(range(N_TRAIN))
    with pytest.raises(ValueError, match=r"label_column 'labels' is not a column of split 'train'; "
                                         r"columns: picture, category, source_row"):
        build_data("parquet", data_dir=tiny_parquet_renamed, label_column="labels")
    with pytest.raises(ValueError, match="image_column 'image' is not a column"):
        build_data("parquet", data_dir=tiny_parquet_renamed, image_column="image")


def test_hfds_routes_through_the_parquet_code(tiny_parquet_renamed):
    # datasets.load_dataset also takes a local folder: the hub code path, offline
    via_hub = build_data("hfds/" + str(tiny_parquet_renamed), in_memory=True, cache=False)
    direct = build_data("parquet", data_dir=tiny_parquet_renamed, in_memory=True, cache=False)
    assert via_hub.classes == direct.classes
    assert torch.equal(via_hub.train.images, direct.train.images)
    assert torch.equal(via_hub.eval.labels, direct.eval.labels)


# ---------------------------------------------------------------------------------------------
# bad input


def test_error_dataset_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist'; valid names: .*folder, parquet, hfds/<hub id>"):
        build_data("mnist")
    with pytest.raises(ValueError, match="timm's tfds/ reader is iterable"):
        build_data("tfds/mnist")
    with pytest.raises(ValueError, match="needs a hub id"):
        build_data("hfds/")
    for kind in ("folder", "parquet"):
        with pytest.raises(ValueError, match=f"dataset '{kind}' needs data_dir"):
            build_data(kind)


def test_error_folder_layouts(tmp_path, tiny_image_folder):
    with pytest.raises(DatasetUnavailableError, match="is not a directory"):
        build_data("folder", data_dir=tmp_path / "missing")
    only_val = tmp_path / "only_val"
    shutil.copytree(tiny_image_folder / "val", only_val / "val")
    with pytest.raises(DatasetUnavailableError, match=r"no train folder 'train' in .*only_val.* \(subfolders: val\)"):
        build_data("folder", data_dir=only_val)
    no_val = tmp_path / "no_val"
    shutil.copytree(tiny_image_folder / "train", no_val / "train")
    with pytest.raises(DatasetUnavailableError, match="no eval folder .*val, validation, valid, test"):
        build_data("folder", data_dir=no_val)

    root = tmp_path / "empty_class"
    shutil.copytree(tiny_image_folder, root)
    (root / "train" / "n99999999").mkdir()  # would shift no index here, but is surely a mistake
    (root / "train" / "n99999999" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"class folder\(s\) 'n99999999' in .*train' hold no images"):
        build_data("folder", data_dir=root)
    shutil.rmtree(root / "train" / "n99999999")
    stray = next((root / "val").iterdir())
    shutil.move(str(stray), root / "val" / "n00000000")
    with pytest.raises(ValueError, match=r"'n00000000' in .*val' are not classes of the train split"):
        build_data("folder", data_dir=root)
    shutil.move(str(root / "val" / "n00000000"), stray)
    loose = next((root / "train").iterdir())
    shutil.copy(next(loose.iterdir()), root / "train" / "loose.JPEG")
    with pytest.raises(ValueError, match="holds images outside class folders"):
        build_data("folder", data_dir=root)


def test_mixed_sizes_need_input_size(tmp_path, tiny_image_folder):
    from PIL import Image
    root = tmp_path / "mixed"
    shutil.copytree(tiny_image_folder, root)
    for path in sorted((root / "train").rglob("*.JPEG"))[::2] + sorted((root / "val").rglob("*.JPEG"))[::2]:
        Image.open(path).convert("RGB").resize((80, 48)).save(path)  # w×h 80×48
    with pytest.raises(ValueError, match=r"images differ in size \(.*48×80.*\); pass input_size"):
        build_data("folder", data_dir=root, cache=False)
    for in_memory in (True, False):
        s = build_data("folder", data_dir=root, input_size=32, in_memory=in_memory, cache=False)
        assert s.input_size == (3, 32, 32)
        images, labels = _eval_batches(s)
        assert images.shape == (N_VAL, 3, 32, 32) and len(labels) == N_VAL
        loader = s.train_loader(16, seed=0, workers=0)
        x, y = next(iter(loader))
        x = loader.augment(x, torch.Generator().manual_seed(0))
        assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8
    # in memory, mixed training images are stored as squares with timm's crop margin: 32/0.875 → 36
    assert build_data("folder", data_dir=root, input_size=32, in_memory=True, cache=False).train.images.shape[-2:] \
        == (36, 36)


def test_error_labels_out_of_range(tmp_path, tiny_rows, shared_data):
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = write_tiny_parquet(tmp_path / "bad", tiny_rows, tiny_wnids(shared_data))
    table = pq.read_table(root / "train.parquet")
    labels = table.column("category").to_numpy().copy()
    labels[3] = 57  # ClassLabel with 10 names
    bad = table.set_column(table.schema.get_field_index("category"), "category", pa.array(labels))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), root / "train.parquet")
    with pytest.raises(ValueError, match=r"split 'train': labels in 'category' span \[0, 57\], outside the 10 classes"):
        build_data("parquet", data_dir=root)
    labels[3] = -1  # the hub's "no label"
    bad = table.set_column(table.schema.get_field_index("category"), "category", pa.array(labels))
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), root / "train.parquet")
    with pytest.raises(ValueError, match=r"span \[-1, 9\].*unlabelled rows with -1"):
        build_data("parquet", data_dir=root)


def test_error_columns_not_found(tmp_path, tiny_rows):
    import datasets
    root = tmp_path / "plain"
    root.mkdir()
    rows = tiny_rows["train"][:4]
    for split in ("train", "test"):  # no Image feature, two integer columns
        datasets.Dataset.from_dict({"jpeg": [b for b, _ in rows], "a": [0, 1, 0, 1], "b": [1, 0, 1, 0]}) \
            .to_parquet(str(root / f"{split}.parquet"))
    with pytest.raises(ValueError, match=r"split 'train' has no image \(Image feature\) columns; columns: jpeg, a, b\. "
                                         r"Name one with image_column \(--image-column\)"):
        build_data("parquet", data_dir=root)
    with pytest.raises(ValueError, match=r"several label \(ClassLabel or integer\) columns \(a, b\).*label_column"):
        build_data("parquet", data_dir=root, image_column="jpeg")
    s = build_data("parquet", data_dir=root, image_column="jpeg", label_column="b", in_memory=True, cache=False)
    assert s.train.labels.tolist() == [1, 0, 1, 0] and s.input_size == (3, 64, 64)
    with pytest.raises(DatasetUnavailableError, match=r"no train split for .* looked for training\.parquet"):
        build_data("parquet", data_dir=root, train_split="training")


def test_error_bad_options(tiny_image_folder):
    kw = dict(data_dir=tiny_image_folder)
    with pytest.raises(ValueError, match="in_memory must be None"):
        build_data("folder", in_memory="yes", **kw)
    with pytest.raises(ValueError, match="input_size must be"):
        build_data("folder", input_size=(1, 32, 32), **kw)
    with pytest.raises(ValueError, match=r"crop_pct must lie in \(0, 1\]"):
        build_data("folder", crop_pct=1.5, **kw)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        build_data("folder", interpolation="cubic-ish", **kw)
    with pytest.raises(ValueError, match="image_column/label_column apply to parquet"):
        build_data("folder", image_column="x", **kw)
    s = build_data("folder", in_memory=True, cache=False, **kw)
    with pytest.raises(ValueError, match="no 'val' split"):
        s.eval_loader("val")
    with pytest.raises(ValueError, match="use train_loader"):
        s.eval_loader("train")


def test_describe_data_reads_no_pixels(tiny_image_folder, tiny_parquet_renamed, shared_data, tmp_path, monkeypatch):
    from timm_dcl.data import describe_data
    from timm_dcl.data import memory
    monkeypatch.setattr(memory, "decode_images", lambda *a, **k: pytest.fail("decoded"))
    for kind, root in (("folder", tiny_image_folder), ("parquet", tiny_parquet_renamed)):
        info = describe_data(kind, data_dir=root)
        assert info.classes == tiny_wnids(shared_data) and info.num_classes == TINY_MADE_CLASSES
        assert info.native_size == (64, 64) and (info.train_rows, info.eval_rows) == (N_TRAIN, N_VAL)
    from PIL import Image
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_image_folder, mixed)
    for path in (mixed / "val").rglob("*.JPEG"):
        Image.open(path).convert("RGB").resize((50, 40)).save(path)
    assert describe_data("folder", data_dir=mixed).native_size is None
    with pytest.raises(DatasetUnavailableError, match="is not a directory"):
        describe_data("parquet", data_dir=tmp_path / "nothing")
