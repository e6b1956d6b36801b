// Kernels that misbehave on purpose: tests/test_cuda_emulated.py checks that the emulator reports
// each defect (so a harness that stopped detecting them fails), and that correct code passes.
// Built through the same rewriting as the real kernels (build.py).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <string>

namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// out[block, warp] = sum of lane ids (496), by shuffles; out[...] of lane 0 of every warp.
__global__ void warp_sum(float* out) {
  float v = static_cast<float>(threadIdx.x % 32);
  for (int m = 16; m >= 1; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  float d = static_cast<float>(threadIdx.x % 32);
  for (int o = 16; o > 0; o /= 2) d += __shfl_down_sync(0xffffffffu, d, o);
  const float b = __shfl_sync(0xffffffffu, v, 0);
  if (threadIdx.x % 32 == 0) out[blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32] = v + d + b;
}

// out[y * W + x] = linear block id * 1000 + linear thread id, for 2-D grids and blocks.
__global__ void indices(float* out, int width) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
  out[y * width + x] = static_cast<float>((blockIdx.y * gridDim.x + blockIdx.x) * 1000 + threadIdx.y * blockDim.x + threadIdx.x);
}

// Shared-memory reduction with barriers: out[0] = sum of 0..255.
__global__ void block_sum(float* out) {
  __shared__ float part[256];
  part[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  for (int half = 128; half >= 1; half >>= 1) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = part[0];
}

__global__ void divergent_syncthreads(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void deadlock(float* out) {
  float v = 1.0f;
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void shfl_after_exit(float* out) {
  if (threadIdx.x == 5) return;
  const float v = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  out[threadIdx.x] = v;
}

__global__ void divergent_shfl(float* out) {
  float v = 1.0f;
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

__global__ void misaligned_vector(float* data) {
  const Vec<float, 4> v = *reinterpret_cast<const Vec<float, 4>*>(data + 1);
  data[8 + threadIdx.x] = v.v[0];
}

__global__ void device_assert(float* out, int bad) {
  CUDA_KERNEL_ASSERT(threadIdx.x != static_cast<unsigned>(bad));
  out[threadIdx.x] = 1.0f;
}

// Reads dynamic shared memory nobody wrote: the poison (NaN) must come out.
__global__ void read_dynamic_poison(float* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  float* buf = reinterpret_cast<float*>(raw);
  out[threadIdx.x] = buf[threadIdx.x];
}

// Block 1 reads static shared memory that only block 0 wrote: poison on a GPU, here too.
__global__ void read_static_from_previous_block(float* out) {
  __shared__ float buf[32];
  if (blockIdx.x == 0) buf[threadIdx.x] = 7.0f;
  __syncthreads();
  out[blockIdx.x * 32 + threadIdx.x] = buf[threadIdx.x];
}

// A missing barrier: thread t reads what thread t + 1 writes. Forward scheduling reads the
// poison (t + 1 has not run yet), reverse scheduling reads the value.
__global__ void missing_barrier(float* out) {
  __shared__ float buf[33];
  buf[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = buf[threadIdx.x + 1];
}

// Out-of-bounds accesses, for fenced tensors (fenced_bytes): one element past the end, one before
// the start, and dynamic shared memory read one float past its end.
__global__ void read_past_end(float* data, long n) { data[0] = data[n]; }

__global__ void write_before_start(float* data) { data[-1] = 1.0f; }

__global__ void shared_past_end(float* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  const float* buf = reinterpret_cast<const float*>(raw);
  out[threadIdx.x] = buf[threadIdx.x + 1];  // 32 floats of shared memory: thread 31 reads buf[32]
}

__global__ void nothing(float*) {}

}  // namespace

void cuda_emu_selftest(const std::string& name, at::Tensor& data) {
  float* p = data.mutable_data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(0).stream();
  if (name == "warp_sum") {
    warp_sum<<<3, 64, 0, stream>>>(p);
  } else if (name == "indices") {
    indices<<<dim3(3, 2), dim3(4, 5), 0, stream>>>(p, 12);
  } else if (name == "block_sum") {
    block_sum<<<2, 256, 0, stream>>>(p);
  } else if (name == "divergent_syncthreads") {
    divergent_syncthreads<<<1, 32, 0, stream>>>(p);
  } else if (name == "deadlock") {
    deadlock<<<1, 64>>>(p);
  } else if (name == "shfl_after_exit") {
    shfl_after_exit<<<1, 32>>>(p);
  } else if (name == "divergent_shfl") {
    divergent_shfl<<<1, 32>>>(p);
  } else if (name == "misaligned_vector") {
    misaligned_vector<<<1, 1>>>(p);
  } else if (name == "device_assert") {
    device_assert<<<2, 32>>>(p, 7);
  } else if (name == "read_dynamic_poison") {
    read_dynamic_poison<<<1, 32, 32 * sizeof(float), stream>>>(p);
  } else if (name == "read_static_from_previous_block") {
    read_static_from_previous_block<<<2, 32>>>(p);
  } else if (name == "missing_barrier") {
    missing_barrier<<<1, 32>>>(p);
  } else if (name == "read_past_end") {
    read_past_end<<<1, 1>>>(p, static_cast<long>(data.numel()));
  } else if (name == "write_before_start") {
    write_before_start<<<1, 1>>>(p);
  } else if (name == "shared_past_end") {
    shared_past_end<<<1, 32, 32 * sizeof(float), stream>>>(p);
  } else if (name == "zero_grid_checked") {
    nothing<<<0, 32>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (name == "big_block_unchecked") {
    nothing<<<1, 2048>>>(p);
    return;  // no C10_CUDA_KERNEL_LAUNCH_CHECK
  } else if (name == "grid_y_too_large") {
    nothing<<<dim3(1, 65536), 32>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (name == "too_much_shared") {
    nothing<<<1, 32, 48 * 1024 + 16>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (name == "opt_in_shared") {
    cudaFuncSetAttribute(nothing, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
    nothing<<<1, 32, 64 * 1024>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(false, "unknown selftest ", name);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
