// fp32-accurate matrix products on bf16 tensor cores (issue 11). PEFT computes a bf16 layer's
// adapter in fp32 (its block is fp32): the products S @ D, S^T G, G D^T of default/mini, and the
// whole bat GEMM x W'^T with its gradients. Run as fp32 GEMMs these are SIMT (or TF32) and, for
// default mode, need fp32 (rows, out) temporaries.
//
// An fp32 matrix A splits into bf16 parts A = A_0 + A_1 + ...: A_0 is A with the low 16 bits of
// each value cleared (exact in bf16), A_1 the same of A - A_0, and so on; the last part is rounded
// to bf16. Each subtraction is exact in fp32, and each part carries the next 8 significant bits, so
// three parts hold all 24 bits of an fp32 value. The products of the parts are exact in the tensor
// cores and accumulate in fp32. Hence:
//   - bf16 G times an fp32 operand split into 3 parts is an fp32 GEMM (up to summation order);
//     with 2 parts the operand's relative error is below 2^-16;
//   - two fp32 operands (the forward y += S D): the products A_i B_j with i + j < parts are kept.
//     The dropped ones are below 2^-21 |A||B| for 3 parts and 2^-14 for 2 (|A_1| < 2^-7 |A|,
//     |A_2| < 2^-15 |A|), far below the rounding of the bf16 output (2^-9).
// The number of parts follows torch's fp32 matmul precision on CUDA, the setting a user changes
// for exactly this trade: "ieee" (set_float32_matmul_precision("highest"), the default) 3, as
// accurate as fp32; "tf32" ("high" or "medium") 2, better than TF32's 2^-11.
// Limits: an infinite value gives NaN where fp32 would give inf (inf - inf); a part below fp32's
// normal range (the third part of values below about 7.7e-34) may be flushed to zero by the
// tensor cores, an absolute error below 2^-126. y += a b is rounded once: up to 16 MiB of fp32
// output the product is written in fp32 and added by a separate add (an H200's cuBLAS rounded
// the product to bf16 before adding y in such shapes), above that in the GEMM's epilogue, with
// split-K partial sums reduced in fp32 whatever torch.backends.cuda.matmul.
// allow_bf16_reduced_precision_reduction says (split_gemm.cpp, add_product_, Fp32SplitKReduction);
// that the large GEMMs' epilogue rounds once is yet to be measured on a GPU.
//
// Every step is a dispatcher call, so torch.compile records it. The parts of an operand are cut by
// one kernel, miss::split_bf16 (common/bf16_parts.h; CPU and CUDA), which writes them straight
// into the layout the GEMM takes: seven ATen launches per operand before (mask, cast, subtract per
// part, a cat). Why (issue 11): on an H200 a default-mode layer step cost about 0.3 ms more than a
// frozen layer's whatever its out features (bench/RESULTS.md, 2026-12-04: 0.38 ms at 4096 -> 4096,
// 0.51 ms at 4096 -> 11008), which points at fixed costs such as dozens of small launches (to be
// confirmed by bench/profile_linear.py on a GPU).
// The GEMMs are ATen calls. On CUDA the bf16 GEMMs write fp32 directly (aten::mm.dtype); elsewhere
// the bf16 operands are widened to fp32 first: the same arithmetic (bf16 values are exact in
// fp32), which lets the CPU tests check this path.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "kernels.h"

namespace miss_ext {

// 3, or 2 when torch allows TF32 for fp32 matmuls on CUDA ("high", "medium", fp32_precision "tf32").
int split_parts();

// Whether fp32 products with bf16 data take this path: data bf16, the compute dtype fp32, and
// MISS_EXT_GEMM=split, or under "auto" the caller's rule (impl_choice.h). The caller must not be
// recording a backward (create_graph=True): the bf16-to-fp32 GEMM has no derivative.
bool use_split_gemm(const at::Tensor& data, at::ScalarType compute, bool auto_rule);

// y (rows, n), bf16, += a (rows, k) @ b (k, n), a and b fp32: the sum is formed in fp32 and
// rounded once to bf16 (by miss::split_addmm_: an fp32 product added apart, or the GEMM's
// epilogue for large y; split_gemm.cpp, add_product_). In place.
void addmm_split_(at::Tensor& y, const at::Tensor& a, const at::Tensor& b);
// The same sum as a new tensor (common/in_place.h: where an in-place update must not be made).
at::Tensor addmm_split(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b);

// bias + a (rows, k) @ b (k, n), a and b fp32 (bias bf16 or absent), as a new bf16 (rows, n)
// tensor rounded once: the adapter term that MISS_EXT_ADAPTER_TERM=before writes ahead of the base
// GEMM (linear.cpp). On CUDA one bf16 GEMM of the parts with a bf16 output (fp32 accumulation; as
// for any bf16 GEMM, cuBLAS may keep split-K partial sums in bf16 under torch's default
// allow_bf16_reduced_precision_reduction, which is not overridden here: an ATen call, so a
// compiled graph could not hold a guard around it). Elsewhere the widened parts, then one cast.
at::Tensor addmm_split_rounded(const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b);

// bf16 a (m, k) @ bf16 b (k, n), accumulated and returned in fp32: exact products, so as
// accurate as an fp32 GEMM of the same values.
at::Tensor mm_bf16_float(const at::Tensor& a, const at::Tensor& b);

// a (m, k) @ b (k, n) in fp32, where a is fp32 and b is bf16 (exact): a is split.
at::Tensor mm_split_left(const at::Tensor& a, const at::Tensor& b);

// a (m, k) @ b (k, n) in fp32, where a is bf16 (exact) and b is fp32: b is split. The parts are
// stacked along n (an fp32 (m, parts * n) product, summed) when n is small, else along k (a
// bf16 (m, parts * k) copy of a), whichever writes fewer bytes.
at::Tensor mm_split_right(const at::Tensor& a, const at::Tensor& b);

// The kernels of miss::split_addmm and miss::split_addmm_ (torch_bindings.cpp), every backend:
// y + a @ b of bf16 parts with one rounding.
at::Tensor split_addmm_kernel(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b);
void split_addmm_inplace_kernel(at::Tensor& y, const at::Tensor& a, const at::Tensor& b);

// The kernel of miss::split_bf16 for one backend: validates, allocates the bf16 output and calls
// `kernel` (kernels.h) on t made contiguous.
at::Tensor split_bf16_with(SplitBf16Kernel kernel, const at::Tensor& t, int64_t parts, at::IntArrayRef order,
                           int64_t dim);

namespace ops {
at::Tensor split_bf16(const at::Tensor& t, int64_t parts, at::IntArrayRef order, int64_t dim);
at::Tensor split_addmm(const at::Tensor& y, const at::Tensor& a, const at::Tensor& b);
void split_addmm_(at::Tensor& y, const at::Tensor& a, const at::Tensor& b);
}  // namespace ops

}  // namespace miss_ext
