// The hand-written kernels, one pair per backend. They take contiguous 2-D tensors that the op
// wrappers (fold.cpp) have validated, shaped and allocated, so a kernel only computes.
//
// Dtype contract (enforced by the wrappers, so each kernel is instantiated for few pairs):
//   fold:     s.dtype is x.dtype or float32
//   tile_add: src.dtype is out.dtype or float32
//   bat:      m and p share one dtype, float32 or float64 (the compute type); w any floating
//             type; out has w's dtype or m's dtype; out may be w itself (in place)
// Accumulation is float32 for fp16/bf16/fp32 data and float64 when either side is float64.
// Dropout: `dropout.key` points to [seed, offset] in the data's memory; kernels read it there
// (load_dropout_key), so a CUDA kernel never needs the host to look at it.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/bf16_parts.h"
#include "common/dropout_mask.h"

namespace miss_ext {

// s (rows, r) = fold(dropout(x)) for x (rows, in).
using FoldKernel = void (*)(const at::Tensor& x, at::Tensor& s, const DropoutParams& dropout);
// out (rows, cols) += alpha * dropout(src[row mod P, col mod Q]) for src (P, Q).
using TileAddKernel = void (*)(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutParams& dropout);
// out (out, in) = bat transform of w (common/bat_index.h) with m, p of shape (out/r, r, r);
// residual: plus w, added after the sum (one rounding).
using BatKernel = void (*)(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p,
                           bool residual);

// bank_add: y (rows, out) += the bank term (torch_bindings.cpp) for s (rows, R), bank (N, r_cap,
// q_cap), ranks and periods (N,), index (rows,), all contiguous; s and bank share one dtype,
// float32 or y's. Kernels check the values of ranks, periods and index (the CPU kernel on the
// host; the CUDA kernel with device-side assertions); per_row_fold: s is bank_fold's, so a rank
// need not divide R.
using BankAddKernel = void (*)(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                               const at::Tensor& periods, const at::Tensor& index, bool per_row_fold);
// Its adjoint: grad_s (rows, R) and grad_bank (N, r_cap, q_cap), zero-filled, receive the
// gradients from grad (rows, out).
using BankGradKernel = void (*)(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank,
                                const at::Tensor& ranks, const at::Tensor& periods, const at::Tensor& index,
                                bool per_row_fold, at::Tensor& grad_s, at::Tensor& grad_bank);

// bank_fold: s (rows, R) = each row's fold at the rank of its slot a = index[t], with slot a's
// dropout rate dropouts[a], zeros past that rank, and zero rows where index[t] < 0 (x (rows, in),
// index (rows,), ranks (N,) int64, dropouts (N,) float64 or undefined). key: the [seed, offset]
// words in the data's memory, or null for no dropout. s.dtype is x.dtype or float32. Kernels check
// the values of index, ranks and dropouts (the CPU kernel on the host; the CUDA kernel with
// device-side assertions).
using BankFoldKernel = void (*)(const at::Tensor& x, at::Tensor& s, const at::Tensor& index, const at::Tensor& ranks,
                                const at::Tensor& dropouts, const int64_t* key);
// Its adjoint: grad_x (rows, in)[t, i] = the row's dropout factor times grad_s[t, i mod r_a], zero
// rows where index[t] < 0; grad_s (rows, R) of grad_x's dtype or float32.
using BankFoldGradKernel = void (*)(const at::Tensor& grad_s, at::Tensor& grad_x, const at::Tensor& index,
                                    const at::Tensor& ranks, const at::Tensor& dropouts, const int64_t* key);

// split_bf16: out (contiguous bf16, Bf16PartLayout of(rows, cols, order.count, dim)) receives the
// bf16 parts (common/bf16_parts.h) of t (rows, cols) float32, block b holding part order.part[b]
// of a `parts`-part split (1 <= parts <= kMaxBf16Parts).
using SplitBf16Kernel = void (*)(const at::Tensor& t, at::Tensor& out, int64_t parts, const Bf16PartOrder& order,
                                 int64_t dim);

void fold_kernel_cpu(const at::Tensor& x, at::Tensor& s, const DropoutParams& dropout);
void tile_add_kernel_cpu(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutParams& dropout);
void bat_kernel_cpu(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p,
                    bool residual);
// The bat transform as a batched GEMM through ATen (bat_gemm.cpp): any device; bat.cpp picks it
// or the backend's kernel (impl_choice.h).
void bat_kernel_gemm(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p,
                     bool residual);
void bank_add_kernel_cpu(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                         const at::Tensor& periods, const at::Tensor& index, bool per_row_fold);
void bank_grad_kernel_cpu(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                          const at::Tensor& periods, const at::Tensor& index, bool per_row_fold, at::Tensor& grad_s,
                          at::Tensor& grad_bank);
void bank_fold_kernel_cpu(const at::Tensor& x, at::Tensor& s, const at::Tensor& index, const at::Tensor& ranks,
                          const at::Tensor& dropouts, const int64_t* key);
void bank_fold_grad_kernel_cpu(const at::Tensor& grad_s, at::Tensor& grad_x, const at::Tensor& index,
                               const at::Tensor& ranks, const at::Tensor& dropouts, const int64_t* key);
void split_bf16_kernel_cpu(const at::Tensor& t, at::Tensor& out, int64_t parts, const Bf16PartOrder& order,
                           int64_t dim);

#ifdef MISS_EXT_WITH_CUDA
void fold_kernel_cuda(const at::Tensor& x, at::Tensor& s, const DropoutParams& dropout);
void tile_add_kernel_cuda(at::Tensor& out, const at::Tensor& src, double alpha, const DropoutParams& dropout);
void bat_kernel_cuda(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p,
                     bool residual);
void bank_add_kernel_cuda(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                          const at::Tensor& periods, const at::Tensor& index, bool per_row_fold);
void bank_grad_kernel_cuda(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                           const at::Tensor& periods, const at::Tensor& index, bool per_row_fold, at::Tensor& grad_s,
                           at::Tensor& grad_bank);
void bank_fold_kernel_cuda(const at::Tensor& x, at::Tensor& s, const at::Tensor& index, const at::Tensor& ranks,
                           const at::Tensor& dropouts, const int64_t* key);
void bank_fold_grad_kernel_cuda(const at::Tensor& grad_s, at::Tensor& grad_x, const at::Tensor& index,
                                const at::Tensor& ranks, const at::Tensor& dropouts, const int64_t* key);
void split_bf16_kernel_cuda(const at::Tensor& t, at::Tensor& out, int64_t parts, const Bf16PartOrder& order,
                            int64_t dim);
#endif

}  // namespace miss_ext
