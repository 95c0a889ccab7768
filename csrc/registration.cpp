// The op schemas of the moelora library and their CPU implementations. The Triton backend registers CUDA
// implementations of the same names; moelora/cpu_backend.py wraps them in autograd Functions.
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
                                           std::string act_name);
std::vector<Tensor> mixlora_ffn_backward_cpu(const Tensor& grad_hbar, const c10::optional<Tensor>& grad_y_lora,
                                             const Tensor& x, const c10::optional<Tensor>& gate, const Tensor& up,
                                             const Tensor& weights, const Tensor& indices,
                                             const c10::optional<Tensor>& gate_A,
                                             const c10::optional<Tensor>& gate_B, const c10::optional<Tensor>& up_A,
                                             const c10::optional<Tensor>& up_B, const c10::optional<Tensor>& down_A,
                                             const c10::optional<Tensor>& down_B, int64_t num_experts,
                                             double scaling, std::string act_name);

}  // namespace moelora

TORCH_LIBRARY(moelora, m) {
  m.def("route(Tensor x, Tensor router_weight, int top_k, float top_p) -> (Tensor, Tensor, Tensor)");
  m.def(
      "route_backward(Tensor grad_weights, Tensor? grad_probs, Tensor x, Tensor router_weight, Tensor weights, "
      "Tensor indices, Tensor probs, bool renormalized) -> (Tensor, Tensor)");
  m.def("moe_lora(Tensor x, Tensor weights, Tensor indices, Tensor A, Tensor B, float scaling) -> Tensor");
  m.def(
      "moe_lora_backward(Tensor grad_y, Tensor x, Tensor weights, Tensor indices, Tensor A, Tensor B, "
      "float scaling) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "mixlora_ffn(Tensor x, Tensor? gate, Tensor up, Tensor weights, Tensor indices, Tensor? gate_A, "
      "Tensor? gate_B, Tensor? up_A, Tensor? up_B, Tensor? down_A, Tensor? down_B, int num_experts, "
      "float scaling, str act) -> (Tensor, Tensor)");
  m.def(
      "mixlora_ffn_backward(Tensor grad_hbar, Tensor? grad_y_lora, Tensor x, Tensor? gate, Tensor up, "
      "Tensor weights, Tensor indices, Tensor? gate_A, Tensor? gate_B, Tensor? up_A, Tensor? up_B, "
      "Tensor? down_A, Tensor? down_B, int num_experts, float scaling, str act) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(moelora, CPU, m) {
  m.impl("route", &moelora::route_cpu);
  m.impl("route_backward", &moelora::route_backward_cpu);
  m.impl("moe_lora", &moelora::moe_lora_cpu);
  m.impl("moe_lora_backward", &moelora::moe_lora_backward_cpu);
  m.impl("mixlora_ffn", &moelora::mixlora_ffn_cpu);
  m.impl("mixlora_ffn_backward", &moelora::mixlora_ffn_backward_cpu);
}
