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
// maps a 128-bit counter and a 64-bit key to four independent 32-bit words: 128 random bits, which
// decide eight consecutive columns of a row, 16 bits each:
//   key     = the 64-bit seed
//   counter = (column / 8, row low 32 bits, offset low 32 bits, offset high 32 bits)
// and column c takes half (c % 2) (0: the low 16 bits) of word (c % 8) / 2: its "high half" h.
// Keep decision: an element is dropped when u < threshold = round(p * 2^32) (a 64-bit integer so
// that p = 1 drops everything), u being a 32-bit uniform whose high 16 bits are h. Only where h
// equals the threshold's high 16 bits (probability 2^-16 per element) do u's low 16 bits matter;
// only there are they drawn, from a second stream (below): so every element is dropped with
// probability threshold / 2^32 exactly, as with one 32-bit word per element, at half the Philox
// calls where a vector holds eight elements (bf16 and fp16 on the GPU; the CPU draws whole rows),
// and the same number as before for the GPU's fp32 (4) and fp64 (2) vectors, which take half or
// a quarter of a call. Why: the dropout fold and its backward are bound by Philox's integer
// arithmetic on a GPU
// (issue 11: an H200's bf16 dropout fold at 0.37 of copy bandwidth against 0.77 without dropout;
// by an estimate of about 26 integer instructions per element with four elements per call), and one call per eight
// columns covers a whole 16-byte bf16 vector. Changed 2026-12-04 (eighteenth session; until then
// one 32-bit word per element, four columns per call): the same key now draws another mask.
// Low bits (the rare ties): word c % 4 of Philox(counter = (c / 4, row, offset low, offset high),
// key = seed ^ kLowBitsKey), its low 16 bits: another key, so a stream of its own.
// Rows are limited to 2^32 and columns to 2^34; the ops check both (check_dropout_extent in
// checks.h). Integer comparisons only, so the CPU and the GPU agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace miss_ext {

// What the host passes to a kernel. `key` points to the two int64 words [seed, offset] in the
// memory of the data's device; it is null when threshold == 0 (no dropout: nothing to read).
struct DropoutParams {
  const int64_t* key;
  uint64_t threshold;  // drop iff u < threshold (the header above); 0 means "no dropout"
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
  uint64_t threshold;  // drop iff u < threshold (the header above); 0 means "no dropout"
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

// Columns decided by one Philox call.
constexpr int kDropoutGroup = 8;

// The four words that decide columns [8*group, 8*group + 8) of `row`.
MISS_HD Words4 dropout_words(const DropoutKey& key, int64_t row, int64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(row),
                       static_cast<uint32_t>(key.offset), static_cast<uint32_t>(key.offset >> 32),
                       static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32));
}

// Word `lane` (0..3) of a call. A select chain rather than words.w[lane]: on the GPU a run-time
// index into the array would put the four words in local memory. With a compile-time lane it
// folds to one word.
MISS_HD uint32_t dropout_word(const Words4& words, int64_t lane) {
  return lane == 0 ? words.w[0] : lane == 1 ? words.w[1] : lane == 2 ? words.w[2] : words.w[3];
}

// The seed of the low-bits stream is the seed XOR this (two words of the SHA-256 initial hash
// values; any fixed constant other than 0 would do).
constexpr uint64_t kLowBitsKey = 0xA54FF53A3C6EF372ull;

// The low 16 bits of element (row, col)'s 32-bit uniform, drawn only for a tie of its high half.
MISS_HD uint32_t dropout_low_bits(const DropoutKey& key, int64_t row, int64_t col) {
  const uint64_t seed = key.seed ^ kLowBitsKey;
  const Words4 w = philox4x32_10(static_cast<uint32_t>(col >> 2), static_cast<uint32_t>(row),
                                 static_cast<uint32_t>(key.offset), static_cast<uint32_t>(key.offset >> 32),
                                 static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  return dropout_word(w, col & 3) & 0xFFFFu;
}

// Whether element (row, col), whose high half is h (0 .. 2^16 - 1), is kept: u >= threshold with
// u = h * 2^16 + low bits. The threshold's high half is 0 .. 2^16 (2^16 for p = 1: all dropped).
// In two steps, so that a loop can vectorise the first (the CPU's): dropout_keep_or_tie gives 1
// kept, 0 dropped, or 2, a tie of the high halves (probability 2^-16), which dropout_keep_tie
// settles by the low bits.
MISS_HD uint8_t dropout_keep_or_tie(const DropoutKey& key, uint32_t h) {
  const uint32_t high = static_cast<uint32_t>(key.threshold >> 16);
  return h > high ? 1 : h == high ? 2 : 0;
}
MISS_HD uint8_t dropout_keep_tie(const DropoutKey& key, int64_t row, int64_t col) {
  const uint32_t low = static_cast<uint32_t>(key.threshold & 0xFFFFu);
  return low == 0 || dropout_low_bits(key, row, col) >= low;
}
MISS_HD bool dropout_keep_half(const DropoutKey& key, int64_t row, int64_t col, uint32_t h) {
  const uint8_t k = dropout_keep_or_tie(key, h);
  return k == 2 ? dropout_keep_tie(key, row, col) != 0 : k == 1;
}

// Half `k` (0..7) of a group's words: word k / 2, its low (k even) or high (k odd) 16 bits.
MISS_HD uint32_t dropout_half(const Words4& words, int64_t k) {
  const uint32_t word = dropout_word(words, k >> 1);
  return (k & 1) ? word >> 16 : word & 0xFFFFu;
}

// Whether element (row, col) is kept: the scalar path, for columns not visited in aligned
// groups of eight.
MISS_HD bool dropout_keep_at(const DropoutKey& key, int64_t row, int64_t col) {
  const Words4 words = dropout_words(key, row, col >> 3);
  return dropout_keep_half(key, row, col, dropout_half(words, col & 7));
}

}  // namespace miss_ext
