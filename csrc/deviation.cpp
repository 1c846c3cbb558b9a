// salf::deviations: the op schema, input checks and the CPU kernel.
//
// Math: see deviation.h. CPU strategy: the lens weight is folded into the bases once per call
// (<g*h, b_j> = <h, g*b_j>, |g*h|^2 = <h^2, g^2>; layernorm adds the row <h - mu, g*beta>), so a row
// costs K (+1) dot products and one weighted square sum over its D features, in fp32. Only the m+1
// medium-token rows of each sample are read (converted to fp32 into a per-thread buffer); rows are
// processed four at a time so each loaded basis chunk feeds four FMAs. at::parallel_for splits the
// (sample, group of spaces) work items across threads.
#include "deviation.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

namespace salf {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

at::Tensor check_index(const at::Tensor& t, const char* name, int64_t B, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "salf::deviations: ", name, " must have shape [B] = [", B,
              "], got ", t.sizes());
  TORCH_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "salf::deviations: ", name,
              " must be an integer tensor, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "salf::deviations: ", name, " is on ", t.device(), " but the states are on ",
              device);
  return t.to(at::kLong).contiguous();
}

at::Tensor check_vector(const c10::optional<at::Tensor>& t, const char* name, int64_t D, const at::Device& device) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == D, "salf::deviations: lens ", name, " must have shape [D] = [", D,
              "], got ", t->sizes());
  TORCH_CHECK(t->is_floating_point(), "salf::deviations: lens ", name, " must be floating point, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == device, "salf::deviations: lens ", name, " is on ", t->device(),
              " but the states are on ", device);
  return t->to(at::kFloat).contiguous();
}

}  // namespace

Prepared prepare(const std::vector<at::Tensor>& states, const at::Tensor& last_index, const at::Tensor& labels,
                 const at::Tensor& bases, const c10::optional<at::Tensor>& lens_weight,
                 const c10::optional<at::Tensor>& lens_bias, int64_t lens_kind, double eps, int64_t metric) {
  TORCH_CHECK(states.size() >= 2, "salf::deviations: states must hold m+1 >= 2 spaces, got ", states.size());
  TORCH_CHECK(lens_kind >= 0 && lens_kind <= 2, "salf::deviations: lens_kind must be 0 (none), 1 (rms) or 2 ",
              "(layernorm), got ", lens_kind);
  TORCH_CHECK(metric >= 0 && metric <= 2, "salf::deviations: metric must be 0 (cosine), 1 (ce) or 2 (rank), got ",
              metric);
  const at::Tensor& first = states[0];
  TORCH_CHECK(first.dim() == 3, "salf::deviations: states[0] must be [B, T, D], got ", first.sizes());
  Prepared p;
  p.B = first.size(0);
  p.D = first.size(2);
  p.S = static_cast<int64_t>(states.size());
  const auto device = first.device();
  const auto dtype = first.scalar_type();
  TORCH_CHECK(is_supported_float(dtype), "salf::deviations: states must be float32, bfloat16 or float16, got ",
              dtype);
  p.last_index = check_index(last_index, "last_index", p.B, device);
  p.labels = check_index(labels, "labels", p.B, device);
  for (int64_t s = 0; s < p.S; ++s) {
    const at::Tensor& h = states[s];
    TORCH_CHECK(h.dim() == 3 && h.size(0) == p.B && h.size(2) == p.D, "salf::deviations: states[", s,
                "] has shape ", h.sizes(), ", expected [B=", p.B, ", T, D=", p.D, "] like states[0]");
    TORCH_CHECK(h.scalar_type() == dtype, "salf::deviations: states[", s, "] is ", h.scalar_type(),
                " but states[0] is ", dtype, "; all spaces must share a dtype");
    TORCH_CHECK(h.device() == device, "salf::deviations: states[", s, "] is on ", h.device(),
                " but states[0] is on ", device);
    TORCH_CHECK(h.size(1) > 0, "salf::deviations: states[", s, "] has no time steps");
    if (h.stride(2) != 1 && p.D > 1) {  // gather the B medium-token rows only
      auto idx = p.last_index.clamp(0, h.size(1) - 1).view({p.B, 1, 1}).expand({p.B, 1, p.D});
      auto rows = h.gather(1, idx).contiguous();  // [B, 1, D]
      p.views.push_back(rows);
      p.batch_stride.push_back(p.D);
      p.time_stride.push_back(0);
    } else {
      p.views.push_back(h);
      p.batch_stride.push_back(h.stride(0));
      p.time_stride.push_back(h.stride(1));
    }
    p.time_len.push_back(h.size(1));
  }
  TORCH_CHECK(bases.dim() == 2, "salf::deviations: bases must be [K, D], got ", bases.sizes());
  TORCH_CHECK(bases.size(1) == p.D, "salf::deviations: bases have D = ", bases.size(1),
              " but the states have D = ", p.D);
  TORCH_CHECK(bases.is_floating_point(), "salf::deviations: bases must be floating point, got ",
              bases.scalar_type());
  TORCH_CHECK(bases.device() == device, "salf::deviations: bases are on ", bases.device(),
              " but the states are on ", device);
  p.K = bases.size(0);
  TORCH_CHECK(p.K >= 1 && p.K <= kMaxLabels, "salf::deviations: bases must hold 1..", kMaxLabels,
              " labels, got K = ", p.K);
  p.bases = bases.to(at::kFloat).contiguous();
  p.lens_kind = lens_kind;
  p.eps = eps;
  p.metric = metric;
  if (lens_kind != kLensNone) {
    p.weight = check_vector(lens_weight, "weight", p.D, device);
    if (!p.weight.defined()) p.weight = at::ones({p.D}, p.bases.options());
    if (lens_kind == kLensLayerNorm) p.bias = check_vector(lens_bias, "bias", p.D, device);
  }
  return p;
}

namespace {

constexpr int kLanes = 16;      // fp32 lanes per step: two 8-wide vectors (independent accumulators)
constexpr int kRows = 4;        // rows sharing one pass over the bases
constexpr int64_t kChunk = 8;   // spaces per work item

// GCC/Clang vector extension: 8 floats, unaligned loads (vmovups with AVX, two SSE ops without).
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));

inline v8 load8(const float* p) { return *reinterpret_cast<const v8u*>(p); }

inline float hsum(v8 v) {
  float s = 0.f;
  for (int j = 0; j < 8; ++j) s += v[j];
  return s;
}

// dots[r * ldd + k] = <x_r, M_k> (k < nm), sq[r] = sum_d w2[d] x_r[d]^2 (w2 == nullptr: plain squares).
template <int R>
void multi_dot(const float* const* xs, const float* M, int64_t nm, int64_t D, const float* w2, float* dots,
               int64_t ldd, float* sq) {
  const int64_t Dv = D - D % kLanes;
  for (int64_t k = 0; k < nm; ++k) {
    const float* m = M + k * D;
    v8 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = v8{};
    for (int64_t d = 0; d < Dv; d += kLanes) {
      const v8 b0 = load8(m + d), b1 = load8(m + d + 8);
      for (int r = 0; r < R; ++r) {
        acc0[r] += load8(xs[r] + d) * b0;
        acc1[r] += load8(xs[r] + d + 8) * b1;
      }
    }
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc0[r] + acc1[r]);
      for (int64_t d = Dv; d < D; ++d) s += xs[r][d] * m[d];
      dots[r * ldd + k] = s;
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* x = xs[r];
    v8 a0{}, a1{};
    if (w2 != nullptr) {
      for (int64_t d = 0; d < Dv; d += kLanes) {
        const v8 x0 = load8(x + d), x1 = load8(x + d + 8);
        a0 += load8(w2 + d) * x0 * x0;
        a1 += load8(w2 + d + 8) * x1 * x1;
      }
    } else {
      for (int64_t d = 0; d < Dv; d += kLanes) {
        const v8 x0 = load8(x + d), x1 = load8(x + d + 8);
        a0 += x0 * x0;
        a1 += x1 * x1;
      }
    }
    float s = hsum(a0 + a1);
    for (int64_t d = Dv; d < D; ++d) s += (w2 != nullptr ? w2[d] : 1.f) * x[d] * x[d];
    sq[r] = s;
  }
}

void multi_dot_n(int n, const float* const* xs, const float* M, int64_t nm, int64_t D, const float* w2,
                 float* dots, int64_t ldd, float* sq) {
  switch (n) {
    case 4: multi_dot<4>(xs, M, nm, D, w2, dots, ldd, sq); break;
    case 3: multi_dot<3>(xs, M, nm, D, w2, dots, ldd, sq); break;
    case 2: multi_dot<2>(xs, M, nm, D, w2, dots, ldd, sq); break;
    default: multi_dot<1>(xs, M, nm, D, w2, dots, ldd, sq); break;
  }
}

// fp32 copy of one row; with center, subtracts the mean and returns the variance.
template <typename T>
float load_row(const T* __restrict src, int64_t D, float* __restrict dst, bool center) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  if (!center) return 0.f;
  const int64_t Dv = D - D % kLanes;
  v8 a0{}, a1{};
  for (int64_t d = 0; d < Dv; d += kLanes) {
    a0 += load8(dst + d);
    a1 += load8(dst + d + 8);
  }
  float sum = hsum(a0 + a1);
  for (int64_t d = Dv; d < D; ++d) sum += dst[d];
  const float mu = sum / static_cast<float>(D);
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    dst[d] -= mu;
    ss += dst[d] * dst[d];
  }
  return ss / static_cast<float>(D);
}

// The metric of one (sample, space) from its K cosines.
float metric_from_cos(const float* cos, int64_t K, int64_t y, int64_t metric) {
  const float cy = cos[y];
  if (metric == kMetricCosine) return 1.f - cy;
  if (metric == kMetricCe) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < K; ++j) mx = std::max(mx, cos[j]);
    float se = 0.f;
    for (int64_t j = 0; j < K; ++j) se += std::exp(cos[j] - mx);
    return mx + std::log(se) - cy;
  }
  int64_t larger = 0;
  for (int64_t j = 0; j < K; ++j) larger += cos[j] > cy ? 1 : 0;
  return 1.f + static_cast<float>(larger);
}

template <typename scalar_t>
void run_cpu(const Prepared& p, float* out) {
  const int64_t B = p.B, S = p.S, D = p.D, K = p.K;
  const bool lens = p.lens_kind != kLensNone;
  const bool ln = p.lens_kind == kLensLayerNorm;
  const bool has_bias = ln && p.bias.defined();
  const float* bases = p.bases.data_ptr<float>();

  // Per-call precomputation (O(K D)): |b_j|, the lens-folded matrix [g*b_0..g*b_{K-1}, g*beta], g^2,
  // <beta, b_j>, |beta|^2.
  std::vector<float> bnorm(K);
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t d = 0; d < D; ++d) s += static_cast<double>(bases[k * D + d]) * bases[k * D + d];
    bnorm[k] = std::max(static_cast<float>(std::sqrt(s)), kCosEps);
  }
  const int64_t nm_lens = K + (has_bias ? 1 : 0);
  std::vector<float> folded, w2, bbeta(K, 0.f);
  float beta2 = 0.f;
  if (lens) {
    const float* g = p.weight.data_ptr<float>();
    folded.resize(nm_lens * D);
    w2.resize(D);
    for (int64_t d = 0; d < D; ++d) w2[d] = g[d] * g[d];
    for (int64_t k = 0; k < K; ++k)
      for (int64_t d = 0; d < D; ++d) folded[k * D + d] = g[d] * bases[k * D + d];
    if (has_bias) {
      const float* beta = p.bias.data_ptr<float>();
      double b2 = 0.0;
      for (int64_t d = 0; d < D; ++d) {
        folded[K * D + d] = g[d] * beta[d];
        b2 += static_cast<double>(beta[d]) * beta[d];
      }
      beta2 = static_cast<float>(b2);
      for (int64_t k = 0; k < K; ++k) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) s += static_cast<double>(beta[d]) * bases[k * D + d];
        bbeta[k] = static_cast<float>(s);
      }
    }
  }

  std::vector<const scalar_t*> base_ptr(S);
  for (int64_t s = 0; s < S; ++s) base_ptr[s] = p.views[s].data_ptr<scalar_t>();
  const int64_t* li = p.last_index.data_ptr<int64_t>();
  const int64_t* lab = p.labels.data_ptr<int64_t>();

  const int64_t chunks = (S + kChunk - 1) / kChunk;
  const int64_t items = B * chunks;
  const int64_t flops_per_item = std::min<int64_t>(kChunk, S) * D * (K + 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(flops_per_item, 1));

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(kRows * D);
    std::vector<float> dots(kRows * (nm_lens + 1));
    std::vector<float> cos(K);
    float var[kRows], sq[kRows];
    const float* xs[kRows];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t s0 = (item % chunks) * kChunk;
      const int64_t s1 = std::min(s0 + kChunk, S);
      const int64_t t = li[b];
      const int64_t y = lab[b];
      for (int64_t sg = s0; sg < s1;) {
        // A group of up to kRows spaces that share one matrix: lensed spaces together, the last space alone.
        const bool lensed = lens && sg < S - 1;
        int n = 0;
        while (n < kRows && sg + n < s1 && (lensed == (lens && sg + n < S - 1))) ++n;
        for (int r = 0; r < n; ++r) {
          const int64_t s = sg + r;
          const scalar_t* row = base_ptr[s] + b * p.batch_stride[s] + t * p.time_stride[s];
          var[r] = load_row(row, D, buf.data() + r * D, lensed && ln);
          xs[r] = buf.data() + r * D;
        }
        const int64_t nm = lensed ? nm_lens : K;
        multi_dot_n(n, xs, lensed ? folded.data() : bases, nm, D, lensed ? w2.data() : nullptr, dots.data(), nm,
                    sq);
        for (int r = 0; r < n; ++r) {
          const float* dr = dots.data() + r * nm;
          float xx = sq[r];
          float scale = 1.f;
          if (lensed && has_bias) {
            scale = 1.f / std::sqrt(var[r] + static_cast<float>(p.eps));
            xx = scale * scale * sq[r] + 2.f * scale * dr[K] + beta2;
          }
          const float nx = std::max(std::sqrt(std::max(xx, 0.f)), kCosEps);
          for (int64_t k = 0; k < K; ++k) {
            const float dot = (lensed && has_bias) ? scale * dr[k] + bbeta[k] : dr[k];
            cos[k] = dot / (nx * bnorm[k]);
          }
          out[b * S + sg + r] = metric_from_cos(cos.data(), K, y, p.metric);
        }
        sg += n;
      }
    }
  });
}

void check_ranges_cpu(const Prepared& p) {
  const int64_t* li = p.last_index.data_ptr<int64_t>();
  const int64_t* lab = p.labels.data_ptr<int64_t>();
  const int64_t t_min = *std::min_element(p.time_len.begin(), p.time_len.end());
  for (int64_t b = 0; b < p.B; ++b) {
    TORCH_CHECK(lab[b] >= 0 && lab[b] < p.K, "salf::deviations: label index ", lab[b], " of sample ", b,
                " is outside 0..K-1 = 0..", p.K - 1);
    TORCH_CHECK(li[b] >= 0 && li[b] < t_min, "salf::deviations: last_index ", li[b], " of sample ", b,
                " is outside 0..T-1 = 0..", t_min - 1);
  }
}

at::Tensor deviations_cpu(const std::vector<at::Tensor>& states, const at::Tensor& last_index,
                          const at::Tensor& labels, const at::Tensor& bases, const c10::optional<at::Tensor>& weight,
                          const c10::optional<at::Tensor>& bias, int64_t lens_kind, double eps, int64_t metric) {
  Prepared p = prepare(states, last_index, labels, bases, weight, bias, lens_kind, eps, metric);
  auto out = at::empty({p.B, p.S}, p.bases.options());
  if (p.B == 0) return out;
  check_ranges_cpu(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.views[0].scalar_type(), "salf_deviations_cpu",
                                  [&] { run_cpu<scalar_t>(p, out.data_ptr<float>()); });
  return out;
}

}  // namespace

}  // namespace salf

TORCH_LIBRARY(salf, m) {
  m.def(
      "deviations(Tensor[] states, Tensor last_index, Tensor labels, Tensor bases, Tensor? lens_weight, "
      "Tensor? lens_bias, int lens_kind, float eps, int metric) -> Tensor");
}

TORCH_LIBRARY_IMPL(salf, CPU, m) {
  m.impl("deviations", &salf::deviations_cpu);
}
