// The bfloat16 parts of a float32 value (split_gemm.h): v = part_0 + part_1 + ... + part_{n-1}.
// Each part but the last is the head of what the earlier ones leave (its low 16 bits cleared: a
// value bf16 holds exactly), so each subtraction is exact in float32; the last part is rounded to
// nearest even. Shared by the CPU and CUDA kernels of miss::split_bf16, so both give the same bits
// (but for NaN payloads: c10::BFloat16 writes 0x7FC0 on the host, __float2bfloat16 0x7FFF).
//
// Non-finite values: an inf's head is inf and what it leaves inf - inf = NaN; and even with zero
// remainders, the GEMM would multiply the inf by the other operand's zero low parts (inf * 0). So a
// split product with an inf in it comes out NaN where the float32 GEMM gives inf. The set of
// non-finite outputs is the same (an inf or NaN term makes its whole output row or column
// non-finite either way; tests/test_impl_choice.py checks it), so training that diverged still sees
// non-finite values, only their kind differs. Keeping infs apart would take extra GEMMs or a host
// sync to find them; the split path exists to be fast for the finite values every step has. A
// NaN's head is a NaN or, when its payload lies in the low 16 bits only, an inf; the next part is
// then NaN either way.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace miss_ext {

constexpr int kMaxBf16Parts = 3;        // three parts hold all 24 significant bits of a float32
constexpr int kMaxBf16PartBlocks = 8;   // blocks one split_bf16 call may write (6 pairs of 3 parts)

// Which part each output block of split_bf16 holds: block b holds part[b] (< parts), b < count.
// Passed to a kernel by value.
struct Bf16PartOrder {
  int8_t part[kMaxBf16PartBlocks];
  int32_t count;
};

// v with the low 16 bits of its float32 representation cleared.
MISS_HD float bf16_head(float v) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(__float_as_uint(v) & 0xFFFF0000u);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits &= 0xFFFF0000u;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
#endif
}

// The PARTS parts of v (1 <= PARTS <= kMaxBf16Parts). A compile-time count keeps the parts in
// registers (a run-time index into a local array would put them in a GPU thread's local memory).
template <int PARTS>
struct Bf16Parts {
  static_assert(PARTS >= 1 && PARTS <= kMaxBf16Parts, "Bf16Parts: 1 to 3 parts");
  c10::BFloat16 p[PARTS];

  MISS_HD explicit Bf16Parts(float v) {
    float rest = v;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i + 1 < PARTS; ++i) {
      const float head = bf16_head(rest);
      p[i] = c10::BFloat16(head);  // exact
      rest -= head;                // exact
    }
    p[PARTS - 1] = c10::BFloat16(rest);  // rounded to nearest even
  }

  // Part i (< PARTS) by selects, not by indexing (see above).
  MISS_HD c10::BFloat16 operator[](int i) const {
    c10::BFloat16 out = p[0];
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int k = 1; k < PARTS; ++k) out = i == k ? p[k] : out;
    return out;
  }
};

// Where element (row, col) of block b goes in split_bf16's output, a contiguous
// (blocks * rows, cols) (dim 0) or (rows, blocks * cols) (dim 1) matrix.
struct Bf16PartLayout {
  int64_t row_stride;    // dim 0: cols; dim 1: blocks * cols
  int64_t block_stride;  // dim 0: rows * cols; dim 1: cols

  MISS_HD static Bf16PartLayout of(int64_t rows, int64_t cols, int64_t blocks, int64_t dim) {
    return dim == 0 ? Bf16PartLayout{cols, rows * cols} : Bf16PartLayout{blocks * cols, cols};
  }
  MISS_HD int64_t at(int64_t b, int64_t row, int64_t col) const { return b * block_stride + row * row_stride + col; }
};

}  // namespace miss_ext
