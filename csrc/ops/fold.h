// miss::fold and miss::tile_add_: the shard sum and its adjoint.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels.h"

namespace miss_ext {
namespace ops {

// A fresh dropout key for the miss ops: int64 [seed, offset], shape (2,), on `device` (that of the
// data it will mask), drawn with at::randint from the device's default generator (so
// torch::manual_seed reproduces it, and a CUDA graph replay draws a new one). The C++ twin of
// miss_ext.new_dropout_key.
at::Tensor new_dropout_key(const at::Device& device = at::kCPU);

// C++ API: calls through the dispatcher, so autograd, tracing and every backend apply.
// `key`: from new_dropout_key(x.device()); needed when p > 0.
at::Tensor fold(const at::Tensor& x, int64_t r, double p = 0.0,
                const std::optional<at::Tensor>& key = std::nullopt,
                std::optional<at::ScalarType> dtype = std::nullopt);
void tile_add_(at::Tensor& out, const at::Tensor& src, double alpha = 1.0, double p = 0.0,
               const std::optional<at::Tensor>& key = std::nullopt);
at::Tensor tile_add(const at::Tensor& out, const at::Tensor& src, double alpha = 1.0, double p = 0.0,
                    const std::optional<at::Tensor>& key = std::nullopt);

}  // namespace ops

// The functional tile_add, device-generic: a contiguous copy of out, then miss::tile_add_ on it.
at::Tensor tile_add_functional_kernel(const at::Tensor& out, const at::Tensor& src, double alpha, double p,
                           const std::optional<at::Tensor>& key);

// The adjoint of tile_add in src: dL/dsrc from dL/dout (grad, out's shape), in `dtype`. Per-row
// tiling: fold(grad, Q, p, key); matrices (src rows tile out rows): that, then folded along rows
// with period P. Built from miss::fold, so it is differentiable again.
at::Tensor tile_add_src_grad(const at::Tensor& grad, c10::SymIntArrayRef src_sizes, at::ScalarType src_dtype,
                             double alpha, double p, const std::optional<at::Tensor>& key);

// Backend wrappers: validate, flatten to 2-D, allocate, then run `kernel`. Registered at the CPU
// and CUDA keys with that backend's kernel.
at::Tensor fold_with(FoldKernel kernel, const at::Tensor& x, int64_t r, double p,
                     const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype);
void tile_add_with(TileAddKernel kernel, at::Tensor& out, const at::Tensor& src, double alpha, double p,
                   const std::optional<at::Tensor>& key);

// The dtype a fold kernel writes for a requested output dtype (kernels write the input's dtype or
// float32): `out` itself when native, else float32 (float64 for float64 input), cast to `out`
// afterwards, so the sum is rounded once and the cast only touches the small (rows, r) result.
at::ScalarType fold_kernel_dtype(at::ScalarType in, at::ScalarType out);

// What a fold kernel reads for a requested output dtype: x itself, or x widened to float64 when
// float64 is asked of a narrower x, so that the sum runs in float64 (a float32 sum widened
// afterwards would carry float32's rounding into a float64 result). Costs one float64 copy of x,
// only for that request.
at::Tensor fold_source(const at::Tensor& x, at::ScalarType out);

// Product of all sizes but the last: the number of rows a kernel sees.
int64_t leading_rows(const at::Tensor& t);

}  // namespace miss_ext
