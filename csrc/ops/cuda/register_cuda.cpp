// The CUDA kernels of every miss op. Compiled only in CUDA builds (MISS_EXT_WITH_CUDA): the
// fold and tile_add kernels are hand-written (shard_kernels.cu); the GEMMs inside linear and
// merge go to cuBLAS through ATen.
#include "../backend_registration.h"

namespace miss_ext {

TORCH_LIBRARY_IMPL(miss, CUDA, m) { register_backend<&fold_kernel_cuda, &tile_add_kernel_cuda>(m); }

}  // namespace miss_ext
