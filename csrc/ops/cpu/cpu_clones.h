// Function multi-versioning for the hot CPU loops: GCC compiles the marked function for AVX-512
// (x86-64-v4), AVX2+FMA (x86-64-v3) and the baseline, and picks one at load time from the CPU it
// runs on. The package stays portable (no -march flags) and still uses wide vectors.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MISS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MISS_CPU_CLONES
#endif
