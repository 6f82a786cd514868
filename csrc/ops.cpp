// The presam_cpp:: ops: schemas (with what each op writes) and CPU kernels over
// the rows of one bucket, registered when `presam_kernels._C` (host.cpp) is
// loaded. Fake kernels live in presam_kernels/backends/cpp.py
// (torch.library.register_fake).
//
// Every op checks every row before it writes anything: a bad call raises with
// parameters and state untouched.
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"

namespace presam {
namespace {

using at::IntArrayRef;
using at::Tensor;
using at::TensorList;
using OptTensor = std::optional<Tensor>;

template <typename T>
struct Tag {
  using type = T;
};
template <int64_t V>
using Const = std::integral_constant<int64_t, V>;

template <typename F>
void dispatch_dtype(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(Tag<float>{});
    case at::kBFloat16:
      return f(Tag<c10::BFloat16>{});
    case at::kHalf:
      return f(Tag<c10::Half>{});
    default:
      TORCH_CHECK(false, "presam_cpp: parameters must be float32, bfloat16 or float16, got ", dtype);
  }
}

void check_codes(int64_t direction, int64_t constraint) {
  TORCH_CHECK(direction >= kGradient && direction <= kInfo, "presam_cpp: unknown direction code ", direction);
  TORCH_CHECK(constraint >= kNone && constraint <= kFisher, "presam_cpp: unknown constraint code ", constraint);
}

// f(Const<direction>, Const<constraint>): one instantiation per variant.
template <typename F>
void dispatch_variant(int64_t direction, int64_t constraint, const F& f) {
  auto with_constraint = [&](auto d) {
    switch (constraint) {
      case kAdaptive:
        return f(d, Const<kAdaptive>{});
      case kAsam:
        return f(d, Const<kAsam>{});
      case kFisher:
        return f(d, Const<kFisher>{});
      default:
        return f(d, Const<kNone>{});
    }
  };
  switch (direction) {
    case kEmaCold:
      return with_constraint(Const<kEmaCold>{});
    case kEma:
      return with_constraint(Const<kEma>{});
    case kInfo:
      return with_constraint(Const<kInfo>{});
    default:
      return with_constraint(Const<kGradient>{});
  }
}

void check_flat(const Tensor& flat, at::ScalarType dtype, const char* what) {
  TORCH_CHECK(flat.device().is_cpu(), "presam_cpp: ", what, " must be a CPU tensor");
  TORCH_CHECK(flat.scalar_type() == dtype, "presam_cpp: ", what, " must be ", dtype, ", got ", flat.scalar_type());
  TORCH_CHECK(flat.is_contiguous(), "presam_cpp: ", what, " must be contiguous");
}

void* slice(const Tensor& flat, int64_t offset, int64_t length, const char* what, int64_t i) {
  TORCH_CHECK(offset >= 0 && offset + length <= flat.numel(), "presam_cpp: row ", i, " (offset ", offset, ", length ",
              length, ") runs past ", what, " (", flat.numel(), " elements)");
  return static_cast<char*>(flat.data_ptr()) + offset * flat.element_size();
}

// The buffers of one call besides the parameters.
struct Flats {
  const OptTensor& saved;
  const OptTensor& ema;
  const OptTensor& state1;
  const OptTensor& state2;
};

// The rows of one call, every one checked before anything is written: one
// dtype, CPU, dense, the gradient laid out as its parameter, every slice
// inside its flat buffer.
std::vector<Row> make_rows(TensorList params, TensorList grads, const Flats& flats, IntArrayRef offsets,
                           IntArrayRef groups, IntArrayRef flags, int64_t n_groups) {
  const int64_t n = static_cast<int64_t>(params.size());
  auto same_length = [&](size_t size, const char* what) {
    TORCH_CHECK(size == 0 || static_cast<int64_t>(size) == n, "presam_cpp: ", n, " params but ", size, " ", what);
  };
  TORCH_CHECK(static_cast<int64_t>(offsets.size()) == n, "presam_cpp: ", n, " params but ", offsets.size(),
              " offsets");
  same_length(grads.size(), "grads");
  same_length(groups.size(), "groups");
  same_length(flags.size(), "flags");
  std::vector<Row> rows;
  if (n == 0) return rows;
  const at::ScalarType dtype = params[0].scalar_type();
  if (flats.saved) check_flat(*flats.saved, dtype, "the saved buffer");
  if (flats.ema) check_flat(*flats.ema, at::kFloat, "grad_ema");
  if (flats.state1) check_flat(*flats.state1, dtype, "state1");
  if (flats.state2) check_flat(*flats.state2, dtype, "state2");
  rows.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == dtype, "presam_cpp: param ", i, " is ", p.scalar_type(),
                " on ", p.device(), "; the rows need ", dtype, " on the CPU");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "presam_cpp: param ", i, " is not dense");
    Row r;
    r.x = p.data_ptr();
    r.length = p.numel();
    if (!grads.empty()) {
      const Tensor& g = grads[i];
      TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == dtype && g.sizes() == p.sizes() &&
                      g.strides() == p.strides(),
                  "presam_cpp: grad ", i, " is not laid out as its parameter (dtype, device, shape, strides)");
      r.g = g.const_data_ptr();
    }
    const int64_t off = offsets[i];
    if (flats.saved) r.saved = slice(*flats.saved, off, r.length, "the saved buffer", i);
    if (flats.ema) r.m = static_cast<float*>(slice(*flats.ema, off, r.length, "grad_ema", i));
    if (flats.state1) r.s1 = slice(*flats.state1, off, r.length, "state1", i);
    if (flats.state2) r.s2 = slice(*flats.state2, off, r.length, "state2", i);
    if (!groups.empty()) {
      r.group = groups[i];
      TORCH_CHECK(r.group >= 0 && r.group < n_groups, "presam_cpp: row ", i, " has group ", r.group, " of ",
                  n_groups);
    }
    r.flags = flags.empty() ? 0 : flags[i];
    if (r.length) rows.push_back(r);
  }
  return rows;
}

Spec make_spec(double ema_weight, double alpha, double delta, double eta) {
  return Spec{static_cast<float>(ema_weight), static_cast<float>(alpha), 1.f / static_cast<float>(delta),
              static_cast<float>(eta)};
}

const OptTensor kNoTensor = std::nullopt;

// K1: the sum of (c u)^2 over the rows, as a 0-d float64 tensor: fp32 sums
// per fixed chunk, added in chunk order (the same bits on any thread count).
Tensor sum_of_squares(TensorList params, TensorList grads, const OptTensor& grad_ema, IntArrayRef offsets,
                      IntArrayRef flags, int64_t direction, int64_t constraint, double ema_weight, double alpha,
                      double delta, double eta) {
  check_codes(direction, constraint);
  TORCH_CHECK(grads.size() == params.size(), "presam_cpp: sum_of_squares needs a gradient per row");
  TORCH_CHECK(grad_ema || (direction != kEma && direction != kInfo), "presam_cpp: this objective needs grad_ema");
  auto rows = make_rows(params, grads, {kNoTensor, grad_ema, kNoTensor, kNoTensor}, offsets, {}, flags, 0);
  double total = 0.0;
  if (!rows.empty()) {
    const Spec spec = make_spec(ema_weight, alpha, delta, eta);
    const auto chunks = chunks_of(rows);
    std::vector<float> partials(chunks.size());
    dispatch_dtype(params[0].scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      dispatch_variant(direction, constraint, [&](auto d, auto c) {
        for_each_chunk(rows, chunks, [&](const Row& r, int64_t b, int64_t e, int64_t k) {
          partials[k] = chunk_sum_of_squares<T, decltype(d)::value, decltype(c)::value>(r, b, e, spec);
        });
      });
    });
    for (float p : partials) total += p;
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

// K2 (or the copy of a skipped step), in place or out of place.
void perturb_impl(TensorList params, TensorList grads, const Tensor& saved, const OptTensor& grad_ema,
                  IntArrayRef offsets, IntArrayRef groups, IntArrayRef flags, at::ArrayRef<double> rhos, double scale,
                  bool skipped, int64_t direction, int64_t constraint, double ema_weight, double alpha, double delta,
                  double eta, bool out_of_place) {
  check_codes(direction, constraint);
  TORCH_CHECK(grads.size() == params.size(), "presam_cpp: perturb needs a gradient per row");
  TORCH_CHECK(groups.size() == params.size() && flags.size() == params.size(),
              "presam_cpp: perturb needs a group and flags per row");
  TORCH_CHECK(grad_ema || direction == kGradient, "presam_cpp: this objective needs grad_ema");
  const OptTensor saved_opt = saved;
  auto rows = make_rows(params, grads, {saved_opt, direction == kGradient ? kNoTensor : grad_ema, kNoTensor, kNoTensor},
                        offsets, groups, flags, static_cast<int64_t>(rhos.size()));
  if (rows.empty()) return;
  const auto chunks = chunks_of(rows);
  const Spec spec = make_spec(ema_weight, alpha, delta, eta);
  std::vector<float> factor(rhos.size());
  for (size_t k = 0; k < rhos.size(); ++k) factor[k] = static_cast<float>(scale) * static_cast<float>(rhos[k]);
  dispatch_dtype(params[0].scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (skipped) {  // x (or its copy) as it was, bit for bit; the EMA kept
      for_each_chunk(rows, chunks, [&](const Row& r, int64_t b, int64_t e, int64_t) {
        if (r.flags & kFlagPerturbed) chunk_copy(static_cast<T*>(r.saved), static_cast<const T*>(r.x), b, e);
      });
      return;
    }
    dispatch_variant(direction, constraint, [&](auto d, auto c) {
      for_each_chunk(rows, chunks, [&](const Row& r, int64_t b, int64_t e, int64_t) {
        constexpr int64_t D = decltype(d)::value;
        if (D == kGradient && !(r.flags & kFlagPerturbed)) return;  // no state: nothing to write
        chunk_perturb<T, D, decltype(c)::value>(r, b, e, spec, factor[r.group], out_of_place);
      });
    });
  });
}

void perturb_(TensorList params, TensorList grads, const Tensor& backup, const OptTensor& grad_ema,
              IntArrayRef offsets, IntArrayRef groups, IntArrayRef flags, at::ArrayRef<double> rhos, double scale,
              bool skipped, int64_t direction, int64_t constraint, double ema_weight, double alpha, double delta,
              double eta) {
  perturb_impl(params, grads, backup, grad_ema, offsets, groups, flags, rhos, scale, skipped, direction, constraint,
               ema_weight, alpha, delta, eta, false);
}

void perturb_out_of_place_(TensorList params, TensorList grads, const Tensor& adversarial, const OptTensor& grad_ema,
                           IntArrayRef offsets, IntArrayRef groups, IntArrayRef flags, at::ArrayRef<double> rhos,
                           double scale, bool skipped, int64_t direction, int64_t constraint, double ema_weight,
                           double alpha, double delta, double eta) {
  perturb_impl(params, grads, adversarial, grad_ema, offsets, groups, flags, rhos, scale, skipped, direction,
               constraint, ema_weight, alpha, delta, eta, true);
}

// K3: x <- backup, bit for bit.
void restore_(TensorList params, const Tensor& backup, IntArrayRef offsets) {
  const OptTensor saved = backup;
  auto rows = make_rows(params, {}, {saved, kNoTensor, kNoTensor, kNoTensor}, offsets, {}, {}, 0);
  if (rows.empty()) return;
  const auto chunks = chunks_of(rows);
  const int64_t size = backup.element_size();
  for_each_chunk(rows, chunks, [&](const Row& r, int64_t b, int64_t e, int64_t) {
    std::memcpy(static_cast<char*>(r.x) + b * size, static_cast<const char*>(r.saved) + b * size, (e - b) * size);
  });
}

// K4: x <- the base optimizer's update of the saved x (backup for perturbed
// rows when from_saved, else x itself), with the state in state1/state2.
void restore_step_(TensorList params, TensorList grads, const Tensor& saved, const OptTensor& state1,
                   const OptTensor& state2, IntArrayRef offsets, IntArrayRef groups, IntArrayRef flags,
                   at::ArrayRef<double> hyper, int64_t width, int64_t kind, bool from_saved) {
  TORCH_CHECK(kind == kSgd || kind == kAdam, "presam_cpp: unknown update kind ", kind);
  TORCH_CHECK(width == (kind == kSgd ? 7 : 9), "presam_cpp: hyperparameter rows of ", width, " columns for kind ",
              kind);
  TORCH_CHECK(static_cast<int64_t>(hyper.size()) % width == 0, "presam_cpp: hyper is not whole rows");
  TORCH_CHECK(grads.size() == params.size() && groups.size() == params.size() && flags.size() == params.size(),
              "presam_cpp: restore_step needs a gradient, group and flags per row");
  const int64_t n_groups = static_cast<int64_t>(hyper.size()) / width;
  std::vector<float> h(hyper.begin(), hyper.end());
  const OptTensor saved_opt = saved;
  auto rows = make_rows(params, grads, {saved_opt, kNoTensor, state1, state2}, offsets, groups, flags, n_groups);
  for (const Row& r : rows) {  // which rows read state: SGD with momentum, every Adam row
    const float* row_h = h.data() + r.group * width;
    const bool needs1 = kind == kAdam || row_h[1] != 0.f;
    TORCH_CHECK(!needs1 || r.s1, "presam_cpp: group ", r.group, " needs state1");
    TORCH_CHECK(kind == kSgd || r.s2, "presam_cpp: group ", r.group, " needs state2");
  }
  if (rows.empty()) return;
  const auto chunks = chunks_of(rows);
  dispatch_dtype(params[0].scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    for_each_chunk(rows, chunks, [&](const Row& r, int64_t b, int64_t e, int64_t) {
      const float* row_h = h.data() + r.group * width;
      if (kind == kSgd) {
        chunk_restore_step<T, kSgd>(r, b, e, row_h, from_saved);
      } else {
        chunk_restore_step<T, kAdam>(r, b, e, row_h, from_saved);
      }
    });
  });
}

// Whether the ops can walk every row: a parameter of a kernel dtype on the
// CPU, dense, with its gradient and its view of the bucket's flat buffer
// (the layout its EMA and saved copy have) shaped and strided alike. The
// per-step layout check of the Python side, at ~20 ns a row instead of ~3 us.
bool rows_are_linear(TensorList params, TensorList grads, TensorList views) {
  if (params.size() != grads.size() || params.size() != views.size()) return false;
  for (size_t i = 0; i < params.size(); ++i) {
    const Tensor &p = params[i], &g = grads[i], &v = views[i];
    const auto dtype = p.scalar_type();
    if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return false;
    if (!p.device().is_cpu() || !g.device().is_cpu() || g.scalar_type() != dtype || v.scalar_type() != dtype) {
      return false;
    }
    if (p.sizes() != v.sizes() || p.strides() != v.strides() || g.sizes() != p.sizes() || g.strides() != p.strides()) {
      return false;
    }
    if (!p.is_non_overlapping_and_dense()) return false;
  }
  return true;
}

}  // namespace
}  // namespace presam

// Alias annotations name exactly what each op writes: (a!) the parameters or
// the flat buffer written, (b!)/(c!) the EMA or the base optimizer's state.
TORCH_LIBRARY(presam_cpp, m) {
  m.def(
      "sum_of_squares(Tensor[] params, Tensor[] grads, Tensor? grad_ema, int[] offsets, int[] flags, "
      "int direction, int constraint, float ema_weight, float alpha, float delta, float eta) -> Tensor");
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!) backup, Tensor(c!)? grad_ema, int[] offsets, "
      "int[] groups, int[] flags, float[] rhos, float scale, bool skipped, int direction, int constraint, "
      "float ema_weight, float alpha, float delta, float eta) -> ()");
  m.def(
      "perturb_out_of_place_(Tensor[] params, Tensor[] grads, Tensor(a!) adversarial, Tensor(b!)? grad_ema, "
      "int[] offsets, int[] groups, int[] flags, float[] rhos, float scale, bool skipped, int direction, "
      "int constraint, float ema_weight, float alpha, float delta, float eta) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor backup, int[] offsets) -> ()");
  m.def("rows_are_linear(Tensor[] params, Tensor[] grads, Tensor[] views) -> bool");
  m.def(
      "restore_step_(Tensor(a!)[] params, Tensor[] grads, Tensor saved, Tensor(b!)? state1, Tensor(c!)? state2, "
      "int[] offsets, int[] groups, int[] flags, float[] hyper, int width, int kind, bool from_saved) -> ()");
}

TORCH_LIBRARY_IMPL(presam_cpp, CPU, m) {
  m.impl("sum_of_squares", &presam::sum_of_squares);
  m.impl("perturb_", &presam::perturb_);
  m.impl("perturb_out_of_place_", &presam::perturb_out_of_place_);
  m.impl("restore_", &presam::restore_);
  m.impl("rows_are_linear", &presam::rows_are_linear);
  m.impl("restore_step_", &presam::restore_step_);
}
