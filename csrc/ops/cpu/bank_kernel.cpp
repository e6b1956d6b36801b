// CPU kernels of the adapter bank (common/bank_index.h has the index arithmetic).
//
// Rows are first sorted by slot (a stable counting sort, O(rows)), and the work is split into
// tasks of consecutive rows of one slot: a slot's block (r x q values, 512 KiB at r = 64,
// out = 2048 in float32) then stays in cache across its rows, and four rows at a time share each
// load of a block row, which keeps the inner loop at the FMA rate rather than at the cache's.
// Every output element is written by one task, in a fixed order: no atomics, results independent
// of the thread count. The gradient of a slot's block is reduced over that slot's rows in row
// order, in tasks of one slot and a range of block columns.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/bank_index.h"
#include "../common/checks.h"
#include "../common/shard_index.h"
#include "../bank_dispatch.h"
#include "../kernels.h"
#include "cpu_clones.h"
#include "row_helpers.h"

namespace miss_ext {
namespace {

constexpr int64_t kRowsPerTask = 32;
constexpr int64_t kRowGroup = 4;      // rows sharing each load of a block row
constexpr int64_t kColumnsPerTask = 512;

// order[offsets[a] .. offsets[a + 1]) are the rows of slot a, in increasing row order.
struct RowsBySlot {
  std::vector<int64_t> order, offsets;
};

RowsBySlot rows_by_slot(const int64_t* index, int64_t rows, int64_t slots) {
  RowsBySlot g;
  g.offsets.assign(slots + 1, 0);
  for (int64_t t = 0; t < rows; ++t)
    if (index[t] >= 0) ++g.offsets[index[t] + 1];
  for (int64_t a = 0; a < slots; ++a) g.offsets[a + 1] += g.offsets[a];
  g.order.resize(g.offsets[slots]);
  std::vector<int64_t> next(g.offsets.begin(), g.offsets.end() - 1);
  for (int64_t t = 0; t < rows; ++t)
    if (index[t] >= 0) g.order[next[index[t]]++] = t;
  return g;
}

struct Task {
  int64_t slot, begin, end;  // positions in RowsBySlot::order, or block columns for the gradient
};

std::vector<Task> row_tasks(const RowsBySlot& g, int64_t slots) {
  std::vector<Task> tasks;
  for (int64_t a = 0; a < slots; ++a)
    for (int64_t i = g.offsets[a]; i < g.offsets[a + 1]; i += kRowsPerTask)
      tasks.push_back({a, i, std::min(i + kRowsPerTask, g.offsets[a + 1])});
  return tasks;
}

// p[u][c] = sum_j sa[u][j] * block[j][c] for u < n rows, c < q (block rows q_cap apart).
template <typename acc, typename b_t>
#if defined(__GNUC__)
__attribute__((always_inline))  // inlined into each per-ISA version of block_products_f32_for, so each is vectorised for its ISA
#endif
inline void block_products(const acc* sa, int64_t r, int64_t r_cap, const b_t* block, int64_t q, int64_t q_cap,
                                    int64_t n, acc* p) {
  std::fill(p, p + n * q_cap, acc(0));
  for (int64_t j = 0; j < r; ++j) {
    const b_t* brow = block + j * q_cap;
    if (n == kRowGroup) {
      const acc s0 = sa[j], s1 = sa[r_cap + j], s2 = sa[2 * r_cap + j], s3 = sa[3 * r_cap + j];
      acc* __restrict p0 = p;
      acc* __restrict p1 = p + q_cap;
      acc* __restrict p2 = p + 2 * q_cap;
      acc* __restrict p3 = p + 3 * q_cap;
      for (int64_t c = 0; c < q; ++c) {
        const acc b = static_cast<acc>(brow[c]);
        p0[c] += s0 * b;
        p1[c] += s1 * b;
        p2[c] += s2 * b;
        p3[c] += s3 * b;
      }
    } else {
      for (int64_t u = 0; u < n; ++u) {
        const acc su = sa[u * r_cap + j];
        acc* __restrict pu = p + u * q_cap;
        for (int64_t c = 0; c < q; ++c) pu[c] += su * static_cast<acc>(brow[c]);
      }
    }
  }
}

// The float32 instance for four rows: kLanes<vec> block columns at a time, the four rows' sums in
// registers across the whole j loop, so each vector load of a block row feeds four multiply-adds
// and nothing is stored until the end (the generic loop above stores p at every j).
template <typename vec>
MISS_CPU_INLINE void block_products_4rows(const float* sa, int64_t r, int64_t r_cap, const float* block, int64_t q,
                                          int64_t q_cap, float* p) {
  const float* s0 = sa;
  const float* s1 = sa + r_cap;
  const float* s2 = sa + 2 * r_cap;
  const float* s3 = sa + 3 * r_cap;
  int64_t c0 = 0;
  for (; c0 + kLanes<vec> <= q; c0 += kLanes<vec>) {
    vec a0 = {}, a1 = {}, a2 = {}, a3 = {}, b;
    for (int64_t j = 0; j < r; ++j) {
      std::memcpy(&b, block + j * q_cap + c0, sizeof b);  // unaligned vector load
      a0 += s0[j] * b;
      a1 += s1[j] * b;
      a2 += s2[j] * b;
      a3 += s3[j] * b;
    }
    std::memcpy(p + c0, &a0, sizeof a0);
    std::memcpy(p + q_cap + c0, &a1, sizeof a1);
    std::memcpy(p + 2 * q_cap + c0, &a2, sizeof a2);
    std::memcpy(p + 3 * q_cap + c0, &a3, sizeof a3);
  }
  for (int64_t c = c0; c < q; ++c) {  // the last q % kLanes columns
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t j = 0; j < r; ++j) {
      const float b = block[j * q_cap + c];
      a0 += s0[j] * b;
      a1 += s1[j] * b;
      a2 += s2[j] * b;
      a3 += s3[j] * b;
    }
    p[c] = a0;
    p[q_cap + c] = a1;
    p[2 * q_cap + c] = a2;
    p[3 * q_cap + c] = a3;
  }
}

// block_products for float32, one version per ISA with its register width (cpu_clones.h says why
// not target_clones); fewer than four rows take the generic loop, compiled for the same ISA.
template <typename vec>
MISS_CPU_INLINE void block_products_f32_for(const float* sa, int64_t r, int64_t r_cap, const float* block, int64_t q,
                                            int64_t q_cap, int64_t n, float* p) {
  if (n == kRowGroup) return block_products_4rows<vec>(sa, r, r_cap, block, q, q_cap, p);
  block_products<float, float>(sa, r, r_cap, block, q, q_cap, n, p);
}
using BlockProductsFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*);
MISS_CPU_TARGET("arch=x86-64-v4")
void block_products_avx512(const float* sa, int64_t r, int64_t r_cap, const float* block, int64_t q, int64_t q_cap,
                           int64_t n, float* p) {
  block_products_f32_for<f32x16>(sa, r, r_cap, block, q, q_cap, n, p);
}
MISS_CPU_TARGET("arch=x86-64-v3")
void block_products_avx2(const float* sa, int64_t r, int64_t r_cap, const float* block, int64_t q, int64_t q_cap,
                         int64_t n, float* p) {
  block_products_f32_for<f32x8>(sa, r, r_cap, block, q, q_cap, n, p);
}
void block_products_baseline(const float* sa, int64_t r, int64_t r_cap, const float* block, int64_t q,
                             int64_t q_cap, int64_t n, float* p) {
  block_products_f32_for<f32x4>(sa, r, r_cap, block, q, q_cap, n, p);
}

// This CPU's version, picked at the first use (once per process, for every instance of bank_add_rows).
BlockProductsFn block_products_for_cpu() {
  static const BlockProductsFn picked =
      pick_for_cpu(&block_products_avx512, &block_products_avx2, &block_products_baseline);
  return picked;
}

template <typename y_t, typename a_t>
void bank_add_rows(y_t* y, const a_t* s, const a_t* bank, const int64_t* ranks, const int64_t* periods,
                   const int64_t* index, int64_t rows, int64_t out, int64_t R, int64_t slots, int64_t r_cap,
                   int64_t q_cap) {
  using acc = acc_t<y_t, a_t>;
  const RowsBySlot g = rows_by_slot(index, rows, slots);
  const std::vector<Task> tasks = row_tasks(g, slots);
  [[maybe_unused]] BlockProductsFn products_f32 = nullptr;
  if constexpr (std::is_same_v<acc, float> && std::is_same_v<a_t, float>) products_f32 = block_products_for_cpu();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<acc> sa(kRowGroup * r_cap), p(kRowGroup * q_cap);
    for (int64_t k = first; k < last; ++k) {
      const Task task = tasks[k];
      const int64_t r = ranks[task.slot], q = periods[task.slot];
      const a_t* block = bank + bank_offset(task.slot, 0, 0, r_cap, q_cap);
      for (int64_t i = task.begin; i < task.end; i += kRowGroup) {
        const int64_t n = std::min(kRowGroup, task.end - i);
        for (int64_t u = 0; u < n; ++u)
          for (int64_t j = 0; j < r; ++j) sa[u * r_cap + j] = bank_fold_column<acc>(s + g.order[i + u] * R, R, r, j);
        if constexpr (std::is_same_v<acc, float> && std::is_same_v<a_t, float>) {
          products_f32(sa.data(), r, r_cap, block, q, q_cap, n, p.data());
        } else {
          block_products(sa.data(), r, r_cap, block, q, q_cap, n, p.data());
        }
        for (int64_t u = 0; u < n; ++u) {
          y_t* yr = y + g.order[i + u] * out;
          const acc* pu = p.data() + u * q_cap;
          for (int64_t o0 = 0; o0 < out; o0 += q)
            for (int64_t c = 0; c < q; ++c) yr[o0 + c] = static_cast<y_t>(static_cast<acc>(yr[o0 + c]) + pu[c]);
        }
      }
    }
  });
}

template <typename g_t, typename a_t>
void bank_grad_rows(const g_t* grad, const a_t* s, const a_t* bank, const int64_t* ranks, const int64_t* periods,
                    const int64_t* index, int64_t rows, int64_t out, int64_t R, int64_t slots, int64_t r_cap,
                    int64_t q_cap, a_t* grad_s, a_t* grad_bank) {
  using acc = acc_t<g_t, a_t>;
  const RowsBySlot g = rows_by_slot(index, rows, slots);

  // grad_s[t, k] = d[k mod r], d[j] = sum_c gq[c] block[j][c]. Rows without a slot stay zero.
  // gq (out / q terms per column: 4096 at mini_r = 1) is the fold of G's row at period q
  // (fold_row: a cascade); the dot products over q (= out for a default slot) sum in three levels
  // of kSumBlock (blocks of 64, of 4096, then the rest), which leaves the inner loop as it was.
  // One running sum per row was 3.5e-6 off (relative) at out = 65536 where torch's sum is 4e-8
  // (test_bank.py).
  const std::vector<Task> tasks = row_tasks(g, slots);
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<acc> gq(q_cap), d(r_cap), upper;
    for (int64_t k = first; k < last; ++k) {
      const Task task = tasks[k];
      const int64_t r = ranks[task.slot], q = periods[task.slot];
      const int64_t scratch = fold_row_scratch(out, q);
      if (static_cast<int64_t>(upper.size()) < scratch) upper.resize(scratch);
      const a_t* block = bank + bank_offset(task.slot, 0, 0, r_cap, q_cap);
      for (int64_t i = task.begin; i < task.end; ++i) {
        const int64_t t = g.order[i];
        const g_t* gr = grad + t * out;
        std::fill(gq.begin(), gq.begin() + q, acc(0));
        fold_row(gr, out, q, static_cast<const acc*>(nullptr), gq.data(), upper.data());  // G's copies of period q
        for (int64_t j = 0; j < r; ++j) {
          const a_t* brow = block + j * q_cap;
          acc dot = acc(0);
          for (int64_t c2 = 0; c2 < q; c2 += kSumBlock * kSumBlock) {
            acc mid = acc(0);
            for (int64_t c0 = c2, c3 = std::min(c2 + kSumBlock * kSumBlock, q); c0 < c3; c0 += kSumBlock) {
              acc part = acc(0);
              for (int64_t c = c0, c1 = std::min(c0 + kSumBlock, q); c < c1; ++c)
                part += gq[c] * static_cast<acc>(brow[c]);
              mid += part;
            }
            dot += mid;
          }
          d[j] = dot;
        }
        a_t* gs = grad_s + t * R;
        for (int64_t kk = 0; kk < R; ++kk) gs[kk] = static_cast<a_t>(d[kk % r]);
      }
    }
  });

  // grad_bank[a, j, c] = sum over the rows of a, in row order, of s_a[j] gq[c], in a cascade
  // (row_helpers.h: a running float32 sum over 65536 rows was 37x less accurate than the GEMM a
  // MissLinear's block gradient takes).
  std::vector<Task> column_tasks;
  for (int64_t a = 0; a < slots; ++a)
    if (g.offsets[a + 1] > g.offsets[a])
      for (int64_t c0 = 0; c0 < periods[a]; c0 += kColumnsPerTask)
        column_tasks.push_back({a, c0, std::min(c0 + kColumnsPerTask, periods[a])});
  at::parallel_for(0, static_cast<int64_t>(column_tasks.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<acc> sums(r_cap * kColumnsPerTask), upper, gq(kColumnsPerTask), sa(r_cap);
    for (int64_t k = first; k < last; ++k) {
      const Task task = column_tasks[k];
      const int64_t r = ranks[task.slot], q = periods[task.slot], width = task.end - task.begin;
      const int64_t used = r * kColumnsPerTask;  // sums[j * kColumnsPerTask + c], j < r
      const int64_t levels = cascade_levels(g.offsets[task.slot + 1] - g.offsets[task.slot]);
      if (static_cast<int64_t>(upper.size()) < levels * used) upper.resize(levels * used);
      std::fill(sums.begin(), sums.end(), acc(0));
      std::fill(upper.begin(), upper.begin() + levels * used, acc(0));
      for (int64_t i = g.offsets[task.slot]; i < g.offsets[task.slot + 1]; ++i) {
        const int64_t t = g.order[i];
        const g_t* gr = grad + t * out;
        for (int64_t c = 0; c < width; ++c) gq[c] = bank_fold_grad<acc>(gr, out, q, task.begin + c);
        for (int64_t j = 0; j < r; ++j) sa[j] = bank_fold_column<acc>(s + t * R, R, r, j);
        for (int64_t j = 0; j < r; ++j) {
          acc* row = sums.data() + j * kColumnsPerTask;
          const acc sj = sa[j];
          for (int64_t c = 0; c < width; ++c) row[c] += sj * gq[c];
        }
        if (levels > 0) cascade_carry(sums.data(), upper.data(), levels, used, i - g.offsets[task.slot] + 1);
      }
      cascade_finish(sums.data(), upper.data(), levels, used);
      for (int64_t j = 0; j < r; ++j)
        for (int64_t c = 0; c < width; ++c)
          grad_bank[bank_offset(task.slot, j, task.begin + c, r_cap, q_cap)] =
              static_cast<a_t>(sums[j * kColumnsPerTask + c]);
    }
  });
}

void check_values(const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks, const at::Tensor& periods,
                  const at::Tensor& index, int64_t out, bool per_row_fold) {
  check_bank_values(ranks.const_data_ptr<int64_t>(), periods.const_data_ptr<int64_t>(), bank.size(0),
                    index.const_data_ptr<int64_t>(), index.numel(), s.size(1), out, bank.size(1), bank.size(2),
                    per_row_fold);
}

}  // namespace

void bank_add_kernel_cpu(at::Tensor& y, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                         const at::Tensor& periods, const at::Tensor& index, bool per_row_fold) {
  check_values(s, bank, ranks, periods, index, y.size(1), per_row_fold);
  dispatch_bank(y.scalar_type(), bank.scalar_type(), [&](auto y0, auto a0) {
    using y_t = decltype(y0);
    using a_t = decltype(a0);
    bank_add_rows<y_t, a_t>(y.mutable_data_ptr<y_t>(), s.const_data_ptr<a_t>(), bank.const_data_ptr<a_t>(),
                            ranks.const_data_ptr<int64_t>(), periods.const_data_ptr<int64_t>(),
                            index.const_data_ptr<int64_t>(), y.size(0), y.size(1), s.size(1), bank.size(0),
                            bank.size(1), bank.size(2));
  });
}

void bank_grad_kernel_cpu(const at::Tensor& grad, const at::Tensor& s, const at::Tensor& bank, const at::Tensor& ranks,
                          const at::Tensor& periods, const at::Tensor& index, bool per_row_fold, at::Tensor& grad_s,
                          at::Tensor& grad_bank) {
  check_values(s, bank, ranks, periods, index, grad.size(1), per_row_fold);
  dispatch_bank(grad.scalar_type(), bank.scalar_type(), [&](auto g0, auto a0) {
    using g_t = decltype(g0);
    using a_t = decltype(a0);
    bank_grad_rows<g_t, a_t>(grad.const_data_ptr<g_t>(), s.const_data_ptr<a_t>(), bank.const_data_ptr<a_t>(),
                             ranks.const_data_ptr<int64_t>(), periods.const_data_ptr<int64_t>(),
                             index.const_data_ptr<int64_t>(), grad.size(0), grad.size(1), s.size(1), bank.size(0),
                             bank.size(1), bank.size(2), grad_s.mutable_data_ptr<a_t>(),
                             grad_bank.mutable_data_ptr<a_t>());
  });
}

}  // namespace miss_ext
