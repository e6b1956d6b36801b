// Per-ISA versions of the hot CPU loops. The package stays portable (no -march flags) and still
// uses wide vectors on the CPU it runs on.
//
// MISS_CPU_CLONES: GCC compiles the marked function for AVX-512 (x86-64-v4), AVX2+FMA
// (x86-64-v3) and the baseline, and picks one at load time. For loops the compiler vectorises
// itself, where each clone picks its own vector width.
//
// MISS_CPU_TARGET + pick_for_cpu: for loops written with GCC vector types, whose width is fixed
// in the source and so the same in every target_clones clone. A 16-float vector is one register
// only with AVX-512; in the AVX2 clone GCC kept 16-float accumulators on the stack, and the bat
// tile loop ran 8x slower than with 8-float vectors, slower even than the SSE baseline
// (measured on a 2-core AVX2-only AMD EPYC, 2026-12-02: 0.97 s against 0.12 s for the same
// 200,000 tiles at r = 64; bench/RESULTS.md "AVX2"). So those loops are templates on the vector
// type, instantiated per target with its register width (16, 8 or 4 floats), and called through
// the function pointer pick_for_cpu chose once for this CPU. (The SSE baseline with 8-float
// vectors spilled the same way: 0.59-0.66 s against 0.33-0.36 s with 4-float ones, same loop.)
#pragma once

#include "../impl_choice.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MISS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MISS_CPU_TARGET(isa) __attribute__((target(isa)))
#define MISS_CPU_DISPATCH 1
#else
#define MISS_CPU_CLONES
#define MISS_CPU_TARGET(isa)
#define MISS_CPU_DISPATCH 0
#endif

#if defined(__GNUC__)
// Inlined into each per-target wrapper, so it is compiled for that wrapper's ISA.
#define MISS_CPU_INLINE __attribute__((always_inline)) inline
#else
#define MISS_CPU_INLINE inline
#endif

namespace miss_ext {

typedef float f32x16 __attribute__((vector_size(64)));  // one zmm register (AVX-512)
typedef float f32x8 __attribute__((vector_size(32)));   // one ymm (AVX2)
typedef float f32x4 __attribute__((vector_size(16)));   // one xmm (SSE2, the x86-64 baseline)

template <typename vec>
constexpr int kLanes = sizeof(vec) / sizeof(float);

// The version for this CPU: avx512 on x86-64-v4, avx2 on x86-64-v3, else baseline, capped by
// MISS_EXT_CPU_ISA (impl_choice.h; so a test can run every version the CPU can). Call once and keep
// the pointer (a function-local static in one non-template function per loop): the CPU does not
// change.
template <typename Fn>
Fn pick_for_cpu(Fn avx512, Fn avx2, Fn baseline) {
  const int cap = cpu_isa_choice();  // raises ValueError for an unknown value
#if MISS_CPU_DISPATCH
  __builtin_cpu_init();
  const bool any = cap == choice::kAuto;
  if ((any || cap >= choice::kAvx512) && __builtin_cpu_supports("x86-64-v4")) return avx512;
  if ((any || cap >= choice::kAvx2) && __builtin_cpu_supports("x86-64-v3")) return avx2;
#else
  (void)cap;
  (void)avx512;
  (void)avx2;
#endif
  return baseline;
}

}  // namespace miss_ext
