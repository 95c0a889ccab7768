// mixlora_ffn: hbar = sum_j w_j act(G + dG_j) * (U + dU_j) and the down LoRA of each h_j, expert by expert.
//
// The frozen projections stay outside (the caller runs Wg, Wu on x and Wd once on hbar, so a quantised base
// works). Per expert the gathered rows go through the rank-r kernels of rank_gemm.h (ATen GEMMs for other ranks
// and dtypes) and one fused, vectorised row loop for the activation, the product and the weighted sum: h exists
// only for one expert's rows at a time, never as [T, k, I]. The backward recomputes h rather than storing it, in
// the same pass as its own row loop.
//
// Threads: each chunk of an expert's rows is cut into equal blocks of at most BLOCK rows that the threads take in
// turn; a block runs its gather, rank-r products, row loop and scatter on one thread (ATen calls inside a parallel
// region run single-threaded). The backward's weight gradients, sums over the chunk's rows, run after its blocks as
// one product each, the six side by side, each single-threaded. Blocks depend on the chunk only, so results are
// bitwise the same for any thread count.
// With at most SMALL_PAIRS (token, slot) pairs (decoding), an expert's rows fit one block, so instead the
// experts run in two fixed groups side by side, each into its own sums (see mixlora_ffn_cpu).
//
// Where the time went (issue 20, profiled 2026-12-05 on the 2-core AMD EPYC VM, busy: load average 5-12 from
// other sessions, so per-thread CPU time at 1 thread and shares, medians of 20-30 calls; small preset, T=512,
// H=512, I=1408, E=8, k=2, r=16, fp32, fwd+bwd of route + FFN, 75-86 ms of CPU per call): the op's backward
// took 28% of the call and its forward 11%, the rest being the frozen GEMMs and autograd. Inside the backward,
// per call: gate/up weight-grad GEMMs 5.1 ms, down LoRA backward (gather of dy, 6 small GEMMs, 4 temporaries)
// 4.9, backward row loop 4.4, recompute row loop 3.8, recompute expand 1.9, setup (sort, zeroed grads) 1.4;
// forward: row loop 3.7, gate/up expand 1.6, down shrink 0.9, gate/up shrink 0.7, index_add 0.7. The row loops
// are bound by memory (about 28 bytes per element at ~11 GB/s), not by the activation; smaller chunks
// (16-128 rows, buffers in L2) did not change them. With 2 threads every ATen call was its own fork-join:
// on the busy VM index_add_ (scatter_add_) took 10-20x its 1-thread time and the small MKL GEMMs 5-10x, so
// the op scaled far worse than dense LoRA's few large GEMMs (fwd+bwd 1.69x dense LoRA on a quiet VM vs 1.13x
// at 1 thread). Changes, each measured against the previous build in interleaved runs:
// - one backward pass for recompute + backward (q = (Bd^T dy) Ad does not depend on h): the backward op's
//   1-thread CPU time 24.0 -> 17.8 ms, fused/lora fwd+bwd at 1 thread 1.22-1.27x -> 1.12-1.21x;
// - add_rows instead of index_add_ (no scatter_add_, the routing-weight scale folded in);
// - blocks of 32 rows per thread instead of threads inside each ATen call: at 2 threads (VM load 8-12, two
//   rounds) fused/lora fwd+bwd at T=512 1.52x/1.60x -> 1.56x/0.99x, at T=128 1.81x/2.80x -> 1.50x/1.35x; the
//   1-thread cost grows (32-row GEMMs: the backward op 17.8 -> 21.9 ms), so where 1 thread matters BLOCK is the
//   knob.
// - (2026-12-06, quiet VM, AVX-512 AMD EPYC) the row loops were not bound by memory after all: at 2.7 ns per
//   element whether the rows fit L2 or not, they were taking a microcode assist per denormal that the
//   vectorised clamp in fast_exp made (see FlushDenormals in common.h). With denormals flushed, an AVX-512
//   clone, and scratch buffers kept between calls: the row loop alone 3.8 -> 1.2 ms at 1 thread, the op at 2
//   threads fwd 5.0 -> 3.1-3.9 ms, bwd 11.1 -> 9.8-10.6 ms. Then each expert's weights made once per expert
//   (not per block) and the six weight-grad GEMMs side by side instead of each forking both threads: fwd
//   3.0 -> 2.9 ms, bwd 9.1 -> 8.1 ms. The backward is now mostly its 32-row GEMMs.
// - (2026-12-06, later) MKL spent a third of those GEMMs packing operands and scaling C (1 thread: packing 22%,
//   scaling 4% of the backward). The rank kernels of rank_gemm.h need no packing; with them, the experts' weight
//   transposes made side by side before the rows, equal blocks and threads taking tasks in turn, the op at 2
//   threads went fwd 3.1 -> 2.6 ms, bwd 8.4 -> 6.3 ms, and at 1 thread bwd 14.5 -> 12.0 ms (the forward's gain at
//   1 thread goes on the transposes). Medians of runs in the VM's fast mode (docs/benchmarks.md).
//
// LoRA dropout (dropout_p > 0, moelora/dropout.py) is made from (seed, element index) where it is used and never
// stored: x is dropped in each expert's gathered rows of x (the chunk buffer the gate/up shrinks read, so no
// [T, H] dropped copy exists; a token's mask is made once per slot it fills), each h_j as the row loop writes
// the down shrink's input, while hbar sums the undropped h_j. The backward makes both masks again: for the
// recomputed gate/up shrinks, for the grad into x (through the x mask), for the down shrink's input and for the
// grad into h_j from the down LoRA (through the h mask).
#include "ops.h"
#include "philox.h"
#include "rank_gemm.h"

#include <ATen/ThreadLocalState.h>

#include <atomic>
#include <functional>
#include <vector>

namespace moelora {

namespace {

struct ExpertLoras {
  c10::optional<Tensor> gate_A, gate_B, up_A, up_B, down_A, down_B;
};

bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Rows per chunk: an expert's rows are processed CHUNK at a time through reused buffers ([CHUNK, I] each,
// 2.9 MB at I = 2816), so that no [n_e, I] tensor is allocated and page-faulted per expert (fresh 46 MB
// allocations cost more here than the arithmetic on them).
constexpr int64_t CHUNK = 256;
// Rows per block, the unit of work of one thread (see the top of this file).
constexpr int64_t BLOCK = 32;
// At most this many (token, slot) pairs, the forward runs its experts in two groups side by side (decoding;
// see mixlora_ffn_cpu).
constexpr int64_t SMALL_PAIRS = 256;

// One expert's LoRA weights in the compute dtype, and their transposes. The rank kernels (rank_gemm.h) read both
// layouts contiguous; the transposes cost about 23 us an expert (fp32, H = 512, I = 1408, r = 16), which its rows
// repay from about one block's worth (BLOCK rows), so an expert with fewer rows (decoding), or a rank without
// kernels, gets views instead and its products go to ATen. Made once per expert, not per block (per block they
// were about 2,000 ATen view calls per backward at T = 512). Undefined where the projection has no LoRA.
struct ExpertWeights {
  Tensor gA, gB, uA, uB, dA, dB;  // A [r, in], B [out, r]
  Tensor gA_t, gB_t, uA_t, uB_t, dA_t, dB_t;  // A^T [in, r], B^T [r, out]
};

ExpertWeights expert_weights(const ExpertLoras& l, int64_t e, at::ScalarType dt, int64_t rows) {
  ExpertWeights w;
  auto take = [&](const c10::optional<Tensor>& all, const c10::optional<Tensor>& A, Tensor& t, Tensor& t_t) {
    if (!has(all)) return;
    t = (*all)[e].to(dt).contiguous();
    t_t = rows >= BLOCK && rank_gemm::has_kernels(A->size(1), dt) ? rank_gemm::transposed(t) : t.t();
  };
  take(l.gate_A, l.gate_A, w.gA, w.gA_t);
  take(l.gate_B, l.gate_A, w.gB, w.gB_t);
  take(l.up_A, l.up_A, w.uA, w.uA_t);
  take(l.up_B, l.up_A, w.uB, w.uB_t);
  take(l.down_A, l.down_A, w.dA, w.dA_t);
  take(l.down_B, l.down_A, w.dB, w.dB_t);
  return w;
}

Tensor grad_buffer(const c10::optional<Tensor>& t, at::ScalarType dt) {
  return has(t) ? at::zeros(t->sizes(), t->options().dtype(dt)) : Tensor();
}

// One expert's rows: h[n] = act(G[t] + s dG[n]) * (U[t] + s dU[n]) (GATED false: act(U[t] + s dU[n])),
// and hbar[t] += w[n] h[n]; with DROP the row written is the down shrink's input drop(h[n]) = h[n] * f
// (f: drop_factors of the h mask), while hbar sums the undropped h.
// Rows of one expert are distinct tokens, so rows run in parallel without races. The branches are template
// arguments: a branch inside the inner loop stops gcc from vectorising it. The outputs (and f) are __restrict:
// with DROP the loop has one pointer more, and gcc's runtime alias checks (at most 10) no longer covered it,
// so it ran scalar (2x slower).
template <Act act, typename T, bool GATED, bool DROP>
MOELORA_VECTOR_CLONES void ffn_row_forward(const T* g_row, const T* u_row, const T* dg_row, const T* du_row, T s,
                                           T wr, int64_t I, const T* __restrict f, T* __restrict h_row,
                                           T* __restrict hbar_row) {
  for (int64_t i = 0; i < I; ++i) {
    const T u = u_row[i] + s * du_row[i];
    T v;
    if constexpr (GATED) {
      v = act_value<act>(g_row[i] + s * dg_row[i]) * u;
    } else {
      v = act_value<act>(u);
    }
    if constexpr (DROP) {
      h_row[i] = v * f[i];
    } else {
      h_row[i] = v;
    }
    hbar_row[i] += wr * v;
  }
}

// pair[r] = t * k + j is row r's (token, slot) pair, so its h mask starts at element pair[r] * I.
template <Act act, typename T, bool GATED, bool DROP>
void ffn_rows_forward(const T* G, const T* U, const T* dG, const T* dU, const int64_t* tok, const int64_t* pair,
                      const T* w, T s, int64_t n, int64_t I, const DropSpec& drop, T* h, T* hbar) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    alignas(64) T f[DROP ? kDropBlock : 1];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = tok[r];
      if constexpr (DROP) {
        for (int64_t lo = 0; lo < I; lo += kDropBlock) {
          const int64_t m = std::min(kDropBlock, I - lo);
          drop_factors(drop, kHStream, pair[r] * I + lo, m, f);
          ffn_row_forward<act, T, GATED, true>(GATED ? G + t * I + lo : nullptr, U + t * I + lo,
                                               GATED ? dG + r * I + lo : nullptr, dU + r * I + lo, s, w[r], m, f,
                                               h + r * I + lo, hbar + t * I + lo);
        }
      } else {
        ffn_row_forward<act, T, GATED, false>(GATED ? G + t * I : nullptr, U + t * I,
                                              GATED ? dG + r * I : nullptr, dU + r * I, s, w[r], I, nullptr,
                                              h + r * I, hbar + t * I);
      }
    }
  });
}

// rows[r] *= f over the mask of `stream`, row r starting at element index[r] * row_len: drop(x) of the gathered
// rows (index = token), or the grad into x through the x mask.
void drop_rows(const DropSpec& drop, uint32_t stream, const Tensor& index, Tensor rows) {
  const int64_t n = rows.size(0), len = rows.size(1);
  const int64_t* ip = index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "moelora_drop_rows", [&] {
    scalar_t* rp = rows.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) drop_row(drop, stream, ip[r] * len, len, rp + r * len);
    });
  });
}

// Backward of the rows, in one pass with the recompute of h (the forward kept only hbar): from the deltas
// in dG, dU it makes v = act(G[t] + s dG[n]) * (U[t] + s dU[n]), then dh = w dhbar[t] (+ w s f q[n] with
// LORA, f the h mask with DROP, else 1), writes d(pre-activation) of gate into dG and of up into dU (in place
// of the deltas, read first), adds them to grad_G[t], grad_U[t], and returns the routing weight's gradient
// dot(v, dhbar[t]) + s dot(hin, q[n]). With LORA, q[n] = (Bd^T dy[t]) Ad is the grad into the down LoRA's
// input per unit of w s, and h_row gets that input hin = v * f (the down weight grads read it afterwards).
template <Act act, typename T, bool GATED, bool LORA, bool DROP>
MOELORA_VECTOR_CLONES T ffn_row_backward(const T* g_row, const T* u_row, T* __restrict dg_row, T* __restrict du_row,
                                         T* __restrict h_row, const T* q_row, const T* f, const T* dhbar_row, T s,
                                         T wr, int64_t I, T* __restrict gG_row, T* __restrict gU_row) {
  static_assert(LORA || !DROP, "the h mask acts on the down LoRA's input only");
  T dot = 0, ldot = 0;
  // A reduction vectorises only when allowed to reorder the sum: the order is fixed per build, not per thread.
#pragma omp simd reduction(+ : dot, ldot)
  for (int64_t i = 0; i < I; ++i) {
    const T u = u_row[i] + s * du_row[i];
    T v, ag = 0, g = 0;
    if constexpr (GATED) {
      g = g_row[i] + s * dg_row[i];
      ag = act_value<act>(g);
      v = ag * u;
    } else {
      v = act_value<act>(u);
    }
    dot += v * dhbar_row[i];
    T dh = wr * dhbar_row[i];
    if constexpr (LORA) {
      const T hin = DROP ? v * f[i] : v;
      h_row[i] = hin;
      ldot += hin * q_row[i];
      dh += DROP ? wr * s * q_row[i] * f[i] : wr * s * q_row[i];
    }
    if constexpr (GATED) {
      const T dg = dh * u * act_grad<act>(g);
      const T du = dh * ag;
      dg_row[i] = dg;
      du_row[i] = du;
      gG_row[i] += dg;
      gU_row[i] += du;
    } else {
      const T du = dh * act_grad<act>(u);
      du_row[i] = du;
      gU_row[i] += du;
    }
  }
  return dot + s * ldot;
}

// grad_w[pair[r]] gets row r's routing weight gradient (pairs are distinct: no race).
template <Act act, typename T, bool GATED, bool LORA, bool DROP>
void ffn_rows_backward(const T* G, const T* U, T* dG, T* dU, T* h, const T* q, const T* dhbar, const int64_t* tok,
                       const int64_t* pair, const T* w, T s, int64_t n, int64_t I, const DropSpec& drop, T* grad_G,
                       T* grad_U, T* grad_w) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const FlushDenormals flush;
    alignas(64) T f[DROP ? kDropBlock : 1];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = tok[r];
      if constexpr (DROP) {
        T dot = 0;
        for (int64_t lo = 0; lo < I; lo += kDropBlock) {
          const int64_t m = std::min(kDropBlock, I - lo);
          drop_factors(drop, kHStream, pair[r] * I + lo, m, f);
          dot += ffn_row_backward<act, T, GATED, true, true>(
              GATED ? G + t * I + lo : nullptr, U + t * I + lo, GATED ? dG + r * I + lo : nullptr, dU + r * I + lo,
              h + r * I + lo, q + r * I + lo, f, dhbar + t * I + lo, s, w[r], m,
              GATED ? grad_G + t * I + lo : nullptr, grad_U + t * I + lo);
        }
        grad_w[pair[r]] = dot;
      } else {
        grad_w[pair[r]] = ffn_row_backward<act, T, GATED, LORA, false>(
            GATED ? G + t * I : nullptr, U + t * I, GATED ? dG + r * I : nullptr, dU + r * I,
            LORA ? h + r * I : nullptr, LORA ? q + r * I : nullptr, nullptr, dhbar + t * I, s, w[r], I,
            GATED ? grad_G + t * I : nullptr, grad_U + t * I);
      }
    }
  });
}

// dst[tok[r]] += c[r] * src[r] for the m rows of one chunk (c[r] = w[r] * s, or 1 without w): the scatter of
// an expert's rows into per-token sums. Its tokens are distinct, so rows run in parallel without races, and
// each row's sum is made in the same order whatever the thread count. It replaces index_add_ (whose CPU
// kernel, scatter_add_, took 10-20x its one-thread time with 2 threads on the busy 2-core VM).
void add_rows(const Tensor& src, const Tensor& tok, const Tensor& w, double scaling, Tensor dst) {
  const int64_t m = src.size(0), n = src.size(1);
  const int64_t* tp = tok.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "moelora_add_rows", [&] {
    const scalar_t* sp = src.data_ptr<scalar_t>();
    const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
    scalar_t* dp = dst.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scaling);
    at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t c = wp ? wp[r] * sc : scalar_t(1);
        const scalar_t* a = sp + r * n;
        scalar_t* d = dp + tp[r] * n;
        for (int64_t i = 0; i < n; ++i) d[i] += c * a[i];
      }
    });
  });
}

// Calls fn(bool_constant<a>, bool_constant<b>, bool_constant<c>) for runtime flags a, b, c.
template <typename Fn>
void dispatch_flags(bool a, bool b, bool c, Fn&& fn) {
  auto one = [](bool v, auto&& next) {
    if (v) return next(std::true_type{});
    return next(std::false_type{});
  };
  one(a, [&](auto fa) { one(b, [&](auto fb) { one(c, [&](auto fc) { fn(fa, fb, fc); }); }); });
}

void check_inputs(const Tensor& x, const c10::optional<Tensor>& gate, const Tensor& up, const Tensor& weights,
                  const Tensor& indices, const ExpertLoras& l, int64_t E) {
  check_cpu_float(x, "x");
  check_cpu_float(up, "up");
  check_cpu_float(weights, "weights");
  check_dim(x, 2, "x");
  check_dim(up, 2, "up");
  const int64_t T_ = x.size(0), H = x.size(1), I = up.size(1);
  TORCH_CHECK(up.size(0) == T_, "moelora cpu backend: up must be [T=", T_, ", I], got ", up.sizes());
  if (has(gate)) {
    check_cpu_float(*gate, "gate");
    TORCH_CHECK(gate->sizes() == up.sizes(), "moelora cpu backend: gate must match up ", up.sizes(), ", got ",
                gate->sizes());
  }
  TORCH_CHECK(weights.dim() == 2 && weights.sizes() == indices.sizes() && weights.size(0) == T_,
              "moelora cpu backend: weights and indices must both be [T=", T_, ", k], got ", weights.sizes(),
              " and ", indices.sizes());
  auto check_pair = [&](const c10::optional<Tensor>& A, const c10::optional<Tensor>& B, int64_t in, int64_t out,
                        const char* name) {
    TORCH_CHECK(has(A) == has(B), "moelora cpu backend: ", name, " needs both A and B or neither");
    if (!has(A)) return;
    check_cpu_float(*A, name);
    check_cpu_float(*B, name);
    TORCH_CHECK(A->dim() == 3 && B->dim() == 3 && A->size(0) == E && B->size(0) == E && A->size(2) == in &&
                    (out < 0 || B->size(1) == out) && A->size(1) == B->size(2),
                "moelora cpu backend: ", name, " must be A [E=", E, ", r, ", in, "] and B [E, ",
                (out < 0 ? std::string("out") : std::to_string(out)), ", r], got ", A->sizes(), " and ", B->sizes());
  };
  check_pair(l.gate_A, l.gate_B, H, I, "gate LoRA");
  check_pair(l.up_A, l.up_B, H, I, "up LoRA");
  check_pair(l.down_A, l.down_B, I, -1, "down LoRA");
  TORCH_CHECK(!has(l.gate_A) || has(gate), "moelora cpu backend: a gate LoRA needs the gate projection");
}

}  // namespace

// Calls fn(i) for i in [0, n), spread over the threads: each thread takes the next undone i until none is left, so
// tasks of unequal size even out (a static split of the six weight-grad GEMMs gave one thread 58% of the work).
// ATen calls inside run single-threaded (inside a parallel region), and the worker threads take the caller's
// thread-local state (grad mode off, the dispatch keys the op runs under), or their ATen calls would go through
// autograd. Each task runs on one thread whichever it is, so results do not depend on the thread count.
template <typename Fn>
void parallel_tasks(int64_t n, Fn&& fn) {
  const at::ThreadLocalState state;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::in_parallel_region() ? 1 : at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    }
  });
}

// Calls fn(r0, mb) for the blocks of one chunk of m rows, the blocks spread over the threads. Inside a block
// everything runs on one thread, so a chunk costs one fork-join instead of one per GEMM and row loop. The blocks are
// of equal size (at most BLOCK rows, their count even when above 1), so that two threads get equal shares: 100 rows
// as 32 + 32 + 32 + 4 gave one thread 64 of them. They are fixed by the chunk alone, so each row's result is the
// same whatever the thread count.
template <typename Fn>
void for_blocks(int64_t m, Fn&& fn) {
  int64_t blocks = (m + BLOCK - 1) / BLOCK;
  if (blocks > 1) blocks += blocks % 2;
  const int64_t rows = (m + blocks - 1) / blocks;
  blocks = (m + rows - 1) / rows;
  parallel_tasks(blocks, [&](int64_t b) { fn(b * rows, std::min(rows, m - b * rows)); });
}

// Calls fn(g, e0, e1, rows) for two groups of experts, g = 0: [0, split), g = 1: [split, E), cut where the first
// holds at most half the pairs, the groups side by side on the threads (one each with two; in turn with one);
// `rows` is a buffer size: the group's pairs, at most CHUNK. Inside, ATen calls run single-threaded. Used where
// every expert's rows fit one block (see mixlora_ffn_cpu); the groups depend on the routing alone.
template <typename Fn>
void for_expert_groups(const Pairs& pairs, int64_t num_experts, Fn&& fn) {
  const int64_t n_pairs = pairs.token.numel();
  int64_t split = 0;
  while (split < num_experts && 2 * pairs.offsets[split + 1] <= n_pairs) ++split;
  const int64_t bounds[3] = {0, split, num_experts};
  parallel_tasks(2, [&](int64_t g) {
    const int64_t rows = std::max<int64_t>(pairs.offsets[bounds[g + 1]] - pairs.offsets[bounds[g]], 1);
    fn(g, bounds[g], bounds[g + 1], std::min(CHUNK, rows));
  });
}

// expert_weights of experts [e0, e1), made side by side before any rows; an expert without rows gets none.
std::vector<ExpertWeights> experts_weights(const ExpertLoras& l, const Pairs& pairs, int64_t e0, int64_t e1,
                                           at::ScalarType dt) {
  std::vector<ExpertWeights> w(e1 - e0);
  parallel_tasks(e1 - e0, [&](int64_t i) {
    const int64_t n = pairs.offsets[e0 + i + 1] - pairs.offsets[e0 + i];
    if (n > 0) w[i] = expert_weights(l, e0 + i, dt, n);
  });
  return w;
}

std::tuple<Tensor, Tensor> mixlora_ffn_cpu(const Tensor& x, const c10::optional<Tensor>& gate, const Tensor& up,
                                           const Tensor& weights, const Tensor& indices,
                                           const c10::optional<Tensor>& gate_A, const c10::optional<Tensor>& gate_B,
                                           const c10::optional<Tensor>& up_A, const c10::optional<Tensor>& up_B,
                                           const c10::optional<Tensor>& down_A,
                                           const c10::optional<Tensor>& down_B, int64_t num_experts, double scaling,
                                           std::string act_name, double dropout_p, int64_t seed) {
  const ExpertLoras l{gate_A, gate_B, up_A, up_B, down_A, down_B};
  check_inputs(x, gate, up, weights, indices, l, num_experts);
  const Act act = parse_act(act_name);
  const auto dt = compute_type(up);
  const int64_t T_ = x.size(0), I = up.size(1), k = weights.size(1);
  const DropSpec drop(seed, dropout_p);
  const auto pairs = sort_pairs(indices, num_experts);
  const auto flat = pairs.token * k + pairs.slot;
  auto xc = x.to(dt).contiguous();
  auto G = has(gate) ? gate->to(dt).contiguous() : Tensor();
  auto U = up.to(dt).contiguous();
  auto pair_w = weights.to(dt).reshape({-1}).index_select(0, flat).contiguous();
  const bool down = has(down_B);
  const bool drop_h = down && drop.on();
  const int64_t out_down = down ? down_B->size(1) : 0;
  const int64_t n_pairs = pairs.token.numel();
  auto rank = [&](const c10::optional<Tensor>& A) { return has(A) ? A->size(1) : int64_t(0); };

  // Experts [e0, e1) into hbar and y_lora, through buffers of `rows` rows.
  auto run_experts = [&](int64_t e0, int64_t e1, int64_t rows, Tensor hbar, Tensor y_lora) {
    // Scratch slots 0-3 are the backward's x, dG, dU and h buffers too: an op's buffers live only during its call.
    auto x_buf = scratch(0, rows, x.size(1), U.options());
    auto dG_buf = scratch(1, rows, I, U.options());
    auto dU_buf = scratch(2, rows, I, U.options());
    auto h_buf = scratch(3, rows, I, U.options());
    auto ug_buf = scratch(6, rows, rank(gate_A), U.options()), uu_buf = scratch(8, rows, rank(up_A), U.options());
    auto ud_buf = scratch(10, rows, rank(down_A), U.options()), yd_buf = scratch(5, rows, out_down, U.options());
    if (!has(gate_A)) dG_buf.zero_();  // a projection without LoRA reads a zero delta
    if (!has(up_A)) dU_buf.zero_();
    const auto expert_w = experts_weights(l, pairs, e0, e1, dt);
    for (int64_t e = e0; e < e1; ++e) {
      const ExpertWeights& ew = expert_w[e - e0];
      for (int64_t c0 = pairs.offsets[e]; c0 < pairs.offsets[e + 1]; c0 += CHUNK) {
        for_blocks(std::min(CHUNK, pairs.offsets[e + 1] - c0), [&](int64_t r0, int64_t m) {
          const int64_t lo = c0 + r0;
          auto tok = pairs.token.slice(0, lo, lo + m);
          auto w = pair_w.slice(0, lo, lo + m);
          auto pair = flat.slice(0, lo, lo + m);
          auto xe = x_buf.narrow(0, r0, m);
          auto dG = dG_buf.narrow(0, r0, m), dU = dU_buf.narrow(0, r0, m), h = h_buf.narrow(0, r0, m);
          if (has(gate_A) || has(up_A)) {
            at::index_select_out(xe, xc, 0, tok);
            if (drop.on()) drop_rows(drop, kXStream, tok, xe);
          }
          // The LoRA deltas B (A xe) of the frozen projections.
          if (has(gate_A)) {
            auto ug = ug_buf.narrow(0, r0, m);
            rank_gemm::shrink(xe, ew.gA_t, 1.0, ug);
            rank_gemm::expand(ug, ew.gB_t, dG, false);
          }
          if (has(up_A)) {
            auto uu = uu_buf.narrow(0, r0, m);
            rank_gemm::shrink(xe, ew.uA_t, 1.0, uu);
            rank_gemm::expand(uu, ew.uB_t, dU, false);
          }
          // h holds drop(h) with drop_h (the down shrink's input); hbar sums the undropped h either way.
          AT_DISPATCH_FLOATING_TYPES(dt, "moelora_mixlora_ffn", [&] {
            dispatch_act(act, [&](auto a) {
              dispatch_flags(G.defined(), drop_h, false, [&](auto gated, auto dropped, auto) {
                ffn_rows_forward<decltype(a)::value, scalar_t, decltype(gated)::value, decltype(dropped)::value>(
                    G.defined() ? G.data_ptr<scalar_t>() : nullptr, U.data_ptr<scalar_t>(),
                    dG.data_ptr<scalar_t>(), dU.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(),
                    pair.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), static_cast<scalar_t>(scaling), m, I, drop,
                    h.data_ptr<scalar_t>(), hbar.data_ptr<scalar_t>());
              });
            });
          });
          if (down) {
            auto ud = ud_buf.narrow(0, r0, m), yd = yd_buf.narrow(0, r0, m);
            rank_gemm::shrink(h, ew.dA_t, 1.0, ud);
            rank_gemm::expand(ud, ew.dB_t, yd, false);
            add_rows(yd, tok, w, scaling, y_lora);
          }
        });
      }
    }
  };

  auto hbar = at::zeros({T_, I}, U.options());
  auto y_lora = at::zeros({T_, out_down}, U.options());
  if (n_pairs > SMALL_PAIRS) {
    run_experts(0, num_experts, std::min(CHUNK, n_pairs), hbar, y_lora);
    return {hbar, y_lora};
  }
  // Few rows per expert (decoding): a block would hold an expert's every row, the blocks could not spread over
  // the threads, and each tiny ATen GEMM would fork and join all of them (a 2 x 16 x 1408 GEMM: 8 us on one
  // thread, 30-90 us on two, busy VM). Instead the experts are cut, by their pairs, into two groups that run
  // side by side, their GEMMs single-threaded inside the parallel region, each into its own sums, added in a
  // fixed order: the result does not depend on the thread count.
  Tensor part_hbar[2] = {hbar, at::zeros_like(hbar)};
  Tensor part_y[2] = {y_lora, at::zeros_like(y_lora)};
  for_expert_groups(pairs, num_experts, [&](int64_t g, int64_t e0, int64_t e1, int64_t rows) {
    run_experts(e0, e1, rows, part_hbar[g], part_y[g]);
  });
  return {hbar.add_(part_hbar[1]), y_lora.add_(part_y[1])};
}

std::vector<Tensor> mixlora_ffn_backward_cpu(const Tensor& grad_hbar, const c10::optional<Tensor>& grad_y_lora,
                                             const Tensor& x, const c10::optional<Tensor>& gate, const Tensor& up,
                                             const Tensor& weights, const Tensor& indices,
                                             const c10::optional<Tensor>& gate_A,
                                             const c10::optional<Tensor>& gate_B, const c10::optional<Tensor>& up_A,
                                             const c10::optional<Tensor>& up_B, const c10::optional<Tensor>& down_A,
                                             const c10::optional<Tensor>& down_B, int64_t num_experts,
                                             double scaling, std::string act_name, double dropout_p, int64_t seed) {
  const ExpertLoras l{gate_A, gate_B, up_A, up_B, down_A, down_B};
  check_inputs(x, gate, up, weights, indices, l, num_experts);
  const Act act = parse_act(act_name);
  const auto dt = compute_type(up);
  const int64_t H = x.size(1), I = up.size(1), k = weights.size(1);
  const DropSpec drop(seed, dropout_p);
  const auto pairs = sort_pairs(indices, num_experts);
  const auto flat = pairs.token * k + pairs.slot;
  auto xc = x.to(dt).contiguous();
  auto G = has(gate) ? gate->to(dt).contiguous() : Tensor();
  auto U = up.to(dt).contiguous();
  auto dhbar = grad_hbar.to(dt).contiguous();
  const bool down = has(down_B);
  auto gy = (down && has(grad_y_lora)) ? grad_y_lora->to(dt).contiguous() : Tensor();
  const bool lora = gy.defined();
  auto pair_w = weights.to(dt).reshape({-1}).index_select(0, flat).contiguous();
  const bool drop_h = lora && drop.on();  // without a grad into the down LoRA, h is not dropped

  auto grad_w = at::zeros({weights.numel()}, U.options());
  auto g_gA = grad_buffer(gate_A, dt), g_gB = grad_buffer(gate_B, dt);
  auto g_uA = grad_buffer(up_A, dt), g_uB = grad_buffer(up_B, dt);
  auto g_dA = grad_buffer(down_A, dt), g_dB = grad_buffer(down_B, dt);
  auto opt = U.options();
  auto rank = [&](const c10::optional<Tensor>& A) { return has(A) ? A->size(1) : int64_t(0); };
  const int64_t n_pairs = pairs.token.numel();

  // Experts [e0, e1) into grad_x, grad_G, grad_U (and their own rows of grad_w and weight grads), through
  // buffers of `rows` rows.
  auto run_experts = [&](int64_t e0, int64_t e1, int64_t rows, Tensor grad_x, Tensor grad_G, Tensor grad_U) {
    // Chunk buffers: the blocks of a chunk write their rows, the weight grads then read the whole chunk.
    auto x_buf = scratch(0, rows, H, opt);
    auto dG_buf = scratch(1, rows, I, opt);
    auto dU_buf = scratch(2, rows, I, opt);
    auto h_buf = scratch(3, rows, lora ? I : 0, opt);
    auto q_buf = scratch(4, rows, lora ? I : 0, opt);
    auto gy_buf = scratch(5, rows, lora ? gy.size(1) : 0, opt);
    auto ug_buf = scratch(6, rows, rank(gate_A), opt), dug_buf = scratch(7, rows, rank(gate_A), opt);
    auto uu_buf = scratch(8, rows, rank(up_A), opt), duu_buf = scratch(9, rows, rank(up_A), opt);
    auto ud_buf = scratch(10, rows, lora ? rank(down_A) : 0, opt);
    auto dvd_buf = scratch(11, rows, lora ? rank(down_A) : 0, opt);
    auto gx_buf = scratch(12, rows, H, opt);
    const auto expert_w = experts_weights(l, pairs, e0, e1, dt);
    for (int64_t e = e0; e < e1; ++e) {
      const ExpertWeights& ew = expert_w[e - e0];
      for (int64_t c0 = pairs.offsets[e]; c0 < pairs.offsets[e + 1]; c0 += CHUNK) {
        const int64_t cm = std::min(CHUNK, pairs.offsets[e + 1] - c0);
        for_blocks(cm, [&](int64_t r0, int64_t m) {
          const int64_t lo = c0 + r0;
          auto tok = pairs.token.slice(0, lo, lo + m);
          auto w = pair_w.slice(0, lo, lo + m);
          auto pair = flat.slice(0, lo, lo + m);
          auto xe = x_buf.narrow(0, r0, m);
          auto dG = dG_buf.narrow(0, r0, m), dU = dU_buf.narrow(0, r0, m);
          if (has(gate_A) || has(up_A)) {
            at::index_select_out(xe, xc, 0, tok);
            if (drop.on()) drop_rows(drop, kXStream, tok, xe);  // xe = drop(x) rows, for the shrinks and dA
          }
          // The row loop below overwrites the deltas with grads, so a projection without LoRA zeroes them again.
          // The deltas B (A xe) again, keeping A xe for the B grads.
          auto ug = ug_buf.narrow(0, r0, m), uu = uu_buf.narrow(0, r0, m);
          if (has(gate_A)) {
            rank_gemm::shrink(xe, ew.gA_t, 1.0, ug);
            rank_gemm::expand(ug, ew.gB_t, dG, false);
          } else {
            dG.zero_();
          }
          if (has(up_A)) {
            rank_gemm::shrink(xe, ew.uA_t, 1.0, uu);
            rank_gemm::expand(uu, ew.uB_t, dU, false);
          } else {
            dU.zero_();
          }
          // q = (Bd^T dy) Ad per row, the grad into the down LoRA's input per unit of w s: it does not depend on
          // h, so the row loop recomputes h (the forward kept only hbar) and runs its backward in one pass.
          Tensor q;
          if (lora) {
            auto gye = gy_buf.narrow(0, r0, m), dvd = dvd_buf.narrow(0, r0, m);
            at::index_select_out(gye, gy, 0, tok);
            rank_gemm::shrink(gye, ew.dB, 1.0, dvd);  // [m, r] = Bd^T dy per row
            q = q_buf.narrow(0, r0, m);
            rank_gemm::expand(dvd, ew.dA, q, false);
          }
          AT_DISPATCH_FLOATING_TYPES(dt, "moelora_mixlora_ffn_backward", [&] {
            dispatch_act(act, [&](auto a) {
              dispatch_flags(G.defined(), lora, drop_h, [&](auto gated, auto with_lora, auto dropped) {
                ffn_rows_backward<decltype(a)::value, scalar_t, decltype(gated)::value, decltype(with_lora)::value,
                                  decltype(dropped)::value>(
                    G.defined() ? G.data_ptr<scalar_t>() : nullptr, U.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>(),
                    dU.data_ptr<scalar_t>(), lora ? h_buf.narrow(0, r0, m).data_ptr<scalar_t>() : nullptr,
                    lora ? q.data_ptr<scalar_t>() : nullptr, dhbar.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(),
                    pair.data_ptr<int64_t>(), w.data_ptr<scalar_t>(), static_cast<scalar_t>(scaling), m, I, drop,
                    grad_G.defined() ? grad_G.data_ptr<scalar_t>() : nullptr, grad_U.data_ptr<scalar_t>(),
                    grad_w.data_ptr<scalar_t>());
              });
            });
          });
          if (lora) {
            auto h = h_buf.narrow(0, r0, m);  // the down LoRA's input (drop(h) with drop_h)
            auto ud = ud_buf.narrow(0, r0, m);
            rank_gemm::shrink(h, ew.dA_t, 1.0, ud);
            gy_buf.narrow(0, r0, m).mul_(w.unsqueeze(1));
            dvd_buf.narrow(0, r0, m).mul_(w.unsqueeze(1) * scaling);
          }
          // dG, dU now hold d(pre-activation) of gate and up for these rows.
          auto grad_xe = gx_buf.narrow(0, r0, m);
          if (has(gate_A)) {
            auto d_ug = dug_buf.narrow(0, r0, m);
            rank_gemm::shrink(dG, ew.gB, scaling, d_ug);  // [m, r]
            rank_gemm::expand(d_ug, ew.gA, grad_xe, false);
          }
          if (has(up_A)) {
            auto d_uu = duu_buf.narrow(0, r0, m);
            rank_gemm::shrink(dU, ew.uB, scaling, d_uu);
            rank_gemm::expand(d_uu, ew.uA, grad_xe, has(gate_A));
          }
          if (has(gate_A) || has(up_A)) {
            if (drop.on()) drop_rows(drop, kXStream, tok, grad_xe);  // the grad into drop(x), through the x mask
            add_rows(grad_xe, tok, Tensor(), 1.0, grad_x);
          }
        });
        // The weight grads sum over the chunk's rows: one GEMM per LoRA matrix over all its blocks. They are
        // independent, so they run side by side, each single-threaded, rather than each forking all threads; the
        // larger ones (the [I, r] and [r, I] grads) first, so that the threads finish together.
        auto xe = x_buf.narrow(0, 0, cm);
        std::vector<std::function<void()>> weight_grads;
        auto rows_of = [&](const Tensor& buf) { return buf.narrow(0, 0, cm); };
        auto add = [&](auto&& fn) { weight_grads.emplace_back(fn); };
        if (has(gate_A)) add([&] { rank_gemm::grad_b(rows_of(dG_buf), rows_of(ug_buf), scaling, g_gB[e]); });
        if (has(up_A)) add([&] { rank_gemm::grad_b(rows_of(dU_buf), rows_of(uu_buf), scaling, g_uB[e]); });
        if (lora) {
          add([&] { rank_gemm::grad_a(rows_of(dvd_buf), rows_of(h_buf), 1.0, g_dA[e]); });
          add([&] { rank_gemm::grad_b(rows_of(gy_buf), rows_of(ud_buf), scaling, g_dB[e]); });
        }
        if (has(gate_A)) add([&] { rank_gemm::grad_a(rows_of(dug_buf), xe, 1.0, g_gA[e]); });
        if (has(up_A)) add([&] { rank_gemm::grad_a(rows_of(duu_buf), xe, 1.0, g_uA[e]); });
        parallel_tasks(static_cast<int64_t>(weight_grads.size()), [&](int64_t i) { weight_grads[i](); });
      }
    }
  };

  auto grad_x = at::zeros_like(xc);
  auto grad_G = G.defined() ? at::zeros_like(G) : Tensor();
  auto grad_U = at::zeros_like(U);
  if (n_pairs > SMALL_PAIRS) {
    run_experts(0, num_experts, std::min(CHUNK, n_pairs), grad_x, grad_G, grad_U);
  } else {
    // As in the forward: two expert groups side by side, each into its own grads of x, G and U, added in a
    // fixed order (the weight grads and grad_w are per expert and per pair: no overlap).
    Tensor part_x[2] = {grad_x, at::zeros_like(grad_x)};
    Tensor part_G[2] = {grad_G, G.defined() ? at::zeros_like(grad_G) : Tensor()};
    Tensor part_U[2] = {grad_U, at::zeros_like(grad_U)};
    for_expert_groups(pairs, num_experts, [&](int64_t g, int64_t e0, int64_t e1, int64_t rows) {
      run_experts(e0, e1, rows, part_x[g], part_G[g], part_U[g]);
    });
    grad_x.add_(part_x[1]);
    if (G.defined()) grad_G.add_(part_G[1]);
    grad_U.add_(part_U[1]);
  }
  auto none = at::empty({0}, U.options());
  auto out = [&](const Tensor& t, const c10::optional<Tensor>& like) {
    return t.defined() ? t.to(like->scalar_type()) : none;
  };
  return {grad_x.to(x.scalar_type()),
          grad_G.defined() ? grad_G.to(gate->scalar_type()) : none,
          grad_U.to(up.scalar_type()),
          grad_w.view(weights.sizes()).to(weights.scalar_type()),
          out(g_gA, gate_A),
          out(g_gB, gate_B),
          out(g_uA, up_A),
          out(g_uB, up_B),
          out(g_dA, down_A),
          out(g_dB, down_B)};
}

}  // namespace moelora
