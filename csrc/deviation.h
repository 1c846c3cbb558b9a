// Shared declarations of the salf::deviations ops (CPU in deviation.cpp, CUDA in deviation_cuda.cu).
//
// For sample b (medium-token position t = last_index[b], label y = labels[b]) and space s = 0..m,
// h = states[s][b, t, :]. The lens (spaces 0..m-1 only; space m is read raw):
//   none       x = h
//   rms        x = g * h * r                 (r > 0 cancels in a cosine)
//   layernorm  x = g * (h - mu) * r + beta,  r = 1 / sqrt(var(h) + eps)
// cos_j = <x, b_j> / (max(|x|, 1e-8) max(|b_j|, 1e-8)); metric 0: 1 - cos_y, 1: logsumexp(cos) - cos_y,
// 2: 1 + #{j : cos_j > cos_y}. eof = first argmax_k (d_k - d_{k+1}), k = 0..m-1.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace salf {

constexpr int64_t kMaxLabels = 1024;
constexpr float kCosEps = 1e-8f;

enum LensKind : int64_t { kLensNone = 0, kLensRms = 1, kLensLayerNorm = 2 };
enum Metric : int64_t { kMetricCosine = 0, kMetricCe = 1, kMetricRank = 2 };

// Checked inputs; every state is read in place through (data pointer, batch stride, time stride).
struct Prepared {
  std::vector<at::Tensor> views;      // per space: the tensor read (feature stride 1)
  std::vector<int64_t> batch_stride;  // per space, elements
  std::vector<int64_t> time_stride;   // per space, elements (0 for a gathered fallback)
  std::vector<int64_t> time_len;      // per space: T
  at::Tensor last_index;              // int64 [B] contiguous
  at::Tensor labels;                  // int64 [B] contiguous
  at::Tensor bases;                   // float32 [K, D] contiguous
  at::Tensor weight;                  // float32 [D] contiguous (ones when the lens has none), undefined for kind 0
  at::Tensor bias;                    // float32 [D] contiguous or undefined (layernorm only)
  int64_t lens_kind = 0;
  double eps = 0.0;
  int64_t metric = 0;
  int64_t B = 0, S = 0, D = 0, K = 0;
};

// TORCH_CHECKs shapes, dtypes, devices and codes; gathers rows of spaces whose feature stride is not 1.
Prepared prepare(const std::vector<at::Tensor>& states, const at::Tensor& last_index, const at::Tensor& labels,
                 const at::Tensor& bases, const c10::optional<at::Tensor>& lens_weight,
                 const c10::optional<at::Tensor>& lens_bias, int64_t lens_kind, double eps, int64_t metric);

}  // namespace salf
