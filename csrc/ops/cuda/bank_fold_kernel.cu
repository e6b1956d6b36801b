// CUDA kernels of miss::bank_fold and its adjoint (common/bank_index.h has the per-row key).
//
// - bank_fold_kernel: one block per row (grid-stride). A row of rank r is read in vectors of W
//   elements: W = VEC (16 bytes) when the launch is vectorised (in % VEC == 0, x 16-byte aligned)
//   and the row's r % VEC == 0, else W = 1 (rows of other ranks in the same launch). With
//   G = r / W vectors per shard and G < the block size, the block's threads form C = blockDim / G
//   chunks of G consecutive threads; thread (c, g) sums the vectors at g W + m r for m = c, c + C,
//   ..., so a chunk reads r consecutive elements and the block C r of them at a time (coalesced).
//   The C partial sums of each column are then added in chunk order from shared memory: a fixed
//   order, so results are deterministic. For G >= the block size each thread sums its own vector
//   columns whole.
// - bank_unfold_kernel: one thread per VEC elements of grad_x (grid-stride; VEC = 1 when in %
//   VEC != 0), grad_x[t, i] = the row's dropout factor times grad_s[t, i mod r], stored as one
//   vector.
// Results are deterministic for a given layout; the vector and element paths sum a row in
// different chunks, so an aligned and a misaligned x may differ in the last bits (as with fold's
// kernels).
// Dropout multiplies by the factor (scale or 0), as the CPU kernels and fold's kernels do, and
// draws the mask by keep_factors (one Philox call per eight columns, common/dropout_mask.h). Invalid index, ranks or dropouts values
// trip device-side assertions (reading them on the host would synchronise).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <type_traits>

#include "../common/bank_index.h"
#include "../common/shard_index.h"
#include "../kernels.h"
#include "kernel_helpers.cuh"

namespace miss_ext {
namespace {

// The slot of row t and its rank, checked; -1 for a row without adapter.
__device__ inline int64_t checked_slot(const int64_t* index, const int64_t* ranks, const double* dropouts,
                                       const int64_t* key, int64_t t, int64_t slots, int64_t R, int64_t* r) {
  const int64_t a = index[t];
  if (a < 0) return a;
  CUDA_KERNEL_ASSERT(a < slots);  // before ranks[a] is read
  *r = ranks[a];
  CUDA_KERNEL_ASSERT(*r >= 1 && *r <= R);
  if (key != nullptr) CUDA_KERNEL_ASSERT(dropouts[a] >= 0.0 && dropouts[a] <= 1.0);
  return a;
}

// sum[k] += dropout(x)[t, i + k] for the W-element vectors at i = first, first + step, ... < in
// of row t (xr): one W-element load each (W-aligned when W > 1; in % W == 0, so a vector is
// wholly inside the row).
template <typename acc, typename in_t, int W>
__device__ __forceinline__ void add_strided(const in_t* __restrict__ xr, int64_t t, int64_t first, int64_t step,
                                            int64_t in, const DropoutKey& key, acc scale, acc (&sum)[W]) {
  if (key.threshold != 0) {
    for (int64_t i = first; i < in; i += step) {
      const Vec<in_t, W> v = *reinterpret_cast<const Vec<in_t, W>*>(xr + i);
      acc f[W];
      keep_factors<acc, W>(key, scale, t, i, f);
#pragma unroll
      for (int k = 0; k < W; ++k) sum[k] += static_cast<acc>(v.v[k]) * f[k];
    }
  } else {
    for (int64_t i = first; i < in; i += step) {
      const Vec<in_t, W> v = *reinterpret_cast<const Vec<in_t, W>*>(xr + i);
#pragma unroll
      for (int k = 0; k < W; ++k) sum[k] += static_cast<acc>(v.v[k]);
    }
  }
}

// sr[0, r) = row t of x (xr) folded at r by the whole block, W elements per load (r % W == 0).
// `partial` is shared memory of blockDim * W accumulators. Called by every thread of the block
// (it has barriers).
template <typename acc, typename in_t, typename out_t, int W>
__device__ void fold_bank_row(const in_t* __restrict__ xr, out_t* __restrict__ sr, int64_t t, int64_t in, int64_t r,
                              const DropoutKey& key, acc* partial) {
  const acc scale = static_cast<acc>(key.scale);
  const int64_t tid = threadIdx.x, threads = blockDim.x;
  const int64_t groups = r / W;  // vectors per shard
  if (groups >= threads) {
    for (int64_t g = tid; g < groups; g += threads) {
      acc sum[W];
#pragma unroll
      for (int k = 0; k < W; ++k) sum[k] = acc(0);
      add_strided<acc, in_t, W>(xr, t, g * W, r, in, key, scale, sum);
#pragma unroll
      for (int k = 0; k < W; ++k) sr[g * W + k] = static_cast<out_t>(sum[k]);
    }
    return;
  }
  const int64_t chunks = threads / groups, c = tid / groups, g = tid % groups;
  acc sum[W];
#pragma unroll
  for (int k = 0; k < W; ++k) sum[k] = acc(0);
  if (c < chunks) add_strided<acc, in_t, W>(xr, t, c * r + g * W, chunks * r, in, key, scale, sum);
#pragma unroll
  for (int k = 0; k < W; ++k) partial[tid * W + k] = sum[k];
  __syncthreads();
  // Column j = g W + k of chunk m sits at partial[(m G + g) W + k] = partial[m r + j]:
  // consecutive threads read consecutive words.
  for (int64_t j = tid; j < r; j += threads) {
    acc total = acc(0);
    for (int64_t m = 0; m < chunks; ++m) total += partial[m * r + j];
    sr[j] = static_cast<out_t>(total);
  }
  __syncthreads();  // partial is the next row's
}

// VEC: the vector width of the launch (1: x's rows are not 16-byte aligned, or in % 16 bytes != 0).
template <typename in_t, typename out_t, int VEC>
__global__ void bank_fold_kernel(const in_t* __restrict__ x, out_t* __restrict__ s, const int64_t* __restrict__ index,
                                 const int64_t* __restrict__ ranks, const double* __restrict__ dropouts,
                                 const int64_t* __restrict__ key, int64_t rows, int64_t in, int64_t R, int64_t slots) {
  using acc = acc_t<in_t, out_t>;
  extern __shared__ __align__(16) unsigned char shared[];  // read as double or float
  acc* partial = reinterpret_cast<acc*>(shared);
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    out_t* sr = s + t * R;
    int64_t r = 0;
    const int64_t a = checked_slot(index, ranks, dropouts, key, t, slots, R, &r);  // the same for the whole block
    if (a >= 0) {
      const DropoutKey row_key = bank_row_key(key, dropouts, a);
      const in_t* xr = x + t * in;
      if (VEC > 1 && r % VEC == 0) fold_bank_row<acc, in_t, out_t, VEC>(xr, sr, t, in, r, row_key, partial);
      else fold_bank_row<acc, in_t, out_t, 1>(xr, sr, t, in, r, row_key, partial);
    }
    for (int64_t k = (a >= 0 ? r : 0) + threadIdx.x; k < R; k += blockDim.x) sr[k] = out_t(0);
  }
}

// VEC: elements of grad_x per thread, stored as one vector (1: grad_x not 16-byte aligned, or
// in % VEC != 0).
template <typename g_t, typename x_t, int VEC>
__global__ void bank_unfold_kernel(const g_t* __restrict__ grad_s, x_t* __restrict__ grad_x,
                                   const int64_t* __restrict__ index, const int64_t* __restrict__ ranks,
                                   const double* __restrict__ dropouts, const int64_t* __restrict__ key, int64_t rows,
                                   int64_t in, int64_t R, int64_t slots) {
  using acc = acc_t<g_t, x_t>;
  const int64_t groups = in / VEC;
  const int64_t total = rows * groups;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / groups, i0 = (e - t * groups) * VEC;
    int64_t r = 0;
    const int64_t a = checked_slot(index, ranks, dropouts, key, t, slots, R, &r);
    Vec<x_t, VEC> v;
    if (a >= 0) {
      const DropoutKey row_key = bank_row_key(key, dropouts, a);
      acc f[VEC];
      if (row_key.threshold != 0) {
        keep_factors<acc, VEC>(row_key, static_cast<acc>(row_key.scale), t, i0, f);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = acc(1);
      }
      const g_t* gr = grad_s + t * R;
      int64_t j = i0 % r;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        v.v[k] = static_cast<x_t>(f[k] * static_cast<acc>(gr[j]));
        j = next_mod(j, r);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = x_t(0);
    }
    *reinterpret_cast<Vec<x_t, VEC>*>(grad_x + t * in + i0) = v;
  }
}

const double* dropouts_ptr(const at::Tensor& dropouts) {
  return dropouts.defined() ? dropouts.const_data_ptr<double>() : nullptr;
}

}  // namespace

void bank_fold_kernel_cuda(const at::Tensor& x, at::Tensor& s, const at::Tensor& index, const at::Tensor& ranks,
                           const at::Tensor& dropouts, const int64_t* key) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t rows = x.size(0), in = x.size(1);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(rows, kMaxBlocks)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_bank_fold_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool vec = rows_vectorizable(xp, in);
    const auto launch = [&](auto* out) {
      using out_t = std::remove_pointer_t<decltype(out)>;
      using acc = acc_t<scalar_t, out_t>;
      const auto kernel = vec ? bank_fold_kernel<scalar_t, out_t, kVec> : bank_fold_kernel<scalar_t, out_t, 1>;
      const size_t shared = kThreads * (vec ? kVec : 1) * sizeof(acc);  // at most 8 KiB
      kernel<<<blocks, kThreads, shared, stream>>>(xp, out, index.const_data_ptr<int64_t>(),
                                                   ranks.const_data_ptr<int64_t>(), dropouts_ptr(dropouts), key,
                                                   rows, in, s.size(1), ranks.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (s.scalar_type() == x.scalar_type()) {
      launch(s.mutable_data_ptr<scalar_t>());
    } else {
      launch(s.mutable_data_ptr<float>());
    }
  });
}

void bank_fold_grad_kernel_cuda(const at::Tensor& grad_s, at::Tensor& grad_x, const at::Tensor& index,
                                const at::Tensor& ranks, const at::Tensor& dropouts, const int64_t* key) {
  const c10::cuda::CUDAGuard guard(grad_x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad_x.device().index()).stream();
  const int64_t rows = grad_x.size(0), in = grad_x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "miss_bank_fold_grad_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const bool vec = rows_vectorizable(gxp, in);
    const int64_t per_thread = vec ? kVec : 1;
    const int64_t threads_needed = rows * (in / per_thread);
    const int blocks =
        static_cast<int>(std::max<int64_t>(1, std::min((threads_needed + kThreads - 1) / kThreads, kMaxBlocks)));
    const auto launch = [&](const auto* g) {
      using g_t = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
      const auto kernel = vec ? bank_unfold_kernel<g_t, scalar_t, kVec> : bank_unfold_kernel<g_t, scalar_t, 1>;
      kernel<<<blocks, kThreads, 0, stream>>>(g, gxp, index.const_data_ptr<int64_t>(), ranks.const_data_ptr<int64_t>(),
                                              dropouts_ptr(dropouts), key, rows, in, grad_s.size(1), ranks.size(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (grad_s.scalar_type() == grad_x.scalar_type()) {
      launch(grad_s.const_data_ptr<scalar_t>());
    } else {
      launch(grad_s.const_data_ptr<float>());
    }
  });
}

}  // namespace miss_ext
