// CUDA kernels of the adapter bank (common/bank_index.h has the index arithmetic).
//
// - bank_add_kernel: one block per row (grid-stride). The block folds the row's s to the slot's
//   rank in shared memory, then each thread computes whole output elements: y[t, o] += sum_j
//   s_a[j] bank[a, j, o mod q], 16 bytes of y at a time where alignment and the row's period
//   allow. Neighbouring threads read neighbouring block columns (coalesced).
// - bank_grad_s_kernel: one block per row; each warp reduces d[j] = sum_o grad[t, o]
//   bank[a, j, o mod q] for its j's with a fixed shuffle tree (16-byte loads of grad where
//   alignment and the row's period allow), then grad_s[t, k] = d[k mod r].
// - bank_grad_bank_kernel: one thread per (slot, output column, 8 block rows); it walks the
//   slot's rows in row order (rows sorted by slot on the device: a stable sort and a
//   searchsorted, no host synchronisation) and accumulates s_a[j] grad[t, v]; then
//   bank_fold_wide_kernel folds a mini slot's (r, out) sums to its q columns.
// No atomics anywhere, so results are deterministic. Invalid ranks, periods or index values
// trip device-side assertions (the host would have to synchronise to read them).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "../common/bank_index.h"
#include "../common/shard_index.h"
#include "../bank_dispatch.h"
#include "../kernels.h"
#include "kernel_helpers.cuh"

namespace miss_ext {
namespace {

constexpr int kRowsPerThread = 8;  // block rows per thread in the bank gradient

// per_row_fold: s is miss.bank_fold's (a rank need not divide R; see torch_bindings.cpp).
__device__ inline void check_slot(int64_t a, int64_t slots, int64_t r, int64_t q, int64_t R, int64_t out,
                                  int64_t r_cap, int64_t q_cap, bool per_row_fold) {
  CUDA_KERNEL_ASSERT(a < slots);
  CUDA_KERNEL_ASSERT(r >= 1 && r <= r_cap && r <= R && (per_row_fold || R % r == 0));
  CUDA_KERNEL_ASSERT(q >= 1 && q <= q_cap && out % q == 0);
}

// y[t, o] += sum_j sa[j] block[j, o mod q] for the W outputs o0 .. o0 + W - 1 of each thread of
// the block (o0 a multiple of W), y read and written as one W-element vector. With W > 1, q % W
// == 0 and out % W == 0, so the W outputs are the block columns c .. c + W - 1 of each block row.
// Each output sums j = 0 .. r - 1 in order and is then added to y: the same arithmetic for every W.
template <typename acc, typename y_t, typename a_t, int W>
__device__ void add_bank_row(y_t* __restrict__ yr, const a_t* __restrict__ block, const acc* sa, int64_t out,
                             int64_t r, int64_t q, int64_t q_cap) {
  for (int64_t o = threadIdx.x * int64_t{W}; o < out; o += blockDim.x * int64_t{W}) {
    const int64_t c = o % q;
    acc v[W];
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = acc(0);
    for (int64_t j = 0; j < r; ++j) {
      const acc sj = sa[j];
      const a_t* b = block + j * q_cap + c;
#pragma unroll
      for (int k = 0; k < W; ++k) v[k] += sj * static_cast<acc>(b[k]);
    }
    Vec<y_t, W>* yp = reinterpret_cast<Vec<y_t, W>*>(yr + o);
    Vec<y_t, W> yv = *yp;
#pragma unroll
    for (int k = 0; k < W; ++k) yv.v[k] = static_cast<y_t>(static_cast<acc>(yv.v[k]) + v[k]);
    *yp = yv;
  }
}

// VEC: outputs per thread of the launch (16 bytes of y when out % VEC == 0 and y is 16-byte
// aligned, else 1); a row whose period q is not a multiple of VEC takes one output per thread.
template <typename y_t, typename a_t, int VEC>
__global__ void bank_add_kernel(y_t* __restrict__ y, const a_t* __restrict__ s, const a_t* __restrict__ bank,
                                const int64_t* __restrict__ ranks, const int64_t* __restrict__ periods,
                                const int64_t* __restrict__ index, int64_t rows, int64_t out, int64_t R, int64_t slots,
                                int64_t r_cap, int64_t q_cap, bool per_row_fold) {
  using acc = acc_t<y_t, a_t>;
  extern __shared__ __align__(16) unsigned char shared[];  // read as double or float
  acc* sa = reinterpret_cast<acc*>(shared);
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    const int64_t a = index[t];
    if (a < 0) continue;  // the same for the whole block
    CUDA_KERNEL_ASSERT(a < slots);  // before ranks[a] is read (an empty bank's ranks has no memory)
    const int64_t r = ranks[a], q = periods[a];
    check_slot(a, slots, r, q, R, out, r_cap, q_cap, per_row_fold);
    for (int64_t j = threadIdx.x; j < r; j += blockDim.x) sa[j] = bank_fold_column<acc>(s + t * R, R, r, j);
    __syncthreads();
    const a_t* block = bank + bank_offset(a, 0, 0, r_cap, q_cap);
    y_t* yr = y + t * out;
    if (VEC > 1 && q % VEC == 0) add_bank_row<acc, y_t, a_t, VEC>(yr, block, sa, out, r, q, q_cap);
    else add_bank_row<acc, y_t, a_t, 1>(yr, block, sa, out, r, q, q_cap);
    __syncthreads();  // sa is the next row's
  }
}

// One lane's part of sum_o grad[t, o] block[j, o mod q] over a row (gr) and a block row (brow):
// the outputs o = lane W, lane W + 32 W, ..., each W of them loaded as one vector (with W > 1,
// q % W == 0 and out % W == 0, so they are the block columns c .. c + W - 1).
template <typename acc, typename g_t, typename a_t, int W>
__device__ __forceinline__ acc lane_dot(const g_t* __restrict__ gr, const a_t* __restrict__ brow, int64_t out,
                                        int64_t q, int lane) {
  // In two levels (bank_index.h, kSumBlock loads per part): at out = 65536 a lane sums 2048 terms.
  acc total = acc(0), partial = acc(0);
  int64_t n = 0;
  for (int64_t o = int64_t{lane} * W; o < out; o += 32 * W) {
    const Vec<g_t, W> g = *reinterpret_cast<const Vec<g_t, W>*>(gr + o);
    const int64_t c = o % q;
#pragma unroll
    for (int k = 0; k < W; ++k) partial += static_cast<acc>(g.v[k]) * static_cast<acc>(brow[c + k]);
    if (++n == kSumBlock) {
      total += partial;
      partial = acc(0);
      n = 0;
    }
  }
  return total + partial;
}

// VEC: elements of grad per load (16 bytes when out % VEC == 0 and grad is 16-byte aligned, else
// 1); a row whose period q is not a multiple of VEC is read element by element.
template <typename g_t, typename a_t, int VEC>
__global__ void bank_grad_s_kernel(const g_t* __restrict__ grad, const a_t* __restrict__ bank,
                                   const int64_t* __restrict__ ranks, const int64_t* __restrict__ periods,
                                   const int64_t* __restrict__ index, int64_t rows, int64_t out, int64_t R,
                                   int64_t slots, int64_t r_cap, int64_t q_cap, bool per_row_fold,
                                   a_t* __restrict__ grad_s) {
  using acc = acc_t<g_t, a_t>;
  extern __shared__ __align__(16) unsigned char shared[];  // read as double or float
  acc* d = reinterpret_cast<acc*>(shared);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    const int64_t a = index[t];
    if (a < 0) continue;  // grad_s stays zero
    CUDA_KERNEL_ASSERT(a < slots);  // before ranks[a] is read
    const int64_t r = ranks[a], q = periods[a];
    check_slot(a, slots, r, q, R, out, r_cap, q_cap, per_row_fold);
    const a_t* block = bank + bank_offset(a, 0, 0, r_cap, q_cap);
    const g_t* gr = grad + t * out;
    for (int64_t j = warp; j < r; j += warps) {
      acc partial = VEC > 1 && q % VEC == 0 ? lane_dot<acc, g_t, a_t, VEC>(gr, block + j * q_cap, out, q, lane)
                                             : lane_dot<acc, g_t, a_t, 1>(gr, block + j * q_cap, out, q, lane);
      for (int offset = 16; offset > 0; offset /= 2) partial += __shfl_down_sync(0xffffffffu, partial, offset);
      if (lane == 0) d[j] = partial;
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < R; k += blockDim.x) grad_s[t * R + k] = static_cast<a_t>(d[k % r]);
    __syncthreads();
  }
}

// grid (slots, output-column tiles, row tiles of kRowsPerThread), the column tiles grid-strided.
// One thread per (slot a, output column v, kRowsPerThread block rows j): it walks a's rows and sums
// s_a[j] grad[t, v]. A default slot (q = out) has its block gradient then; a mini slot's is that
// sum folded along out to q columns, which bank_fold_wide_kernel does from `wide`. Folding each
// row's gradient first (gq) would leave only q of the out threads with work, each walking out / q
// columns of every row: 8 working threads per slot for mini_r = 1 and r = 64, whose dependent
// chains of rows * out additions were estimated at 34 ms per launch for 4096 rows of width 4096 on
// an H200 (a review of 2026-12-03; unmeasured, no GPU was lent).
template <typename g_t, typename a_t>
__global__ void bank_grad_bank_kernel(const g_t* __restrict__ grad, const a_t* __restrict__ s,
                                      const int64_t* __restrict__ ranks, const int64_t* __restrict__ periods,
                                      const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                      int64_t out, int64_t R, int64_t r_cap, int64_t q_cap, bool per_row_fold,
                                      int64_t first_slot, a_t* __restrict__ grad_bank,
                                      acc_t<g_t, a_t>* __restrict__ wide) {
  using acc = acc_t<g_t, a_t>;
  const int64_t a = first_slot + blockIdx.x;  // wide holds the slots first_slot, first_slot + 1, ...
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * kRowsPerThread;
  if (offsets[a] == offsets[a + 1]) return;  // no row uses this slot: its values need not be valid
  const int64_t r = ranks[a], q = periods[a];
  CUDA_KERNEL_ASSERT(r >= 1 && r <= r_cap && r <= R && (per_row_fold || R % r == 0) && q >= 1 && q <= q_cap && out % q == 0);
  if (j0 >= r) return;
  for (int64_t v = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; v < out;
       v += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    // The slot's rows summed in two levels (bank_index.h, kSumBlock): a running sum over 65536
    // rows lost 37x the accuracy of the GEMM a MissLinear's block gradient takes.
    acc sums[kRowsPerThread], parts[kRowsPerThread];
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) sums[u] = parts[u] = acc(0);
    int64_t n = 0;
    for (int64_t i = offsets[a]; i < offsets[a + 1]; ++i) {
      const int64_t t = order[i];
      const acc g = static_cast<acc>(grad[t * out + v]);
#pragma unroll
      for (int u = 0; u < kRowsPerThread; ++u)
        if (j0 + u < r) parts[u] += bank_fold_column<acc>(s + t * R, R, r, j0 + u) * g;
      if (++n == kSumBlock) {
#pragma unroll
        for (int u = 0; u < kRowsPerThread; ++u) {
          sums[u] += parts[u];
          parts[u] = acc(0);
        }
        n = 0;
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsPerThread; ++u) {
      if (j0 + u >= r) continue;
      if (q == out) grad_bank[bank_offset(a, j0 + u, v, r_cap, q_cap)] = static_cast<a_t>(sums[u] + parts[u]);
      else wide[((a - first_slot) * r_cap + j0 + u) * out + v] = sums[u] + parts[u];
    }
  }
}

// grid-stride over (slot, j, c) of the slots first_slot .. first_slot + slots - 1: a mini slot's
// block gradient, grad_bank[a, j, c] = the sum of wide[a, j, v] over the columns v with v mod q =
// c, in the fold's levels (strided_sum).
template <typename acc, typename a_t>
__global__ void bank_fold_wide_kernel(const acc* __restrict__ wide, const int64_t* __restrict__ ranks,
                                      const int64_t* __restrict__ periods, const int64_t* __restrict__ offsets,
                                      int64_t first_slot, int64_t slots, int64_t out, int64_t r_cap, int64_t q_cap,
                                      a_t* __restrict__ grad_bank) {
  const int64_t total = slots * r_cap * q_cap;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = e % q_cap, j = e / q_cap % r_cap, k = e / (q_cap * r_cap), a = first_slot + k;
    if (offsets[a] == offsets[a + 1]) continue;  // as in bank_grad_bank_kernel
    const int64_t r = ranks[a], q = periods[a];
    if (q == out || j >= r || c >= q) continue;  // a default slot's or padding
    grad_bank[bank_offset(a, j, c, r_cap, q_cap)] =
        static_cast<a_t>(strided_sum<acc>(wide + (k * r_cap + j) * out, c, out, q));
  }
}

// The most bytes of the mini slots' workspace (`wide`) one backward allocates: larger banks run the
// block gradient in groups of slots. 64 MiB holds 16 slots of r_cap 64 at out 16384 in float32.
// The CUDA emulation of the tests builds with a few KiB, so that its small banks run in groups.
#ifndef MISS_EXT_BANK_WIDE_BYTES
#define MISS_EXT_BANK_WIDE_BYTES (int64_t{64} << 20)
#endif

int blocks_for(int64_t rows) { return static_cast<int>(std::max<int64_t>(1, std::min(rows, kMaxBlocks))); }

// The per-row sums for up to r_cap block rows, rounded up to whole groups of four: ptxas may merge
// the j loop's last loads of them (three scalar loads after the unrolled groups of four, in the
// PTX) into one wider shared load that reads up to three elements past r. compute-sanitizer
// memcheck on an H200 reported such a 12-byte __shared__ read past an 8-byte allocation (r_cap 2,
// bank_add, 2026-12-04); padded, it stays inside the allocation, and the extra values are unused.
size_t shared_bytes(int64_t r_cap, size_t acc_size) {
  const size_t bytes = static_cast<size_t>((r_cap + 3) / 4 * 4) * acc_size;
  TORCH_CHECK_VALUE(bytes <= 48 * 1024, "miss: bank_add on CUDA supports r_cap up to ", 48 * 1024 / acc_size,
                    " for this dtype, got a bank with r_cap=", r_cap);
  return bytes;
}

}  // namespace

void bank_add_kernel_cuda(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                          const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(y.device().index()).stream();
  const int64_t rows = y.size(0);
  dispatch_bank(y.scalar_type(), bank.scalar_type(), [&](auto y0, auto a0) {
    using y_t = decltype(y0);
    using a_t = decltype(a0);
    using acc = acc_t<y_t, a_t>;
    constexpr int kVec = 16 / sizeof(y_t);
    y_t* yp = y.mutable_data_ptr<y_t>();
    const bool vec = rows_vectorizable(yp, y.size(1));
    const auto kernel = vec ? bank_add_kernel<y_t, a_t, kVec> : bank_add_kernel<y_t, a_t, 1>;
    kernel<<<blocks_for(rows), kThreads, shared_bytes(bank.size(1), sizeof(acc)), stream>>>(
        yp, s.const_data_ptr<a_t>(), bank.const_data_ptr<a_t>(), ranks.const_data_ptr<int64_t>(),
        periods.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(), rows, y.size(1), s.size(1), bank.size(0),
        bank.size(1), bank.size(2), per_row_fold);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void bank_grad_kernel_cuda(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                           const at::Tensor& periods, const at::Tensor& index, bool per_row_fold, at::Tensor& grad_s,
                           at::Tensor& grad_bank) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.device().index()).stream();
  const int64_t rows = grad.size(0), slots = bank.size(0), r_cap = bank.size(1), q_cap = bank.size(2);
  // The block-gradient grid (slots, output-column tiles, r_cap / kRowsPerThread), refused before
  // any work; the column tiles are grid-strided.
  const int64_t grid_y = std::min<int64_t>((grad.size(1) + kThreads - 1) / kThreads, std::min<int64_t>(kMaxBlocks, 65535));
  const int64_t grid_z = (r_cap + kRowsPerThread - 1) / kRowsPerThread;
  TORCH_CHECK_VALUE(slots <= 2147483647 && grid_z <= 65535, "miss: bank_add on CUDA: bank shape (", slots, ", ",
                    r_cap, ", ", q_cap, ") is too large for one launch (r_cap up to ", int64_t{65535} * kRowsPerThread,
                    ")");
  // Rows by slot, on the device: a stable sort keeps row order within each slot (deterministic
  // sums), and offsets[a] is where slot a's rows start (negative indices sort first).
  const auto sorted = at::sort(index, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor order = std::get<1>(sorted).contiguous();
  const at::Tensor offsets =
      at::searchsorted(std::get<0>(sorted), at::arange(slots + 1, index.options())).contiguous();
  dispatch_bank(grad.scalar_type(), bank.scalar_type(), [&](auto g0, auto a0) {
    using g_t = decltype(g0);
    using a_t = decltype(a0);
    using acc = acc_t<g_t, a_t>;
    constexpr int kVec = 16 / sizeof(g_t);
    const g_t* gp = grad.const_data_ptr<g_t>();
    const bool vec = rows_vectorizable(gp, grad.size(1));
    const auto grad_s_kernel = vec ? bank_grad_s_kernel<g_t, a_t, kVec> : bank_grad_s_kernel<g_t, a_t, 1>;
    grad_s_kernel<<<blocks_for(rows), kThreads, shared_bytes(r_cap, sizeof(acc)), stream>>>(
        gp, bank.const_data_ptr<a_t>(), ranks.const_data_ptr<int64_t>(),
        periods.const_data_ptr<int64_t>(), index.const_data_ptr<int64_t>(), rows, grad.size(1), s.size(1), slots,
        r_cap, q_cap, per_row_fold, grad_s.mutable_data_ptr<a_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // No block gradient to write: an empty bank (every index negative) or blocks with no rows or
    // columns. A grid dimension of 0 is an invalid launch.
    if (slots == 0 || r_cap == 0 || q_cap == 0) return;
    // The mini slots' block gradients before their fold along out (bank_grad_bank_kernel), in the
    // accumulation type, for a group of slots at a time: (group, r_cap, out), at most
    // MISS_EXT_BANK_WIDE_BYTES (one slot at least). Which slots are mini only the device knows
    // (periods), so it is allocated for every bank; a bank of default slots only writes none of it.
    const int64_t out = grad.size(1);
    const int64_t slot_bytes = r_cap * out * static_cast<int64_t>(sizeof(acc));
    const int64_t group = std::max<int64_t>(1, std::min<int64_t>(slots, MISS_EXT_BANK_WIDE_BYTES / slot_bytes));
    const at::Tensor wide = at::empty({group, r_cap, out}, grad_bank.options().dtype(c10::CppTypeToScalarType<acc>::value));
    for (int64_t first = 0; first < slots; first += group) {
      const int64_t n = std::min(group, slots - first);
      const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(std::max<int64_t>(grid_y, 1)),
                      static_cast<unsigned>(grid_z));
      bank_grad_bank_kernel<g_t, a_t><<<grid, kThreads, 0, stream>>>(
          grad.const_data_ptr<g_t>(), s.const_data_ptr<a_t>(), ranks.const_data_ptr<int64_t>(),
          periods.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), out,
          s.size(1), r_cap, q_cap, per_row_fold, first, grad_bank.mutable_data_ptr<a_t>(), wide.mutable_data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // Stream order: the next group's bank_grad_bank_kernel writes wide after this fold read it.
      bank_fold_wide_kernel<acc, a_t><<<blocks_for((n * r_cap * q_cap + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          wide.const_data_ptr<acc>(), ranks.const_data_ptr<int64_t>(), periods.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), first, n, out, r_cap, q_cap, grad_bank.mutable_data_ptr<a_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace miss_ext
