// The CUDA kernels of every miss op. Compiled only in CUDA builds (MISS_EXT_WITH_CUDA): the
// fold, tile_add (shard_kernels.cu), bat (bat_kernel.cu), bank (bank_kernel.cu,
// bank_fold_kernel.cu) and split_bf16 (split_bf16_kernel.cu) kernels are hand-written; the GEMMs inside linear, bat_linear and merge go
// to cuBLAS through ATen.
#include "../backend_registration.h"

namespace miss_ext {

TORCH_LIBRARY_IMPL(miss, CUDA, m) {
  register_backend<&fold_kernel_cuda, &tile_add_kernel_cuda, &bat_kernel_cuda, &bank_add_kernel_cuda,
                   &bank_grad_kernel_cuda, &bank_fold_kernel_cuda, &bank_fold_grad_kernel_cuda,
                   &split_bf16_kernel_cuda>(m);
}

}  // namespace miss_ext
