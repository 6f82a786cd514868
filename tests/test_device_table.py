"""The Triton backend's device table (backends/triton/table.py ``device_table``):
every row holds the current addresses and metadata, a cached table is
handed out only while nothing it holds has changed, and a row the kernels
cannot walk gives None (the eager path). Each test runs on both host paths:
the C++ check and cache (csrc/host.cpp) and the Python fallback.
"""
from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton")

from presam_kernels import _host  # noqa: E402
from presam_kernels.backends.triton import table as triton_table  # noqa: E402
from presam_kernels.buckets import build_buckets  # noqa: E402

# The interpreter dereferences host addresses, compiled kernels device ones.
DEVICE = torch.device("cpu") if triton_table.interpreting() else torch.device("cuda")
CHUNK = 4
SHAPES = [(4, 4), (7,), (3, 2, 2), (1,), (5, 3)]
PATHS = ("cpp", "python")

pytestmark = pytest.mark.skipif(
    not (triton_table.interpreting() or torch.cuda.is_available()),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 set before they are imported",
)


@pytest.fixture(params=PATHS)
def uploads(request, monkeypatch):
    """The host path under test; a list that gets an entry per device table built."""
    native = request.param == "cpp"
    if native and not triton_table.native_tables_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(_host, "USE_NATIVE", native)
    built = []
    original = triton_table._upload
    monkeypatch.setattr(triton_table, "_upload", lambda *args: built.append(args) or original(*args))
    return built


def make_bucket(shapes=SHAPES, flatten=False, groups=None, ema=False):
    params = []
    for shape in shapes:
        p = torch.randn(shape, device=DEVICE)
        p.grad = torch.randn(shape, device=DEVICE)
        params.append(p)
    groups = groups or [0] * len(params)
    (bucket,) = build_buckets(params, groups, [p.ndim >= 2 for p in params], flatten)
    if ema:
        bucket.buffers.ensure_grad_ema()
    return params, bucket


def with_row(table, i, **change):
    """A copy of ``table`` whose row i has ``change[field](old value)`` in each
    field named (tables are immutable: buckets share their rows between steps)."""
    fields = {}
    for name, new in change.items():
        values = list(getattr(table, name))
        values[i] = new(values[i])
        fields[name] = values if name == "grads" else tuple(values)
    return replace(table, **fields)


def expected_rows(table):
    """The rows the kernels must read, from the tensors as they are now."""
    rows, chunk_start = [], 0
    for i in range(len(table)):
        length = table.lengths[i]
        if length == 0:
            continue
        flags = (1 if table.is_weight[i] else 0) | (2 if table.perturbed[i] else 0)
        rows.append([table.params[i].data_ptr(), table.grads[i].data_ptr(), length, table.offsets[i],
                     chunk_start, table.group_index[i], flags, 0])
        chunk_start += -(-length // CHUNK)
    return rows


def rows_of(dev):
    return dev.rows.cpu().tolist()


def check_current(bucket, table):
    dev = triton_table.device_table(bucket, table, CHUNK)
    assert dev is not None, "a linear table was refused"
    assert dev.n_rows == len(expected_rows(table))
    assert rows_of(dev) == expected_rows(table)
    assert dev.param_addresses == tuple(p.data_ptr() for p in table.params)
    return dev


def test_unchanged_rows_reuse_the_table(uploads):
    params, bucket = make_bucket()
    first = check_current(bucket, bucket.table([True]))
    for _ in range(3):
        assert check_current(bucket, bucket.table([True])) is first
    assert len(uploads) == 1


def test_reallocated_grad_rebuilds_with_its_address(uploads):
    params, bucket = make_bucket()
    check_current(bucket, bucket.table([True]))
    params[2].grad = params[2].grad.clone()  # as after zero_grad(set_to_none=True) and a backward
    check_current(bucket, bucket.table([True]))
    assert len(uploads) == 2


def test_replaced_param_storage_rebuilds_with_its_address(uploads):
    params, bucket = make_bucket()
    check_current(bucket, bucket.table([True]))
    params[0].data = params[0].detach().clone()  # same layout, new storage
    check_current(bucket, bucket.table([True]))
    assert len(uploads) == 2


def test_alternating_grad_buffers_hit_the_cache(uploads):
    params, bucket = make_bucket()
    buffers = [params[1].grad, params[1].grad.clone()]
    for step in range(6):
        params[1].grad = buffers[step % 2]
        check_current(bucket, bucket.table([True]))
    assert len(uploads) == 2


@pytest.mark.parametrize("which", ["param", "grad", "both"])
def test_restrided_tensor_at_the_same_address_is_not_walked(uploads, which):
    """Same storage, same address, transposed strides: the backup and EMA
    slices keep the old element order, so a cached table would pair wrong
    elements; the row must go to eager."""
    params, bucket = make_bucket()
    check_current(bucket, bucket.table([True]))
    p = params[0]  # (4, 4), contiguous
    if which in ("param", "both"):
        p.data = p.data.as_strided((4, 4), (1, 4))
    if which in ("grad", "both"):
        p.grad = p.grad.as_strided((4, 4), (1, 4))
    table = bucket.table([True])
    assert table.params[0].data_ptr() == bucket.params[0].data_ptr()
    assert triton_table.device_table(bucket, table, CHUNK) is None


def test_param_on_another_device_is_not_walked(uploads):
    params, bucket = make_bucket()
    check_current(bucket, bucket.table([True]))
    table = with_row(bucket.table([True]), 3, params=lambda p: p.to("meta"), grads=lambda g: g.to("meta"))
    # as a bucket's row sees a parameter moved away
    assert triton_table.device_table(bucket, table, CHUNK) is None


def test_param_of_another_dtype_is_not_walked(uploads):
    params, bucket = make_bucket()
    check_current(bucket, bucket.table([True]))
    to64 = lambda t: t.to(torch.float64)  # noqa: E731
    table = with_row(bucket.table([True]), 1, params=to64, grads=to64)
    assert triton_table.device_table(bucket, table, CHUNK) is None


def test_tensor_subclass_is_not_walked(uploads):
    class Tagged(torch.Tensor):
        pass

    params, bucket = make_bucket()
    table = with_row(bucket.table([True]), 2, params=lambda p: torch.Tensor._make_subclass(Tagged, p))
    assert triton_table.device_table(bucket, table, CHUNK) is None


@pytest.mark.parametrize("change", ["group", "perturbed", "is_weight", "offset", "length"])
def test_changed_row_metadata_rebuilds(uploads, change):
    params, bucket = make_bucket(groups=[0, 0, 1, 1, 0])
    check_current(bucket, bucket.table([True, True]))
    table = bucket.table([True, True])
    if change == "group":
        table = with_row(table, 1, group_index=lambda k: 1)
    elif change == "perturbed":
        table = bucket.table([True, False])  # rho = 0 for group 1
    elif change == "is_weight":
        table = with_row(table, 1, is_weight=lambda w: not w)
    elif change == "offset":
        table = with_row(table, 1, offsets=lambda o: o + 16)  # another slice of the flat buffers (still inside them)
    else:
        table = with_row(table, 3, lengths=lambda n: 0)  # an empty row: left out, the next row's first chunk moves
    check_current(bucket, table)
    assert len(uploads) == 2


def test_chunk_size_rebuilds(uploads):
    params, bucket = make_bucket()
    table = bucket.table([True])
    small = triton_table.device_table(bucket, table, 2)
    large = triton_table.device_table(bucket, table, CHUNK)
    assert [r[4] for r in rows_of(small)] != [r[4] for r in rows_of(large)]
    assert rows_of(large) == expected_rows(table)


def test_saved_buffer_or_ema_reallocated_rebuilds(uploads):
    params, bucket = make_bucket(ema=True)
    check_current(bucket, bucket.table([True]))
    bucket.buffers.backup = torch.zeros_like(bucket.buffers.backup)  # e.g. the bucket re-made its flat buffer
    check_current(bucket, bucket.table([True]))
    bucket.buffers.grad_ema = torch.zeros_like(bucket.buffers.grad_ema)
    check_current(bucket, bucket.table([True]))
    assert len(uploads) == 3


def test_out_of_place_table_has_its_own_entry(uploads):
    params, bucket = make_bucket()
    check_current(bucket, bucket.table([True]))
    check_current(bucket, bucket.table([True], out_of_place=True))
    assert len(uploads) == 2


def test_merged_rows_of_a_flat_bucket(uploads):
    params, bucket = make_bucket(flatten=True, groups=[0, 0, 1, 1, 1], ema=True)
    table = bucket.table([True, True])
    assert table.merged and len(table) < len(params)  # runs of the same group and weight flag
    first = check_current(bucket, table)
    assert check_current(bucket, bucket.table([True, True])) is first
    assert len(uploads) == 1


def test_merged_row_whose_slice_is_elsewhere_is_not_walked(uploads):
    params, bucket = make_bucket(flatten=True, ema=True)
    table = with_row(bucket.table([True]), 0, backups=lambda b: b.clone())  # not the bucket's backup at the row's offset
    assert triton_table.device_table(bucket, table, CHUNK) is None
    table = with_row(bucket.table([True]), 0, grad_emas=lambda m: m.clone())
    assert triton_table.device_table(bucket, table, CHUNK) is None


@pytest.mark.parametrize("layout", ["mixed", "flat", "out_of_place", "rho_zero_group", "channels_last"])
def test_cpp_and_python_paths_build_the_same_table(monkeypatch, layout):
    if not triton_table.native_tables_available():
        pytest.skip("the C++ extension is not built")
    groups = [0, 1, 0, 1, 0] if layout == "rho_zero_group" else None
    params, bucket = make_bucket(flatten=layout == "flat", groups=groups, ema=True)
    if layout == "channels_last":
        p = params[2]
        p.data = p.data.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]
        p.grad = torch.randn_like(p)
        (bucket,) = build_buckets(params, [0] * len(params), [q.ndim >= 2 for q in params], False)
    perturbed = [True, False] if layout == "rho_zero_group" else [True]
    built = {}
    for native in (True, False):
        monkeypatch.setattr(_host, "USE_NATIVE", native)
        dev = triton_table.device_table(bucket, bucket.table(perturbed, out_of_place=layout == "out_of_place"), CHUNK)
        built[native] = (rows_of(dev), dev.n_rows, dev.aligned, dev.param_addresses)
    assert built[True] == built[False]


@pytest.mark.parametrize("flatten", [False, True], ids=["per_tensor", "flatten"])
def test_steady_steps_share_one_table_layout_and_one_device_table(uploads, flatten):
    """first_step's and second_step's tables are one kept layout (so the C++
    check converts its per-row numbers once, not every call) and one device
    table, step after step."""
    from presam_kernels import SAM

    params = [torch.randn(s, device=DEVICE, requires_grad=True) for s in SHAPES]
    opt = SAM(params, torch.optim.SGD, rho=0.05, lr=0.01, backend="triton", flatten=flatten, perturb="in_place")
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.first_step()
        opt.second_step()
    (bucket,) = opt._buckets
    assert len(bucket._table_layouts) == 1
    assert len(uploads) == 1
