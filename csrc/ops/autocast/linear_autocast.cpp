// Autocast for miss::linear and miss::bat_linear. Without it, autocast would reach the GEMMs inside the op and leave
// the autograd kernel with fp32 saved tensors and a bf16 gradient.
//
// Policy (as PEFT under autocast): the base branch (x, weight, bias) runs in the autocast dtype,
// and so does the adapter's S @ D: PEFT's `fold(x) @ miss_block` is a matmul, on autocast's
// lower-precision list, so its operands (S, computed in fp32 by a sum, and the fp32 block) are
// rounded to the autocast dtype and the product accumulates in fp32 (issue 11: match PEFT, and
// run on tensor cores). The fold reads x as given, never autocast's rounded copy (below). The block is cast here, above autograd, so its gradient flows back to the
// fp32 parameter; the output is cast back to x's dtype, as PEFT's `result.to(previous_dtype)`.
// Inside the op autocast is off.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include "../bat.h"
#include "../common/checks.h"
#include "../common/in_place.h"
#include "../common/sym_shape.h"
#include "../fold.h"
#include "../linear.h"

namespace miss_ext {
namespace {

template <c10::DeviceType device_type>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
  const at::Tensor x_c = at::autocast::cached_cast(dtype, x, device_type);
  const at::Tensor w_c = at::autocast::cached_cast(dtype, weight, device_type);
  // Autocast leaves float64 as it is: a float64 x with a float32 weight (or the reverse) cannot
  // meet. Said here with the user's dtypes; the op's own check would name the cast weight's.
  // (miss_ext/_functorch.py says the same under torch.func transforms.)
  TORCH_CHECK_TYPE(!x_c.is_floating_point() || !w_c.is_floating_point() || x_c.scalar_type() == w_c.scalar_type(),
                   "miss: under autocast(", dtype, ") x dtype ", x.scalar_type(), " and the base weight dtype ",
                   weight.scalar_type(), " differ after autocast's casts (it casts float32/float16/bfloat16 to ", dtype,
                   " and leaves float64 as it is); give x and the layer the same dtype (PEFT refuses this too)");
  const std::optional<at::Tensor> b_c = at::autocast::cached_cast(dtype, bias, device_type);
  const at::Tensor block_c = at::autocast::cached_cast(dtype, block, device_type);
  // Mini (a block narrower than out): PEFT repeats the float32 block along out before the autocast
  // matmul, so the repeat's backward sums the out / mini_r copies of the block gradient in float32.
  // The fused op on block_c returns that sum in the autocast dtype: rounded there, and past
  // float16's range (inf) where PEFT's float32 sum is finite (review, 2026-12-03: a gradient of
  // 204800 gave inf for a float16 x). Mini takes the composed path below for every x.
  // (A block or weight of another rank goes to the fused op, whose checks name it.)
  const bool mini = block.dim() == 2 && weight.dim() == 2 && block.sym_size(1) != weight.sym_size(0);
  if (!mini && (!x.is_floating_point() || x_c.scalar_type() == x.scalar_type())) {
    // x already in the autocast dtype (the output of an earlier autocast GEMM) or float64: folding
    // x_c is folding x. The fused op, whose fold sums in float32 and rounds S once.
    return ops::linear(x_c, w_c, b_c, block_c, p, key).to(x.scalar_type());
  }
  // x in another dtype (float32 activations: an fp32 model's residual stream), or mini. PEFT folds the x it
  // is given, in float32 (a sum is on none of autocast's lists), and only S is rounded to the
  // autocast dtype for `S @ D`. The fused op would fold x_c, values already rounded to bf16: x =
  // [1001, -1000] gave S = 0 instead of 1, and a zero block gradient. So here: the fold of x
  // itself, rounded once to the autocast dtype; the base GEMM on x_c; S @ D added in place with
  // one rounding (mini: D repeated along out and then cast, in PEFT's order, so that the repeat's
  // backward sums its copies in float32). Differentiable ops only, so autograd sums dx's two parts
  // in x's dtype, as PEFT's does.
  check_linear_args(x_c, w_c, b_c, block_c, p, key);
  const c10::SymInt rows = sym_leading_rows(x);
  const c10::SymInt& in = weight.sym_size(1);
  const c10::SymInt& out = weight.sym_size(0);
  // The adapter's dtype: the autocast dtype, or float64 for a float64 block (autocast leaves it,
  // and PEFT's term is then float64, added to the base output in float64).
  const at::ScalarType adapter = block_c.scalar_type();
  // (A float64 adapter folds x upcast first, as PEFT's x.to(block dtype): exact sums.)
  const at::Tensor x_f = adapter == at::kDouble ? x.to(at::kDouble) : x;
  const at::Tensor s = ops::fold(x_f.reshape_symint({rows, in}), static_size(block, 0), p, key, adapter);
  const int64_t repeats = block.sym_size(1) == out ? 1 : static_size(weight, 0) / static_size(block, 1);
  const at::Tensor d = repeats == 1 ? block_c : block.repeat({1, repeats}).to(adapter);
  at::Tensor y = at::linear(x_c.reshape_symint({rows, in}), w_c, b_c);
  // In place normally; functional where a dispatch mode or a torch.func transform sees each call
  // (common/in_place.h: selective activation checkpointing refused the in-place update here).
  const bool in_place = may_update_in_place();
  if (y.scalar_type() == adapter) {
    y = in_place ? y.addmm_(s, d) : at::addmm(y, s, d);
  } else {
    // A float64 base (autocast leaves it) beside a term in the autocast dtype, or the reverse:
    // the term in the adapter's dtype, added in the wider one (PEFT's `result + term`).
    const at::Tensor term = at::mm(s, d);
    y = y.to(c10::promoteTypes(y.scalar_type(), adapter));
    y = in_place ? y.add_(term) : at::add(y, term);
  }
  return y.view_symint(with_last(x, out)).to(x.scalar_type());
}

// Bat under autocast (as PEFT, whose F.linear autocasts): W' is still built from the fp32 block,
// but rounded to the autocast dtype, and the GEMM runs in that dtype. The op itself takes x, the
// weight and the bias in any floating dtypes and rounds each once to the compute dtype (PEFT casts
// x to W''s float32 dtype); casting x to the weight's dtype first, as an earlier version did,
// rounded an fp32 x to a bf16 weight's dtype and then to fp16 under fp16 autocast (6-9x PEFT's
// error). Autocast leaves float64 alone: where W' is float64 (the weight or the block is; PEFT casts
// x to W''s dtype, and its F.linear then runs in float64), the GEMM runs in float64 as without
// autocast, unless a compute dtype is asked for; a float64 x beside a float32 W' is cast to the
// autocast dtype, as PEFT's x.to(W'.dtype) followed by autocast's cast. The output has x's dtype.
template <c10::DeviceType device_type>
at::Tensor bat_linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& block, std::optional<at::ScalarType> compute_dtype) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool float64 = bat_linear_dtype(weight, block, std::nullopt) == at::kDouble;
  const std::optional<at::ScalarType> cd =
      compute_dtype.has_value() || float64 ? compute_dtype
                                           : std::optional<at::ScalarType>(at::autocast::get_autocast_dtype(device_type));
  return ops::bat_linear(x, weight, bias, block, cd);
}

}  // namespace

TORCH_LIBRARY_IMPL(miss, AutocastCPU, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CPU>);
  m.impl("bat_linear", &bat_linear_autocast<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(miss, AutocastCUDA, m) {
  m.impl("linear", &linear_autocast<c10::DeviceType::CUDA>);
  m.impl("bat_linear", &bat_linear_autocast<c10::DeviceType::CUDA>);
}

}  // namespace miss_ext
