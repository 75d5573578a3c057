// CPU kernels, op registration and argument checking of the fused Knowledge Transfer
// Graph loss (SPEC §2). The math lives in ktg_loss.h; this file adds the SIMD lane
// layout and the parallel loop over samples.
//
// Layout: at::parallel_for over samples; per sample every node's statistics are
// computed once (a max/argmax pass and a sum-exp pass over C, caching the exponentials
// in a per-thread scratch) and shared by all M² edges, which then only multiply. The
// class loops run on lane vectors (GCC vector extensions) of the widest ISA the CPU has:
// the entry points are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run
// time, so one binary runs on any x86-64.
// Determinism: per-sample results go to a buffer that is summed over the batch in a
// fixed serial order, so results are bit-identical run to run and for any thread count
// (on one machine: the ISA path changes the rounding).
#include <Python.h>

#define KTG_HOST_API
#include "ktg_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The chunk bodies are lambdas; they must inline into the ISA-specific entry points.
#define KTG_LAMBDA_INLINE __attribute__((always_inline))

#if !defined(__GNUC__)
#error "the CPU kernel of timm_dcl uses GCC/Clang vector extensions"
#endif

// ISA-specific entry points (x86-64): each is compiled with its own lane width and
// picked at run time, so one binary runs on any x86-64 and uses AVX-512 or AVX2 where
// present. Lane vectors wider than the ISA's registers would be split by the compiler
// through the stack, hence a width per ISA rather than one width for all.
#if defined(__x86_64__) && !defined(KTG_NO_MULTIVERSION)
#define KTG_MULTI_ISA 1
#define KTG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2,popcnt")))
#define KTG_TARGET_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#else
#define KTG_MULTI_ISA 0
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
  Vec<A, W> r(pad);
  for (int j = 0; j < rem; ++j) r.v[j] = static_cast<A>(p[j]);
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
  for (int j = 0; j < rem; ++j) p[j] = static_cast<S>(x.v[j]);
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

// ---------------------------------------------------------------------------------
// Kernels over a range of samples. S: logits' dtype, A: accumulation dtype.
// ---------------------------------------------------------------------------------
template <class S, class A, int W>
struct CpuKernel {
  using V = Vec<A, W>;
  using R = typename V::raw;
  using I = typename V::iraw;
  using Int = typename LaneTraits<A, W>::index;
  static constexpr int L = V::L;
  static constexpr int MAXM = kMaxNodes;
  static constexpr int kMaxEdges = kMaxNodes * (kMaxNodes - 1);
  // Sums over the classes run in blocks of this many chunks (cascade summation): with
  // narrow lanes and C in the tens of thousands a single running float sum would lose
  // about 1e-5 of relative accuracy.
  static constexpr int kCascade = 32;

  KTG_HD static V load(const S* p, const Chunk& k, A pad) {
    return k.rem == L ? load_full<S, A, W>(p + k.c) : load_part<S, A, W>(p + k.c, k.rem, pad);
  }
  KTG_HD static bool masked(const Chunk& k) { return k.skip != 0 || k.rem != L; }

  // Per-thread scratch holding exp(u) and exp(u/T) of the current sample, so the
  // probability passes multiply instead of calling exp again. nullptr: not cached
  // (very large M·C), the passes recompute the exponentials.
  struct Cache {
    A* e1;           // e1[n * stride + c] = exp(z_n,c − mx_n)
    A* eT;           // exp((z_n,c − mx_n)/T); == e1 when T == 1
    int64_t stride;  // max(C, 16) ≥ max(C, L)
  };

  // Above this many cached values per thread the passes recompute exp instead.
  static constexpr int64_t kMaxScratch = int64_t(1) << 22;

  // Independent of the lane width so one scratch size fits every ISA's kernel.
  KTG_HD static int64_t cache_stride(int64_t C) { return std::max<int64_t>(C, 16); }

  // Scratch elements per thread (0: no cache).
  static int64_t scratch_size(const Plan& plan, int64_t C) {
    const int64_t n = plan.M * cache_stride(C) * (plan.unit_temperature ? 1 : 2);
    return n <= kMaxScratch ? n : 0;
  }

  KTG_HD static Cache make_cache(A* scratch, const Plan& plan, int64_t C) {
    if (!scratch) return Cache{nullptr, nullptr, 0};
    const int64_t stride = cache_stride(C);
    return Cache{scratch, plan.unit_temperature ? scratch : scratch + plan.M * stride, stride};
  }

  // The raw per-node sums, before the logarithms.
  struct RawStat {
    A mx, s1, sT, bad;
  };

  // How exp(u) and exp(u/T) are formed: T == 1 (one exp), T == 2 (exp(u) = exp(u/2)²,
  // one exp), any other T (two).
  enum Mode { kUnit, kSquare, kGeneral };
  static Mode mode_of(const Plan& plan) {
    return plan.unit_temperature ? kUnit : (plan.temperature == 2.0 ? kSquare : kGeneral);
  }

  // Max, first argmax (if wanted), then sum-exp of one node of one sample; the
  // exponentials go to e1/eT when they are not null.
  template <int Mode, bool WantArg>
  KTG_HD static RawStat node_sums(const S* z, int64_t C, A inv_t, int64_t* argmax, A* e1_out,
                                  A* eT_out) {
    const A ninf = neg_infinity<A>();
    const I iota = lane_index<A, W>();
    R mxv = R{} + ninf;
    I arg = I{} + std::numeric_limits<Int>::max();
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      const R v = load(z, k, ninf).v;  // the moved-back last chunk is harmless for a max
      const auto gt = v > mxv;         // strict: each lane keeps its first maximum
      mxv = gt ? v : mxv;
      if (WantArg) arg = gt ? iota + static_cast<Int>(k.c) : arg;
    });
    const A mx = hmax<A, W>(mxv);
    if (WantArg) {
      const I cand = mxv == (R{} + mx) ? arg : I{} + std::numeric_limits<Int>::max();
      const int64_t first = hmin_index<A, W>(cand);
      *argmax = first == std::numeric_limits<Int>::max() ? -1 : first;
    }
    V s1(A(0)), sT(A(0)), bad(A(0)), s1_total(A(0)), sT_total(A(0));
    int blocked = 0;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      const V v = load(z, k, mx);  // padding gives u = 0, masked below
      const V u = v - mx;
      V e1, eT;
      if (Mode == kUnit) {
        e1 = eT = ktg_exp(u);
      } else if (Mode == kSquare) {
        eT = ktg_exp(u * inv_t);
        e1 = eT * eT;
        // exp(u) of float is 0 below kExpLo; the square would make slow subnormals.
        if (std::is_same<A, float>::value) e1 = V(u.v < A(kExpLo) ? R{} : e1.v);
      } else {
        e1 = ktg_exp(u);
        eT = ktg_exp(u * inv_t);
      }
      if (e1_out) {
        store_full<A, A, W>(e1_out + k.c, e1);
        if (Mode != kUnit) store_full<A, A, W>(eT_out + k.c, eT);
      }
      if (masked(k)) {
        const V valid = lane_mask<A, W>(k.skip, k.rem);
        e1 = e1 * valid;
        eT = eT * valid;
      }
      s1 += e1;
      if (Mode != kUnit) sT += eT;
      bad += v - v;
      if (++blocked == kCascade) {
        s1_total += s1;
        sT_total += sT;
        s1 = sT = V(A(0));
        blocked = 0;
      }
    });
    s1_total += s1;
    sT_total += sT;
    const A S1 = hsum(s1_total);
    return RawStat{mx, S1, Mode == kUnit ? S1 : hsum(sT_total), hsum(bad)};
  }

  template <bool WantArg>
  KTG_HD static RawStat sums_of(const S* z, int64_t C, const Plan& plan, Mode mode,
                                int64_t* argmax, const Cache& cache, int n) {
    const A inv_t = static_cast<A>(plan.inv_temperature);
    A* e1 = cache.e1 ? cache.e1 + n * cache.stride : nullptr;
    A* eT = cache.eT ? cache.eT + n * cache.stride : nullptr;
    switch (mode) {
      case kUnit:
        return node_sums<kUnit, WantArg>(z, C, inv_t, argmax, e1, e1);
      case kSquare:
        return node_sums<kSquare, WantArg>(z, C, inv_t, argmax, e1, eT);
      default:
        return node_sums<kGeneral, WantArg>(z, C, inv_t, argmax, e1, eT);
    }
  }

  // Logarithms of the sums of the nodes in `mask` (one lane per node), and the
  // normalisers r1 = exp(−ls1), rT = exp(−lsT) of the cached exponentials.
  KTG_HD static void finalize_nodes(const Plan& plan, uint32_t mask, const RawStat* raw,
                                    NodeStat<A>* st, A* r1, A* rT) {
    const bool unit = plan.unit_temperature;
    for (int n0 = 0; n0 < plan.M; n0 += L) {
      V x1(A(1)), xT(A(1));
      for (int j = 0; j < L && n0 + j < plan.M; ++j) {
        if (!has_bit(mask, n0 + j)) continue;
        x1.v[j] = raw[n0 + j].s1;
        xT.v[j] = raw[n0 + j].sT;
      }
      const V l1 = ktg_log(x1);
      const V lT = unit ? l1 : ktg_log(xT);
      V n1(A(0)), nT(A(0));
      for (int j = 0; j < L && n0 + j < plan.M; ++j) {
        const int n = n0 + j;
        if (!has_bit(mask, n)) continue;
        st[n] = stat_from_logs(raw[n].mx, l1.v[j], lT.v[j], raw[n].bad, unit);
        n1.v[j] = -st[n].ls1;
        nT.v[j] = -st[n].lsT;
      }
      const V e1 = ktg_exp(n1);
      const V eT = unit ? e1 : ktg_exp(nT);
      for (int j = 0; j < L && n0 + j < plan.M; ++j) {
        r1[n0 + j] = e1.v[j];
        rT[n0 + j] = eT.v[j];
      }
    }
  }

  // u[n] = z_n − mx_n on one chunk for every node in `mask` (padding: u = 0).
  KTG_HD static void load_shifted(const S* z, int64_t B, int64_t C, int64_t b, const Chunk& k,
                                  const Plan& plan, uint32_t mask, const NodeStat<A>* st,
                                  V* u) {
    for (int n = 0; n < plan.M; ++n) {
      if (!has_bit(mask, n)) continue;
      u[n] = load(z + (n * B + b) * C, k, st[n].mx) - st[n].mx;
    }
  }

  // class_probs of ktg_loss.h, from the cached exponentials when there are some:
  // softmax = exp(u/T) · exp(−lsT).
  KTG_HD static void chunk_probs(const Plan& plan, const NodeStat<A>* st, const V* u,
                                 uint32_t t_mask, uint32_t one_mask, const Cache& cache,
                                 const A* rT, const A* r1, const Chunk& k, V* pT, V* p1) {
    if (!cache.e1) {
      class_probs<MAXM>(plan, st, u, t_mask, one_mask, pT, p1);
      return;
    }
    for (int n = 0; n < plan.M; ++n) {
      const int64_t off = n * cache.stride + k.c;
      if (has_bit(t_mask, n)) pT[n] = load_full<A, A, W>(cache.eT + off) * rT[n];
      if (has_bit(one_mask, n)) {
        p1[n] = plan.unit_temperature && has_bit(t_mask, n) ? pT[n]
                                                             : load_full<A, A, W>(cache.e1 + off) * r1[n];
      }
    }
  }

  KTG_HD static void forward_range(const S* z, const int64_t* y, int64_t B, int64_t C,
                                   const Plan& plan, A* stats, A* per_sample, const Cache& cache,
                                   int64_t b0, int64_t b1) {
    const int M = plan.M;
    const int E = plan.num_edges;
    const A inv_t = static_cast<A>(plan.inv_temperature);
    const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
    const Mode mode = mode_of(plan);
    const uint32_t all = (uint32_t(1) << M) - 1u;
    RawStat raw[kMaxNodes];
    NodeStat<A> st[kMaxNodes];
    A correct[kMaxNodes], ce[kMaxNodes], r1[kMaxNodes], rT[kMaxNodes];
    A D[MAXM * MAXM];
    V Dv[kMaxEdges], Dt[kMaxEdges];
    V u[kMaxNodes], pT[kMaxNodes];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t yb = y[b];
      for (int n = 0; n < M; ++n) {
        int64_t arg;
        raw[n] = sums_of<true>(z + (n * B + b) * C, C, plan, mode, &arg, cache, n);
        correct[n] = arg == yb ? A(1) : A(0);
      }
      finalize_nodes(plan, all, raw, st, r1, rT);
      for (int n = 0; n < M; ++n) {
        A* sp = stats + (n * B + b) * 3;
        sp[0] = lse_tempered(st[n], inv_t);
        sp[1] = lse_plain(st[n]);
        sp[2] = correct[n];
      }
      for (int t = 0; t < M; ++t) {
        if (has_bit(plan.label_mask, t))
          ce[t] = label_ce(st[t], static_cast<A>(z[(t * B + b) * C + yb]));
      }
      if (E > 0) {
        for (int e = 0; e < E; ++e) Dv[e] = Dt[e] = V(A(0));
        int blocked = 0;
        for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
          load_shifted(z, B, C, b, k, plan, kd_nodes, st, u);
          chunk_probs(plan, st, u, plan.source_mask, 0u, cache, rT, rT, k, pT,
                      static_cast<V*>(nullptr));
          if (masked(k)) {
            const V valid = lane_mask<A, W>(k.skip, k.rem);
            for (int s = 0; s < M; ++s)
              if (has_bit(plan.source_mask, s)) pT[s] = pT[s] * valid;
          }
          accumulate_kd_edges(plan, u, pT, Dv);
          if (++blocked == kCascade) {
            for (int e = 0; e < E; ++e) {
              Dt[e] += Dv[e];
              Dv[e] = V(A(0));
            }
            blocked = 0;
          }
        });
        for (int e = 0; e < E; ++e)
          D[plan.edge_src[e] * MAXM + plan.edge_tgt[e]] = hsum(Dt[e] + Dv[e]);
      }
      sample_losses<MAXM>(plan, st, ce, D, correct, true, per_sample + b * M);
    }
  }

  KTG_HD static void backward_range(const A* grad_losses, const S* z, const int64_t* y,
                                    const A* stats, int64_t B, int64_t C, const Plan& plan,
                                    S* grad, const Cache& cache, int64_t b0, int64_t b1) {
    const int M = plan.M;
    const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
    const uint32_t needed = plan.target_mask | plan.source_mask;
    const A inv_b = A(1) / static_cast<A>(B);
    const I iota = lane_index<A, W>();
    const Mode mode = mode_of(plan);
    RawStat raw[kMaxNodes];
    NodeStat<A> st[kMaxNodes];
    A correct[kMaxNodes], rT[kMaxNodes], r1[kMaxNodes];
    SampleCoef<A, MAXM> coef;
    V u[kMaxNodes], pT[kMaxNodes], p1[kMaxNodes], g[kMaxNodes];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t yb = y[b];
      for (int n = 0; n < M; ++n) {
        correct[n] = stats[(n * B + b) * 3 + 2];
        // Recomputed rather than read back: the stats' log-sum-exp columns are rounded
        // sums (mx + ls) and would cost float32 precision for large logits.
        if (has_bit(needed, n))
          raw[n] = sums_of<false>(z + (n * B + b) * C, C, plan, mode, nullptr, cache, n);
      }
      finalize_nodes(plan, needed, raw, st, r1, rT);
      make_coefficients<MAXM>(plan, correct, grad_losses, inv_b, coef);
      for (int t = 0; t < M; ++t) {
        if (!has_bit(plan.target_mask, t))
          std::memset(static_cast<void*>(grad + (t * B + b) * C), 0, sizeof(S) * C);
      }
      if (!plan.target_mask) continue;
      for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
        if (!cache.e1) load_shifted(z, B, C, b, k, plan, needed, st, u);
        chunk_probs(plan, st, u, kd_nodes, plan.label_mask, cache, rT, r1, k, pT, p1);
        const V delta(iota + static_cast<Int>(k.c) == static_cast<Int>(yb) ? R{} + A(1) : R{});
        class_grads_edges<MAXM>(plan, coef, pT, p1, delta, g);
        for (int t = 0; t < M; ++t) {
          if (!has_bit(plan.target_mask, t)) continue;
          S* p = grad + (t * B + b) * C + k.c;
          if (k.rem == L) {
            store_full<S, A, W>(p, g[t]);
          } else {
            store_part<S, A, W>(p, g[t], k.rem);
          }
        }
      });
    }
  }
};

// The ISA the entry points use: the best one the CPU has, or a lower one named by
// TIMM_DCL_CPU_ISA=avx512|avx2|base (read once; for testing every code path on one
// machine).
enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
#if KTG_MULTI_ISA
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
                    __builtin_cpu_supports("popcnt");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  Isa best = avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kBase);
  if (const char* want = std::getenv("TIMM_DCL_CPU_ISA")) {
    const std::string w(want);
    const Isa asked = w == "base" ? Isa::kBase : (w == "avx2" ? Isa::kAvx2 : Isa::kAvx512);
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;
  }
  return best;
#else
  return Isa::kBase;
#endif
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#define KTG_FORWARD_ARGS(S, A)                                                               \
  const S *z, const int64_t *y, int64_t B, int64_t C, const Plan &plan, A *stats,        \
      A *per_sample, A *scratch, int64_t b0, int64_t b1
#define KTG_BACKWARD_ARGS(S, A)                                                              \
  const A *grad_losses, const S *z, const int64_t *y, const A *stats, int64_t B,         \
      int64_t C, const Plan &plan, S *grad, A *scratch, int64_t b0, int64_t b1

template <class S, class A, int W>
KTG_HD void forward_impl(KTG_FORWARD_ARGS(S, A)) {
  using K = CpuKernel<S, A, W>;
  K::forward_range(z, y, B, C, plan, stats, per_sample, K::make_cache(scratch, plan, C), b0, b1);
}

template <class S, class A, int W>
KTG_HD void backward_impl(KTG_BACKWARD_ARGS(S, A)) {
  using K = CpuKernel<S, A, W>;
  K::backward_range(grad_losses, z, y, stats, B, C, plan, grad, K::make_cache(scratch, plan, C),
                    b0, b1);
}

// Non-template entry points, one per dtype and ISA, and their dispatchers.
#if KTG_MULTI_ISA
#define KTG_DEFINE_RANGES(S, A)                                                            \
  KTG_TARGET_AVX512 void forward_avx512(KTG_FORWARD_ARGS(S, A)) {                                \
    forward_impl<S, A, 64>(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);          \
  }                                                                                        \
  KTG_TARGET_AVX2 void forward_avx2(KTG_FORWARD_ARGS(S, A)) {                                    \
    forward_impl<S, A, 32>(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);          \
  }                                                                                        \
  void forward_base(KTG_FORWARD_ARGS(S, A)) {                                                    \
    forward_impl<S, A, 16>(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);          \
  }                                                                                        \
  void forward_range(KTG_FORWARD_ARGS(S, A)) {                                                   \
    switch (cpu_isa()) {                                                                   \
      case Isa::kAvx512:                                                                   \
        return forward_avx512(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);       \
      case Isa::kAvx2:                                                                     \
        return forward_avx2(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);         \
      default:                                                                             \
        return forward_base(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);         \
    }                                                                                      \
  }                                                                                        \
  KTG_TARGET_AVX512 void backward_avx512(KTG_BACKWARD_ARGS(S, A)) {                              \
    backward_impl<S, A, 64>(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1);  \
  }                                                                                        \
  KTG_TARGET_AVX2 void backward_avx2(KTG_BACKWARD_ARGS(S, A)) {                                  \
    backward_impl<S, A, 32>(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1);  \
  }                                                                                        \
  void backward_base(KTG_BACKWARD_ARGS(S, A)) {                                                  \
    backward_impl<S, A, 16>(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1);  \
  }                                                                                        \
  void backward_range(KTG_BACKWARD_ARGS(S, A)) {                                                 \
    switch (cpu_isa()) {                                                                   \
      case Isa::kAvx512:                                                                   \
        return backward_avx512(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1); \
      case Isa::kAvx2:                                                                     \
        return backward_avx2(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1); \
      default:                                                                             \
        return backward_base(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1); \
    }                                                                                      \
  }
#else
#define KTG_DEFINE_RANGES(S, A)                                                            \
  void forward_range(KTG_FORWARD_ARGS(S, A)) {                                                   \
    forward_impl<S, A, 16>(z, y, B, C, plan, stats, per_sample, scratch, b0, b1);          \
  }                                                                                        \
  void backward_range(KTG_BACKWARD_ARGS(S, A)) {                                                 \
    backward_impl<S, A, 16>(grad_losses, z, y, stats, B, C, plan, grad, scratch, b0, b1);  \
  }
#endif

KTG_DEFINE_RANGES(float, float)
KTG_DEFINE_RANGES(double, double)
KTG_DEFINE_RANGES(c10::Half, float)
KTG_DEFINE_RANGES(c10::BFloat16, float)

template <class S>
using acc_of = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

// ---------------------------------------------------------------------------------
// Argument checking (shared with the CUDA backend through ktg_loss.h).
// ---------------------------------------------------------------------------------
at::ScalarType accumulate_type(at::ScalarType logits_type) {
  return logits_type == at::kDouble ? at::kDouble : at::kFloat;
}

Plan check_forward_args(const at::Tensor& logits, const at::Tensor& labels, c10::IntArrayRef gates,
                        double temperature, double progress, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 3, op, ": logits must be a 3-D tensor [M, B, C], got shape ",
                    logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   op, ": logits must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  TORCH_CHECK_VALUE(M >= 1, op, ": logits have no nodes (M = 0)");
  TORCH_CHECK_VALUE(B >= 1, op, ": logits have an empty batch (B = 0)");
  TORCH_CHECK_VALUE(C >= 1, op, ": logits have no classes (C = 0)");
  TORCH_CHECK_VALUE(M <= kMaxNodes, op, ": the fused kernels support at most ", kMaxNodes,
                    " nodes, got M = ", M);
  TORCH_CHECK_VALUE(B <= INT32_MAX && C <= INT32_MAX, op,
                    ": batch size and class count must be below 2^31, got B = ", B, ", C = ", C);
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == B, op, ": labels must be [B] with B = ",
                    B, " (the logits' batch), got shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.device() == logits.device(), op, ": labels are on ", labels.device(),
                    " but logits are on ", logits.device());
  TORCH_CHECK_VALUE(static_cast<int64_t>(gates.size()) == M * M, op, ": gates must hold M*M = ",
                    M * M, " codes (row-major, gates[t*M + s] = edge s -> t), got ", gates.size());
  for (int64_t i = 0; i < M * M; ++i) {
    TORCH_CHECK_VALUE(gates[i] >= 0 && gates[i] < kNumGateCodes, op, ": gate code ", gates[i],
                      " of the edge ", i % M, " -> ", i / M,
                      " is not 0 (through), 1 (cutoff), 2 (linear) or 3 (correct)");
  }
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(progress), op, ": progress must be finite, got ", progress);
  return make_plan(gates.data(), static_cast<int>(M), temperature, progress);
}

Plan check_backward_args(const at::Tensor& grad_losses, const at::Tensor& logits,
                         const at::Tensor& labels, const at::Tensor& stats, c10::IntArrayRef gates,
                         double temperature, double progress, const char* op) {
  Plan plan = check_forward_args(logits, labels, gates, temperature, progress, op);
  const int64_t M = logits.size(0), B = logits.size(1);
  TORCH_CHECK_VALUE(grad_losses.dim() == 1 && grad_losses.size(0) == M, op,
                    ": grad_losses must be [M] with M = ", M, ", got shape ", grad_losses.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_losses.scalar_type()), op,
                   ": grad_losses must be a floating tensor, got ", grad_losses.scalar_type());
  TORCH_CHECK_VALUE(grad_losses.device() == logits.device(), op, ": grad_losses are on ",
                    grad_losses.device(), " but logits are on ", logits.device());
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) == M && stats.size(1) == B &&
                        stats.size(2) == 3,
                    op, ": stats must be [M, B, 3] = [", M, ", ", B, ", 3], got shape ",
                    stats.sizes());
  const auto acc = accumulate_type(logits.scalar_type());
  TORCH_CHECK_TYPE(stats.scalar_type() == acc, op, ": stats must be ", acc, " for ",
                   logits.scalar_type(), " logits, got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.device() == logits.device(), op, ": stats are on ", stats.device(),
                    " but logits are on ", logits.device());
  return plan;
}

namespace {

// On the CPU a bad label is an error (the CUDA kernels cannot raise; they give NaN).
void check_label_range(const at::Tensor& labels, int64_t C, const char* op) {
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < labels.numel(); ++b) {
    TORCH_CHECK_INDEX(y[b] >= 0 && y[b] < C, op, ": label ", y[b], " of sample ", b,
                      " is outside [0, C) with C = ", C);
  }
}

// Per-thread scratch for the kernels' exp cache, grown once and reused across calls.
template <class A>
A* thread_scratch(int64_t n) {
  if (n == 0) return nullptr;
  static thread_local std::vector<A> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

int64_t grain_size(int64_t M, int64_t C) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, M * C));
}

std::tuple<at::Tensor, at::Tensor> ktg_loss_forward_cpu(const at::Tensor& logits_in,
                                                        const at::Tensor& labels_in,
                                                        c10::IntArrayRef gates, double temperature,
                                                        double progress) {
  const char* op = "timm_dcl::ktg_loss_forward";
  const Plan plan = check_forward_args(logits_in, labels_in, gates, temperature, progress, op);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  check_label_range(labels, C, op);
  const auto acc_opts = logits.options().dtype(accumulate_type(logits.scalar_type()));
  at::Tensor losses = at::empty({M}, acc_opts);
  at::Tensor stats = at::empty({M, B, 3}, acc_opts);
  at::Tensor per_sample = at::empty({B, M}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ktg_loss_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    acc_t* st = stats.data_ptr<acc_t>();
    acc_t* ps = per_sample.data_ptr<acc_t>();
    const int64_t scratch = CpuKernel<scalar_t, acc_t, 16>::scratch_size(plan, C);
    at::parallel_for(0, B, grain_size(M, C), [&](int64_t b0, int64_t b1) {
      forward_range(z, y, B, C, plan, st, ps, thread_scratch<acc_t>(scratch), b0, b1);
    });
    acc_t* out = losses.data_ptr<acc_t>();
    for (int64_t t = 0; t < M; ++t) {
      double sum = 0.0;  // fixed order: bit-identical for any thread count
      for (int64_t b = 0; b < B; ++b) sum += static_cast<double>(ps[b * M + t]);
      out[t] = static_cast<acc_t>(sum / static_cast<double>(B));
    }
  });
  return std::make_tuple(losses, stats);
}

at::Tensor ktg_loss_backward_cpu(const at::Tensor& grad_losses_in, const at::Tensor& logits_in,
                                 const at::Tensor& labels_in, const at::Tensor& stats_in,
                                 c10::IntArrayRef gates, double temperature, double progress) {
  const char* op = "timm_dcl::ktg_loss_backward";
  const Plan plan = check_backward_args(grad_losses_in, logits_in, labels_in, stats_in, gates,
                                        temperature, progress, op);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const int64_t M = logits.size(0), B = logits.size(1), C = logits.size(2);
  check_label_range(labels, C, op);
  const at::Tensor grad_losses =
      grad_losses_in.to(accumulate_type(logits.scalar_type())).contiguous();
  at::Tensor grad = at::empty({M, B, C}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ktg_loss_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    const acc_t* gl = grad_losses.data_ptr<acc_t>();
    const scalar_t* z = logits.data_ptr<scalar_t>();
    const int64_t* y = labels.data_ptr<int64_t>();
    const acc_t* st = stats.data_ptr<acc_t>();
    scalar_t* gz = grad.data_ptr<scalar_t>();
    const int64_t scratch = CpuKernel<scalar_t, acc_t, 16>::scratch_size(plan, C);
    at::parallel_for(0, B, grain_size(M, C), [&](int64_t b0, int64_t b1) {
      backward_range(gl, z, y, st, B, C, plan, gz, thread_scratch<acc_t>(scratch), b0, b1);
    });
  });
  return grad;
}

}  // namespace
}  // namespace ktg

TORCH_LIBRARY(timm_dcl, m) {
  m.def(
      "ktg_loss_forward(Tensor logits, Tensor labels, int[] gates, float temperature, "
      "float progress) -> (Tensor, Tensor)");
  m.def(
      "ktg_loss_backward(Tensor grad_losses, Tensor logits, Tensor labels, Tensor stats, "
      "int[] gates, float temperature, float progress) -> Tensor");
}

TORCH_LIBRARY_IMPL(timm_dcl, CPU, m) {
  m.impl("ktg_loss_forward", &ktg::ktg_loss_forward_cpu);
  m.impl("ktg_loss_backward", &ktg::ktg_loss_backward_cpu);
}

// The torch version the library was compiled against, findable in the file without
// loading it: timm_dcl/ops/_extension.py reads it to refuse a library built for another
// torch (whose registrations would run, and could crash, as soon as it is loaded).
#define KTG_STRINGIFY_(a) #a
#define KTG_STRINGIFY(a) KTG_STRINGIFY_(a)
extern "C" __attribute__((used, visibility("default"))) const char timm_dcl_build_info[] =
    "timm_dcl-build:torch=" KTG_STRINGIFY(TORCH_VERSION_MAJOR) "." KTG_STRINGIFY(
        TORCH_VERSION_MINOR) "." KTG_STRINGIFY(TORCH_VERSION_PATCH) ";";

// The shared library is also the Python module timm_dcl._C: importing it runs the
// registrations above. The module itself is empty.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define KTG_CONCAT_(a, b) a##b
#define KTG_CONCAT(a, b) KTG_CONCAT_(a, b)

PyMODINIT_FUNC KTG_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, KTG_STRINGIFY(TORCH_EXTENSION_NAME),
                               "Fused kernels of timm_dcl (registered as torch.ops.timm_dcl)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
