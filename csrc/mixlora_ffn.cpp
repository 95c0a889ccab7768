// mixlora_ffn: hbar = sum_j w_j act(G + dG_j) * (U + dU_j) and the down LoRA of each h_j, expert by expert.
//
// The frozen projections stay outside (the caller runs Wg, Wu on x and Wd once on hbar, so a quantised base
// works). Per expert the gathered rows go through ATen GEMMs for the rank-r work and one fused, vectorised
// row loop for the activation, the product and the weighted sum: h exists only for one expert's rows at a
// time, never as [T, k, I]. The backward recomputes h rather than storing it.
//
// LoRA dropout (dropout_p > 0, moelora/dropout.py) is made from (seed, element index) where it is used and never
// stored: x is dropped in each expert's gathered rows of x (the chunk buffer the gate/up shrinks read, so no
// [T, H] dropped copy exists; a token's mask is made once per slot it fills), each h_j as the row loop writes
// the down shrink's input, while hbar sums the undropped h_j. The backward makes both masks again: for the
// recomputed gate/up shrinks, for the grad into x (through the x mask), for the down shrink's input and for the
// grad into h_j from the down LoRA (through the h mask).
#include "ops.h"
#include "philox.h"

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

// The frozen projections' LoRA delta of one chunk, B (A xe), written into `out` [m, I]; the rank-space
// activations A xe [m, r] are returned (the backward needs them).
Tensor lora_delta_into(const c10::optional<Tensor>& A, const c10::optional<Tensor>& B, int64_t e, const Tensor& xe,
                       at::ScalarType dt, Tensor out) {
  auto u = at::mm(xe, (*A)[e].to(dt).t());
  at::mm_out(out, u, (*B)[e].to(dt).t());
  return u;
}

Tensor grad_buffer(const c10::optional<Tensor>& t, at::ScalarType dt) {
  return has(t) ? at::zeros(t->sizes(), t->options().dtype(dt)) : Tensor();
}

// One expert's rows: h[n] = act(G[t] + s dG[n]) * (U[t] + s dU[n]) (GATED false: act(U[t] + s dU[n])),
// and with ACC hbar[t] += w[n] h[n] (the backward's recompute needs h only); with DROP the row written is the
// down shrink's input drop(h[n]) = h[n] * f (f: drop_factors of the h mask), while hbar sums the undropped h.
// Rows of one expert are distinct tokens, so rows run in parallel without races. The branches are template
// arguments: a branch inside the inner loop stops gcc from vectorising it. The outputs (and f) are __restrict:
// with DROP the loop has one pointer more, and gcc's runtime alias checks (at most 10) no longer covered it,
// so it ran scalar (2x slower).
template <Act act, typename T, bool GATED, bool ACC, bool DROP>
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
    if constexpr (ACC) hbar_row[i] += wr * v;
  }
}

// pair[r] = t * k + j is row r's (token, slot) pair, so its h mask starts at element pair[r] * I.
template <Act act, typename T, bool GATED, bool ACC, bool DROP>
void ffn_rows_forward(const T* G, const T* U, const T* dG, const T* dU, const int64_t* tok, const int64_t* pair,
                      const T* w, T s, int64_t n, int64_t I, const DropSpec& drop, T* h, T* hbar) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    alignas(64) T f[DROP ? kDropBlock : 1];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = tok[r];
      if constexpr (DROP) {
        for (int64_t lo = 0; lo < I; lo += kDropBlock) {
          const int64_t m = std::min(kDropBlock, I - lo);
          drop_factors(drop, kHStream, pair[r] * I + lo, m, f);
          ffn_row_forward<act, T, GATED, ACC, true>(GATED ? G + t * I + lo : nullptr, U + t * I + lo,
                                                    GATED ? dG + r * I + lo : nullptr, dU + r * I + lo, s, w[r], m,
                                                    f, h + r * I + lo, ACC ? hbar + t * I + lo : nullptr);
        }
      } else {
        ffn_row_forward<act, T, GATED, ACC, false>(GATED ? G + t * I : nullptr, U + t * I,
                                                   GATED ? dG + r * I : nullptr, dU + r * I, s, w[r], I, nullptr,
                                                   h + r * I, ACC ? hbar + t * I : nullptr);
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

// Backward of the rows: dh = w dhbar[t] (+ dh_lora[n] with LORA); writes d(pre-activation) of gate into dG
// and of up into dU (in place of the deltas, read first), adds them to grad_G[t], grad_U[t], and returns
// dot(h[n], dhbar[t]) (the routing weight's gradient through hbar) in h_dot[n]. With DROP (and LORA) h_row holds
// drop(h), so h is recomputed for the dot, and dh_lora, the grad into drop(h), passes the h mask f.
template <Act act, typename T, bool GATED, bool LORA, bool DROP>
MOELORA_VECTOR_CLONES T ffn_row_backward(const T* g_row, const T* u_row, T* dg_row, T* du_row, const T* h_row,
                                         const T* dhl_row, const T* f, const T* dhbar_row, T s, T wr, int64_t I,
                                         T* gG_row, T* gU_row) {
  static_assert(LORA || !DROP, "the h mask acts on the down LoRA's input only");
  T dot = 0;
  // A reduction vectorises only when allowed to reorder the sum: the order is fixed per build, not per thread.
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < I; ++i) {
    if constexpr (!DROP) dot += h_row[i] * dhbar_row[i];
    T dh = wr * dhbar_row[i];
    if constexpr (DROP) {
      dh += dhl_row[i] * f[i];
    } else if constexpr (LORA) {
      dh += dhl_row[i];
    }
    const T u = u_row[i] + s * du_row[i];
    if constexpr (GATED) {
      const T g = g_row[i] + s * dg_row[i];
      const T ag = act_value<act>(g);
      if constexpr (DROP) dot += ag * u * dhbar_row[i];
      const T dg = dh * u * act_grad<act>(g);
      const T du = dh * ag;
      dg_row[i] = dg;
      du_row[i] = du;
      gG_row[i] += dg;
      gU_row[i] += du;
    } else {
      if constexpr (DROP) dot += act_value<act>(u) * dhbar_row[i];
      const T du = dh * act_grad<act>(u);
      du_row[i] = du;
      gU_row[i] += du;
    }
  }
  return dot;
}

template <Act act, typename T, bool GATED, bool LORA, bool DROP>
void ffn_rows_backward(const T* G, const T* U, T* dG, T* dU, const T* h, const T* dh_lora, const T* dhbar,
                       const int64_t* tok, const int64_t* pair, const T* w, T s, int64_t n, int64_t I,
                       const DropSpec& drop, T* grad_G, T* grad_U, T* h_dot) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
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
              h + r * I + lo, dh_lora + r * I + lo, f, dhbar + t * I + lo, s, w[r], m,
              GATED ? grad_G + t * I + lo : nullptr, grad_U + t * I + lo);
        }
        h_dot[r] = dot;
      } else {
        h_dot[r] = ffn_row_backward<act, T, GATED, LORA, false>(
            GATED ? G + t * I : nullptr, U + t * I, GATED ? dG + r * I : nullptr, dU + r * I, h + r * I,
            LORA ? dh_lora + r * I : nullptr, nullptr, dhbar + t * I, s, w[r], I, GATED ? grad_G + t * I : nullptr,
            grad_U + t * I);
      }
    }
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
                "moelora cpu backend: ", name, " must be A [E=", E, ", r, ", in, "] and B [E, ", out,
                ", r], got ", A->sizes(), " and ", B->sizes());
  };
  check_pair(l.gate_A, l.gate_B, H, I, "gate LoRA");
  check_pair(l.up_A, l.up_B, H, I, "up LoRA");
  check_pair(l.down_A, l.down_B, I, -1, "down LoRA");
  TORCH_CHECK(!has(l.gate_A) || has(gate), "moelora cpu backend: a gate LoRA needs the gate projection");
}

}  // namespace

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
  auto hbar = at::zeros({T_, I}, U.options());
  const bool down = has(down_B);
  const bool drop_h = down && drop.on();
  auto y_lora = at::zeros({T_, down ? down_B->size(1) : 0}, U.options());
  const int64_t rows = std::min(CHUNK, std::max<int64_t>(pairs.token.numel(), 1));
  auto x_buf = at::empty({rows, x.size(1)}, U.options());
  auto dG_buf = at::zeros({rows, I}, U.options());  // stays zero when the gate has no LoRA
  auto dU_buf = at::zeros({rows, I}, U.options());
  auto h_buf = at::empty({rows, I}, U.options());
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t lo = pairs.offsets[e]; lo < pairs.offsets[e + 1]; lo += CHUNK) {
      const int64_t m = std::min(CHUNK, pairs.offsets[e + 1] - lo);
      auto tok = pairs.token.slice(0, lo, lo + m);
      auto w = pair_w.slice(0, lo, lo + m);
      auto xe = x_buf.narrow(0, 0, m);
      auto pair = flat.slice(0, lo, lo + m);
      auto dG = dG_buf.narrow(0, 0, m), dU = dU_buf.narrow(0, 0, m), h = h_buf.narrow(0, 0, m);
      if (has(gate_A) || has(up_A)) {
        at::index_select_out(xe, xc, 0, tok);
        if (drop.on()) drop_rows(drop, kXStream, tok, xe);
      }
      if (has(gate_A)) lora_delta_into(gate_A, gate_B, e, xe, dt, dG);
      if (has(up_A)) lora_delta_into(up_A, up_B, e, xe, dt, dU);
      // h holds drop(h) with drop_h (the down shrink's input); hbar sums the undropped h either way.
      AT_DISPATCH_FLOATING_TYPES(dt, "moelora_mixlora_ffn", [&] {
        dispatch_act(act, [&](auto a) {
          dispatch_flags(G.defined(), true, drop_h, [&](auto gated, auto acc, auto dropped) {
            ffn_rows_forward<decltype(a)::value, scalar_t, decltype(gated)::value, decltype(acc)::value,
                             decltype(dropped)::value>(
                G.defined() ? G.data_ptr<scalar_t>() : nullptr, U.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>(),
                dU.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(), pair.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
                static_cast<scalar_t>(scaling), m, I, drop, h.data_ptr<scalar_t>(), hbar.data_ptr<scalar_t>());
          });
        });
      });
      if (down) {
        auto yd = at::mm(at::mm(h, (*down_A)[e].to(dt).t()), (*down_B)[e].to(dt).t());
        y_lora.index_add_(0, tok, yd.mul_(w.unsqueeze(1) * scaling));
      }
    }
  }
  return {hbar, y_lora};
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
  const int64_t I = up.size(1), k = weights.size(1);
  const DropSpec drop(seed, dropout_p);
  const auto pairs = sort_pairs(indices, num_experts);
  const auto flat = pairs.token * k + pairs.slot;
  auto xc = x.to(dt).contiguous();
  auto G = has(gate) ? gate->to(dt).contiguous() : Tensor();
  auto U = up.to(dt).contiguous();
  auto dhbar = grad_hbar.to(dt).contiguous();
  const bool down = has(down_B);
  auto gy = (down && has(grad_y_lora)) ? grad_y_lora->to(dt).contiguous() : Tensor();
  auto pair_w = weights.to(dt).reshape({-1}).index_select(0, flat).contiguous();
  const bool drop_h = gy.defined() && drop.on();  // without a grad into the down LoRA, h is not dropped

  auto grad_x = at::zeros_like(xc);
  auto grad_G = G.defined() ? at::zeros_like(G) : Tensor();
  auto grad_U = at::zeros_like(U);
  auto grad_w = at::zeros({weights.numel()}, U.options());
  auto g_gA = grad_buffer(gate_A, dt), g_gB = grad_buffer(gate_B, dt);
  auto g_uA = grad_buffer(up_A, dt), g_uB = grad_buffer(up_B, dt);
  auto g_dA = grad_buffer(down_A, dt), g_dB = grad_buffer(down_B, dt);

  const int64_t rows = std::min(CHUNK, std::max<int64_t>(pairs.token.numel(), 1));
  auto x_buf = at::empty({rows, x.size(1)}, U.options());
  auto dG_buf = at::empty({rows, I}, U.options());
  auto dU_buf = at::empty({rows, I}, U.options());
  auto h_buf = at::empty({rows, I}, U.options());
  auto dhl_buf = at::empty({rows, I}, U.options());
  auto h_dot_buf = at::empty({rows}, U.options());
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t lo = pairs.offsets[e]; lo < pairs.offsets[e + 1]; lo += CHUNK) {
      const int64_t m = std::min(CHUNK, pairs.offsets[e + 1] - lo);
      auto tok = pairs.token.slice(0, lo, lo + m);
      auto w = pair_w.slice(0, lo, lo + m);
      auto xe = x_buf.narrow(0, 0, m);
      auto pair = flat.slice(0, lo, lo + m);
      auto dG = dG_buf.narrow(0, 0, m), dU = dU_buf.narrow(0, 0, m), h = h_buf.narrow(0, 0, m);
      if (has(gate_A) || has(up_A)) {
        at::index_select_out(xe, xc, 0, tok);
        if (drop.on()) drop_rows(drop, kXStream, tok, xe);  // xe = drop(x) rows, for the shrinks and dA
      }
      Tensor ug, uu;
      if (has(gate_A)) ug = lora_delta_into(gate_A, gate_B, e, xe, dt, dG);
      else dG.zero_();
      if (has(up_A)) uu = lora_delta_into(up_A, up_B, e, xe, dt, dU);
      else dU.zero_();

      // Recompute h for these rows (drop(h) with drop_h): the forward kept only hbar.
      AT_DISPATCH_FLOATING_TYPES(dt, "moelora_mixlora_ffn_recompute", [&] {
        dispatch_act(act, [&](auto a) {
          dispatch_flags(G.defined(), false, drop_h, [&](auto gated, auto acc, auto dropped) {
            ffn_rows_forward<decltype(a)::value, scalar_t, decltype(gated)::value, decltype(acc)::value,
                             decltype(dropped)::value>(
                G.defined() ? G.data_ptr<scalar_t>() : nullptr, U.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>(),
                dU.data_ptr<scalar_t>(), tok.data_ptr<int64_t>(), pair.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
                static_cast<scalar_t>(scaling), m, I, drop, h.data_ptr<scalar_t>(), nullptr);
          });
        });
      });

      Tensor dh_lora, lora_dot;
      if (down && gy.defined()) {
        auto dAe = (*down_A)[e].to(dt), dBe = (*down_B)[e].to(dt);
        auto ud = at::mm(h, dAe.t());  // [m, r]
        auto gye = gy.index_select(0, tok);
        auto dvd = at::mm(gye, dBe);  // [m, r] = Bd^T dy per row
        lora_dot = (ud * dvd).sum(1).mul_(scaling);
        g_dB[e].addmm_(gye.mul_(w.unsqueeze(1)).t(), ud, 1.0, scaling);
        auto d_ud = dvd.mul_(w.unsqueeze(1) * scaling);
        g_dA[e].addmm_(d_ud.t(), h);
        dh_lora = dhl_buf.narrow(0, 0, m);
        at::mm_out(dh_lora, d_ud, dAe);
      }

      auto h_dot = h_dot_buf.narrow(0, 0, m);
      AT_DISPATCH_FLOATING_TYPES(dt, "moelora_mixlora_ffn_backward", [&] {
        dispatch_act(act, [&](auto a) {
          dispatch_flags(G.defined(), dh_lora.defined(), drop_h, [&](auto gated, auto lora, auto dropped) {
            ffn_rows_backward<decltype(a)::value, scalar_t, decltype(gated)::value, decltype(lora)::value,
                              decltype(dropped)::value>(
                G.defined() ? G.data_ptr<scalar_t>() : nullptr, U.data_ptr<scalar_t>(), dG.data_ptr<scalar_t>(),
                dU.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                dh_lora.defined() ? dh_lora.data_ptr<scalar_t>() : nullptr, dhbar.data_ptr<scalar_t>(),
                tok.data_ptr<int64_t>(), pair.data_ptr<int64_t>(), w.data_ptr<scalar_t>(),
                static_cast<scalar_t>(scaling), m, I, drop, grad_G.defined() ? grad_G.data_ptr<scalar_t>() : nullptr,
                grad_U.data_ptr<scalar_t>(), h_dot.data_ptr<scalar_t>());
          });
        });
      });
      grad_w.index_copy_(0, flat.slice(0, lo, lo + m), lora_dot.defined() ? h_dot + lora_dot : h_dot);

      // dG, dU now hold d(pre-activation) of gate and up for these rows.
      Tensor grad_xe;
      if (has(gate_A)) {
        auto d_ug = at::mm(dG, (*gate_B)[e].to(dt)).mul_(scaling);  // [m, r]
        g_gB[e].addmm_(dG.t(), ug, 1.0, scaling);
        g_gA[e].addmm_(d_ug.t(), xe);
        grad_xe = at::mm(d_ug, (*gate_A)[e].to(dt));
      }
      if (has(up_A)) {
        auto d_uu = at::mm(dU, (*up_B)[e].to(dt)).mul_(scaling);
        g_uB[e].addmm_(dU.t(), uu, 1.0, scaling);
        g_uA[e].addmm_(d_uu.t(), xe);
        grad_xe = grad_xe.defined() ? grad_xe.addmm_(d_uu, (*up_A)[e].to(dt)) : at::mm(d_uu, (*up_A)[e].to(dt));
      }
      if (grad_xe.defined()) {
        if (drop.on()) drop_rows(drop, kXStream, tok, grad_xe);  // the grad into drop(x), through the x mask
        grad_x.index_add_(0, tok, grad_xe);
      }
    }
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
