// CUDA kernels of the fused Knowledge Transfer Graph loss (SPEC §2). The math is in
// ktg_loss.h; this file adds the thread layout and the reductions.
//
// Layout: one block per sample, threads strided over the classes (any C: nothing is
// sized by C). Forward, one launch:
//   1. every thread keeps an online max / sum-exp / first-argmax per node over its
//      classes; a fixed-order block reduction gives each node's statistics once;
//   2. a second pass over the classes accumulates Σ_c p_s (u_s − u_t) for every open
//      knowledge edge in registers, reduced across the block in a fixed order;
//   3. thread 0 combines the edges into per-sample losses and writes them to a
//      workspace; the last block to finish (integer atomic ticket after a
//      __threadfence; the ticket is zeroed by cudaMemsetAsync before the launch) sums
//      the workspace over the batch in a fixed order. No floating-point atomics, so the
//      result is deterministic.
// Backward, one launch: the same statistics pass, then each thread writes the gradient
// of its classes for every node. The statistics are recomputed rather than read from
// `stats` (only its correct flags are used): the stored log-sum-exp values are rounded
// sums that would cost float32 precision for large logits.
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
__device__ __forceinline__ void warp_merge(RunningLse<A>& r, A inv_t, int lane) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    RunningLse<A> other;
    other.m = __shfl_down_sync(kFullMask, r.m, o);
    other.s1 = __shfl_down_sync(kFullMask, r.s1, o);
    other.sT = __shfl_down_sync(kFullMask, r.sT, o);
    other.bad = __shfl_down_sync(kFullMask, r.bad, o);
    other.arg = __shfl_down_sync(kFullMask, static_cast<long long>(r.arg), o);
    if (lane + o < 32) lse_merge(r, other, inv_t);
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

// Statistics of the nodes in `mask` for sample b, into s_st (and first argmax, if
// wanted). Every thread of the block must call it.
template <class S, class A, int MAXM>
__device__ __forceinline__ void sample_statistics(const S* __restrict__ z, int64_t B, int64_t C,
                                                  int64_t b, const Plan& plan, uint32_t mask,
                                                  RunningLse<A> (*s_lse)[MAXM],
                                                  NodeStat<A>* s_st, int64_t* s_arg) {
  const int M = plan.M;
  const A inv_t = static_cast<A>(plan.inv_temperature);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  RunningLse<A> r[MAXM];
#pragma unroll
  for (int n = 0; n < MAXM; ++n) lse_init(r[n]);
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
#pragma unroll
    for (int n = 0; n < MAXM; ++n) {
      if (n < M && has_bit(mask, n)) {
        lse_push(r[n], static_cast<A>(z[(n * B + b) * C + c]), c, inv_t);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < MAXM; ++n) {
    if (n < M && has_bit(mask, n)) {
      warp_merge(r[n], inv_t, lane);
      if (lane == 0) s_lse[warp][n] = r[n];
    }
  }
  __syncthreads();
  const int n = threadIdx.x;
  if (n < M && has_bit(mask, n)) {
    RunningLse<A> acc = s_lse[0][n];
    for (int w = 1; w < nwarps; ++w) lse_merge(acc, s_lse[w][n], inv_t);
    s_st[n] = finalize_stat(acc.m, acc.s1, acc.sT, acc.bad, plan.unit_temperature);
    if (s_arg) s_arg[n] = acc.arg;
  }
  __syncthreads();
}

template <class S, class A, int MAXM>
__global__ void __launch_bounds__(kMaxThreads)
ktg_forward_kernel(const S* __restrict__ z, const int64_t* __restrict__ labels, int64_t B,
                   int64_t C, const Plan plan, A* __restrict__ stats, A* __restrict__ partial,
                   unsigned int* __restrict__ ticket, A* __restrict__ losses) {
  __shared__ RunningLse<A> s_lse[kMaxWarps][MAXM];
  __shared__ NodeStat<A> s_st[MAXM];
  __shared__ int64_t s_arg[MAXM];
  __shared__ A s_correct[MAXM];
  __shared__ A s_red[kMaxWarps][MAXM * MAXM];
  __shared__ A s_D[MAXM * MAXM];
  __shared__ double s_sum[kMaxWarps];
  __shared__ bool s_last;

  const int M = plan.M;
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const A inv_t = static_cast<A>(plan.inv_temperature);
  const int64_t y = labels[b];
  const bool label_ok = y >= 0 && y < C;

  // 1. statistics of every node
  sample_statistics<S, A, MAXM>(z, B, C, b, plan, (1u << M) - 1u, s_lse, s_st, s_arg);
  if (threadIdx.x < M) {
    const int n = threadIdx.x;
    const A correct = label_ok && s_arg[n] == y ? A(1) : A(0);
    s_correct[n] = correct;
    A* sp = stats + (n * B + b) * 3;
    sp[0] = lse_tempered(s_st[n], inv_t);
    sp[1] = lse_plain(s_st[n]);
    sp[2] = correct;
  }

  // 2. Σ_c p_s,c (u_s,c − u_t,c) for the open knowledge edges
  if (plan.source_mask) {
    const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
    A D[MAXM * MAXM];
#pragma unroll
    for (int e = 0; e < MAXM * MAXM; ++e) D[e] = A(0);
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      A u[MAXM], pT[MAXM];
#pragma unroll
      for (int n = 0; n < MAXM; ++n) {
        if (n < M && has_bit(kd_nodes, n)) u[n] = static_cast<A>(z[(n * B + b) * C + c]) - s_st[n].mx;
      }
      class_probs<MAXM>(plan, s_st, u, plan.source_mask, 0u, pT, static_cast<A*>(nullptr));
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
        ce[t] = label_ok ? label_ce(s_st[t], static_cast<A>(z[(t * B + b) * C + y])) : quiet_nan<A>();
      }
    }
    sample_losses<MAXM>(plan, s_st, ce, s_D, s_correct, label_ok, out);
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
ktg_backward_kernel(const A* __restrict__ grad_losses, const S* __restrict__ z,
                    const int64_t* __restrict__ labels, const A* __restrict__ stats, int64_t B,
                    int64_t C, const Plan plan, S* __restrict__ grad) {
  __shared__ RunningLse<A> s_lse[kMaxWarps][MAXM];
  __shared__ NodeStat<A> s_st[MAXM];
  __shared__ SampleCoef<A, MAXM> s_coef;

  const int M = plan.M;
  const int64_t b = blockIdx.x;
  const int64_t y = labels[b];
  const bool label_ok = y >= 0 && y < C;
  const uint32_t kd_nodes = plan.source_mask | plan.kd_target_mask;
  const uint32_t needed = plan.target_mask | plan.source_mask;

  sample_statistics<S, A, MAXM>(z, B, C, b, plan, needed, s_lse, s_st, nullptr);
  if (threadIdx.x == 0) {
    A correct[MAXM], g[MAXM];
    for (int n = 0; n < M; ++n) {
      correct[n] = stats[(n * B + b) * 3 + 2];
      g[n] = grad_losses[n];
    }
    make_coefficients<MAXM>(plan, correct, g, A(1) / static_cast<A>(B), s_coef);
  }
  __syncthreads();

  const S nan_out = static_cast<S>(quiet_nan<A>());
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    A u[MAXM], pT[MAXM], p1[MAXM], g[MAXM];
#pragma unroll
    for (int n = 0; n < MAXM; ++n) {
      if (n < M && has_bit(needed, n)) u[n] = static_cast<A>(z[(n * B + b) * C + c]) - s_st[n].mx;
    }
    class_probs<MAXM>(plan, s_st, u, kd_nodes, plan.label_mask, pT, p1);
    const A delta = c == y ? A(1) : A(0);
    class_grads<MAXM>(plan, s_coef, pT, p1, delta, g);
#pragma unroll
    for (int t = 0; t < MAXM; ++t) {
      if (t < M) {
        S out = static_cast<S>(A(0));
        if (has_bit(plan.target_mask, t)) out = label_ok ? static_cast<S>(g[t]) : nan_out;
        grad[(t * B + b) * C + c] = out;
      }
    }
  }
}

int threads_for(int64_t C) {
  int threads = 32;
  while (threads < kMaxThreads && threads < C) threads *= 2;
  return threads;
}

template <class S, class A, int MAXM>
void launch_forward(const at::Tensor& logits, const at::Tensor& labels, const Plan& plan,
                    at::Tensor& stats, at::Tensor& losses, A* partial, unsigned int* ticket,
                    cudaStream_t stream) {
  const int64_t B = logits.size(1), C = logits.size(2);
  ktg_forward_kernel<S, A, MAXM><<<static_cast<unsigned>(B), threads_for(C), 0, stream>>>(
      logits.data_ptr<S>(), labels.data_ptr<int64_t>(), B, C, plan, stats.data_ptr<A>(), partial,
      ticket, losses.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class S, class A, int MAXM>
void launch_backward(const at::Tensor& grad_losses, const at::Tensor& logits,
                     const at::Tensor& labels, const at::Tensor& stats, const Plan& plan,
                     at::Tensor& grad, cudaStream_t stream) {
  const int64_t B = logits.size(1), C = logits.size(2);
  ktg_backward_kernel<S, A, MAXM><<<static_cast<unsigned>(B), threads_for(C), 0, stream>>>(
      grad_losses.data_ptr<A>(), logits.data_ptr<S>(), labels.data_ptr<int64_t>(),
      stats.data_ptr<A>(), B, C, plan, grad.data_ptr<S>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

std::tuple<at::Tensor, at::Tensor> ktg_loss_forward_cuda(const at::Tensor& logits_in,
                                                         const at::Tensor& labels_in,
                                                         c10::IntArrayRef gates,
                                                         double temperature, double progress) {
  const char* op = "timm_dcl::ktg_loss_forward";
  const Plan plan = check_forward_args(logits_in, labels_in, gates, temperature, progress, op);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const int64_t M = logits.size(0), B = logits.size(1);
  const auto acc_type = accumulate_type(logits.scalar_type());
  const auto acc_opts = logits.options().dtype(acc_type);
  at::Tensor losses = at::empty({M}, acc_opts);
  at::Tensor stats = at::empty({M, B, 3}, acc_opts);
  // Workspace: the per-sample losses [B, M], then the ticket counter.
  const int64_t acc_size = acc_type == at::kDouble ? 8 : 4;
  const int64_t ticket_offset = (B * M * acc_size + 15) / 16 * 16;
  at::Tensor workspace = at::empty({ticket_offset + 16}, logits.options().dtype(at::kByte));
  uint8_t* ws = workspace.data_ptr<uint8_t>();
  unsigned int* ticket = reinterpret_cast<unsigned int*>(ws + ticket_offset);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ktg_loss_forward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    with_max_nodes(plan.M, [&](auto maxm) {
      launch_forward<scalar_t, acc_t, decltype(maxm)::value>(
          logits, labels, plan, stats, losses, reinterpret_cast<acc_t*>(ws), ticket, stream);
    });
  });
  return std::make_tuple(losses, stats);
}

at::Tensor ktg_loss_backward_cuda(const at::Tensor& grad_losses_in, const at::Tensor& logits_in,
                                  const at::Tensor& labels_in, const at::Tensor& stats_in,
                                  c10::IntArrayRef gates, double temperature, double progress) {
  const char* op = "timm_dcl::ktg_loss_backward";
  const Plan plan = check_backward_args(grad_losses_in, logits_in, labels_in, stats_in, gates,
                                        temperature, progress, op);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const at::Tensor grad_losses =
      grad_losses_in.to(accumulate_type(logits.scalar_type())).contiguous();
  at::Tensor grad = at::empty(logits.sizes(), logits.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ktg_loss_backward_cuda", [&] {
    using acc_t = acc_of<scalar_t>;
    with_max_nodes(plan.M, [&](auto maxm) {
      launch_backward<scalar_t, acc_t, decltype(maxm)::value>(grad_losses, logits, labels, stats,
                                                              plan, grad, stream);
    });
  });
  return grad;
}

}  // namespace
}  // namespace ktg

TORCH_LIBRARY_IMPL(timm_dcl, CUDA, m) {
  m.impl("ktg_loss_forward", &ktg::ktg_loss_forward_cuda);
  m.impl("ktg_loss_backward", &ktg::ktg_loss_backward_cuda);
}
