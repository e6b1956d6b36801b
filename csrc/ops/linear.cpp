#include "linear.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <c10/core/ScalarType.h>

#include "common/checks.h"
#include "common/in_place.h"
#include "common/sym_shape.h"
#include "fold.h"
#include "impl_choice.h"
#include "split_gemm.h"

namespace miss_ext {
namespace ops {

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("miss::linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, double, const std::optional<at::Tensor>&)>();
  return op.call(x, weight, bias, block, p, key);
}

}  // namespace ops

namespace {

// Whether the adapter's products take bf16 tensor cores at fp32 accuracy (split_gemm.h). That
// path serves a bf16 layer with an fp32 block (PEFT's default precision: S and D are fp32). Under
// "auto" it is taken on CUDA in the default mode, where the fp32 path costs fp32 (rows, out)
// temporaries (S @ D before the add, G widened in the backward) and fp32 GEMMs (issue 11). Mini
// mode's products are small ((rows, mini_r)); it keeps the fp32 path unless the split one is
// asked for (MISS_EXT_GEMM=split, impl_choice.h). The CPU keeps the fp32 path: torch has no
// bf16 GEMM with an fp32 result there, so the parts are widened back to fp32 and the products
// only grow (measured 2.17x a frozen bf16 layer's step against 1.43x, T=2048, 1024 x 1024, r=64).
bool use_split(const at::Tensor& data, const at::Tensor& block, bool tiled) {
  return use_split_gemm(data, block.scalar_type(), data.is_cuda() && !tiled);
}

// The block as (r, out): mini's (r, mini_r) repeated along out (small).
at::Tensor full_block(const at::Tensor& block, int64_t out) {
  const int64_t repeats = out / static_size(block, 1);
  return repeats == 1 ? block : block.repeat({1, repeats});
}

// MISS_EXT_ADAPTER_TERM (impl_choice.h): where the adapter term meets the base GEMM's output.
// "after" (what "auto" takes): the base GEMM writes y (dx), rounded in the base dtype as PEFT's
// base layer, and the term is added in place with one more rounding, PEFT's order
// (round(round(x W^T + b) + S D)). That pass reads and writes the whole (rows, out) output once
// more. "before": the term (with the bias) is written first, rounded to the output dtype, and the
// base GEMM adds its product onto it (beta = 1: round(x W^T + round(S D + b)) where the GEMM's
// epilogue adds in fp32, as the CPU's does; an H200's cuBLAS rounded the product to bf16 before
// adding C in some small shapes (split_gemm.cpp), a third rounding, and the bf16 GEMM that writes
// the split path's term may keep split-K partial sums in bf16). The extra pass is a write only,
// and the GEMM's read of it may hide behind its arithmetic. The orders differ by about one unit
// of the output dtype per rounding. Against float64 (bench/RESULTS.md, thirty-first session),
// "before" is as accurate as PEFT's order where the term is small against the base output, and
// about sqrt(2) less accurate (rms) where it is as large or larger: it rounds a term of the
// output's size on its own. Which is faster is for a GPU to say (issue 11: bench/bench_linear.py's
// "@before" cases): until it is measured "auto" keeps PEFT's order. "before" keeps "after" for dx
// with dropout (the mask is drawn by tile_add_), with in % r != 0 (the tile is not a repeat), and
// in a recorded backward (create_graph: the double backward would pass d/dD through the rounded
// tile, about 1e4x less accurate than the fp32 path's for a bf16 layer, a review found).
// A float16 output keeps "after" too: a term rounded to float16 on its own can overflow to inf
// where the sum with the base product is finite (PEFT's term is float32 then; a review found
// inf against PEFT's 10000 for a term of 70000 and a base of -60000). bf16, float32 and float64
// hold a term as large as float32 does.
bool adapter_term_before(at::ScalarType out_dtype) {
  return adapter_term_choice() == choice::kBefore && out_dtype != at::kHalf;
}

// t in `dtype`. Only a real cast is made: a same-dtype to() returns its input, which a dispatch
// mode's schema check (opcheck) refuses from an op below autograd.
at::Tensor in_dtype(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// The forward's adapter term for "before": bias + S D in y's dtype, (rows, out), written in one
// pass. s (rows, r) in the block dtype.
at::Tensor adapter_term(const at::Tensor& s, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& block, bool tiled, bool split) {
  const at::ScalarType dtype = weight.scalar_type();
  const int64_t out = static_size(weight, 0);
  if (split) return addmm_split_rounded(bias, s, full_block(block, out));
  if (!tiled) {
    if (!bias.has_value()) return in_dtype(at::mm(s, block), dtype);
    // bias + S D in the block dtype where it is at least as wide as y's (fp32 for a half base:
    // PEFT's precision on the fp32 path), then one rounding to y's dtype. A narrower block (the
    // op takes any; autocast casts one) rounds S D in its dtype, as "after" and PEFT do, and the
    // bias is added in y's dtype: it must not be rounded to the block's (a review found a float32
    // bias of 1000 rounded through bf16, and one of 7e4 made inf through float16). bf16 and
    // float16 promote to float32: the sum is taken there, then cast to y's dtype.
    const bool narrower = c10::promoteTypes(block.scalar_type(), dtype) != block.scalar_type();
    return in_dtype(narrower ? at::add(*bias, at::mm(s, block))
                             : at::addmm(in_dtype(*bias, block.scalar_type()), s, block),
                    dtype);
  }
  // Mini: the (rows, mini_r) product rounded to y's dtype, then written out along out in one pass:
  // a repeat, or with a bias one broadcast add of (out / mini_r, mini_r) copies of the product and
  // the bias viewed so (the term then rounded twice: the product, then its sum with the bias;
  // Inductor fuses the cast into the add and skips the first rounding, so a compiled half-precision
  // layer may differ from eager there by one unit, the more accurate one: a review, 2026-12-06).
  const int64_t mini_r = static_size(block, 1);
  const at::Tensor term = in_dtype(at::mm(s, block), dtype);
  if (!bias.has_value()) return term.repeat({1, out / mini_r});
  const c10::SymInt rows = s.sym_size(0);
  const c10::SymInt copies(out / mini_r), width(mini_r);
  return at::add(bias->reshape({out / mini_r, mini_r}), term.unsqueeze(1).expand_symint({rows, copies, width}))
      .view_symint({rows, c10::SymInt(out)});
}

}  // namespace

at::Tensor linear_fold(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  check_linear_args(x, weight, bias, block, p, key);
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see autocast/
  const at::Tensor x2 = x.reshape_symint({sym_leading_rows(x), weight.sym_size(1)});
  // PEFT's precision: the adapter branch folds x in the block's dtype (fp32 for half bases by default).
  return ops::fold(x2, static_size(block, 0), p, key, block.scalar_type());
}

at::Tensor linear_with_fold(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& block, const at::Tensor& s) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const bool tiled = block.sym_size(1) != weight.sym_size(0);  // mini: block (r, mini_r) with mini_r < out
  const at::Tensor x2 = x.reshape_symint({sym_leading_rows(x), weight.sym_size(1)});
  const bool in_place = may_update_in_place();  // else functional: common/in_place.h
  if (adapter_term_before(weight.scalar_type())) {
    // The base GEMM adds x W^T onto the term (a fresh tensor: in place unless something watches).
    at::Tensor term = adapter_term(s, weight, bias, block, tiled, use_split(x2, block, tiled));
    at::Tensor y = in_place ? term.addmm_(x2, weight.t()) : at::addmm(term, x2, weight.t());
    return y.view_symint(with_last(x, weight.sym_size(0)));
  }
  // The base GEMM runs and rounds in the base dtype; the sum is rounded once to x's dtype.
  at::Tensor y = at::linear(x2, weight, bias);
  if (use_split(y, block, tiled)) {
    const at::Tensor d = full_block(block, static_size(weight, 0));
    if (in_place) {
      addmm_split_(y, s, d);  // in place, one rounding
    } else {
      y = addmm_split(y, s, d);
    }
  } else if (!tiled && y.scalar_type() == block.scalar_type()) {
    if (in_place) {
      y.addmm_(s, block);  // in place: no (rows, out) temporary
    } else {
      y = at::addmm(y, s, block);
    }
  } else {
    // (rows, mini_r) or, for a half base in the default mode, (rows, out) in the block dtype;
    // tile_add_ broadcasts it along out and adds with one rounding.
    if (in_place) {
      ops::tile_add_(y, at::mm(s, block));
    } else {
      y = ops::tile_add(y, at::mm(s, block), 1.0, 0.0, std::nullopt);
    }
  }
  return y.view_symint(with_last(x, weight.sym_size(0)));
}

LinearForward linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  const at::Tensor s = linear_fold(x, weight, bias, block, p, key);
  return LinearForward{linear_with_fold(x, weight, bias, block, s), s};
}

LinearGrads linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                            const c10::SymInt& in, const at::Tensor& block, const at::Tensor& s, double p,
                            const std::optional<at::Tensor>& key, LinearNeeds needs) {
  LinearGrads grads;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  TORCH_CHECK(weight.defined() || !needs[0], "miss: internal error: the weight was not saved for the input gradient");
  const c10::SymInt out = grad_y.sym_size(-1);
  const int64_t mini_r = static_size(block, 1);
  const bool tiled = block.sym_size(1) != out;
  at::Tensor g = grad_y.reshape_symint({s.sym_size(0), out});
  // One materialisation of an expanded or strided gradient (y.sum().backward() gives a stride-0
  // one): each GEMM below would otherwise copy it again. The base GEMM needs it dense anyway
  // (issue 11: 1.117x a frozen layer's step with an expanded gradient on the CPU, 1.064x dense).
  if (!g.is_contiguous()) g = g.contiguous();

  if (needs[0] || needs[3]) {
    // dD (block's shape) and dS = G D^T (rows, r), the latter broadcast into dx below.
    at::Tensor adj;
    // The split products have no derivative: a recorded backward (create_graph=True) takes the
    // fp32 path.
    if (!at::GradMode::is_enabled() && use_split(g, block, tiled)) {
      // G is read by two bf16 GEMMs with fp32 results; no (rows, out) fp32 copy of it exists.
      if (needs[3]) {
        const at::Tensor gd = mm_split_left(s.t(), g);  // S^T G, (r, out)
        grads.block = tiled ? ops::fold(gd, mini_r, 0.0, std::nullopt, block.scalar_type()) : gd;
      }
      if (needs[0]) adj = mm_split_right(g, full_block(block, static_size(g, 1)).t());
    } else {
      // G folded along out with period mini_r (mini), or G itself (default), in the block dtype.
      // A half-precision block in the mini mode (under autocast, or a model cast whole) keeps the
      // folded G and its two small products ((rows, mini_r), (r, mini_r)) in float32: rounding Gf
      // first made dx and dD 1.15-1.3x less accurate than PEFT's, for no speed to speak of.
      const bool widen = tiled && at::isReducedFloatingType(block.scalar_type());
      const at::ScalarType product_dtype = widen ? at::kFloat : block.scalar_type();
      const at::Tensor gf = tiled ? ops::fold(g, mini_r, 0.0, std::nullopt, product_dtype)
                                  : g.to(block.scalar_type());
      const at::Tensor s_p = s.to(product_dtype);
      const at::Tensor block_p = block.to(product_dtype);
      // Operand layouts chosen for BLAS: (Gf^T S)^T and Gf (D^T contiguous) measured 20% and 10%
      // faster than S^T Gf and Gf D^T on the CPU (MKL; bench/RESULTS.md has the setting).
      if (needs[3]) {
        grads.block = at::mm(gf.t(), s_p).t().to(block.scalar_type());
        // A block with a size-1 dimension ((r, 1) at PEFT's default mini_r=1, or r=1) comes out
        // "contiguous" with other strides than the parameter's. Autograd keeps such a gradient as
        // it is, DDP does not ("Grad strides do not match bucket view strides", a copy per step):
        // given the parameter's layout, free (a view).
        if (grads.block.is_contiguous()) grads.block = grads.block.reshape_symint({-1}).view_symint(block.sym_sizes());
      }
      if (needs[0]) adj = at::mm(gf, block_p.t().contiguous());
    }
    if (needs[0]) {
      const int64_t r = static_size(block, 0);
      at::Tensor gx;
      // The choice read first, so that a bad value raises whatever the other conditions.
      if (adapter_term_before(weight.scalar_type()) && p == 0.0 && !at::GradMode::is_enabled() &&
          static_size(weight, 1) % r == 0) {
        // "before" (adapter_term_before above): the tile of dS written first, rounded to x's
        // dtype, then the base GEMM adds G W onto it.
        at::Tensor pre = in_dtype(adj, weight.scalar_type()).repeat_symint({1, in / r});
        gx = may_update_in_place() ? pre.addmm_(g, weight) : at::addmm(pre, g, weight);
      } else {
        gx = at::mm(g, weight);  // base part, x's dtype
        // + the period-r broadcast of G D^T, masked. In place normally; the functional op when the
        // backward is being recorded (create_graph=True), which an in-place op could not be.
        if (at::GradMode::is_enabled() || !may_update_in_place()) {
          gx = ops::tile_add(gx, adj, 1.0, p, key);
        } else {
          ops::tile_add_(gx, adj, 1.0, p, key);
        }
      }
      grads.x = gx.view_symint(with_last(grad_y, in));
    }
  }
  if (needs[1]) {
    TORCH_CHECK(x.defined(), "miss: internal error: x was not saved for the weight gradient");
    grads.weight = at::mm(g.t(), x.reshape_symint({s.sym_size(0), in}));
  }
  if (needs[2]) grads.bias = g.sum(0);
  return grads;
}

at::Tensor linear_kernel(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& block, double p, const std::optional<at::Tensor>& key) {
  return linear_forward(x, weight, bias, block, p, key).y;
}

}  // namespace miss_ext
