// Every miss op refuses a strided nested tensor (torch.nested.nested_tensor's default layout) with a
// TypeError naming the op. Without these kernels the op's Autograd kernel (the Autograd alias key
// covers AutogradNestedTensor) read the tensor's sizes and failed with c10's "Internal error:
// NestedTensorImpl doesn't support sizes. Please file an issue." (a review, 2026-12-05), and
// under inference_mode "Could not run ... NestedTensorCPU backend". The kernels take dense rows;
// miss_ext.MissLinear runs a torch.jagged nested tensor on its packed rows (modules.jagged_forward).
// A torch.jagged nested tensor is a Python subclass and never reaches these keys.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>

namespace miss_ext {
namespace {

void refuse_nested(const c10::OperatorHandle& op, torch::jit::Stack* /*stack*/) {
  const std::string& name = op.schema().name();  // "miss::fold"
  TORCH_CHECK_TYPE(false, "miss: ", name.substr(name.find("::") + 2), " takes dense (strided-layout) tensors, got a nested tensor; ",
                   "pad it (torch.nested.to_padded_tensor), or give a torch.jagged nested tensor to ",
                   "miss_ext.MissLinear, which runs on its packed rows");
}

// Every op with a tensor argument (all of torch_bindings.cpp's but build_info);
// tests/test_errors.py checks that each registered op has these kernels.
constexpr const char* kOps[] = {"fold",         "tile_add_",    "tile_add",          "linear",   "merge",
                                "merge_",       "bat_linear",   "bat_weight",        "bat_transform",
                                "bat_transform_", "bank_fold",  "bank_fold_backward", "bank_add", "bank_add_",
                                "bank_add_backward", "split_addmm", "split_addmm_",   "split_bf16"};

void register_refusals(torch::Library& m) {
  for (const char* op : kOps) m.impl(op, torch::CppFunction::makeFromBoxedFunction<&refuse_nested>());
}

}  // namespace
}  // namespace miss_ext

TORCH_LIBRARY_IMPL(miss, AutogradNestedTensor, m) { miss_ext::register_refusals(m); }
TORCH_LIBRARY_IMPL(miss, NestedTensorCPU, m) { miss_ext::register_refusals(m); }
TORCH_LIBRARY_IMPL(miss, NestedTensorCUDA, m) { miss_ext::register_refusals(m); }
