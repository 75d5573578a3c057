"""Run by test_task.py under `torch.distributed.run --nproc_per_node 2` (gloo on CPU).

A 3-node KTGTask (nodes 0 and 1 learn, node 2 a frozen teacher) after prepare_distributed:
each rank trains three steps on its own batches; it saves which nodes DDP wrapped, its nodes'
weights, whether the frozen node stayed as it was, and one gradient computed without DDP's
averaging (so the test can see the ranks' data did differ).
"""
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import timm_dcl  # noqa: F401  (registers resnet20)
from timm_dcl import KTGTask

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)  # the same initial weights on every rank
nets = [timm.create_model("resnet20", num_classes=10) for _ in range(3)]
T, C = "through", "cutoff"
task = KTGTask(nets, [[T, T, T], [T, T, C], [C, C, C]], temperature=2.0, verbose=False)
frozen = {k: v.clone() for k, v in nets[2].state_dict().items()}
start = nets[0].fc.weight.detach().clone()
task.prepare_distributed()
wrapped = [isinstance(task.train_module(i), DDP) for i in range(3)]
opt = torch.optim.SGD(task.param_groups(), lr=0.1, momentum=0.9)
task.train()
g = torch.Generator().manual_seed(100 + rank)
for k in range(1, 4):
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    task.set_progress(k, 3)
    out = task(x, y)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
# a gradient without DDP's all-reduce: the raw network on this rank's own batch
local = nets[0](x)
local_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(local, y), nets[0].fc.weight)[0]
torch.save({"wrapped": wrapped,
            # parameters: DDP averages their gradients (BatchNorm statistics stay each rank's own)
            "nodes": [{k: v.detach().cpu() for k, v in n.named_parameters()} for n in nets[:2]],
            "frozen_unchanged": all(torch.equal(v, frozen[k]) for k, v in nets[2].state_dict().items()),
            "moved": not torch.equal(start, nets[0].fc.weight.detach()),
            "local_grad": local_grad},
           Path(sys.argv[1]) / f"rank{rank}.pth")
dist.destroy_process_group()
