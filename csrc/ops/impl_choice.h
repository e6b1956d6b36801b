// Run-time choice between equivalent implementations of one computation (issue 11).
//
// "auto" (the default) picks by device, sizes and dtypes, as documented where each choice is
// used. An environment variable forces one implementation, so that a benchmark can time them all
// in one process, the CPU tests can run the arithmetic a GPU would take, and the GPU tests can
// check every kernel:
//   MISS_EXT_GEMM          = auto | fp32 | split          the fp32 GEMMs of bf16 layers (split_gemm.h)
//   MISS_EXT_BAT_TRANSFORM = auto | kernel | gemm         the bat transform (bat.cpp)
//   MISS_EXT_FOLD_KERNEL   = auto | columns | rows | warp the CUDA fold kernel (cuda/shard_kernels.cu)
//   MISS_EXT_TILE_ADD_KERNEL = auto | flat | grid2d       the CUDA tile_add kernel (cuda/shard_kernels.cu)
//   MISS_EXT_ADAPTER_TERM = auto | after | before  whether miss::linear adds the adapter term to the
//                            base GEMM's output (after, in place) or writes it first and lets the
//                            base GEMM add its product onto it (before: beta = 1; linear.cpp)
//   MISS_EXT_CPU_ISA       = auto | baseline | avx2 | avx512  the widest instruction set the hand-tiled
//                            CPU loops may use (cpu/cpu_clones.h); a wider one than the CPU has is
//                            not used. Unlike the others, read once per process (at the first
//                            float32 bat transform or bank product), so tests set it in a child.
// The variable is read each time an op runs eagerly or is traced (torch.compile, export). A traced
// graph keeps the choice it was traced with, and torch's compile caches (in memory and on disk)
// do not key on these variables: set them before the process compiles anything, and clear the
// caches to compare choices under torch.compile. They are tuning and testing knobs, read with
// std::getenv (not safe against another thread writing os.environ at the same moment). An unknown
// value raises ValueError naming it when the variable is read, which is only where the choice
// exists: MISS_EXT_GEMM for bf16 data with a float32 block, MISS_EXT_ADAPTER_TERM wherever
// miss::linear runs (forward, and a backward that computes dx), MISS_EXT_BAT_TRANSFORM wherever a bat
// transform runs, MISS_EXT_FOLD_KERNEL and MISS_EXT_TILE_ADD_KERNEL where a CUDA kernel launches
// (a CPU run never reads them, so a typo there shows on the first CUDA fold or tile_add).
#pragma once

namespace miss_ext {

// Index of the chosen option: 0 for "auto" (or unset), i for options[i - 1].
int gemm_choice();  // 1 fp32, 2 split
int bat_transform_choice();  // 1 kernel, 2 gemm
int fold_kernel_choice();  // 1 columns, 2 rows, 3 warp
int tile_add_kernel_choice();  // 1 flat, 2 grid2d
int adapter_term_choice();  // 1 after, 2 before
int cpu_isa_choice();  // 1 baseline, 2 avx2, 3 avx512

namespace choice {
constexpr int kAuto = 0;
constexpr int kFp32 = 1, kSplit = 2;                     // gemm_choice
constexpr int kKernel = 1, kGemm = 2;                    // bat_transform_choice
constexpr int kColumns = 1, kRows = 2, kWarp = 3;        // fold_kernel_choice
constexpr int kFlat = 1, kGrid2d = 2;                    // tile_add_kernel_choice
constexpr int kAfter = 1, kBefore = 2;                   // adapter_term_choice
constexpr int kBaseline = 1, kAvx2 = 2, kAvx512 = 3;     // cpu_isa_choice
}  // namespace choice

}  // namespace miss_ext
