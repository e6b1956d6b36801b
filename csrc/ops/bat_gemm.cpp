// The bat transform (common/bat_index.h) as one batched GEMM through ATen, for any device.
//
// Row o = i*r + a and column s*r + k of w (out, in) is element (i, a*(in/r) + s, k) of w viewed
// (out/r, in, r): every r-element segment of row block i is a row of batch i. So
//   out = bmm(w viewed (out/r, in, r), M) + P_i[a] broadcast over the segments s.
// The GEMM runs in M's dtype (fp32 or fp64, as the hand-written kernels accumulate), so torch's
// float32 matmul precision (TF32) applies to it as it does to PEFT's fp32 bat matmul. Issue 11
// measured this composition on an H200 at 0.26 ms (fp32) against the CUDA kernel's 0.40 ms for a
// 4096 x 4096 weight; on the CPU the two are close (issue 11's measurement on an AVX-512 CPU:
// the kernel 3.99 ms against 4.31 ms at 2048 x 2048, r = 64; on an AVX2 CPU the GEMM 0-17% faster),
// so bat.cpp picks this one on CUDA only, and only for a new W' (impl_choice.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/bmm.h>

#include "kernels.h"

namespace miss_ext {

void bat_kernel_gemm(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p,
                     bool residual) {
  const int64_t in = w.size(1), blocks = m.size(0), r = m.size(1);
  const at::Tensor w_m = w.to(m.scalar_type());  // w itself where the dtypes agree
  const at::Tensor w3 = w_m.view({blocks, in, r});
  const at::Tensor p4 = p.view({blocks, r, 1, r});
  at::Tensor out4 = out.view({blocks, r, in / r, r});
  if (out.scalar_type() == m.scalar_type() && !out.is_alias_of(w)) {
    at::Tensor out3 = out.view({blocks, in, r});
    at::bmm_out(out3, w3, m);  // straight into out
    out4.add_(p4);
    // w last (common/bat_index.h): issue 11's composition (bmm, + B, + W). Not w + P first with
    // the product added in the GEMM's epilogue (one pass less): that rounds w + P at W's scale
    // before the update is added, 1.4x PEFT's error for blocks small against W (randn * 0.002,
    // where training starts from PEFT's zero init; 1.12-1.31x at 0.02; review, 2026-12-02).
    if (residual) out3.add_(w3);
    return;
  }
  // A new tensor, so `out` may be `w` (in-place merge): w is read after this only element by
  // element, each element before it is written (the residual add).
  at::Tensor prod = at::bmm(w3, m);
  if (!residual) {
    // + P, and one rounding to out's dtype (add_out computes in the inputs' dtype and casts).
    at::add_out(out4, prod.view({blocks, r, in / r, r}), p4);
    return;
  }
  prod.view({blocks, r, in / r, r}).add_(p4);
  // + w, one rounding to out's dtype. w_m, not w3 viewed back: a (1, in) weight may have a stride
  // other than in on its size-1 dimension (torch calls it contiguous), and the view back has in
  // there, which add_out took for a partial overlap with out = w (a review, 2026-12-07).
  at::add_out(out, prod.view(w.sizes()), w_m);
}

}  // namespace miss_ext
