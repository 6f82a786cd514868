"""The per-rank half of tests/test_distributed.py: every scenario runs in one
pair of gloo processes (spawning costs seconds), and each rank saves what it
saw to ``{out}/rank{r}.pt`` for the test process to compare against
single-process runs."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from presam_kernels import SAM, InfoSAM

STEPS = 3
BATCH = 8  # full batch; each of the 2 ranks takes half


def make_model(seed=0):
    torch.manual_seed(seed)
    # 7 output rows: FSDP shards them unevenly (4 + 3); 3 rows of the last layer too.
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def batches(steps=STEPS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 5, generator=gen), torch.randn(BATCH, 3, generator=gen)) for _ in range(steps)]


def loss_fn(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def make_optimizer(kind, params):
    if kind == "sam":
        return SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    return InfoSAM(params, torch.optim.Adam, rho=0.5, lr=0.01)


def sam_steps(model, opt, data, rank=None, world=1, first_no_sync=False):
    """Two-step SAM on each batch (this rank's half when distributed); returns
    the parameters at x + e of every step, as full tensors."""
    perturbed = []
    for x, y in data:
        if rank is not None:
            half = BATCH // world
            x, y = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        if first_no_sync:
            with model.no_sync():
                loss_fn(model, x, y).backward()
        else:
            loss_fn(model, x, y).backward()
        opt.first_step(zero_grad=True)
        perturbed.append([full(p).clone() for p in model.parameters()])
        loss_fn(model, x, y).backward()
        opt.second_step(zero_grad=True)
    return perturbed


def full(t):
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def fsdp_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def run(rank, world, out, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    results = {}
    data = batches()
    # FSDP2, sharded over both ranks, and HSDP (replicated over the ranks, one shard each):
    for layout, shape, names in (("fsdp", (world,), ("shard",)), ("hsdp", (world, 1), ("replicate", "shard"))):
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for kind in ("sam", "info"):
            model = fsdp_model(mesh)
            opt = make_optimizer(kind, model.parameters())
            perturbed = sam_steps(model, opt, data, rank, world)
            results[f"{layout}-{kind}"] = {
                "perturbed": perturbed,
                "final": [full(p).clone() for p in model.parameters()],
                "norm": opt.last_perturbation_norm.clone(),
                "ema_is_dtensor": kind != "info" or all(
                    type(opt.state[p]["grad_ema"]).__name__ == "DTensor" for p in model.parameters()
                ),
            }

    results["compile_refused"] = compile_refused(init_device_mesh("cpu", (world,)), data)
    results["checkpoint"] = checkpoint_round_trip(init_device_mesh("cpu", (world,)), rank, world, out)

    for recipe, no_sync in (("ddp-sync", False), ("ddp-per-worker", True)):
        model = nn.parallel.DistributedDataParallel(make_model())
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        perturbed = sam_steps(model, opt, data, rank, world, first_no_sync=no_sync)
        results[recipe] = {"perturbed": perturbed, "final": [p.detach().clone() for p in model.parameters()]}

    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def compile_refused(mesh, data):
    """torch.compile of first_step with FSDP2 parameters: the error, and
    whether the parameters were left as they were."""
    model = fsdp_model(mesh)
    opt = make_optimizer("sam", model.parameters())
    loss_fn(model, *data[0]).backward()
    before = [full(p).clone() for p in model.parameters()]
    message = None
    try:
        torch.compile(opt.first_step, fullgraph=True, backend="aot_eager")()
    except Exception as error:  # dynamo may wrap it
        message = str(error)
    untouched = all(torch.equal(full(p), b) for p, b in zip(model.parameters(), before))
    return {"message": message, "untouched": untouched}


def checkpoint_round_trip(mesh, rank, world, out):
    """Save InfoSAM + Adam with torch.distributed.checkpoint after 2 steps, go on
    2 steps; load into a fresh model and optimizer, go on 2 steps: both finals."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    data = batches(4, seed=7)
    model = fsdp_model(mesh)
    opt = make_optimizer("info", model.parameters())
    sam_steps(model, opt, data[:2], rank, world)
    path = os.path.join(out, "dcp")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    sam_steps(model, opt, data[2:], rank, world)
    uninterrupted = [full(p).clone() for p in model.parameters()]

    fresh = fsdp_model(mesh)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(0)  # so that a load that does nothing shows
    fresh_opt = make_optimizer("info", fresh.parameters())
    state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(fresh, state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    sam_steps(fresh, fresh_opt, data[2:], rank, world)
    return {"uninterrupted": uninterrupted, "resumed": [full(p).clone() for p in fresh.parameters()]}


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
