// dropout_mask: the keep mask that the fused FFN's LoRA dropout used for (seed, stream, p), so that a test or a
// user can rebuild it outside the kernel (moelora.dropout.dropout_mask is the same mask in PyTorch).
#include "ops.h"
#include "philox.h"

namespace moelora {

Tensor dropout_mask_cpu(int64_t seed, int64_t stream, int64_t numel, double p) {
  TORCH_CHECK(numel >= 0, "moelora cpu backend: dropout_mask numel must be >= 0, got ", numel);
  TORCH_CHECK(stream >= 0 && stream <= 0xFFFFFFFFll, "moelora cpu backend: dropout_mask stream must be in [0, 2^32), got ",
              stream);
  const DropSpec d(seed, p);
  auto keep = at::empty({numel}, at::TensorOptions().dtype(at::kBool));
  bool* kp = keep.data_ptr<bool>();
  const int64_t blocks = (numel + kDropBlock - 1) / kDropBlock;
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    alignas(64) uint16_t u[kDropBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kDropBlock, m = std::min(kDropBlock, numel - n0);
      philox_uniforms(d.seed, static_cast<uint32_t>(stream), static_cast<uint64_t>(n0 / kElementsPerCall),
                      (m + kElementsPerCall - 1) / kElementsPerCall, u);
      for (int64_t i = 0; i < m; ++i) kp[n0 + i] = u[i] >= d.threshold;
    }
  });
  return keep;
}

}  // namespace moelora
