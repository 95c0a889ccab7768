// route: router logits (one GEMM), then per token softmax, top-k renormalised or top-p, in one pass.
#include <algorithm>
#include <numeric>

#include "ops.h"

namespace moelora {

namespace {

// Expert order for selection: larger probability first, lower index on ties.
template <typename T>
void order_experts(const T* p, int64_t E, std::vector<int64_t>& order) {
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [p](int64_t a, int64_t b) { return p[a] > p[b]; });
}

template <typename T>
void route_rows(const Tensor& logits, Tensor& probs, Tensor& weights, Tensor& indices, int64_t top_k,
                double top_p) {
  const int64_t T_ = logits.size(0), E = logits.size(1), k = weights.size(1);
  const T* lp = logits.data_ptr<T>();
  T* pp = probs.data_ptr<T>();
  T* wp = weights.data_ptr<T>();
  int64_t* ip = indices.data_ptr<int64_t>();
  at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> order(E);
    for (int64_t t = begin; t < end; ++t) {
      const T* l = lp + t * E;
      T* p = pp + t * E;
      T m = l[0];
      for (int64_t e = 1; e < E; ++e) m = std::max(m, l[e]);
      T sum = 0;
      for (int64_t e = 0; e < E; ++e) {
        p[e] = std::exp(l[e] - m);
        sum += p[e];
      }
      for (int64_t e = 0; e < E; ++e) p[e] /= sum;
      order_experts(p, E, order);
      T* w = wp + t * k;
      int64_t* idx = ip + t * k;
      if (top_k > 0) {
        T kept = 0;
        for (int64_t j = 0; j < k; ++j) kept += p[order[j]];
        for (int64_t j = 0; j < k; ++j) {
          w[j] = p[order[j]] / kept;
          idx[j] = order[j];
        }
      } else {
        // MoE-PEFT's top-p: keep a slot while the mass before it is <= top_p (every slot when top_p = 1);
        // never renormalised. The running sum is kept in double and rounded per step, as torch.cumsum does
        // on the CPU, so that the reference and this op cut at the same slot.
        double cum = 0;
        for (int64_t j = 0; j < k; ++j) {
          const T pj = p[order[j]];
          cum += static_cast<double>(pj);
          const T before = static_cast<T>(cum) - pj;
          const bool keep = j == 0 || top_p >= 1.0 || before <= static_cast<T>(top_p);
          w[j] = keep ? pj : T(0);
          idx[j] = keep ? order[j] : -1;
        }
      }
    }
  });
}

template <typename T>
void route_backward_rows(const Tensor& grad_weights, const Tensor& grad_probs, const Tensor& weights,
                         const Tensor& indices, const Tensor& probs, bool renormalized, Tensor& grad_logits) {
  const int64_t T_ = probs.size(0), E = probs.size(1), k = weights.size(1);
  const T* gw = grad_weights.data_ptr<T>();
  const T* gp = grad_probs.defined() ? grad_probs.data_ptr<T>() : nullptr;
  const T* wp = weights.data_ptr<T>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  const T* pp = probs.data_ptr<T>();
  T* gl = grad_logits.data_ptr<T>();
  at::parallel_for(0, T_, 64, [&](int64_t begin, int64_t end) {
    std::vector<T> dp(E);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t e = 0; e < E; ++e) dp[e] = gp ? gp[t * E + e] : T(0);
      const T* dw = gw + t * k;
      const T* w = wp + t * k;
      const int64_t* idx = ip + t * k;
      const T* p = pp + t * E;
      if (renormalized) {
        // w_j = p_j / S over the selected experts: dL/dp_j = (dw_j - sum_i dw_i w_i) / S.
        T kept = 0, dot = 0;
        for (int64_t j = 0; j < k; ++j) {
          kept += p[idx[j]];
          dot += dw[j] * w[j];
        }
        for (int64_t j = 0; j < k; ++j) dp[idx[j]] += (dw[j] - dot) / kept;
      } else {
        for (int64_t j = 0; j < k; ++j)
          if (idx[j] >= 0) dp[idx[j]] += dw[j];
      }
      T pdp = 0;
      for (int64_t e = 0; e < E; ++e) pdp += p[e] * dp[e];
      for (int64_t e = 0; e < E; ++e) gl[t * E + e] = p[e] * (dp[e] - pdp);
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> route_cpu(const Tensor& x, const Tensor& router_weight, int64_t top_k,
                                             double top_p) {
  check_cpu_float(x, "x");
  check_cpu_float(router_weight, "router_weight");
  check_dim(x, 2, "x");
  check_dim(router_weight, 2, "router_weight");
  TORCH_CHECK(x.size(1) == router_weight.size(1), "moelora cpu backend: route: x has ", x.size(1),
              " features but router_weight is ", router_weight.sizes());
  const int64_t E = router_weight.size(0);
  TORCH_CHECK(top_k <= E, "moelora cpu backend: route: top_k=", top_k, " exceeds ", E, " experts");
  TORCH_CHECK(top_k >= 0, "moelora cpu backend: route: top_k must be >= 1 (or 0 for top-p routing), got ", top_k);
  TORCH_CHECK(top_k > 0 || (top_p > 0.0 && top_p <= 1.0),
              "moelora cpu backend: route: top_k=0 selects top-p routing, which needs top_p in (0, 1], got top_p=",
              top_p);
  const auto dt = compute_type(x);
  auto logits = at::mm(x.to(dt), router_weight.to(dt).t()).contiguous();
  const int64_t k = top_k > 0 ? top_k : E;
  auto probs = at::empty_like(logits);
  auto weights = at::empty({x.size(0), k}, logits.options());
  auto indices = at::empty({x.size(0), k}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(dt, "moelora_route", [&] {
    route_rows<scalar_t>(logits, probs, weights, indices, top_k, top_p);
  });
  return {weights, indices, probs};
}

std::tuple<Tensor, Tensor> route_backward_cpu(const Tensor& grad_weights, const c10::optional<Tensor>& grad_probs,
                                              const Tensor& x, const Tensor& router_weight, const Tensor& weights,
                                              const Tensor& indices, const Tensor& probs, bool renormalized) {
  const auto dt = probs.scalar_type();
  auto gw = grad_weights.to(dt).contiguous();
  Tensor gp;
  if (grad_probs.has_value() && grad_probs->defined()) gp = grad_probs->to(dt).contiguous();
  auto grad_logits = at::empty_like(probs);
  AT_DISPATCH_FLOATING_TYPES(dt, "moelora_route_backward", [&] {
    route_backward_rows<scalar_t>(gw, gp, weights.contiguous(), indices.contiguous(), probs.contiguous(),
                                  renormalized, grad_logits);
  });
  auto grad_x = at::mm(grad_logits, router_weight.to(dt)).to(x.scalar_type());
  auto grad_router = at::mm(grad_logits.t(), x.to(dt)).to(router_weight.scalar_type());
  return {grad_x, grad_router};
}

}  // namespace moelora
