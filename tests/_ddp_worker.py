"""Two DDP ranks, seeded alike, train a converted model; rank 0 writes what it saw as JSON.

Run by tests/test_distributed.py as ``python _ddp_worker.py INIT_FILE OUT_JSON``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.functional import cross_entropy
from torch.nn.parallel import DistributedDataParallel

import radgrad

WORLD = 2


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor)
    return out


def run(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # every rank seeded alike, on purpose
    model = DistributedDataParallel(radgrad.convert(radgrad.models.mnist_mlp(hidden=32, depth=2), keep=0.1))
    x, y = torch.rand(16, 784), torch.randint(10, (16,))
    with model.no_sync():
        cross_entropy(model(x), y).backward()
    local = _gather(model.module[1].weight.grad.clone())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    params = _gather(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({
                "local_grads_differ": not torch.equal(local[0], local[1]),
                "params_in_sync": torch.equal(params[0], params[1]),
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }, f)
    del model, optimizer
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads occasionally abort the process
    # there ("terminate called without an active exception", about 1 run in 50),
    # after every result is written.
    os._exit(0)


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
