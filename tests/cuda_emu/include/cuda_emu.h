// cuda_emu: runs CUDA kernel source on the CPU, for tests (tests/cuda_emu/README.md).
//
// Every CUDA thread of a block is a fiber (its own stack); the fibers of one block run on the
// calling OS thread, one at a time, switching only at __syncthreads, __syncwarp and warp
// shuffles. Blocks run one after another. What a GPU would refuse or leave undefined (bad launch
// configurations, divergent barriers and shuffles, shuffles naming exited lanes, device
// assertions, misaligned accesses through the UB sanitizer) is recorded and raised by the test
// bindings as a Python exception. This header is included by the stub c10/cuda headers, so it
// comes after the torch headers in every kernel file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef CUDA_EMU_NO_STREAM_TYPE
typedef struct CUstream_st* cudaStream_t;
#endif
typedef int cudaError_t;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
constexpr cudaError_t cudaSuccess = 0;

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The built-in variables, set by the scheduler whenever it switches fibers. Plain globals (not
// thread_local, whose every access in a dlopen'ed module is a __tls_get_addr call): the bindings
// run one launcher call at a time per process.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __constant__ static
// Static shared memory: a function-static (blocks run one at a time, so it is per block) in a
// section of its own, which the runtime fills with poison (0xFF) before every block.
#define __shared__ __attribute__((section("cuda_emu_shared"))) static

namespace cuda_emu {

// ---- runtime entry points (runtime.cpp) ----
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);
enum ShflKind { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
uint64_t shfl(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);
[[noreturn]] void kernel_assert_failed(const char* cond, const char* file, int line);
void* dynamic_shared();
void launch_check(const char* file, int line);  // C10_CUDA_KERNEL_LAUNCH_CHECK
void set_max_dynamic_shared(const void* kernel, long bytes);

struct LaunchInfo {
  const char* file;
  int line;
  const char* expr;      // the kernel expression as written in the source
  const void* kernel;    // the kernel's address (named by the test via the module's symbol table)
  dim3 grid, block;
  size_t shmem;
  size_t param_bytes;
};
// Checks the configuration and runs every block; `body(ctx)` runs one CUDA thread.
void launch_impl(const LaunchInfo& info, void (*body)(void*), void* ctx);

template <typename T>
T shfl_as(int kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "cuda_emu: shuffles of 8 bytes at most");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl(kind, mask, bits, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// kernel<<<grid, block, shmem, stream>>>(args) is rewritten by build.py to
// ::cuda_emu::launch(file, line, "kernel", kernel, grid, block, shmem, stream)(args).
template <typename... P>
struct Launcher {
  LaunchInfo info;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "cuda_emu: wrong number of kernel arguments");
    // Kernel parameters are copied once at launch (as into constant memory) and then passed by
    // value to every thread.
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> params;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
    LaunchInfo i = info;
    i.param_bytes = sizeof(ctx.params);
    launch_impl(i, [](void* c) {
      Ctx* x = static_cast<Ctx*>(c);
      std::apply([x](const auto&... p) { x->kernel(p...); }, x->params);
    }, &ctx);
  }
};

template <typename... P>
Launcher<P...> launch(const char* file, int line, const char* expr, void (*kernel)(P...), dim3 grid, dim3 block,
                      size_t shmem = 0, cudaStream_t = nullptr) {
  return Launcher<P...>{LaunchInfo{file, line, expr, reinterpret_cast<const void*>(kernel), grid, block, shmem, 0},
                        kernel};
}

}  // namespace cuda_emu

namespace cuda_emu {
template <typename T>
T shfl_idx_at(const char* f, int l, unsigned mask, T v, int src, int width = 32) { return shfl_as(kShflIdx, mask, v, src, width, f, l); }
template <typename T>
T shfl_up_at(const char* f, int l, unsigned mask, T v, unsigned delta, int width = 32) { return shfl_as(kShflUp, mask, v, int(delta), width, f, l); }
template <typename T>
T shfl_down_at(const char* f, int l, unsigned mask, T v, unsigned delta, int width = 32) { return shfl_as(kShflDown, mask, v, int(delta), width, f, l); }
template <typename T>
T shfl_xor_at(const char* f, int l, unsigned mask, T v, int lane_mask, int width = 32) { return shfl_as(kShflXor, mask, v, lane_mask, width, f, l); }
template <typename T>
T ldg(const T* p) { return *p; }
}  // namespace cuda_emu

#define __syncthreads() ::cuda_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::cuda_emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(...) ::cuda_emu::shfl_idx_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::shfl_up_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_emu::shfl_down_at(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl_xor_at(__FILE__, __LINE__, __VA_ARGS__)
#define __ldg(p) ::cuda_emu::ldg(p)
// 1 + the index of the lowest set bit, 0 for 0 (CUDA's integer intrinsic).
inline int __ffs(int x) { return __builtin_ffs(x); }
#define __threadfence() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define __threadfence_block() __atomic_thread_fence(__ATOMIC_SEQ_CST)

// Device min/max of CUDA's math API (integer and floating overloads), global as in CUDA.
#define CUDA_EMU_MINMAX(T)                                  \
  inline T min(T a, T b) { return b < a ? b : a; }          \
  inline T max(T a, T b) { return a < b ? b : a; }
CUDA_EMU_MINMAX(int)
CUDA_EMU_MINMAX(unsigned int)
CUDA_EMU_MINMAX(long)
CUDA_EMU_MINMAX(unsigned long)
CUDA_EMU_MINMAX(long long)
CUDA_EMU_MINMAX(unsigned long long)
CUDA_EMU_MINMAX(float)
CUDA_EMU_MINMAX(double)
#undef CUDA_EMU_MINMAX

inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) ::cuda_emu::set_max_dynamic_shared(kernel, value);
  return cudaSuccess;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}
