// The CPU kernels of every miss op.
#include "../backend_registration.h"

namespace miss_ext {

TORCH_LIBRARY_IMPL(miss, CPU, m) {
  register_backend<&fold_kernel_cpu, &tile_add_kernel_cpu, &bat_kernel_cpu, &bank_add_kernel_cpu, &bank_grad_kernel_cpu,
                   &bank_fold_kernel_cpu, &bank_fold_grad_kernel_cpu, &split_bf16_kernel_cpu>(m);
}

}  // namespace miss_ext
