// Every schema of the `miss` op library, in one place. Kernels are registered per backend in
// ops/cpu, ops/cuda, ops/meta and ops/autograd.
//
// Conventions
//   x (..., in), weight (out, in), bias (out), block = miss_block.
//   Default mode: block (r, out). Mini mode: block (r, mini_r), mini_r dividing out; the ops tell
//   the two apart by block.shape[1], so no op takes a mode argument.
//   Dropout (adapter branch only): probability p and key = int64 tensor [seed, offset] of shape
//   (2,) on the data's device (new_dropout_key; the kernels read it there, never the host). The
//   mask is a pure function of (key, row, column) (ops/common/dropout_mask.h): never stored, the
//   same on CPU and CUDA. With p == 0 the key is ignored and may be None.
#include <torch/library.h>

#include <string>

#if defined(MISS_EXT_SETUP_PY)
#include "setup_build_config.h"  // written by setup.py: versions and CUDA archs of this build
#elif defined(MISS_EXT_CMAKE)
// Written by CMake into its build tree. A different name from setup.py's header on purpose: a
// quoted include looks in csrc/ first, where an in-place setup.py build leaves its own.
#include "miss_ext_build_config.h"
#endif
#ifndef MISS_EXT_CUDA_ARCHS
#define MISS_EXT_CUDA_ARCHS ""
#endif
#ifndef MISS_EXT_CUDA_VERSION
#define MISS_EXT_CUDA_VERSION ""
#endif
#ifndef MISS_EXT_TORCH_VERSION
#define MISS_EXT_TORCH_VERSION ""
#endif
#ifndef MISS_EXT_CXX_RUNTIME
#define MISS_EXT_CXX_RUNTIME "shared"
#endif
#ifndef MISS_EXT_SANITIZE
#define MISS_EXT_SANITIZE ""
#endif

namespace {

// "key=value;..." describing this build; miss_ext.info parses it.
std::string build_info() {
  std::string info = "backends=CPU";
#ifdef MISS_EXT_WITH_CUDA
  info += ",CUDA;cuda_version=" MISS_EXT_CUDA_VERSION ";cuda_archs=" MISS_EXT_CUDA_ARCHS;
#endif
  info += ";built_with_torch=" MISS_EXT_TORCH_VERSION;
  info += ";cxx_runtime=" MISS_EXT_CXX_RUNTIME;  // "private": libstdc++ linked in and hidden (setup.py)
  info += ";sanitize=" MISS_EXT_SANITIZE;        // "address,undefined": MISS_EXT_SANITIZE=1 (setup.py)
  return info;
}

}  // namespace

TORCH_LIBRARY(miss, m) {
  // S[..., j] = sum over i with i mod r == j of dropout(x)[..., i]: shape (..., r), implicit zero
  // padding when in % r != 0, columns j >= in are zero when r > in. dtype: of S (default x's);
  // accumulation is float32 (float64 for float64 data).
  m.def("fold(Tensor x, int r, float p=0., Tensor? key=None, ScalarType? dtype=None) -> Tensor");

  // out[t, c] += alpha * dropout(src)[t mod P, c mod Q], out viewed (rows, C), src (P, Q).
  // src has out's leading sizes (the adjoint of fold, and mini's tiling along out), or both are
  // matrices and src's rows tile out's rows too (merge). One rounding to out's dtype.
  m.def("tile_add_(Tensor(a!) out, Tensor src, float alpha=1., float p=0., Tensor? key=None) -> ()");
  // The functional tile_add_: returns out + alpha * dropout(tile(src)) in out's dtype, differentiable
  // in out and src to any order (its adjoint in src is fold; fold's adjoint is this op), so the
  // backward formulas built from it can be differentiated again.
  m.def("tile_add(Tensor out, Tensor src, float alpha=1., float p=0., Tensor? key=None) -> Tensor");

  // y = x weight^T + bias + fold(dropout(x)) @ tile(block), PEFT's precision semantics: the base
  // GEMM rounds in x's dtype, the adapter branch computes in block's dtype, one final rounding.
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor block, float p=0., Tensor? key=None) -> Tensor");

  // weight + dW (reverse: - dW), dW[o, i] = block[i mod r, o mod mini_r]. A 3-D (bat) block merges
  // W <- W(I + B) + B per tile; reverse restores W exactly by a float64 solve and first checks that
  // every I + B_i is well conditioned and not near 0 (ValueError naming the block otherwise, weight untouched).
  m.def("merge(Tensor weight, Tensor block, bool reverse=False) -> Tensor");
  m.def("merge_(Tensor(a!) weight, Tensor block, bool reverse=False) -> ()");

  // Bat (block-affine): block (out/r, r, r), r dividing in and out; W' = W + W_ij B_i + B_i per
  // r x r tile W_ij (row block i, column block j). PEFT's precision: W' and the GEMM in
  // promote(weight, block) (PEFT's W + delta), x and bias cast to it, output cast back to x's
  // dtype (x, weight and bias may each have any floating dtype, as PEFT's bat forward takes
  // them). compute_dtype overrides the GEMM dtype (opt-in lower precision; autocast uses it).
  // The autograd saves x, W and B, never W'. Several bat adapters compose as
  // bat_weight(bat_weight(W, B1, t), B2, t) with t = promote(W, B1, B2) (PEFT's W + delta dtype;
  // bat_weight's default is the block's dtype).
  m.def("bat_linear(Tensor x, Tensor weight, Tensor? bias, Tensor block, ScalarType? compute_dtype=None) -> Tensor");
  m.def("bat_weight(Tensor weight, Tensor block, ScalarType? dtype=None) -> Tensor");

  // The per-tile affine map behind bat: out[o, s*r + b] = sum_k w[o, s*r + k] m[o/r][k][b] +
  // p[o/r][o%r][b] (residual: + w[o, s*r + b], added after the sum, one rounding), m and p
  // (rows/r, r, r) in float32 or float64. Not differentiable (a building block: bat_weight, merge
  // and unmerge are made of it; W' = bat_transform(W, B, B, residual=True)).
  m.def("bat_transform(Tensor w, Tensor m, Tensor p, ScalarType? dtype=None, bool residual=False) -> Tensor");
  m.def("bat_transform_(Tensor(a!) w, Tensor m, Tensor p, bool residual=False) -> ()");

  // A bank of MiSS adapters, one adapter per row (mixed-adapter batches, issue 14): slot a of a
  // bank holds an adapter of rank ranks[a]; row t uses slot a = index[t], or none when index[t] < 0.
  // ranks, periods, index and dropouts are tensors on the data's device, not ints or lists, so that
  // changing which adapters fill the bank never recompiles a torch.compile graph.
  //
  // bank_fold: s[t, j] = fold_{r_a}(dropout_{p_a}(x[t]))[j] for j < r_a = ranks[a], zero for
  // r_a <= j < max_r and for rows without adapter: every row folded at its own adapter's rank, in
  // one pass over x. x (..., in), index int64 with x's leading sizes, ranks int64 (N,): only the
  // slots rows use must be valid (1 <= ranks[a] <= max_r). Dropout: dropouts float64 (N,), p_a =
  // dropouts[a], with one key for the call (the mask of row t, column i is that of miss.fold with
  // the same key and p_a); dropouts and key both given or both None (no dropout). dtype: of s
  // (default x's); accumulation float32 (float64 for float64 data). Differentiable in x.
  m.def("bank_fold(Tensor x, Tensor index, Tensor ranks, int max_r, Tensor? dropouts=None, Tensor? key=None, "
        "ScalarType? dtype=None) -> Tensor");
  // Its adjoint in x, from the gradient of s: grad_x[t, i] = dropout_{p_a}(grad[t, i mod r_a]) (the
  // forward's mask), zero rows without adapter; (..., in_features) in dtype (default grad's). Not
  // differentiable again.
  m.def("bank_fold_backward(Tensor grad, Tensor index, Tensor ranks, SymInt in_features, Tensor? dropouts=None, "
        "Tensor? key=None, ScalarType? dtype=None) -> Tensor");
  //
  // bank_add: out[t, o] = y[t, o] + sum_{k<R} s[t, k] * bank[a, k mod ranks[a], o mod periods[a]]
  // for rows with index[t] >= 0; rows with a negative index keep y (the base model's output).
  // s (..., R), in bank's dtype, says per_row_fold which of two folds it is: False (default):
  // miss.fold at R, refolded to each rank (fold_r(x)[j] = sum_m fold_R(x)[m r + j]), so every rank
  // a row uses must divide R; True: bank_fold's output (each row at its own rank, zeros past it,
  // which the same sum leaves as is), so any rank up to R. A rank not dividing R is refused
  // without the flag: a fold at R cannot give that rank's fold, and the sum would be silently
  // wrong. bank (N, r_cap, q_cap): slot a holds an adapter's block in [:ranks[a], :periods[a]]
  // (default mode: periods[a] = out; mini: mini_r), zeros elsewhere; only the slots rows use must
  // be valid (empty slots may have rank 0; 1 <= ranks[a] <= min(r_cap, R)). ranks, periods: int64 (N,), index: int64 with y's leading
  // sizes. y: any floating dtype; the sum is computed in float32 (float64 for float64 data) and
  // rounded once to y's dtype. Differentiable in y, s and bank: the gradient of slot a comes from
  // its rows only.
  m.def("bank_add(Tensor y, Tensor s, Tensor bank, Tensor ranks, Tensor periods, Tensor index, "
        "bool per_row_fold=False) -> Tensor");
  m.def("bank_add_(Tensor(a!) y, Tensor s, Tensor bank, Tensor ranks, Tensor periods, Tensor index, "
        "bool per_row_fold=False) -> ()");
  // Its adjoint in s and bank, from the gradient of the output (y's shape): (grad_s in s's dtype,
  // grad_bank in bank's dtype, zero outside each slot's [:ranks[a], :periods[a]]). Not
  // differentiable again.
  m.def("bank_add_backward(Tensor grad, Tensor s, Tensor bank, Tensor ranks, Tensor periods, Tensor index, "
        "bool per_row_fold=False) -> (Tensor, Tensor)");

  // y + a @ b for the split-bf16 products of a bf16 layer's adapter (split_gemm.h): y (m, n), a (m, k)
  // and b (k, n), all bfloat16 on one device; the sum is formed in float32, cuBLAS's split-K partial
  // sums included whatever torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction says,
  // and rounded once to bfloat16. Internal to miss::linear; an op so that a traced graph
  // (torch.compile, export) calls it, and runs that GEMM under that reduction setting. Not differentiable.
  m.def("split_addmm(Tensor y, Tensor a, Tensor b) -> Tensor");
  m.def("split_addmm_(Tensor(a!) y, Tensor a, Tensor b) -> ()");

  // The bfloat16 parts of float32 t (m, n) for those products (split_gemm.h): t = part_0 + ... +
  // part_{parts-1}, each part but the last the exact head of what the earlier ones leave, the last
  // rounded to nearest even (parts 1 to 3). Returns cat([part_{order[0]}, part_{order[1]}, ...], dim),
  // bfloat16, contiguous; order names 1 to 8 parts (repeats allowed: the GEMM operands of the part
  // pairs). Internal to miss::linear and miss::bat_linear: one kernel instead of several ATen ones
  // per operand. Not differentiable.
  m.def("split_bf16(Tensor t, int parts, int[] order, int dim) -> Tensor");

  // Backends and CUDA architectures compiled into this library.
  m.def("build_info() -> str", &build_info);
}
