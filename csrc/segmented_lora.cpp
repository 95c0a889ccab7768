// segmented_lora at decoding sizes: y[t] = seq_gate[s] * scaling[a] * B[a] A[a] x[t], s = token_seq[t],
// a = seq_lora[s] (0 when a = -1 or the gate is 0), token by token in one call.
//
// A decoding step of a batch of tenants has a few tokens per adapter: grouped ATen GEMMs (moelora/segmented.py)
// cost ~8 ops per adapter present per projection, and gathering each token's A and B for a batched GEMM
// copies T * r * (in + out) weights per call. Here each token reads its adapter's A and B in place: r dot
// products over `in`, then `out` dot products over r, with rows whose scale is 0 skipped. Inference only
// (no autograd); moelora/cpu_backend.py calls it for up to SEGMENTED_DECODE_TOKENS tokens without a gradient.
//
// Its schema and CPU kernel are registered here, as a fragment of the moelora library (registration.cpp holds
// the others).
#include "common.h"

namespace moelora {

namespace {

// Eight partial sums, so that the compiler vectorises the reduction without -ffast-math.
template <typename T>
MOELORA_VECTOR_CLONES T dot(const T* a, const T* b, int64_t n) {
  T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  T s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void check_segmented(const Tensor& x, const Tensor& token_seq, const Tensor& seq_lora, const Tensor& seq_gate,
                     const Tensor& A, const Tensor& B, const Tensor& scaling) {
  check_cpu_float(x, "x");
  check_cpu_float(seq_gate, "seq_gate");
  check_cpu_float(A, "A");
  check_cpu_float(B, "B");
  check_cpu_float(scaling, "scaling");
  check_dim(x, 2, "x");
  check_dim(A, 3, "A");
  check_dim(B, 3, "B");
  TORCH_CHECK(token_seq.dim() == 1 && token_seq.size(0) == x.size(0) && token_seq.scalar_type() == at::kLong,
              "moelora cpu backend: token_seq must be int64 [T] with T = ", x.size(0), ", got ",
              token_seq.scalar_type(), " ", token_seq.sizes());
  TORCH_CHECK(seq_lora.dim() == 1 && seq_lora.scalar_type() == at::kLong,
              "moelora cpu backend: seq_lora must be int64 [n_seq], got ", seq_lora.scalar_type(), " ",
              seq_lora.sizes());
  TORCH_CHECK(seq_gate.sizes() == seq_lora.sizes(), "moelora cpu backend: seq_gate must be [n_seq] = ",
              seq_lora.sizes(), ", got ", seq_gate.sizes());
  TORCH_CHECK(A.size(0) == B.size(0) && A.size(1) == B.size(2) && A.size(2) == x.size(1),
              "moelora cpu backend: A must be [n_lora, r, in=", x.size(1), "] and B [n_lora, out, r], got ",
              A.sizes(), " and ", B.sizes());
  TORCH_CHECK(scaling.dim() == 1 && scaling.size(0) == A.size(0), "moelora cpu backend: scaling must be [n_lora=",
              A.size(0), "], got ", scaling.sizes());
}

}  // namespace

Tensor segmented_lora_decode_cpu(const Tensor& x, const Tensor& token_seq, const Tensor& seq_lora,
                                 const Tensor& seq_gate, const Tensor& A, const Tensor& B, const Tensor& scaling) {
  check_segmented(x, token_seq, seq_lora, seq_gate, A, B, scaling);
  const auto dt = compute_type(x);
  const int64_t T = x.size(0), in = x.size(1), n_seq = seq_lora.size(0), n_lora = A.size(0), r = A.size(1),
                out = B.size(1);
  auto xc = x.to(dt).contiguous();
  auto Ac = A.to(dt).contiguous();
  auto Bc = B.to(dt).contiguous();
  auto ts = token_seq.contiguous();
  auto sl = seq_lora.contiguous();
  const int64_t* tsp = ts.data_ptr<int64_t>();
  const int64_t* slp = sl.data_ptr<int64_t>();
  // Every index is checked before any work: a bad one is an error, not a read outside a tensor.
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(tsp[t] >= 0 && tsp[t] < n_seq, "moelora cpu backend: token_seq[", t, "] = ", tsp[t],
                " outside [0, ", n_seq, ")");
  }
  for (int64_t s = 0; s < n_seq; ++s) {
    TORCH_CHECK(slp[s] >= -1 && slp[s] < n_lora, "moelora cpu backend: seq_lora[", s, "] = ", slp[s],
                " outside [-1, ", n_lora, ")");
  }
  auto y = at::zeros({T, out}, xc.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "segmented_lora_decode", [&] {
    auto gate = seq_gate.to(dt).contiguous();
    auto scale = scaling.to(dt).contiguous();
    const scalar_t* gp = gate.data_ptr<scalar_t>();
    const scalar_t* sp = scale.data_ptr<scalar_t>();
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* ap = Ac.data_ptr<scalar_t>();
    const scalar_t* bp = Bc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // One token per task: at decode sizes (T <= 64) a token is 10-100 us of work, enough to share.
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> u(r);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = tsp[t], a = slp[s];
        if (a < 0) continue;
        const scalar_t c = gp[s] * sp[a];
        if (c == scalar_t(0)) continue;
        const scalar_t* At = ap + a * r * in;
        const scalar_t* Bt = bp + a * out * r;
        for (int64_t j = 0; j < r; ++j) u[j] = c * dot(At + j * in, xp + t * in, in);
        scalar_t* yt = yp + t * out;
        for (int64_t o = 0; o < out; ++o) yt[o] = dot(Bt + o * r, u.data(), r);
      }
    });
  });
  return y.to(x.scalar_type());
}

}  // namespace moelora

TORCH_LIBRARY_FRAGMENT(moelora, m) {
  m.def(
      "segmented_lora_decode(Tensor x, Tensor token_seq, Tensor seq_lora, Tensor seq_gate, Tensor A, Tensor B, "
      "Tensor scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(moelora, CPU, m) { m.impl("segmented_lora_decode", &moelora::segmented_lora_decode_cpu); }
