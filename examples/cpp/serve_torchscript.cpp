// Serves a TorchScript model with MissLinear layers from C++, without Python.
//
//   serve_torchscript <miss_model.pt> <miss_expected.pt>
//
// Both files come from make_models.py. The program runs forward and backward, checks the
// output and the gradients of x and of every miss_block against Python's, checks inference mode,
// and calls the C++ API (miss_ext.h): linear, fold, bank_add. Linking miss_ext::miss_ext is all it takes to make
// torch.ops.miss available to the TorchScript interpreter. Exit status 0 on success, 1 on a mismatch or an
// error (printed), 2 on a usage error.
#include <torch/script.h>

#include <cstdio>

#include "check_close.h"
#include "miss_ext.h"

using miss_example::check_close;

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <miss_model.pt> <miss_expected.pt>\n", argv[0]);
    return 2;
  }
  return miss_example::run_main(argv[0], [&] {
    torch::jit::Module model = torch::jit::load(argv[1]);
    torch::jit::Module expected = torch::jit::load(argv[2]);
    model.eval();

    const at::Tensor x = expected.attr("x").toTensor().clone().requires_grad_(true);
    const at::Tensor y = model.forward({x}).toTensor();
    check_close("forward y", y, expected.attr("y").toTensor());

    y.backward(expected.attr("grad_y").toTensor());
    check_close("grad x", x.grad(), expected.attr("grad_x").toTensor());
    const c10::Dict<c10::IValue, c10::IValue> grads = expected.attr("grads").toGenericDict();
    int trainable = 0;
    for (const auto& param : model.named_parameters(/*recurse=*/true)) {
      if (!param.value.requires_grad()) {
        continue;  // the frozen base layers
      }
      ++trainable;
      if (!param.value.grad().defined() || !grads.contains(param.name)) {
        std::printf("%-32s MISSING gradient or expected value\n", param.name.c_str());
        ++miss_example::failures();
        continue;
      }
      check_close("grad " + param.name, param.value.grad(), grads.at(param.name).toTensor());
    }
    if (trainable != 3 || grads.size() != 3) {
      std::printf("expected 3 trainable miss_block parameters, found %d\n", trainable);
      ++miss_example::failures();
    }

    {  // Serving: no autograd bookkeeping, same numbers.
      c10::InferenceMode guard;
      check_close("inference-mode y", model.forward({x.detach()}).toTensor(), expected.attr("y").toTensor());
    }

    // The C++ API gives the same result as the scripted layer it mirrors.
    torch::jit::Module layer = model.attr("l_default").toModule();
    torch::jit::Module base = layer.attr("base_layer").toModule();
    const at::Tensor x0 = x.detach();
    const at::Tensor api = miss_ext::ops::linear(x0, base.attr("weight").toTensor(), base.attr("bias").toTensor(),
                                                 layer.attr("miss_block").toTensor());
    check_close("C++ API miss_ext::ops::linear", api, layer.forward({x0}).toTensor());

    // Dropout from C++: a key drawn on the data's device; the same key gives the same mask.
    const at::Tensor key = miss_ext::ops::new_dropout_key(x0.device());
    check_close("C++ API fold with dropout (same key twice)", miss_ext::ops::fold(x0, 4, 0.25, key),
                miss_ext::ops::fold(x0, 4, 0.25, key));

    // The bank op (ops/bank.h): one slot holding the same block, every row naming it.
    const at::Tensor block = layer.attr("miss_block").toTensor().detach();
    const at::Tensor weight = base.attr("weight").toTensor().detach();
    const at::Tensor y_base = at::linear(x0, weight, base.attr("bias").toTensor().detach());
    const at::Tensor one = at::ones({1}, x0.options().dtype(at::kLong));
    const at::Tensor rows = at::zeros(y_base.sizes().slice(0, y_base.dim() - 1), x0.options().dtype(at::kLong));
    check_close("C++ API miss_ext::ops::bank_add",
                miss_ext::ops::bank_add(y_base,
                                        miss_ext::ops::fold(x0, block.size(0), 0.0, std::nullopt, block.scalar_type()),
                                        block.unsqueeze(0), one * block.size(0), one * block.size(1), rows),
                layer.forward({x0}).toTensor());

    return miss_example::report();
  });
}
