"""FSDP2 / HSDP / DDP with 2 gloo ranks on the CPU against single-process runs.

One pair of processes runs every scenario (tests/distributed_worker.py); the
tests below compare what the ranks saved.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker
from helpers import FP32, assert_close

WORLD = 2
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist"))
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__)] + sys.path)}
    procs = [
        subprocess.Popen(
            [sys.executable, worker.__file__, str(r), str(WORLD), out, str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(WORLD)
    ]
    logs = [p.communicate(timeout=240)[0].decode(errors="replace") for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r][-4000:]}"
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def single_process(kind, optimizer_factory=worker.make_optimizer):
    model = worker.make_model()
    opt = optimizer_factory(kind, model.parameters())
    perturbed = worker.sam_steps(model, opt, worker.batches())
    return perturbed, [p.detach().clone() for p in model.parameters()], opt.last_perturbation_norm


def assert_all_close(actual, expected, what):
    assert len(actual) == len(expected), f"{what}: {len(actual)} tensors, expected {len(expected)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, FP32, f"{what}, tensor {i}")


@pytest.mark.parametrize("layout", ["fsdp", "hsdp"])
@pytest.mark.parametrize("kind", ["sam", "info"])
def test_sharded_trajectory_equals_single_process_full_batch(ranks, layout, kind):
    perturbed, final, norm = single_process(kind)
    for r in range(WORLD):
        got = ranks[r][f"{layout}-{kind}"]
        for step, (a, e) in enumerate(zip(got["perturbed"], perturbed)):
            assert_all_close(a, e, f"rank {r} {layout} {kind}: x + e at step {step}")
        assert_all_close(got["final"], final, f"rank {r} {layout} {kind}: final parameters")


@pytest.mark.parametrize("layout", ["fsdp", "hsdp"])
def test_global_norm_counts_every_shard_once(ranks, layout):
    """A shard-local norm would be smaller, a replica-summed one sqrt(2) larger."""
    _, _, norm = single_process("sam")
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][f"{layout}-sam"]["norm"], norm, atol=1e-6, rtol=1e-5)


def test_grad_ema_state_is_sharded_like_the_parameters(ranks):
    assert all(ranks[r]["fsdp-info"]["ema_is_dtensor"] for r in range(WORLD))


def test_distributed_checkpoint_save_load_continue_is_identical(ranks):
    for r in range(WORLD):
        got = ranks[r]["checkpoint"]
        for i, (a, e) in enumerate(zip(got["resumed"], got["uninterrupted"])):
            assert torch.equal(a, e), f"rank {r}, tensor {i}: resumed run differs from the uninterrupted one"


def test_ddp_synchronized_perturbation_equals_single_process_full_batch(ranks):
    def sam_sgd(kind, params):
        return worker.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    perturbed, final, _ = single_process("sam", sam_sgd)
    for r in range(WORLD):
        got = ranks[r]["ddp-sync"]
        for step, (a, e) in enumerate(zip(got["perturbed"], perturbed)):
            assert_all_close(a, e, f"rank {r}: x + e at step {step}")
        assert_all_close(got["final"], final, f"rank {r}: final parameters")


def test_ddp_per_worker_perturbation_differs_by_rank_but_updates_agree(ranks):
    a, b = ranks[0]["ddp-per-worker"], ranks[1]["ddp-per-worker"]
    assert any(not torch.equal(x, y) for x, y in zip(a["perturbed"][0], b["perturbed"][0])), (
        "under no_sync each rank should perturb with its own gradients"
    )
    for i, (x, y) in enumerate(zip(a["final"], b["final"])):
        assert torch.equal(x, y), f"tensor {i}: ranks disagree after the synced second pass"


def test_step_without_closure_still_explains_the_two_step_api():
    """The zero-gradient step() that torch.distributed.checkpoint makes is let
    through; a user's own step() without a closure is not."""
    model = worker.make_model()
    opt = worker.make_optimizer("info", model.parameters())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.step()


def test_torch_compile_of_a_step_with_fsdp2_parameters_is_refused_clearly(ranks):
    for r in ranks:
        refused = r["compile_refused"]
        assert refused["message"] and "DTensor (FSDP2) parameters are not supported under torch.compile" in \
            refused["message"]
        assert refused["untouched"]
