// CUDA kernels for fold and tile_add (see kernels.h for the contract).
//
// fold:     three kernels (launch_fold picks one):
//           - fold_kernel: one thread per (row, VEC consecutive shard columns). It walks the row
//             with stride r, loading VEC elements (16 bytes) at a time. Neighbouring threads load
//             neighbouring 16-byte chunks, so the loads coalesce (when r / VEC >= 32).
//           - fold_rows_kernel: one block per row, for small power-of-two r or few rows. The block
//             streams the row with coalesced loads and reduces 256 * VEC partial sums to the r
//             shard columns with a fixed tree in shared memory (deterministic, but summed in a
//             different order than the CPU kernel).
//           - fold_warp_kernel: one warp per row for r up to 32 * VEC, reduced by warp shuffles
//             (taken only when asked for, until a GPU has timed it).
// tile_add: one thread per 16 bytes of out (read, add, write back). The src rows are small and
//           stay in cache. tile_add_2d_kernel: threads own column vectors and walk rows, with no
//           division per element (taken only when asked for, until a GPU has timed it).
// Both fall back to a scalar variant (VEC = 1) when sizes or alignment forbid vectors. Indexing is
// int64, accumulation is float32 (float64 for float64 data), and kernels launch on the current
// stream under a device guard. Nothing here synchronises with the host.
//
// Only these headers: this file takes minutes to compile when it includes torch/extension.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <type_traits>

#include "../common/shard_index.h"
#include "../impl_choice.h"
#include "../kernels.h"
#include "kernel_helpers.cuh"

namespace miss_ext {
namespace {

template <typename in_t, typename out_t, int VEC, bool DROPOUT>
__global__ void fold_kernel(const in_t* __restrict__ x, out_t* __restrict__ s, int64_t rows, int64_t in,
                            int64_t r, DropoutParams dropout) {
  using acc = acc_t<in_t, out_t>;
  const DropoutKey key = load_dropout_key(dropout);  // two words from device memory
  const acc scale = static_cast<acc>(key.scale);
  const int64_t groups = vec_groups(r, VEC);
  const int64_t total = rows * groups;
  for (int64_t flat = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; flat < total;
       flat += int64_t(gridDim.x) * blockDim.x) {
    const RowGroup rg = split_row_group(flat, groups);
    const int64_t j0 = rg.group * VEC;
    const in_t* xr = x + rg.row * in;
    // Two levels: each group of kFoldCascade shards is summed into part, and the parts into sum,
    // so the rounding error grows with about kFoldCascade + in / r / kFoldCascade terms instead of
    // in / r (the CPU's cascade, row_helpers.h, for the same reason: a float32 fold of 64-256
    // shards in one running sum was 2.3-4.8x torch.sum's error).
    acc sum[VEC], part[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[k] = part[k] = acc(0);
    int in_part = 0;
    // With VEC > 1, r and in are multiples of VEC, so a vector is either wholly inside the row
    // or wholly past its end.
#pragma unroll 4
    for (int64_t i0 = j0; i0 < in; i0 += r) {
      const Vec<in_t, VEC> v = *reinterpret_cast<const Vec<in_t, VEC>*>(xr + i0);
      if constexpr (DROPOUT) {
        acc f[VEC];
        keep_factors<acc, VEC>(key, scale, rg.row, i0, f);
#pragma unroll
        for (int k = 0; k < VEC; ++k) part[k] += static_cast<acc>(v.v[k]) * f[k];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) part[k] += static_cast<acc>(v.v[k]);
      }
      if (++in_part == kFoldCascade) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          sum[k] += part[k];
          part[k] = acc(0);
        }
        in_part = 0;
      }
    }
    out_t* sr = s + rg.row * r + j0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) sr[k] = static_cast<out_t>(sum[k] + part[k]);
  }
}

// sum[k] += dropout(x)[row, c*VEC + k] over the vectors c = first, first + step, ... below chunks
// of the row starting at xr (16-byte loads). The loop of fold_rows_kernel and fold_warp_kernel.
template <typename in_t, typename acc, int VEC, bool DROPOUT>
__device__ __forceinline__ void accumulate_vectors(const in_t* __restrict__ xr, int64_t row, int64_t first,
                                                   int64_t step, int64_t chunks, const DropoutKey& key, acc scale,
                                                   acc (&sum)[VEC]) {
#pragma unroll 4
  for (int64_t c = first; c < chunks; c += step) {
    const Vec<in_t, VEC> v = *reinterpret_cast<const Vec<in_t, VEC>*>(xr + c * VEC);
    if constexpr (DROPOUT) {
      acc f[VEC];
      keep_factors<acc, VEC>(key, scale, row, c * VEC, f);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] += static_cast<acc>(v.v[k]) * f[k];
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] += static_cast<acc>(v.v[k]);
    }
  }
}

// fold with one block of kThreads threads per row (grid-stride over rows). Preconditions: r is a
// power of two with r <= kThreads * VEC; for VEC > 1, in % VEC == 0 and x is 16-byte aligned.
// Thread t loads the vectors c = t, t + kThreads, ... of the row (columns c*VEC .. c*VEC+VEC-1;
// neighbouring threads, neighbouring 16 bytes) and sums lane k into sum[k]. Every column it adds
// to sum[k] is congruent to p = t*VEC + k modulo kSlots = kThreads * VEC, and r divides kSlots, so
// slot p of the partial sums in shared memory belongs to shard column p mod r. Halving the slots
// (part[p] += part[p + half] for p < half, half = kSlots/2 .. r) keeps those classes and leaves
// shard column j in part[j]. The order of every addition is fixed: results are deterministic.
// Columns j >= in get no term and come out 0; a vector is wholly inside the row (in % VEC == 0).
template <typename in_t, typename out_t, int VEC, bool DROPOUT>
__global__ void fold_rows_kernel(const in_t* __restrict__ x, out_t* __restrict__ s, int64_t rows, int64_t in,
                                 int64_t r, DropoutParams dropout) {
  using acc = acc_t<in_t, out_t>;
  const DropoutKey key = load_dropout_key(dropout);
  constexpr int kSlots = kThreads * VEC;
  __shared__ Vec<acc, VEC> part_v[kThreads];
  acc* part = reinterpret_cast<acc*>(part_v);
  const acc scale = static_cast<acc>(key.scale);
  const int t = threadIdx.x;
  const int nr = static_cast<int>(r);
  const int64_t chunks = in / VEC;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const in_t* xr = x + row * in;
    Vec<acc, VEC> sum;
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum.v[k] = acc(0);
    accumulate_vectors<in_t, acc, VEC, DROPOUT>(xr, row, t, kThreads, chunks, key, scale, sum.v);
    part_v[t] = sum;  // slots t*VEC .. t*VEC+VEC-1, one vector store
    __syncthreads();
    // Slot p < kThreads is only ever written by thread p during the tree. Once half <= 32, the
    // next step reads slots < 32 only, all written by warp 0: a warp barrier is enough there.
    for (int half = kSlots / 2; half >= nr; half >>= 1) {
      for (int p = t; p < half; p += kThreads) part[p] += part[p + half];
      if (half > 32) __syncthreads();
      else __syncwarp();
    }
    out_t* sr = s + row * r;
    for (int j = t; j < nr; j += kThreads) sr[j] = static_cast<out_t>(part[j]);
    __syncthreads();  // the next row overwrites part
  }
}

// fold with one warp per row (grid-stride over rows), no shared memory and no barriers.
// Preconditions: r is a power of two with r <= kWarpSlots = 32 * VEC; for VEC > 1, in % VEC == 0
// and x is 16-byte aligned. Lane l loads the vectors c = l, l + 32, ... of the row (a warp reads
// 32 * 16 contiguous bytes per step) and sums lane k into sum[k]. Every column it adds to sum[k]
// is congruent to the slot q = l*VEC + k modulo kWarpSlots, and r divides kWarpSlots, so sum[k]
// belongs to shard column q mod r. Reduction, in a fixed order (deterministic):
//   - r < VEC: sum[k] += sum[k + half] within the thread down to r values, then across all 32
//     lanes (xor shuffles 16 .. 1);
//   - r >= VEC: lanes l and l ^ m hold the same columns for every m >= r / VEC: xor shuffles
//     16 .. r / VEC leave column l*VEC + k complete in lanes l < r / VEC.
// Written as an alternative to fold_rows_kernel for small r (issue 11: that kernel's shared-memory
// tree, barriered per row, reached 0.33 of copy bandwidth for bf16 at r = 64); which one is faster
// is for a GPU to measure (bench/bench_kernels.py), so launch_fold takes it only when asked
// (MISS_EXT_FOLD_KERNEL=warp) until then.
template <typename in_t, typename out_t, int VEC, bool DROPOUT>
__global__ void fold_warp_kernel(const in_t* __restrict__ x, out_t* __restrict__ s, int64_t rows, int64_t in,
                                 int64_t r, DropoutParams dropout) {
  using acc = acc_t<in_t, out_t>;
  const DropoutKey key = load_dropout_key(dropout);
  const acc scale = static_cast<acc>(key.scale);
  const int lane = threadIdx.x % 32;
  const int nr = static_cast<int>(r);
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t chunks = in / VEC;
  for (int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32; row < rows; row += warps) {
    const in_t* xr = x + row * in;
    acc sum[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[k] = acc(0);
    accumulate_vectors<in_t, acc, VEC, DROPOUT>(xr, row, lane, 32, chunks, key, scale, sum);
    out_t* sr = s + row * r;
    if (nr < VEC) {
      // Within the thread: slot k and k + half share a column while half >= r.
#pragma unroll
      for (int half = VEC / 2; half >= 1; half >>= 1) {
        if (half < nr) break;
#pragma unroll
        for (int k = 0; k < half; ++k) sum[k] += sum[k + half];
      }
      for (int m = 16; m >= 1; m >>= 1) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] += __shfl_xor_sync(0xffffffffu, sum[k], m);
      }
      if (lane == 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          if (k < nr) sr[k] = static_cast<out_t>(sum[k]);
        }
      }
    } else {
      const int owners = nr / VEC;  // lanes holding distinct columns
      for (int m = 16; m >= owners; m >>= 1) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] += __shfl_xor_sync(0xffffffffu, sum[k], m);
      }
      if (lane < owners) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sr[lane * VEC + k] = static_cast<out_t>(sum[k]);
      }
    }
  }
}

template <typename out_t, typename src_t, int VEC, bool DROPOUT>
__global__ void tile_add_kernel(out_t* __restrict__ out, const src_t* __restrict__ src, int64_t rows, int64_t cols,
                                int64_t period_rows, int64_t q, double alpha_d, DropoutParams dropout) {
  using acc = acc_t<out_t, src_t>;
  const DropoutKey key = load_dropout_key(dropout);
  const acc alpha = static_cast<acc>(alpha_d);
  const acc scale = static_cast<acc>(key.scale);
  const int64_t groups = vec_groups(cols, VEC);
  const int64_t total = rows * groups;
  for (int64_t flat = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; flat < total;
       flat += int64_t(gridDim.x) * blockDim.x) {
    const RowGroup rg = split_row_group(flat, groups);
    const int64_t c0 = rg.group * VEC;
    const src_t* sr = src + tile_row(rg.row, period_rows) * q;
    Vec<out_t, VEC>* op = reinterpret_cast<Vec<out_t, VEC>*>(out + rg.row * cols + c0);
    Vec<out_t, VEC> v = *op;
    acc f[VEC];
    if constexpr (DROPOUT) {
      keep_factors<acc, VEC>(key, scale, rg.row, c0, f);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) f[k] = acc(1);
    }
    int64_t j = c0 % q;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      v.v[k] = static_cast<out_t>(static_cast<acc>(v.v[k]) + alpha * f[k] * static_cast<acc>(sr[j]));
      j = next_mod(j, q);
    }
    *op = v;
  }
}

// tile_add with 2-D blocks and grid: each thread owns column vectors g (blockIdx.x * blockDim.x +
// threadIdx.x, then + gridDim.x * blockDim.x) and walks the rows blockIdx.y * blockDim.y +
// threadIdx.y, then + gridDim.y * blockDim.y, of each. The block is 256 threads, at most as wide as
// the rows' vectors rounded up to a warp, so narrow rows do not leave threads idle. The vector's
// offset in a source row (c0 mod q) is computed once per column vector and the source row moves
// by additions, so no division runs per element. tile_add_kernel above does three 64-bit
// divisions per 16 bytes (row and group of the flat index, source row, c0 mod q), which fits
// issue 11's measurement of it at 0.59 of copy bandwidth. Taken when asked for
// (MISS_EXT_TILE_ADD_KERNEL=grid2d, impl_choice.h) and by "auto" where a GPU timed it faster
// (launch_tile_add below).
template <typename out_t, typename src_t, int VEC, bool DROPOUT>
__global__ void tile_add_2d_kernel(out_t* __restrict__ out, const src_t* __restrict__ src, int64_t rows,
                                   int64_t cols, int64_t period_rows, int64_t q, double alpha_d,
                                   DropoutParams dropout) {
  using acc = acc_t<out_t, src_t>;
  const DropoutKey key = load_dropout_key(dropout);
  const acc alpha = static_cast<acc>(alpha_d);
  const acc scale = static_cast<acc>(key.scale);
  const int64_t groups = vec_groups(cols, VEC);
  const int64_t first_row = blockIdx.y * int64_t(blockDim.y) + threadIdx.y;
  const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
  const int64_t src_step = tile_row(row_step, period_rows);  // row_step mod period_rows
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c0 = g * VEC;
    const int64_t j0 = c0 % q;
    int64_t src_row = tile_row(first_row, period_rows);
    for (int64_t row = first_row; row < rows; row += row_step) {
      // The same update as tile_add_kernel's (kept apart from it: that kernel is the measured default,
      // and sharing the body changed its generated code; one of the two goes once a GPU has timed them).
      const src_t* sr = src + src_row * q;
      Vec<out_t, VEC>* op = reinterpret_cast<Vec<out_t, VEC>*>(out + row * cols + c0);
      Vec<out_t, VEC> v = *op;
      acc f[VEC];
      if constexpr (DROPOUT) {
        keep_factors<acc, VEC>(key, scale, row, c0, f);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = acc(1);
      }
      int64_t j = j0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v.v[k] = static_cast<out_t>(static_cast<acc>(v.v[k]) + alpha * f[k] * static_cast<acc>(sr[j]));
        j = next_mod(j, q);
      }
      *op = v;
      // (row + row_step) mod P from row mod P: both terms are below P, so one subtraction.
      src_row += src_step;
      if (src_row >= period_rows) src_row -= period_rows;
    }
  }
}

// at::Half / at::BFloat16 convert to and from float on the device, so kernels use them directly.
template <typename in_t, typename out_t, int VEC>
void launch_fold_rows(const in_t* xp, out_t* sp, int64_t rows, int64_t in, int64_t r, const DropoutParams& dropout,
                      cudaStream_t stream) {
  const unsigned int grid = static_cast<unsigned int>(std::clamp<int64_t>(rows, 1, kMaxBlocks));
  const auto kernel = dropout.threshold != 0 ? fold_rows_kernel<in_t, out_t, VEC, true> : fold_rows_kernel<in_t, out_t, VEC, false>;
  kernel<<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, dropout);
}

template <typename in_t, typename out_t, int VEC>
void launch_fold_warp(const in_t* xp, out_t* sp, int64_t rows, int64_t in, int64_t r, const DropoutParams& dropout,
                      cudaStream_t stream) {
  constexpr int64_t kWarpsPerBlock = kThreads / 32;
  const unsigned int grid = static_cast<unsigned int>(std::clamp<int64_t>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, kMaxBlocks));
  const auto kernel = dropout.threshold != 0 ? fold_warp_kernel<in_t, out_t, VEC, true> : fold_warp_kernel<in_t, out_t, VEC, false>;
  kernel<<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, dropout);
}

template <typename in_t, typename out_t, int VEC>
void launch_fold_columns(const in_t* xp, out_t* sp, int64_t rows, int64_t in, int64_t r, const DropoutParams& dropout,
                         cudaStream_t stream) {
  const unsigned int grid = grid_for(rows * (r / VEC));
  const auto kernel = dropout.threshold != 0 ? fold_kernel<in_t, out_t, VEC, true> : fold_kernel<in_t, out_t, VEC, false>;
  kernel<<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, dropout);
}

// Which fold kernel. fold_kernel ("columns") runs rows * r / VEC threads, each summing in / r
// vectors one after another. That is the right shape for many rows and wide shards, but it
// starves when
//   - r / VEC < 32: a warp spans several rows with a stride of r elements, so its loads no
//     longer coalesce into whole 512-byte runs, and there are few threads (mini mode's backward
//     folds G (T x out) with r = mini_r, 1 by default: T threads each walking a whole row);
//   - rows * r / VEC < 65536: too few threads to cover the memory latency of the device (a
//     quarter of an H100/H200's resident threads), e.g. decode with T = 1..16.
// fold_rows_kernel ("rows") instead puts a block of 256 threads on each row (coalesced 16-byte
// loads, in / (256 * VEC) vectors per thread) and pays a shared-memory tree of log2(256 * VEC / r)
// steps per row. It needs r to be a power of two dividing 256 * VEC (256 for the scalar variant,
// used when in % VEC != 0 or x is not 16-byte aligned). With many rows and r / VEC >= 32,
// fold_kernel already has coalesced loads and enough threads, and needs no reduction.
// fold_warp_kernel ("warp", r a power of two up to 32 * VEC) puts a warp on each row and reduces
// with shuffles. Under "auto" it serves 2-byte inputs (bf16, fp16) with at least kManyRows
// rows (enough warps to cover the latency): on an H200 (2026-12-04, bench_kernels, T=8192,
// in=4096, r=64, bf16 into fp32 S) it ran at 0.77 of copy bandwidth against rows' 0.49 and
// columns' 0.36, and 0.37 against 0.25 with dropout; for fp32 input rows was faster (0.88 against
// 0.77), so fp32 keeps the rule above. Fewer rows (decoding) keep rows: not measured there.
// MISS_EXT_FOLD_KERNEL (impl_choice.h) forces any kernel whose preconditions hold; a forced
// kernel whose preconditions do not hold falls back to this rule.
constexpr int64_t kFewThreads = 65536;
// Rows from which "auto" takes the warp fold and the 2-D tile_add_ for 2-byte data: a warp per
// row then gives kFewThreads threads.
constexpr int64_t kManyRows = kFewThreads / 32;

template <typename in_t, typename out_t>
void launch_fold(const at::Tensor& x, at::Tensor& s, const DropoutParams& dropout, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(in_t);
  const int64_t rows = x.size(0), in = x.size(1), r = s.size(1);
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* sp = s.mutable_data_ptr<out_t>();
  const bool vec_in = rows_vectorizable(xp, in);
  const bool pow2 = (r & (r - 1)) == 0;  // r >= 1
  const int64_t width = vec_in ? kVec : 1;  // elements per load
  const int picked = fold_kernel_choice();
  int kind = choice::kColumns;
  const bool warp_fits = pow2 && r <= 32 * width;
  if (warp_fits && (picked == choice::kWarp ||
                    (picked == choice::kAuto && sizeof(in_t) == 2 && rows >= kManyRows))) {
    kind = choice::kWarp;
  } else if (picked == choice::kRows && pow2 && r <= kThreads * width) {
    kind = choice::kRows;
  } else if (picked != choice::kColumns && pow2 && r <= kThreads * width &&
             (r / width < 32 || rows * (r / width) < kFewThreads)) {
    kind = choice::kRows;
  }
  if (kind == choice::kWarp) {
    if (vec_in) launch_fold_warp<in_t, out_t, kVec>(xp, sp, rows, in, r, dropout, stream);
    else launch_fold_warp<in_t, out_t, 1>(xp, sp, rows, in, r, dropout, stream);
  } else if (kind == choice::kRows) {
    if (vec_in) launch_fold_rows<in_t, out_t, kVec>(xp, sp, rows, in, r, dropout, stream);
    else launch_fold_rows<in_t, out_t, 1>(xp, sp, rows, in, r, dropout, stream);
  } else if (r % kVec == 0 && vec_in) {
    launch_fold_columns<in_t, out_t, kVec>(xp, sp, rows, in, r, dropout, stream);
  } else {
    launch_fold_columns<in_t, out_t, 1>(xp, sp, rows, in, r, dropout, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows each thread of tile_add_2d_kernel walks (when there are that many): enough threads to
// cover the device's memory latency (8192 x 4096 bf16 gives 2 x 1024 blocks of 256 threads), and
// few enough divisions per element.
constexpr int64_t kTileRowsPerThread = 8;
constexpr int64_t kMaxGridY = 65535;

template <typename out_t, typename src_t, int VEC, bool DROPOUT>
void launch_tile_add_as(bool grid2d, out_t* op, const src_t* sp, int64_t rows, int64_t cols, int64_t period_rows,
                        int64_t q, double alpha, const DropoutParams& dropout, cudaStream_t stream) {
  const int64_t groups = cols / VEC;
  if (grid2d) {
    int64_t width = 32;  // threads along a row: the vectors of a row, rounded up to a warp, at most 256
    while (width < groups && width < kThreads) width *= 2;
    const int64_t height = kThreads / width;
    const dim3 block(static_cast<unsigned int>(width), static_cast<unsigned int>(height));
    const int64_t rows_per_block = height * kTileRowsPerThread;
    const dim3 grid(static_cast<unsigned int>(std::clamp<int64_t>((groups + width - 1) / width, 1, kMaxBlocks)),
                    static_cast<unsigned int>(std::clamp<int64_t>((rows + rows_per_block - 1) / rows_per_block, 1,
                                                                  kMaxGridY)));
    tile_add_2d_kernel<out_t, src_t, VEC, DROPOUT><<<grid, block, 0, stream>>>(op, sp, rows, cols, period_rows, q,
                                                                                alpha, dropout);
  } else {
    tile_add_kernel<out_t, src_t, VEC, DROPOUT><<<grid_for(rows * groups), kThreads, 0, stream>>>(
        op, sp, rows, cols, period_rows, q, alpha, dropout);
  }
}

template <typename out_t, typename src_t>
void launch_tile_add(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutParams& dropout,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(out_t);
  const int64_t rows = out.size(0), cols = out.size(1), period_rows = src.size(0), q = src.size(1);
  out_t* op = out.mutable_data_ptr<out_t>();
  const src_t* sp = src.const_data_ptr<src_t>();
  const bool vec = rows_vectorizable(op, cols);
  const bool use_dropout = dropout.threshold != 0;
  // "auto": the 2-D kernel where it was measured faster, the flat one elsewhere (not measured).
  // On an H200 (2026-12-04, bench_kernels: a bf16 dx of 8192 x 4096 += a tile of an fp32 (8192,
  // 64) dS, one source row per row) it ran at 0.80 of copy bandwidth against the flat kernel's 0.73.
  const int picked = tile_add_kernel_choice();
  const bool grid2d = picked == choice::kGrid2d ||
                      (picked == choice::kAuto && sizeof(out_t) == 2 && period_rows == rows && rows >= kManyRows);
  if (vec) {
    if (use_dropout) launch_tile_add_as<out_t, src_t, kVec, true>(grid2d, op, sp, rows, cols, period_rows, q, alpha, dropout, stream);
    else launch_tile_add_as<out_t, src_t, kVec, false>(grid2d, op, sp, rows, cols, period_rows, q, alpha, dropout, stream);
  } else {
    if (use_dropout) launch_tile_add_as<out_t, src_t, 1, true>(grid2d, op, sp, rows, cols, period_rows, q, alpha, dropout, stream);
    else launch_tile_add_as<out_t, src_t, 1, false>(grid2d, op, sp, rows, cols, period_rows, q, alpha, dropout, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void fold_kernel_cuda(const at::Tensor& x, at::Tensor& s, const DropoutParams& dropout) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_fold_cuda", [&] {
    if (s.scalar_type() == x.scalar_type()) launch_fold<scalar_t, scalar_t>(x, s, dropout, stream);
    else launch_fold<scalar_t, float>(x, s, dropout, stream);
  });
}

void tile_add_kernel_cuda(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutParams& dropout) {
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "miss_tile_add_cuda", [&] {
    if (src.scalar_type() == out.scalar_type()) launch_tile_add<scalar_t, scalar_t>(out, src, alpha, dropout, stream);
    else launch_tile_add<scalar_t, float>(out, src, alpha, dropout, stream);
  });
}

}  // namespace miss_ext
