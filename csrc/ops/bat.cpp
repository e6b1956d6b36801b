#include "bat.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/eye.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/linalg_matrix_norm.h>
#include <ATen/ops/linalg_solve.h>
#include <ATen/ops/linalg_svdvals.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/logical_not.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common/bat_index.h"
#include "common/checks.h"
#include "common/sym_shape.h"
#include "fold.h"
#include "impl_choice.h"
#include "split_gemm.h"

namespace miss_ext {
namespace ops {

at::Tensor bat_transform(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                         std::optional<at::ScalarType> dtype, bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bat_transform", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         std::optional<at::ScalarType>, bool)>();
  return op.call(w, m, p, dtype, residual);
}

void bat_transform_(at::Tensor& w, const at::Tensor& m, const at::Tensor& p, bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bat_transform_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&, bool)>();
  op.call(w, m, p, residual);
}

at::Tensor bat_weight(const at::Tensor& weight, const at::Tensor& block, std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bat_weight", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, std::optional<at::ScalarType>)>();
  return op.call(weight, block, dtype);
}

at::Tensor bat_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& block, std::optional<at::ScalarType> compute_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::bat_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, std::optional<at::ScalarType>)>();
  return op.call(x, weight, bias, block, compute_dtype);
}

}  // namespace ops

namespace {

// Row blocks per chunk of G' in the backward. Chunks bound the G' temporary (it is reduced to
// dB chunk by chunk), but a GEMM with few output rows runs slower: on the CPU (MKL, 2 threads,
// T=4096, 2048 x 2048) 128-row chunks took 1.7x the time of one full GEMM and 1024-row chunks
// about 1.03x. So up to 16 MiB of float32 per chunk on the CPU (one chunk for a 2048 x 2048
// layer), 64 MiB elsewhere.
int64_t blocks_per_chunk(const at::Tensor& x, int64_t r, int64_t in) {
  const int64_t budget = x.device().is_cpu() ? (int64_t{1} << 22) : (int64_t{1} << 24);
  return std::max<int64_t>(1, budget / std::max<int64_t>(r * in, 1));
}

// The hand-written backend kernel or the batched GEMM (bat_gemm.cpp). Under "auto" the GEMM on
// CUDA for a new W' (bat_weight, forward and backward), where issue 11 measured the kernel at 0.04
// of copy bandwidth and the GEMM 1.5x faster; the kernel for the in-place merge and unmerge, whose
// fp32 round trip it keeps exact where a GEMM would follow torch's TF32 setting; the kernel on
// the CPU, where the two are close (the kernel 8% faster on an AVX-512 CPU, the GEMM 0-17% on an
// AVX2 one: bench/RESULTS.md) and the kernel needs no W-sized product temporary.
BatKernel pick_bat_kernel(BatKernel backend_kernel, const at::Tensor& w, bool in_place) {
  const int picked = bat_transform_choice();
  const bool gemm = picked == choice::kAuto ? w.is_cuda() && !in_place : picked == choice::kGemm;
  return gemm ? &bat_kernel_gemm : backend_kernel;
}

}  // namespace

at::ScalarType bat_compute_dtype(const at::Tensor& weight, const at::Tensor& block) {
  return weight.scalar_type() == at::kDouble || block.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor bat_transform_with(BatKernel kernel, const at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                              std::optional<at::ScalarType> dtype, bool residual) {
  check_bat_transform_args(w, m, p);
  check_out_dtype("bat_transform dtype", dtype);
  const at::ScalarType out_dtype = dtype.value_or(w.scalar_type());
  // Kernels write w's dtype or the compute dtype (kernels.h); anything else is one cast after.
  const bool native = out_dtype == w.scalar_type() || out_dtype == m.scalar_type();
  const at::Tensor w2 = w.contiguous();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(native ? out_dtype : m.scalar_type()));
  if (w.numel() > 0) pick_bat_kernel(kernel, w, /*in_place=*/false)(w2, out, m.contiguous(), p.contiguous(), residual);
  return native ? out : out.to(out_dtype);
}

void bat_transform_inplace_with(BatKernel kernel, at::Tensor& w, const at::Tensor& m, const at::Tensor& p,
                                bool residual) {
  check_bat_transform_args(w, m, p);
  check_no_overlap("bat_transform_", w, "w", m, "m");
  check_no_overlap("bat_transform_", w, "w", p, "p");
  check_writable("bat_transform_", w, "w");
  if (w.numel() == 0) return;
  kernel = pick_bat_kernel(kernel, w, /*in_place=*/true);
  if (w.is_contiguous()) {
    kernel(w, w, m.contiguous(), p.contiguous(), residual);
  } else {
    at::Tensor w2 = w.contiguous();
    kernel(w2, w2, m.contiguous(), p.contiguous(), residual);
    w.copy_(w2);
  }
}

double bat_max_condition(at::ScalarType weight_dtype) {
  double unit_roundoff = 0x1p-24;  // float32, and what a weight of another dtype is checked as
  switch (weight_dtype) {
    case at::kDouble: unit_roundoff = 0x1p-53; break;
    case at::kHalf: unit_roundoff = 0x1p-11; break;
    case at::kBFloat16: unit_roundoff = 0x1p-8; break;
    default: break;
  }
  return std::min(kBatMaxCondition, 0x1p-4 / unit_roundoff);
}

BatAffine bat_affine(const at::Tensor& block, bool reverse, at::ScalarType dtype, at::ScalarType weight_dtype) {
  const int64_t r = static_size(block, 1);
  if (!reverse) {  // the forward path (every bat forward and backward): no float64 detour
    const at::Tensor b = block.to(dtype);
    return {b, b, /*residual=*/true};
  }
  const at::Tensor b64 = block.to(at::kDouble);
  const at::Tensor eye = at::eye(r, b64.options());
  const at::Tensor a = b64.add(eye);  // I + B_i, batched
  // Before anything is computed from it: every I + B_i must be finite and safely invertible.
  // This reads values on the host (a sync), which unmerge can afford.
  const at::Tensor finite = at::isfinite(b64).flatten(1).all(1);
  if (!finite.all().item<bool>()) {
    const int64_t index = at::logical_not(finite).nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "miss: cannot unmerge the bat adapter: miss_block[", index,
                      "] holds non-finite values. The weight was left unchanged.");
  }
  // The restored W_ij = (W'_ij - B_i)(I + B_i)^-1 carries W'_ij's rounding times ||(I + B_i)^-1||,
  // and W' = W (I + B) + B: its error is about eps * (cond(I + B_i) |W_ij| + ||B_i|| ||(I + B_i)^-1||).
  // Both factors are bounded. The condition number alone passed B_i = (t - 1) I (I + B_i = t I,
  // cond 1), whose unmerge amplifies the rounding of W' ~ B_i by 1/t (t = 2^-20: off by 0.08 on a
  // weight of scale 0.35; a review, 2026-12-05).
  const at::Tensor sv = at::linalg_svdvals(a);  // (n, r), descending
  const at::Tensor smallest = sv.select(1, r - 1);
  const at::Tensor cond = sv.select(1, 0).div(smallest);
  const at::Tensor shift = at::linalg_matrix_norm(b64, 2, {-2, -1}).div(smallest);  // ||B_i|| ||(I + B_i)^-1||
  // Refused where a factor exceeds the bound or is inf / nan: one host read when both hold.
  const double limit = bat_max_condition(weight_dtype);
  const at::Tensor cond_bad = at::logical_not(cond.le(limit));
  const at::Tensor shift_bad = at::logical_not(shift.le(limit));
  if (at::logical_or(cond_bad, shift_bad).any().item<bool>()) {
    const auto shown = [](const at::Tensor& factor, int64_t index) {
      const double value = factor[index].item<double>();
      return std::isfinite(value) ? std::to_string(value) : std::string("inf: singular");
    };
    if (cond_bad.any().item<bool>()) {
      const int64_t index = cond_bad.nonzero()[0][0].item<int64_t>();
      TORCH_CHECK_VALUE(false, "miss: cannot unmerge the bat adapter: I + miss_block[", index,
                        "] is singular or ill-conditioned (condition number ", shown(cond, index), " > ", limit,
                        " for a ", weight_dtype, " weight), so W = (W' - B)(I + B)^-1 would not restore the weight. "
                        "The weight was left unchanged.");
    }
    const int64_t index = shift_bad.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK_VALUE(false, "miss: cannot unmerge the bat adapter: miss_block[", index,
                      "] is too close to -I (||B|| * ||(I + B)^-1|| = ", shown(shift, index), " > ", limit,
                      " for a ", weight_dtype, " weight), so W = (W' - B)(I + B)^-1 would magnify the merged "
                      "weight's rounding by that much. The weight was left unchanged.");
  }
  const at::Tensor inv = at::linalg_solve(a, eye.expand_as(a));
  return {inv.to(dtype), at::neg(at::bmm(b64, inv)).to(dtype), /*residual=*/false};
}

at::Tensor bat_weight_kernel(const at::Tensor& weight, const at::Tensor& block, std::optional<at::ScalarType> dtype) {
  check_bat_args(weight, block);
  check_out_dtype("bat_weight dtype", dtype);
  // Accumulated in float64 also where only the output is asked for in float64 (compute_dtype=
  // float64 of bat_linear beside float32 inputs): W' to float64 accuracy, not float32's.
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : bat_compute_dtype(weight, block);
  const BatAffine mp = bat_affine(block, /*reverse=*/false, acc, weight.scalar_type());
  return ops::bat_transform(weight, mp.m, mp.p, dtype.value_or(block.scalar_type()), mp.residual);
}

void bat_merge_inplace(at::Tensor& weight, const at::Tensor& block, bool reverse) {
  check_bat_args(weight, block);
  // Everything that can fail (the conditioning check) happens before the weight is touched.
  // The unmerge with M and P in float64 for any weight, one rounding to the weight's dtype: it
  // computes W' (I + B)^-1 - B (I + B)^-1, two terms that cancel, and with M and P rounded to
  // float32 first a float32 unmerge was 1.6-2.7x PEFT's error (PEFT subtracts B first) where the
  // block is large against W (block 0.15-0.2, W at nn.Linear's scale 1/16; 2026-12-02). It costs
  // about 5x the float32 transform on the CPU (55 ms against 7-13 ms at 2048 x 2048, r = 64,
  // 2 cores), and unmerges are rare. The merge keeps float32: in the residual form (bat_index.h)
  // its error is PEFT's, so a whole model's merge stays fast. Where float64 M does not
  // fit the CUDA kernel's shared memory (common/bat_index.h) but float32 does, float32 M: an
  // unmerge of what merge accepted is never refused for its r.
  const bool fits_float64 =
      !weight.is_cuda() || static_size(block, 1) * static_cast<int64_t>(sizeof(double)) <= kBatSharedMemoryBytes;
  const BatAffine mp =
      bat_affine(block, reverse, reverse && fits_float64 ? at::kDouble : bat_compute_dtype(weight, block),
                 weight.scalar_type());
  ops::bat_transform_(weight, mp.m, mp.p, mp.residual);
}

at::Tensor bat_linear_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& block, std::optional<at::ScalarType> compute_dtype) {
  check_bat_linear_args(x, weight, bias, block, compute_dtype);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // PEFT's precision: W' is built in (and the GEMM runs in) bat_linear_dtype, x and bias are
  // cast to it, and the result is cast back to x's dtype.
  const at::ScalarType cd = bat_linear_dtype(weight, block, compute_dtype);
  const at::Tensor wprime = ops::bat_weight(weight, block, cd);
  const at::Tensor x2 = x.reshape_symint({sym_leading_rows(x), weight.sym_size(1)});
  std::optional<at::Tensor> b;
  if (bias.has_value() && bias->defined()) b = bias->to(cd);
  at::Tensor y;
  if (use_split_gemm(x, cd, x.is_cuda())) {
    // A bf16 layer at PEFT's fp32 precision: x is exact in bf16, so x W'^T runs on bf16 tensor
    // cores with W' split into parts (split_gemm.h), as accurate as the fp32 GEMM (issue 11).
    y = mm_split_right(x2, wprime.t());
    if (b) y.add_(*b);
  } else {
    y = at::linear(x2.to(cd), wprime, b);
  }
  return y.to(x.scalar_type()).view_symint(with_last(x, weight.sym_size(0)));
}

namespace {

// The contraction chunk of bat_block_grad on the CPU: max(32, r) terms, so the temporary of
// partial products is at most the weight's size. Measured at r = 8 (2026-12-05, 1 thread, worst
// of 4 seeds, error against PEFT's / time against one GEMM at 4096 x 4096): chunks of 16 give
// 1.21x / 2.7x, 32 1.34x / 1.3x, 64 1.55x / 1.0x, one GEMM 10x / 1x. CUDA keeps one GEMM (its
// precision against PEFT is on the GPU waiting list, tests/GPU.md). 0: one GEMM.
int64_t bat_grad_chunk(int64_t in, int64_t r, bool cpu) {
  const int64_t chunk = std::max<int64_t>(32, r);
  return cpu && in > chunk ? chunk : 0;
}

}  // namespace

at::Tensor bat_block_grad(const at::Tensor& grad_wprime, const at::Tensor& weight, const at::Tensor& block) {
  const int64_t r = static_size(block, 1);
  const int64_t blocks = static_size(block, 0);
  const int64_t in = static_size(weight, 1);
  const at::ScalarType bd = block.scalar_type();
  const int64_t chunk = bat_grad_chunk(in, r, weight.is_cpu());
  // The dtype the gradient is summed in: the block's, but float32 for a half-precision block
  // summed in chunks (rounded per chunk, the partial products were 1.2-1.7x one GEMM's error,
  // which accumulates in float32; a review), rounded once at the end.
  const at::ScalarType acc = chunk != 0 && (bd == at::kHalf || bd == at::kBFloat16) ? at::kFloat : bd;
  // sum_j G'_ij (the "+ I" part), folded over column blocks in one pass ...
  const at::Tensor gsum = ops::fold(grad_wprime, r, 0.0, std::nullopt, acc).view({blocks, r, r});
  // ... plus sum_j W_ij^T G'_ij as one batched GEMM over the (row, column-block) pairs of a block:
  // a contraction of length in.
  const at::Tensor wt = weight.to(acc).reshape({blocks, in, r});
  const at::Tensor gt = grad_wprime.to(acc).reshape({blocks, in, r});
  if (chunk == 0) return at::baddbmm(gsum, wt.transpose(1, 2), gt);
  // The CPU's GEMM sums a long contraction into a small (r x r) output one term after another:
  // with r = 8 and in = 2048 the float32 dB was 5-10x PEFT's error, whose autograd sums r-long
  // tile products with torch.sum's cascade (a review, 2026-12-05). Chunks of max(32, r) terms,
  // their (r x r) partial products summed by at::sum, give PEFT's error (a (blocks, in/chunk, r,
  // r) temporary, out * in * r / chunk elements); the last in % chunk terms are one more GEMM.
  // Fixed chunks, not a divisor of in: a divisor as small as r made some widths 4-7x slower.
  const int64_t count = in / chunk, whole = count * chunk;
  const at::Tensor parts = at::matmul(wt.narrow(1, 0, whole).reshape({blocks, count, chunk, r}).transpose(2, 3),
                                      gt.narrow(1, 0, whole).reshape({blocks, count, chunk, r}));
  at::Tensor summed = gsum.add(parts.sum(1));
  if (whole < in) {
    summed = at::baddbmm(summed, wt.narrow(1, whole, in - whole).transpose(1, 2), gt.narrow(1, whole, in - whole));
  }
  return summed.to(bd);
}

at::Tensor bat_weight_grad(const at::Tensor& grad_wprime, const at::Tensor& weight, const at::Tensor& block) {
  const at::ScalarType ct = bat_compute_dtype(weight, block);
  const at::Tensor b = block.to(ct);  // B_i, (out/r, r, r)
  // G' + G' B^T: the residual form (common/bat_index.h), G' added after the product is summed.
  if (at::GradMode::is_enabled()) {
    // Being recorded (create_graph=True): the same with differentiable ATen ops, as
    // bat_transform has no derivative. dW[i, a, j, b] = G'[i, a, j, b] + sum_c G'[i, a, j, c] B_i[b, c].
    const int64_t r = static_size(block, 1);
    const at::Tensor g = grad_wprime.to(ct).reshape_symint({block.sym_size(0), r, weight.sym_size(1) / r, r});
    return at::einsum("iajc,ibc->iajb", {g, b}).add(g).reshape_symint(weight.sym_sizes()).to(weight.scalar_type());
  }
  const at::Tensor m = b.transpose(1, 2).contiguous();  // B_i^T
  return ops::bat_transform(grad_wprime, m, at::zeros_like(m), weight.scalar_type(), /*residual=*/true);
}

BatLinearGrads bat_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, at::ScalarType x_dtype,
                                   const at::Tensor& weight, at::ScalarType bias_dtype, const at::Tensor& block,
                                   std::optional<at::ScalarType> compute_dtype, BatNeeds needs) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  BatLinearGrads grads;
  const at::ScalarType cd = bat_linear_dtype(weight, block, compute_dtype);
  const c10::SymInt rows = sym_leading_rows(grad_y);
  // bf16 data at an fp32 compute dtype (PEFT's precision): G and x are exact in bf16, so every
  // product below runs on bf16 tensor cores at fp32 accuracy (split_gemm.h). Not when the
  // backward is recorded (create_graph=True): those products have no derivative.
  const bool split = !at::GradMode::is_enabled() && use_split_gemm(grad_y, cd, grad_y.is_cuda());
  // Dense once (an expanded gradient would be copied by each GEMM below; see linear_backward).
  const at::Tensor g = grad_y.reshape_symint({rows, weight.sym_size(0)}).to(split ? grad_y.scalar_type() : cd).contiguous();
  if (needs[0]) {
    const at::Tensor wprime = ops::bat_weight(weight, block, cd);  // rebuilt, not saved
    const at::Tensor gx = split ? mm_split_right(g, wprime) : at::mm(g, wprime);
    grads.x = gx.to(x_dtype).view_symint(with_last(grad_y, weight.sym_size(1)));
  }
  if (needs[2]) grads.bias = at::sum(g, {0}, false, cd).to(bias_dtype);
  if (needs[1] || needs[3]) {
    const int64_t r = static_size(block, 1), blocks = static_size(block, 0), in = static_size(weight, 1);
    const at::Tensor x2 = x.reshape_symint({rows, weight.sym_size(1)}).to(split ? x.scalar_type() : cd);
    const int64_t step = blocks_per_chunk(x, r, in);
    std::vector<at::Tensor> block_parts, weight_parts;
    for (int64_t i0 = 0; i0 < blocks; i0 += step) {
      const int64_t n = std::min(step, blocks - i0);
      // G' for row blocks [i0, i0 + n): (n*r, in), reduced right away.
      const at::Tensor gt = g.narrow(1, i0 * r, n * r).t();
      const at::Tensor gp = split ? mm_bf16_float(gt, x2) : at::mm(gt, x2);
      const at::Tensor w_part = weight.narrow(0, i0 * r, n * r);
      const at::Tensor b_part = block.narrow(0, i0, n);
      if (needs[3]) block_parts.push_back(bat_block_grad(gp, w_part, b_part));
      if (needs[1]) weight_parts.push_back(bat_weight_grad(gp, w_part, b_part));
    }
    // No row block (out_features = 0): the loop ran no chunk, and the gradients are empty.
    if (needs[3]) {
      grads.block = block_parts.empty() ? at::zeros_like(block)
                                        : block_parts.size() == 1 ? block_parts[0] : at::cat(block_parts);
    }
    if (needs[1]) {
      grads.weight = weight_parts.empty() ? at::zeros_like(weight)
                                          : weight_parts.size() == 1 ? weight_parts[0] : at::cat(weight_parts);
    }
  }
  return grads;
}

}  // namespace miss_ext
