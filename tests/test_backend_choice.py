"""A backend the user named is never swapped silently: where a compiled
backend hands a step to eager, the user is told once and
``opt.last_step_backend`` says which ran."""
import warnings

import pytest
import torch

from presam_kernels import SAM, extension_available
from helpers import step_with_unit_gradients
from presam_kernels.backends import triton_available


needs_cpp = pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")


@needs_cpp
def test_named_cpp_with_float64_warns_once_and_reports_eager():
    params = [torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, backend="cpp")
    with pytest.warns(RuntimeWarning, match="backend='cpp' cannot run"):
        step_with_unit_gradients(opt, params)
    assert opt.last_step_backend == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_with_unit_gradients(opt, params)  # once only
    assert opt.last_step_backend == "eager"


@needs_cpp
def test_auto_choice_falls_back_without_a_warning(monkeypatch):
    monkeypatch.delenv("PRESAM_BACKEND", raising=False)
    params = [torch.zeros(5, dtype=torch.float64, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_with_unit_gradients(opt, params)
    assert opt.backend == "cpp" and opt.last_step_backend == "eager"


@needs_cpp
def test_named_cpp_on_what_it_runs_reports_cpp_without_a_warning():
    params = [torch.zeros(5, requires_grad=True)]
    opt = SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, backend="cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_with_unit_gradients(opt, params)
    assert opt.last_step_backend == "cpp"


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_named_triton_with_a_gradient_strided_unlike_its_parameter_warns():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = SAM([p], torch.optim.SGD, rho=0.1, lr=0.1, backend="triton", perturb="in_place")
    p.grad = torch.ones(3, 4).t()  # a transposed gradient: the kernels walk rows as linear memory
    with pytest.warns(RuntimeWarning, match="backend='triton' cannot run"):
        opt.first_step(zero_grad=True)
    assert opt.last_step_backend == "eager"
    opt.restore()
    assert torch.equal(p.detach(), torch.zeros(4, 3))
