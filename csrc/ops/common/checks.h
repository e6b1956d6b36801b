// Argument validation shared by every backend (CPU, CUDA, Meta).
//
// Each op's kernels start with the same check function, so eager, torch.compile (which runs the
// Meta kernels on fake tensors) and TorchScript raise the same error. Checks read symbolic sizes,
// so they work on fake tensors with dynamic shapes. Errors map to Python exceptions:
// TORCH_CHECK_VALUE -> ValueError, TORCH_CHECK_TYPE -> TypeError; every message names the
// offending value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "dropout_mask.h"

namespace miss_ext {

// x: floating tensor with at least one dimension; r >= 1; 0 <= p <= 1; when p > 0, key is an int64
// tensor of 2 values [seed, offset] on x's device (miss_ext.new_dropout_key(device)).
void check_fold_args(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key);

// out (..., C) and src (..., Q): floating, same device; src either has out's leading sizes
// (one src row per out row) or both are matrices (src rows tile out rows).
void check_tile_add_args(const at::Tensor& out, const at::Tensor& src, double p,
                         const std::optional<at::Tensor>& key);

// The MiSS shard linear: x (..., in), weight (out, in), bias (out) or none, block (r, mini_r)
// with mini_r dividing out (mini_r == out is the default mode).
void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& block, double p,
                       const std::optional<at::Tensor>& key);

// For an in-place op that writes `out` while it reads `input`: ValueError if their memory overlaps
// (the op would read elements it already overwrote: a wrong result, not an error). Views of one
// storage that do not overlap pass (Inductor's memory planning carves buffers from one pool);
// where the layout cannot tell (a non-dense view of out's storage), refused.
void check_no_overlap(const char* op, const at::Tensor& out, const char* out_name, const at::Tensor& input,
                      const char* name);

// For an in-place op that writes `out`: RuntimeError if out is an inference tensor (made under
// torch.inference_mode()) and inference mode is off now. torch refuses that update too, but only
// when the version counter is bumped, after the write: the user's tensor would change and then
// the call would fail. Checked before anything is written.
void check_writable(const char* op, const at::Tensor& out, const char* out_name);

// Merge of a block into weight (out, in): default/mini (2-D block) or bat (3-D block).
void check_merge_args(const at::Tensor& weight, const at::Tensor& block);

// Bat: weight (out, in), block (out/r, r, r) with r dividing in and out.
void check_bat_args(const at::Tensor& weight, const at::Tensor& block);

// bat_linear: x (..., in) of the weight's dtype, bias (out) or none, plus check_bat_args.
void check_bat_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& block, std::optional<at::ScalarType> compute_dtype);

// bat_transform: w (rows, cols), m and p (rows/r, r, r) of one dtype, float32 or float64.
void check_bat_transform_args(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p);

// split_addmm / split_addmm_ (`op` names which): y (m, n), a (m, k), b (k, n), all bfloat16, one device.
void check_split_addmm_args(const char* op, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b);
// split_bf16: t a float32 matrix, 1 <= parts <= 3, order 1 to 8 part indices below parts; returns
// dim wrapped to 0 or 1 (IndexError for another).
int64_t check_split_bf16_args(const at::Tensor& t, int64_t parts, at::IntArrayRef order, int64_t dim);

// bank_add: y (..., out) floating; s (..., R) with y's leading sizes, of bank's dtype; bank
// (N, r_cap, q_cap) float32 or y's dtype; ranks, periods (N,) and index (y's leading sizes) int64;
// all on one device. The values of ranks, periods and index are checked by the kernels
// (check_bank_values on the CPU), as reading them on the host would synchronise a GPU.
void check_bank_args(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                     const at::Tensor& periods, const at::Tensor& index);

// The values behind bank_add's int64 arguments, read in host memory: every index[t] < N, and for
// every slot a row uses, ranks[a] in [1, min(r_cap, R)] (dividing R unless per_row_fold) and
// periods[a] in [1, q_cap] dividing out.
void check_bank_values(const int64_t* ranks, const int64_t* periods, int64_t slots, const int64_t* index,
                       int64_t rows, int64_t R, int64_t out, int64_t r_cap, int64_t q_cap, bool per_row_fold);

// bank_fold: x (..., in) floating; index int64 with x's leading sizes; ranks int64 (N,); max_r
// >= 1; dropouts float64 (N,) and key (check_key) both given (dropout, each slot its own rate) or
// both None; all on x's device.
void check_bank_fold_args(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                          const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key);
// bank_fold_backward: the same with grad (..., max_r) for x, and in_features >= 0.
void check_bank_fold_backward_args(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                                   const c10::SymInt& in_features, const std::optional<at::Tensor>& dropouts,
                                   const std::optional<at::Tensor>& key);

// The values behind bank_fold's arguments, in host memory: every index[t] < N, and for every
// slot a row uses, ranks[a] in [1, max_r] and (dropouts non-null) dropouts[a] in [0, 1]. `op`
// names the op and `width_name` the fold width max_r (the backward's is grad.shape[-1]) in messages.
void check_bank_fold_values(const char* op, const char* width_name, const int64_t* ranks, int64_t slots,
                            const double* dropouts, const int64_t* index, int64_t rows, int64_t max_r);

// The same checks on device tensors, read through host copies: for the calls that launch no kernel
// (an empty output, whose rows still name slots), so that no kernel checks them. The copy is a
// synchronisation on CUDA, paid only for those degenerate shapes.
void check_bank_values_on_host(const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                               const at::Tensor& periods, const at::Tensor& index, int64_t out, bool per_row_fold);
void check_bank_fold_values_on_host(const char* op, const char* width_name, const at::Tensor& ranks,
                                    const std::optional<at::Tensor>& dropouts, const at::Tensor& index,
                                    int64_t max_r);

// An optional dtype argument (`what`, e.g. "fold dtype") must be a floating type.
void check_out_dtype(const char* what, std::optional<at::ScalarType> dtype);

// The dropout arguments of a kernel launch: the key made contiguous (`words`, which the caller
// keeps alive until the kernel is enqueued) and the parameters pointing into it. The host never
// reads the key's values. p == 0 gives parameters that keep everything (and no key).
struct DropoutArgs {
  at::Tensor words;
  DropoutParams params;
};
DropoutArgs make_dropout_args(double p, const std::optional<at::Tensor>& key);

// The dropout counter holds the row in 32 bits and the column group in 32 bits.
void check_dropout_extent(int64_t rows, int64_t cols, double p);

}  // namespace miss_ext
