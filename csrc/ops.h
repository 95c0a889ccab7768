// The CPU implementations of the moelora ops, declared once: registration.cpp binds them to the schemas,
// and each implementation file includes this so its definitions must match.
#pragma once

#include "common.h"

namespace moelora {

std::tuple<Tensor, Tensor, Tensor> route_cpu(const Tensor& x, const Tensor& router_weight, int64_t top_k,
                                             double top_p);
std::tuple<Tensor, Tensor> route_backward_cpu(const Tensor& grad_weights, const c10::optional<Tensor>& grad_probs,
                                              const Tensor& x, const Tensor& router_weight, const Tensor& weights,
                                              const Tensor& indices, const Tensor& probs, bool renormalized);
Tensor moe_lora_cpu(const Tensor& x, const Tensor& weights, const Tensor& indices, const Tensor& A, const Tensor& B,
                    double scaling);
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_lora_backward_cpu(const Tensor& grad_y, const Tensor& x,
                                                                 const Tensor& weights, const Tensor& indices,
                                                                 const Tensor& A, const Tensor& B, double scaling);
std::tuple<Tensor, Tensor> mixlora_ffn_cpu(const Tensor& x, const c10::optional<Tensor>& gate, const Tensor& up,
                                           const Tensor& weights, const Tensor& indices,
                                           const c10::optional<Tensor>& gate_A, const c10::optional<Tensor>& gate_B,
                                           const c10::optional<Tensor>& up_A, const c10::optional<Tensor>& up_B,
                                           const c10::optional<Tensor>& down_A,
                                           const c10::optional<Tensor>& down_B, int64_t num_experts, double scaling,
                                           std::string act_name, double dropout_p, int64_t seed);
std::vector<Tensor> mixlora_ffn_backward_cpu(const Tensor& grad_hbar, const c10::optional<Tensor>& grad_y_lora,
                                             const Tensor& x, const c10::optional<Tensor>& gate, const Tensor& up,
                                             const Tensor& weights, const Tensor& indices,
                                             const c10::optional<Tensor>& gate_A,
                                             const c10::optional<Tensor>& gate_B, const c10::optional<Tensor>& up_A,
                                             const c10::optional<Tensor>& up_B, const c10::optional<Tensor>& down_A,
                                             const c10::optional<Tensor>& down_B, int64_t num_experts,
                                             double scaling, std::string act_name, double dropout_p, int64_t seed);
Tensor dropout_mask_cpu(int64_t seed, int64_t stream, int64_t numel, double p);

}  // namespace moelora
