// One macro so the arithmetic headers compile unchanged for the host compiler (CPU kernels)
// and for nvcc (CUDA kernels). CPU tests therefore exercise the formulas the GPU runs: the same
// dropout masks bit for bit (integer arithmetic), and the same values up to rounding, because nvcc
// contracts a * b + c into one fused multiply-add (one rounding, the more accurate) where the host
// build rounds twice: one ulp apart in 29% of fp32 tile_add_ outputs with p=0.1, emulated (a
// CUDA-code review, 2026-12-07). CUDA-against-CPU tests compare values with a tolerance for that.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MISS_HD __host__ __device__ __forceinline__
#else
#define MISS_HD inline
#endif
