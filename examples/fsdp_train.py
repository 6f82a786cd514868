"""Train a small model with InfoSAM on FSDP2-sharded parameters.

    torchrun --nproc_per_node 2 examples/fsdp_train.py            # CPU, gloo
    torchrun --nproc_per_node 8 examples/fsdp_train.py --cuda     # GPUs, NCCL

Each rank holds a shard of every parameter (and of InfoSAM's EMA); the
perturbation norm is summed over all shards, so the run takes the same steps
as a single process on the full batch.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from presam_kernels import InfoSAM


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cuda", action="store_true", help="use NCCL and one GPU per rank")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--rho", type=float, default=0.5, help="InfoSAM radius")
    args = parser.parse_args()

    device = "cuda" if args.cuda else "cpu"
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    mesh = init_device_mesh(device, (world,))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10)).to(device)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = InfoSAM(model.parameters(), torch.optim.AdamW, rho=args.rho, lr=1e-3, weight_decay=0.01)

    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    teacher = torch.Generator().manual_seed(0)
    w_true = torch.randn(32, 10, generator=teacher)
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=gen)
        y = (x @ w_true).argmax(dim=1)
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  perturbation norm {opt.last_perturbation_norm.item():.3e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
