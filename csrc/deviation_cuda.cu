// salf::deviations on CUDA tensors (math in deviation.h).
//
// One launch, grid (S, B): block (s, b) reads the medium-token row of sample b in space s through a
// device table [4, S] (data pointer, batch stride, time stride, T; elements), so no state is stacked or
// copied. Each thread walks the features d = tid, tid + blockDim, ... (coalesced), applies the lens in
// fp32 and accumulates the K dot products in chunks of kLabelChunk registers together with |x|^2,
// |b_j|^2 and the layernorm terms; block reductions (warp shuffles + shared memory) finish the sums and
// thread 0 writes the metric.
// Positions or labels out of range give NaN (the Python wrapper validates them before the launch).
#include "deviation.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>

namespace salf {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLabelChunk = 8;                     // labels accumulated per pass over the row
constexpr int kMaxReduce = 3 * kLabelChunk + 4;    // values reduced at once

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<c10::BFloat16>(c10::BFloat16 v) {
  return static_cast<float>(v);
}
template <>
__device__ __forceinline__ float to_float<c10::Half>(c10::Half v) {
  return static_cast<float>(v);
}

// Sums vals[0..n) over the block; the totals land in out[0..n) (shared), visible to all threads.
__device__ void block_sum(float* vals, int n, float* scratch, float* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = 0; i < n; ++i) {
    float v = vals[i];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) scratch[warp * kMaxReduce + i] = v;
  }
  __syncthreads();
  if (threadIdx.x < n) {
    float t = 0.f;
    for (int w = 0; w < kWarps; ++w) t += scratch[w * kMaxReduce + threadIdx.x];
    out[threadIdx.x] = t;
  }
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) deviation_kernel(
    const int64_t* __restrict__ table,       // [4, S]: data_ptr, batch stride, time stride, T per space
    const int64_t* __restrict__ last_index,  // [B] medium-token positions
    const int64_t* __restrict__ labels,      // [B] label indices 0..K-1
    const float* __restrict__ bases,         // [K, D] fp32 contiguous
    const float* __restrict__ weight,        // [D] lens weight g, or nullptr (kind none)
    const float* __restrict__ bias,          // [D] layernorm bias beta, or nullptr
    float* __restrict__ out,                 // [B, S] metric
    int64_t S, int64_t D, int64_t K, float eps, int lens_kind, int metric) {
  extern __shared__ float smem[];  // cos/dot [K] | |b|^2 [K] | <beta,b> [K] | scratch | totals
  float* s_dot = smem;
  float* s_bb = s_dot + K;
  float* s_bbeta = s_bb + K;
  float* scratch = s_bbeta + K;
  float* totals = scratch + kWarps * kMaxReduce;
  __shared__ float s_mu;

  const int64_t s = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int64_t y = labels[b];
  const int64_t pos = last_index[b];
  const bool valid = y >= 0 && y < K && pos >= 0 && pos < table[3 * S + s];
  const scalar_t* row = reinterpret_cast<const scalar_t*>(table[s]) + b * table[S + s] +
                        (valid ? pos : 0) * table[2 * S + s];
  const bool lensed = lens_kind != kLensNone && s < S - 1;
  const bool ln = lensed && lens_kind == kLensLayerNorm;
  const bool with_bias = ln && bias != nullptr;

  float vals[kMaxReduce];
  if (ln) {  // pass 1: the mean
    float acc = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) acc += to_float(row[d]);
    vals[0] = acc;
    block_sum(vals, 1, scratch, totals);
    if (threadIdx.x == 0) s_mu = totals[0] / static_cast<float>(D);
    __syncthreads();
  }
  const float mu = ln ? s_mu : 0.f;

  float xx = 0.f, cc = 0.f, xbeta = 0.f, beta2 = 0.f;
  for (int64_t k0 = 0; k0 < K; k0 += kLabelChunk) {
    float acc[kLabelChunk], bb[kLabelChunk], bbeta[kLabelChunk];
#pragma unroll
    for (int j = 0; j < kLabelChunk; ++j) acc[j] = bb[j] = bbeta[j] = 0.f;
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      const float h = valid ? to_float(row[d]) - mu : 0.f;
      const float x = lensed ? h * weight[d] : h;
      const float beta = with_bias ? bias[d] : 0.f;
      if (k0 == 0) {
        xx += x * x;
        cc += h * h;
        xbeta += x * beta;
        beta2 += beta * beta;
      }
#pragma unroll
      for (int j = 0; j < kLabelChunk; ++j) {
        if (k0 + j < K) {
          const float bv = bases[(k0 + j) * D + d];
          acc[j] += x * bv;
          bb[j] += bv * bv;
          bbeta[j] += beta * bv;
        }
      }
    }
    const int n = static_cast<int>(K - k0 < kLabelChunk ? K - k0 : kLabelChunk);
    for (int j = 0; j < n; ++j) {
      vals[j] = acc[j];
      vals[n + j] = bb[j];
      vals[2 * n + j] = bbeta[j];
    }
    block_sum(vals, 3 * n, scratch, totals);
    if (threadIdx.x < n) {
      s_dot[k0 + threadIdx.x] = totals[threadIdx.x];
      s_bb[k0 + threadIdx.x] = totals[n + threadIdx.x];
      s_bbeta[k0 + threadIdx.x] = totals[2 * n + threadIdx.x];
    }
    __syncthreads();
  }
  vals[0] = xx;
  vals[1] = cc;
  vals[2] = xbeta;
  vals[3] = beta2;
  block_sum(vals, 4, scratch, totals);

  if (threadIdx.x == 0) {
    float sq = totals[0];
    float scale = 1.f;
    if (with_bias) {
      scale = rsqrtf(totals[1] / static_cast<float>(D) + eps);
      sq = scale * scale * totals[0] + 2.f * scale * totals[2] + totals[3];
    }
    const float nx = fmaxf(sqrtf(fmaxf(sq, 0.f)), kCosEps);
    float cy = 0.f, mx = -INFINITY;
    for (int64_t j = 0; j < K; ++j) {
      const float dot = with_bias ? scale * s_dot[j] + s_bbeta[j] : s_dot[j];
      const float c = dot / (nx * fmaxf(sqrtf(s_bb[j]), kCosEps));
      s_dot[j] = c;  // now the cosine
      mx = fmaxf(mx, c);
      if (j == y) cy = c;
    }
    float dval;
    if (metric == kMetricCosine) {
      dval = 1.f - cy;
    } else if (metric == kMetricCe) {
      float se = 0.f;
      for (int64_t j = 0; j < K; ++j) se += expf(s_dot[j] - mx);
      dval = mx + logf(se) - cy;
    } else {
      int larger = 0;
      for (int64_t j = 0; j < K; ++j) larger += s_dot[j] > cy ? 1 : 0;
      dval = 1.f + static_cast<float>(larger);
    }
    out[b * S + s] = valid ? dval : NAN;
  }
}

at::Tensor deviations_cuda(const std::vector<at::Tensor>& states, const at::Tensor& last_index,
                           const at::Tensor& labels, const at::Tensor& bases,
                           const c10::optional<at::Tensor>& lens_weight, const c10::optional<at::Tensor>& lens_bias,
                           int64_t lens_kind, double eps, int64_t metric) {
  Prepared p = prepare(states, last_index, labels, bases, lens_weight, lens_bias, lens_kind, eps, metric);
  const c10::cuda::CUDAGuard guard(p.bases.device());
  auto out = at::empty({p.B, p.S}, p.bases.options());
  if (p.B == 0) return out;
  TORCH_CHECK(p.S <= 65535, "salf::deviations: at most 65535 spaces on CUDA, got ", p.S);
  std::vector<int64_t> host(4 * p.S);
  for (int64_t s = 0; s < p.S; ++s) {
    host[s] = reinterpret_cast<int64_t>(p.views[s].data_ptr());
    host[p.S + s] = p.batch_stride[s];
    host[2 * p.S + s] = p.time_stride[s];
    host[3 * p.S + s] = p.time_len[s];
  }
  auto table = at::tensor(host, at::TensorOptions().dtype(at::kLong)).to(p.bases.device(), /*non_blocking=*/false);
  const size_t shmem = sizeof(float) * (3 * p.K + kWarps * kMaxReduce + kMaxReduce);
  const dim3 grid(static_cast<unsigned>(p.S), static_cast<unsigned>(p.B));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.views[0].scalar_type(), "salf_deviations_cuda", [&] {
    deviation_kernel<scalar_t><<<grid, kThreads, shmem, stream>>>(
        table.data_ptr<int64_t>(), p.last_index.data_ptr<int64_t>(), p.labels.data_ptr<int64_t>(),
        p.bases.data_ptr<float>(), p.weight.defined() ? p.weight.data_ptr<float>() : nullptr,
        p.bias.defined() ? p.bias.data_ptr<float>() : nullptr, out.data_ptr<float>(), p.S, p.D, p.K,
        static_cast<float>(p.eps), static_cast<int>(p.lens_kind), static_cast<int>(p.metric));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace salf

TORCH_LIBRARY_IMPL(salf, CUDA, m) {
  m.impl("deviations", &salf::deviations_cuda);
}
