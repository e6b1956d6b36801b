#include "fold.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/randint.h>

#include "common/checks.h"
#include "common/sym_shape.h"

namespace miss_ext {
namespace ops {

at::Tensor new_dropout_key(const at::Device& device) {
  // Seeds and offsets in [0, 2^62), as the Python helper draws them.
  return at::randint(0, int64_t{1} << 62, {2}, at::TensorOptions().dtype(at::kLong).device(device));
}

at::Tensor fold(const at::Tensor& x, int64_t r, double p, const std::optional<at::Tensor>& key,
                std::optional<at::ScalarType> dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::fold", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, double, const std::optional<at::Tensor>&,
                                         std::optional<at::ScalarType>)>();
  return op.call(x, r, p, key, dtype);
}

void tile_add_(at::Tensor& out, const at::Tensor& src, double alpha, double p,
               const std::optional<at::Tensor>& key) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::tile_add_", "")
                       .typed<void(at::Tensor&, const at::Tensor&, double, double, const std::optional<at::Tensor>&)>();
  op.call(out, src, alpha, p, key);
}

at::Tensor tile_add(const at::Tensor& out, const at::Tensor& src, double alpha, double p,
                    const std::optional<at::Tensor>& key) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::tile_add", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, double,
                                         const std::optional<at::Tensor>&)>();
  return op.call(out, src, alpha, p, key);
}

}  // namespace ops

at::Tensor tile_add_functional_kernel(const at::Tensor& out, const at::Tensor& src, double alpha, double p,
                           const std::optional<at::Tensor>& key) {
  check_tile_add_args(out, src, p, key);
  at::Tensor result = out.clone(at::MemoryFormat::Contiguous);
  ops::tile_add_(result, src, alpha, p, key);
  return result;
}

at::Tensor tile_add_src_grad(const at::Tensor& grad, c10::SymIntArrayRef src_sizes, at::ScalarType src_dtype,
                             double alpha, double p, const std::optional<at::Tensor>& key) {
  const int64_t dims = static_cast<int64_t>(src_sizes.size());
  const int64_t q = src_sizes[dims - 1].guard_int(__FILE__, __LINE__);
  const bool per_row = grad.dim() == dims && grad.sym_sizes().slice(0, dims - 1) == src_sizes.slice(0, dims - 1);
  at::Tensor g = ops::fold(grad, q, p, key, src_dtype);  // (..., Q), the mask at grad's (row, col)
  if (!per_row) {  // matrices: src (P, Q) also tiles out's rows
    g = ops::fold(g.t(), src_sizes[0].guard_int(__FILE__, __LINE__), 0.0, std::nullopt, src_dtype).t();
  }
  return alpha == 1.0 ? g : g.mul(alpha);
}

at::ScalarType fold_kernel_dtype(at::ScalarType in, at::ScalarType out) {
  if (out == in || out == at::kFloat) return out;
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor fold_source(const at::Tensor& x, at::ScalarType out) {
  return out == at::kDouble && x.scalar_type() != at::kDouble ? x.to(at::kDouble) : x;
}

int64_t leading_rows(const at::Tensor& t) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) rows *= t.size(d);
  return rows;
}

at::Tensor fold_with(FoldKernel kernel, const at::Tensor& x, int64_t r, double p,
                     const std::optional<at::Tensor>& key, std::optional<at::ScalarType> dtype) {
  check_fold_args(x, r, p, key);
  check_out_dtype("fold dtype", dtype);
  const at::ScalarType out_dtype = dtype.value_or(x.scalar_type());
  const int64_t in = x.size(-1);
  const int64_t rows = leading_rows(x);
  check_dropout_extent(rows, in, p);

  const at::Tensor src = fold_source(x, out_dtype);
  at::Tensor s = at::empty({rows, r}, x.options().dtype(fold_kernel_dtype(src.scalar_type(), out_dtype)));
  if (rows > 0) {
    const at::Tensor x2 = src.reshape({rows, in}).contiguous();
    const DropoutArgs dropout = make_dropout_args(p, key);
    kernel(x2, s, dropout.params);
  }
  if (s.scalar_type() != out_dtype) s = s.to(out_dtype);
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = r;
  return s.view(shape);
}

void tile_add_with(TileAddKernel kernel, at::Tensor& out, const at::Tensor& src, double alpha, double p,
                   const std::optional<at::Tensor>& key) {
  check_tile_add_args(out, src, p, key);
  check_no_overlap("tile_add_", out, "out", src, "src");
  // The CUDA kernels read the dropout key from device memory in every block while other blocks
  // write out: a key inside out's memory changed the mask part way (the CPU kernel reads it once;
  // found in the CUDA emulation by a review, 2026-12-07).
  if (key.has_value()) check_no_overlap("tile_add_", out, "out", *key, "key");
  check_writable("tile_add_", out, "out");
  const int64_t rows = leading_rows(out);
  const int64_t cols = out.size(-1);
  if (rows == 0 || cols == 0) return;
  check_dropout_extent(rows, cols, p);

  at::Tensor src2 = src.reshape({leading_rows(src), src.size(-1)});
  if (src2.scalar_type() != out.scalar_type() && src2.scalar_type() != at::kFloat) src2 = src2.to(at::kFloat);
  src2 = src2.contiguous();
  const DropoutArgs dropout = make_dropout_args(p, key);
  if (out.is_contiguous()) {
    at::Tensor out2 = out.view({rows, cols});
    kernel(out2, src2, alpha, dropout.params);
  } else {
    // Strided output: update a contiguous copy, then write it back, so the op stays in place.
    at::Tensor out2 = out.contiguous().view({rows, cols});
    kernel(out2, src2, alpha, dropout.params);
    out.copy_(out2.view(out.sizes()));
  }
}

}  // namespace miss_ext
