// The fused CPU kernels of the "cpp" backend: the Triton family's K1..K4
// (presam_kernels/backends/triton/k*.py) as one templated loop per verb over
// a table of rows, vectorised with at::vec and split into fixed chunks that
// at::parallel_for deals out to threads.
//
// Same formulas and order as the Triton kernels (precondition.py, k4_restore_step.py):
// fp32 math whatever the parameter dtype, fp32 EMA state. Notation of docs/design.md
// section 1: g gradient, m EMA state, u direction, c constraint diagonal.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace presam {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
// Elements a thread takes at a time: 64 KB of fp32 per stream, a few streams
// fit in L2. Chunks are fixed by the table, not by the thread count, so the
// norm's partial sums (one per chunk) are the same bits on every thread count.
constexpr int64_t kChunk = 16384;

// The objective with the host's EMA-ready flag folded in (the Triton
// kernels' OBJECTIVE x EMA_READY): u = g, m untouched | u = g, m <- g (EMA not ready) |
// VaSSO's EMA | infoSAM.
enum Direction : int64_t { kGradient = 0, kEmaCold = 1, kEma = 2, kInfo = 3 };
enum Constraint : int64_t { kNone = 0, kAdaptive = 1, kAsam = 2, kFisher = 3 };
enum Kind : int64_t { kSgd = 0, kAdam = 1 };
constexpr int64_t kFlagWeight = 1;     // the ASAM constraint applies
constexpr int64_t kFlagPerturbed = 2;  // the row's group has rho != 0

// One row of a table: a parameter (or a flat run of them) and its slices of
// the bucket's flat buffers. ``saved`` is the backup, or the adversarial
// buffer out of place; s1/s2 the base optimizer's state (K4).
struct Row {
  void* x = nullptr;
  const void* g = nullptr;
  void* saved = nullptr;
  float* m = nullptr;
  void* s1 = nullptr;
  void* s2 = nullptr;
  int64_t length = 0;
  int64_t group = 0;
  int64_t flags = 0;
};

struct Chunk {
  int64_t row, begin, end;
};

// The variant's constants, in fp32 as the Triton kernels take them.
struct Spec {
  float ema_weight;  // weight of the new gradient (VaSSO's theta)
  float alpha;       // infoSAM: weight of the old EMA
  float inv_delta;   // infoSAM: 1 / delta
  float eta;         // ASAM: added to |x|; Fisher: weight of g^2
};

// -- loads and stores: T in memory, fp32 in registers --------------------------
template <typename T>
struct Io {  // BFloat16, Half
  static Vec load(const T* p, int64_t n) {
    if (n == kLanes) {
      Vec out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
    float buf[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(p[i]);
    return Vec::loadu(buf);
  }
  static void store(T* p, Vec v, int64_t n) {
    at::vec::convert_from_float<T>(v, v).store(p, n);  // round to nearest even, as Tensor.to
  }
  // v rounded to T and back (where torch materialises a T intermediate).
  static Vec round(Vec v) {
    auto [lo, hi] = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v));
    (void)hi;
    return lo;
  }
};

template <>
struct Io<float> {
  static Vec load(const float* p, int64_t n) { return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n); }
  static void store(float* p, Vec v, int64_t n) { v.store(p, n); }
  static Vec round(Vec v) { return v; }
};

// x's bits into the backup, unconverted (restore must be bit-exact).
template <typename T>
inline void copy_raw(T* dst, const T* src, int64_t n) {
  if (n == kLanes) {
    std::memcpy(dst, src, kLanes * sizeof(T));
  } else {
    std::memcpy(dst, src, n * sizeof(T));
  }
}

// -- the preconditioners (triton/precondition.py) ------------------------------
// c * u; also c (ones for kNone) and the EMA's next value m_new. infoSAM
// returns u' = delta * u = g / (1 + belief / delta): the host scales eps_norm
// by delta to match (docs/design.md).
template <int64_t D, int64_t C>
inline Vec precondition(Vec g, Vec x, Vec m, bool is_weight, const Spec& s, Vec& c, Vec& m_new) {
  Vec u;
  if constexpr (D == kGradient || D == kEmaCold) {
    u = g;
    m_new = g;
  } else if constexpr (D == kEma) {
    m_new = (g - m) * Vec(s.ema_weight) + m;
    u = m_new;
  } else {
    Vec gap = (m - g) * Vec(s.alpha);  // m_new - g, formed without cancellation
    m_new = g + gap;
    Vec belief = gap * gap * Vec(s.inv_delta) + Vec(1.f);
    u = g / belief;
  }
  if constexpr (C == kAdaptive) {
    c = x.abs();
  } else if constexpr (C == kAsam) {
    c = is_weight ? x.abs() + Vec(s.eta) : Vec(1.f);
  } else if constexpr (C == kFisher) {
    c = Vec(1.f) / (g * g * Vec(s.eta) + Vec(1.f)).sqrt();
  } else {
    c = Vec(1.f);
    return u;
  }
  return c * u;
}

template <int64_t D>
constexpr bool kReadsEma = D == kEma || D == kInfo;
template <int64_t D, int64_t C>
inline bool reads_x(bool is_weight) {
  return C == kAdaptive || (C == kAsam && is_weight);
}

// One vector of a row at element i (n lanes, zero-filled past the end), as K1
// and K2 both start: g, x where needed (the constraint or the write) and m
// loaded, and c u formed, with c and the EMA's next value.
struct Lanes {
  Vec x, cu, c, m_new;
};

template <typename T, int64_t D, int64_t C>
inline Lanes precondition_at(const Row& r, int64_t i, int64_t n, bool load_x, bool is_weight, const Spec& s) {
  Lanes v;
  const Vec g = Io<T>::load(static_cast<const T*>(r.g) + i, n);
  v.x = load_x ? Io<T>::load(static_cast<const T*>(r.x) + i, n) : Vec(0.f);
  const Vec m = kReadsEma<D> ? Io<float>::load(r.m + i, n) : g;
  v.cu = precondition<D, C>(g, v.x, m, is_weight, s, v.c, v.m_new);
  return v;
}

// -- K1: sum of (c u)^2 over one chunk ------------------------------------------
template <typename T, int64_t D, int64_t C>
float chunk_sum_of_squares(const Row& r, int64_t begin, int64_t end, const Spec& s) {
  const bool is_weight = (r.flags & kFlagWeight) != 0;
  const bool load_x = reads_x<D, C>(is_weight);
  Vec acc[2] = {Vec(0.f), Vec(0.f)};
  int64_t k = 0;
  for (int64_t i = begin; i < end; i += kLanes, ++k) {
    const Vec cu = precondition_at<T, D, C>(r, i, std::min(kLanes, end - i), load_x, is_weight, s).cu;
    // Zero-filled lanes past the end give c u = 0 for every variant.
    acc[k & 1] = acc[k & 1] + cu * cu;
  }
  float lanes[kLanes];
  (acc[0] + acc[1]).store(lanes);
  float sum = 0.f;
  for (int64_t j = 0; j < kLanes; ++j) sum += lanes[j];
  return sum;
}

// -- K2: m <- m_new; backup <- x, x <- x + e (out of place: adversarial <- x + e) --
template <typename T, int64_t D, int64_t C>
void chunk_perturb(const Row& r, int64_t begin, int64_t end, const Spec& s, float factor, bool out_of_place) {
  T* x = static_cast<T*>(r.x);
  T* saved = static_cast<T*>(r.saved);
  const bool is_weight = (r.flags & kFlagWeight) != 0;
  const bool perturbed = (r.flags & kFlagPerturbed) != 0;
  const bool load_x = perturbed || reads_x<D, C>(is_weight);
  const Vec f(factor);
  for (int64_t i = begin; i < end; i += kLanes) {
    const int64_t n = std::min(kLanes, end - i);
    const Lanes v = precondition_at<T, D, C>(r, i, n, load_x, is_weight, s);
    if constexpr (D != kGradient) Io<float>::store(r.m + i, v.m_new, n);
    if (!perturbed) continue;
    // x + e = x + c * ((rho * scale) * (c u)), one fused multiply-add as eager's addcmul.
    Vec adv = C == kNone ? at::vec::fmadd(v.cu, f, v.x) : at::vec::fmadd(v.c, v.cu * f, v.x);
    if (out_of_place) {
      Io<T>::store(saved + i, adv, n);
    } else {
      copy_raw(saved + i, x + i, n);
      Io<T>::store(x + i, adv, n);
    }
  }
}

// A skipped step: backup (or the adversarial slice) <- x, nothing else.
template <typename T>
void chunk_copy(T* dst, const T* src, int64_t begin, int64_t end) {
  std::memcpy(dst + begin, src + begin, (end - begin) * sizeof(T));
}

// -- K4: the base optimizer's update of the saved x (k4_restore_step.py) ------------
// h: the group's hyperparameters, base_update.SGD_COLUMNS / ADAM_COLUMNS.
// Each operation rounds as torch.optim's CPU path does (measured on torch
// 2.13's AVX2 kernels): add(alpha=), addcmul and lerp are one fused
// multiply-add, addcdiv and the rest are not; T intermediates are rounded
// where torch materialises them. SAM with rho = 0 then steps exactly as the
// base optimizer alone (tests/test_api.py).
template <typename T, int64_t K>
void chunk_restore_step(const Row& r, int64_t begin, int64_t end, const float* h, bool from_saved) {
  using IoT = Io<T>;
  T* x = static_cast<T*>(r.x);
  const T* src = from_saved && (r.flags & kFlagPerturbed) ? static_cast<const T*>(r.saved) : x;
  const T* g = static_cast<const T*>(r.g);
  T* s1 = static_cast<T*>(r.s1);
  T* s2 = static_cast<T*>(r.s2);
  if constexpr (K == kSgd) {
    const float lr = h[0], momentum = h[1], one_minus_dampening = h[2], weight_decay = h[3];
    const bool nesterov = h[4] != 0.f, maximize = h[5] != 0.f, first = h[6] != 0.f;
    for (int64_t i = begin; i < end; i += kLanes) {
      const int64_t n = std::min(kLanes, end - i);
      Vec xv = IoT::load(src + i, n);
      Vec gv = IoT::load(g + i, n);
      Vec d = maximize ? gv.neg() : gv;
      if (weight_decay != 0.f) d = IoT::round(at::vec::fmadd(xv, Vec(weight_decay), d));
      Vec step = d;
      if (momentum != 0.f) {
        Vec buf = first ? d
                        : IoT::round(at::vec::fmadd(d, Vec(one_minus_dampening),
                                                    IoT::round(IoT::load(s1 + i, n) * Vec(momentum))));
        IoT::store(s1 + i, buf, n);
        step = nesterov ? IoT::round(at::vec::fmadd(buf, Vec(momentum), d)) : buf;
      }
      IoT::store(x + i, at::vec::fmadd(step, Vec(-lr), xv), n);
    }
  } else {
    const float neg_step_size = h[0], bc2_sqrt = h[1], eps = h[2], decay = h[3], weight_decay = h[4];
    const float w1 = h[5], beta2 = h[6], one_minus_beta2 = h[7];
    const bool maximize = h[8] != 0.f;
    const float w1_minus_one = w1 - 1.f;
    for (int64_t i = begin; i < end; i += kLanes) {
      const int64_t n = std::min(kLanes, end - i);
      Vec xv = IoT::round(IoT::load(src + i, n) * Vec(decay));  // decoupled weight decay (else decay = 1: exact)
      Vec gv = IoT::load(g + i, n);
      Vec d = maximize ? gv.neg() : gv;
      if (weight_decay != 0.f) d = IoT::round(at::vec::fmadd(xv, Vec(weight_decay), d));
      Vec mv = IoT::load(s1 + i, n);
      Vec vv = IoT::load(s2 + i, n);
      // torch's lerp: start + w (end - start) for |w| < 0.5, else end + (w - 1)(end - start)
      mv = IoT::round(w1 < 0.5f ? at::vec::fmadd(Vec(w1), d - mv, mv) : at::vec::fmadd(Vec(w1_minus_one), d - mv, d));
      vv = IoT::round(at::vec::fmadd(Vec(one_minus_beta2) * d, d, IoT::round(vv * Vec(beta2))));
      IoT::store(s1 + i, mv, n);
      IoT::store(s2 + i, vv, n);
      Vec denom = IoT::round(IoT::round(IoT::round(vv.sqrt()) / Vec(bc2_sqrt)) + Vec(eps));
      IoT::store(x + i, xv + (Vec(neg_step_size) * mv) / denom, n);
    }
  }
}

// -- the table walk ---------------------------------------------------------------
inline std::vector<Chunk> chunks_of(const std::vector<Row>& rows) {
  std::vector<Chunk> chunks;
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r) {
    for (int64_t b = 0; b < rows[r].length; b += kChunk) {
      chunks.push_back({r, b, std::min(b + kChunk, rows[r].length)});
    }
  }
  return chunks;
}

// f(row, begin, end, chunk index) over every chunk, in parallel.
template <typename F>
void for_each_chunk(const std::vector<Row>& rows, const std::vector<Chunk>& chunks, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& c = chunks[k];
      f(rows[c.row], c.begin, c.end, k);
    }
  });
}

}  // namespace presam
