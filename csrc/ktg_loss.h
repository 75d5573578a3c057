// Math shared by the CPU (ktg_loss.cpp) and CUDA (ktg_loss_cuda.cu) kernels of the
// Knowledge Transfer Graph loss (SPEC §2).
//
// Everything here is header-only and compiled for both host and device, so the two
// backends evaluate the same formulas; the kernel files add only the thread layout,
// the memory traffic and the reductions. The per-class helpers are templates over a
// "value" type V: a scalar on the GPU (one thread per class) and a SIMD lane vector on
// the CPU (defined in ktg_loss.cpp), so the lane code is the same source.
//
// Shifted statistics. For node n of one sample let mx = max_c z_c, and
//   ls1 = log Σ_c exp(z_c − mx),   lsT = log Σ_c exp((z_c − mx)/T).
// Then logsumexp(z) = mx + ls1 and logsumexp(z/T) = mx/T + lsT. Keeping (mx, ls) apart
// instead of their sum matters in float32: for logits of 1e4 the sum would round to a
// multiple of 1e-3 and the softmax rebuilt from it would lose three digits. The forward
// stores the three unrounded (see kStatCols), so the backward makes one pass over the
// logits. With u_c = z_c − mx the probabilities are exp(u_c/T − lsT), and
//   T²·KL(p_s || q_t) = T·Σ_c p_s,c (u_s,c − u_t,c) + T²·(lsT_t − lsT_s)
// where the logits are subtracted before they are weighted and both terms stay small.
//
// Exponentials: one per logit and node where T = 1 (exp(u) serves both softmaxes), and
// at T = 2 (exp(u) = exp(u/2)²); two (exp(u), exp(u/T)) for other T, never more.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>

#if defined(__CUDACC__)
#define KTG_HD __host__ __device__ __forceinline__
#define KTG_UNROLL _Pragma("unroll")
#elif defined(_MSC_VER)
#define KTG_HD __forceinline
#define KTG_UNROLL
#else
#define KTG_HD inline __attribute__((always_inline))
#define KTG_UNROLL
#endif

namespace ktg {

// The fused kernels handle at most this many nodes (M). The Python wrapper falls back
// to the reference implementation above it. Gate masks are 32-bit, so this is ≤ 32.
constexpr int kMaxNodes = 16;

// Gate codes: the ABI of timm_dcl/gates.py (Gate IntEnum). Change both or neither.
enum GateCode : int { kThrough = 0, kCutoff = 1, kLinear = 2, kCorrect = 3, kNumGateCodes = 4 };

// Columns of the forward's per-node, per-sample statistics [M, B, kStatCols], kept for
// the backward: max, log Σ exp(z − max), log Σ exp((z − max)/T), and 1 if argmax = label
// (the CPU kernel finds the argmax only of nodes that teach through a correct gate, the
// only ones whose flag is read, and writes 0 for the others).
enum StatCol : int { kStatMax = 0, kStatLs1 = 1, kStatLsT = 2, kStatCorrect = 3, kStatCols = 4 };

KTG_HD bool has_bit(uint32_t mask, int i) { return (mask >> i) & 1u; }

// The decoded gate matrix of one graph. It holds no gate weights: cutoff edges are
// simply absent, through and correct weigh 1, and linear edges weigh `progress`, which
// the kernels read per call (possibly from device memory), so one plan serves every
// step. Plain data, passed by value to the CUDA kernels.
struct Plan {
  int M;
  double temperature;
  double inv_temperature;
  bool unit_temperature;          // T == 1: the tempered and plain softmax coincide
  bool square_temperature;        // T == 2: exp(u) = exp(u/T)²
  uint32_t label_mask;            // bit t: the label edge into t is open
  uint32_t kd_in[kMaxNodes];      // bit s of kd_in[t]: the knowledge edge s→t (s≠t) is open
  uint32_t correct_in[kMaxNodes]; // bit s of correct_in[t]: that edge is a correct gate
  uint32_t linear_in[kMaxNodes];  // bit s of linear_in[t]: the edge s→t (s = t: label) is linear
  uint32_t source_mask;           // nodes that teach through at least one open edge
  uint32_t kd_target_mask;        // nodes that learn through at least one open knowledge edge
  uint32_t target_mask;           // nodes with at least one open incoming edge
  // The open knowledge edges as a compact list ordered by target, then source: edge e
  // goes edge_src[e] → edge_tgt[e]; the edges into t are [edge_begin[t], edge_begin[t+1]).
  // The CPU loops over it; the GPU uses the masks with unrolled loops instead, because a
  // register array cannot be indexed by a runtime value.
  int num_edges;
  uint8_t edge_src[kMaxNodes * (kMaxNodes - 1)];
  uint8_t edge_tgt[kMaxNodes * (kMaxNodes - 1)];
  uint8_t edge_begin[kMaxNodes + 1];
};

// Weight of the open edge s → t (s = t: the label edge).
template <class A>
KTG_HD A edge_weight(const Plan& p, int t, int s, A progress) {
  return has_bit(p.linear_in[t], s) ? progress : A(1);
}

// codes: M*M gate codes, row-major, codes[t*M + s] = gate of the edge s → t. The caller
// has validated M ≤ kMaxNodes, the codes and the temperature.
inline Plan make_plan(const int64_t* codes, int M, double temperature) {
  Plan p;
  std::memset(&p, 0, sizeof(p));
  p.M = M;
  p.temperature = temperature;
  p.inv_temperature = 1.0 / temperature;
  p.unit_temperature = temperature == 1.0;
  p.square_temperature = temperature == 2.0;
  for (int t = 0; t < M; ++t) {
    for (int s = 0; s < M; ++s) {
      const int code = static_cast<int>(codes[t * M + s]);
      if (code == kCutoff) continue;
      p.target_mask |= 1u << t;
      if (code == kLinear) p.linear_in[t] |= 1u << s;
      if (s == t) {
        p.label_mask |= 1u << t;  // "correct" on the diagonal is "through": the label is right
      } else {
        p.kd_in[t] |= 1u << s;
        p.source_mask |= 1u << s;
        p.kd_target_mask |= 1u << t;
        if (code == kCorrect) p.correct_in[t] |= 1u << s;
      }
    }
  }
  for (int t = 0; t < M; ++t) {
    p.edge_begin[t] = static_cast<uint8_t>(p.num_edges);
    for (int s = 0; s < M; ++s) {
      if (!((p.kd_in[t] >> s) & 1u)) continue;
      p.edge_src[p.num_edges] = static_cast<uint8_t>(s);
      p.edge_tgt[p.num_edges] = static_cast<uint8_t>(t);
      ++p.num_edges;
    }
  }
  p.edge_begin[M] = static_cast<uint8_t>(p.num_edges);
  return p;
}

// The logits of the M nodes without stacking them: node n's row of sample b is the C
// contiguous values at row(n, b). Covers one [M, B, C] tensor (any strides of the first
// two dimensions) and M separate [B, C] tensors alike.
template <class S>
struct NodeRows {
  const S* ptr[kMaxNodes];
  int64_t stride[kMaxNodes];  // elements between samples
  KTG_HD const S* row(int n, int64_t b) const { return ptr[n] + b * stride[n]; }
};

// The gradient rows: node n's row of sample b is the C values at ptr[n] + b * C.
template <class S>
struct GradRows {
  S* ptr[kMaxNodes];
  KTG_HD S* row(int n, int64_t b, int64_t C) const { return ptr[n] + b * C; }
};

// The weight of linear gates, k/K: a value, or a 0-d tensor the kernel reads itself (so
// a compiled training step can feed a new value every call, and a CUDA kernel can read
// it from device memory without a synchronisation).
struct Progress {
  double value;
  const void* ptr;  // when set: a float64 (is_double) or float32 scalar, read instead
  bool is_double;
  template <class A>
  KTG_HD A load() const {
    if (!ptr) return static_cast<A>(value);
    return is_double ? static_cast<A>(*static_cast<const double*>(ptr))
                     : static_cast<A>(*static_cast<const float*>(ptr));
  }
};

// grad_losses [M] as autograd hands it over: possibly strided (the stride-0 expansion
// that the backward of losses.sum() produces), read in place instead of copied.
template <class A>
struct StridedVec {
  const A* ptr;
  int64_t stride;
  KTG_HD A operator[](int i) const { return ptr[i * stride]; }
};

// ---------------------------------------------------------------------------------
// exp / log. float: a branch-free Cephes-style exp (Cody–Waite reduction, degree-6
// polynomial, ≤ 2 ulp on the range used) that the CPU compiler can vectorise and the
// GPU evaluates with FMAs; it is exact enough (~2e-7 relative) that no fast-math
// intrinsic is needed. Inputs below kExpLo give 0, inputs above kExpHi saturate at
// exp(kExpHi), NaN stays NaN. double: the C library, full precision.
// ---------------------------------------------------------------------------------
constexpr float kExpLo = -87.0f;
constexpr float kExpHi = 88.0f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRoundMagic = 12582912.0f;  // 1.5·2^23: adding it rounds to an integer
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500e-4f;
constexpr float kExpP1 = 1.3981999507e-3f;
constexpr float kExpP2 = 8.3334519073e-3f;
constexpr float kExpP3 = 4.1665795894e-2f;
constexpr float kExpP4 = 1.6666665459e-1f;
constexpr float kExpP5 = 5.0000001201e-1f;

// exp(r) for |r| ≤ ln2/2; V is float or a GCC float vector (ktg_loss.cpp).
template <class V>
KTG_HD V exp_poly(V r) {
  V p = r * kExpP0 + kExpP1;
  p = p * r + kExpP2;
  p = p * r + kExpP3;
  p = p * r + kExpP4;
  p = p * r + kExpP5;
  return p * r * r + r + 1.0f;
}

KTG_HD float pow2_int(int n) {  // 2^n for n in [-126, 127]
  const int32_t bits = (n + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

KTG_HD float ktg_exp(float x) {
  float xc = x > kExpLo ? x : kExpLo;  // also maps NaN to a finite value: no UB below
  xc = xc < kExpHi ? xc : kExpHi;
  const float n = (xc * kLog2e + kRoundMagic) - kRoundMagic;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float y = exp_poly(r) * pow2_int(static_cast<int>(n));
  y = x < kExpLo ? 0.0f : y;
  return x != x ? x : y;
}

KTG_HD double ktg_exp(double x) { return ::exp(x); }
KTG_HD float ktg_log(float x) { return ::logf(x); }
KTG_HD double ktg_log(double x) { return ::log(x); }

// INFINITY / NAN rather than std::numeric_limits: usable in device code without
// --expt-relaxed-constexpr.
template <class A>
KTG_HD A neg_infinity() { return -static_cast<A>(INFINITY); }

template <class A>
KTG_HD A quiet_nan() { return static_cast<A>(NAN); }

// ---------------------------------------------------------------------------------
// Per-node statistics of one sample.
// ---------------------------------------------------------------------------------
template <class A>
struct NodeStat {
  A mx;   // max_c z_c
  A ls1;  // log Σ exp(z − mx)
  A lsT;  // log Σ exp((z − mx)/T)
};

// The statistics the forward stored for node n of sample b (stats: [M, B, kStatCols]).
template <class A>
KTG_HD NodeStat<A> load_stat(const A* stats, int64_t B, int n, int64_t b) {
  const A* sp = stats + (n * B + b) * kStatCols;
  NodeStat<A> st;
  st.mx = sp[kStatMax];
  st.ls1 = sp[kStatLs1];
  st.lsT = sp[kStatLsT];
  return st;
}

template <class A>
KTG_HD void store_stat(A* stats, int64_t B, int n, int64_t b, const NodeStat<A>& st, A correct) {
  A* sp = stats + (n * B + b) * kStatCols;
  sp[kStatMax] = st.mx;
  sp[kStatLs1] = st.ls1;
  sp[kStatLsT] = st.lsT;
  sp[kStatCorrect] = correct;
}

// A running (online) max / sum-exp / first-argmax over some classes, for layouts that
// see each class once (the GPU). `bad` collects z − z, which is NaN exactly when a
// logit is ±inf or NaN; it is added to the logs at the end so that a non-finite logit
// makes its node's statistics (and everything computed from them) NaN. sT is kept only
// when T ≠ 1 (`unit` false): at T = 1 it equals s1, and each class costs one exp.
template <class A>
struct RunningLse {
  A m;
  A s1;
  A sT;
  A bad;
  int64_t arg;  // first index of the maximum; INT64_MAX when nothing was seen
};

template <class A>
KTG_HD void lse_init(RunningLse<A>& r) {
  r.m = neg_infinity<A>();
  r.s1 = A(0);
  r.sT = A(0);
  r.bad = A(0);
  r.arg = INT64_MAX;
}

// Add class c with logit v. Classes must arrive in increasing c per accumulator so the
// strict comparison keeps the lowest index on ties.
template <class A>
KTG_HD void lse_push(RunningLse<A>& r, A v, int64_t c, A inv_t, bool unit) {
  r.bad += v - v;
  const bool up = v > r.m;
  // A new maximum rescales the sums by exp(m − v); otherwise the class adds exp(v − m).
  // Either way one exp of the same argument serves the plain sum.
  const A d = up ? r.m - v : v - r.m;  // −inf on the first finite class: exp gives 0
  const A e = ktg_exp(d);
  if (up) {
    r.s1 = r.s1 * e + A(1);
    if (!unit) r.sT = r.sT * ktg_exp(d * inv_t) + A(1);
    r.m = v;
    r.arg = c;
  } else {
    r.s1 += e;
    if (!unit) r.sT += ktg_exp(d * inv_t);
  }
}

// a ← a ∪ b. Ties of the maximum keep the lower class index.
template <class A>
KTG_HD void lse_merge(RunningLse<A>& a, const RunningLse<A>& b, A inv_t, bool unit) {
  a.bad += b.bad;
  if (b.arg == INT64_MAX) return;  // b saw nothing
  if (a.arg == INT64_MAX) {
    a.m = b.m; a.s1 = b.s1; a.sT = b.sT; a.arg = b.arg;
    return;
  }
  const bool take_b = b.m > a.m || (b.m == a.m && b.arg < a.arg);
  const A m = take_b ? b.m : a.m;
  const A da = a.m - m, db = b.m - m;
  a.s1 = a.s1 * ktg_exp(da) + b.s1 * ktg_exp(db);
  if (!unit) a.sT = a.sT * ktg_exp(da * inv_t) + b.sT * ktg_exp(db * inv_t);
  a.m = m;
  a.arg = take_b ? b.arg : a.arg;
}

template <class A>
KTG_HD NodeStat<A> stat_from_logs(A mx, A log_s1, A log_sT, A bad, bool unit_temperature) {
  NodeStat<A> st;
  st.mx = mx;
  st.ls1 = log_s1 + bad;
  st.lsT = unit_temperature ? st.ls1 : log_sT + bad;
  return st;
}

template <class A>
KTG_HD NodeStat<A> finalize_stat(A mx, A s1, A sT, A bad, bool unit_temperature) {
  return stat_from_logs(mx, ktg_log(s1), unit_temperature ? A(0) : ktg_log(sT), bad,
                        unit_temperature);
}

// ---------------------------------------------------------------------------------
// Per-class work. MAXM is a compile-time bound on M (kMaxNodes on the CPU, a smaller
// bucket on the GPU so the per-node arrays live in registers); loops run to MAXM and
// test s < M so the GPU can unroll them with constant indices.
// ---------------------------------------------------------------------------------

// exp(2·lsT − ls1) of a node at T = 2: softmax(z) = softmax(z/2)² · that, so the
// backward needs one exp per logit for both softmaxes. It is ≥ 1 (and ≤ C).
template <class A>
KTG_HD A square_factor(const NodeStat<A>& st) { return ktg_exp(A(2) * st.lsT - st.ls1); }

// Probabilities of one class: pT[n] = softmax(z_n/T) for nodes in t_mask, p1[n] =
// softmax(z_n) for nodes in one_mask. u[n] = z_n − mx_n; sq[n] = square_factor (read
// only at T = 2 for nodes in both masks).
template <int MAXM, class V, class A>
KTG_HD void class_probs(const Plan& plan, const NodeStat<A>* st, const A* sq, const V* u,
                        uint32_t t_mask, uint32_t one_mask, V* pT, V* p1) {
  const A inv_t = static_cast<A>(plan.inv_temperature);
  KTG_UNROLL
  for (int n = 0; n < MAXM; ++n) {
    if (n >= plan.M) break;
    if (has_bit(t_mask, n)) pT[n] = ktg_exp(u[n] * inv_t - st[n].lsT);
    if (has_bit(one_mask, n)) {
      if (plan.unit_temperature && has_bit(t_mask, n)) {
        p1[n] = pT[n];
      } else if (plan.square_temperature && has_bit(t_mask, n)) {
        p1[n] = pT[n] * pT[n] * sq[n];
      } else {
        p1[n] = ktg_exp(u[n] - st[n].ls1);
      }
    }
  }
}

// D[s*MAXM + t] += p_s · (u_s − u_t) for every open knowledge edge s → t.
template <int MAXM, class V>
KTG_HD void accumulate_kd(const Plan& plan, const V* u, const V* pT, V* D) {
  KTG_UNROLL
  for (int s = 0; s < MAXM; ++s) {
    if (s >= plan.M) break;
    if (!has_bit(plan.source_mask, s)) continue;
    KTG_UNROLL
    for (int t = 0; t < MAXM; ++t) {
      if (t >= plan.M) break;
      if (has_bit(plan.kd_in[t], s)) D[s * MAXM + t] += pT[s] * (u[s] - u[t]);
    }
  }
}

// The edges out of one source s only: Ds[t] += p_s · (u_s − u_t). For layouts that loop
// over the sources at run time and keep MAXM accumulators rather than MAXM².
template <int MAXM, class V>
KTG_HD void accumulate_kd_from(const Plan& plan, int s, const V* u, const V& ps, V* Ds) {
  KTG_UNROLL
  for (int t = 0; t < MAXM; ++t) {
    if (t >= plan.M) break;
    if (has_bit(plan.kd_in[t], s)) Ds[t] += ps * (u[s] - u[t]);
  }
}

// The same over the compact edge list: D[e] += p_src · (u_src − u_tgt).
template <class V>
KTG_HD void accumulate_kd_edges(const Plan& plan, const V* u, const V* pT, V* D) {
  for (int e = 0; e < plan.num_edges; ++e) {
    const int s = plan.edge_src[e], t = plan.edge_tgt[e];
    D[e] += pT[s] * (u[s] - u[t]);
  }
}

// Everything the backward needs per sample besides the probabilities.
template <class A, int MAXM>
struct SampleCoef {
  A scale[MAXM];         // grad_losses[t] / B
  A label_w[MAXM];       // weight of the open label edge into t (0 when cut)
  A kd[MAXM][MAXM];      // kd[t][s] = T · w_ts · m_s for open knowledge edges
};

template <int MAXM, class A>
KTG_HD void make_coefficients(const Plan& plan, const A* correct, StridedVec<A> grad_losses,
                              A inv_b, A progress, SampleCoef<A, MAXM>& k) {
  const A temp = static_cast<A>(plan.temperature);
  for (int t = 0; t < plan.M; ++t) {
    k.scale[t] = grad_losses[t] * inv_b;
    k.label_w[t] = has_bit(plan.label_mask, t) ? edge_weight(plan, t, t, progress) : A(0);
    for (int s = 0; s < plan.M; ++s) {
      A w = A(0);
      if (has_bit(plan.kd_in[t], s)) {
        w = edge_weight(plan, t, s, progress);
        if (has_bit(plan.correct_in[t], s)) w *= correct[s];
      }
      k.kd[t][s] = temp * w;
    }
  }
}

// Gradient of Σ_t g_t·L_t with respect to z_t at one class, for every target t in
// plan.target_mask (sources are constants):
//   g_t/B · [ w_tt·(softmax(z_t) − onehot(y)) + T·Σ_s w_ts·m_s·(softmax(z_t/T) − softmax(z_s/T)) ]
// delta is 1 at the label's class and 0 elsewhere.
template <int MAXM, class V, class A>
KTG_HD void class_grads(const Plan& plan, const SampleCoef<A, MAXM>& k, const V* pT, const V* p1,
                        const V& delta, V* g) {
  KTG_UNROLL
  for (int t = 0; t < MAXM; ++t) {
    if (t >= plan.M) break;
    if (!has_bit(plan.target_mask, t)) continue;
    V acc = V(A(0));
    if (has_bit(plan.label_mask, t)) acc = k.label_w[t] * (p1[t] - delta);
    KTG_UNROLL
    for (int s = 0; s < MAXM; ++s) {
      if (s >= plan.M) break;
      if (has_bit(plan.kd_in[t], s)) acc += k.kd[t][s] * (pT[t] - pT[s]);
    }
    g[t] = k.scale[t] * acc;
  }
}

// The same over the compact edge list (same summation order: sources ascending).
template <int MAXM, class V, class A>
KTG_HD void class_grads_edges(const Plan& plan, const SampleCoef<A, MAXM>& k, const V* pT,
                              const V* p1, const V& delta, V* g) {
  for (int t = 0; t < plan.M; ++t) {
    if (!has_bit(plan.target_mask, t)) continue;
    V acc = V(A(0));
    if (has_bit(plan.label_mask, t)) acc = k.label_w[t] * (p1[t] - delta);
    for (int e = plan.edge_begin[t]; e < plan.edge_begin[t + 1]; ++e) {
      const int s = plan.edge_src[e];
      acc += k.kd[t][s] * (pT[t] - pT[s]);
    }
    g[t] = k.scale[t] * acc;
  }
}

// ---------------------------------------------------------------------------------
// Per-sample losses. out[t] = Σ_s w_ts · m_s · l^{s→t} for this sample (the caller sums
// over the batch in a fixed order and divides by the whole B, correct gates included).
//   ce[t]: label cross-entropy of t (read only for open label edges)
//   D[s*MAXM + t]: Σ_c p_s,c (u_s,c − u_t,c) (read only for open knowledge edges)
//   correct[n]: 1 if argmax z_n == y, else 0
// label_ok = false (a label outside [0, C) on the GPU) makes every open target's loss NaN.
// ---------------------------------------------------------------------------------
template <int MAXM, class A>
KTG_HD void sample_losses(const Plan& plan, const NodeStat<A>* st, const A* ce, const A* D,
                          const A* correct, bool label_ok, A progress, A* out) {
  const A temp = static_cast<A>(plan.temperature);
  for (int t = 0; t < plan.M; ++t) {
    A acc = A(0);
    if (has_bit(plan.label_mask, t)) acc += edge_weight(plan, t, t, progress) * ce[t];
    for (int s = 0; s < plan.M; ++s) {
      if (!has_bit(plan.kd_in[t], s)) continue;
      const A kl = temp * D[s * MAXM + t] + temp * temp * (st[t].lsT - st[s].lsT);
      A w = edge_weight(plan, t, s, progress);
      if (has_bit(plan.correct_in[t], s)) w *= correct[s];
      acc += w * kl;
    }
    if (!label_ok && has_bit(plan.target_mask, t)) acc = quiet_nan<A>();
    out[t] = acc;
  }
}

// Label cross-entropy from the shifted statistics: −log softmax(z)[y] = (mx − z_y) + ls1.
template <class A>
KTG_HD A label_ce(const NodeStat<A>& st, A z_label) { return (st.mx - z_label) + st.ls1; }

// Soft targets (y_c: target probabilities, what mixup and label smoothing give). The label
// edge is −Σ_c y_c log softmax(z)_c = Σ_c y_c · ((mx − z_c) + ls1): one class's term is the
// integer label's label_ce, so a one-hot y gives that value exactly (the other terms are
// exact zeros). Its gradient is (Σ_c y_c)·softmax(z) − y, which class_grads computes
// unchanged with the label weight scaled by Σy and delta = y / Σy (both exact when Σy = 1).
template <class V, class A>
KTG_HD V soft_ce_term(const NodeStat<A>& st, const V& z, const V& y) {
  return y * ((V(st.mx) - z) + V(st.ls1));
}

// 1/Σy, or 0 for an all-zero target (its loss and label gradient are then 0, not NaN).
template <class A>
KTG_HD A inverse_target_sum(A ysum) { return ysum != A(0) ? A(1) / ysum : A(0); }

}  // namespace ktg

// ---------------------------------------------------------------------------------
// Host side shared by both backends (defined in ktg_loss.cpp).
// ---------------------------------------------------------------------------------
#if defined(KTG_HOST_API)
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <vector>

namespace ktg {

// The validated arguments of one call, ready for a kernel launch.
struct Call {
  Plan plan;
  int64_t M, B, C;
  bool stacked;                         // logits came as one [M, B, C] tensor
  std::vector<at::Tensor> rows;         // what NodeRows points into (copies where needed)
  at::Tensor labels;                    // int64 [B], contiguous; soft targets on CUDA: their
                                        // argmax where a correct gate reads it (see
                                        // soft_target_classes; the CPU kernel finds it itself),
                                        // else undefined
  bool soft = false;                    // labels came as target probabilities [B, C]
  at::Tensor targets;                   // soft: [B, C] in the accumulation dtype, contiguous
  const int64_t* label_ptr() const {
    return labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
  }
  template <class A>
  const A* target_ptr() const {
    return soft ? targets.const_data_ptr<A>() : nullptr;
  }
  int64_t row_stride[kMaxNodes];
  int64_t node_offset[kMaxNodes];       // elements from rows[0 or n] to node n's data
  template <class S>
  NodeRows<S> node_rows() const {
    NodeRows<S> r;
    for (int64_t n = 0; n < M; ++n) {
      const at::Tensor& t = rows[stacked ? 0 : n];
      r.ptr[n] = static_cast<const S*>(t.const_data_ptr()) + node_offset[n];
      r.stride[n] = row_stride[n];
    }
    return r;
  }
};

// Validates the arguments of ktg_loss_forward / ktg_loss_backward (the logits as one
// [M, B, C] tensor or M tensors [B, C], labels, gates, temperature, progress) with the
// messages of timm_dcl/ops/inputs.py, and resolves them for the kernels. `op` names the
// op in the messages.
Call prepare_call(at::TensorList logits, const at::Tensor& labels, c10::IntArrayRef gates,
                  double temperature, double progress,
                  const std::optional<at::Tensor>& progress_tensor, const char* op);

// Soft targets: the class of each sample (argmax of its target, ties to the lowest class)
// into call.labels, where a correct gate needs it (the forward's correct flags); a no-op
// for integer labels and for graphs without correct gates.
void soft_target_classes(Call& call);

// What the autograd node keeps of the validated labels and passes to both kernels: the
// int64 labels, or the soft targets in the accumulation dtype (so no kernel converts them
// again).
inline const at::Tensor& kernel_labels(const Call& call) { return call.soft ? call.targets : call.labels; }

// The gradient buffers of a call (one [M, B, C] tensor, or M tensors [B, C]) and their rows.
std::vector<at::Tensor> make_grads(const Call& call, const at::TensorOptions& options);
template <class S>
GradRows<S> grad_rows(const Call& call, std::vector<at::Tensor>& grads) {
  GradRows<S> g;
  for (int64_t n = 0; n < call.M; ++n) {
    g.ptr[n] = call.stacked ? grads[0].mutable_data_ptr<S>() + n * call.B * call.C
                            : grads[n].mutable_data_ptr<S>();
  }
  return g;
}

// The progress of a call for a kernel on `device`: the value, or a pointer to the 0-d
// tensor when it lives on that device (a CPU tensor for a CUDA kernel is read here).
Progress resolve_progress(double progress, const std::optional<at::Tensor>& progress_tensor,
                          const c10::Device& device);

// Checks grad_losses [M] and stats [M, B, kStatCols] for the backward.
void check_backward_extras(const Call& call, const at::Tensor& grad_losses, const at::Tensor& stats,
                           at::ScalarType logits_type, const c10::Device& device, const char* op);

// float64 for double logits, float32 otherwise.
at::ScalarType accumulate_type(at::ScalarType logits_type);

}  // namespace ktg
#endif
