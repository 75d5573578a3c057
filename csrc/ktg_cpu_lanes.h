// SIMD lane vectors for the CPU kernels of ktg_loss.cpp: GCC/Clang vector extensions of
// W bytes, their exp and log, fixed-order horizontal reductions, loads and stores that
// convert half precision, and the chunking of a row of C classes into lanes. Included by
// ktg_loss.cpp only; the math it feeds is the shared ktg_loss.h.
#pragma once

#include "ktg_loss.h"

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if !defined(__GNUC__)
#error "the CPU kernel of timm_dcl uses GCC/Clang vector extensions"
#endif

namespace ktg {

// ---------------------------------------------------------------------------------
// Lane vectors of W bytes (64: AVX-512, 32: AVX2, 16: SSE2/NEON).
// ---------------------------------------------------------------------------------
template <class A, int W>
struct LaneTraits;

template <int W>
struct LaneTraits<float, W> {
  static constexpr int L = W / 4;
  typedef float raw __attribute__((vector_size(W)));
  typedef int32_t iraw __attribute__((vector_size(W)));
  typedef int32_t index;
};

template <int W>
struct LaneTraits<double, W> {
  static constexpr int L = W / 8;
  typedef double raw __attribute__((vector_size(W)));
  typedef int64_t iraw __attribute__((vector_size(W)));
  typedef int64_t index;
};

template <class A, int W>
struct Vec {
  using raw = typename LaneTraits<A, W>::raw;
  using iraw = typename LaneTraits<A, W>::iraw;
  static constexpr int L = LaneTraits<A, W>::L;
  raw v;

  Vec() = default;
  Vec(A s) : v(raw{} + s) {}  // broadcast; implicit so scalars mix with vectors
  explicit Vec(raw r) : v(r) {}

  friend Vec operator+(Vec a, Vec b) { return Vec(a.v + b.v); }
  friend Vec operator-(Vec a, Vec b) { return Vec(a.v - b.v); }
  friend Vec operator*(Vec a, Vec b) { return Vec(a.v * b.v); }
  Vec& operator+=(Vec b) {
    v += b.v;
    return *this;
  }
};

template <int W>
KTG_HD Vec<float, W> ktg_exp(Vec<float, W> x) {
  using R = typename Vec<float, W>::raw;
  using I = typename Vec<float, W>::iraw;
  const R lo = R{} + kExpLo;
  const R hi = R{} + kExpHi;
  // The scalar ktg_exp of ktg_loss.h, lane-wise, except that NaN passes through the
  // clamps (comparisons with NaN are false) and poisons the polynomial, which saves a
  // select; the garbage exponent bits of a NaN lane do not matter.
  R xc = x.v < lo ? lo : x.v;
  xc = xc > hi ? hi : xc;
  const R n = (xc * kLog2e + kRoundMagic) - kRoundMagic;
  const R r = (xc - n * kLn2Hi) - n * kLn2Lo;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  R y = exp_poly(r) * (R)bits;
  return Vec<float, W>(x.v < lo ? R{} : y);
}

// Cephes-style logf (≤ 1 ulp) for x > 0; NaN stays NaN. Used on the per-node sums,
// which lie in [1, C].
constexpr float kSqrtHalf = 0.707106781186547524f;
template <int W>
KTG_HD Vec<float, W> ktg_log(Vec<float, W> x) {
  using R = typename Vec<float, W>::raw;
  using I = typename Vec<float, W>::iraw;
  const I bits = (I)x.v;
  I e = ((bits >> 23) & 0xff) - 126;  // x = m · 2^e with m in [0.5, 1)
  R m = (R)((bits & 0x007fffff) | 0x3f000000);
  const auto small = m < kSqrtHalf;  // fold m into [sqrt(1/2), sqrt(2))
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const R ef = __builtin_convertvector(e, R);
  const R zz = m * m;
  R p = m * 7.0376836292e-2f - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  R y = p * m * zz + ef * kLn2Lo - 0.5f * zz;
  y = (m + y) + ef * kLn2Hi;
  return Vec<float, W>(x.v != x.v ? x.v : y);
}

template <int W>
KTG_HD Vec<double, W> ktg_log(Vec<double, W> x) {
  Vec<double, W> y;
  for (int j = 0; j < Vec<double, W>::L; ++j) y.v[j] = ::log(x.v[j]);
  return y;
}

template <int W>
KTG_HD Vec<double, W> ktg_exp(Vec<double, W> x) {
  Vec<double, W> y;
  for (int j = 0; j < Vec<double, W>::L; ++j) y.v[j] = ::exp(x.v[j]);
  return y;
}

template <class A, int W>
KTG_HD typename Vec<A, W>::iraw lane_index() {
  typename Vec<A, W>::iraw i;
  for (int j = 0; j < Vec<A, W>::L; ++j) i[j] = j;
  return i;
}

// Horizontal reductions by halving: lane j meets lane j + L/2, and so on down to one
// lane (a fixed association order, so the results are reproducible). The halves are
// taken with memcpy, which compilers turn into register extracts.
template <class T, int W, class Op>
KTG_HD T reduce_lanes(const void* x, Op op) {
  if constexpr (W == 2 * sizeof(T)) {
    T t[2];
    std::memcpy(t, x, sizeof(t));
    return op(t[0], t[1]);
  } else {
    typedef T half __attribute__((vector_size(W / 2)));
    half lo, hi;
    std::memcpy(&lo, x, W / 2);
    std::memcpy(&hi, static_cast<const char*>(x) + W / 2, W / 2);
    const half r = op(lo, hi);
    return reduce_lanes<T, W / 2>(&r, op);
  }
}

template <class A, int W>
KTG_HD A hsum(const Vec<A, W>& x) {
  return reduce_lanes<A, W>(&x.v, [](auto a, auto b) { return a + b; });
}

template <class A, int W>
KTG_HD A hmax(typename Vec<A, W>::raw x) {
  return reduce_lanes<A, W>(&x, [](auto a, auto b) { return a > b ? a : b; });
}

template <class A, int W>
KTG_HD int64_t hmin_index(typename Vec<A, W>::iraw x) {
  using Int = typename LaneTraits<A, W>::index;
  return reduce_lanes<Int, W>(&x, [](auto a, auto b) { return a < b ? a : b; });
}

// 1 on lanes [lo, hi), 0 elsewhere.
template <class A, int W>
KTG_HD Vec<A, W> lane_mask(int lo, int hi) {
  using R = typename Vec<A, W>::raw;
  using Int = typename LaneTraits<A, W>::index;
  const auto idx = lane_index<A, W>();
  return Vec<A, W>((idx >= static_cast<Int>(lo)) & (idx < static_cast<Int>(hi)) ? R{} + A(1) : R{});
}

template <class S, class A, int W>
KTG_HD Vec<A, W> load_full(const S* p) {
  Vec<A, W> r;
  if constexpr (std::is_same<S, A>::value) {
    std::memcpy(&r.v, p, sizeof(r.v));
  } else {
    for (int j = 0; j < Vec<A, W>::L; ++j) r.v[j] = static_cast<A>(p[j]);
  }
  return r;
}

template <class S, class A, int W>
KTG_HD Vec<A, W> load_part(const S* p, int rem, A pad) {
  // Through a stack buffer: inserting lanes one by one into a vector register is several
  // times slower, and this is the whole row when C is below the lane count.
  constexpr int L = Vec<A, W>::L;
  alignas(W) A buf[L];
  for (int j = 0; j < L; ++j) buf[j] = pad;
  if constexpr (std::is_same<S, A>::value) {
    std::memcpy(buf, p, sizeof(A) * rem);
  } else {
    for (int j = 0; j < rem; ++j) buf[j] = static_cast<A>(p[j]);
  }
  Vec<A, W> r;
  std::memcpy(&r.v, buf, sizeof(r.v));
  return r;
}

template <class S, class A, int W>
KTG_HD void store_full(S* p, const Vec<A, W>& x) {
  if constexpr (std::is_same<S, A>::value) {
    std::memcpy(p, &x.v, sizeof(x.v));
  } else {
    for (int j = 0; j < Vec<A, W>::L; ++j) p[j] = static_cast<S>(x.v[j]);
  }
}

template <class S, class A, int W>
KTG_HD void store_part(S* p, const Vec<A, W>& x, int rem) {
  if constexpr (std::is_same<S, A>::value) {
    std::memcpy(p, &x.v, sizeof(A) * rem);
  } else {
    for (int j = 0; j < rem; ++j) p[j] = static_cast<S>(x.v[j]);
  }
}

// One chunk of L classes starting at class c. Lanes [skip, rem) are new classes. When
// C is not a multiple of L the last chunk is moved back to end at C (skip > 0: its
// first lanes repeat classes already seen and are masked out of sums; recomputing their
// gradients writes identical values), so only C < L needs a padded, partial load.
struct Chunk {
  int64_t c;
  int skip;
  int rem;
};

template <int L, class F>
KTG_HD void for_chunks(int64_t C, F&& f) {  // f is called in class order
  const int64_t full = C / L * L;
  for (int64_t c = 0; c < full; c += L) f(Chunk{c, 0, L});
  if (full < C) {
    if (C >= L) {
      f(Chunk{C - L, static_cast<int>(L - (C - full)), L});
    } else {
      f(Chunk{0, 0, static_cast<int>(C)});
    }
  }
}

}  // namespace ktg
