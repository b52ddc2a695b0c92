// The fused Ranger step for the low-memory state layouts ("16bit" and "8bit",
// ranger_plugins/_low_memory.py) on CPU: one call steps every param of a list, in place.
//
// Each param is walked in its memory order, one chunk of 256 elements (one 8-bit block) at a
// time: the chunk's gradient (GC-centered) goes to a small float buffer in L1 cache, then one
// loop decodes the moments, updates them, the param and slow_delta, and writes them back (8-bit
// moments via two more buffers: their codes need the block's new maxima), so memory is read
// and written once. The arithmetic is `_step_chunk` of _low_memory.py operation by operation,
// in float32, including where torch's CPU kernels fuse a multiply and an add into one
// rounding, so that the two give the same bits (square roots are IEEE: see
// tests/test_fused_low_memory.py on torch's MKL sqrt).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int64_t kBlock = 256;  // elements per 8-bit block (one scale each), and per chunk
// Elements per unit of parallel work (a multiple of kBlock), as in ranger_rows.cpp.
constexpr int64_t kTaskNumel = int64_t{1} << 15;

// torch's lerp, addcmul and add(alpha) fuse a * b + c into one rounding where its vector
// kernels have FMA (x86 AVX2/AVX-512 builds, ARM); the build targets the same vector width,
// so fuse exactly where the reference's torch ops do.
inline float multiply_add(float a, float b, float c) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// torch.lerp as its vector kernel computes it: exact at both ends.
inline float lerp(float start, float end, float weight) {
  return weight < 0.5f ? multiply_add(weight, end - start, start)
                       : multiply_add(weight - 1.0f, end - start, end);
}

inline uint32_t bits_of(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float float_of(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline float from_bf16(uint16_t bf16) { return float_of(static_cast<uint32_t>(bf16) << 16); }

// Round to nearest even, as c10::BFloat16 does; written branch-free so the loops vectorize.
inline uint16_t to_bf16(float value) {
  const uint32_t bits = bits_of(value);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return value != value ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

// `random16` of _low_memory.py: 16 pseudo-random bits from (memory index, step), so a run is
// reproducible bit for bit and torch's random stream is untouched.
inline uint32_t random16(int64_t index, uint32_t step_key) {
  uint32_t x = static_cast<uint32_t>(index) + step_key;
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  x ^= x >> 16;
  return x >> 16;
}

// Stochastic rounding of a v >= 0 to bf16: add random bits below the kept 16, truncate.
inline uint16_t to_bf16_stochastic(float value, uint32_t random) {
  return static_cast<uint16_t>((bits_of(value) + random) >> 16);
}

// How a param (and gradient) dtype converts to and from the float32 work dtype. bfloat16 is
// handled as raw bits, the conversions above, which vectorize where c10's may not.
template <typename P>
struct ParamType {
  using Storage = P;
  static float load(P value) { return static_cast<float>(value); }
  static P store(float value) { return static_cast<P>(value); }
};

template <>
struct ParamType<at::BFloat16> {
  using Storage = uint16_t;
  static float load(uint16_t value) { return from_bf16(value); }
  static uint16_t store(float value) { return to_bf16(value); }
};

struct Hyperparameters {
  float decay, beta1_weight, beta2, beta2_weight, eps, step_size, keep;  // keep = 1 - alpha
  uint32_t step_key;  // step * golden ratio (mod 2^32): the stochastic rounding's offset
};

// One param's tensors as raw pointers, all indexed by memory position (the tensors share the
// param's strides).
struct LowMemoryParam {
  void* param;
  const void* grad;
  void* exp_avg;          // bf16 (16bit) or int8 codes (8bit)
  void* exp_avg_sq;       // bf16 (16bit) or uint8 codes (8bit)
  float* exp_avg_scale;   // 8bit: one per block
  float* exp_avg_sq_scale;
  uint16_t* slow_delta;   // bf16
  at::ScalarType dtype;
  bool eight_bit;
  int64_t row_length;  // GC's rows (rows are contiguous in memory); 0 without GC
  float* row_means;    // GC: one per row
};

// A range of one param's memory: the unit of parallel work. `begin` is a multiple of kBlock,
// so every 8-bit block lies in one task.
struct Task {
  int64_t param_index, begin, end;
};

// The float32 buffers of one chunk.
struct Chunk {
  int64_t begin, size;  // memory position of the first element, elements (<= kBlock)
  float grad[kBlock], exp_avg[kBlock], exp_avg_sq[kBlock];
};

// ------------------------------------------------------------------------ GC's row means

template <typename P>
float row_mean(const LowMemoryParam& lp, int64_t row) {
  using Type = ParamType<P>;
  const auto* g = static_cast<const typename Type::Storage*>(lp.grad) + row * lp.row_length;
  // Summed in double, then rounded once: the mean no longer depends on the order of the
  // additions, so it has the bits of the torch step's float64 mean (`_low_memory._row_means`).
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < lp.row_length; ++j) sum += static_cast<double>(Type::load(g[j]));
  return static_cast<float>(sum / static_cast<double>(lp.row_length));
}

// The chunk's gradient in float, minus its rows' means where GC applies.
template <typename P>
void load_gradient(const LowMemoryParam& lp, Chunk& chunk) {
  using Type = ParamType<P>;
  const auto* g = static_cast<const typename Type::Storage*>(lp.grad) + chunk.begin;
  const int64_t length = lp.row_length;
  for (int64_t j = 0; j < chunk.size;) {  // one pass per row the chunk overlaps
    const int64_t row = length > 0 ? (chunk.begin + j) / length : 0;
    const int64_t stop = length > 0 ? std::min(chunk.size, (row + 1) * length - chunk.begin)
                                    : chunk.size;
    const float mean = length > 0 ? lp.row_means[row] : 0.0f;
#pragma omp simd
    for (int64_t k = j; k < stop; ++k) chunk.grad[k] = Type::load(g[k]) - mean;
    j = stop;
  }
}

// ------------------------------------------------------------------------ the two layouts

// How the update loop reads a chunk's moments and writes the new ones, per layout. Both are
// copied into the loop's function, so their fields stay in registers.
//
// 16bit: bf16 in the state tensors, read and written in the update loop itself.
struct Bf16Moments {
  uint16_t* m;
  uint16_t* v;
  int64_t begin;  // memory position of the chunk: the stochastic rounding's index
  uint32_t step_key;

  Bf16Moments(const LowMemoryParam& lp, const Chunk& chunk, uint32_t key)
      : m(static_cast<uint16_t*>(lp.exp_avg) + chunk.begin),
        v(static_cast<uint16_t*>(lp.exp_avg_sq) + chunk.begin),
        begin(chunk.begin),
        step_key(key) {}
  float exp_avg(int64_t j) const { return from_bf16(m[j]); }
  float exp_avg_sq(int64_t j) const { return from_bf16(v[j]); }
  void store(int64_t j, float new_m, float new_v) const {
    m[j] = to_bf16(new_m);
    // Stochastic: with beta2 = 0.999 a step moves v by less than half a bf16 ulp.
    v[j] = to_bf16_stochastic(new_v, random16(begin + j, step_key));
  }
};

// 8bit: codes relative to the block's largest magnitude S, m = S * c * |c| / 127^2 (signed
// square-root code) and v = S * (c / 255)^4 (fourth-root code). The new values go to the
// chunk's buffers: encoding them needs the block's new maxima (`encode_exp_avg_8bit`, ...).
struct EightBitMoments {
  const int8_t* m;
  const uint8_t* v;
  float m_factor, v_scale;
  float* new_m;
  float* new_v;

  EightBitMoments(const LowMemoryParam& lp, Chunk& chunk)
      : m(static_cast<const int8_t*>(lp.exp_avg) + chunk.begin),
        v(static_cast<const uint8_t*>(lp.exp_avg_sq) + chunk.begin),
        m_factor(lp.exp_avg_scale[chunk.begin / kBlock] / 16129.0f),
        v_scale(lp.exp_avg_sq_scale[chunk.begin / kBlock]),
        new_m(chunk.exp_avg),
        new_v(chunk.exp_avg_sq) {}
  float exp_avg(int64_t j) const {
    const float level = static_cast<float>(m[j]);
    return (level * std::fabs(level)) * m_factor;
  }
  float exp_avg_sq(int64_t j) const {
    const float fraction = static_cast<float>(v[j]) * static_cast<float>(1.0 / 255.0);
    const float squared = fraction * fraction;
    return (squared * squared) * v_scale;
  }
  void store(int64_t j, float m_value, float v_value) const {
    new_m[j] = m_value;
    new_v[j] = v_value;
  }
};

inline float inverse(float scale) { return scale > 0.0f ? 1.0f / scale : 0.0f; }

// Round half to even for 0 <= y < 2^22, as torch.round: adding 1.5 * 2^23 leaves no fraction
// bits, so the float addition itself rounds (and vectorizes, unlike a libm call).
inline float round_half_even(float y) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  return (y + kShift) - kShift;
}

void encode_exp_avg_8bit(const LowMemoryParam& lp, const Chunk& chunk) {
  float scale = 0.0f;
#pragma omp simd reduction(max : scale)
  for (int64_t j = 0; j < chunk.size; ++j) scale = std::max(scale, std::fabs(chunk.exp_avg[j]));
  const float inv = inverse(scale);
  auto* m = static_cast<int8_t*>(lp.exp_avg) + chunk.begin;
  const int64_t size = chunk.size;  // a local, as in encode_exp_avg_sq_8bit
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) {
    const float value = chunk.exp_avg[j];
    const float level = round_half_even(std::sqrt(std::fabs(value) * inv) * 127.0f);
    m[j] = static_cast<int8_t>(value < 0.0f ? -level : level);
  }
  lp.exp_avg_scale[chunk.begin / kBlock] = scale;
}

void encode_exp_avg_sq_8bit(const LowMemoryParam& lp, const Chunk& chunk, uint32_t step_key) {
  float scale = 0.0f;
#pragma omp simd reduction(max : scale)
  for (int64_t j = 0; j < chunk.size; ++j) scale = std::max(scale, chunk.exp_avg_sq[j]);
  const float inv = inverse(scale);
  auto* v = static_cast<uint8_t*>(lp.exp_avg_sq) + chunk.begin;
  // Locals: the chunk's fields might alias the uint8_t stores (which would stop vectorization).
  const int64_t begin = chunk.begin, size = chunk.size;
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) {
    const float value = chunk.exp_avg_sq[j];
    const float level = std::sqrt(std::sqrt(value * inv)) * 255.0f;
    // random16 < 2^16: converted as a signed int, which has a vector instruction.
    const auto random = static_cast<int32_t>(random16(begin + j, step_key));
    const float offset = static_cast<float>(random) * (1.0f / 65536.0f);
    // floor by truncation: level + offset >= 0.
    int32_t code = std::min(static_cast<int32_t>(level + offset), int32_t{255});
    // Never 0 for a v > 0: m / sqrt(v) would become m / eps. (Arithmetic, not a branch,
    // so the loop vectorizes.)
    code += (value > 0.0f) & (code == 0);
    v[j] = static_cast<uint8_t>(code);
  }
  lp.exp_avg_sq_scale[begin / kBlock] = scale;
}

// ------------------------------------------------------------------------ the step

// The update of the chunk's params, slow_delta and moments: the operations of `_step_chunk`.
// The layout and flags are template parameters so that the loop is branch-free and vectorizes.
template <typename P, typename Moments, bool adaptive, bool sync>
void update_chunk(const LowMemoryParam& lp, const Chunk& chunk, const Moments moments,
                  const Hyperparameters& hp) {
  using Type = ParamType<P>;
  auto* p = static_cast<typename Type::Storage*>(lp.param) + chunk.begin;
  uint16_t* d = lp.slow_delta + chunk.begin;
  const float* grad = chunk.grad;
  const int64_t size = chunk.size;  // locals: the stores must not look like they change them
#pragma omp simd
  for (int64_t j = 0; j < size; ++j) {
    const float g = grad[j];
    const float m = lerp(moments.exp_avg(j), g, hp.beta1_weight);
    const float v = multiply_add(hp.beta2_weight * g, g, moments.exp_avg_sq(j) * hp.beta2);
    const float old = Type::load(p[j]);
    float fast = old * hp.decay;
    if constexpr (adaptive) {
      fast = fast + (hp.step_size * m) / (std::sqrt(v) + hp.eps);  // torch.addcdiv
    } else {
      fast = multiply_add(hp.step_size, m, fast);  // torch.add(alpha=...)
    }
    auto updated = Type::store(fast);  // d must see the param's rounding
    float delta = from_bf16(d[j]) + (Type::load(updated) - old);
    if constexpr (sync) {  // slow + alpha * (fast - slow) = fast - (1 - alpha) * d
      updated = Type::store(multiply_add(-hp.keep, delta, Type::load(updated)));
      delta = 0.0f;
    }
    p[j] = updated;
    d[j] = to_bf16(delta);
    moments.store(j, m, v);
  }
}

template <typename P, bool adaptive, bool sync>
void step_task(const LowMemoryParam& lp, const Task& task, const Hyperparameters& hp) {
  const int64_t length = lp.row_length;
  // This task computes the means of the rows that lie inside it, each just before its first
  // chunk (the row is then in cache for its chunks); rows that cross the task's ends were
  // computed before the tasks started (`straddling_rows`).
  int64_t next_row = length > 0 ? (task.begin + length - 1) / length : 0;
  Chunk chunk;
  for (chunk.begin = task.begin; chunk.begin < task.end; chunk.begin += kBlock) {
    chunk.size = std::min(kBlock, task.end - chunk.begin);
    for (; length > 0 && next_row * length < chunk.begin + chunk.size &&
           (next_row + 1) * length <= task.end;
         ++next_row)
      lp.row_means[next_row] = row_mean<P>(lp, next_row);
    load_gradient<P>(lp, chunk);
    if (lp.eight_bit) {
      update_chunk<P, EightBitMoments, adaptive, sync>(lp, chunk, EightBitMoments(lp, chunk), hp);
      encode_exp_avg_8bit(lp, chunk);
      encode_exp_avg_sq_8bit(lp, chunk, hp.step_key);
    } else {
      update_chunk<P, Bf16Moments, adaptive, sync>(lp, chunk, Bf16Moments(lp, chunk, hp.step_key),
                                                   hp);
    }
  }
}

template <typename P>
void step_task(const LowMemoryParam& lp, const Task& task, const Hyperparameters& hp,
               bool adaptive, bool sync) {
  if (adaptive) {
    sync ? step_task<P, true, true>(lp, task, hp) : step_task<P, true, false>(lp, task, hp);
  } else {
    sync ? step_task<P, false, true>(lp, task, hp) : step_task<P, false, false>(lp, task, hp);
  }
}

void step_task(const LowMemoryParam& lp, const Task& task, const Hyperparameters& hp,
               bool adaptive, bool sync) {
  switch (lp.dtype) {
    case at::kFloat: return step_task<float>(lp, task, hp, adaptive, sync);
    case at::kBFloat16: return step_task<at::BFloat16>(lp, task, hp, adaptive, sync);
    case at::kHalf: return step_task<at::Half>(lp, task, hp, adaptive, sync);
    default: TORCH_CHECK(false, "ranger_step_low_memory_: unsupported dtype");  // see `fits`
  }
}

float row_mean(const LowMemoryParam& lp, int64_t row) {
  switch (lp.dtype) {
    case at::kFloat: return row_mean<float>(lp, row);
    case at::kBFloat16: return row_mean<at::BFloat16>(lp, row);
    case at::kHalf: return row_mean<at::Half>(lp, row);
    default: TORCH_CHECK(false, "ranger_step_low_memory_: unsupported dtype");
  }
}

// ------------------------------------------------------------------------ checks and tasks

bool plain_like(const at::Tensor& tensor, const at::Tensor& param) {
  return tensor.defined() && tensor.layout() == at::kStrided && tensor.device().is_cpu() &&
         !tensor.is_conj() && !tensor.is_neg() && tensor.is_non_overlapping_and_dense() &&
         tensor.sizes() == param.sizes() && tensor.strides() == param.strides();
}

bool scales_fit(const at::Tensor& scale, const at::Tensor& param) {
  const int64_t blocks = (param.numel() + kBlock - 1) / kBlock;
  return scale.defined() && scale.layout() == at::kStrided && scale.device().is_cpu() &&
         scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.numel() == blocks &&
         scale.is_contiguous();
}

// Whether the kernel can step this param: a plain dense CPU param of float32, bfloat16 or
// float16; its gradient and state tensors of its shape and strides (one memory order); the
// state in one of the two layouts; and, for GC, dim 0 outermost, so each row is one
// contiguous range of memory.
bool fits(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
          const at::Tensor& exp_avg_sq, const at::Tensor& exp_avg_scale,
          const at::Tensor& exp_avg_sq_scale, const at::Tensor& slow_delta, bool centralize) {
  const auto dtype = param.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) return false;
  for (const at::Tensor* tensor : {&param, &grad, &exp_avg, &exp_avg_sq, &slow_delta})
    if (!plain_like(*tensor, param)) return false;
  if (grad.scalar_type() != dtype || slow_delta.scalar_type() != at::kBFloat16) return false;
  if (exp_avg.scalar_type() == at::kBFloat16) {  // 16bit: no scales
    if (exp_avg_sq.scalar_type() != at::kBFloat16) return false;
    for (const at::Tensor* scale : {&exp_avg_scale, &exp_avg_sq_scale})
      if (scale->defined() && scale->numel() != 0) return false;
  } else if (exp_avg.scalar_type() == at::kChar) {  // 8bit
    if (exp_avg_sq.scalar_type() != at::kByte || !scales_fit(exp_avg_scale, param) ||
        !scales_fit(exp_avg_sq_scale, param))
      return false;
  } else {
    return false;
  }
  if (centralize && param.size(0) > 1) {
    const auto strides = param.strides();
    if (strides[0] != *std::max_element(strides.begin(), strides.end())) return false;
  }
  return true;
}

// Elements per task of a param: whole blocks, and where possible whole GC rows too (a
// multiple of both), so that few rows cross a task's ends.
int64_t task_numel(int64_t row_length) {
  if (row_length == 0) return kTaskNumel;
  const int64_t unit = std::lcm(row_length, kBlock);
  return unit <= kTaskNumel ? kTaskNumel / unit * unit : kTaskNumel;
}

void add_tasks(std::vector<Task>& tasks, int64_t index, int64_t numel, int64_t row_length) {
  const int64_t size = task_numel(row_length);
  for (int64_t begin = 0; begin < numel; begin += size)
    tasks.push_back({index, begin, std::min(begin + size, numel)});
}

// The GC rows that cross a task boundary: several tasks need their means, so they are
// computed before the tasks run, once each.
std::vector<std::pair<int64_t, int64_t>> straddling_rows(const std::vector<Task>& tasks,
                                                          const std::vector<LowMemoryParam>& lps) {
  std::vector<std::pair<int64_t, int64_t>> rows;  // (param index, row)
  for (const Task& task : tasks) {
    const int64_t length = lps[task.param_index].row_length;
    if (length == 0 || task.begin % length == 0) continue;
    const std::pair<int64_t, int64_t> row{task.param_index, task.begin / length};
    if (rows.empty() || rows.back() != row) rows.push_back(row);
  }
  return rows;
}

}  // namespace

// Steps every param it fits (see `fits`) and returns the positions of those it did not step.
// Per param: exp_avg and exp_avg_sq are bf16 (the 16bit layout; pass empty scales) or int8 and
// uint8 codes with their float32 block scales (8bit); slow_delta is bf16. hyperparameters:
// decay (1 - lr * weight_decay), 1 - beta1, beta2, 1 - beta2, eps, -lr * rectification
// multiplier, 1 - lookahead alpha. GC applies to params with more than `gc_min_dim`
// dimensions. `step` is the params' step count (after its increment).
std::vector<int64_t> ranger_step_low_memory_(
    const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
    const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
    const std::vector<at::Tensor>& exp_avg_scales, const std::vector<at::Tensor>& exp_avg_sq_scales,
    const std::vector<at::Tensor>& slow_deltas, const std::vector<double>& hyperparameters,
    int64_t gc_min_dim, bool adaptive, bool sync, int64_t step) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  exp_avg_scales.size() == n && exp_avg_sq_scales.size() == n &&
                  slow_deltas.size() == n,
              "ranger_step_low_memory_: expected seven lists of the same length");
  TORCH_CHECK(hyperparameters.size() == 7, "ranger_step_low_memory_: expected 7 hyperparameters");
  const auto& h = hyperparameters;
  const Hyperparameters hp{static_cast<float>(h[0]), static_cast<float>(h[1]),
                           static_cast<float>(h[2]), static_cast<float>(h[3]),
                           static_cast<float>(h[4]), static_cast<float>(h[5]),
                           static_cast<float>(h[6]),
                           static_cast<uint32_t>(step) * 0x9E3779B9u};

  std::vector<int64_t> not_stepped;
  std::vector<bool> stepped(n, false);
  std::vector<LowMemoryParam> lps(n);
  std::vector<std::vector<float>> row_means(n);
  std::vector<Task> tasks;
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = params[i];
    const bool centralize = param.dim() > gc_min_dim;
    if (!fits(param, grads[i], exp_avgs[i], exp_avg_sqs[i], exp_avg_scales[i],
              exp_avg_sq_scales[i], slow_deltas[i], centralize)) {
      not_stepped.push_back(static_cast<int64_t>(i));
      continue;
    }
    stepped[i] = true;
    if (param.numel() == 0) continue;
    const bool eight_bit = exp_avgs[i].scalar_type() == at::kChar;
    const int64_t row_length = centralize ? param.numel() / param.size(0) : 0;
    if (centralize) row_means[i].resize(param.size(0));
    lps[i] = {param.data_ptr(),
              grads[i].data_ptr(),
              exp_avgs[i].data_ptr(),
              exp_avg_sqs[i].data_ptr(),
              eight_bit ? exp_avg_scales[i].data_ptr<float>() : nullptr,
              eight_bit ? exp_avg_sq_scales[i].data_ptr<float>() : nullptr,
              reinterpret_cast<uint16_t*>(slow_deltas[i].data_ptr()),
              param.scalar_type(),
              eight_bit,
              row_length,
              row_means[i].data()};
    add_tasks(tasks, static_cast<int64_t>(i), param.numel(), row_length);
  }

  const auto straddling = straddling_rows(tasks, lps);
  at::parallel_for(0, static_cast<int64_t>(straddling.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const LowMemoryParam& lp = lps[straddling[k].first];
      lp.row_means[straddling[k].second] = row_mean(lp, straddling[k].second);
    }
  });
  // Threads split the elements evenly, not the tasks (as in ranger_rows.cpp): each runs the
  // tasks that start in its range of elements.
  std::vector<int64_t> starts(tasks.size() + 1, 0);
  for (size_t k = 0; k < tasks.size(); ++k)
    starts[k + 1] = starts[k] + (tasks[k].end - tasks[k].begin);
  at::parallel_for(0, starts.back(), kTaskNumel, [&](int64_t begin, int64_t end) {
    auto k = std::lower_bound(starts.begin(), starts.end() - 1, begin) - starts.begin();
    for (; k < static_cast<int64_t>(tasks.size()) && starts[k] < end; ++k)
      step_task(lps[tasks[k].param_index], tasks[k], hp, adaptive, sync);
  });

  // In-place writes through raw pointers: bump the version counters as in-place ops would.
  for (size_t i = 0; i < n; ++i) {
    if (!stepped[i]) continue;
    for (const at::Tensor* tensor : {&params[i], &exp_avgs[i], &exp_avg_sqs[i], &slow_deltas[i]})
      torch::autograd::impl::bump_version(*tensor);
    if (exp_avgs[i].scalar_type() == at::kChar) {
      torch::autograd::impl::bump_version(exp_avg_scales[i]);
      torch::autograd::impl::bump_version(exp_avg_sq_scales[i]);
    }
  }
  return not_stepped;
}
