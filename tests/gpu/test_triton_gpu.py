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
            b.buffers.ensure_grad_ema().normal_(generator=gen)
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
    ema_ready = torch.ones((), device=DEVICE)
    tables = [b.table([True]) for b in buckets]
    perturbed = torch.empty_like(buckets[0].buffers.flat_param)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: compile, cache the device table and rho
        triton_backend.restore(triton_backend.perturb(tables, buckets, spec, [0.05], ema_ready))
        ref_tables = [b.table([True]) for b in ref_buckets]
        eager.restore(eager.perturb(ref_tables, ref_buckets, spec, [0.05], ema_ready))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        done = triton_backend.perturb(tables, buckets, spec, [0.05], ema_ready)
        norm = done.norm
        perturbed.copy_(buckets[0].buffers.flat_param)
        triton_backend.restore(done)
    for step in range(3):
        gen = torch.Generator(device=DEVICE).manual_seed(100 + step)
        new_grad = torch.randn(buckets[0].layout.flat_numel, generator=gen, device=DEVICE)
        buckets[0].buffers.flat_grad.copy_(new_grad)
        ref_buckets[0].buffers.flat_grad.copy_(new_grad)
        before = buckets[0].buffers.flat_param.clone()
        graph.replay()
        ref = eager.perturb(ref_tables, ref_buckets, spec, [0.05], ema_ready)
        ref_norm = ref.norm
        torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
        torch.testing.assert_close(perturbed, ref_buckets[0].buffers.flat_param, rtol=1e-5, atol=1e-6)
        eager.restore(ref)
        assert torch.equal(buckets[0].buffers.flat_param.view(torch.int32), before.view(torch.int32))
        if spec.objective.has_state:
            torch.testing.assert_close(
                buckets[0].buffers.grad_ema, ref_buckets[0].buffers.grad_ema, rtol=1e-5, atol=1e-7
            )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_round_to_nearest_on_hardware(dtype):
    """On the GPU stores round to nearest as eager does: results agree bit for
    bit except where the fp32 values differ by an ulp across a rounding boundary."""
    spec = Preconditioner(constraint="adaptive")
    shapes = [(1000, 97), (4097,)]
    params, buckets = flat_problem(shapes, dtype, spec)
    ref_params, ref_buckets = flat_problem(shapes, dtype, spec)
    triton_backend.perturb([b.table([True]) for b in buckets], buckets, spec, [0.5], False)
    eager.perturb([b.table([True]) for b in ref_buckets], ref_buckets, spec, [0.5], False)
    for p, q in zip(params, ref_params):
        ulps = ulp_distance(p.detach(), q.detach())
        assert int(ulps.max()) <= 1
        assert float((ulps == 0).float().mean()) > 0.999


def _big_step(numel, dtype):
    spec = Preconditioner()
    params, buckets = flat_problem([(numel,)], dtype, spec)
    x0 = buckets[0].buffers.flat_param.clone()
    g = buckets[0].buffers.flat_grad
    tables = [b.table([True]) for b in buckets]
    done = triton_backend.perturb(tables, buckets, spec, [0.05], False)
    norm, skipped = done.norm, done.skipped
    ref_norm = torch.linalg.vector_norm(g.float())
    torch.testing.assert_close(norm, ref_norm, rtol=1e-4, atol=0)
    assert not bool(skipped)
    # The last elements (beyond 2^31 bytes / elements) were perturbed as the first.
    for sl in (slice(0, 1024), slice(numel - 1024, numel)):
        expected = (x0[sl].float() + g[sl].float() * (0.05 / (ref_norm + 1e-12))).to(dtype)
        torch.testing.assert_close(buckets[0].buffers.flat_param[sl].float(), expected.float(), rtol=2**-7, atol=1e-6)
    triton_backend.restore(done)
    assert torch.equal(buckets[0].buffers.flat_param, x0)


def test_256m_element_flat_buffer_fp32():
    _big_step(256 * 2**20 + 3, torch.float32)


def test_element_indices_beyond_int32_bf16():
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    _big_step(2**31 + 5, torch.bfloat16)


# -- the whole optimizer: CUDA graphs and torch.compile -------------------------
def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 10)).to(DEVICE)


def _graph_model_and_optimizer(case):
    """flatten=True, rho and lr as device tensors, a StepLR on the optimizer;
    InfoSAM's base is Adam with capturable=True (its step count on the device)."""
    from presam_kernels import SAM, InfoSAM

    model = _mlp()
    rho = torch.tensor(0.05, device=DEVICE)
    if case == "sam_sgd":
        lr = torch.tensor(0.05, device=DEVICE)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr, momentum=0.9, flatten=True, backend="triton")
    else:
        lr = torch.tensor(1e-3, device=DEVICE)
        opt = InfoSAM(model.parameters(), torch.optim.Adam, rho=rho, lr=lr, capturable=True, flatten=True,
                      backend="triton")
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)


def _sam_step(model, opt, x, y):
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


def _batches(n):
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    return [(torch.randn(32, 64, generator=gen, device=DEVICE), torch.randint(0, 10, (32,), generator=gen,
                                                                               device=DEVICE)) for _ in range(n)]


@pytest.mark.parametrize("case", ["sam_sgd", "infosam_adam"])
def test_whole_sam_step_captured_in_a_cuda_graph_replays_like_eager(case):
    """Forward, both backwards, first_step and second_step in one CUDA graph:
    each replay on new data matches the eager run, and the scheduler's lr
    (written into the lr tensor) reaches the replays."""
    model, opt, scheduler = _graph_model_and_optimizer(case)
    ref, ref_opt, ref_scheduler = _graph_model_and_optimizer(case)
    batches = _batches(7)
    warmup = 3
    static_x, static_y = (t.clone() for t in batches[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up off the capture stream: Triton compiles, state and tables exist
        for x, y in batches[:warmup]:
            static_x.copy_(x)
            static_y.copy_(y)
            _sam_step(model, opt, static_x, static_y)
            scheduler.step()
    torch.cuda.current_stream().wait_stream(stream)
    for x, y in batches[:warmup]:
        _sam_step(ref, ref_opt, x, y)
        ref_scheduler.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _sam_step(model, opt, static_x, static_y)
    for x, y in batches[warmup:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        scheduler.step()
        _sam_step(ref, ref_opt, x, y)
        ref_scheduler.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    initial_lr = 0.05 if case == "sam_sgd" else 1e-3
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(initial_lr * 0.7 ** len(batches))


@pytest.mark.parametrize(("variant", "flatten", "mode"),
                         [("sam_sgd", False, "default"), ("infosam_adamw", True, "default"),
                          ("sam_sgd", False, "reduce-overhead")],
                         ids=["sam_sgd-per_tensor", "infosam_adamw-flatten", "sam_sgd-reduce_overhead"])
def test_torch_compile_inductor_fullgraph_first_step_matches_eager(variant, flatten, mode):
    """Inductor on CUDA, fullgraph: the Triton backend's first_step and the
    forward at x + e in one graph, second_step in another, against eager
    (three cases: Inductor compiles are slow). With reduce-overhead the ops
    stay outside the CUDA graphs (their bodies keep the pending step)."""
    from presam_kernels import SAM, InfoSAM

    torch._dynamo.reset()
    batches = _batches(3)
    results = []
    for compile_steps in (False, True):
        model = _mlp()
        if variant == "sam_sgd":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, flatten=flatten,
                      backend="triton")
        else:
            opt = InfoSAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, flatten=flatten, backend="triton")

        def to_adversarial(x, y):
            opt.first_step(zero_grad=True)
            return torch.nn.functional.cross_entropy(model(x), y)

        second = opt.second_step
        if compile_steps:
            to_adversarial = torch.compile(to_adversarial, fullgraph=True, mode=mode)
            second = torch.compile(second, fullgraph=True, mode=mode)
        losses = []
        for x, y in batches * 2:  # reduce-overhead records on the second call
            torch.nn.functional.cross_entropy(model(x), y).backward()
            loss = to_adversarial(x, y)
            losses.append(loss.item())
            loss.backward()
            second(zero_grad=True)
        results.append((losses, [p.detach().clone() for p in model.parameters()], opt.last_step_fused))
    (eager_losses, eager_params, eager_fused), (comp_losses, comp_params, comp_fused) = results
    assert comp_losses == pytest.approx(eager_losses, rel=1e-4)
    for p, q in zip(eager_params, comp_params):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert comp_fused == eager_fused
    torch._dynamo.reset()


@pytest.mark.parametrize("options", [{}, {"flatten": True}, {"base": "adam"}], ids=["in_place", "flatten", "adam"])
@pytest.mark.parametrize("change", ["nothing", "second_grad_replaced", "param_restrided", "rho_changed"])
def test_steady_replays_on_the_gpu_are_the_general_steps_bit_for_bit(options, change):
    """The steady step (optim/steady.py) with compiled kernels and device
    tables on the GPU: a replaying run and one that never replays, in
    lockstep (tests/test_steady_step.py), bit for bit, the steady part replayed."""
    import test_steady_step as steady_tests

    steady_tests.lockstep(getattr(steady_tests, change), steps=7, backend="triton", device="cuda", **options)
