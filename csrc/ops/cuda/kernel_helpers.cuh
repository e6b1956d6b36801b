// What the CUDA kernel files of fold, tile_add, the bank and split_bf16 share (shard_kernels.cu,
// bank_kernel.cu, bank_fold_kernel.cu, split_bf16_kernel.cu): the block size, the grid cap and
// size of their grid-stride loops, 16-byte vector access and the dropout factors of a vector.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/dropout_mask.h"

namespace miss_ext {

constexpr int kThreads = 256;  // threads per block

// Grid cap of the grid-stride loops: very large tensors reuse threads (and a block serves several
// rows) instead of launching millions of blocks. The CUDA emulation of the tests
// (tests/cuda_emu/build.py) builds with a small cap, so that its small inputs run the wrap too.
#ifndef MISS_EXT_CUDA_MAX_BLOCKS
#define MISS_EXT_CUDA_MAX_BLOCKS 65536
#endif
constexpr int64_t kMaxBlocks = MISS_EXT_CUDA_MAX_BLOCKS;

// Blocks of kThreads for a grid-stride loop over `total` items: enough to fill the device, capped so
// very large tensors reuse threads instead of launching millions of blocks.
inline unsigned int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), kMaxBlocks));
}

// A grid-stride loop's first item for this thread, and its stride (int64: no overflow past 2^31).
__device__ __forceinline__ int64_t grid_first() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ int64_t grid_stride() { return int64_t(gridDim.x) * blockDim.x; }

// VEC elements loaded or stored as one access (16 bytes for VEC = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every row of a contiguous (rows, cols) tensor of T at p can be read or written in
// 16-byte vectors: each row then starts on a 16-byte boundary and holds whole vectors.
template <typename T>
inline bool rows_vectorizable(const T* p, int64_t cols) {
  return cols % static_cast<int64_t>(16 / sizeof(T)) == 0 && aligned16(p);
}

// Bit k of kept / ties: the element of half k of `words` (k < VEC) is kept / ties the threshold's
// high half.
template <int VEC>
__device__ __forceinline__ void keep_bits(const DropoutKey& key, const Words4& words, uint32_t& kept,
                                         uint32_t& ties) {
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    const uint8_t d = dropout_keep_or_tie(key, dropout_half(words, k));
    kept |= static_cast<uint32_t>(d == 1) << k;
    ties |= static_cast<uint32_t>(d == 2) << k;
  }
}

// Settles the ties of VEC elements at columns col .. col + VEC - 1 into kept. Rare (2^-16 of the
// elements), so one loop that is not unrolled: the second Philox call is compiled once, not once
// per element. In a warp-fold-like test kernel (8-wide vectors, nvcc 13.0, sm_90, ptxas -v,
// 2026-12-04): 40 registers with the old one-word-per-element mask, 128 with the tie's Philox
// inlined per element, 45 in this form.
__device__ __forceinline__ void settle_ties(const DropoutKey& key, int64_t row, int64_t col, uint32_t ties,
                                           uint32_t& kept) {
#pragma unroll 1
  while (ties != 0) {
    const int k = __ffs(static_cast<int>(ties)) - 1;
    ties &= ties - 1;
    if (dropout_keep_tie(key, row, col + k)) kept |= 1u << k;
  }
}

// Per-element keep factors (scale if kept, else 0) for VEC consecutive columns starting at col
// (col % VEC == 0). One Philox call per group of eight columns (common/dropout_mask.h): a whole
// group for VEC a multiple of 8 (a bf16 or fp16 vector), half of one for VEC 4 (fp32), a quarter
// for VEC 2 (fp64). Word indices are compile-time constants or selects, never a run-time array
// index (which would use local memory). The same decisions as dropout_keep_at's, so every kernel
// draws the same mask.
template <typename acc, int VEC>
__device__ __forceinline__ void keep_factors(const DropoutKey& key, acc scale, int64_t row, int64_t col,
                                             acc (&f)[VEC]) {
  static_assert(VEC == 1 || VEC == 2 || VEC == 4 || VEC % kDropoutGroup == 0,
                "keep_factors: VEC must be 1, 2, 4 or a multiple of 8");
  if constexpr (VEC % kDropoutGroup == 0) {
#pragma unroll
    for (int q = 0; q < VEC; q += kDropoutGroup) {
      const Words4 words = dropout_words(key, row, (col + q) >> 3);
      uint32_t kept = 0, ties = 0;
      keep_bits<kDropoutGroup>(key, words, kept, ties);
      if (__builtin_expect(ties != 0, 0)) settle_ties(key, row, col + q, ties, kept);
#pragma unroll
      for (int k = 0; k < kDropoutGroup; ++k) f[q + k] = (kept >> k) & 1u ? scale : acc(0);
    }
  } else if constexpr (VEC == 4 || VEC == 2) {
    // col % VEC == 0: the words of one group from word (col % 8) / 2 on, both halves of each;
    // selected into a constant-index group first, so the halves' indices are constants.
    const Words4 all = dropout_words(key, row, col >> 3);
    const int64_t lane = (col & 7) >> 1;
    Words4 words{};
#pragma unroll
    for (int w = 0; w < VEC / 2; ++w) words.w[w] = dropout_word(all, lane + w);
    uint32_t kept = 0, ties = 0;
    keep_bits<VEC>(key, words, kept, ties);
    if (__builtin_expect(ties != 0, 0)) settle_ties(key, row, col, ties, kept);
#pragma unroll
    for (int k = 0; k < VEC; ++k) f[k] = (kept >> k) & 1u ? scale : acc(0);
  } else {
    f[0] = dropout_keep_at(key, row, col) ? scale : acc(0);
  }
}

}  // namespace miss_ext
