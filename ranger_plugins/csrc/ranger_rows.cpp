// The fused Ranger step on CPU, one row at a time: Gradient Centralization's row mean, then the
// update of the row while it is still in L1 cache. Same operations, in the same order, as
// `_fused._ranger_kernel` (and so as the default path); see ranger_plugins/_cpu_kernel.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// torch.lerp's formula: exact at both ends, whichever side the weight is on.
template <typename T>
inline T lerp(T start, T end, T weight) {
  return weight < T(0.5) ? start + weight * (end - start)
                         : end - (end - start) * (T(1) - weight);
}

// The flags are template parameters so that each variant's inner loop is branch-free and
// vectorizes (a division under a runtime condition is not vectorized: it might trap).
template <typename T, bool centralize, bool adaptive, bool sync>
void step_rows(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, T* slow, int64_t rows,
               int64_t row_length, const std::vector<double>& h) {
  const T decay = static_cast<T>(h[0]);
  const T beta1_weight = static_cast<T>(h[1]);
  const T beta2 = static_cast<T>(h[2]);
  const T beta2_weight = static_cast<T>(h[3]);
  const T eps = static_cast<T>(h[4]);
  const T neg_step_size = static_cast<T>(h[5]);
  const T lookahead_alpha = static_cast<T>(h[6]);
  // Rows per task: at least ~32K elements, so small blocks do not pay for a thread handoff.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(row_length, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * row_length;
      T* p = param + offset;
      const T* g = grad + offset;
      T* m = exp_avg + offset;
      T* v = exp_avg_sq + offset;
      T* s = slow + offset;
      T mean = 0;
      if constexpr (centralize) {
        // The row is then in L1 cache for the update below.
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < row_length; ++j) sum += g[j];
        mean = sum / static_cast<T>(row_length);
      }
#pragma omp simd
      for (int64_t j = 0; j < row_length; ++j) {
        const T centered = g[j] - mean;
        const T new_m = lerp(m[j], centered, beta1_weight);
        const T new_v = v[j] * beta2 + beta2_weight * centered * centered;
        T update = new_m;  // not adaptive (RAdam's first steps): momentum SGD
        if constexpr (adaptive) update = new_m / (std::sqrt(new_v) + eps);
        T fast = p[j] * decay + neg_step_size * update;
        if constexpr (sync) {
          fast = lerp(s[j], fast, lookahead_alpha);
          s[j] = fast;
        }
        p[j] = fast;
        m[j] = new_m;
        v[j] = new_v;
      }
    }
  });
}

template <typename T>
void step_rows(T* param, const T* grad, T* exp_avg, T* exp_avg_sq, T* slow, int64_t rows,
               int64_t row_length, const std::vector<double>& h, bool centralize,
               bool adaptive, bool sync) {
#define RANGER_ROWS_CALL(C, A, S) \
  step_rows<T, C, A, S>(param, grad, exp_avg, exp_avg_sq, slow, rows, row_length, h)
  if (centralize) {
    if (adaptive) {
      sync ? RANGER_ROWS_CALL(true, true, true) : RANGER_ROWS_CALL(true, true, false);
    } else {
      sync ? RANGER_ROWS_CALL(true, false, true) : RANGER_ROWS_CALL(true, false, false);
    }
  } else {
    if (adaptive) {
      sync ? RANGER_ROWS_CALL(false, true, true) : RANGER_ROWS_CALL(false, true, false);
    } else {
      sync ? RANGER_ROWS_CALL(false, false, true) : RANGER_ROWS_CALL(false, false, false);
    }
  }
#undef RANGER_ROWS_CALL
}

}  // namespace

// hyperparameters: decay (1 - lr * weight_decay), 1 - beta1, beta2, 1 - beta2, eps,
// -lr * rectification multiplier, lookahead alpha.
void ranger_rows_(const torch::Tensor& param, const torch::Tensor& grad,
                  const torch::Tensor& exp_avg, const torch::Tensor& exp_avg_sq,
                  const torch::Tensor& slow, const std::vector<double>& hyperparameters,
                  bool centralize, bool adaptive, bool sync) {
  TORCH_CHECK(hyperparameters.size() == 7, "ranger_rows_: expected 7 hyperparameters");
  TORCH_CHECK(param.dim() == 2, "ranger_rows_: expected 2-D (rows, row length) views");
  for (const auto* tensor : {&param, &grad, &exp_avg, &exp_avg_sq, &slow}) {
    TORCH_CHECK(tensor->device().is_cpu() && tensor->is_contiguous(),
                "ranger_rows_: expected contiguous CPU tensors");
    TORCH_CHECK(tensor->sizes() == param.sizes() && tensor->scalar_type() == param.scalar_type(),
                "ranger_rows_: expected tensors of one shape and dtype");
  }
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "ranger_rows_", [&] {
    step_rows<scalar_t>(param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                        exp_avg.data_ptr<scalar_t>(), exp_avg_sq.data_ptr<scalar_t>(),
                        slow.data_ptr<scalar_t>(), param.size(0), param.size(1),
                        hyperparameters, centralize, adaptive, sync);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // Other Python threads (data loading) run while a step streams memory.
  module.def("ranger_rows_", &ranger_rows_, "One fused Ranger step on (rows, row length) views",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
