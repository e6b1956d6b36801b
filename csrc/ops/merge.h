// miss::merge / miss::merge_, for every mode:
//   default/mini (2-D block): W <- W + dW (reverse: minus), dW[o, i] = block[i mod r, o mod mini_r];
//     columns past a multiple of r get the first in mod r block rows, r > in uses rows < in.
//   bat (3-D block): W <- W(I + B) + B per r x r tile; reverse inverts it exactly (bat.h).
#pragma once

#include <ATen/core/Tensor.h>

namespace miss_ext {
namespace ops {

at::Tensor merge(const at::Tensor& weight, const at::Tensor& block, bool reverse = false);
void merge_(at::Tensor& weight, const at::Tensor& block, bool reverse = false);

}  // namespace ops

// Backend kernels registered at CPU and CUDA; both run miss::tile_add_ on the weight.
at::Tensor merge_kernel(const at::Tensor& weight, const at::Tensor& block, bool reverse);
void merge_inplace_kernel(at::Tensor& weight, const at::Tensor& block, bool reverse);

// Gradient of the default/mini merge w.r.t. its (r, mini_r) block of dtype block_dtype, from the
// merged weight's gradient: folded along in (period r) and out (period mini_r), negated for
// reverse. It needs only the block's shape and dtype, so the autograd saves no tensor for it (the
// weight's gradient is the identity). Bat's gradients need W and B: bat.h.
at::Tensor merge_block_grad(const at::Tensor& grad_weight, int64_t r, int64_t mini_r, at::ScalarType block_dtype,
                            bool reverse);

}  // namespace miss_ext
