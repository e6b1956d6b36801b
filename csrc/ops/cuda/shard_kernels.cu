// CUDA kernels for fold and tile_add (see kernels.h for the contract).
//
// fold:     one thread per (row, VEC consecutive shard columns). It walks the row with stride r,
//           loading VEC elements (16 bytes) at a time. Neighbouring threads load neighbouring
//           16-byte chunks, so the loads coalesce.
// tile_add: one thread per 16 bytes of out (read, add, write back). The src rows are small and
//           stay in cache.
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

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "../common/shard_index.h"
#include "../kernels.h"

namespace miss_ext {
namespace {

template <typename A, typename B>
using acc_t = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>;

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Blocks for a grid-stride loop over `total` items: enough to fill the device, capped so very
// large tensors reuse threads instead of launching millions of blocks.
unsigned int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65536));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Per-element keep factors for VEC consecutive columns starting at col (col % VEC == 0).
template <typename acc, int VEC>
__device__ __forceinline__ void keep_factors(const DropoutKey& key, acc scale, int64_t row, int64_t col,
                                             acc (&f)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC; q += 4) {
      const Words4 words = dropout_words(key, row, (col + q) >> 2);
#pragma unroll
      for (int l = 0; l < 4; ++l) f[q + l] = dropout_keep(key, words.w[l]) ? scale : acc(0);
    }
  } else {
#pragma unroll
    for (int k = 0; k < VEC; ++k) f[k] = dropout_keep_at(key, row, col + k) ? scale : acc(0);
  }
}

template <typename in_t, typename out_t, int VEC, bool DROPOUT>
__global__ void fold_kernel(const in_t* __restrict__ x, out_t* __restrict__ s, int64_t rows, int64_t in,
                            int64_t r, DropoutKey key) {
  using acc = acc_t<in_t, out_t>;
  const acc scale = static_cast<acc>(key.scale);
  const int64_t groups = vec_groups(r, VEC);
  const int64_t total = rows * groups;
  for (int64_t flat = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; flat < total;
       flat += int64_t(gridDim.x) * blockDim.x) {
    const RowGroup rg = split_row_group(flat, groups);
    const int64_t j0 = rg.group * VEC;
    const in_t* xr = x + rg.row * in;
    acc sum[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) sum[k] = acc(0);
    // With VEC > 1, r and in are multiples of VEC, so a vector is either wholly inside the row
    // or wholly past its end.
#pragma unroll 4
    for (int64_t i0 = j0; i0 < in; i0 += r) {
      const Vec<in_t, VEC> v = *reinterpret_cast<const Vec<in_t, VEC>*>(xr + i0);
      if constexpr (DROPOUT) {
        acc f[VEC];
        keep_factors<acc, VEC>(key, scale, rg.row, i0, f);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] += static_cast<acc>(v.v[k]) * f[k];
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum[k] += static_cast<acc>(v.v[k]);
      }
    }
    out_t* sr = s + rg.row * r + j0;
#pragma unroll
    for (int k = 0; k < VEC; ++k) sr[k] = static_cast<out_t>(sum[k]);
  }
}

template <typename out_t, typename src_t, int VEC, bool DROPOUT>
__global__ void tile_add_kernel(out_t* __restrict__ out, const src_t* __restrict__ src, int64_t rows, int64_t cols,
                                int64_t period_rows, int64_t q, double alpha_d, DropoutKey key) {
  using acc = acc_t<out_t, src_t>;
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

// at::Half / at::BFloat16 convert to and from float on the device, so kernels use them directly.
template <typename in_t, typename out_t>
void launch_fold(const at::Tensor& x, at::Tensor& s, const DropoutKey& key, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(in_t);
  const int64_t rows = x.size(0), in = x.size(1), r = s.size(1);
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* sp = s.mutable_data_ptr<out_t>();
  const bool vec = r % kVec == 0 && in % kVec == 0 && aligned16(xp);
  const bool dropout = key.threshold != 0;
  const int64_t total = rows * (vec ? r / kVec : r);
  const unsigned int grid = grid_for(total);
  if (vec) {
    if (dropout) fold_kernel<in_t, out_t, kVec, true><<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, key);
    else fold_kernel<in_t, out_t, kVec, false><<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, key);
  } else {
    if (dropout) fold_kernel<in_t, out_t, 1, true><<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, key);
    else fold_kernel<in_t, out_t, 1, false><<<grid, kThreads, 0, stream>>>(xp, sp, rows, in, r, key);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename out_t, typename src_t>
void launch_tile_add(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutKey& key,
                     cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(out_t);
  const int64_t rows = out.size(0), cols = out.size(1), period_rows = src.size(0), q = src.size(1);
  out_t* op = out.mutable_data_ptr<out_t>();
  const src_t* sp = src.const_data_ptr<src_t>();
  const bool vec = cols % kVec == 0 && aligned16(op);
  const bool dropout = key.threshold != 0;
  const int64_t total = rows * (vec ? cols / kVec : cols);
  const unsigned int grid = grid_for(total);
  if (vec) {
    if (dropout)
      tile_add_kernel<out_t, src_t, kVec, true><<<grid, kThreads, 0, stream>>>(op, sp, rows, cols, period_rows, q, alpha, key);
    else
      tile_add_kernel<out_t, src_t, kVec, false><<<grid, kThreads, 0, stream>>>(op, sp, rows, cols, period_rows, q, alpha, key);
  } else {
    if (dropout)
      tile_add_kernel<out_t, src_t, 1, true><<<grid, kThreads, 0, stream>>>(op, sp, rows, cols, period_rows, q, alpha, key);
    else
      tile_add_kernel<out_t, src_t, 1, false><<<grid, kThreads, 0, stream>>>(op, sp, rows, cols, period_rows, q, alpha, key);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void fold_kernel_cuda(const at::Tensor& x, at::Tensor& s, const DropoutKey& key) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_fold_cuda", [&] {
    if (s.scalar_type() == x.scalar_type()) launch_fold<scalar_t, scalar_t>(x, s, key, stream);
    else launch_fold<scalar_t, float>(x, s, key, stream);
  });
}

void tile_add_kernel_cuda(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutKey& key) {
  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "miss_tile_add_cuda", [&] {
    if (src.scalar_type() == out.scalar_type()) launch_tile_add<scalar_t, scalar_t>(out, src, alpha, key, stream);
    else launch_tile_add<scalar_t, float>(out, src, alpha, key, stream);
  });
}

}  // namespace miss_ext
