// CUDA kernels of miss::bank_fold and its adjoint (common/bank_index.h has the per-row key).
//
// - bank_fold_kernel: one block per row (grid-stride). For a row of rank r < the block size, the
//   block's threads form C = blockDim / r chunks of r consecutive threads; thread (c, j) sums the
//   row's columns j + m r for m = c, c + C, ..., so a chunk reads r consecutive elements and the
//   block C r of them at a time (coalesced). The C partial sums of each j are then added in chunk
//   order from shared memory: a fixed order, so results are deterministic. For r >= the block
//   size each thread sums its own columns j whole.
// - bank_unfold_kernel: one thread per element of grad_x (grid-stride), grad_x[t, i] = the row's
//   dropout factor times grad_s[t, i mod r].
// Invalid index, ranks or dropouts values trip device-side assertions (reading them on the host
// would synchronise). Scalar loads: the bank path is not yet tuned (bench/RESULTS.md has no GPU
// figure for it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <type_traits>

#include "../common/bank_index.h"
#include "../common/shard_index.h"
#include "../kernels.h"

namespace miss_ext {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;

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

// Column i of row t of x, with the row's dropout factor.
template <typename acc, typename in_t>
__device__ inline acc masked(const in_t* xr, int64_t t, int64_t i, const DropoutKey& key, acc scale) {
  const acc v = static_cast<acc>(xr[i]);
  if (key.threshold == 0) return v;
  return dropout_keep_at(key, t, i) ? v * scale : acc(0);
}

template <typename in_t, typename out_t>
__global__ void bank_fold_kernel(const in_t* __restrict__ x, out_t* __restrict__ s, const int64_t* __restrict__ index,
                                 const int64_t* __restrict__ ranks, const double* __restrict__ dropouts,
                                 const int64_t* __restrict__ key, int64_t rows, int64_t in, int64_t R, int64_t slots) {
  using acc = acc_t<in_t, out_t>;
  extern __shared__ unsigned char shared[];
  acc* partial = reinterpret_cast<acc*>(shared);
  const int64_t tid = threadIdx.x, threads = blockDim.x;
  for (int64_t t = blockIdx.x; t < rows; t += gridDim.x) {
    out_t* sr = s + t * R;
    int64_t r = 0;
    const int64_t a = checked_slot(index, ranks, dropouts, key, t, slots, R, &r);  // the same for the whole block
    if (a >= 0) {
      const DropoutKey row_key = bank_row_key(key, dropouts, a);
      const acc scale = static_cast<acc>(row_key.scale);
      const in_t* xr = x + t * in;
      if (r >= threads) {
        for (int64_t j = tid; j < r; j += threads) {
          acc sum = acc(0);
          for (int64_t i = j; i < in; i += r) sum += masked<acc>(xr, t, i, row_key, scale);
          sr[j] = static_cast<out_t>(sum);
        }
      } else {
        const int64_t chunks = threads / r, c = tid / r, j = tid % r;
        acc sum = acc(0);
        if (c < chunks)
          for (int64_t i = c * r + j; i < in; i += chunks * r) sum += masked<acc>(xr, t, i, row_key, scale);
        partial[tid] = sum;
        __syncthreads();
        if (tid < r) {
          acc total = acc(0);
          for (int64_t k = 0; k < chunks; ++k) total += partial[k * r + tid];
          sr[tid] = static_cast<out_t>(total);
        }
        __syncthreads();  // partial is the next row's
      }
    }
    for (int64_t k = (a >= 0 ? r : 0) + tid; k < R; k += threads) sr[k] = out_t(0);
  }
}

template <typename g_t, typename x_t>
__global__ void bank_unfold_kernel(const g_t* __restrict__ grad_s, x_t* __restrict__ grad_x,
                                   const int64_t* __restrict__ index, const int64_t* __restrict__ ranks,
                                   const double* __restrict__ dropouts, const int64_t* __restrict__ key, int64_t rows,
                                   int64_t in, int64_t R, int64_t slots) {
  using acc = acc_t<g_t, x_t>;
  const int64_t total = rows * in;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = e / in, i = e - t * in;
    int64_t r = 0;
    const int64_t a = checked_slot(index, ranks, dropouts, key, t, slots, R, &r);
    acc v = acc(0);
    if (a >= 0) {
      const DropoutKey row_key = bank_row_key(key, dropouts, a);
      v = static_cast<acc>(grad_s[t * R + i % r]);
      if (row_key.threshold != 0) v = dropout_keep_at(row_key, t, i) ? v * static_cast<acc>(row_key.scale) : acc(0);
    }
    grad_x[e] = static_cast<x_t>(v);
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
  const int64_t rows = x.size(0);
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(rows, kMaxBlocks)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "miss_bank_fold_cuda", [&] {
    const auto launch = [&](auto* out) {
      using out_t = std::remove_pointer_t<decltype(out)>;
      using acc = acc_t<scalar_t, out_t>;
      bank_fold_kernel<scalar_t, out_t><<<blocks, kThreads, kThreads * sizeof(acc), stream>>>(
          x.const_data_ptr<scalar_t>(), out, index.const_data_ptr<int64_t>(), ranks.const_data_ptr<int64_t>(),
          dropouts_ptr(dropouts), key, rows, x.size(1), s.size(1), ranks.size(0));
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
  const int64_t total = rows * in;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min((total + kThreads - 1) / kThreads, kMaxBlocks)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_x.scalar_type(), "miss_bank_fold_grad_cuda", [&] {
    const auto launch = [&](const auto* g) {
      using g_t = std::remove_cv_t<std::remove_pointer_t<decltype(g)>>;
      bank_unfold_kernel<g_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          g, grad_x.mutable_data_ptr<scalar_t>(), index.const_data_ptr<int64_t>(), ranks.const_data_ptr<int64_t>(),
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
