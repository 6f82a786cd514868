"""presam_kernels._host: the optimizer's per-step scans over its parameters,
on the C++ path and the Python fallback; each value must change exactly when
what it stands for changes (the optimizer rebuilds its buckets, or refuses a
second_step, on a change)."""
import pytest
import torch

from presam_kernels import _host, extension_available


@pytest.fixture(params=["cpp", "python"])
def path(request, monkeypatch):
    if request.param == "cpp" and not extension_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(_host, "USE_NATIVE", request.param == "cpp")
    return request.param


def make_params():
    return [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)), torch.randn(2, 2)]


def test_the_path_under_test_runs(path):
    assert (_host.native() is not None) == (path == "cpp")


def test_layout_key_changes_with_identity_dtype_or_device(path):
    params = make_params()
    key = _host.layout_key(params)
    assert _host.layout_key(list(params)) == key
    assert _host.layout_key(params[:2]) != key
    assert _host.layout_key([params[0], torch.nn.Parameter(params[1].detach().clone()), params[2]]) != key
    params[1].data = params[1].data.double()
    assert _host.layout_key(params) != key
    params[1].data = params[1].data.float()
    assert _host.layout_key(params) == key
    params[2] = params[2].to("meta")  # another device, the same identity is impossible: a new tensor
    assert _host.layout_key(params) != key


def test_layout_key_tells_device_indices_apart(path):
    a, b = torch.empty(2, device="meta"), torch.empty(2, device="meta")
    assert _host.layout_key([a]) != _host.layout_key([b])  # identity
    assert _host.layout_key([a]) == _host.layout_key([a])


def test_data_addresses_change_when_a_storage_is_replaced(path):
    params = make_params()
    before = _host.data_addresses(params)
    assert before == _host.data_addresses(params)
    params[1].data = params[1].data.clone()
    assert _host.data_addresses(params) != before


def test_data_addresses_of_a_subclass_ask_it(path):
    class Shifted(torch.Tensor):
        def data_ptr(self):
            return 12345

    t = torch.Tensor._make_subclass(Shifted, torch.randn(3))
    plain = torch.randn(3)
    assert _host.data_addresses([t, plain]) == _host.data_addresses([t, plain])
    assert _host.data_addresses([t]) != _host.data_addresses([plain])
    if path == "python":
        assert _host.data_addresses([t]) == (12345,)


def test_any_sparse_grad(path):
    params = make_params()
    groups = [{"params": params}]
    assert not _host.scan_params(groups).any_sparse_grad
    params[0].grad = torch.randn(3, 4)
    assert not _host.scan_params(groups).any_sparse_grad
    params[1].grad = torch.randn(5).to_sparse()
    assert _host.scan_params(groups).any_sparse_grad


def test_rows_with_grads_hands_out_the_gradients_themselves(path):
    params = make_params()
    params[0].grad = torch.randn(3, 4)
    params[2].grad = torch.randn(2, 2)
    rows, grads, _ = _host.rows_with_grads(params)
    assert rows == (0, 2)
    assert grads[0] is params[0].grad and grads[1] is params[2].grad
    params[0].grad = None
    assert _host.rows_with_grads(params)[:2] == ((2,), [params[2].grad])


def test_rows_with_grads_asks_a_subclass(path):
    class WithGrad(torch.Tensor):
        @property
        def grad(self):
            return "its own"

    t = torch.Tensor._make_subclass(WithGrad, torch.randn(3))
    assert _host.rows_with_grads([torch.randn(2), t]) == ((1,), ["its own"], None)


def test_scan_params_is_the_three_scans_of_the_groups_parameters_in_one(path):
    params = make_params()
    params[1].grad = torch.randn_like(params[1])
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    scan = _host.scan_params(groups)
    assert scan == (_host.layout_key(params), _host.data_addresses(params), False)
    params[0].data = params[0].data.clone()  # another storage: the addresses change, the layout key does not
    moved = _host.scan_params(groups)
    assert moved.layout_key == scan.layout_key and moved.data_addresses != scan.data_addresses
    params[2].grad = torch.zeros_like(params[2]).to_sparse()
    assert _host.scan_params(groups).any_sparse_grad
