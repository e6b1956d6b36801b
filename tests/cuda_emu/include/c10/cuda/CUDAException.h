// cuda_emu stub of c10/cuda/CUDAException.h.
// - C10_CUDA_KERNEL_LAUNCH_CHECK() raises the configuration error of the last launch, as
//   cudaGetLastError would (a bad launch is recorded, not run).
// - CUDA_KERNEL_ASSERT(c) records the failure and stops the kernel; the test bindings raise it.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include "cuda_emu.h"

#undef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT_MSG
#undef CUDA_KERNEL_ASSERT_PRINTF
#undef CUDA_KERNEL_ASSERT2
#define CUDA_KERNEL_ASSERT(cond) \
  do { if (!(cond)) ::cuda_emu::kernel_assert_failed(#cond, __FILE__, __LINE__); } while (0)
#define CUDA_KERNEL_ASSERT_MSG(cond, msg) \
  do { if (!(cond)) ::cuda_emu::kernel_assert_failed(#cond ": " msg, __FILE__, __LINE__); } while (0)
#define CUDA_KERNEL_ASSERT_PRINTF(cond, ...) \
  do { if (!(cond)) ::cuda_emu::kernel_assert_failed(#cond, __FILE__, __LINE__); } while (0)
#define CUDA_KERNEL_ASSERT2(cond) CUDA_KERNEL_ASSERT(cond)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::cuda_emu::launch_check(__FILE__, __LINE__)
#define C10_CUDA_CHECK(expr) \
  do { if ((expr) != cudaSuccess) ::cuda_emu::launch_check(__FILE__, __LINE__); } while (0)
