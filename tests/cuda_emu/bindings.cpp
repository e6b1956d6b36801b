// Python bindings of the emulated CUDA launchers (module name given by build.py). Not a
// TORCH_LIBRARY of `miss`: loading a second registration of that namespace aborts the process.
#include <torch/extension.h>

#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>

#include "common/checks.h"
#include "kernels.h"

namespace cuda_emu {
void begin_call();
std::string end_call();
void set_schedule(int mode, uint64_t seed);
std::vector<std::tuple<uintptr_t, std::string, std::string, int, std::vector<unsigned>, size_t, bool>> launch_records();
void* fenced_alloc(size_t bytes, bool at_end, const std::string& label);
void fenced_free(void* data);
}  // namespace cuda_emu

namespace {

struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs one launcher call the way a GPU stream would be synchronised after it: errors recorded
// while kernels ran (device assertions, deadlocks, divergent or invalid shuffles, UB sanitizer
// reports) and invalid launches that no C10_CUDA_KERNEL_LAUNCH_CHECK consumed become EmuError.
std::mutex call_lock;

template <typename F>
void guarded(F&& f) {
  const std::lock_guard<std::mutex> lock(call_lock);  // the runtime's state is process-global
  cuda_emu::begin_call();
  std::exception_ptr ep;
  try {
    f();
  } catch (...) {
    ep = std::current_exception();
  }
  const std::string report = cuda_emu::end_call();
  if (!report.empty()) throw EmuError(report);
  if (ep) std::rethrow_exception(ep);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "cuda_emu: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "cuda_emu: ", name, " must be contiguous (the launchers' contract)");
}

void fold(const at::Tensor& x, at::Tensor& s, double p, const std::optional<at::Tensor>& key) {
  check_cpu(x, "x");
  check_cpu(s, "s");
  TORCH_CHECK(x.dim() == 2 && s.dim() == 2 && x.size(0) == s.size(0), "cuda_emu: fold needs x (rows, in), s (rows, r)");
  guarded([&] {
    const miss_ext::DropoutArgs d = miss_ext::make_dropout_args(p, key);  // as fold_with does
    miss_ext::fold_kernel_cuda(x, s, d.params);
  });
}

void tile_add(at::Tensor& out, const at::Tensor& src, double alpha, double p, const std::optional<at::Tensor>& key) {
  check_cpu(out, "out");
  check_cpu(src, "src");
  TORCH_CHECK(out.dim() == 2 && src.dim() == 2, "cuda_emu: tile_add needs 2-D out and src");
  guarded([&] {
    const miss_ext::DropoutArgs d = miss_ext::make_dropout_args(p, key);  // as tile_add_with does
    miss_ext::tile_add_kernel_cuda(out, src, alpha, d.params);
  });
}

void bat(const at::Tensor& w, at::Tensor& out, const at::Tensor& m, const at::Tensor& p, bool residual) {
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{w, "w"}, {out, "out"}, {m, "m"}, {p, "p"}}) check_cpu(t, n);
  guarded([&] { miss_ext::bat_kernel_cuda(w, out, m, p, residual); });
}

void bank_add(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
              const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{y, "y"}, {s, "s"}, {bank, "bank"}, {ranks, "ranks"},
                      {periods, "periods"}, {index, "index"}})
    check_cpu(t, n);
  guarded([&] { miss_ext::bank_add_kernel_cuda(y, s, bank, ranks, periods, index, per_row_fold); });
}

void bank_grad(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
               const at::Tensor& periods, const at::Tensor& index, at::Tensor& grad_s, at::Tensor& grad_bank,
               bool per_row_fold) {
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{grad, "grad"}, {s, "s"}, {bank, "bank"}, {ranks, "ranks"},
                      {periods, "periods"}, {index, "index"}, {grad_s, "grad_s"}, {grad_bank, "grad_bank"}})
    check_cpu(t, n);
  guarded([&] { miss_ext::bank_grad_kernel_cuda(grad, s, bank, ranks, periods, index, per_row_fold, grad_s, grad_bank); });
}

void bank_fold(const at::Tensor& x, at::Tensor& s, const at::Tensor& index, const at::Tensor& ranks,
               const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key) {
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{x, "x"}, {s, "s"}, {index, "index"}, {ranks, "ranks"}})
    check_cpu(t, n);
  TORCH_CHECK(dropouts.has_value() == key.has_value(), "cuda_emu: bank_fold takes dropouts and key together");
  if (dropouts) check_cpu(*dropouts, "dropouts");
  if (key) check_cpu(*key, "key");
  guarded([&] {
    miss_ext::bank_fold_kernel_cuda(x, s, index, ranks, dropouts ? *dropouts : at::Tensor(),
                                    key ? key->const_data_ptr<int64_t>() : nullptr);
  });
}

void bank_fold_grad(const at::Tensor& grad_s, at::Tensor& grad_x, const at::Tensor& index, const at::Tensor& ranks,
                    const std::optional<at::Tensor>& dropouts, const std::optional<at::Tensor>& key) {
  for (auto [t, n] : {std::pair<const at::Tensor&, const char*>{grad_s, "grad_s"}, {grad_x, "grad_x"},
                      {index, "index"}, {ranks, "ranks"}})
    check_cpu(t, n);
  TORCH_CHECK(dropouts.has_value() == key.has_value(), "cuda_emu: bank_fold_grad takes dropouts and key together");
  if (dropouts) check_cpu(*dropouts, "dropouts");
  if (key) check_cpu(*key, "key");
  guarded([&] {
    miss_ext::bank_fold_grad_kernel_cuda(grad_s, grad_x, index, ranks, dropouts ? *dropouts : at::Tensor(),
                                         key ? key->const_data_ptr<int64_t>() : nullptr);
  });
}

void split_bf16(const at::Tensor& t, at::Tensor& out, int64_t parts, const std::vector<int64_t>& order, int64_t dim) {
  check_cpu(t, "t");
  check_cpu(out, "out");
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && out.scalar_type() == at::kBFloat16,
              "cuda_emu: split_bf16 needs t (rows, cols) float32 and a bfloat16 out");
  TORCH_CHECK(parts >= 1 && parts <= miss_ext::kMaxBf16Parts && !order.empty() &&
                  order.size() <= static_cast<size_t>(miss_ext::kMaxBf16PartBlocks) && (dim == 0 || dim == 1),
              "cuda_emu: split_bf16 needs 1 to 3 parts, 1 to 8 blocks and dim 0 or 1");
  const int64_t blocks = static_cast<int64_t>(order.size());
  TORCH_CHECK(out.sizes() == (dim == 0 ? at::IntArrayRef{blocks * t.size(0), t.size(1)}
                                       : at::IntArrayRef{t.size(0), blocks * t.size(1)}),
              "cuda_emu: split_bf16's out has the wrong shape");
  miss_ext::Bf16PartOrder po{};
  po.count = static_cast<int32_t>(blocks);
  for (int64_t b = 0; b < blocks; ++b) po.part[b] = static_cast<int8_t>(order[b]);  // as split_bf16_with does
  guarded([&] { miss_ext::split_bf16_kernel_cuda(t, out, parts, po, dim); });
}

}  // namespace

#ifdef CUDA_EMU_SELFTEST
void cuda_emu_selftest(const std::string& name, at::Tensor& data);  // selftest.cu
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::register_exception<EmuError>(m, "EmuError", PyExc_RuntimeError);
  m.def("fold", &fold, "fold_kernel_cuda, emulated", py::arg("x"), py::arg("s"), py::arg("p") = 0.0, py::arg("key") = py::none());
  m.def("tile_add", &tile_add, "tile_add_kernel_cuda, emulated", py::arg("out"), py::arg("src"), py::arg("alpha") = 1.0,
        py::arg("p") = 0.0, py::arg("key") = py::none());
  m.def("bat", &bat, "bat_kernel_cuda, emulated", py::arg("w"), py::arg("out"), py::arg("m"), py::arg("p"),
        py::arg("residual") = false);
  m.def("bank_add", &bank_add, "bank_add_kernel_cuda, emulated", py::arg("y"), py::arg("s"), py::arg("bank"),
        py::arg("ranks"), py::arg("periods"), py::arg("index"), py::arg("per_row_fold") = false);
  m.def("bank_grad", &bank_grad, "bank_grad_kernel_cuda, emulated", py::arg("grad"), py::arg("s"), py::arg("bank"),
        py::arg("ranks"), py::arg("periods"), py::arg("index"), py::arg("grad_s"), py::arg("grad_bank"),
        py::arg("per_row_fold") = false);
  m.def("bank_fold", &bank_fold, "bank_fold_kernel_cuda, emulated", py::arg("x"), py::arg("s"), py::arg("index"),
        py::arg("ranks"), py::arg("dropouts") = py::none(), py::arg("key") = py::none());
  m.def("bank_fold_grad", &bank_fold_grad, "bank_fold_grad_kernel_cuda, emulated", py::arg("grad_s"),
        py::arg("grad_x"), py::arg("index"), py::arg("ranks"), py::arg("dropouts") = py::none(),
        py::arg("key") = py::none());
  m.def("split_bf16", &split_bf16, "split_bf16_kernel_cuda, emulated", py::arg("t"), py::arg("out"), py::arg("parts"),
        py::arg("order"), py::arg("dim"));
  m.def("set_schedule", [](const std::string& mode, uint64_t seed) {
    const int k = mode == "forward" ? 0 : mode == "reverse" ? 1 : mode == "random" ? 2 : -1;
    TORCH_CHECK(k >= 0, "cuda_emu: schedule must be forward, reverse or random");
    cuda_emu::set_schedule(k, seed);
  }, py::arg("mode"), py::arg("seed") = 0);
  m.def("fenced_bytes", [](int64_t bytes, bool at_end, const std::string& label) {
    TORCH_CHECK(bytes >= 0, "cuda_emu: fenced_bytes needs bytes >= 0, got ", bytes);
    void* data = cuda_emu::fenced_alloc(static_cast<size_t>(bytes), at_end, label);
    return torch::from_blob(data, {bytes}, [](void* d) { cuda_emu::fenced_free(d); }, torch::TensorOptions().dtype(torch::kUInt8));
  }, "a uint8 tensor of `bytes` alone in a mapping whose last (at_end) or first byte touches an inaccessible page: "
     "a kernel access beyond it is reported as an out-of-bounds access", py::arg("bytes"), py::arg("at_end"), py::arg("label"));
  m.def("launches", &cuda_emu::launch_records,
        "launches of the last call: (kernel address, expression, file, line, grid+block, shared bytes, ran)");
#ifdef CUDA_EMU_SELFTEST
  m.def("selftest", [](const std::string& name, at::Tensor& data) { guarded([&] { cuda_emu_selftest(name, data); }); });
#endif
}
