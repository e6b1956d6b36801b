// CUDA kernel of miss::split_bf16 (kernels.h): one pass over t, each element split once
// (common/bf16_parts.h) and its parts written to every output block that holds them. It replaces
// the seven ATen launches per operand (mask, cast, subtract, per part, then a cat) that the split
// products of a bf16 layer used to cost (issue 11: dozens of small launches per layer step). A
// thread takes 4 consecutive float32 (one 16-byte load) and writes 4 bf16 (8 bytes) per block, or
// one element where sizes or alignment forbid vectors. Grid-stride, int64 indexing, current
// stream under a device guard, no host synchronisation.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/shard_index.h"
#include "../kernels.h"
#include "kernel_helpers.cuh"

namespace miss_ext {
namespace {

template <int PARTS, int VEC>
__global__ void split_bf16_kernel(const float* __restrict__ t, c10::BFloat16* __restrict__ out, int64_t rows,
                                  int64_t cols, Bf16PartOrder order, Bf16PartLayout layout) {
  const int64_t groups = vec_groups(cols, VEC);
  const int64_t total = rows * groups;
  for (int64_t flat = grid_first(); flat < total; flat += grid_stride()) {
    const RowGroup rg = split_row_group(flat, groups);
    const int64_t col = rg.group * VEC;
    const Vec<float, VEC> v = *reinterpret_cast<const Vec<float, VEC>*>(t + rg.row * cols + col);
    Vec<c10::BFloat16, VEC> part[PARTS];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const Bf16Parts<PARTS> split(v.v[k]);
#pragma unroll
      for (int i = 0; i < PARTS; ++i) part[i].v[k] = split.p[i];
    }
    // Unrolled with compile-time indices and selects, so order and the parts stay in registers.
#pragma unroll
    for (int b = 0; b < kMaxBf16PartBlocks; ++b) {
      if (b < order.count) {
        const int which = order.part[b];
        Vec<c10::BFloat16, VEC> w = part[0];
#pragma unroll
        for (int i = 1; i < PARTS; ++i) w = which == i ? part[i] : w;
        *reinterpret_cast<Vec<c10::BFloat16, VEC>*>(out + layout.at(b, rg.row, col)) = w;
      }
    }
  }
}

template <int PARTS>
void launch_split(const at::Tensor& t, at::Tensor& out, const Bf16PartOrder& order, const Bf16PartLayout& layout,
                  cudaStream_t stream) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const float* src = t.const_data_ptr<float>();
  c10::BFloat16* dst = out.mutable_data_ptr<c10::BFloat16>();
  // Vectors: every row of t starts on 16 bytes and holds whole vectors; then every output row and
  // block starts on a multiple of 4 bf16 (8 bytes) of an allocation's start.
  const bool vec = rows_vectorizable(src, cols) && reinterpret_cast<uintptr_t>(dst) % 8 == 0;
  const unsigned int grid = grid_for(rows * (vec ? cols / 4 : cols));
  if (vec) {
    split_bf16_kernel<PARTS, 4><<<grid, kThreads, 0, stream>>>(src, dst, rows, cols, order, layout);
  } else {
    split_bf16_kernel<PARTS, 1><<<grid, kThreads, 0, stream>>>(src, dst, rows, cols, order, layout);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void split_bf16_kernel_cuda(const at::Tensor& t, at::Tensor& out, int64_t parts, const Bf16PartOrder& order,
                            int64_t dim) {
  const c10::cuda::CUDAGuard guard(t.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
  const Bf16PartLayout layout = Bf16PartLayout::of(t.size(0), t.size(1), order.count, dim);
  switch (parts) {
    case 1: launch_split<1>(t, out, order, layout, stream); break;
    case 2: launch_split<2>(t, out, order, layout, stream); break;
    default: launch_split<3>(t, out, order, layout, stream); break;
  }
}

}  // namespace miss_ext
