"""Fixtures shared by the test files of timm-dcl."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Let the tests run from a plain checkout (no `pip install -e .`) too.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

HAS_CUDA = torch.cuda.is_available()

#: Parametrise a test over devices with ``@pytest.mark.parametrize("device", DEVICES)``.
DEVICES = (
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")),
)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each available device in turn: cpu, and cuda where a GPU is present."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder (CIFAR-10 parquet, Tiny-ImageNet subset) beside the repository."""
    path = REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path}")
    return path


def _parquet_copy(shared: Path, name: str) -> Path:
    path = shared / name
    if not (path / "train.parquet").is_file():
        pytest.skip(f"{name} parquet copy not found in {path}")
    return path


@pytest.fixture(scope="session")
def cifar10_dir(shared_data) -> Path:
    """The full CIFAR-10 copy (50,000 / 10,000 images) in the hub's parquet layout."""
    return _parquet_copy(shared_data, "cifar10")


@pytest.fixture(scope="session")
def cifar10(cifar10_dir) -> str:
    """The same, as the string a ``--data-dir`` flag takes."""
    return str(cifar10_dir)


@pytest.fixture(scope="session")
def tiny_dir(shared_data) -> Path:
    """The Tiny-ImageNet subset (4,000 / 2,000 images) in the hub's parquet layout."""
    return _parquet_copy(shared_data, "tiny-imagenet-200")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny runs: they gain nothing from a second thread, and
    lose much when the cores are busy (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's ~/.cache/timm_dcl from the tests."""
    monkeypatch.setenv("TIMM_DCL_CACHE", str(tmp_path / "timm_dcl_cache"))


def read_metrics(out: Path) -> list[dict]:
    """A run directory's metrics.jsonl, one dict per epoch."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# small data sets made from the Tiny-ImageNet subset, in the other layouts timm-dcl reads

#: Classes, and images per class (train, val), of the made data sets.
TINY_MADE_CLASSES = 10
TINY_MADE_PER_CLASS = (6, 3)


def _tiny_rows(shared: Path):
    """``{split: [(jpeg bytes, label), ...]}``: the first images of the first classes, sorted by
    label (stable), which is also the order timm's folder reader lists the folder made of them."""
    import pyarrow.parquet as pq
    root = shared / "tiny-imagenet-200"
    if not (root / "train.parquet").is_file():
        pytest.skip(f"Tiny-ImageNet parquet copy not found in {root}")
    out = {}
    for split, file, per in (("train", "train.parquet", TINY_MADE_PER_CLASS[0]),
                             ("val", "valid.parquet", TINY_MADE_PER_CLASS[1])):
        table = pq.read_table(root / file).to_pydict()
        taken: dict[int, int] = {}
        rows = []
        for image, label in zip(table["image"], table["label"]):
            if label < TINY_MADE_CLASSES and taken.get(label, 0) < per:
                taken[label] = taken.get(label, 0) + 1
                rows.append((image["bytes"], int(label)))
        out[split] = sorted(rows, key=lambda r: r[1])
    return out


def tiny_wnids(shared: Path) -> list[str]:
    lines = (shared / "tiny-imagenet-200" / "classes.txt").read_text().splitlines()
    return [line.split("\t")[1] for line in lines if line.strip()][:TINY_MADE_CLASSES]


@pytest.fixture(scope="session")
def tiny_rows(shared_data):
    return _tiny_rows(shared_data)


@pytest.fixture(scope="session")
def tiny_image_folder(tmp_path_factory, shared_data, tiny_rows) -> Path:
    """DIR/train/<wnid>/<k>.JPEG and DIR/val/<wnid>/<k>.JPEG, the Tiny-ImageNet JPEGs unchanged."""
    root = tmp_path_factory.mktemp("tiny_folder")
    wnids = tiny_wnids(shared_data)
    for split, rows in tiny_rows.items():
        for k, (blob, label) in enumerate(rows):
            path = root / split / wnids[label] / f"{k:04d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
    return root


def write_tiny_parquet(root: Path, rows_by_split: dict, wnids: list[str], *, repeat: int = 1) -> Path:
    """Parquet split files with OTHER column names: ``picture`` (Image), ``category`` (ClassLabel)
    and an integer ``source_row``; ``repeat`` copies every row that many times."""
    import datasets
    from datasets import ClassLabel, Features, Image, Value
    feats = Features({"picture": Image(), "category": ClassLabel(names=wnids), "source_row": Value("int64")})
    root.mkdir(parents=True, exist_ok=True)
    for split, file in (("train", "train"), ("val", "validation")):
        rows = rows_by_split[split] * repeat
        ds = datasets.Dataset.from_dict({"picture": [{"bytes": b, "path": None} for b, _ in rows],
                                         "category": [lab for _, lab in rows],
                                         "source_row": list(range(len(rows)))}, features=feats)
        ds.to_parquet(str(root / f"{file}.parquet"))
    return root


@pytest.fixture(scope="session")
def tiny_parquet_renamed(tmp_path_factory, shared_data, tiny_rows) -> Path:
    return write_tiny_parquet(tmp_path_factory.mktemp("tiny_parquet") / "data", tiny_rows, tiny_wnids(shared_data))
