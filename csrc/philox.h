// The seeded LoRA dropout mask of moelora/dropout.py in C++, bitwise the same: Philox4x32-10 with key = the
// 64-bit seed's halves and counter (group lo32, group hi32, stream, 0), group = element // 8; its four words
// hold the eight 16-bit uniforms of the group's elements (element 8g + 2w + h: bits 16h.. of word w), and
// element n is kept iff u(n) >= round(p * 65536).
//
// The mask is made a block at a time into a stack buffer and never stored: the FFN forward drops x and h_j
// with it and the backward makes it again. The group loop is written for the vectoriser (one Philox call per
// 8 elements, a fixed 10-round body, 8 calls per AVX2 vector). Cost, measured once on one thread (AMD EPYC
// 2-core VM, AVX2 clone, moelora::dropout_mask over 2^24 elements): 0.76 ns per element, of which Philox
// is ~0.6; in the fused FFN p > 0 then adds ~23% to the forward and ~16% to the backward (T=512, H=1024,
// I=2816, E=8, k=2, r=16, fp32), the masks' Philox work being most of that.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace moelora {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kElementsPerCall = 8;
constexpr uint32_t kXStream = 0;  // the LoRA input x [T, H]: n = t * H + c
constexpr uint32_t kHStream = 1;  // each h_j [T, k, I] before the down shrink: n = (t * k + j) * I + i

// Elements per block of mask made at once (64 Philox calls): the buffers below stay on the stack (~4 KB).
constexpr int64_t kDropBlock = 512;

// One call's dropout: seed, keep threshold round(p * 2^16) (65536 drops all) and the kept elements' scale.
struct DropSpec {
  uint64_t seed = 0;
  uint32_t threshold = 0;
  double scale = 1.0;

  DropSpec() = default;
  DropSpec(int64_t seed_, double p) : seed(static_cast<uint64_t>(seed_)) {
    TORCH_CHECK(p >= 0.0 && p < 1.0, "moelora cpu backend: dropout p must be in [0, 1), got ", p);
    threshold = static_cast<uint32_t>(std::nearbyint(p * 65536.0));  // round half to even, as Python's round
    scale = 1.0 / (1.0 - p);
  }
  // p > 0, even when p < 2^-17 rounds the threshold to "keep everything": the kept values are still scaled.
  bool on() const { return scale != 1.0; }
};

inline uint32_t mul_hi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32); }

// The uniforms of Philox groups g0 .. g0 + n - 1 of (seed, stream): u[8 i + e] for element e of group g0 + i.
// The high and low halves of each product are written apart (mul_hi, and a wrapping 32-bit multiply) so that
// gcc finds its vector "high-part multiply" pattern: one 64-bit product used for both halves vectorised with
// twice the shuffles (1.2 vs 0.6 ns per element), and copying the four words into u with memcpy not at all.
MOELORA_VECTOR_CLONES inline void philox_uniforms(uint64_t seed, uint32_t stream, uint64_t g0, int64_t n,
                                                  uint16_t* __restrict u) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t g = g0 + static_cast<uint64_t>(i);
    uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = stream, c3 = 0;
    uint32_t k0 = key0, k1 = key1;
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
      const uint32_t n0 = mul_hi(kPhiloxM1, c2) ^ c1 ^ k0;
      const uint32_t n2 = mul_hi(kPhiloxM0, c0) ^ c3 ^ k1;
      c1 = kPhiloxM1 * c2;
      c3 = kPhiloxM0 * c0;
      c0 = n0;
      c2 = n2;
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint16_t* o = u + kElementsPerCall * i;  // element 8g + 2w + h: bits 16h.. of word w
    o[0] = static_cast<uint16_t>(c0);
    o[1] = static_cast<uint16_t>(c0 >> 16);
    o[2] = static_cast<uint16_t>(c1);
    o[3] = static_cast<uint16_t>(c1 >> 16);
    o[4] = static_cast<uint16_t>(c2);
    o[5] = static_cast<uint16_t>(c2 >> 16);
    o[6] = static_cast<uint16_t>(c3);
    o[7] = static_cast<uint16_t>(c3 >> 16);
  }
}

// f[i] = scale where element n0 + i of (seed, stream) is kept, else 0, for i < len <= kDropBlock: value * f[i]
// is bitwise moelora.dropout.apply's value * keep * scale (scale rounded to T first, as PyTorch does).
template <typename T>
inline void drop_factors(const DropSpec& d, uint32_t stream, int64_t n0, int64_t len, T* f) {
  alignas(64) uint16_t u[kDropBlock + kElementsPerCall];
  const int64_t g0 = n0 / kElementsPerCall, skip = n0 - g0 * kElementsPerCall;
  philox_uniforms(d.seed, stream, static_cast<uint64_t>(g0), (skip + len + kElementsPerCall - 1) / kElementsPerCall,
                  u);
  const T scale = static_cast<T>(d.scale);
  const uint32_t threshold = d.threshold;
  for (int64_t i = 0; i < len; ++i) f[i] = u[skip + i] >= threshold ? scale : T(0);
}

// row[i] *= f(n0 + i) for i < len: the dropped copy of one row, made in place, block by block.
template <typename T>
inline void drop_row(const DropSpec& d, uint32_t stream, int64_t n0, int64_t len, T* row) {
  alignas(64) T f[kDropBlock];
  for (int64_t lo = 0; lo < len; lo += kDropBlock) {
    const int64_t m = std::min(kDropBlock, len - lo);
    drop_factors(d, stream, n0 + lo, m, f);
    for (int64_t i = 0; i < m; ++i) row[lo + i] *= f[i];
  }
}

}  // namespace moelora
