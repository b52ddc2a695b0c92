// The fused Ranger step on CPU: one call steps every param of a list, in place, on the
// params' own tensors (no flat buffers, nothing aliased). Each param is cut into rows (GC's
// rows where Gradient Centralization applies, else chunks of the flattened tensor); each row's
// GC mean is taken, then the row is updated while it is still in L1 cache, so memory is read
// once. Same operations, in the same order, as `_single_tensor_ranger` (the reference); see
// ranger_plugins/_cpu_kernel.py.
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

struct Hyperparameters {
  double decay, beta1_weight, beta2, beta2_weight, eps, neg_step_size, lookahead_alpha;
};

// One param's five tensors as raw pointers: P is the param's (and gradient's) dtype, T the
// state's (float for bfloat16/float16 params, else P).
struct ParamPointers {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* slow;
  at::ScalarType dtype;
};

// A run of rows of one param: the unit of parallel work.
struct Rows {
  int64_t param_index;
  int64_t offset;  // first element
  int64_t count;   // rows
  int64_t length;  // elements per row
  bool centralize;
};

// The flags are template parameters so that each variant's inner loop is branch-free and
// vectorizes (a division under a runtime condition is not vectorized: it might trap).
template <typename P, typename T, bool centralize, bool adaptive, bool sync>
void step_rows(const ParamPointers& pointers, const Rows& rows, const Hyperparameters& hp) {
  const T decay = static_cast<T>(hp.decay);
  const T beta1_weight = static_cast<T>(hp.beta1_weight);
  const T beta2 = static_cast<T>(hp.beta2);
  const T beta2_weight = static_cast<T>(hp.beta2_weight);
  const T eps = static_cast<T>(hp.eps);
  const T neg_step_size = static_cast<T>(hp.neg_step_size);
  const T lookahead_alpha = static_cast<T>(hp.lookahead_alpha);
  for (int64_t row = 0; row < rows.count; ++row) {
    const int64_t offset = rows.offset + row * rows.length;
    P* p = static_cast<P*>(pointers.param) + offset;
    const P* g = static_cast<const P*>(pointers.grad) + offset;
    T* m = static_cast<T*>(pointers.exp_avg) + offset;
    T* v = static_cast<T*>(pointers.exp_avg_sq) + offset;
    T* s = static_cast<T*>(pointers.slow) + offset;
    T mean = 0;
    if constexpr (centralize) {
      // The row is then in L1 cache for the update below.
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < rows.length; ++j) sum += static_cast<T>(g[j]);
      mean = sum / static_cast<T>(rows.length);
    }
#pragma omp simd
    for (int64_t j = 0; j < rows.length; ++j) {
      const T centered = static_cast<T>(g[j]) - mean;
      const T new_m = lerp(m[j], centered, beta1_weight);
      const T new_v = v[j] * beta2 + beta2_weight * centered * centered;
      T update = new_m;  // not adaptive (RAdam's first steps): momentum SGD
      if constexpr (adaptive) update = new_m / (std::sqrt(new_v) + eps);
      T fast = static_cast<T>(p[j]) * decay + neg_step_size * update;
      if constexpr (sync) {
        fast = lerp(s[j], fast, lookahead_alpha);
        s[j] = fast;
      }
      p[j] = static_cast<P>(fast);
      m[j] = new_m;
      v[j] = new_v;
    }
  }
}

template <typename P, typename T>
void step_rows(const ParamPointers& pointers, const Rows& rows, const Hyperparameters& hp,
               bool adaptive, bool sync) {
#define RANGER_ROWS_CALL(C, A, S) step_rows<P, T, C, A, S>(pointers, rows, hp)
  if (rows.centralize) {
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

void step_rows(const ParamPointers& pointers, const Rows& rows, const Hyperparameters& hp,
               bool adaptive, bool sync) {
  switch (pointers.dtype) {
    case at::kFloat: return step_rows<float, float>(pointers, rows, hp, adaptive, sync);
    case at::kDouble: return step_rows<double, double>(pointers, rows, hp, adaptive, sync);
    case at::kBFloat16:
      return step_rows<at::BFloat16, float>(pointers, rows, hp, adaptive, sync);
    case at::kHalf: return step_rows<at::Half, float>(pointers, rows, hp, adaptive, sync);
    default: TORCH_CHECK(false, "ranger_step_: unsupported dtype");  // excluded by `fits`
  }
}

at::ScalarType state_dtype(at::ScalarType dtype) {
  return dtype == at::kBFloat16 || dtype == at::kHalf ? at::kFloat : dtype;
}

// Whether the kernel can step this param: plain dense CPU tensors of the dtypes above, the
// four others of its shape and strides, and dim 0 outermost, so that every GC row is one
// contiguous block of memory in all five.
bool fits(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
          const at::Tensor& exp_avg_sq, const at::Tensor& slow) {
  const auto dtype = param.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble && dtype != at::kBFloat16 && dtype != at::kHalf)
    return false;
  if (grad.scalar_type() != dtype) return false;
  const auto work = state_dtype(dtype);
  for (const at::Tensor* tensor : {&param, &grad, &exp_avg, &exp_avg_sq, &slow}) {
    if (!tensor->defined() || tensor->layout() != at::kStrided || !tensor->device().is_cpu() ||
        tensor->is_conj() || tensor->is_neg() || !tensor->is_non_overlapping_and_dense() ||
        tensor->sizes() != param.sizes() || tensor->strides() != param.strides())
      return false;
  }
  for (const at::Tensor* state : {&exp_avg, &exp_avg_sq, &slow})
    if (state->scalar_type() != work) return false;
  if (param.dim() > 0) {
    const auto strides = param.strides();
    if (param.size(0) > 1 && strides[0] != *std::max_element(strides.begin(), strides.end()))
      return false;
  }
  return true;
}

// Elements per unit of parallel work: enough that a task is not dominated by its handoff,
// few enough that the two cores share a model of a few tensors evenly.
constexpr int64_t kTaskNumel = int64_t{1} << 15;

void add_rows(std::vector<Rows>& work, int64_t index, const at::Tensor& param, bool centralize) {
  const int64_t numel = param.numel();
  if (numel == 0) return;
  const int64_t length = centralize ? numel / param.size(0) : std::min(numel, kTaskNumel);
  const int64_t total_rows = centralize ? param.size(0) : numel / length;
  const int64_t rows_per_task = std::max<int64_t>(1, kTaskNumel / length);
  for (int64_t first = 0; first < total_rows; first += rows_per_task) {
    const int64_t count = std::min(rows_per_task, total_rows - first);
    work.push_back({index, first * length, count, length, centralize});
  }
  const int64_t tail = numel - total_rows * length;  // not centralized: the last partial row
  if (tail > 0) work.push_back({index, total_rows * length, 1, tail, false});
}

}  // namespace

// Steps every param it fits (see `fits`) and returns the positions of those it did not step,
// for the caller to step another way. hyperparameters: decay
// (1 - lr * weight_decay), 1 - beta1, beta2, 1 - beta2, eps, -lr * rectification multiplier,
// lookahead alpha. GC applies to params with more than `gc_min_dim` dimensions (use_gc off:
// pass a large number).
std::vector<int64_t> ranger_step_(const std::vector<at::Tensor>& params,
                                  const std::vector<at::Tensor>& grads,
                                  const std::vector<at::Tensor>& exp_avgs,
                                  const std::vector<at::Tensor>& exp_avg_sqs,
                                  const std::vector<at::Tensor>& slows,
                                  const std::vector<double>& hyperparameters, int64_t gc_min_dim,
                                  bool adaptive, bool sync) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  slows.size() == n,
              "ranger_step_: expected five lists of the same length");
  TORCH_CHECK(hyperparameters.size() == 7, "ranger_step_: expected 7 hyperparameters");
  const auto& h = hyperparameters;
  const Hyperparameters hp{h[0], h[1], h[2], h[3], h[4], h[5], h[6]};

  std::vector<int64_t> not_stepped;
  std::vector<ParamPointers> pointers(n);
  std::vector<Rows> work;
  for (size_t i = 0; i < n; ++i) {
    if (!fits(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], slows[i])) {
      not_stepped.push_back(static_cast<int64_t>(i));
      continue;
    }
    pointers[i] = {params[i].data_ptr(),      grads[i].data_ptr(), exp_avgs[i].data_ptr(),
                   exp_avg_sqs[i].data_ptr(), slows[i].data_ptr(), params[i].scalar_type()};
    add_rows(work, static_cast<int64_t>(i), params[i], params[i].dim() > gc_min_dim);
  }
  // Threads split the elements, not the tasks, evenly: a model's tasks range from a whole
  // bias to a 32K-element block of a large weight. Each thread runs the tasks that start in
  // its range of elements.
  std::vector<int64_t> starts(work.size() + 1, 0);
  for (size_t task = 0; task < work.size(); ++task)
    starts[task + 1] = starts[task] + work[task].count * work[task].length;
  at::parallel_for(0, starts.back(), kTaskNumel, [&](int64_t begin, int64_t end) {
    auto task = std::lower_bound(starts.begin(), starts.end() - 1, begin) - starts.begin();
    for (; task < static_cast<int64_t>(work.size()) && starts[task] < end; ++task) {
      const Rows& rows = work[task];
      step_rows(pointers[rows.param_index], rows, hp, adaptive, sync);
    }
  });
  // In-place writes through raw pointers: bump the version counters as an in-place op would,
  // so autograd still notices a param it saved being changed.
  for (size_t i = 0, skipped = 0; i < n; ++i) {
    if (skipped < not_stepped.size() && not_stepped[skipped] == static_cast<int64_t>(i)) {
      ++skipped;
      continue;
    }
    for (const at::Tensor* tensor : {&params[i], &exp_avgs[i], &exp_avg_sqs[i], &slows[i]})
      torch::autograd::impl::bump_version(*tensor);
  }
  return not_stepped;
}

// ranger_low_memory.cpp: the step for the low-memory state layouts ("16bit", "8bit").
std::vector<int64_t> ranger_step_low_memory_(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<at::Tensor>& exp_avg_scales, const std::vector<at::Tensor>& exp_avg_sq_scales,
    const std::vector<at::Tensor>& slow_deltas, const std::vector<double>& hyperparameters,
    int64_t gc_min_dim, bool adaptive, bool sync, int64_t step);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  // Other Python threads (data loading) run while a step streams memory.
  module.def("ranger_step_", &ranger_step_,
             "One fused Ranger step on lists of per-param tensors; returns the positions of "
             "the params it could not step",
             pybind11::call_guard<pybind11::gil_scoped_release>());
  module.def("ranger_step_low_memory_", &ranger_step_low_memory_,
             "One fused Ranger step on lists of per-param tensors whose state is in the 16bit "
             "or 8bit layout; returns the positions of the params it could not step",
             pybind11::call_guard<pybind11::gil_scoped_release>());
}
