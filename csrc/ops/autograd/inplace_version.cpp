// The ADInplaceOrView kernel of the in-place ops: it bumps the version counter of each tensor the
// op modifies (the schema's Tensor(a!) arguments), as aten's in-place ops do in this dispatch key.
// Why here and not in their Autograd kernels (not_differentiable.h): torch.inference_mode() skips
// the Autograd keys but not this one, so an in-place op on a normal tensor inside it
// (MissLinear.merge() between a forward and its backward, say) must still tell autograd that a
// tensor it saved has changed; with the bump only in the Autograd kernel the backward silently
// used the new values (a review, 2026-12-05). torch's autogradNotImplementedInplaceOrViewFallback
// bumps mutable *returns* only, and these ops return nothing.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/irange.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

namespace miss_ext {
namespace {

void bump_mutated_arguments(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t num_arguments = schema.arguments().size();
  // The mutated tensors, held before the call consumes the arguments on the stack.
  std::vector<at::Tensor> mutated;
  const size_t start = stack->size() - num_arguments;
  for (const size_t i : c10::irange(num_arguments)) {
    if (schema.is_mutable({c10::SchemaArgType::input, i})) {
      const c10::IValue& value = (*stack)[start + i];
      if (value.isTensor()) mutated.push_back(value.toTensor());
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const at::Tensor& t : mutated) {
    if (t.defined() && !t.is_inference()) torch::autograd::increment_version(t);
  }
}

}  // namespace
}  // namespace miss_ext

TORCH_LIBRARY_IMPL(miss, ADInplaceOrView, m) {
  for (const char* op : {"tile_add_", "merge_", "bat_transform_", "bank_add_", "split_addmm_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&miss_ext::bump_mutated_arguments>());
  }
}
