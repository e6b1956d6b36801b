// Index arithmetic of bat (block-affine) MiSS, shared by the CPU and CUDA kernels.
//
// W (out, in) is cut into r x r tiles W_ij; row o = i*r + a lies in row block i. A "segment" is the
// r consecutive elements W[o, s*r .. s*r + r) of one row within one column block s. The bat
// transform maps every segment independently:
//   out[o, s*r + b] = sum_k w[o, s*r + k] * M[i][k][b] + P[i][a][b]   (+ w[o, s*r + b]: residual)
// in that order: the r products summed first, then P added, then (residual form) w, as PEFT
// computes W + (W_ij B_i + B_i), and one rounding to out's dtype. With M = P = B, residual, this
// is W' (forward and merge): each partial sum has the magnitude of W_ij B_i, so its rounding
// error scales with the update and not with B or W. (Starting the sum at P = B, with M = I + B,
// gave float32 merges 3.7-7x PEFT's error: every product was added at B's and W's magnitude.)
// With M = (I+B)^-1, P = -B (I+B)^-1 it is unmerge; with M = B^T, P = 0, residual, it maps dL/dW'
// to dL/dW = G' + G' B^T.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace miss_ext {

// Shared memory the CUDA bat kernel stages M in, per block (cuda/bat_kernel.cu): at least one
// r-value row of M in the accumulation type, so r * sizeof(acc) must fit (float32 r <= 12288,
// float64 r <= 6144). bat.cpp picks the unmerge's float64 M only where it fits.
constexpr int64_t kBatSharedMemoryBytes = 48 * 1024;

struct BatSegment {
  int64_t row;      // o
  int64_t segment;  // s, the column block
};

MISS_HD BatSegment split_segment(int64_t flat, int64_t segments_per_row) {
  return BatSegment{flat / segments_per_row, flat % segments_per_row};
}

// Offset of the r x r matrix of row block i (for M and P, stored (out/r, r, r)).
MISS_HD int64_t bat_block_offset(int64_t row, int64_t r) { return (row / r) * r * r; }

// Offset of row a = row mod r inside P's matrix of that block.
MISS_HD int64_t bat_row_offset(int64_t row, int64_t r) { return (row % r) * r; }

}  // namespace miss_ext
