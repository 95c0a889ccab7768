// The rank-r products of LoRA, the GEMMs that have one side r wide (r = 8, 16 or 32), as register-blocked loops over
// fp32: shrink (x A^T), expand (u B^T) and the two weight grads. Other ranks, fp64, and CPUs without AVX2 + FMA go
// to ATen.
//
// Why: the C++ FFN's blocks multiply 32-row slices by rank-16 matrices. MKL packs both operands of every such call
// and scales C first, and at these shapes that was a third of its time (2026-12-06, AMD EPYC Zen 4, 1 thread:
// packing 22% and scaling 4% of the FFN backward). The loops below need no packing: the r-wide side is a few vector
// registers, every load feeds 4-8 FMAs. Against at::mm_out at 1 thread, same machine, 32 rows and K or N = 1408,
// in us (ours / MKL), the four kernels:
//   AVX-512, r = 8: 6.7-8.7 / 12-54; r = 16: 12.6-13.8 / 19.2-19.9; r = 32: 25-27 / 33-38; r = 64: 56-67 / 65-73
//   AVX2 build, same CPU (MKL still AVX-512), r = 16: 14-19 / 19-20; r = 32: 30-42 / 33-36; r = 64: 60-102 / 60-67
// so r = 64 stays with ATen.
//
// Each output element is summed in a fixed order (over r ascending, or over rows ascending, or over K ascending),
// whatever the thread count, so results stay bitwise the same for any number of threads.
#pragma once

#include "common.h"

#include <cstdlib>
#include <cstring>
#include <string>

namespace moelora::rank_gemm {

#if !defined(__GNUC__)
#error "moelora's C++ backend needs GCC or clang: csrc/rank_gemm.h uses their vector extensions"
#endif

// The instruction set the kernels run with, picked once: AVX-512 (16-float vectors), AVX2 + FMA (8-float vectors),
// or none (ATen does the products). The environment variable MOELORA_RANK_KERNELS=avx2|off lowers the choice, so
// that tests reach the AVX2 path on an AVX-512 machine. Each set has its own build of the kernels with vectors of
// its width: one source built for both with 16-float vectors, as target_clones would, ran the AVX2 build 6-50x
// slower than MKL (the 16-float values did not fit AVX2's registers).
enum class Isa { kNone, kAvx2, kAvx512 };

inline Isa detect_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  Isa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("fma")
                ? Isa::kAvx512
                : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? Isa::kAvx2 : Isa::kNone);
  if (const char* cap = std::getenv("MOELORA_RANK_KERNELS")) {
    const std::string c(cap);
    TORCH_CHECK(c == "avx512" || c == "avx2" || c == "off",
                "moelora: MOELORA_RANK_KERNELS must be avx512, avx2 or off, got '", c, "'");
    if (c == "off") isa = Isa::kNone;
    if (c == "avx2" && isa == Isa::kAvx512) isa = Isa::kAvx2;
  }
  return isa;
#else
  return Isa::kNone;
#endif
}

inline Isa isa() {
  static const Isa chosen = detect_isa();
  return chosen;
}

// Vector values cross only always-inlined helpers, never a call boundary, so gcc's note that their ABI depends on
// -mavx (-Wpsabi) does not apply.
#if !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

// The loops below are inlined into each instruction set's entry point, so they compile for it (left to itself gcc
// kept a helper out of line, built for baseline x86-64: 7x slower).
#define MOELORA_ALWAYS_INLINE inline __attribute__((always_inline))

// Vectors of L floats (GCC/clang vector extensions; a scalar times a vector broadcasts the scalar).
template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(4 * L)));
};

template <int L>
MOELORA_ALWAYS_INLINE typename Vec<L>::type load(const float* p) {
  typename Vec<L>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int L>
MOELORA_ALWAYS_INLINE void store(float* p, typename Vec<L>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lanes along r for vectors of at most W floats: W, or r itself when smaller.
template <int R, int W>
constexpr int lanes() {
  return R < W ? R : W;
}

// Rows (or columns) handled together so that about 8 vectors accumulate.
template <int R, int W>
constexpr int blocked() {
  return 8 / (R / lanes<R, W>()) > 0 ? 8 / (R / lanes<R, W>()) : 1;
}

// c[i, :] = alpha * sum_k x[i, k] at[k, :] for ROWS rows: c [ROWS, R] (ld R), x rows ldx apart, at [K, R].
template <int R, int W, int ROWS>
MOELORA_ALWAYS_INLINE void shrink_rows(const float* x, int64_t ldx, const float* at, int64_t K, float alpha,
                                       float* c) {
  constexpr int L = lanes<R, W>(), NV = R / L;
  using V = typename Vec<L>::type;
  V acc[ROWS][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = load<L>(at + k * R + v * L);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) {
      const float xi = x[i * ldx + k];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[i][v] += xi * b[v];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store<L>(c + i * R + v * L, alpha * acc[i][v]);
}

template <int R, int W>
MOELORA_ALWAYS_INLINE void shrink_impl(const float* x, int64_t ldx, int64_t m, const float* at, int64_t K,
                                       float alpha, float* c) {
  constexpr int ROWS = blocked<R, W>();
  int64_t i = 0;
  for (; i + ROWS <= m; i += ROWS) shrink_rows<R, W, ROWS>(x + i * ldx, ldx, at, K, alpha, c + i * R);
  for (; i < m; ++i) shrink_rows<R, W, 1>(x + i * ldx, ldx, at, K, alpha, c + i * R);
}

// c[i, n] (+)= sum_j u[i, j] bt[j, n] for ROWS rows and the W columns from n: u rows ldu apart, bt [R, N].
template <int R, int W, int ROWS>
MOELORA_ALWAYS_INLINE void expand_tile(const float* u, int64_t ldu, const float* bt, int64_t N, float* c,
                                       int64_t ldc, bool acc_c) {
  using V = typename Vec<W>::type;
  V acc[ROWS] = {};
#pragma GCC unroll 16
  for (int j = 0; j < R; ++j) {
    const V b = load<W>(bt + j * N);
#pragma GCC unroll 16
    for (int i = 0; i < ROWS; ++i) acc[i] += u[i * ldu + j] * b;
  }
#pragma GCC unroll 16
  for (int i = 0; i < ROWS; ++i) store<W>(c + i * ldc, acc_c ? load<W>(c + i * ldc) + acc[i] : acc[i]);
}

template <int R, int W>
MOELORA_ALWAYS_INLINE void expand_impl(const float* u, int64_t ldu, int64_t m, const float* bt, int64_t N, float* c,
                                       int64_t ldc, bool acc_c) {
  constexpr int ROWS = 4;
  const int64_t n_vec = N - N % W;
  auto rows = [&](auto rows_c, int64_t i) {
    constexpr int RR = decltype(rows_c)::value;
    for (int64_t n = 0; n < n_vec; n += W)
      expand_tile<R, W, RR>(u + i * ldu, ldu, bt + n, N, c + i * ldc + n, ldc, acc_c);
    for (int64_t n = n_vec; n < N; ++n) {  // the last N % W columns
      for (int r = 0; r < RR; ++r) {
        float s = 0;
        for (int j = 0; j < R; ++j) s += u[(i + r) * ldu + j] * bt[j * N + n];
        c[(i + r) * ldc + n] = acc_c ? c[(i + r) * ldc + n] + s : s;
      }
    }
  };
  int64_t i = 0;
  for (; i + ROWS <= m; i += ROWS) rows(std::integral_constant<int, ROWS>{}, i);
  for (; i < m; ++i) rows(std::integral_constant<int, 1>{}, i);
}

// g[n, :] += alpha * sum_i d[i, n] u[i, :] for the NB columns of d from n: d rows ldd apart, u rows ldu apart.
template <int R, int W, int NB>
MOELORA_ALWAYS_INLINE void grad_b_cols(const float* d, int64_t ldd, const float* u, int64_t ldu, int64_t m,
                                       float alpha, float* g) {
  constexpr int L = lanes<R, W>(), NV = R / L;
  using V = typename Vec<L>::type;
  V acc[NB][NV] = {};
  for (int64_t i = 0; i < m; ++i) {
    V b[NV];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) b[v] = load<L>(u + i * ldu + v * L);
#pragma GCC unroll 16
    for (int c = 0; c < NB; ++c) {
      const float dc = d[i * ldd + c];
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[c][v] += dc * b[v];
    }
  }
#pragma GCC unroll 16
  for (int c = 0; c < NB; ++c)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store<L>(g + c * R + v * L, load<L>(g + c * R + v * L) + alpha * acc[c][v]);
}

template <int R, int W>
MOELORA_ALWAYS_INLINE void grad_b_impl(const float* d, int64_t ldd, int64_t m, int64_t N, const float* u,
                                       int64_t ldu, float alpha, float* g) {
  constexpr int NB = blocked<R, W>();
  int64_t n = 0;
  for (; n + NB <= N; n += NB) grad_b_cols<R, W, NB>(d + n, ldd, u, ldu, m, alpha, g + n * R);
  for (; n < N; ++n) grad_b_cols<R, W, 1>(d + n, ldd, u, ldu, m, alpha, g + n * R);
}

// g[j, k] += alpha * sum_i d[i, j] x[i, k] for the rows j0 <= j < j0 + 8 of g and the W columns from k.
template <int W>
MOELORA_ALWAYS_INLINE void grad_a_tile(const float* d, int64_t ldd, const float* x, int64_t ldx, int64_t m,
                                       float alpha, float* g, int64_t ldg) {
  using V = typename Vec<W>::type;
  V acc[8] = {};
  for (int64_t i = 0; i < m; ++i) {
    const V b = load<W>(x + i * ldx);
#pragma GCC unroll 16
    for (int j = 0; j < 8; ++j) acc[j] += d[i * ldd + j] * b;
  }
#pragma GCC unroll 16
  for (int j = 0; j < 8; ++j) store<W>(g + j * ldg, load<W>(g + j * ldg) + alpha * acc[j]);
}

template <int R, int W>
MOELORA_ALWAYS_INLINE void grad_a_impl(const float* d, int64_t ldd, int64_t m, const float* x, int64_t ldx,
                                       int64_t K, float alpha, float* g) {
  const int64_t k_vec = K - K % W;
  for (int j0 = 0; j0 < R; j0 += 8) {  // R is a multiple of 8
    for (int64_t k = 0; k < k_vec; k += W) grad_a_tile<W>(d + j0, ldd, x + k, ldx, m, alpha, g + j0 * K + k, K);
    for (int64_t k = k_vec; k < K; ++k) {  // the last K % W columns
      for (int j = j0; j < j0 + 8; ++j) {
        float s = 0;
        for (int64_t i = 0; i < m; ++i) s += d[i * ldd + j] * x[i * ldx + k];
        g[j * K + k] += alpha * s;
      }
    }
  }
}

// One entry point per instruction set and kernel, built for it with vectors of its width.
#if defined(__x86_64__)
#define MOELORA_ISA_ENTRIES(name)                                                                                    \
  template <int R, typename... Args>                                                                                 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma"))) void name##_avx512(Args... args) {         \
    name##_impl<R, 16>(args...);                                                                                     \
  }                                                                                                                  \
  template <int R, typename... Args>                                                                                 \
  __attribute__((target("avx2,fma"))) void name##_avx2(Args... args) {                                              \
    name##_impl<R, 8>(args...);                                                                                      \
  }
MOELORA_ISA_ENTRIES(shrink)
MOELORA_ISA_ENTRIES(expand)
MOELORA_ISA_ENTRIES(grad_b)
MOELORA_ISA_ENTRIES(grad_a)
#undef MOELORA_ISA_ENTRIES

// Runs kernel `name` for rank r on this CPU's instruction set; false (nothing run) for another rank or no kernels.
#define MOELORA_RUN_KERNEL(name, r, ...)                                                                             \
  dispatch_rank(r, [&](auto rank) {                                                                                  \
    constexpr int R = decltype(rank)::value;                                                                         \
    if (isa() == Isa::kAvx512) name##_avx512<R>(__VA_ARGS__);                                                        \
    else name##_avx2<R>(__VA_ARGS__);                                                                                \
  })
#else
#define MOELORA_RUN_KERNEL(name, r, ...) false
#endif

#if !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// dst [cols, rows] = src [rows, cols]^T, in 16 x 16 tiles that stay in L1: 4x faster than ATen's transposing copy on
// a [16, 1408] LoRA matrix (5 against 21 us, AMD EPYC Zen 4).
MOELORA_VECTOR_CLONES inline void transpose_f32(const float* src, int64_t rows, int64_t cols, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t rn = std::min<int64_t>(16, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t cn = std::min<int64_t>(16, cols - c0);
      if (rn < 16 || cn < 16) {  // an edge tile
        for (int64_t r = 0; r < rn; ++r)
          for (int64_t c = 0; c < cn; ++c) dst[(c0 + c) * rows + r0 + r] = src[(r0 + r) * cols + c0 + c];
        continue;
      }
      float tile[16][16];
      for (int r = 0; r < 16; ++r) std::memcpy(tile[r], src + (r0 + r) * cols + c0, sizeof(tile[r]));
      for (int c = 0; c < 16; ++c) {
        float column[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r) column[r] = tile[r][c];
        std::memcpy(dst + (c0 + c) * rows + r0, column, sizeof(column));
      }
    }
  }
}

// Calls fn(std::integral_constant<int, R>) for the ranks with kernels when this CPU has them; false otherwise.
template <typename Fn>
bool dispatch_rank(int64_t r, Fn&& fn) {
  if (isa() == Isa::kNone) return false;
  switch (r) {
    case 8: fn(std::integral_constant<int, 8>{}); return true;
    case 16: fn(std::integral_constant<int, 16>{}); return true;
    case 32: fn(std::integral_constant<int, 32>{}); return true;
    default: return false;
  }
}

// Whether products of rank r in dtype dt run the kernels on this CPU (the FFN transposes weights only for them).
inline bool has_kernels(int64_t r, at::ScalarType dt) {
  return dt == at::kFloat && dispatch_rank(r, [](auto) {});
}

// Whether the loops above take these operands: fp32, rows with unit stride, `contig` contiguous.
inline bool fits(std::initializer_list<const Tensor*> rows, std::initializer_list<const Tensor*> contig) {
  for (const Tensor* t : rows)
    if (t->scalar_type() != at::kFloat || t->dim() != 2 || t->stride(1) != 1) return false;
  for (const Tensor* t : contig)
    if (t->scalar_type() != at::kFloat || !t->is_contiguous()) return false;
  return true;
}

// t^T, contiguous: [cols, rows] from a 2-d t.
inline Tensor transposed(const Tensor& t) {
  if (t.scalar_type() != at::kFloat || !t.is_contiguous()) return t.t().contiguous();
  auto out = at::empty({t.size(1), t.size(0)}, t.options());
  transpose_f32(t.data_ptr<float>(), t.size(0), t.size(1), out.data_ptr<float>());
  return out;
}

// out [m, r] = alpha * x [m, K] @ at [K, r]: the shrink of x by A (at = A^T, contiguous).
inline void shrink(const Tensor& x, const Tensor& at, double alpha, Tensor out) {
  const int64_t m = x.size(0), K = x.size(1), r = at.size(1);
  if (m > 0 && fits({&x}, {&at, &out}) &&
      MOELORA_RUN_KERNEL(shrink, r, x.data_ptr<float>(), x.stride(0), m, at.data_ptr<float>(), K,
                         static_cast<float>(alpha), out.data_ptr<float>()))
    return;
  at::mm_out(out, x, at);
  if (alpha != 1.0) out.mul_(alpha);
}

// out [m, N] = u [m, r] @ bt [r, N] (accumulate: out +=): the expand of u by B (bt = B^T, contiguous).
inline void expand(const Tensor& u, const Tensor& bt, Tensor out, bool accumulate) {
  const int64_t m = u.size(0), r = u.size(1), N = bt.size(1);
  if (m > 0 && fits({&u, &out}, {&bt}) &&
      MOELORA_RUN_KERNEL(expand, r, u.data_ptr<float>(), u.stride(0), m, bt.data_ptr<float>(), N,
                         out.data_ptr<float>(), out.stride(0), accumulate))
    return;
  if (accumulate) out.addmm_(u, bt);
  else at::mm_out(out, u, bt);
}

// g [N, r] += alpha * d [m, N]^T @ u [m, r]: the grad of B from the grad d of the expand's output.
inline void grad_b(const Tensor& d, const Tensor& u, double alpha, Tensor g) {
  const int64_t m = d.size(0), N = d.size(1), r = u.size(1);
  if (fits({&d, &u}, {&g}) && MOELORA_RUN_KERNEL(grad_b, r, d.data_ptr<float>(), d.stride(0), m, N,
                                                 u.data_ptr<float>(), u.stride(0), static_cast<float>(alpha),
                                                 g.data_ptr<float>()))
    return;
  g.addmm_(d.t(), u, 1.0, alpha);
}

// g [r, K] += alpha * d [m, r]^T @ x [m, K]: the grad of A from the grad d of the shrink's output.
inline void grad_a(const Tensor& d, const Tensor& x, double alpha, Tensor g) {
  const int64_t m = d.size(0), r = d.size(1), K = x.size(1);
  if (fits({&d, &x}, {&g}) && MOELORA_RUN_KERNEL(grad_a, r, d.data_ptr<float>(), d.stride(0), m,
                                                 x.data_ptr<float>(), x.stride(0), K, static_cast<float>(alpha),
                                                 g.data_ptr<float>()))
    return;
  g.addmm_(d.t(), x, 1.0, alpha);
}

}  // namespace moelora::rank_gemm
