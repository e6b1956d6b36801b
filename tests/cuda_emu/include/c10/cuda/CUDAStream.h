// cuda_emu stub of c10/cuda/CUDAStream.h: one dummy stream; kernels run synchronously.
#pragma once
#include <c10/core/Device.h>
#include "cuda_emu.h"

namespace c10::cuda {
struct CUDAStream {
  cudaStream_t stream() const { return reinterpret_cast<cudaStream_t>(uintptr_t{0x5e}); }
  operator cudaStream_t() const { return stream(); }
  c10::DeviceIndex device_index() const { return 0; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }
}  // namespace c10::cuda
namespace at::cuda {
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;
}  // namespace at::cuda
