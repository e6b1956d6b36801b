// One macro so the arithmetic headers compile unchanged for the host compiler (CPU kernels)
// and for nvcc (CUDA kernels). CPU tests therefore exercise exactly the code the GPU runs.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MISS_HD __host__ __device__ __forceinline__
#else
#define MISS_HD inline
#endif
