// moe_lora: y[t] = sum_j w[t, j] * s * B_e A_e x[t], per expert on its gathered rows (ATen GEMMs).
#include "ops.h"

namespace moelora {

namespace {

void check_moe_lora(const Tensor& x, const Tensor& weights, const Tensor& indices, const Tensor& A, const Tensor& B) {
  check_cpu_float(x, "x");
  check_cpu_float(weights, "weights");
  check_cpu_float(A, "lora_A");
  check_cpu_float(B, "lora_B");
  check_dim(x, 2, "x");
  check_dim(A, 3, "lora_A");
  check_dim(B, 3, "lora_B");
  TORCH_CHECK(weights.sizes() == indices.sizes() && weights.dim() == 2 && weights.size(0) == x.size(0),
              "moelora cpu backend: weights and indices must both be [T, k] with T = ", x.size(0), ", got ",
              weights.sizes(), " and ", indices.sizes());
  TORCH_CHECK(A.size(0) == B.size(0) && A.size(1) == B.size(2) && A.size(2) == x.size(1),
              "moelora cpu backend: lora_A must be [E, r, in=", x.size(1), "] and lora_B [E, out, r], got ",
              A.sizes(), " and ", B.sizes());
}

}  // namespace

Tensor moe_lora_cpu(const Tensor& x, const Tensor& weights, const Tensor& indices, const Tensor& A, const Tensor& B,
                    double scaling) {
  check_moe_lora(x, weights, indices, A, B);
  const auto dt = compute_type(x);
  const auto pairs = sort_pairs(indices, A.size(0));
  auto xc = x.to(dt);
  auto pair_w = weights.to(dt).reshape({-1}).index_select(0, pairs.token * weights.size(1) + pairs.slot);
  auto y = at::zeros({x.size(0), B.size(1)}, xc.options());
  for (int64_t e = 0; e < A.size(0); ++e) {
    const int64_t lo = pairs.offsets[e], hi = pairs.offsets[e + 1];
    if (lo == hi) continue;
    auto tok = pairs.token.slice(0, lo, hi);
    auto xe = xc.index_select(0, tok);
    auto delta = at::mm(at::mm(xe, A[e].to(dt).t()), B[e].to(dt).t());
    y.index_add_(0, tok, delta.mul_(pair_w.slice(0, lo, hi).unsqueeze(1) * scaling));
  }
  return y.to(x.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_lora_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                                 const Tensor& weights, const Tensor& indices,
                                                                 const Tensor& A, const Tensor& B, double scaling) {
  check_moe_lora(x, weights, indices, A, B);
  const auto dt = compute_type(x);
  const auto pairs = sort_pairs(indices, A.size(0));
  const int64_t k = weights.size(1);
  auto xc = x.to(dt);
  auto gy = grad_y.to(dt);
  auto flat = pairs.token * k + pairs.slot;
  auto pair_w = weights.to(dt).reshape({-1}).index_select(0, flat);
  auto grad_x = at::zeros_like(xc);
  auto grad_w = at::zeros({weights.numel()}, xc.options());
  auto grad_A = at::zeros(A.sizes(), A.options().dtype(dt));
  auto grad_B = at::zeros(B.sizes(), B.options().dtype(dt));
  for (int64_t e = 0; e < A.size(0); ++e) {
    const int64_t lo = pairs.offsets[e], hi = pairs.offsets[e + 1];
    if (lo == hi) continue;
    auto tok = pairs.token.slice(0, lo, hi);
    auto w = pair_w.slice(0, lo, hi).unsqueeze(1);
    auto Ae = A[e].to(dt), Be = B[e].to(dt);
    auto xe = xc.index_select(0, tok);
    auto gye = gy.index_select(0, tok);
    auto u = at::mm(xe, Ae.t());   // [n, r]
    auto g = at::mm(gye, Be);      // [n, r] = B^T dy per row
    grad_w.index_copy_(0, flat.slice(0, lo, hi), (g * u).sum(1) * scaling);
    grad_B[e].copy_(at::mm((gye * w).t(), u).mul_(scaling));
    auto du = g.mul_(w * scaling);  // [n, r]
    grad_A[e].copy_(at::mm(du.t(), xe));
    grad_x.index_add_(0, tok, at::mm(du, Ae));
  }
  return {grad_x.to(x.scalar_type()), grad_w.view(weights.sizes()).to(weights.scalar_type()),
          grad_A.to(A.scalar_type()), grad_B.to(B.scalar_type())};
}

}  // namespace moelora
