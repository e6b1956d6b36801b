// Serves an AOTInductor package (.pt2) of a model with MissLinear layers from C++, without
// Python.
//
//   serve_aoti <miss_model.pt2> <miss_expected.pt>
//
// Both files come from make_models.py: the package was compiled for CPU with a dynamic batch
// dimension, and it is run at two batch sizes against Python's eager outputs. The compiled code
// calls the miss kernels through the dispatcher (AOTInductor's proxy executor), which is why the
// program links miss_ext::miss_ext. Exit status 0 on success.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/script.h>

#include <cstdio>

#include "check_close.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <miss_model.pt2> <miss_expected.pt>\n", argv[0]);
    return 2;
  }
  return miss_example::run_main(argv[0], [&] {
    c10::InferenceMode guard;
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    torch::jit::Module expected = torch::jit::load(argv[2]);
    // Inductor's fused CPU kernels round differently from eager: a looser tolerance than for
    // TorchScript, as in tests/test_aoti.py.
    for (const char* suffix : {"", "2"}) {
      const at::Tensor x = expected.attr(std::string("x") + suffix).toTensor();
      const std::vector<at::Tensor> out = loader.run({x});
      miss_example::check_close("AOTI y, batch " + std::to_string(x.size(0)), out.at(0),
                                expected.attr(std::string("y") + suffix).toTensor(), 1e-5, 1e-5);
    }
    return miss_example::report();
  });
}
