"""GPU-only checks of the Triton backend: compiled kernels on real hardware.

Run without TRITON_INTERPRET (the interpreter cannot run on CUDA tensors):
    pytest -m gpu tests/gpu
"""
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="needs compiled Triton"),
]

pytest.importorskip("triton")

from presam_kernels.backends import eager  # noqa: E402
from presam_kernels.backends import triton as triton_backend  # noqa: E402
from presam_kernels.buckets import build_buckets  # noqa: E402
from presam_kernels.preconditioners import Preconditioner  # noqa: E402

DEVICE = torch.device("cuda")


def flat_problem(shapes, dtype, spec, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
        p.grad = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
        params.append(p)
    buckets = build_buckets(params, [0] * len(params), [p.ndim >= 2 for p in params], flatten=True)
    if spec.objective.has_state:
        for b in buckets:
            b.ensure_grad_ema().normal_(generator=gen)
    return params, buckets


def ulp_distance(a, b):
    """|a - b| in units in the last place, for same-dtype 16-bit floats (finite, same sign)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return (ia - ib).abs()


@pytest.mark.parametrize("spec", [Preconditioner(), Preconditioner(objective="info", ema_weight=0.1, delta=1e-3)],
                         ids=["sam", "infosam"])
def test_cuda_graph_capture_replays_perturb_and_restore(spec):
    """flatten=True: static addresses, rho and the EMA flag as device tensors: the
    step captures once and replays on new gradients like eager."""
    shapes = [(257, 33), (4097,), (7,)]
    params, buckets = flat_problem(shapes, torch.float32, spec)
    ref_params, ref_buckets = flat_problem(shapes, torch.float32, spec)
    first = torch.zeros((), device=DEVICE)
    tables = [b.table([True]) for b in buckets]
    perturbed = torch.empty_like(buckets[0].flat_param)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile, cache the device table and rho
        triton_backend.perturb(tables, buckets, spec, [0.05], first)
        triton_backend.restore(tables)
        ref_tables = [b.table([True]) for b in ref_buckets]
        eager.perturb(ref_tables, ref_buckets, spec, [0.05], first)
        eager.restore(ref_tables)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm, _ = triton_backend.perturb(tables, buckets, spec, [0.05], first)
        perturbed.copy_(buckets[0].flat_param)
        triton_backend.restore(tables)
    for step in range(3):
        gen = torch.Generator(device=DEVICE).manual_seed(100 + step)
        new_grad = torch.randn(buckets[0].numel, generator=gen, device=DEVICE)
        buckets[0].flat_grad.copy_(new_grad)
        ref_buckets[0].flat_grad.copy_(new_grad)
        before = buckets[0].flat_param.clone()
        graph.replay()
        ref_norm, _ = eager.perturb(ref_tables, ref_buckets, spec, [0.05], first)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(perturbed, ref_buckets[0].flat_param, rtol=1e-5, atol=1e-6)
        eager.restore(ref_tables)
        assert torch.equal(buckets[0].flat_param.view(torch.int32), before.view(torch.int32))
        if spec.objective.has_state:
            torch.testing.assert_close(buckets[0].grad_ema, ref_buckets[0].grad_ema, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_round_to_nearest_on_hardware(dtype):
    """On the GPU stores round to nearest as eager does: results agree bit for
    bit except where the fp32 values differ by an ulp across a rounding boundary."""
    spec = Preconditioner(constraint="adaptive")
    shapes = [(1000, 97), (4097,)]
    params, buckets = flat_problem(shapes, dtype, spec)
    ref_params, ref_buckets = flat_problem(shapes, dtype, spec)
    triton_backend.perturb([b.table([True]) for b in buckets], buckets, spec, [0.5], True)
    eager.perturb([b.table([True]) for b in ref_buckets], ref_buckets, spec, [0.5], True)
    for p, q in zip(params, ref_params):
        ulps = ulp_distance(p.detach(), q.detach())
        assert int(ulps.max()) <= 1
        assert float((ulps == 0).float().mean()) > 0.999


def _big_step(numel, dtype):
    spec = Preconditioner()
    params, buckets = flat_problem([(numel,)], dtype, spec)
    x0 = buckets[0].flat_param.clone()
    g = buckets[0].flat_grad
    tables = [b.table([True]) for b in buckets]
    norm, skipped = triton_backend.perturb(tables, buckets, spec, [0.05], True)
    ref_norm = torch.linalg.vector_norm(g.float())
    torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=0)
    assert not bool(skipped)
    # The last elements (beyond 2^31 bytes / elements) were perturbed as the first.
    for sl in (slice(0, 1024), slice(numel - 1024, numel)):
        expected = (x0[sl].float() + g[sl].float() * (0.05 / (ref_norm + 1e-12))).to(dtype)
        torch.testing.assert_close(buckets[0].flat_param[sl].float(), expected.float(), rtol=2**-7, atol=1e-6)
    triton_backend.restore(tables)
    assert torch.equal(buckets[0].flat_param, x0)


def test_256m_element_flat_buffer_fp32():
    _big_step(256 * 2**20 + 3, torch.float32)


def test_element_indices_beyond_int32_bf16():
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    _big_step(2**31 + 5, torch.bfloat16)
