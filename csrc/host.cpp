// The Triton backend's per-step host work (presam_kernels/backends/triton/table.py,
// docs/design.md section 2): check that every row of a bucket's table is linear
// memory laid out as its slices of the bucket's flat buffers, and hand back the
// device table the kernels walk, reusing one of the last few built while
// nothing it holds has changed. The Python path of table.py does the same where
// the extension is not built; this one takes ~30 ns a row instead of ~2 us.
//
// Also the optimizer's per-step scans over its parameters (presam_kernels/_host.py:
// layout key, storage addresses, which parameters have a gradient),
// and the module `presam_kernels._C` itself: loading it registers the
// presam_cpp:: ops of ops.cpp (static initialisers).
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace presam {
namespace {

constexpr int64_t kRowWidth = 8;     // table.ROW_WIDTH: 64 B a row
constexpr int64_t kOffsetAlign = 16;  // table.OFFSET_ALIGN (buckets.SLICE_ALIGN)
constexpr int64_t kFlagWeight = 1;    // table.FLAG_WEIGHT
constexpr int64_t kFlagPerturbed = 2;  // table.FLAG_PERTURBED
// What the cache key holds per row: everything a row of the device table is made of.
constexpr size_t kKeyPerRow = 6;      // param address, grad address, offset, length, group, flags
constexpr size_t kKeyHeader = 4;      // chunk, saved buffer address, EMA address, rows

int64_t as_int(PyObject* item) {
  const long long v = PyLong_AsLongLong(item);
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return static_cast<int64_t>(v);
}

bool as_bool(PyObject* item) {
  const int v = PyObject_IsTrue(item);
  if (v < 0) throw py::error_already_set();
  return v != 0;
}

// A tensor's data address (its TensorImpl's, as Tensor::data_ptr() gives it).
int64_t impl_address(c10::TensorImpl* t) { return reinterpret_cast<int64_t>(t->mutable_data()); }
int64_t address(const at::Tensor& t) { return impl_address(t.unsafeGetTensorImpl()); }

// A device as one number (type and index), as the keys and signatures hold it.
int64_t device_code(const at::Device& d) {
  return static_cast<int64_t>(d.type()) << 16 | static_cast<uint16_t>(d.index());
}

// Whether a and b are equal bytes objects (None never equals).
bool same_bytes(const py::object& a, const py::object& b) {
  if (!PyBytes_Check(a.ptr()) || !PyBytes_Check(b.ptr())) return false;
  const Py_ssize_t n = PyBytes_GET_SIZE(a.ptr());
  return n == PyBytes_GET_SIZE(b.ptr()) && std::memcmp(PyBytes_AS_STRING(a.ptr()), PyBytes_AS_STRING(b.ptr()), n) == 0;
}

// The items of a list or tuple (borrowed, valid while it is alive and unchanged).
PyObject** items(const py::object& seq, const char* what) {
  TORCH_CHECK(PyList_Check(seq.ptr()) || PyTuple_Check(seq.ptr()), "DeviceTables.get: ", what,
              " must be a list or a tuple");
  return PySequence_Fast_ITEMS(seq.ptr());
}

// One device table per distinct key, the most recently used last.
struct Entry {
  std::vector<int64_t> key;
  py::object table;
};

class DeviceTables {
 public:
  // The bucket's dtype and device, and each parameter's shape and strides:
  // what its slices of the flat buffers (backup, EMA) are laid out as.
  DeviceTables(at::ScalarType dtype, at::Device device, std::vector<std::vector<int64_t>> shapes,
               std::vector<std::vector<int64_t>> strides, int64_t capacity)
      : dtype_(dtype), device_(device), shapes_(std::move(shapes)), strides_(std::move(strides)),
        capacity_(std::max<int64_t>(capacity, 1)) {
    TORCH_CHECK(shapes_.size() == strides_.size(), "DeviceTables: a stride per shape");
  }

  // The device table of one table's rows: cached, or ``build(host_rows,
  // n_rows, aligned, param_addresses)`` for a new key; None when a row is not
  // linear (the caller takes the eager path). ``members`` (the bucket's index
  // of each row's parameter) or, for rows spanning several parameters (None),
  // ``saved_views`` / ``ema_views``, each row's slices, checked one by one.
  py::object get(const py::object& params, const py::list& grads, const py::object& members,
                 const py::object& saved_views, const py::object& ema_views, const py::object& offsets,
                 const py::object& lengths, const py::object& groups, const py::object& is_weight,
                 const py::object& perturbed, const at::Tensor& saved, const std::optional<at::Tensor>& ema,
                 int64_t chunk, const py::function& build, const py::object& signature) {
    const size_t n = grads.size();
    const bool by_member = !members.is_none();
    TORCH_CHECK(py::len(params) == n && py::len(offsets) == n && py::len(lengths) == n && py::len(groups) == n &&
                    py::len(is_weight) == n && py::len(perturbed) == n && (!by_member || py::len(members) == n),
                "DeviceTables.get: every per-row sequence needs ", n, " entries");
    PyObject** param_items = items(params, "params");
    PyObject** grad_items = items(grads, "grads");
    PyObject** saved_items = by_member ? nullptr : items(saved_views, "saved_views");
    PyObject** ema_items = by_member || ema_views.is_none() ? nullptr : items(ema_views, "ema_views");
    TORCH_CHECK(by_member || py::len(saved_views) == n, "DeviceTables.get: saved_views needs ", n, " entries");
    TORCH_CHECK(!ema_items || py::len(ema_views) == n, "DeviceTables.get: ema_views needs ", n, " entries");
    const int64_t saved_base = address(saved);
    const int64_t saved_size = saved.element_size();
    const int64_t ema_base = ema ? address(*ema) : 0;
    const std::vector<StaticRow>& rows = static_rows(members, offsets, lengths, groups, is_weight, perturbed);
    const std::array<int64_t, 4> header = {chunk, saved_base, ema ? ema_base : -1, static_cast<int64_t>(n)};
    // The rows' signature (rows_with_grads) equal to the last call's, and the
    // same per-row numbers and buffers: every check below would pass as it did
    // then, and the key would be the same.
    if (static_hit_ && header == last_header_ && same_bytes(signature, last_signature_)) return last_table_;
    last_signature_ = py::none();
    key_.assign(header.begin(), header.end());
    key_.reserve(kKeyHeader + kKeyPerRow * n);
    for (size_t r = 0; r < n; ++r) {
      PyObject* p_obj = param_items[r];
      PyObject* g_obj = grad_items[r];
      if (!plain(p_obj) || !plain(g_obj)) return py::none();  // DTensor and other subclasses: eager
      const at::Tensor& p = THPVariable_Unpack(p_obj);
      const at::Tensor& g = THPVariable_Unpack(g_obj);
      const StaticRow& row = rows[r];
      if (row.length != 0) {  // an empty row touches nothing: never walked, never checked
        const bool linear =
            by_member ? member_is_linear(p, g, row.member)
                      : slices_are_linear(p, g, row.length, saved_items[r], saved_base + row.offset * saved_size,
                                          ema_items ? ema_items[r] : nullptr, ema_base + row.offset * 4);
        if (!linear) return py::none();
      }
      key_.insert(key_.end(), {address(p), address(g), row.offset, row.length, row.group, row.flags});
    }
    py::object table;
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key_) {
        std::rotate(it, it + 1, entries_.end());  // most recently used last
        table = entries_.back().table;
        break;
      }
    }
    if (!table) {
      table = make(ema.has_value(), saved_base, ema_base, build);
      entries_.push_back({key_, table});
      if (static_cast<int64_t>(entries_.size()) > capacity_) entries_.erase(entries_.begin());
    }
    last_header_ = header;
    last_signature_ = signature;
    last_table_ = table;
    return table;
  }

  size_t size() const { return entries_.size(); }

 private:
  // What a row's entries of the per-row lists say (all but the tensors).
  struct StaticRow {
    int64_t offset, length, group, flags, member;
  };

  // The per-row numbers, converted again only when a sequence is not the one
  // of the last call: a bucket's tables share them from step to step as tuples
  // (buckets.Bucket.table), which cannot change, and the last call's are held
  // here, so that their identities cannot be reused by other objects.
  const std::vector<StaticRow>& static_rows(const py::object& members, const py::object& offsets,
                                            const py::object& lengths, const py::object& groups,
                                            const py::object& is_weight, const py::object& perturbed) {
    const std::vector<py::object> numbers = {members, offsets, lengths, groups, is_weight, perturbed};
    bool same = numbers.size() == static_numbers_.size();
    for (size_t k = 0; same && k < numbers.size(); ++k) {
      same = numbers[k].is(static_numbers_[k]) && (numbers[k].is_none() || PyTuple_CheckExact(numbers[k].ptr()));
    }
    static_hit_ = same;
    if (same) return static_rows_;
    const size_t n = py::len(offsets);
    const bool by_member = !members.is_none();
    PyObject** offset_items = items(offsets, "offsets");
    PyObject** length_items = items(lengths, "lengths");
    PyObject** group_items = items(groups, "groups");
    PyObject** weight_items = items(is_weight, "is_weight");
    PyObject** perturbed_items = items(perturbed, "perturbed");
    PyObject** member_items = by_member ? items(members, "members") : nullptr;
    std::vector<StaticRow> rows;
    rows.reserve(n);
    for (size_t r = 0; r < n; ++r) {
      rows.push_back({as_int(offset_items[r]), as_int(length_items[r]), as_int(group_items[r]),
                      (as_bool(weight_items[r]) ? kFlagWeight : 0) | (as_bool(perturbed_items[r]) ? kFlagPerturbed : 0),
                      by_member ? as_int(member_items[r]) : -1});
    }
    static_rows_ = std::move(rows);
    static_numbers_ = numbers;
    return static_rows_;
  }

  // A plain strided tensor of the bucket's dtype and device (torch.Tensor or
  // nn.Parameter exactly: a subclass may mean something else by its storage).
  bool plain(PyObject* obj) const {
    if (!THPVariable_CheckExact(obj)) return false;
    const at::Tensor& t = THPVariable_Unpack(obj);
    return t.layout() == at::kStrided && t.scalar_type() == dtype_ && t.device() == device_;
  }

  // A parameter's own row: its backup and EMA are the bucket's views of it,
  // laid out with the bucket's strides for it, so matching those is the check.
  bool member_is_linear(const at::Tensor& p, const at::Tensor& g, int64_t k) const {
    TORCH_CHECK(k >= 0 && k < static_cast<int64_t>(shapes_.size()), "DeviceTables.get: member ", k, " of ",
                shapes_.size(), " parameters");
    const at::IntArrayRef shape(shapes_[k]), stride(strides_[k]);
    return p.sizes() == shape && g.sizes() == shape && p.strides() == stride && g.strides() == stride;
  }

  // A row spanning several parameters (flatten=True): param, grad and both
  // slices the same dense layout, each slice where its offset says.
  static bool slices_are_linear(const at::Tensor& p, const at::Tensor& g, int64_t length, PyObject* saved_obj,
                                int64_t saved_at, PyObject* ema_obj, int64_t ema_at) {
    if (p.sizes() != g.sizes() || p.strides() != g.strides() || p.numel() != length) return false;
    if (!p.is_non_overlapping_and_dense()) return false;
    auto slice_ok = [&](PyObject* obj, int64_t at) {
      if (!THPVariable_Check(obj)) return false;
      const at::Tensor& v = THPVariable_Unpack(obj);
      return v.strides() == p.strides() && v.sizes() == p.sizes() && address(v) == at;
    };
    return slice_ok(saved_obj, saved_at) && (ema_obj == nullptr || slice_ok(ema_obj, ema_at));
  }

  // The host image of the rows in key_ (empty rows left out) and build's device table of it.
  py::object make(bool has_ema, int64_t saved_base, int64_t ema_base, const py::function& build) const {
    const int64_t n = key_[3];
    const int64_t* rows_in = key_.data() + kKeyHeader;
    const int64_t chunk = key_[0];
    int64_t n_rows = 0;
    for (int64_t r = 0; r < n; ++r) n_rows += rows_in[r * kKeyPerRow + 3] != 0;
    at::Tensor host = at::empty({n_rows, kRowWidth}, at::TensorOptions().dtype(at::kLong));
    int64_t* out = host.data_ptr<int64_t>();
    bool aligned = saved_base % 16 == 0 && (!has_ema || ema_base % 16 == 0);
    py::tuple param_addresses(n);
    int64_t chunk_start = 0;
    for (int64_t r = 0; r < n; ++r) {
      const int64_t* in = rows_in + r * kKeyPerRow;
      param_addresses[r] = py::int_(in[0]);
      const int64_t length = in[3];
      if (length == 0) continue;
      aligned = aligned && in[0] % 16 == 0 && in[1] % 16 == 0 && in[2] % kOffsetAlign == 0;
      const int64_t row[kRowWidth] = {in[0], in[1], length, in[2], chunk_start, in[4], in[5], 0};
      std::memcpy(out, row, sizeof(row));
      out += kRowWidth;
      chunk_start += (length + chunk - 1) / chunk;
    }
    return build(host, n_rows, aligned, param_addresses);
  }

  at::ScalarType dtype_;
  at::Device device_;
  std::vector<std::vector<int64_t>> shapes_, strides_;
  int64_t capacity_;
  std::vector<Entry> entries_;
  std::vector<int64_t> key_;  // this call's key, kept to reuse its allocation
  std::vector<py::object> static_numbers_;  // the per-row numbers of the last call
  std::vector<StaticRow> static_rows_;      // converted
  bool static_hit_ = false;                 // this call's numbers are those
  // The last call that returned a table: its header, its rows' signature (None:
  // none, or the call gave None) and the table.
  std::array<int64_t, 4> last_header_ = {};
  py::object last_signature_ = py::none();
  py::object last_table_ = py::none();
};

// -- the base optimizer's state as a fused step left it (base_update.SteadyPlan) -------
//
// Holds, for the parameters a fused step updated, the per-parameter state
// entry (a dict) and the tensor under each of ``keys`` that the step used, and
// answers whether ``optimizer.state`` still holds exactly those: the same entry
// per parameter, the same tensor under each key, still at the address it had
// (``t.data = other`` keeps the object but not its memory), and the tensors
// under ``versioned_key`` (Adam's step counts) not written since
// ``note_versions``: neither their version counters nor their values changed
// (a write through ``t.data``, e.g. ``state["step"].data.fill_(1)``, bumps
// no version counter of ``t``).
// The state dict is walked item by item: looking a parameter up would hash it
// through torch.Tensor.__hash__, a Python function (~0.3 us a parameter).
class StateWatch {
 public:
  StateWatch(const py::list& params, const py::list& entries, const py::tuple& keys, const py::list& values,
             const py::object& versioned_key)
      : keys_(keys), versioned_(-1) {
    const size_t n = params.size();
    TORCH_CHECK(entries.size() == n && values.size() == n * keys.size(),
                "StateWatch: an entry per parameter and a value per parameter and key");
    for (size_t k = 0; k < keys.size(); ++k) {
      TORCH_CHECK(PyUnicode_CheckExact(keys[k].ptr()), "StateWatch: keys must be str");
      if (!versioned_key.is_none() && py::reinterpret_borrow<py::object>(keys[k]).equal(versioned_key)) {
        versioned_ = static_cast<int64_t>(k);
      }
    }
    for (size_t i = 0; i < n; ++i) {
      params_.push_back(params[i]);
      TORCH_CHECK(PyDict_Check(entries[i].ptr()), "StateWatch: entries must be dicts");
      entries_.push_back(entries[i]);
      index_.emplace(params[i].ptr(), i);
    }
    for (size_t j = 0; j < values.size(); ++j) {
      values_.push_back(values[j]);
      addresses_.push_back(tensor_address(values[j].ptr()));
    }
    note_versions();
  }

  bool holds(const py::dict& state) const {
    if (entries_.empty()) return true;  // nothing watched (SGD without momentum): no walk
    size_t found = 0;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(state.ptr(), &pos, &key, &value)) {
      auto it = index_.find(key);
      if (it == index_.end()) continue;
      if (value != entries_[it->second].ptr()) return false;  // the entry was replaced
      ++found;  // dict keys are unique: each watched parameter is met once at most
    }
    if (found != entries_.size()) return false;  // an entry was removed
    const size_t n_keys = keys_.size();
    for (size_t i = 0; i < entries_.size(); ++i) {
      for (size_t k = 0; k < n_keys; ++k) {
        PyObject* now = PyDict_GetItemWithError(entries_[i].ptr(), keys_[k].ptr());
        if (now == nullptr && PyErr_Occurred()) throw py::error_already_set();
        if (now != values_[i * n_keys + k].ptr()) return false;
        if (tensor_address(now) != addresses_[i * n_keys + k]) return false;  // re-pointed through .data
      }
      if (versioned_ >= 0 && (version(i) != versions_[i] || !(step_value(i) == step_values_[i]))) return false;
    }
    return true;
  }

  // After the step wrote the versioned tensors itself (Adam's step += 1).
  void note_versions() {
    versions_.clear();
    step_values_.clear();
    if (versioned_ < 0) return;
    for (size_t i = 0; i < entries_.size(); ++i) {
      versions_.push_back(version(i));
      step_values_.push_back(step_value(i));
    }
  }

 private:
  static int64_t tensor_address(PyObject* obj) {
    return THPVariable_Check(obj) ? address(THPVariable_Unpack(obj)) : 0;
  }

  // A one-element CPU tensor's value (where base_update keeps a step count it
  // fuses), read without a device sync; NaN (never equal) for anything else.
  double step_value(size_t i) const {
    PyObject* obj = values_[i * keys_.size() + versioned_].ptr();
    if (!THPVariable_Check(obj)) return std::nan("");
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.device().is_cpu() || t.numel() != 1) return std::nan("");
    return t.scalar_type() == at::kFloat ? static_cast<double>(*t.data_ptr<float>()) : t.item().toDouble();
  }

  int64_t version(size_t i) const {
    PyObject* obj = values_[i * keys_.size() + versioned_].ptr();
    return THPVariable_Check(obj) ? THPVariable_Unpack(obj)._version() : -1;
  }

  py::tuple keys_;
  int64_t versioned_;
  std::vector<py::object> params_, entries_, values_;  // held: their identities stay theirs
  std::unordered_map<PyObject*, size_t> index_;
  std::vector<int64_t> versions_;
  std::vector<int64_t> addresses_;  // per value: its data address when watched (0: not a tensor)
  std::vector<double> step_values_;  // per parameter: its step count when noted
};

// -- scans over the optimizer's parameters (presam_kernels/_host.py) -------------

// A tensor's data address as Python's data_ptr() gives it; a subclass answers
// for itself (a wrapper such as DTensor has no storage of its own).
int64_t data_address(PyObject* obj) {
  if (THPVariable_CheckExact(obj)) return address(THPVariable_Unpack(obj));
  py::object ptr = py::reinterpret_borrow<py::object>(obj).attr("data_ptr")();
  return ptr.cast<int64_t>();
}

// (identity, device, dtype) of a parameter: its part of the optimizer's layout key.
void write_layout(PyObject* obj, size_t i, int64_t* w) {
  TORCH_CHECK(THPVariable_Check(obj), "layout_key: parameter ", i, " is not a tensor");
  const at::Tensor& t = THPVariable_Unpack(obj);
  w[0] = reinterpret_cast<int64_t>(obj);
  w[1] = device_code(t.device());
  w[2] = static_cast<int64_t>(t.scalar_type());
}

// (identity, device, dtype) of every parameter, packed: the optimizer's layout
// key, which only ever meets ==.
py::bytes layout_key(const py::list& params) {
  std::string out(params.size() * 3 * sizeof(int64_t), '\0');
  int64_t* w = reinterpret_cast<int64_t*>(out.data());
  for (size_t i = 0; i < params.size(); ++i, w += 3) write_layout(PyList_GET_ITEM(params.ptr(), i), i, w);
  return py::bytes(out);
}

// Every tensor's data address, packed (compared with == only).
py::bytes data_addresses(const py::list& tensors) {
  std::string out(tensors.size() * sizeof(int64_t), '\0');
  int64_t* w = reinterpret_cast<int64_t*>(out.data());
  for (size_t i = 0; i < tensors.size(); ++i) w[i] = data_address(PyList_GET_ITEM(tensors.ptr(), i));
  return py::bytes(out);
}

// A parameter's .grad (the same Python object), read without the attribute
// lookup for a plain tensor; a subclass answers for itself.
py::object grad_of(PyObject* obj) {
  if (THPVariable_CheckExact(obj)) {
    const at::Tensor& grad = THPVariable_Unpack(obj).grad();
    return grad.defined() ? py::reinterpret_steal<py::object>(THPVariable_Wrap(grad)) : py::none();
  }
  return py::reinterpret_borrow<py::object>(obj).attr("grad");
}

bool sparse_grad(PyObject* param) {
  py::object grad = grad_of(param);
  return THPVariable_Check(grad.ptr()) && THPVariable_Unpack(grad.ptr()).layout() == at::kSparse;
}

// (layout_key, data_addresses, any_sparse_grad) of the parameters of every
// param group (``groups``: the optimizer's param_groups) in one walk over them,
// without listing them first: each walk costs ~30-100 ns a parameter, mostly
// cache misses on the tensors' metadata.
py::tuple scan_params(const py::list& groups) {
  std::string key, addresses;
  bool sparse = false;
  size_t i = 0;
  for (size_t k = 0; k < groups.size(); ++k) {
    PyObject* group = PyList_GET_ITEM(groups.ptr(), k);
    TORCH_CHECK(PyDict_Check(group), "scan_params: param group ", k, " is not a dict");
    PyObject* params = PyDict_GetItemString(group, "params");
    TORCH_CHECK(params != nullptr && PyList_Check(params), "scan_params: param group ", k, " has no list of params");
    const size_t n = PyList_GET_SIZE(params);
    key.resize(key.size() + n * 3 * sizeof(int64_t));
    addresses.resize(addresses.size() + n * sizeof(int64_t));
    int64_t* kw = reinterpret_cast<int64_t*>(key.data()) + 3 * i;
    int64_t* aw = reinterpret_cast<int64_t*>(addresses.data()) + i;
    for (size_t j = 0; j < n; ++j, ++i, kw += 3) {
      PyObject* obj = PyList_GET_ITEM(params, j);
      write_layout(obj, i, kw);
      aw[j] = data_address(obj);
      sparse = sparse || sparse_grad(obj);
    }
  }
  return py::make_tuple(py::bytes(key), py::bytes(addresses), sparse);
}

// Appends what DeviceTables.get checks of a tensor: its layout, dtype,
// device, sizes, strides and data address.
void sign(const at::Tensor& t, std::vector<int64_t>& out) {
  out.insert(out.end(), {static_cast<int64_t>(t.layout()), static_cast<int64_t>(t.scalar_type()),
                         device_code(t.device()), t.dim()});
  if (t.layout() != at::kStrided) return;
  out.insert(out.end(), t.sizes().begin(), t.sizes().end());
  out.insert(out.end(), t.strides().begin(), t.strides().end());
  out.push_back(address(t));
}

// sign() of a plain tensor (torch.Tensor or nn.Parameter exactly); false for
// a subclass (its storage is its own business: no signature then).
bool sign(PyObject* obj, std::vector<int64_t>& out) {
  if (!THPVariable_CheckExact(obj)) return false;
  sign(THPVariable_Unpack(obj), out);
  return true;
}

// (indices of the parameters that have a gradient as a tuple, those gradients
// as a list, their signature): the signature (bytes) is everything
// DeviceTables.get checks of each row's parameter and gradient, so that an
// equal signature lets it skip the walk; None where a tensor is a subclass.
py::tuple rows_with_grads(const py::list& params) {
  const size_t n = params.size();
  std::vector<py::object> grads;
  std::vector<size_t> rows;
  std::vector<int64_t> signature;
  bool signed_all = true;
  grads.reserve(n);
  rows.reserve(n);
  signature.reserve(n * 16);
  for (size_t i = 0; i < n; ++i) {
    PyObject* param = PyList_GET_ITEM(params.ptr(), i);
    py::object grad = grad_of(param);
    if (grad.is_none()) continue;
    rows.push_back(i);
    signed_all = signed_all && sign(param, signature) && sign(grad.ptr(), signature);
    grads.push_back(std::move(grad));
  }
  py::tuple row_tuple(rows.size());
  py::list grad_list(rows.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    PyTuple_SET_ITEM(row_tuple.ptr(), r, PyLong_FromSize_t(rows[r]));
    PyList_SET_ITEM(grad_list.ptr(), r, grads[r].release().ptr());
  }
  py::object signed_rows = py::none();
  if (signed_all) {
    signed_rows = py::bytes(reinterpret_cast<const char*>(signature.data()), signature.size() * sizeof(int64_t));
  }
  return py::make_tuple(row_tuple, grad_list, signed_rows);
}

// -- the steady state (presam_kernels/optim/steady.py) ------------------------------
//
// What a step's host work read of the parameters and their gradients, recorded
// once and checked at each later step: every param group holds the same
// parameters (the same objects, in the same order and group), each with the
// same dtype, device, sizes, strides and data address, and each has a
// gradient exactly where it had one, a plain strided tensor with the same
// dtype, device, sizes, strides and data address. That is everything the
// steps' scans (layout key, storage addresses, sparse gradients, flatten=True's
// flat buffers) and the device tables' rows are made of, so a step that finds
// it unchanged may replay the last one's tables and launches.

// Whether a tensor is what sign() appended at s, but for its address.
bool same_layout(const c10::TensorImpl* t, const int64_t* s) {
  const int64_t dim = t->dim();
  if (s[0] != static_cast<int64_t>(t->layout()) ||
      s[1] != static_cast<int64_t>(c10::typeMetaToScalarType(t->dtype())) ||
      s[2] != device_code(t->device()) ||
      s[3] != dim || t->layout() != at::kStrided) {
    return false;
  }
  return std::equal(t->sizes().begin(), t->sizes().end(), s + 4) &&
         std::equal(t->strides().begin(), t->strides().end(), s + 4 + dim);
}

// Where sign() put the address of the tensor whose signature starts at ``start``.
size_t address_at(const std::vector<int64_t>& signature, size_t start) {
  return start + 4 + 2 * static_cast<size_t>(signature[start + 3]);
}

// The cache lines of a TensorImpl that the layout checks read.
void prefetch_impl(const c10::TensorImpl* t) {
  const char* at = reinterpret_cast<const char*>(t);
  for (size_t line = 0; line < sizeof(c10::TensorImpl); line += 64) __builtin_prefetch(at + line);
}

class ParamWatch {
 public:
  // ``tables``: per table of the recorded step, its parameters (a tuple) when its
  // rows are parameters, else None (rows over flat buffers, whose gradients are
  // the buffers' own slices); ``check`` hands back each such table's gradients.
  ParamWatch(const py::list& groups, const py::list& tables) {
    std::unordered_map<PyObject*, size_t> index;
    recordable_ = walk(groups, /*record=*/true, [&](PyObject* obj, const at::Tensor& p) {
      if (!THPVariable_CheckExact(obj) || p.layout() != at::kStrided) return false;
      index.emplace(obj, params_.size());
      params_.push_back(py::reinterpret_borrow<py::object>(obj));
      param_at_.push_back(signature_.size());
      sign(p, signature_);
      const at::Tensor& g = p.grad();
      grad_at_.push_back(g.defined() ? static_cast<int64_t>(signature_.size()) : -1);
      if (g.defined()) {
        py::object grad = py::reinterpret_steal<py::object>(THPVariable_Wrap(g));
        if (!THPVariable_CheckExact(grad.ptr()) || g.layout() != at::kStrided) return false;
        sign(g, signature_);
      }
      return true;
    });
    for (size_t t = 0; recordable_ && t < tables.size(); ++t) {
      std::vector<size_t> rows;
      PyObject* members = PyList_GET_ITEM(tables.ptr(), t);
      if (members != Py_None) {
        TORCH_CHECK(PyTuple_Check(members), "ParamWatch: a table's parameters must be a tuple or None");
        for (Py_ssize_t r = 0; r < PyTuple_GET_SIZE(members); ++r) {
          auto it = index.find(PyTuple_GET_ITEM(members, r));
          if (it == index.end()) recordable_ = false;  // a row that is no parameter (a DTensor's shard)
          else rows.push_back(it->second);
        }
      }
      tables_.push_back({members != Py_None, std::move(rows)});
    }
  }

  // Whether the step could be recorded: every parameter and gradient a plain
  // strided tensor, every table row a parameter of the groups.
  bool recordable() const { return recordable_; }

  // The parameters' data addresses when recorded, as data_addresses() packs them.
  py::bytes data_addresses() const {
    std::vector<int64_t> addresses;
    for (size_t start : param_at_) addresses.push_back(signature_[address_at(signature_, start)]);
    return py::bytes(reinterpret_cast<const char*>(addresses.data()), addresses.size() * sizeof(int64_t));
  }

  // None when anything recorded differs; else, per recorded table, the
  // gradients of its rows (a list) or None (rows over flat buffers), or with
  // ``with_grads`` false an empty tuple.
  py::object check(const py::list& groups, bool with_grads) {
    if (!recordable_) return py::none();
    // In passes, one level of the tensors' metadata each, every pass's loads
    // independent of each other and prefetched by the pass before: in a step
    // the walk is cache misses (each tensor's TensorImpl, storage, autograd
    // meta, gradient), which one pass a tensor at a time would wait on in turn.
    impls_.clear();
    size_t i = 0;
    const bool same = walk(groups, /*record=*/false, [&](PyObject* obj, const at::Tensor& p) {
      if (i >= params_.size() || obj != params_[i].ptr()) return false;
      impls_.push_back(p.unsafeGetTensorImpl());
      prefetch_impl(impls_.back());
      ++i;
      return true;
    });
    if (!same || i != params_.size()) return py::none();
    const size_t n = impls_.size();
    for (size_t k = 0; k < n; ++k) {  // the parameters' layouts; their storage and autograd meta next
      c10::TensorImpl* p = impls_[k];
      if (!same_layout(p, signature_.data() + param_at_[k])) return py::none();
      __builtin_prefetch(p->storage().unsafeGetStorageImpl());
      __builtin_prefetch(p->autograd_meta());
    }
    grads_.assign(n, nullptr);
    for (size_t k = 0; k < n; ++k) {  // the parameters' addresses and gradients
      c10::TensorImpl* p = impls_[k];
      if (signature_[address_at(signature_, param_at_[k])] != impl_address(p)) return py::none();
      const at::Tensor& g = p->grad();  // a parameter is a leaf: no warning to check for
      if (g.defined() != (grad_at_[k] >= 0)) return py::none();
      if (g.defined()) {
        grads_[k] = &g;
        prefetch_impl(g.unsafeGetTensorImpl());
      }
    }
    for (size_t k = 0; k < n; ++k) {  // the gradients' layouts; their storage next
      if (grads_[k] == nullptr) continue;
      c10::TensorImpl* g = grads_[k]->unsafeGetTensorImpl();
      if (!same_layout(g, signature_.data() + grad_at_[k])) return py::none();
      __builtin_prefetch(g->storage().unsafeGetStorageImpl());
    }
    for (size_t k = 0; k < n; ++k) {  // the gradients' addresses
      if (grads_[k] != nullptr &&
          signature_[address_at(signature_, grad_at_[k])] != impl_address(grads_[k]->unsafeGetTensorImpl())) {
        return py::none();
      }
    }
    if (!with_grads) return py::tuple();  // wrapping each gradient costs ~35 ns
    py::tuple out(tables_.size());
    for (size_t t = 0; t < tables_.size(); ++t) {
      if (!tables_[t].by_member) {
        PyTuple_SET_ITEM(out.ptr(), t, py::none().release().ptr());
        continue;
      }
      const std::vector<size_t>& rows = tables_[t].rows;
      py::list grads(rows.size());
      for (size_t r = 0; r < rows.size(); ++r) {
        const at::Tensor* g = grads_[rows[r]];
        if (g == nullptr) return py::none();  // (cannot happen: the rows had gradients when recorded)
        PyObject* grad = THPVariable_Wrap(*g);
        if (grad == nullptr) throw py::error_already_set();
        if (!THPVariable_CheckExact(grad)) {  // a subclass now, at the same address
          Py_DECREF(grad);
          return py::none();
        }
        PyList_SET_ITEM(grads.ptr(), r, grad);
      }
      PyTuple_SET_ITEM(out.ptr(), t, grads.release().ptr());
    }
    return out;
  }

 private:
  struct Rows {
    bool by_member;
    std::vector<size_t> rows;  // indices into params_
  };

  // Calls visit(obj, tensor) on every parameter of every group, in order;
  // false as soon as a visit is, or (unless ``record``ing the group sizes)
  // when a group is not the size recorded.
  template <typename Visit>
  bool walk(const py::list& groups, bool record, Visit&& visit) {
    if (!record && static_cast<size_t>(PyList_GET_SIZE(groups.ptr())) != group_sizes_.size()) return false;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(groups.ptr()); ++k) {
      PyObject* group = PyList_GET_ITEM(groups.ptr(), k);
      if (!PyDict_Check(group)) return false;
      PyObject* params = PyDict_GetItemString(group, "params");
      if (params == nullptr || !PyList_Check(params)) return false;
      const Py_ssize_t n = PyList_GET_SIZE(params);
      if (record) {
        group_sizes_.push_back(n);
      } else if (n != group_sizes_[k]) {
        return false;
      }
      for (Py_ssize_t j = 0; j < n; ++j) {
        PyObject* obj = PyList_GET_ITEM(params, j);
        if (!THPVariable_Check(obj)) return false;
        if (!visit(obj, THPVariable_Unpack(obj))) return false;
      }
    }
    return true;
  }

  bool recordable_ = false;
  std::vector<py::object> params_;  // held: their identities stay theirs
  std::vector<Py_ssize_t> group_sizes_;
  std::vector<int64_t> signature_;  // per parameter: sign(p), then sign(grad) where it has one
  std::vector<size_t> param_at_;    // per parameter: where its sign() starts in signature_
  std::vector<int64_t> grad_at_;    // per parameter: where its gradient's starts, or -1 (none)
  std::vector<Rows> tables_;
  // This check's TensorImpls and gradients, per parameter (valid during check only).
  std::vector<c10::TensorImpl*> impls_;
  std::vector<const at::Tensor*> grads_;
};

}  // namespace
}  // namespace presam

PYBIND11_MODULE(_C, m) {
  m.doc() = "presam_cpp:: ops (fused CPU kernels) and the Triton backend's host-side table cache";
  py::class_<presam::DeviceTables>(m, "DeviceTables")
      .def(py::init<at::ScalarType, at::Device, std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>,
                    int64_t>(),
           py::arg("dtype"), py::arg("device"), py::arg("shapes"), py::arg("strides"), py::arg("capacity"))
      .def("get", &presam::DeviceTables::get, py::arg("params"), py::arg("grads"), py::arg("members"),
           py::arg("saved_views"), py::arg("ema_views"), py::arg("offsets"), py::arg("lengths"), py::arg("groups"),
           py::arg("is_weight"), py::arg("perturbed"), py::arg("saved"), py::arg("ema"), py::arg("chunk"),
           py::arg("build"), py::arg("signature") = py::none())
      .def("__len__", &presam::DeviceTables::size);
  py::class_<presam::StateWatch>(m, "StateWatch")
      .def(py::init<const py::list&, const py::list&, const py::tuple&, const py::list&, const py::object&>(),
           py::arg("params"), py::arg("entries"), py::arg("keys"), py::arg("values"), py::arg("versioned_key"))
      .def("holds", &presam::StateWatch::holds, py::arg("state"))
      .def("note_versions", &presam::StateWatch::note_versions);
  m.def("layout_key", &presam::layout_key, py::arg("params"));
  m.def("data_addresses", &presam::data_addresses, py::arg("tensors"));
  m.def("rows_with_grads", &presam::rows_with_grads, py::arg("params"));
  m.def("scan_params", &presam::scan_params, py::arg("groups"));
  py::class_<presam::ParamWatch>(m, "ParamWatch")
      .def(py::init<const py::list&, const py::list&>(), py::arg("groups"), py::arg("tables"))
      .def("recordable", &presam::ParamWatch::recordable)
      .def("data_addresses", &presam::ParamWatch::data_addresses)
      .def("check", &presam::ParamWatch::check, py::arg("groups"), py::arg("with_grads") = true);
}
