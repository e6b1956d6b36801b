#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/WrapDimMinimal.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "bf16_parts.h"

namespace miss_ext {
namespace {

// float32, float64, float16 and bfloat16: the dtypes every kernel is compiled for (isFloatingType
// would also admit the float8/float4 types, which no kernel handles).
bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "miss: ", name,
                   " must be a floating-point tensor (float32, float64, float16 or bfloat16), got dtype ",
                   t.scalar_type());
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  // A meta tensor beside a real one is an adapter that was never given values (made under
  // torch.device("meta"), or by PEFT's low_cpu_mem_usage=True and never loaded): say so.
  TORCH_CHECK_VALUE(a.device() == b.device(), "miss: ", a_name, " and ", b_name,
                    " must be on the same device, got ", a_name, " on ", a.device(), " and ",
                    b_name, " on ", b.device(),
                    a.is_meta() != b.is_meta()
                        ? " (a meta tensor holds no values: made under torch.device(\"meta\") or with PEFT's "
                          "low_cpu_mem_usage=True and never loaded? load its values, e.g. load_state_dict(..., "
                          "assign=True), or materialise the model with to_empty() first)"
                        : "");
}

void check_p(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, "miss: dropout probability p must be in [0, 1], got p=", p);
}

// `data` is the tensor the mask applies to; the key must live on its device (dropout_mask.h says
// why). Meta keys go with meta data, fake CUDA keys with fake CUDA data, as any other input.
//
// The device is checked even when p == 0, where the key's values are ignored: a tensor argument
// takes part in choosing the kernel, so a key on another device would send the call to that
// device's kernel (a meta key beside CPU data ran the Meta kernel and returned uninitialised
// memory). Its dtype and shape are only checked when it is read.
void check_key(double p, const std::optional<at::Tensor>& key, const at::Tensor& data) {
  if (key.has_value() && key->defined()) {
    TORCH_CHECK_VALUE(key->device() == data.device(), "miss: the dropout key must be on the data's device ",
                      data.device(), ", got a key on ", key->device(),
                      " (draw it there with miss_ext.new_dropout_key(device); the kernels read it in place, "
                      "so the host never waits for the device)");
  }
  if (p == 0.0) return;  // no dropout: the key's values are not read
  TORCH_CHECK_VALUE(key.has_value() && key->defined(), "miss: dropout p=", p,
                    " > 0 needs a key: an int64 tensor [seed, offset] on the data's device, from "
                    "miss_ext.new_dropout_key(device)");
  TORCH_CHECK_TYPE(key->scalar_type() == at::kLong, "miss: the dropout key must be int64, got dtype ",
                   key->scalar_type());
  TORCH_CHECK_VALUE(key->sym_numel() == 2, "miss: the dropout key must hold 2 values [seed, offset], got shape ",
                    key->sym_sizes());
}

void check_block_2d(const at::Tensor& block, const c10::SymInt& out_features) {
  check_floating(block, "miss_block");
  TORCH_CHECK_VALUE(block.dim() == 2,
                    "miss: miss_block must be 2-D (r, out_features) or (r, mini_r) for the default and "
                    "mini modes, got shape ",
                    block.sym_sizes());
  const c10::SymInt& r = block.sym_size(0);
  const c10::SymInt& mini_r = block.sym_size(1);
  TORCH_CHECK_VALUE(r >= 1, "miss: r must be a positive integer, got r=", r, " (miss_block shape ",
                    block.sym_sizes(), ")");
  TORCH_CHECK_VALUE(mini_r >= 1 || out_features != 0,
                    "miss: out_features=0: the default mode's miss_block (r, out_features) would have no columns; it "
                    "needs out_features >= 1 (mini mode's (r, mini_r) block works on an empty output)");
  TORCH_CHECK_VALUE(mini_r >= 1 && out_features % mini_r == 0,
                    "miss: miss_block.shape[1] must be out_features or a mini_r dividing it, got mini_r=",
                    mini_r, " for out_features=", out_features);
}

}  // namespace

namespace {
// [first, last] byte of t's storage that t can reach (numel > 0; torch strides are never negative).
std::pair<int64_t, int64_t> byte_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t item = static_cast<int64_t>(t.element_size());
  const int64_t first = t.storage_offset() * item;
  return {first, first + last * item + item - 1};
}

// Two views of one storage whose reachable byte ranges do not meet cannot overlap, whatever their
// layout. get_overlap_status answers TooHard for any view that is not dense (an expanded index, a
// strided slice), so this is asked first: Inductor's memory planning carves such views and y
// from one pool.
bool byte_spans_disjoint(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return true;
  const auto sa = byte_span(a), sb = byte_span(b);
  return sa.second < sb.first || sb.second < sa.first;
}
}  // namespace

void check_no_overlap(const char* op, const at::Tensor& out, const char* out_name, const at::Tensor& input,
                      const char* name) {
  // get_overlap_status says TooHard for any non-dense tensor, also in another storage: only tensors
  // of out's storage are asked.
  if (!out.is_alias_of(input) || byte_spans_disjoint(out, input)) return;
  const at::MemOverlapStatus status = at::get_overlap_status(out, input);
  TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "miss: ", op,
                    " ", name, " overlaps ", out_name, " in memory (", out_name, " is written while ", name,
                    " is read); pass a copy");
  TORCH_CHECK_VALUE(status == at::MemOverlapStatus::No, "miss: ", op, " ", name, " is a view of ", out_name,
                    "'s storage whose overlap with it cannot be ruled out (", out_name, " is written while ", name,
                    " is read); pass a copy");
}

void check_writable(const char* op, const at::Tensor& out, const char* out_name) {
  TORCH_CHECK(!out.is_inference() || c10::InferenceMode::is_enabled(), "miss: ", op, " ", out_name,
              " is an inference tensor (made under torch.inference_mode()), which cannot be updated in place "
              "outside inference mode; nothing was changed. Call ", op, " under torch.inference_mode(), or pass ",
              out_name, ".clone()");
}

void check_fold_args(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key) {
  check_floating(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "miss: x must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(r >= 1, "miss: r must be a positive integer, got r=", r);
  check_p(p);
  check_key(p, key, x);
}

void check_tile_add_args(const at::Tensor& out, const at::Tensor& src, double p,
                         const std::optional<at::Tensor>& key) {
  check_floating(out, "out");
  check_floating(src, "src");
  check_same_device(out, "out", src, "src");
  TORCH_CHECK_VALUE(out.dim() >= 1 && src.dim() >= 1, "miss: tile_add_ needs tensors with a last dimension, got ",
                    "out shape ", out.sym_sizes(), " and src shape ", src.sym_sizes());
  const bool per_row = out.dim() == src.dim() &&
                       out.sym_sizes().slice(0, out.dim() - 1) == src.sym_sizes().slice(0, src.dim() - 1);
  const bool matrices = out.dim() == 2 && src.dim() == 2;
  TORCH_CHECK_VALUE(per_row || matrices, "miss: tile_add_ needs src with out's leading sizes, or two matrices; got out shape ",
                    out.sym_sizes(), " and src shape ", src.sym_sizes());
  TORCH_CHECK_VALUE(src.sym_size(-1) >= 1 || out.sym_size(-1) == 0,
                    "miss: tile_add_ src has an empty last dimension: shape ", src.sym_sizes());
  if (matrices && !per_row) {
    TORCH_CHECK_VALUE(src.sym_size(0) >= 1 || out.sym_size(0) == 0,
                      "miss: tile_add_ src has no rows to tile: shape ", src.sym_sizes());
  }
  check_p(p);
  check_key(p, key, out);
}

// same_dtype: x and the bias must have the weight's dtype (miss::linear, whose fused kernels read
// them together). bat_linear casts all three to its compute dtype anyway, so there any floating
// dtypes are taken, as PEFT's bat forward (a bf16 base fed float32 x computes there).
static void check_base_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            bool same_dtype = true) {
  check_floating(x, "x");
  check_floating(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "miss: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sym_sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1, "miss: x must have at least one dimension, got a scalar");
  TORCH_CHECK_VALUE(x.sym_size(-1) == weight.sym_size(1), "miss: x.shape[-1]=", x.sym_size(-1),
                    " does not match in_features=", weight.sym_size(1), " (x shape ", x.sym_sizes(),
                    ", weight shape ", weight.sym_sizes(), ")");
  TORCH_CHECK_TYPE(!same_dtype || x.scalar_type() == weight.scalar_type(), "miss: x dtype ", x.scalar_type(),
                   " must match the base weight dtype ", weight.scalar_type());
  check_same_device(x, "x", weight, "weight");
  if (bias.has_value() && bias->defined()) {
    if (same_dtype) {
      TORCH_CHECK_TYPE(bias->scalar_type() == weight.scalar_type(), "miss: bias dtype ", bias->scalar_type(),
                       " must match the weight dtype ", weight.scalar_type());
    } else {
      check_floating(*bias, "bias");
    }
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->sym_size(0) == weight.sym_size(0),
                      "miss: bias must have shape (out_features,) = (", weight.sym_size(0), ",), got shape ",
                      bias->sym_sizes());
    check_same_device(x, "x", *bias, "bias");
  }
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& block, double p,
                       const std::optional<at::Tensor>& key) {
  check_base_args(x, weight, bias);
  check_block_2d(block, weight.sym_size(0));
  check_same_device(x, "x", block, "miss_block");
  check_p(p);
  check_key(p, key, x);
}

void check_merge_args(const at::Tensor& weight, const at::Tensor& block) {
  if (block.dim() == 3) return check_bat_args(weight, block);
  check_floating(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "miss: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sym_sizes());
  check_block_2d(block, weight.sym_size(0));
  check_same_device(weight, "weight", block, "miss_block");
}

void check_bat_args(const at::Tensor& weight, const at::Tensor& block) {
  check_floating(weight, "weight");
  check_floating(block, "miss_block");
  TORCH_CHECK_VALUE(weight.dim() == 2, "miss: weight must be 2-D (out_features, in_features), got shape ",
                    weight.sym_sizes());
  TORCH_CHECK_VALUE(block.dim() == 3 && block.sym_size(1) == block.sym_size(2) && block.sym_size(1) >= 1,
                    "miss: a bat miss_block must have shape (out_features/r, r, r), got shape ", block.sym_sizes());
  const c10::SymInt& r = block.sym_size(1);
  const c10::SymInt& out = weight.sym_size(0);
  const c10::SymInt& in = weight.sym_size(1);
  TORCH_CHECK_VALUE(in % r == 0 && out % r == 0, "miss: bat needs in_features and out_features divisible by r; got in_features=",
                    in, ", out_features=", out, ", r=", r);
  TORCH_CHECK_VALUE(block.sym_size(0) * r == out, "miss: a bat miss_block for out_features=", out, " and r=", r,
                    " must have shape (", out / r, ", ", r, ", ", r, "), got ", block.sym_sizes());
  check_same_device(weight, "weight", block, "miss_block");
}

void check_bat_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& block, std::optional<at::ScalarType> compute_dtype) {
  check_base_args(x, weight, bias, /*same_dtype=*/false);
  check_bat_args(weight, block);
  check_out_dtype("bat_linear compute_dtype", compute_dtype);
}

void check_bat_transform_args(const at::Tensor& w, const at::Tensor& m, const at::Tensor& p) {
  check_floating(w, "w");
  TORCH_CHECK_TYPE(m.scalar_type() == p.scalar_type() && (m.scalar_type() == at::kFloat || m.scalar_type() == at::kDouble),
                   "miss: bat_transform m and p must both be float32 or both float64, got ", m.scalar_type(), " and ",
                   p.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && m.dim() == 3 && m.sym_sizes() == p.sym_sizes() && m.sym_size(1) == m.sym_size(2) &&
                        m.sym_size(1) >= 1,
                    "miss: bat_transform needs w (rows, cols), m and p (rows/r, r, r); got w ", w.sym_sizes(), ", m ",
                    m.sym_sizes(), ", p ", p.sym_sizes());
  const c10::SymInt& r = m.sym_size(1);
  TORCH_CHECK_VALUE(m.sym_size(0) * r == w.sym_size(0) && w.sym_size(1) % r == 0, "miss: bat_transform: w shape ",
                    w.sym_sizes(), " does not tile into ", r, " x ", r, " blocks matching m shape ", m.sym_sizes());
  check_same_device(w, "w", m, "m");
  check_same_device(w, "w", p, "p");
}

void check_split_addmm_args(const char* op, const at::Tensor& y, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(y.dim() == 2 && a.dim() == 2 && b.dim() == 2, "miss::", op, ": y, a and b must be matrices, got ",
                    y.dim(), "-D, ", a.dim(), "-D and ", b.dim(), "-D");
  TORCH_CHECK_VALUE(y.scalar_type() == at::kBFloat16 && a.scalar_type() == at::kBFloat16 &&
                        b.scalar_type() == at::kBFloat16,
                    "miss::", op, ": y, a and b must be bfloat16 (the split parts of a bf16 layer), got ",
                    y.scalar_type(), ", ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_VALUE(a.sym_size(0) == y.sym_size(0) && b.sym_size(1) == y.sym_size(1) && a.sym_size(1) == b.sym_size(0),
                    "miss::", op, ": y ", y.sym_sizes(), " != a ", a.sym_sizes(), " @ b ", b.sym_sizes());
  check_same_device(y, "y", a, "a");
  check_same_device(y, "y", b, "b");
}

int64_t check_split_bf16_args(const at::Tensor& t, int64_t parts, at::IntArrayRef order, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == 2, "miss::split_bf16: t must be a matrix, got a ", t.dim(), "-D tensor");
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, "miss::split_bf16: t must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(parts >= 1 && parts <= kMaxBf16Parts, "miss::split_bf16: parts must be 1, 2 or ", kMaxBf16Parts,
                    ", got parts=", parts);
  TORCH_CHECK_VALUE(!order.empty() && order.size() <= static_cast<size_t>(kMaxBf16PartBlocks),
                    "miss::split_bf16: order must name 1 to ", kMaxBf16PartBlocks, " parts, got ", order.size(), ": ",
                    order);
  for (const int64_t part : order) {
    TORCH_CHECK_VALUE(part >= 0 && part < parts, "miss::split_bf16: order names part ", part, " of a ", parts,
                      "-part split (parts are 0 to ", parts - 1, "), got order=", order);
  }
  return c10::maybe_wrap_dim(dim, 2);
}

void check_out_dtype(const char* what, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_TYPE(!dtype.has_value() || is_supported_float(*dtype), "miss: ", what,
                   " must be a floating type, got ", *dtype);
}

DropoutArgs make_dropout_args(double p, const std::optional<at::Tensor>& key) {
  DropoutArgs args{at::Tensor(), DropoutParams{nullptr, 0, 1.0}};
  if (p == 0.0) return args;
  // A strided key (e.g. a view) becomes a two-element copy on its own device: no host access.
  args.words = key->contiguous();
  args.params.key = args.words.const_data_ptr<int64_t>();
  args.params.threshold = dropout_threshold(p);
  args.params.scale = dropout_scale(p);
  return args;
}

void check_dropout_extent(int64_t rows, int64_t cols, double p) {
  if (p == 0.0) return;
  TORCH_CHECK_VALUE(rows <= (int64_t{1} << 32), "miss: dropout supports at most 2^32 rows, got ", rows);
  TORCH_CHECK_VALUE(cols <= (int64_t{1} << 34), "miss: dropout supports at most 2^34 features, got ", cols);
}

void check_bank_args(const at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                     const at::Tensor& periods, const at::Tensor& index) {
  check_floating(y, "y");
  check_floating(s, "s");
  check_floating(bank, "bank");
  TORCH_CHECK_VALUE(y.dim() >= 1, "miss: bank_add needs y with a last dimension (out_features), got a scalar");
  TORCH_CHECK_VALUE(bank.dim() == 3, "miss: bank must have shape (slots, r_cap, q_cap), got shape ",
                    bank.sym_sizes());
  TORCH_CHECK_VALUE(s.dim() == y.dim() && s.sym_sizes().slice(0, s.dim() - 1) == y.sym_sizes().slice(0, y.dim() - 1),
                    "miss: bank_add needs s with y's leading sizes, got s shape ", s.sym_sizes(), " and y shape ",
                    y.sym_sizes());
  TORCH_CHECK_TYPE(s.scalar_type() == bank.scalar_type(), "miss: bank_add s dtype ", s.scalar_type(),
                   " must match the bank dtype ", bank.scalar_type(), " (fold with dtype=bank.dtype)");
  TORCH_CHECK_TYPE(bank.scalar_type() == at::kFloat || bank.scalar_type() == y.scalar_type(),
                   "miss: the bank must be float32 or of y's dtype ", y.scalar_type(), ", got ", bank.scalar_type());
  const c10::SymInt& slots = bank.sym_size(0);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{ranks, "ranks"}, {periods, "periods"}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "miss: bank_add ", name, " must be int64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.sym_size(0) == slots, "miss: bank_add ", name,
                      " must have shape (slots,) = (", slots, ",), got shape ", t.sym_sizes());
    check_same_device(y, "y", t, name);
  }
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "miss: bank_add index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.sym_sizes() == y.sym_sizes().slice(0, y.dim() - 1),
                    "miss: bank_add index must have y's leading sizes ", y.sym_sizes().slice(0, y.dim() - 1),
                    ", got shape ", index.sym_sizes());
  check_same_device(y, "y", s, "s");
  check_same_device(y, "y", bank, "bank");
  check_same_device(y, "y", index, "index");
}

namespace {

// Calls check(a, t) once per slot a that some row uses, t its first row, after refusing an index
// past the bank. Only those slots must be valid: a bank may hold empty slots (rank 0).
template <typename F>
void for_each_used_slot(const char* op, const int64_t* index, int64_t rows, int64_t slots, F&& check) {
  std::vector<bool> seen(static_cast<size_t>(slots), false);
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t a = index[t];
    if (a < 0) continue;
    TORCH_CHECK_VALUE(a < slots, "miss: ", op, " index[", t, "]=", a, " names no slot of a bank with ", slots,
                      " slots (a negative index means no adapter)");
    if (seen[a]) continue;
    seen[a] = true;
    check(a, t);
  }
}

}  // namespace

void check_bank_values(const int64_t* ranks, const int64_t* periods, int64_t slots, const int64_t* index,
                       int64_t rows, int64_t R, int64_t out, int64_t r_cap, int64_t q_cap, bool per_row_fold) {
  for_each_used_slot("bank_add", index, rows, slots, [&](int64_t a, int64_t t) {
    TORCH_CHECK_VALUE(ranks[a] >= 1 && ranks[a] <= std::min(r_cap, R), "miss: bank_add ranks[", a, "]=", ranks[a],
                      " (used by row ", t, ") must be in [1, min(r_cap=", r_cap, ", s.shape[-1]=", R, ")]");
    TORCH_CHECK_VALUE(per_row_fold || R % ranks[a] == 0, "miss: bank_add ranks[", a, "]=", ranks[a], " (used by row ",
                      t, ") does not divide s.shape[-1]=", R, ": a fold at ", R, " cannot give the fold at ", ranks[a],
                      "; fold each row at its own rank with miss.bank_fold and pass per_row_fold=True");
    // out_features 0 (a layer of no outputs, checked on the host: no kernel runs) reads no column:
    // its slots' periods are 0 (default mode: period = out) or mini_r (a mini slot, q_cap 0), any
    // period >= 0 (a review, 2026-12-06: the first version refused a mini slot there).
    if (out == 0) {
      TORCH_CHECK_VALUE(periods[a] >= 0, "miss: bank_add periods[", a, "]=", periods[a], " (used by row ", t,
                        ") must be >= 0");
      return;
    }
    TORCH_CHECK_VALUE(periods[a] >= 1 && periods[a] <= q_cap && out % periods[a] == 0, "miss: bank_add periods[", a,
                      "]=", periods[a], " (used by row ", t, ") must be in [1, q_cap=", q_cap,
                      "] and divide out_features=", out);
  });
}

namespace {

// bank_fold's and its backward's shared checks: `input` (x, or the gradient) with `name`, the fold
// width (max_r, or the gradient's last size) with `width_name`.
void check_bank_fold_inputs(const char* op, const char* name, const at::Tensor& input, const at::Tensor& index,
                            const at::Tensor& ranks, int64_t width, const char* width_name,
                            const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key) {
  check_floating(input, name);
  TORCH_CHECK_VALUE(width >= 1, "miss: ", op, " ", width_name, " (the fold width) must be >= 1, got ", width);
  TORCH_CHECK_TYPE(ranks.scalar_type() == at::kLong, "miss: ", op, " ranks must be int64, got ", ranks.scalar_type());
  TORCH_CHECK_VALUE(ranks.dim() == 1, "miss: ", op, " ranks must have shape (slots,), got shape ", ranks.sym_sizes());
  TORCH_CHECK_TYPE(index.scalar_type() == at::kLong, "miss: ", op, " index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.sym_sizes() == input.sym_sizes().slice(0, input.dim() - 1), "miss: ", op,
                    " index must have ", name, "'s leading sizes ", input.sym_sizes().slice(0, input.dim() - 1),
                    ", got shape ", index.sym_sizes());
  check_same_device(input, name, index, "index");
  check_same_device(input, name, ranks, "ranks");
  const bool has_dropouts = dropouts.has_value() && dropouts->defined();
  const bool has_key = key.has_value() && key->defined();
  TORCH_CHECK_VALUE(has_dropouts || !has_key, "miss: ", op, " got a dropout key but no dropouts (the slots' "
                    "dropout rates, float64 (slots,)); pass both for dropout, or neither");
  if (has_dropouts) {
    TORCH_CHECK_VALUE(has_key, "miss: ", op, " got dropouts but no dropout key: an int64 tensor [seed, offset] on "
                      "the data's device, from miss_ext.new_dropout_key(device); pass both for dropout, or neither");
    TORCH_CHECK_TYPE(dropouts->scalar_type() == at::kDouble, "miss: ", op, " dropouts must be float64, got ",
                     dropouts->scalar_type());
    TORCH_CHECK_VALUE(dropouts->dim() == 1 && dropouts->sym_size(0) == ranks.sym_size(0), "miss: ", op,
                      " dropouts must have shape (slots,) = (", ranks.sym_size(0), ",), got shape ",
                      dropouts->sym_sizes());
    check_same_device(input, name, *dropouts, "dropouts");
    check_key(1.0, key, input);  // its dtype, shape and device
  }
}

}  // namespace

void check_bank_fold_args(const at::Tensor& x, const at::Tensor& index, const at::Tensor& ranks, int64_t max_r,
                          const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "miss: bank_fold needs x with a last dimension (in_features), got a scalar");
  check_bank_fold_inputs("bank_fold", "x", x, index, ranks, max_r, "max_r", dropouts, key);
}

void check_bank_fold_backward_args(const at::Tensor& grad, const at::Tensor& index, const at::Tensor& ranks,
                                   const c10::SymInt& in_features, const std::optional<at::Tensor>& dropouts,
                                   const std::optional<at::Tensor>& key) {
  TORCH_CHECK_VALUE(grad.dim() >= 1, "miss: bank_fold_backward needs grad with a last dimension, got a scalar");
  check_bank_fold_inputs("bank_fold_backward", "grad", grad, index, ranks,
                         grad.sym_size(-1).guard_int(__FILE__, __LINE__), "grad.shape[-1]", dropouts, key);
  TORCH_CHECK_VALUE(in_features >= 0, "miss: bank_fold_backward in_features must be >= 0, got ", in_features);
}

void check_bank_fold_values(const char* op, const char* width_name, const int64_t* ranks, int64_t slots,
                            const double* dropouts, const int64_t* index, int64_t rows, int64_t max_r) {
  for_each_used_slot(op, index, rows, slots, [&](int64_t a, int64_t t) {
    TORCH_CHECK_VALUE(ranks[a] >= 1 && ranks[a] <= max_r, "miss: ", op, " ranks[", a, "]=", ranks[a],
                      " (used by row ", t, ") must be in [1, ", width_name, "=", max_r, "]",
                      ranks[a] == 0 ? " (a rank of 0: the slot holds no adapter)" : "");
    if (dropouts != nullptr) {
      TORCH_CHECK_VALUE(dropouts[a] >= 0.0 && dropouts[a] <= 1.0, "miss: ", op, " dropouts[", a, "]=", dropouts[a],
                        " (used by row ", t, ") must be a dropout probability in [0, 1]");
    }
  });
}

namespace {

// t's values in host memory, contiguous and 1-D (t itself when it is so already).
at::Tensor on_host(const at::Tensor& t) { return t.reshape({t.numel()}).cpu().contiguous(); }

}  // namespace

void check_bank_values_on_host(const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                               const at::Tensor& periods, const at::Tensor& index, int64_t out, bool per_row_fold) {
  if (index.numel() == 0) return;
  const at::Tensor r = on_host(ranks), p = on_host(periods), i = on_host(index);
  check_bank_values(r.const_data_ptr<int64_t>(), p.const_data_ptr<int64_t>(), bank.size(0), i.const_data_ptr<int64_t>(),
                    i.numel(), s.size(-1), out, bank.size(1), bank.size(2), per_row_fold);
}

void check_bank_fold_values_on_host(const char* op, const char* width_name, const at::Tensor& ranks,
                                    const std::optional<at::Tensor>& dropouts, const at::Tensor& index,
                                    int64_t max_r) {
  if (index.numel() == 0) return;
  const at::Tensor r = on_host(ranks), i = on_host(index);
  const bool dropout = dropouts.has_value() && dropouts->defined();
  const at::Tensor d = dropout ? on_host(*dropouts) : at::Tensor();
  check_bank_fold_values(op, width_name, r.const_data_ptr<int64_t>(), r.numel(),
                         dropout ? d.const_data_ptr<double>() : nullptr, i.const_data_ptr<int64_t>(), i.numel(), max_r);
}

}  // namespace miss_ext
