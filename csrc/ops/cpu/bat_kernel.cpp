// CPU kernel of the bat transform (common/bat_index.h):
//   out[o, s*r + b] = sum_k w[o, s*r + k] * m[o/r][k][b] + p[o/r][o%r][b]   (+ w[o, s*r + b]: residual)
//
// Parallel over rows. Each row's segments are copied to a small buffer first, so `out` may be `w`
// (in-place merge and unmerge touch the weight once). For float32 with r a multiple of 16, eight
// (then four) segments are transformed together in tiles whose accumulators stay in registers:
// one load of a row of m feeds eight multiply-adds, so the loop runs near the FMA rate (faster
// than MKL's bmm for this shape, without its extra pass). The tile code has one version per ISA
// (cpu_clones.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/bat_index.h"
#include "../kernels.h"
#include "cpu_clones.h"

namespace miss_ext {
namespace {

constexpr int kTile = 16;     // columns per register tile: a multiple of every vector width below
constexpr int kMaxSegs = 8;   // segments sharing each load of m (and staged per step of a row)

// dst[q*r + b] = sum_k seg[q*r + k] * m[k*r + b] + prow[b] (+ seg[q*r + b] when residual) for
// q < segs, r % kTile == 0, with the segs accumulators of kLanes<vec> columns in registers,
// summed in common/bat_index.h's order. (Plain loops here were vectorised along the wrong axis,
// 13x slower: measured.) Eight segments per load of m rather than four: with the products summed
// before P is added (the order PEFT's precision needs), four took 12-18% longer than the old
// P-first loop on an AVX-512 EPYC; eight took 20% less than it (AVX2 27%, SSE 16%; 2048 x 2048,
// r = 64, one thread, 2026-12-02), and fit the registers of every version (no spills).
template <typename vec, int segs>
MISS_CPU_INLINE void bat_tiles(const float* __restrict seg, float* __restrict dst, const float* __restrict m,
                               const float* __restrict prow, int64_t r, bool residual) {
  for (int64_t b0 = 0; b0 < r; b0 += kLanes<vec>) {
    vec acc[segs];
#pragma GCC unroll 8
    for (int q = 0; q < segs; ++q) acc[q] = vec{};
    for (int64_t k = 0; k < r; ++k) {
      vec mk;
      std::memcpy(&mk, m + k * r + b0, sizeof mk);  // unaligned vector load
#pragma GCC unroll 8
      for (int q = 0; q < segs; ++q) acc[q] += seg[q * r + k] * mk;
    }
    vec p;
    std::memcpy(&p, prow + b0, sizeof p);
#pragma GCC unroll 8
    for (int q = 0; q < segs; ++q) {
      acc[q] += p;
      if (residual) {  // w last (common/bat_index.h)
        vec w;
        std::memcpy(&w, seg + q * r + b0, sizeof w);
        acc[q] += w;
      }
      std::memcpy(dst + q * r + b0, &acc[q], sizeof acc[q]);
    }
  }
}

// The first segments of `count` in groups of eight, then of four, for r % kTile == 0; returns how
// many it did (the caller does the rest, fewer than four).
template <typename vec>
MISS_CPU_INLINE int64_t bat_tile_groups(const float* seg, float* dst, const float* m, const float* prow, int64_t r,
                                        bool residual, int64_t count) {
  int64_t q = 0;
  for (; q + 8 <= count; q += 8) bat_tiles<vec, 8>(seg + q * r, dst + q * r, m, prow, r, residual);
  for (; q + 4 <= count; q += 4) bat_tiles<vec, 4>(seg + q * r, dst + q * r, m, prow, r, residual);
  return q;
}

// One version per ISA with its register width (cpu_clones.h says why not target_clones).
using BatTilesFn = int64_t (*)(const float*, float*, const float*, const float*, int64_t, bool, int64_t);
MISS_CPU_TARGET("arch=x86-64-v4")
int64_t bat_tiles_avx512(const float* seg, float* dst, const float* m, const float* prow, int64_t r, bool residual,
                         int64_t count) {
  return bat_tile_groups<f32x16>(seg, dst, m, prow, r, residual, count);
}
MISS_CPU_TARGET("arch=x86-64-v3")
int64_t bat_tiles_avx2(const float* seg, float* dst, const float* m, const float* prow, int64_t r, bool residual,
                       int64_t count) {
  return bat_tile_groups<f32x8>(seg, dst, m, prow, r, residual, count);
}
int64_t bat_tiles_baseline(const float* seg, float* dst, const float* m, const float* prow, int64_t r, bool residual,
                           int64_t count) {
  return bat_tile_groups<f32x4>(seg, dst, m, prow, r, residual, count);
}

// This CPU's version, picked at the first use (once per process, for every instance of bat_rows).
BatTilesFn bat_tiles_for_cpu() {
  static const BatTilesFn picked = pick_for_cpu(&bat_tiles_avx512, &bat_tiles_avx2, &bat_tiles_baseline);
  return picked;
}

// The same for any r and type, `count` segments.
template <typename acc>
void bat_segments_generic(const acc* seg, acc* dst, const acc* m, const acc* prow, int64_t r, int64_t count,
                          bool residual) {
  for (int64_t q = 0; q < count; ++q) {
    acc* d = dst + q * r;
    for (int64_t b = 0; b < r; ++b) d[b] = acc(0);
    for (int64_t k = 0; k < r; ++k) {
      const acc wk = seg[q * r + k];
      const acc* mk = m + k * r;
      for (int64_t b = 0; b < r; ++b) d[b] += wk * mk[b];
    }
    for (int64_t b = 0; b < r; ++b) d[b] += prow[b];  // then P, then w (common/bat_index.h)
    if (residual) {
      for (int64_t b = 0; b < r; ++b) d[b] += seg[q * r + b];
    }
  }
}

template <typename w_t, typename out_t, typename acc>
void bat_rows(const w_t* w, out_t* out, const acc* m, const acc* p, int64_t rows, int64_t cols, int64_t r,
              bool residual) {
  const int64_t segments = cols / r;
  const bool tiled = std::is_same_v<acc, float> && r % kTile == 0;
  const BatTilesFn tiles_f32 = tiled ? bat_tiles_for_cpu() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<acc> seg(kMaxSegs * r), dst(kMaxSegs * r);
    for (int64_t o = begin; o < end; ++o) {
      const acc* mi = m + bat_block_offset(o, r);
      const acc* prow = p + bat_block_offset(o, r) + bat_row_offset(o, r);
      const w_t* wr = w + o * cols;
      out_t* orow = out + o * cols;
      for (int64_t s0 = 0; s0 < segments; s0 += kMaxSegs) {
        const int64_t count = std::min<int64_t>(kMaxSegs, segments - s0);
        for (int64_t e = 0; e < count * r; ++e) seg[e] = static_cast<acc>(wr[s0 * r + e]);
        int64_t done = 0;
        if constexpr (std::is_same_v<acc, float>) {
          if (tiled) done = tiles_f32(seg.data(), dst.data(), mi, prow, r, residual, count);
        }
        bat_segments_generic(seg.data() + done * r, dst.data() + done * r, mi, prow, r, count - done, residual);
        for (int64_t e = 0; e < count * r; ++e) orow[s0 * r + e] = static_cast<out_t>(dst[e]);
      }
    }
  });
}

}  // namespace

void bat_kernel_cpu(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p, bool residual) {
  const int64_t r = m.size(-1);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "miss_bat_cpu", [&] {
    using acc = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "miss_bat_cpu_w", [&] {
      if (out.scalar_type() == w.scalar_type()) {
        bat_rows<scalar_t, scalar_t, acc>(w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                          m.const_data_ptr<acc>(), p.const_data_ptr<acc>(), w.size(0), w.size(1), r,
                                          residual);
      } else {
        bat_rows<scalar_t, acc, acc>(w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc>(), m.const_data_ptr<acc>(),
                                     p.const_data_ptr<acc>(), w.size(0), w.size(1), r, residual);
      }
    });
  });
}

}  // namespace miss_ext
