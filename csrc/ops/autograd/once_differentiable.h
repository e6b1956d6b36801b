// C++ counterpart of Python's @once_differentiable for the backward of our autograd Functions.
//
// Our backwards are built from in-place kernels (tile_add_) and reuse S saved without history,
// so differentiating them again would give wrong numbers. With create_graph=True, the gradients
// are computed without recording and then given an error node as grad_fn. That node's edges
// lead to everything the gradients depend on (the incoming gradients and the saved inputs), so
// a second differentiation towards any of them reaches it and raises, instead of the engine
// pruning it and returning a silently wrong result.
#pragma once

#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <string>
#include <type_traits>

namespace miss_ext {

// Graph nodes are held by std::shared_ptr up to some torch releases and by c10::intrusive_ptr
// after; take whichever this torch's Edge uses.
using NodePtr = decltype(torch::autograd::Edge::function);

template <typename T, typename... Args>
NodePtr make_node(Args&&... args) {
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::make_shared<T>(std::forward<Args>(args)...);
  } else {
    return c10::make_intrusive<T>(std::forward<Args>(args)...);
  }
}

template <typename Compute>
torch::autograd::variable_list once_differentiable(const char* op, const torch::autograd::variable_list& depends_on,
                                                   Compute compute) {
  const bool create_graph = at::GradMode::is_enabled();
  torch::autograd::variable_list grads;
  {
    const at::NoGradGuard no_grad;
    grads = compute();
  }
  if (!create_graph) return grads;
  const NodePtr error = make_node<torch::autograd::Error>(
      std::string(op) + " is not differentiable twice (its backward was run with create_graph=True)",
      torch::autograd::collect_next_edges(depends_on));
  for (auto& g : grads) {
    if (g.defined()) {
      g = g.detach();
      torch::autograd::set_history(g, error);
    }
  }
  return grads;
}

}  // namespace miss_ext
