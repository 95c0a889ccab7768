// The op schemas of the moelora library and their CPU implementations. The Triton backend registers CUDA
// implementations of the same names; moelora/cpu_backend.py wraps them in autograd Functions.
#include "ops.h"

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
      "float scaling, str act, float dropout_p=0., int seed=0) -> (Tensor, Tensor)");
  m.def(
      "mixlora_ffn_backward(Tensor grad_hbar, Tensor? grad_y_lora, Tensor x, Tensor? gate, Tensor up, "
      "Tensor weights, Tensor indices, Tensor? gate_A, Tensor? gate_B, Tensor? up_A, Tensor? up_B, "
      "Tensor? down_A, Tensor? down_B, int num_experts, float scaling, str act, float dropout_p=0., int seed=0) -> "
      "Tensor[]");
  // The LoRA dropout mask of (seed, stream, p) as bool [numel]: what mixlora_ffn's dropout_p, seed used.
  m.def("dropout_mask(int seed, int stream, int numel, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(moelora, CPU, m) {
  m.impl("route", &moelora::route_cpu);
  m.impl("route_backward", &moelora::route_backward_cpu);
  m.impl("moe_lora", &moelora::moe_lora_cpu);
  m.impl("moe_lora_backward", &moelora::moe_lora_backward_cpu);
  m.impl("mixlora_ffn", &moelora::mixlora_ffn_cpu);
  m.impl("mixlora_ffn_backward", &moelora::mixlora_ffn_backward_cpu);
}

// No tensor argument to dispatch on: the one kernel serves every dispatch key (it makes a CPU tensor).
TORCH_LIBRARY_IMPL(moelora, CompositeExplicitAutograd, m) { m.impl("dropout_mask", &moelora::dropout_mask_cpu); }
