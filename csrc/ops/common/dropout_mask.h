// The dropout mask of the adapter branch, as a pure function of (key, row, column).
//
// The key is an int64 tensor [seed, offset] on the data's device (miss_ext.new_dropout_key(device)
// draws it with torch.randint there). The host never reads it: the op wrappers pass a pointer
// (DropoutParams) and every kernel loads the two words itself (load_dropout_key). Why:
//   - no host-device synchronisation, ever (reading a CUDA key on the host would be one);
//   - CUDA graphs: a key drawn by torch.randint inside a captured region is regenerated on every
//     replay (torch's Philox state is graph-safe), and a kernel that reads the key from device
//     memory then draws a fresh mask per replay. A key read on the host at capture time would be
//     baked into the graph, freezing the mask (what this project did before, and what Inductor's
//     device-side seeds avoid too);
//   - FakeTensor / torch.compile / torch.export: a key on the data's device traces like any other
//     input (a 2-element CPU tensor beside CUDA tensors is a device mismatch for FakeTensor).
//
// Why a counter-based generator: the mask is never stored. The forward fold and the backward
// broadcast each regenerate it from the same key, so no T x in tensor lives between them, and
// CPU and CUDA produce the same mask for the same key.
//
// Generator: Philox4x32-10 (Salmon et al., SC'11; the generator ATen uses on CUDA). One call
// maps a 128-bit counter and a 64-bit key to four independent 32-bit words. We use one call per
// group of four consecutive columns of a row:
//   key     = the 64-bit seed
//   counter = (column / 4, row low 32 bits, offset low 32 bits, offset high 32 bits)
// and word (column % 4) decides the element. Rows are limited to 2^32 and columns to 2^34;
// the ops check both (check_dropout_extent in checks.h).
//
// Keep decision: an element is dropped when its word is below `threshold` = round(p * 2^32)
// (a 64-bit integer so that p = 1 drops everything). Integer comparison is exact, so the CPU and
// the GPU agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace miss_ext {

// What the host passes to a kernel. `key` points to the two int64 words [seed, offset] in the
// memory of the data's device; it is null when threshold == 0 (no dropout: nothing to read).
struct DropoutParams {
  const int64_t* key;
  uint64_t threshold;  // drop iff word < threshold; 0 means "no dropout"
  double scale;        // 1 / (1 - p), or 0 when p == 1
};

// The keep decision's threshold round(p * 2^32), a 64-bit integer so that p == 1 gives 2^32 (drop
// every element), and the keep scale 1 / (1 - p) (0 for p == 1, as nn.Dropout). One definition for
// the host (make_dropout_args) and for kernels that read p from device memory (miss::bank_fold,
// one rate per adapter), so both give the same mask for the same (key, p).
MISS_HD uint64_t dropout_threshold(double p) { return static_cast<uint64_t>(llround(p * 4294967296.0)); }
MISS_HD double dropout_scale(double p) { return p < 1.0 ? 1.0 / (1.0 - p) : 0.0; }

// The resolved key that the mask functions below take; built inside a kernel by load_dropout_key.
struct DropoutKey {
  uint64_t seed;
  uint64_t offset;
  uint64_t threshold;  // drop iff word < threshold; 0 means "no dropout"
  double scale;        // 1 / (1 - p), or 0 when p == 1 (everything dropped, as nn.Dropout);
                       // kernels convert it once to their accumulation type
};

// Reads the key words where the kernel runs (device memory in a CUDA kernel, host memory on the CPU).
MISS_HD DropoutKey load_dropout_key(const DropoutParams& params) {
  if (params.threshold == 0) return DropoutKey{0, 0, 0, params.scale};
  return DropoutKey{static_cast<uint64_t>(params.key[0]), static_cast<uint64_t>(params.key[1]), params.threshold,
                    params.scale};
}

struct Words4 {
  uint32_t w[4];
};

MISS_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

MISS_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                             uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words4{{c0, c1, c2, c3}};
}

// The four words that decide columns [4*group, 4*group + 4) of `row`.
MISS_HD Words4 dropout_words(const DropoutKey& key, int64_t row, int64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(row),
                       static_cast<uint32_t>(key.offset), static_cast<uint32_t>(key.offset >> 32),
                       static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32));
}

// Whether an element with this word is kept.
MISS_HD bool dropout_keep(const DropoutKey& key, uint32_t word) {
  return static_cast<uint64_t>(word) >= key.threshold;
}

// Word `lane` (0..3) of a group. A select chain rather than words.w[lane]: on the GPU a
// run-time index into the array would put the four words in local memory.
MISS_HD uint32_t dropout_word(const Words4& words, int64_t lane) {
  return lane == 0 ? words.w[0] : lane == 1 ? words.w[1] : lane == 2 ? words.w[2] : words.w[3];
}

// Whether element (row, col) is kept: the scalar path, for columns not visited in aligned
// groups of four.
MISS_HD bool dropout_keep_at(const DropoutKey& key, int64_t row, int64_t col) {
  const Words4 words = dropout_words(key, row, col >> 2);
  return dropout_keep(key, dropout_word(words, col & 3));
}

}  // namespace miss_ext
