"""Run by test_train.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Trains a 2-node graph for one epoch, then every rank saves its own copy of the weights
so the test can check that DDP kept them identical, and the rows of the images it trained on.
"""
import argparse
import dataclasses
from pathlib import Path

import torch

from timm_dcl.config import TrainConfig
from timm_dcl.gates import parse_gates
from timm_dcl.graph import Graph
from timm_dcl.trainer import GraphTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", required=True)
parser.add_argument("--output", required=True)
parser.add_argument("--feature-gates", default=None, help="feature edges too (DDP must wrap the features' forward)")
args = parser.parse_args()

graph = Graph.preset("dml", ["resnet20", "resnet20"])
if args.feature_gates:
    graph = dataclasses.replace(graph, feature_gates=parse_gates(args.feature_gates, 2))
cfg = TrainConfig(dataset="cifar10", data_dir=args.data_dir, train_subset=128, eval_subset=40, batch_size=16,
                  epochs=1, workers=0, progress_bar=False, output=str(Path(args.output) / "run"))
trainer = GraphTrainer(graph, cfg)
assert trainer.accelerator.num_processes == 2, "expected two processes"
# Every batch the trainer takes goes through the loader's augment: record the images it trains on.
seen, augment = [], trainer.train_loader.augment


def recording_augment(images, generator=None):
    seen.append(images.detach().cpu().clone())
    return augment(images, generator)


trainer.train_loader.augment = recording_augment
trainer.fit()
rank = trainer.accelerator.process_index
# The source row of every image trained on, found by its pixels in the decoded training split.
train = trainer.data.train
row_of = {img.numpy().tobytes(): int(row) for img, row in zip(train.images, train.indices)}
assert len(row_of) == len(train.indices), "two training images are pixel-identical: rows are ambiguous"
trained_rows = [row_of[img.numpy().tobytes()] for batch in seen for img in batch]
torch.save({"nodes": [{k: v.detach().cpu() for k, v in n.raw.state_dict().items()} for n in trainer.nodes],
            # the training rows this rank saw in epoch 0, read from the loader the trainer used
            "rows": trainer.train_loader.epoch_indices(0).cpu(),
            "train_rows": trainer.data.train.indices.cpu(),
            "trained_rows": torch.tensor(trained_rows)},
           Path(args.output) / f"rank{rank}.pth")
