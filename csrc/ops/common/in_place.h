// Whether an op's composite may update the tensors it has just computed in place.
#pragma once

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>

namespace miss_ext {

// In place normally (no (rows, out) temporary), but not where something sees each ATen call of a
// composite and may hand back a tensor it kept:
// - a Python dispatch mode (not torch.compile's fake / functional / proxy modes): selective
//   activation checkpointing caches an op's output by identity, and an in-place update made below
//   autograd (a C++ Function's forward) bumps no version counter, so its check cannot see it. With
//   a policy saving aten.linear the recompute added the adapter term to the cached output a second
//   time; saving the in-place op, the recomputed output never got it: silently wrong gradients
//   (an autograd-ecosystem review, 2026-12-03; torch's own ops raise there).
// - vmap, torch.func's or the one torch.autograd.grad(is_grads_batched=True) runs the backward
//   under (VmapMode): the in-place miss ops have no batching rule ("Batching rule not implemented
//   for miss::tile_add_"); the functional ones have one (_functorch.py, and the fallback).
inline bool may_update_in_place() {
  return !c10::impl::TorchDispatchModeTLS::any_modes_set(/*skip_infra_modes=*/true) &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) &&
         !c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::VmapMode);
}

}  // namespace miss_ext
