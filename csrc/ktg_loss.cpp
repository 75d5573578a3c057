// CPU kernels of the fused Knowledge Transfer Graph loss (SPEC §2). The math lives in
// ktg_loss.h; this file adds the SIMD lane layout and the parallel loop over samples.
// The op's definition, argument checking and autograd are in ktg_op.cpp.
//
// Layout: at::parallel_for over samples (the calling thread alone for small calls); per
// sample every node's statistics are computed once (a max/argmax pass and a sum-exp pass
// over C, caching exp(u/T) in a per-thread scratch) and shared by all M² edges, which
// then only multiply; the statistics are stored, so the backward is one pass. The
// class loops run on lane vectors (GCC vector extensions) of the widest ISA the CPU has:
// the entry points are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run
// time, so one binary runs on any x86-64.
// Determinism: per-sample results go to a buffer that is summed over the batch in a
// fixed serial order, so results are bit-identical run to run and for any thread count
// (on one machine: the ISA path changes the rounding).
#define KTG_HOST_API
#include "ktg_loss.h"
#include "ktg_cpu_lanes.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

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

// The arguments of one call of the kernels (the per-thread sample range aside).
template <class S, class A>
struct ForwardArgs {
  NodeRows<S> z;
  const S* limit[kMaxNodes];  // end of each node's storage (see CpuKernel::load)
  const int64_t* y;  // [B]; soft targets: their classes where a correct gate reads them, else null
  const A* soft;     // [B, C] target probabilities, or null (integer labels)
  int64_t B, C;
  const Plan* plan;
  A* stats;       // [M, B, kStatCols]
  A* per_sample;  // [B, M]
  A progress;
};

template <class S, class A>
struct BackwardArgs {
  StridedVec<A> grad_losses;
  NodeRows<S> z;
  const S* limit[kMaxNodes];
  const int64_t* y;
  const A* soft;  // [B, C] target probabilities, or null (integer labels)
  const A* stats;
  int64_t B, C;
  const Plan* plan;
  GradRows<S> grad;
  A progress;
};

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

  // limit: the end of the tensor's storage. A short chunk (C < L) whose vector still lies
  // inside the storage is read whole and its lanes past the row replaced by `pad`: much
  // cheaper than assembling it, and this is every row when C is small.
  KTG_HD static V load(const S* p, const Chunk& k, A pad, const S* limit) {
    if (k.rem == L) return load_full<S, A, W>(p + k.c);
    if (p + k.c + L <= limit) {
      const V v = load_full<S, A, W>(p + k.c);
      return V(lane_index<A, W>() < static_cast<Int>(k.rem) ? v.v : R{} + pad);
    }
    return load_part<S, A, W>(p + k.c, k.rem, pad);
  }
  KTG_HD static bool masked(const Chunk& k) { return k.skip != 0 || k.rem != L; }

  // One chunk of a soft target row (contiguous, the accumulation dtype); lanes past the
  // row are 0. The moved-back last chunk's repeated lanes are not masked here.
  KTG_HD static V load_target(const A* y, const Chunk& k) {
    if (k.rem == L) return load_full<A, A, W>(y + k.c);
    return load_part<A, A, W>(y + k.c, k.rem, A(0));
  }

  // Σ_c y_c, each class once.
  KTG_HD static A target_sum(const A* y, int64_t C) {
    V acc(A(0)), tot(A(0));
    int blocked = 0;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      V yv = load_target(y, k);
      if (k.skip) yv = yv * lane_mask<A, W>(k.skip, k.rem);
      acc += yv;
      if (++blocked == kCascade) {
        tot += acc;
        acc = V(A(0));
        blocked = 0;
      }
    });
    return hsum(tot + acc);
  }

  // The class a correct gate compares with for soft targets: their first argmax, a NaN
  // winning as in torch.argmax (SPEC §2: ties go to the lowest class). In the kernel, not
  // by at::argmax before it: that op and its allocation were most of what soft targets
  // added to a call with correct gates at M=7 B=128 C=100.
  KTG_HD static int64_t target_argmax(const A* y, int64_t C) {
    const A ninf = neg_infinity<A>();
    const I iota = lane_index<A, W>();
    const I none = I{} + std::numeric_limits<Int>::max();
    R mxv = R{} + ninf;
    I arg = none, nan_at = none;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      const R v = (k.rem == L ? load_full<A, A, W>(y + k.c) : load_part<A, A, W>(y + k.c, k.rem, ninf)).v;
      const I at = iota + static_cast<Int>(k.c);
      const auto gt = v > mxv;  // strict: each lane keeps its first maximum
      mxv = gt ? v : mxv;
      arg = gt ? at : arg;
      nan_at = (v != v) & (nan_at == none) ? at : nan_at;  // each lane's first NaN
    });
    const int64_t first_nan = hmin_index<A, W>(nan_at);
    if (first_nan != std::numeric_limits<Int>::max()) return first_nan;
    const A mx = hmax<A, W>(mxv);
    const int64_t first = hmin_index<A, W>(mxv == (R{} + mx) ? arg : none);
    // All −inf: torch.argmax gives 0.
    return first == std::numeric_limits<Int>::max() ? 0 : first;
  }

  // The label edge against soft targets, −Σ_c y_c log softmax(z)_c (ktg_loss.h).
  KTG_HD static A soft_label_ce(const S* z, const S* limit, const A* y, int64_t C, const NodeStat<A>& st) {
    V acc(A(0)), tot(A(0));
    int blocked = 0;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      V yv = load_target(y, k);
      if (k.skip) yv = yv * lane_mask<A, W>(k.skip, k.rem);
      acc += soft_ce_term(st, load(z, k, st.mx, limit), yv);  // padding: y = 0
      if (++blocked == kCascade) {
        tot += acc;
        acc = V(A(0));
        blocked = 0;
      }
    });
    return hsum(tot + acc);
  }

  // Per-thread scratch holding exp(u/T) of the current sample, so the forward's
  // knowledge-edge pass multiplies instead of calling exp again. nullptr: not cached
  // (very large M·C), that pass recomputes the exponentials.
  struct Cache {
    A* eT;           // eT[n * stride + c] = exp((z_n,c − mx_n)/T), then softmax(z_n/T)
    A* u;            // u[n * stride + c] = z_n,c − mx_n
    int64_t stride;  // max(C, 16) ≥ max(C, L)
  };

  // Above this many cached values per thread the pass recomputes exp instead.
  static constexpr int64_t kMaxScratch = int64_t(1) << 22;

  // Independent of the lane width so one scratch size fits every ISA's kernel.
  KTG_HD static int64_t cache_stride(int64_t C) { return std::max<int64_t>(C, 16); }

  // Scratch elements per thread (0: no cache, or nothing would read it).
  static int64_t scratch_size(const Plan& plan, int64_t C) {
    if (plan.num_edges == 0) return 0;
    const int64_t n = 2 * plan.M * cache_stride(C);
    return n <= kMaxScratch ? n : 0;
  }

  KTG_HD static Cache make_cache(A* scratch, const Plan& plan, int64_t C) {
    if (!scratch) return Cache{nullptr, nullptr, 0};
    const int64_t stride = cache_stride(C);
    return Cache{scratch, scratch + plan.M * stride, stride};
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

  // Max, first argmax (when argmax is not null), then sum-exp of one node of one sample;
  // exp(u/T) goes to eT_out when it is not null.
  template <int Mode>
  KTG_HD static RawStat node_sums(const S* z, const S* limit, int64_t C, A inv_t, int64_t* argmax,
                                  A* eT_out) {
    const A ninf = neg_infinity<A>();
    const I iota = lane_index<A, W>();
    R mxv = R{} + ninf;
    I arg = I{} + std::numeric_limits<Int>::max();
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      const R v = load(z, k, ninf, limit).v;  // the moved-back last chunk is harmless for a max
      const auto gt = v > mxv;         // strict: each lane keeps its first maximum
      mxv = gt ? v : mxv;
      arg = gt ? iota + static_cast<Int>(k.c) : arg;
    });
    const A mx = hmax<A, W>(mxv);
    if (argmax) {  // only sources of correct gates need it; the reduction is not free
      const I cand = mxv == (R{} + mx) ? arg : I{} + std::numeric_limits<Int>::max();
      const int64_t first = hmin_index<A, W>(cand);
      *argmax = first == std::numeric_limits<Int>::max() ? -1 : first;
    }
    V s1(A(0)), sT(A(0)), s1_total(A(0)), sT_total(A(0));
    int blocked = 0;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      const V v = load(z, k, mx, limit);  // padding gives u = 0, masked below
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
      if (eT_out) store_full<A, A, W>(eT_out + k.c, eT);
      if (masked(k)) {
        const V valid = lane_mask<A, W>(k.skip, k.rem);
        e1 = e1 * valid;
        eT = eT * valid;
      }
      // v − v is 0 for a finite logit and NaN for ±inf or NaN: added to the sums it makes
      // the node's statistics NaN without a reduction of its own.
      const V bad = v - v;
      s1 += e1 + bad;
      if (Mode != kUnit) sT += eT + bad;
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
    return RawStat{mx, S1, Mode == kUnit ? S1 : hsum(sT_total), A(0)};
  }

  KTG_HD static RawStat sums_of(const S* z, const S* limit, int64_t C, const Plan& plan, Mode mode,
                                int64_t* argmax, const Cache& cache, int n) {
    const A inv_t = static_cast<A>(plan.inv_temperature);
    A* eT = cache.eT ? cache.eT + n * cache.stride : nullptr;
    switch (mode) {
      case kUnit:
        return node_sums<kUnit>(z, limit, C, inv_t, argmax, eT);
      case kSquare:
        return node_sums<kSquare>(z, limit, C, inv_t, argmax, eT);
      default:
        return node_sums<kGeneral>(z, limit, C, inv_t, argmax, eT);
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
  KTG_HD static void load_shifted(const NodeRows<S>& z, const S* const* limit, int64_t b,
                                  const Chunk& k, const Plan& plan, uint32_t mask,
                                  const NodeStat<A>* st, V* u) {
    for (int n = 0; n < plan.M; ++n) {
      if (!has_bit(mask, n)) continue;
      u[n] = load(z.row(n, b), k, st[n].mx, limit[n]) - st[n].mx;
    }
  }

  // softmax(z_s/T) of the sources on one chunk: from the cached exponentials when there
  // are some (exp(u/T) · exp(−lsT)), else class_probs of ktg_loss.h.
  KTG_HD static void source_probs(const Plan& plan, const NodeStat<A>* st, const V* u,
                                  const Cache& cache, const A* rT, const Chunk& k, V* pT) {
    if (!cache.eT) {
      class_probs<MAXM>(plan, st, static_cast<const A*>(nullptr), u, plan.source_mask, 0u, pT,
                        static_cast<V*>(nullptr));
      return;
    }
    for (int n = 0; n < plan.M; ++n) {
      if (has_bit(plan.source_mask, n))
        pT[n] = load_full<A, A, W>(cache.eT + n * cache.stride + k.c) * rT[n];
    }
  }

  // Σ_c p_s,c (u_s,c − u_t,c) of every open knowledge edge of sample b into D[s*MAXM + t],
  // from the cached exp(u/T). First u of the sample is written to the cache; then each
  // source's out-edges are summed a few at a time (edge_group), so that the accumulators
  // live in registers: an array of M² accumulators indexed at run time would live in
  // memory, each update a load and a store.
  KTG_HD static void edge_sums_by_source(const ForwardArgs<S, A>& a, const Cache& cache, int64_t b,
                                         const NodeStat<A>* st, const A* rT, A* D) {
    const Plan& plan = *a.plan;
    const int M = plan.M;
    const int64_t C = a.C, stride = cache.stride;
    const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      for (int n = 0; n < M; ++n) {
        if (!has_bit(kd_nodes, n)) continue;
        // The moved-back last chunk rewrites some classes with the same values.
        store_full<A, A, W>(cache.u + n * stride + k.c, load(a.z.row(n, b), k, st[n].mx, a.limit[n]) - st[n].mx);
      }
    });
    for (int s = 0; s < M; ++s) {
      if (!has_bit(plan.source_mask, s)) continue;
      int targets[kMaxNodes];
      int nt = 0;
      for (int t = 0; t < M; ++t) {
        if (has_bit(plan.kd_in[t], s)) targets[nt++] = t;
      }
      // Groups of four targets, then a pair, then one: no accumulator is wasted on a dummy.
      int i = 0;
      for (; i + 4 <= nt; i += 4) edge_group<4>(cache, C, s, targets + i, rT[s], D);
      if (i + 2 <= nt) {
        edge_group<2>(cache, C, s, targets + i, rT[s], D);
        i += 2;
      }
      if (i < nt) edge_group<1>(cache, C, s, targets + i, rT[s], D);
    }
  }

  // D[s*MAXM + t] for G targets t of source s, with G accumulators in registers.
  template <int G>
  KTG_HD static void edge_group(const Cache& cache, int64_t C, int s, const int* targets, A r, A* D) {
    const int64_t stride = cache.stride;
    const A* ps_row = cache.eT + s * stride;  // exp(u_s/T); softmax = that · exp(−lsT_s) = · r
    const A* us_row = cache.u + s * stride;
    const A* ut[G];
    V acc[G], tot[G];
    for (int j = 0; j < G; ++j) {
      ut[j] = cache.u + targets[j] * stride;
      acc[j] = tot[j] = V(A(0));
    }
    int blocked = 0;
    for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
      V ps = load_full<A, A, W>(ps_row + k.c) * r;
      if (masked(k)) ps = ps * lane_mask<A, W>(k.skip, k.rem);
      const V us = load_full<A, A, W>(us_row + k.c);
      for (int j = 0; j < G; ++j) acc[j] += ps * (us - load_full<A, A, W>(ut[j] + k.c));
      if (++blocked == kCascade) {  // cascade summation, as in node_sums
        for (int j = 0; j < G; ++j) {
          tot[j] += acc[j];
          acc[j] = V(A(0));
        }
        blocked = 0;
      }
    });
    for (int j = 0; j < G; ++j) D[s * MAXM + targets[j]] = hsum(tot[j] + acc[j]);
  }

  // Statistics (stored for the backward) and per-sample losses of samples [b0, b1).
  KTG_HD static void forward_range(const ForwardArgs<S, A>& a, const Cache& cache, int64_t b0,
                                   int64_t b1) {
    const Plan& plan = *a.plan;
    const int M = plan.M;
    const int E = plan.num_edges;
    const int64_t B = a.B, C = a.C;
    const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
    const Mode mode = mode_of(plan);
    const uint32_t all = (uint32_t(1) << M) - 1u;
    uint32_t correct_sources = 0;
    for (int t = 0; t < M; ++t) correct_sources |= plan.correct_in[t];
    RawStat raw[kMaxNodes];
    NodeStat<A> st[kMaxNodes];
    A correct[kMaxNodes], ce[kMaxNodes], r1[kMaxNodes], rT[kMaxNodes];
    A D[MAXM * MAXM];
    V Dv[kMaxEdges], Dt[kMaxEdges];
    V u[kMaxNodes], pT[kMaxNodes];
    for (int64_t b = b0; b < b1; ++b) {
      // -2: no class (soft targets and no correct gate); an argmax is never below -1.
      const int64_t yb = a.y ? a.y[b] : (a.soft && correct_sources ? target_argmax(a.soft + b * C, C) : -2);
      for (int n = 0; n < M; ++n) {
        int64_t arg = -1;
        raw[n] = sums_of(a.z.row(n, b), a.limit[n], C, plan, mode,
                         has_bit(correct_sources, n) ? &arg : nullptr, cache, n);
        correct[n] = arg == yb ? A(1) : A(0);
      }
      finalize_nodes(plan, all, raw, st, r1, rT);
      for (int n = 0; n < M; ++n) store_stat(a.stats, B, n, b, st[n], correct[n]);
      if (a.soft) {
        const A* yrow = a.soft + b * C;
        for (int t = 0; t < M; ++t) {
          if (has_bit(plan.label_mask, t)) ce[t] = soft_label_ce(a.z.row(t, b), a.limit[t], yrow, C, st[t]);
        }
      } else {
        for (int t = 0; t < M; ++t) {
          if (has_bit(plan.label_mask, t)) ce[t] = label_ce(st[t], static_cast<A>(a.z.row(t, b)[yb]));
        }
      }
      if (E > 0 && cache.eT) {
        edge_sums_by_source(a, cache, b, st, rT, D);
      } else if (E > 0) {
        for (int e = 0; e < E; ++e) Dv[e] = Dt[e] = V(A(0));
        int blocked = 0;
        for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
          load_shifted(a.z, a.limit, b, k, plan, kd_nodes, st, u);
          source_probs(plan, st, u, cache, rT, k, pT);
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
      sample_losses<MAXM>(plan, st, ce, D, correct, true, a.progress, a.per_sample + b * M);
    }
  }

  // Gradients of samples [b0, b1): one pass over the logits, from the forward's statistics.
  KTG_HD static void backward_range(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {
    const Plan& plan = *a.plan;
    const int M = plan.M;
    const int64_t B = a.B, C = a.C;
    const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
    const uint32_t needed = plan.target_mask | plan.source_mask;
    const A inv_b = A(1) / static_cast<A>(B);
    const I iota = lane_index<A, W>();
    NodeStat<A> st[kMaxNodes];
    A correct[kMaxNodes], sq[kMaxNodes];
    // The coefficients are the same for every sample but for the correct gates' masks:
    // computed once, then only the correct edges are updated per sample.
    SampleCoef<A, MAXM> base{}, coef;
    for (int n = 0; n < M; ++n) correct[n] = A(1);
    make_coefficients<MAXM>(plan, correct, a.grad_losses, inv_b, a.progress, base);
    coef = base;
    bool any_correct = false;
    for (int t = 0; t < M; ++t) any_correct |= plan.correct_in[t] != 0;
    V u[kMaxNodes], pT[kMaxNodes], p1[kMaxNodes], g[kMaxNodes];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t yb = a.soft ? 0 : a.y[b];
      for (int n = 0; n < M; ++n) {
        correct[n] = a.stats[(n * B + b) * kStatCols + kStatCorrect];
        if (!has_bit(needed, n)) continue;
        st[n] = load_stat(a.stats, B, n, b);
        if (plan.square_temperature) sq[n] = square_factor(st[n]);
      }
      for (int t = 0; t < M; ++t) {
        if (!has_bit(plan.target_mask, t))
          std::memset(static_cast<void*>(a.grad.row(t, b, C)), 0, sizeof(S) * C);
      }
      if (!plan.target_mask) continue;
      if (any_correct) {
        for (int t = 0; t < M; ++t) {
          for (uint32_t m = plan.correct_in[t]; m; m &= m - 1) {
            const int s = __builtin_ctz(m);
            coef.kd[t][s] = base.kd[t][s] * correct[s];
          }
        }
      }
      const A* yrow = a.soft ? a.soft + b * C : nullptr;
      A inv_ysum = A(1);
      if (yrow && plan.label_mask) {  // the label weight times Σy, delta = y / Σy (ktg_loss.h)
        const A ysum = target_sum(yrow, C);
        inv_ysum = inverse_target_sum(ysum);
        for (int t = 0; t < M; ++t) coef.label_w[t] = base.label_w[t] * ysum;
      }
      for_chunks<L>(C, [&](const Chunk& k) KTG_LAMBDA_INLINE {
        load_shifted(a.z, a.limit, b, k, plan, needed, st, u);
        class_probs<MAXM>(plan, st, sq, u, kd_nodes, plan.label_mask, pT, p1);
        const V delta = yrow ? load_target(yrow, k) * inv_ysum
                             : V(iota + static_cast<Int>(k.c) == static_cast<Int>(yb) ? R{} + A(1) : R{});
        class_grads_edges<MAXM>(plan, coef, pT, p1, delta, g);
        for (int t = 0; t < M; ++t) {
          if (!has_bit(plan.target_mask, t)) continue;
          S* p = a.grad.row(t, b, C) + k.c;
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

template <class S, class A, int W>
KTG_HD void forward_impl(const ForwardArgs<S, A>& a, A* scratch, int64_t b0, int64_t b1) {
  using K = CpuKernel<S, A, W>;
  K::forward_range(a, K::make_cache(scratch, *a.plan, a.C), b0, b1);
}

template <class S, class A, int W>
KTG_HD void backward_impl(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {
  CpuKernel<S, A, W>::backward_range(a, b0, b1);
}

// Non-template entry points, one per dtype and ISA, and their dispatchers.
#if KTG_MULTI_ISA
#define KTG_DEFINE_RANGES(S, A)                                                                 \
  KTG_TARGET_AVX512 void forward_avx512(const ForwardArgs<S, A>& a, A* s, int64_t b0, int64_t b1) { \
    forward_impl<S, A, 64>(a, s, b0, b1);                                                       \
  }                                                                                             \
  KTG_TARGET_AVX2 void forward_avx2(const ForwardArgs<S, A>& a, A* s, int64_t b0, int64_t b1) {     \
    forward_impl<S, A, 32>(a, s, b0, b1);                                                       \
  }                                                                                             \
  void forward_base(const ForwardArgs<S, A>& a, A* s, int64_t b0, int64_t b1) {                     \
    forward_impl<S, A, 16>(a, s, b0, b1);                                                       \
  }                                                                                             \
  void forward_range(const ForwardArgs<S, A>& a, A* s, int64_t b0, int64_t b1) {                    \
    switch (cpu_isa()) {                                                                        \
      case Isa::kAvx512: return forward_avx512(a, s, b0, b1);                                   \
      case Isa::kAvx2: return forward_avx2(a, s, b0, b1);                                       \
      default: return forward_base(a, s, b0, b1);                                               \
    }                                                                                           \
  }                                                                                             \
  KTG_TARGET_AVX512 void backward_avx512(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {     \
    backward_impl<S, A, 64>(a, b0, b1);                                                         \
  }                                                                                             \
  KTG_TARGET_AVX2 void backward_avx2(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {         \
    backward_impl<S, A, 32>(a, b0, b1);                                                         \
  }                                                                                             \
  void backward_base(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {                         \
    backward_impl<S, A, 16>(a, b0, b1);                                                         \
  }                                                                                             \
  void backward_range(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {                        \
    switch (cpu_isa()) {                                                                        \
      case Isa::kAvx512: return backward_avx512(a, b0, b1);                                     \
      case Isa::kAvx2: return backward_avx2(a, b0, b1);                                         \
      default: return backward_base(a, b0, b1);                                                 \
    }                                                                                           \
  }
#else
#define KTG_DEFINE_RANGES(S, A)                                                                 \
  void forward_range(const ForwardArgs<S, A>& a, A* s, int64_t b0, int64_t b1) {                    \
    forward_impl<S, A, 16>(a, s, b0, b1);                                                       \
  }                                                                                             \
  void backward_range(const BackwardArgs<S, A>& a, int64_t b0, int64_t b1) {                        \
    backward_impl<S, A, 16>(a, b0, b1);                                                         \
  }
#endif

KTG_DEFINE_RANGES(float, float)
KTG_DEFINE_RANGES(double, double)
KTG_DEFINE_RANGES(c10::Half, float)
KTG_DEFINE_RANGES(c10::BFloat16, float)

template <class S>
using acc_of = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

namespace {

// On the CPU a bad label is an error (the CUDA kernels cannot raise; they give NaN).
void check_label_range(const at::Tensor& labels, int64_t C, const char* op) {
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < labels.numel(); ++b) {
    TORCH_CHECK_INDEX(y[b] >= 0 && y[b] < C, op, ": label ", y[b], " of sample ", b,
                      " is outside [0, C) with C = ", C);
  }
}

// Per-thread buffers grown once and reused across calls: the forward's exp cache and
// per-sample losses cost no allocation per step.
template <class A, int Slot>
A* thread_buffer(int64_t n) {
  if (n == 0) return nullptr;
  static thread_local std::vector<A> buffer;
  if (static_cast<int64_t>(buffer.size()) < n) buffer.resize(n);
  return buffer.data();
}

// Samples per task. Below about 32k logits per task a thread's start-up costs more than
// its share of the work, so small calls run on the calling thread alone.
int64_t grain_size(int64_t M, int64_t C) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, M * C));
}

const at::Tensor& logits_of(at::TensorList logits) { return logits[0]; }

// The end of each node's storage, for the kernels' whole-vector reads of short rows.
template <class S>
void row_limits(const Call& call, const S** limit) {
  for (int64_t n = 0; n < call.M; ++n) {
    const at::Tensor& t = call.rows[call.stacked ? 0 : n];
    const auto& storage = t.storage();
    limit[n] = reinterpret_cast<const S*>(static_cast<const char*>(storage.data()) + storage.nbytes());
  }
}

std::tuple<at::Tensor, at::Tensor> ktg_loss_forward_cpu(at::TensorList logits,
                                                        const at::Tensor& labels_in,
                                                        c10::IntArrayRef gates, double temperature,
                                                        double progress,
                                                        const std::optional<at::Tensor>& progress_tensor) {
  const char* op = "timm_dcl::ktg_loss_forward";
  Call call = prepare_call(logits, labels_in, gates, temperature, progress, progress_tensor, op);
  // Soft targets: the kernel finds their classes itself (CpuKernel::target_argmax).
  const int64_t M = call.M, B = call.B, C = call.C;
  if (!call.soft) check_label_range(call.labels, C, op);
  const at::Tensor& z0 = logits_of(logits);
  const Progress prog = resolve_progress(progress, progress_tensor, z0.device());
  const auto acc_opts = z0.options().dtype(accumulate_type(z0.scalar_type()));
  at::Tensor losses = at::empty({M}, acc_opts);
  at::Tensor stats = at::empty({M, B, kStatCols}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "ktg_loss_forward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    acc_t* ps = thread_buffer<acc_t, 0>(B * M);
    ForwardArgs<scalar_t, acc_t> args{call.node_rows<scalar_t>(), {}, call.label_ptr(), call.target_ptr<acc_t>(),
                                      B, C, &call.plan, stats.mutable_data_ptr<acc_t>(), ps,
                                      prog.load<acc_t>()};
    row_limits(call, args.limit);
    const int64_t scratch = CpuKernel<scalar_t, acc_t, 16>::scratch_size(call.plan, C);
    const int64_t grain = grain_size(M, C);
    if (B <= grain) {
      forward_range(args, thread_buffer<acc_t, 1>(scratch), 0, B);
    } else {
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
        forward_range(args, thread_buffer<acc_t, 1>(scratch), b0, b1);
      });
    }
    acc_t* out = losses.mutable_data_ptr<acc_t>();
    for (int64_t t = 0; t < M; ++t) {
      double sum = 0.0;  // fixed order: bit-identical for any thread count
      for (int64_t b = 0; b < B; ++b) sum += static_cast<double>(ps[b * M + t]);
      out[t] = static_cast<acc_t>(sum / static_cast<double>(B));
    }
  });
  return std::make_tuple(losses, stats);
}

std::vector<at::Tensor> ktg_loss_backward_cpu(const at::Tensor& grad_losses_in, at::TensorList logits,
                                              const at::Tensor& labels_in, const at::Tensor& stats_in,
                                              c10::IntArrayRef gates, double temperature, double progress,
                                              const std::optional<at::Tensor>& progress_tensor) {
  const char* op = "timm_dcl::ktg_loss_backward";
  const Call call = prepare_call(logits, labels_in, gates, temperature, progress, progress_tensor, op);
  const at::Tensor& z0 = logits_of(logits);
  check_backward_extras(call, grad_losses_in, stats_in, z0.scalar_type(), z0.device(), op);
  const int64_t M = call.M, B = call.B, C = call.C;
  if (!call.soft) check_label_range(call.labels, C, op);
  const Progress prog = resolve_progress(progress, progress_tensor, z0.device());
  const auto acc = accumulate_type(z0.scalar_type());
  // Read in place with its stride (the backward of losses.sum() hands over a stride-0 view).
  const at::Tensor grad_losses = grad_losses_in.scalar_type() == acc ? grad_losses_in : grad_losses_in.to(acc);
  const at::Tensor stats = stats_in.contiguous();
  std::vector<at::Tensor> grads = make_grads(call, z0.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "ktg_loss_backward_cpu", [&] {
    using acc_t = acc_of<scalar_t>;
    BackwardArgs<scalar_t, acc_t> args{
        StridedVec<acc_t>{grad_losses.const_data_ptr<acc_t>(), grad_losses.stride(0)},
        call.node_rows<scalar_t>(), {}, call.label_ptr(), call.target_ptr<acc_t>(), stats.const_data_ptr<acc_t>(),
        B, C, &call.plan, grad_rows<scalar_t>(call, grads), prog.load<acc_t>()};
    row_limits(call, args.limit);
    const int64_t grain = grain_size(M, C);
    if (B <= grain) {
      backward_range(args, 0, B);
    } else {
      at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { backward_range(args, b0, b1); });
    }
  });
  return grads;
}

}  // namespace
}  // namespace ktg

TORCH_LIBRARY_IMPL(timm_dcl, CPU, m) {
  m.impl("ktg_loss_forward", &ktg::ktg_loss_forward_cpu);
  m.impl("ktg_loss_backward", &ktg::ktg_loss_backward_cpu);
}
