"""Run by test_train.py under `accelerate launch --multi_gpu --num_processes 2` (gloo on CPU).

Trains a 2-node graph for one epoch, then every rank saves its own copy of the weights
so the test can check that DDP kept them identical.
"""
import argparse
from pathlib import Path

import torch

from timm_dcl.config import TrainConfig
from timm_dcl.graph import Graph
from timm_dcl.trainer import GraphTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--data-dir", required=True)
parser.add_argument("--output", required=True)
args = parser.parse_args()

graph = Graph.preset("dml", ["resnet20", "resnet20"])
cfg = TrainConfig(dataset="cifar10", data_dir=args.data_dir, train_subset=128, eval_subset=40, batch_size=16,
                  epochs=1, workers=0, progress_bar=False, output=str(Path(args.output) / "run"))
trainer = GraphTrainer(graph, cfg)
assert trainer.accelerator.num_processes == 2, "expected two processes"
trainer.fit()
rank = trainer.accelerator.process_index
torch.save({"nodes": [{k: v.detach().cpu() for k, v in n.raw.state_dict().items()} for n in trainer.nodes],
            # the training rows this rank saw in epoch 0, read from the loader the trainer used
            "rows": trainer.train_loader.epoch_indices(0).cpu(),
            "train_rows": trainer.data.train.indices.cpu()},
           Path(args.output) / f"rank{rank}.pth")
