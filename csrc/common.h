// Shared helpers of the C++ CPU backend: input checks, compute dtype, (token, slot) pairs sorted by expert,
// and the activations of the FFN in a form the compiler vectorises.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace moelora {

using at::Tensor;

inline void check_cpu_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "moelora cpu backend: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "moelora cpu backend: ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_dim(const Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, "moelora cpu backend: ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
}

// fp32 for 16-bit and fp32 inputs, fp64 for fp64: the precision every op computes in (as the reference).
inline at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Used (token, slot) pairs sorted by expert by a stable counting sort: pair p of expert e lies in
// [offsets[e], offsets[e+1]); token[p], slot[p] give where it came from. Slots with index -1 are unused.
struct Pairs {
  Tensor token;  // [P] int64
  Tensor slot;   // [P] int64
  std::vector<int64_t> offsets;  // [E + 1]
};

inline Pairs sort_pairs(const Tensor& indices, int64_t num_experts) {
  TORCH_CHECK(indices.dim() == 2, "moelora cpu backend: indices must be [T, k], got shape ", indices.sizes());
  TORCH_CHECK(!at::isFloatingType(indices.scalar_type()) && !at::isComplexType(indices.scalar_type()) &&
                  indices.scalar_type() != at::kBool,
              "moelora cpu backend: indices must be an integer tensor (expert ids, -1 = unused), got ",
              indices.scalar_type());
  auto idx = indices.to(at::kLong).contiguous();
  const int64_t T = idx.size(0), k = idx.size(1);
  const int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int64_t> offsets(num_experts + 1, 0);
  for (int64_t n = 0; n < T * k; ++n) {
    const int64_t e = ip[n];
    TORCH_CHECK(e >= -1 && e < num_experts, "moelora cpu backend: expert index ", e, " outside [-1, ",
                num_experts, ")");
    if (e >= 0) offsets[e + 1] += 1;
  }
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
  auto token = at::empty({offsets[num_experts]}, idx.options());
  auto slot = at::empty({offsets[num_experts]}, idx.options());
  int64_t* tp = token.data_ptr<int64_t>();
  int64_t* sp = slot.data_ptr<int64_t>();
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t n = 0; n < T * k; ++n) {
    const int64_t e = ip[n];
    if (e < 0) continue;
    tp[fill[e]] = n / k;
    sp[fill[e]] = n % k;
    fill[e] += 1;
  }
  return {token, slot, offsets};
}

// A [rows, cols] scratch tensor that outlives the call: slot `slot` of a set kept per calling thread, grown when
// too small, valid until the next scratch() of the same slot on this thread. A fresh multi-MB buffer per call pays
// its page faults whenever glibc has handed the memory back to the OS in between, which some processes do on
// every call and others never: about 2 us per 4 KiB page on the 2-core VMs, so the forward's 4.8 MB of buffers at
// T = 512 cost 2.4 ms a call, half the op, in such a process. Kept memory per thread: the largest set asked for.
inline Tensor scratch(size_t slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  thread_local std::vector<Tensor> kept;
  if (kept.size() <= slot) kept.resize(slot + 1);
  Tensor& t = kept[slot];
  const int64_t n = rows * cols;
  if (!t.defined() || t.scalar_type() != options.dtype().toScalarType() || t.numel() < n) {
    t = at::empty({std::max<int64_t>(n, 1)}, options);
  }
  return t.narrow(0, 0, n).view({rows, cols});
}

// Hot row loops are compiled three times, for AVX-512, for AVX2 + FMA and for baseline x86-64, and picked at load
// time, so the extension runs anywhere and uses the widest vectors the CPU has.
// (Defined beforehand, it wins: a benchmark can build one clone alone.)
#if defined(MOELORA_VECTOR_CLONES)
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOELORA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOELORA_VECTOR_CLONES
#endif

enum class Act { kSilu, kGeluTanh, kGeluErf, kRelu };

inline Act parse_act(const std::string& name) {
  if (name == "silu") return Act::kSilu;
  if (name == "gelu_tanh") return Act::kGeluTanh;
  if (name == "gelu") return Act::kGeluErf;
  if (name == "relu") return Act::kRelu;
  TORCH_CHECK(false, "moelora cpu backend: activation must be silu, gelu_tanh, gelu or relu, got '", name, "'");
}

// Denormals flushed to zero (FTZ) and read as zero (DAZ) on this thread while it lives; the caller's mode comes back
// after. gcc vectorises the clamp in fast_exp by computing both sides on every lane, and the clamped side of silu,
// x / (1 + e^87), is a denormal for |x| < 0.7: each such lane took a microcode assist, and the AVX2 silu row loop
// ran at 2.4 ns per element instead of 0.7 (2-core AMD EPYC, 2026-12-06). The row loops run under it, so values
// below 1.2e-38 count as 0 there, as in oneDNN's kernels.
class FlushDenormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ (bit 15) | DAZ (bit 6)
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// exp for float with a range reduction and a degree-6 polynomial (relative error ~2e-7, like expf), written
// with plain arithmetic and branch-free clamps so that loops over it vectorise (with -fno-trapping-math);
// std::exp does not vectorise.
inline float fast_exp(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: + 1.5 * 2^23
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

inline double fast_exp(double x) { return std::exp(x); }

// act(x) and act'(x); the activation is a template argument so that each row loop is branch-free.
template <Act act, typename T>
inline T act_value(T x) {
  constexpr T kSqrt2OverPi = T(0.7978845608028654);
  switch (act) {
    case Act::kSilu:
      return x / (T(1) + fast_exp(-x));
    case Act::kGeluTanh: {
      const T inner = kSqrt2OverPi * (x + T(0.044715) * x * x * x);
      return T(0.5) * x * (T(1) + (T(2) / (T(1) + fast_exp(T(-2) * inner)) - T(1)));
    }
    case Act::kGeluErf:
      return T(0.5) * x * (T(1) + std::erf(x * T(0.7071067811865476)));
    case Act::kRelu:
      return x < T(0) ? T(0) : x;  // NaN passes through, as in torch.relu
  }
  return x;
}

template <Act act, typename T>
inline T act_grad(T x) {
  constexpr T kSqrt2OverPi = T(0.7978845608028654);
  switch (act) {
    case Act::kSilu: {
      const T sig = T(1) / (T(1) + fast_exp(-x));
      return sig * (T(1) + x * (T(1) - sig));
    }
    case Act::kGeluTanh: {
      const T inner = kSqrt2OverPi * (x + T(0.044715) * x * x * x);
      const T th = T(2) / (T(1) + fast_exp(T(-2) * inner)) - T(1);
      const T dinner = kSqrt2OverPi * (T(1) + T(3) * T(0.044715) * x * x);
      return T(0.5) * (T(1) + th) + T(0.5) * x * (T(1) - th * th) * dinner;
    }
    case Act::kGeluErf:
      return T(0.5) * (T(1) + std::erf(x * T(0.7071067811865476))) +
             x * T(0.3989422804014327) * std::exp(T(-0.5) * x * x);
    case Act::kRelu:
      return x > T(0) ? T(1) : T(0);
  }
  return T(1);
}

// Calls fn with the activation as a compile-time constant: fn(std::integral_constant<Act, A>{}).
template <typename Fn>
inline void dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::kSilu:
      return fn(std::integral_constant<Act, Act::kSilu>{});
    case Act::kGeluTanh:
      return fn(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kGeluErf:
      return fn(std::integral_constant<Act, Act::kGeluErf>{});
    case Act::kRelu:
      return fn(std::integral_constant<Act, Act::kRelu>{});
  }
}

}  // namespace moelora
