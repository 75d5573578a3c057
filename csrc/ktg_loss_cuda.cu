// CUDA kernels of the fused Knowledge Transfer Graph loss (SPEC §2). The math is in
// ktg_loss.h; this file adds the thread layout and the reductions.
//
// Layout: one block per sample, threads strided over the classes (any C: nothing is
// sized by C). Forward, one launch:
//   1. every thread keeps an online max / sum-exp / first-argmax per node over its
//      classes (one exp per logit at T = 1); a fixed-order block reduction gives each
//      node's statistics once, stored unrounded for the backward;
//   2. a second pass over the classes accumulates Σ_c p_s (u_s − u_t) for every open
//      knowledge edge in registers, reduced across the block in a fixed order (above
//      8 nodes one pass per source with M accumulators, not M² that would spill);
//   3. thread 0 combines the edges into per-sample losses and writes them to a
//      workspace; the last block to finish (integer atomic ticket after a
//      __threadfence; the ticket is zeroed by cudaMemsetAsync before the launch) sums
//      the workspace over the batch in a fixed order. No floating-point atomics, so the
//      result is deterministic.
// Backward, one launch and one pass over the logits: each thread writes the gradient of
// its classes for every node, from the statistics the forward stored.
// The logits are read through M row pointers (a list of M tensors is not stacked), and
// the progress of linear gates may be read from device memory (no host sync per step).
// Half precision is read directly and accumulated in float32; float64 stays double.
// A label outside [0, C) cannot raise here: it is never used as an index, and every open
// target's loss and gradient for that sample become NaN.
#define KTG_HOST_API
#include "ktg_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <tuple>
#include <type_traits>

namespace ktg {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <class S>
using acc_of = typename std::conditional<std::is_same<S, double>::value, double, float>::type;

template <class A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFullMask, v, o);
  return v;  // complete in lane 0
}

template <class A>
__device__ __forceinline__ void warp_merge(RunningLse<A>& r, A inv_t, bool unit, int lane) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    RunningLse<A> other;
    other.m = __shfl_down_sync(kFullMask, r.m, o);
    other.s1 = __shfl_down_sync(kFullMask, r.s1, o);
    other.sT = __shfl_down_sync(kFullMask, r.sT, o);
    other.bad = __shfl_down_sync(kFullMask, r.bad, o);
    other.arg = __shfl_down_sync(kFullMask, static_cast<long long>(r.arg), o);
    if (lane + o < 32) lse_merge(r, other, inv_t, unit);
  }  // complete in lane 0
}

// Fixed-order block sum of one value per thread; the result is valid in thread 0.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* s_warp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // s_warp may still be read from a previous call
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < nwarps; ++w) total += s_warp[w];
  }
  return total;
}

// Statistics of every node for sample b, into s_st (and the first argmax into s_arg).
// Every thread of the block must call it.
template <class S, class A, int MAXM>
__device__ __forceinline__ void sample_statistics(const NodeRows<S>& z, int64_t C, int64_t b,
                                                  const Plan& plan, RunningLse<A> (*s_lse)[MAXM],
                                                  NodeStat<A>* s_st, int64_t* s_arg) {
  const int M = plan.M;
  const bool unit = plan.unit_temperature;
  const A inv_t = static_cast<A>(plan.inv_temperature);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  RunningLse<A> r[MAXM];
#pragma unroll
  for (int n = 0; n < MAXM; ++n) lse_init(r[n]);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
#pragma unroll
    for (int n = 0; n < MAXM; ++n) {
      if (n < M) lse_push(r[n], static_cast<A>(z.row(n, b)[c]), c, inv_t, unit);
    }
  }
#pragma unroll
  for (int n = 0; n < MAXM; ++n) {
    if (n < M) {
      warp_merge(r[n], inv_t, unit, lane);
      if (lane == 0) s_lse[warp][n] = r[n];
    }
  }
  __syncthreads();
  const int n = threadIdx.x;
  if (n < M) {
    RunningLse<A> acc = s_lse[0][n];
    for (int w = 1; w < nwarps; ++w) lse_merge(acc, s_lse[w][n], inv_t, unit);
    s_st[n] = finalize_stat(acc.m, acc.s1, acc.sT, acc.bad, unit);
    s_arg[n] = acc.arg;
  }
  __syncthreads();
}

// Σ_c p_s,c (u_s,c − u_t,c) of every open knowledge edge s → t of sample b, into
// s_D[s*MAXM + t]. Up to 8 nodes: one pass with MAXM² accumulators in registers.
template <class S, class A, int MAXM>
__device__ __forceinline__ void edge_sums_all(const NodeRows<S>& z, int64_t C, int64_t b,
                                              const Plan& plan, const NodeStat<A>* s_st,
                                              A (*s_red)[MAXM * MAXM], A* s_D) {
  const int M = plan.M;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
  A D[MAXM * MAXM];
#pragma unroll
  for (int e = 0; e < MAXM * MAXM; ++e) D[e] = A(0);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A u[MAXM], pT[MAXM];
#pragma unroll
    for (int n = 0; n < MAXM; ++n) {
      if (n < M && has_bit(kd_nodes, n)) u[n] = static_cast<A>(z.row(n, b)[c]) - s_st[n].mx;
    }
    class_probs<MAXM>(plan, s_st, static_cast<const A*>(nullptr), u, plan.source_mask, 0u, pT,
                      static_cast<A*>(nullptr));
    accumulate_kd<MAXM>(plan, u, pT, D);
  }
#pragma unroll
  for (int s = 0; s < MAXM; ++s) {
#pragma unroll
    for (int t = 0; t < MAXM; ++t) {
      if (s < M && t < M && has_bit(plan.kd_in[t], s)) {
        const A v = warp_sum(D[s * MAXM + t]);
        if (lane == 0) s_red[warp][s * MAXM + t] = v;
      }
    }
  }
}

// The same above 8 nodes: one pass per source s with MAXM accumulators (the M² of the
// one-pass layout would spill registers to local memory).
template <class S, class A, int MAXM>
__device__ __forceinline__ void edge_sums_by_source(const NodeRows<S>& z, int64_t C, int64_t b,
                                                    const Plan& plan, const NodeStat<A>* s_st,
                                                    A (*s_red)[MAXM * MAXM]) {
  const int M = plan.M;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const A inv_t = static_cast<A>(plan.inv_temperature);
  for (int s = 0; s < M; ++s) {
    if (!has_bit(plan.source_mask, s)) continue;
    const A mx_s = s_st[s].mx, lsT_s = s_st[s].lsT;
    A Ds[MAXM];
#pragma unroll
    for (int t = 0; t < MAXM; ++t) Ds[t] = A(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const A us = static_cast<A>(z.row(s, b)[c]) - mx_s;
      const A ps = ktg_exp(us * inv_t - lsT_s);
#pragma unroll
      for (int t = 0; t < MAXM; ++t) {
        if (t < M && has_bit(plan.kd_in[t], s)) {
          const A ut = static_cast<A>(z.row(t, b)[c]) - s_st[t].mx;
          Ds[t] += ps * (us - ut);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < MAXM; ++t) {
      if (t < M && has_bit(plan.kd_in[t], s)) {
        const A v = warp_sum(Ds[t]);
        if (lane == 0) s_red[warp][s * MAXM + t] = v;
      }
    }
  }
}

// The label edge of every labelled node against soft targets (ktg_loss.h, soft_ce_term),
// into s_ce[t]; every thread of the block must call it, after sample_statistics.
template <class S, class A, int MAXM>
__device__ __forceinline__ void soft_label_ces(const NodeRows<S>& z, const A* __restrict__ y, int64_t C, int64_t b,
                                               const Plan& plan, const NodeStat<A>* s_st,
                                               A (*s_red)[MAXM], A* s_ce) {
  const int M = plan.M;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  A acc[MAXM];
#pragma unroll
  for (int t = 0; t < MAXM; ++t) acc[t] = A(0);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const A yc = y[b * C + c];
#pragma unroll
    for (int t = 0; t < MAXM; ++t) {
      if (t < M && has_bit(plan.label_mask, t)) {
        acc[t] += soft_ce_term(s_st[t], static_cast<A>(z.row(t, b)[c]), yc);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < MAXM; ++t) {
    if (t < M && has_bit(plan.label_mask, t)) {
      const A v = warp_sum(acc[t]);
      if (lane == 0) s_red[warp][t] = v;
    }
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < M && has_bit(plan.label_mask, t)) {
    A total = s_red[0][t];
    for (int w = 1; w < nwarps; ++w) total += s_red[w][t];
    s_ce[t] = total;
  }
  __syncthreads();
}

template <class S, class A, int MAXM>
__global__ void __launch_bounds__(kMaxThreads)
ktg_forward_kernel(const NodeRows<S> z, const int64_t* __restrict__ labels, const A* __restrict__ soft,
                   int64_t B, int64_t C,
                   const Plan plan, const Progress progress, A* __restrict__ stats,
                   A* __restrict__ partial, unsigned int* __restrict__ ticket, A* __restrict__ losses) {
  __shared__ RunningLse<A> s_lse[kMaxWarps][MAXM];
  __shared__ NodeStat<A> s_st[MAXM];
  __shared__ int64_t s_arg[MAXM];
  __shared__ A s_correct[MAXM];
  __shared__ A s_red[kMaxWarps][MAXM * MAXM];
  __shared__ A s_D[MAXM * MAXM];
  __shared__ double s_sum[kMaxWarps];
  __shared__ A s_ce_red[kMaxWarps][MAXM];
  __shared__ A s_ce[MAXM];
  __shared__ bool s_last;

  const int M = plan.M;
  const int64_t b = blockIdx.x;
  const int nwarps = blockDim.x >> 5;
  // Soft targets: the class is their argmax where a correct gate reads it (else none, -2);
  // there is no index to go out of range.
  const int64_t y = labels ? labels[b] : -2;
  const bool label_ok = soft || (y >= 0 && y < C);

  // 1. statistics of every node, kept for the backward
  sample_statistics<S, A, MAXM>(z, C, b, plan, s_lse, s_st, s_arg);
  if (threadIdx.x < M) {
    const int n = threadIdx.x;
    const A correct = label_ok && s_arg[n] == y ? A(1) : A(0);
    s_correct[n] = correct;
    store_stat(stats, B, n, b, s_st[n], correct);
  }
  if (soft && plan.label_mask) soft_label_ces<S, A, MAXM>(z, soft, C, b, plan, s_st, s_ce_red, s_ce);

  // 2. Σ_c p_s,c (u_s,c − u_t,c) for the open knowledge edges
  if (plan.source_mask) {
    if constexpr (MAXM <= 8) {
      edge_sums_all<S, A, MAXM>(z, C, b, plan, s_st, s_red, s_D);
    } else {
      edge_sums_by_source<S, A, MAXM>(z, C, b, plan, s_st, s_red);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < MAXM * MAXM; e += blockDim.x) {
      const int s = e / MAXM, t = e % MAXM;
      if (s < M && t < M && has_bit(plan.kd_in[t], s)) {
        A acc = s_red[0][e];
        for (int w = 1; w < nwarps; ++w) acc += s_red[w][e];
        s_D[e] = acc;
      }
    }
  }
  __syncthreads();

  // 3. per-sample losses, then the last block sums them over the batch
  if (threadIdx.x == 0) {
    A ce[MAXM], out[MAXM];
    for (int t = 0; t < M; ++t) {
      if (has_bit(plan.label_mask, t)) {
        ce[t] = soft ? s_ce[t] : label_ok ? label_ce(s_st[t], static_cast<A>(z.row(t, b)[y])) : quiet_nan<A>();
      }
    }
    sample_losses<MAXM>(plan, s_st, ce, s_D, s_correct, label_ok, progress.load<A>(), out);
    for (int t = 0; t < M; ++t) partial[b * M + t] = out[t];
    __threadfence();  // publish the partials before taking a ticket
    s_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  const volatile A* vpartial = partial;
  for (int t = 0; t < M; ++t) {
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < B; i += blockDim.x) acc += static_cast<double>(vpartial[i * M + t]);
    acc = block_sum(acc, s_sum);
    if (threadIdx.x == 0) losses[t] = static_cast<A>(acc / static_cast<double>(B));
  }
}

template <class S, class A, int MAXM>
__global__ void __launch_bounds__(kMaxThreads)
ktg_backward_kernel(const StridedVec<A> grad_losses, const NodeRows<S> z,
                    const int64_t* __restrict__ labels, const A* __restrict__ soft, const A* __restrict__ stats, int64_t B,
                    int64_t C, const Plan plan, const Progress progress, const GradRows<S> grad) {
  __shared__ NodeStat<A> s_st[MAXM];
  __shared__ A s_sq[MAXM];
  __shared__ SampleCoef<A, MAXM> s_coef;
  __shared__ A s_red[kMaxWarps];
  __shared__ A s_inv_ysum;

  const int M = plan.M;
  const int64_t b = blockIdx.x;
  const int64_t y = soft ? 0 : labels[b];
  const bool label_ok = soft || (y >= 0 && y < C);
  const A* yrow = soft ? soft + b * C : nullptr;
  A ysum = A(1);
  if (yrow && plan.label_mask) {  // the label weight times Σy, delta = y / Σy (ktg_loss.h)
    A part = A(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) part += yrow[c];
    ysum = block_sum(part, s_red);  // valid in thread 0, which alone uses it
  }
  const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
  const uint32_t needed = plan.target_mask | plan.source_mask;

  if (threadIdx.x < M) {
    const int n = threadIdx.x;
    s_st[n] = load_stat(stats, B, n, b);
    if (plan.square_temperature) s_sq[n] = square_factor(s_st[n]);
  }
  if (threadIdx.x == 0) {
    A correct[MAXM];
    for (int n = 0; n < M; ++n) correct[n] = stats[(n * B + b) * kStatCols + kStatCorrect];
    make_coefficients<MAXM>(plan, correct, grad_losses, A(1) / static_cast<A>(B), progress.load<A>(),
                            s_coef);
    for (int t = 0; t < M; ++t) s_coef.label_w[t] *= ysum;
    s_inv_ysum = inverse_target_sum(ysum);
  }
  __syncthreads();

  const S nan_out = static_cast<S>(quiet_nan<A>());
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A u[MAXM], pT[MAXM], p1[MAXM], g[MAXM];
#pragma unroll
    for (int n = 0; n < MAXM; ++n) {
      if (n < M && has_bit(needed, n)) u[n] = static_cast<A>(z.row(n, b)[c]) - s_st[n].mx;
    }
    class_probs<MAXM>(plan, s_st, s_sq, u, kd_nodes, plan.label_mask, pT, p1);
    const A delta = yrow ? yrow[c] * s_inv_ysum : (c == y ? A(1) : A(0));
    class_grads<MAXM>(plan, s_coef, pT, p1, delta, g);
#pragma unroll
    for (int t = 0; t < MAXM; ++t) {
      if (t < M) {
        S out = static_cast<S>(A(0));
        if (has_bit(plan.target_mask, t)) out = label_ok ? static_cast<S>(g[t]) : nan_out;
        grad.row(t, b, C)[c] = out;
      }
    }
  }
}

int threads_for(int64_t C) {
  int threads = 32;
  while (threads < kMaxThreads && threads < C) threads *= 2;
  return threads;
}

// Per-node arrays live in registers, so the kernels are compiled for a few bounds on M.
template <class F>
void with_max_nodes(int M, F&& f) {
  if (M <= 4) {
    f(std::integral_constant<int, 4>());
  } else if (M <= 8) {
    f(std::integral_constant<int, 8>());
  } else {
    f(std::integral_constant<int, kMaxNodes>());
  }
}

std::tuple<at::Tensor, at::Tensor> ktg_loss_forward_cuda(at::TensorList logits,
                                                         const at::Tensor& labels_in,
                                                         c10::IntArrayRef gates, double temperature,
                                                         double progress,
                                                         const std::optional<at::Tensor>& progress_tensor) {
  const char* op = "timm_dcl::ktg_loss_forward";
  Call call = prepare_call(logits, labels_in, gates, temperature, progress, progress_tensor, op);
  const at::Tensor& z0 = logits[0];
  const c10::cuda::CUDAGuard guard(z0.device());
  soft_target_classes(call);
  const Progress prog = resolve_progress(progress, progress_tensor, z0.device());
  const int64_t M = call.M, B = call.B, C = call.C;
  const auto acc_type = accumulate_type(z0.scalar_type());
  const auto acc_opts = z0.options().dtype(acc_type);
  at::Tensor losses = at::empty({M}, acc_opts);
  at::Tensor stats = at::empty({M, B, kStatCols}, acc_opts);
  // Workspace: the per-sample losses [B, M], then the ticket counter.
  const int64_t acc_size = acc_type == at::kDouble ? 8 : 4;
  const int64_t ticket_offset = (B * M * acc_size + 15) / 16 * 16;
  at::Tensor workspace = at::empty({ticket_offset + 16}, z0.options().dtype(at::kByte));
  uint8_t* ws = workspace.mutable_data_ptr<uint8_t>();
  unsigned int* ticket = reinterpret_cast<unsigned int*>(ws + ticket_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z0.device().index());
  C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "ktg_loss_forward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    with_max_nodes(call.plan.M, [&](auto maxm) {
      ktg_forward_kernel<scalar_t, acc_t, decltype(maxm)::value>
          <<<static_cast<unsigned>(B), threads_for(C), 0, stream>>>(
              call.node_rows<scalar_t>(), call.label_ptr(), call.target_ptr<acc_t>(), B, C, call.plan, prog,
              stats.mutable_data_ptr<acc_t>(), reinterpret_cast<acc_t*>(ws), ticket,
              losses.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return std::make_tuple(losses, stats);
}

std::vector<at::Tensor> ktg_loss_backward_cuda(const at::Tensor& grad_losses_in, at::TensorList logits,
                                               const at::Tensor& labels_in, const at::Tensor& stats_in,
                                               c10::IntArrayRef gates, double temperature, double progress,
                                               const std::optional<at::Tensor>& progress_tensor) {
  const char* op = "timm_dcl::ktg_loss_backward";
  const Call call = prepare_call(logits, labels_in, gates, temperature, progress, progress_tensor, op);
  const at::Tensor& z0 = logits[0];
  check_backward_extras(call, grad_losses_in, stats_in, z0.scalar_type(), z0.device(), op);
  const c10::cuda::CUDAGuard guard(z0.device());
  const Progress prog = resolve_progress(progress, progress_tensor, z0.device());
  const int64_t B = call.B, C = call.C;
  const auto acc = accumulate_type(z0.scalar_type());
  // Read in place with its stride (the backward of losses.sum() hands over a stride-0 view).
  const at::Tensor grad_losses = grad_losses_in.scalar_type() == acc ? grad_losses_in : grad_losses_in.to(acc);
  const at::Tensor stats = stats_in.contiguous();
  std::vector<at::Tensor> grads = make_grads(call, z0.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z0.device().index());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "ktg_loss_backward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    with_max_nodes(call.plan.M, [&](auto maxm) {
      ktg_backward_kernel<scalar_t, acc_t, decltype(maxm)::value>
          <<<static_cast<unsigned>(B), threads_for(C), 0, stream>>>(
              StridedVec<acc_t>{grad_losses.const_data_ptr<acc_t>(), grad_losses.stride(0)},
              call.node_rows<scalar_t>(), call.label_ptr(), call.target_ptr<acc_t>(), stats.const_data_ptr<acc_t>(),
              B, C, call.plan, prog, grad_rows<scalar_t>(call, grads));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grads;
}

}  // namespace
}  // namespace ktg

TORCH_LIBRARY_IMPL(timm_dcl, CUDA, m) {
  m.impl("ktg_loss_forward", &ktg::ktg_loss_forward_cuda);
  m.impl("ktg_loss_backward", &ktg::ktg_loss_backward_cuda);
}
