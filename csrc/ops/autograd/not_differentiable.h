// Autograd kernels of ops that have no derivative (the in-place ops and bat_transform, an
// internal building block): with grad mode on they refuse tensors that require grad, rather
// than silently dropping a gradient. The in-place ones' version bump (so autograd detects a saved
// tensor changed by them) is their ADInplaceOrView kernel's (inplace_version.cpp), which the call
// below reaches, as it is reached under torch.inference_mode() without this kernel.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <initializer_list>

namespace miss_ext {

// `functional`: the differentiable op that computes the same, named in the message. A tensor
// with a forward-mode tangent (a torch.autograd.forward_ad dual tensor, a torch.func.jvp input)
// is refused whatever the grad mode, which forward AD ignores: the kernel below autograd would
// return a result without a tangent, or an in-place one with a stale tangent (a review,
// 2026-12-05: tile_add_ gave tangent 1 where 2 was due, bat_transform none at all).
inline void check_not_differentiated(const char* op, const char* functional, std::initializer_list<at::Tensor> tensors) {
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(), "miss::", op,
                " is an op without autograd support and got a tensor with a forward-mode tangent (a "
                "torch.autograd.forward_ad dual tensor or a torch.func.jvp input); forward-mode AD runs through "
                "the differentiable miss::", functional, " under torch.func.jvp / jacfwd");
  }
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(!t.requires_grad(), "miss::", op,
                " is an op without autograd support and got a tensor that requires grad; call it "
                "under torch.no_grad(), or use the differentiable miss::", functional, " instead");
  }
}

// Runs `call` below autograd (through ADInplaceOrView), after the check.
template <typename Call>
void run_not_differentiable(const char* op, const char* functional, std::initializer_list<at::Tensor> tensors,
                            Call call) {
  check_not_differentiated(op, functional, tensors);
  at::AutoDispatchBelowAutograd guard;
  call();
}

}  // namespace miss_ext
