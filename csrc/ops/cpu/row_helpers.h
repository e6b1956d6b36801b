// Row helpers shared by the CPU kernels (fold and tile_add in shard_kernels.cpp, bank_fold in
// bank_fold_kernel.cpp): the parallel grain, a row's dropout factors and a row's fold.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/dropout_mask.h"
#include "../common/shard_index.h"

namespace miss_ext {

// Rows per parallel task: about 64 K elements of work each.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(cols, 1)); }

// keep[c] = 1 if column c of `row` is kept, else 0, for c < kDropoutGroup * groups. Multi-versioned
// (cpu_clones.h) in shard_kernels.cpp: the Philox rounds vectorise across column groups, which
// is most of the cost of dropout on the CPU.
void dropout_keep_groups(const DropoutKey key, int64_t row, int64_t groups, uint8_t* __restrict keep);

// factors[c] = scale if column c of `row` is kept, else 0. `keep` is scratch of >= cols + kDropoutGroup - 1 bytes.
template <typename acc>
void dropout_factors(const DropoutKey& key, int64_t row, int64_t cols, uint8_t* keep, acc* factors) {
  dropout_keep_groups(key, row, (cols + kDropoutGroup - 1) / kDropoutGroup, keep);
  const acc scale = static_cast<acc>(key.scale);
  for (int64_t c = 0; c < cols; ++c) factors[c] = keep[c] ? scale : acc(0);
}

// Cascade summation (torch's CPU sum does the same): terms are added into level 0; every
// kCascade terms a level is added into the next one up and cleared. The rounding error then grows
// with about kCascade per level instead of with the number of terms: a running float32 sum of
// 65536 terms was 3.9e-4 off (relative) where PEFT's torch.sum was 1.3e-7. Only sums of up to
// kCascade terms are plain running sums. Until 2026-12-02 every sum of up to 256 terms was (the
// carries cost 10-25% of a short fold: bf16, 4096 columns at r = 16 and 64), but in float32 that
// made the fold 2.3x torch.sum's error at in = 4096, r = 64 (64 terms) and 4.8x at r = 16 (256
// terms), and a float32 MissLinear's output 1.2x (r = 64) to 2.5x (r = 16) PEFT's error: PEFT's
// precision is the promise, and the fold is a few percent of a layer.
constexpr int64_t kCascade = kFoldCascade;  // common/shard_index.h

// Levels above the first that a sum of `terms` terms takes (0 up to kCascade terms).
inline int64_t cascade_levels(int64_t terms) {
  if (terms <= kCascade) return 0;
  int64_t levels = 0;
  for (int64_t cap = kCascade; cap < terms; cap *= kCascade) ++levels;
  return levels;
}

// After term number `count` (1-based) was added into level 0 (`first`): carries every full block
// of kCascade up. `upper` holds `levels` further levels of `width` each.
template <typename acc>
inline void cascade_carry(acc* first, acc* upper, int64_t levels, int64_t width, int64_t count) {
  for (int64_t l = 0; l < levels && count % kCascade == 0; ++l, count /= kCascade) {
    acc* from = l == 0 ? first : upper + (l - 1) * width;
    acc* to = upper + l * width;
    for (int64_t j = 0; j < width; ++j) {
      to[j] += from[j];
      from[j] = acc(0);
    }
  }
}

// first[j] += every upper level's [j], lowest first: the cascade's total into level 0.
template <typename acc>
inline void cascade_finish(acc* first, const acc* upper, int64_t levels, int64_t width) {
  for (int64_t l = 0; l < levels; ++l)
    for (int64_t j = 0; j < width; ++j) first[j] += upper[l * width + j];
}

// Scratch (elements) fold_row needs beside `sum` for a row of `in` columns folded at rank r.
inline int64_t fold_row_scratch(int64_t in, int64_t r) { return r * cascade_levels((in + r - 1) / r); }

// sum[j] += the row's columns c = j, j + r, ... < in, times factors[c] when factors is not null,
// for j < r. Shard by shard: the inner loop walks r contiguous elements with a fixed accumulator
// offset, which the compiler vectorises.
template <typename acc, typename in_t>
inline void fold_shards(const in_t* x, int64_t in, int64_t r, const acc* factors, acc* sum) {
  if (factors != nullptr) {
    for (int64_t c0 = 0; c0 < in; c0 += r) {
      const int64_t len = std::min(r, in - c0);
      for (int64_t j = 0; j < len; ++j) sum[j] += static_cast<acc>(x[c0 + j]) * factors[c0 + j];
    }
  } else {
    for (int64_t c0 = 0; c0 < in; c0 += r) {
      const int64_t len = std::min(r, in - c0);
      for (int64_t j = 0; j < len; ++j) sum[j] += static_cast<acc>(x[c0 + j]);
    }
  }
}

// fold_shards over the whole row, its shards summed in a cascade (above): groups of kCascade
// shards each, with `upper` (fold_row_scratch(in, r) elements) as the higher levels. sum must
// hold zeros on entry.
template <typename acc, typename in_t>
inline void fold_row(const in_t* x, int64_t in, int64_t r, const acc* factors, acc* sum, acc* upper) {
  const int64_t levels = cascade_levels((in + r - 1) / r);
  if (levels == 0) return fold_shards(x, in, r, factors, sum);
  std::fill(upper, upper + levels * r, acc(0));
  const int64_t group = r * kCascade;
  for (int64_t g0 = 0, shards = 0; g0 < in; g0 += group) {
    const int64_t width = std::min(group, in - g0);
    fold_shards(x + g0, width, r, factors == nullptr ? nullptr : factors + g0, sum);
    shards += (width + r - 1) / r;
    cascade_carry(sum, upper, levels, r, shards);  // a partial last group carries nothing
  }
  cascade_finish(sum, upper, levels, r);
}

}  // namespace miss_ext
