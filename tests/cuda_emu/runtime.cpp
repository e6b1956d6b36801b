// cuda_emu runtime: fibers, barriers, warp shuffles, launch checks, error recording and the UB
// sanitizer's handlers. See include/cuda_emu.h. Process-global state: the bindings serialise calls.
#include "cuda_emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

#if defined(__x86_64__)
// cuda_emu_switch(&save_sp, new_sp): saves the callee-saved registers, MXCSR and the x87 control
// word on the current stack, stores its pointer in *save_sp and resumes the stack new_sp.
extern "C" void cuda_emu_switch(void** save_sp, void* new_sp);
asm(R"(
  .text
  .p2align 4
  .type cuda_emu_switch,@function
cuda_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuda_emu_switch, .-cuda_emu_switch
)");
#endif

namespace cuda_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;   // without cudaFuncSetAttribute
constexpr size_t kMaxOptInShared = 227 * 1024;    // sm_90 opt-in limit
constexpr size_t kMaxParamBytes = 4096;

enum State { kReady, kWaitBarrier, kWaitWarp, kExited, kTrapped };

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* stack_lo = nullptr;  // above the guard page
  int lin = 0;
  uint3 tid{0, 0, 0};
  State state = kReady;
  const char* wfile = "";
  int wline = 0;
  uint64_t result = 0;
};

enum OpKind { kOpShfl, kOpSyncwarp };

struct WarpOp {
  int op = kOpShfl;
  int kind = 0;
  unsigned mask = 0;
  unsigned arrived = 0;
  const char* file = "";
  int line = 0;
  int width = 32;
  uint64_t val[32] = {};
  int arg[32] = {};
};

struct LaunchRecord {
  LaunchInfo info;
  std::string expr, file;
  bool ran;
};

const char* kSchedNames[] = {"forward", "reverse", "random"};

struct Runtime {
  // call-level state
  std::vector<std::string> errors;       // kernel-time errors (sticky, as on a GPU)
  std::string pending_launch_error;      // consumed by C10_CUDA_KERNEL_LAUNCH_CHECK
  std::string pending_launch_where;
  std::vector<std::string> unchecked;    // launch errors nobody checked
  std::vector<LaunchRecord> launches;
  std::map<const void*, long> max_dynamic_shared;
  int schedule = 0;
  uint64_t seed = 0;
  // launch-level state
  bool in_kernel = false;
  bool abort_launch = false;
  bool stop_after_block = false;
  const LaunchInfo* info = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  int nthreads = 0;
  int nexited = 0;
  Fiber* current = nullptr;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  int barrier_arrived = 0;
  const char* barrier_file = "";
  int barrier_line = 0;
  std::vector<std::vector<WarpOp>> warp_ops;
  std::vector<unsigned> exited_lanes, existing_lanes;
  char* dyn = nullptr;  // dynamic shared memory of this launch (ends at a guard page)
  size_t dyn_bytes = 0;
  char* dyn_map = nullptr;
  size_t dyn_map_bytes = 0;
  std::mt19937_64 rng;
};

Runtime rt;  // one launcher call at a time per process (bindings.cpp holds a lock)

std::string where(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

std::string thread_name() {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z,
                threadIdx.x, threadIdx.y, threadIdx.z);
  return buf;
}

std::string launch_name() {
  if (rt.info == nullptr) return "outside a kernel";
  char buf[200];
  std::snprintf(buf, sizeof buf, " [kernel `%s` launched at %s:%d, grid (%u,%u,%u), block (%u,%u,%u), %zu B shared]",
                rt.info->expr, rt.info->file, rt.info->line, rt.info->grid.x, rt.info->grid.y, rt.info->grid.z,
                rt.info->block.x, rt.info->block.y, rt.info->block.z, rt.info->shmem);
  return buf;
}

void record(const std::string& msg) {
  if (rt.errors.size() < 20) {
    for (const auto& e : rt.errors)
      if (e == msg) return;
    rt.errors.push_back(msg);
  }
}

// Kernel-time error: recorded; the launch stops (as a trapped kernel does).
void fail(const std::string& msg) {
  record(msg + (rt.in_kernel ? " in " + thread_name() : "") + launch_name());
  rt.abort_launch = true;
}

void yield_to_scheduler() {
  Fiber* f = rt.current;
#if defined(__x86_64__)
  cuda_emu_switch(&f->sp, rt.sched_sp);
#else
  swapcontext(&f->uc, &rt.sched_uc);
#endif
}

void fiber_exited(Fiber* f);

void fiber_entry() {
  Fiber* f = rt.current;
  try {
    rt.body(rt.ctx);
  } catch (const std::exception& e) {
    fail(std::string("C++ exception escaped the kernel: ") + e.what());
  } catch (...) {
    fail("C++ exception escaped the kernel");
  }
  f->state = kExited;
  fiber_exited(f);
  yield_to_scheduler();
  std::abort();  // never resumed
}

#if !defined(__x86_64__)
void fiber_entry_c() { fiber_entry(); }
#endif

char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    std::fprintf(stderr, "cuda_emu: cannot map a fiber stack\n");
    std::abort();
  }
  mprotect(p, page, PROT_NONE);  // overflow faults instead of corrupting a neighbour
  return static_cast<char*>(p) + page;
}

void start_fiber(Fiber& f) {
#if defined(__x86_64__)
  uint64_t* top = reinterpret_cast<uint64_t*>(f.stack_lo + kStackBytes);  // 16-byte aligned
  uint32_t ctl[2];
  asm volatile("stmxcsr %0" : "=m"(ctl[0]));
  asm volatile("fnstcw %0" : "=m"(ctl[1]));
  uint64_t* sp = top - 9;
  std::memcpy(sp, ctl, 8);                               // MXCSR, x87 control word
  for (int i = 1; i <= 6; ++i) sp[i] = 0;                // r15 r14 r13 r12 rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&fiber_entry);      // returned to by cuda_emu_switch
  sp[8] = 0;                                             // fiber_entry's (absent) return address
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = kStackBytes;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_entry_c, 0);
#endif
}

void resume(Fiber& f) {
  rt.current = &f;
  threadIdx = f.tid;
#if defined(__x86_64__)
  cuda_emu_switch(&rt.sched_sp, f.sp);
#else
  swapcontext(&rt.sched_uc, &f.uc);
#endif
  rt.current = nullptr;
}

void release_barrier_if_complete() {
  if (rt.barrier_arrived > 0 && rt.barrier_arrived + rt.nexited == rt.nthreads) {
    for (Fiber& f : rt.fibers)
      if (f.state == kWaitBarrier) f.state = kReady;
    rt.barrier_arrived = 0;
  }
}

std::string lanes_text(unsigned m) {
  std::string s;
  for (int i = 0; i < 32; ++i)
    if (m >> i & 1u) s += (s.empty() ? "" : ",") + std::to_string(i);
  return "{" + s + "}";
}

// Completes `op` (all lanes of its mask arrived, or exited for __syncwarp) and wakes its lanes.
void complete(int warp, size_t index) {
  WarpOp op = rt.warp_ops[warp][index];
  rt.warp_ops[warp].erase(rt.warp_ops[warp].begin() + static_cast<long>(index));
  for (int i = 0; i < 32; ++i) {
    if (!(op.arrived >> i & 1u)) continue;
    Fiber& f = rt.fibers[warp * 32 + i];
    if (op.op == kOpShfl) {
      const int w = op.width;
      const int a = op.arg[i];
      int src = i;
      switch (op.kind) {
        case kShflIdx: src = (i / w) * w + ((a % w) + w) % w; break;
        case kShflUp: src = (i % w) >= a ? i - a : i; break;
        case kShflDown: src = (i % w) + a < w ? i + a : i; break;
        case kShflXor: src = i ^ a; if (src >= (i / w + 1) * w || src > 31 || src < 0) src = i; break;
      }
      if (!(op.mask >> src & 1u)) {
        fail("shuffle at " + where(op.file, op.line) + ": lane " + std::to_string(i) + " reads lane " +
             std::to_string(src) + ", which is not in the mask " + lanes_text(op.mask) + " (undefined value)");
      }
      f.result = op.val[src];
    }
    if (f.state == kWaitWarp) f.state = kReady;
  }
}

void check_syncwarps(int warp) {
  for (size_t k = 0; k < rt.warp_ops[warp].size();) {
    WarpOp& op = rt.warp_ops[warp][k];
    const unsigned gone = rt.exited_lanes[warp] | ~rt.existing_lanes[warp];
    if (op.op == kOpSyncwarp && ((op.arrived | gone) & op.mask) == op.mask) {
      complete(warp, k);
    } else {
      ++k;
    }
  }
}

void fiber_exited(Fiber* f) {
  ++rt.nexited;
  const int warp = f->lin / 32, lane = f->lin % 32;
  rt.exited_lanes[warp] |= 1u << lane;
  for (const WarpOp& op : rt.warp_ops[warp]) {
    if (op.op == kOpShfl && (op.mask >> lane & 1u)) {
      fail("lane " + std::to_string(lane) + " exited while lanes " + lanes_text(op.arrived) + " of its warp wait in the shuffle at " +
           where(op.file, op.line) + " with mask " + lanes_text(op.mask) + " (undefined behaviour)");
    }
  }
  check_syncwarps(warp);
  release_barrier_if_complete();
}

std::string waiting_text() {
  std::map<std::string, std::vector<int>> by_site;
  for (const Fiber& f : rt.fibers) {
    if (f.state == kWaitBarrier) by_site["__syncthreads at " + where(f.wfile, f.wline)].push_back(f.lin);
    if (f.state == kWaitWarp) by_site["a warp operation at " + where(f.wfile, f.wline)].push_back(f.lin);
  }
  std::string s;
  for (const auto& [site, ids] : by_site) {
    s += "; " + std::to_string(ids.size()) + " thread(s) wait in " + site + " (first: linear id " + std::to_string(ids[0]) + ")";
  }
  s += "; " + std::to_string(rt.nexited) + " exited";
  return s;
}

void run_block() {
  const int n = rt.nthreads;
  for (int i = 0; i < n; ++i) {
    Fiber& f = rt.fibers[i];
    f.lin = i;
    f.tid = uint3{static_cast<unsigned>(i % blockDim.x), static_cast<unsigned>((i / blockDim.x) % blockDim.y),
                  static_cast<unsigned>(i / (blockDim.x * blockDim.y))};
    f.state = kReady;
    f.result = 0;
    start_fiber(f);
  }
  rt.nexited = 0;
  rt.barrier_arrived = 0;
  const int warps = (n + 31) / 32;
  rt.warp_ops.assign(warps, {});
  rt.exited_lanes.assign(warps, 0u);
  rt.existing_lanes.assign(warps, 0u);
  for (int i = 0; i < n; ++i) rt.existing_lanes[i / 32] |= 1u << (i % 32);
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = rt.schedule == 1 ? n - 1 - i : i;
  while (!rt.abort_launch) {
    if (rt.schedule == 2) std::shuffle(order.begin(), order.end(), rt.rng);
    bool progressed = false;
    for (int i : order) {
      if (rt.fibers[i].state != kReady) continue;
      progressed = true;
      resume(rt.fibers[i]);
      if (rt.abort_launch) break;
    }
    if (rt.abort_launch || rt.nexited == n) break;
    if (!progressed) {
      bool trapped = false;
      for (const Fiber& f : rt.fibers)
        if (f.state == kTrapped) trapped = true;
      if (!trapped) {
        record("deadlock: no thread of block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
               std::to_string(blockIdx.z) + ") can proceed" + waiting_text() + launch_name());
      }
      rt.abort_launch = true;
    }
  }
  threadIdx = uint3{0, 0, 0};
}

// ---- fenced memory: out-of-bounds accesses ----
// A GPU reports an access outside every allocation (compute-sanitizer memcheck, an illegal-address
// error). Here the tests put each tensor a launcher gets into a mapping of its own whose first or
// last byte touches a PROT_NONE page (fenced_alloc), and while kernels run a SIGSEGV handler turns
// a fault on such a page, or on the guard page after the dynamic shared memory, into a recorded
// error that stops the thread and the launch, as a GPU's trap would.

struct FencedAlloc {
  char* map;
  size_t map_bytes;
  char* data;
  size_t bytes;
  std::string label;
};
// Allocations come and go from Python (a tensor's deleter); the handler reads the list without the
// lock, which is safe because the bindings hold the GIL through a launch, so no deleter runs then.
std::mutex fenced_lock;
std::vector<FencedAlloc> fenced;
struct sigaction previous_segv;

size_t page_bytes() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

std::string fence_text(size_t k, const char* side, const std::string& what, size_t bytes, const void* data) {
  char buf[320];
  std::snprintf(buf, sizeof buf, "byte %zu %s %s (%zu bytes at %p)", k, side, what.c_str(), bytes, data);
  return buf;
}

// What a fault at `a` hit, or "" when it is not on one of our fence pages.
std::string describe_fault(uintptr_t a) {
  const uintptr_t page = page_bytes();
  auto in_page = [&](const char* lo) { return a >= reinterpret_cast<uintptr_t>(lo) && a < reinterpret_cast<uintptr_t>(lo) + page; };
  if (rt.dyn_map != nullptr && in_page(rt.dyn_map + rt.dyn_map_bytes - page))
    return fence_text(a - reinterpret_cast<uintptr_t>(rt.dyn + rt.dyn_bytes), "after the end of", "the dynamic shared memory",
                      rt.dyn_bytes, rt.dyn);
  for (const FencedAlloc& f : fenced) {
    if (in_page(f.map))
      return fence_text(reinterpret_cast<uintptr_t>(f.data) - a, "before the start of", f.label, f.bytes, f.data);
    if (in_page(f.map + f.map_bytes - page))
      return fence_text(a - reinterpret_cast<uintptr_t>(f.data + f.bytes), "after the end of", f.label, f.bytes, f.data);
  }
  return "";
}

// Runs on the alternate signal stack (or the faulting fiber's) and, for our pages, never returns:
// the fiber is abandoned as a trapped thread, and SA_NODEFER leaves SIGSEGV unblocked for the
// next fault.
// The fault is synchronous, in kernel code that does not allocate, so formatting the message
// here is safe in practice (a test tool, not a library).
void on_segv(int sig, siginfo_t* info, void* uc) {
  if (rt.in_kernel && rt.current != nullptr) {
    const std::string what = describe_fault(reinterpret_cast<uintptr_t>(info->si_addr));
    if (!what.empty()) {
      fail("out-of-bounds memory access: " + what);
      rt.current->state = kTrapped;
      yield_to_scheduler();
    }
  }
  // Not ours: put the previous handler back and return; the access faults again under it.
  sigaction(SIGSEGV, &previous_segv, nullptr);
  (void)sig;
  (void)uc;
}

}  // namespace

void* fenced_alloc(size_t bytes, bool at_end, const std::string& label) {
  const size_t page = page_bytes();
  const size_t data_pages = (bytes + page - 1) / page * page;
  const size_t map_bytes = data_pages + 2 * page;
  void* p = mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map fenced memory of " + std::to_string(bytes) + " bytes");
  char* map = static_cast<char*>(p);
  mprotect(map, page, PROT_NONE);
  mprotect(map + map_bytes - page, page, PROT_NONE);
  char* data = at_end ? map + page + data_pages - bytes : map + page;
  const std::lock_guard<std::mutex> lock(fenced_lock);
  fenced.push_back(FencedAlloc{map, map_bytes, data, bytes, label});
  return data;
}

void fenced_free(void* data) {
  const std::lock_guard<std::mutex> lock(fenced_lock);
  for (size_t i = 0; i < fenced.size(); ++i) {
    if (fenced[i].data == data) {
      munmap(fenced[i].map, fenced[i].map_bytes);
      fenced.erase(fenced.begin() + static_cast<long>(i));
      return;
    }
  }
}

namespace {

struct SegvHandler {  // installed while a launch runs its blocks
  SegvHandler() {
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    // SA_ONSTACK: a fiber's stack overflow (its guard page) can only be reported from the
    // alternate stack Python's faulthandler installs; from there, a fault that is ours switches
    // to the scheduler as it would from the fiber's stack.
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &previous_segv);
  }
  ~SegvHandler() { sigaction(SIGSEGV, &previous_segv, nullptr); }
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Shared memory

extern "C" char __start_cuda_emu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_emu_shared[] __attribute__((weak));

void* dynamic_shared() { return rt.dyn; }

void set_max_dynamic_shared(const void* kernel, long bytes) { rt.max_dynamic_shared[kernel] = bytes; }

// ---------------------------------------------------------------------------------------------
// Barriers and warp operations

void syncthreads(const char* file, int line) {
  Fiber* f = rt.current;
  if (f == nullptr) {
    record("__syncthreads called outside a kernel at " + where(file, line));
    return;
  }
  if (rt.barrier_arrived == 0) {
    rt.barrier_file = file;
    rt.barrier_line = line;
  } else if (rt.barrier_line != line || std::strcmp(rt.barrier_file, file) != 0) {
    fail("divergent __syncthreads: this thread is at " + where(file, line) + " while " +
         std::to_string(rt.barrier_arrived) + " thread(s) wait at " + where(rt.barrier_file, rt.barrier_line));
    f->state = kTrapped;
    yield_to_scheduler();
  }
  f->state = kWaitBarrier;
  f->wfile = file;
  f->wline = line;
  ++rt.barrier_arrived;
  release_barrier_if_complete();
  if (f->state != kReady) yield_to_scheduler();
}

static uint64_t warp_op(int opk, int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  Fiber* f = rt.current;
  const char* name = opk == kOpSyncwarp ? "__syncwarp" : "shuffle";
  if (f == nullptr) {
    record(std::string(name) + " called outside a kernel at " + where(file, line));
    return bits;
  }
  const int warp = f->lin / 32, lane = f->lin % 32;
  auto trap = [&](const std::string& msg) {
    fail(msg);
    f->state = kTrapped;
    yield_to_scheduler();
  };
  if (!(mask >> lane & 1u)) trap(std::string(name) + " at " + where(file, line) + ": the calling lane " + std::to_string(lane) +
                                 " is not in its mask " + lanes_text(mask));
  if (opk == kOpShfl) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
      trap("shuffle at " + where(file, line) + " with width " + std::to_string(width) + " (must be a power of two <= 32)");
    const unsigned gone = mask & (rt.exited_lanes[warp] | ~rt.existing_lanes[warp]);
    if (gone != 0)
      trap("shuffle at " + where(file, line) + " with mask " + lanes_text(mask) + " while lanes " + lanes_text(gone) +
           " of the warp have exited or do not exist (undefined behaviour)");
  }
  std::vector<WarpOp>& ops = rt.warp_ops[warp];
  size_t k = 0;
  for (; k < ops.size(); ++k)
    if (ops[k].mask == mask) break;
  if (k < ops.size()) {
    WarpOp& op = ops[k];
    const bool same = op.op == opk && (opk == kOpSyncwarp || (op.kind == kind && op.line == line &&
                                                              std::strcmp(op.file, file) == 0 && op.width == width));
    if (!same)
      trap(std::string("divergent warp operation: lane ") + std::to_string(lane) + " is at " + name + " " + where(file, line) +
           " while lanes " + lanes_text(op.arrived) + " wait at " + (op.op == kOpSyncwarp ? "__syncwarp " : "shuffle ") +
           where(op.file, op.line));
    if (op.arrived >> lane & 1u) trap("lane arrived twice at one warp operation (internal)");
  } else {
    for (const WarpOp& other : ops)
      if (other.mask & mask)
        trap(std::string(name) + " at " + where(file, line) + " with mask " + lanes_text(mask) +
             " overlaps a pending warp operation at " + where(other.file, other.line) + " with mask " + lanes_text(other.mask));
    WarpOp op;
    op.op = opk;
    op.kind = kind;
    op.mask = mask;
    op.file = file;
    op.line = line;
    op.width = width;
    ops.push_back(op);
    k = ops.size() - 1;
  }
  WarpOp& op = ops[k];
  op.arrived |= 1u << lane;
  op.val[lane] = bits;
  op.arg[lane] = arg;
  f->state = kWaitWarp;
  f->wfile = file;
  f->wline = line;
  const unsigned gone = opk == kOpSyncwarp ? (rt.exited_lanes[warp] | ~rt.existing_lanes[warp]) : 0u;
  if (((op.arrived | gone) & op.mask) == op.mask) complete(warp, k);
  if (f->state != kReady) yield_to_scheduler();
  return f->result;
}

void syncwarp(const char* file, int line, unsigned mask) { warp_op(kOpSyncwarp, 0, mask, 0, 0, 32, file, line); }

uint64_t shfl(int kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line) {
  return warp_op(kOpShfl, kind, mask, bits, arg, width, file, line);
}

void kernel_assert_failed(const char* cond, const char* file, int line) {
  fail(std::string("device-side assertion `") + cond + "` failed at " + where(file, line));
  if (rt.current != nullptr) {
    rt.current->state = kTrapped;
    yield_to_scheduler();
  }
  throw std::runtime_error("cuda_emu: device-side assertion outside a kernel");
}

// ---------------------------------------------------------------------------------------------
// Launch

void launch_check(const char* file, int line) {
  if (rt.pending_launch_error.empty()) return;
  const std::string msg = rt.pending_launch_error;
  rt.pending_launch_error.clear();
  throw std::runtime_error("CUDA error: invalid launch (cuda_emu: " + msg + "), checked at " + where(file, line));
}

static std::string config_error(const LaunchInfo& i) {
  const dim3 g = i.grid, b = i.block;
  char buf[256];
  if (b.x < 1 || b.y < 1 || b.z < 1 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
      uint64_t(b.x) * b.y * b.z > uint64_t(kMaxThreads)) {
    std::snprintf(buf, sizeof buf, "block (%u,%u,%u): each size >= 1, x,y <= 1024, z <= 64 and at most 1024 threads", b.x, b.y, b.z);
    return buf;
  }
  if (g.x < 1 || g.x > 2147483647u || g.y < 1 || g.y > 65535 || g.z < 1 || g.z > 65535) {
    std::snprintf(buf, sizeof buf, "grid (%u,%u,%u): x in [1, 2^31-1], y and z in [1, 65535]", g.x, g.y, g.z);
    return buf;
  }
  auto it = rt.max_dynamic_shared.find(i.kernel);
  const size_t cap = it == rt.max_dynamic_shared.end() ? kMaxDynamicShared : std::min<size_t>(it->second, kMaxOptInShared);
  if (i.shmem > cap) {
    std::snprintf(buf, sizeof buf, "%zu bytes of dynamic shared memory, over the %zu allowed%s", i.shmem, cap,
                  it == rt.max_dynamic_shared.end() ? " without cudaFuncSetAttribute" : "");
    return buf;
  }
  if (i.param_bytes > kMaxParamBytes) {
    std::snprintf(buf, sizeof buf, "%zu bytes of kernel parameters (at most %zu)", i.param_bytes, kMaxParamBytes);
    return buf;
  }
  return "";
}

void launch_impl(const LaunchInfo& info, void (*body)(void*), void* ctx) {
  rt.launches.push_back(LaunchRecord{info, info.expr, info.file, false});
  const std::string here = std::string(" (kernel `") + info.expr + "` at " + where(info.file, info.line) + ")";
  if (!rt.errors.empty()) {  // a GPU context with a sticky error runs nothing more
    record("launch skipped after an earlier kernel error" + here);
    return;
  }
  if (rt.in_kernel) {
    record("kernel launched from inside a kernel" + here);
    return;
  }
  if (!rt.pending_launch_error.empty()) {
    rt.unchecked.push_back(rt.pending_launch_error + " [" + rt.pending_launch_where + "]");
  }
  rt.pending_launch_error.clear();
  const std::string bad = config_error(info);
  if (!bad.empty()) {
    rt.pending_launch_error = bad + here;
    rt.pending_launch_where = where(info.file, info.line);
    return;
  }
  rt.launches.back().ran = true;
  // Dynamic shared memory: a fresh mapping whose end touches a guard page.
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t rounded = (info.shmem + 15) / 16 * 16;
  const size_t map_bytes = (rounded + page - 1) / page * page + page;
  if (rt.dyn_map != nullptr) munmap(rt.dyn_map, rt.dyn_map_bytes);
  rt.dyn_map = static_cast<char*>(mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  rt.dyn_map_bytes = map_bytes;
  mprotect(rt.dyn_map + map_bytes - page, page, PROT_NONE);
  rt.dyn = rt.dyn_map + map_bytes - page - rounded;
  rt.dyn_bytes = info.shmem;

  const int n = static_cast<int>(info.block.x * info.block.y * info.block.z);
  while (static_cast<int>(rt.stacks.size()) < n) rt.stacks.push_back(new_stack());
  rt.fibers.assign(n, Fiber());
  for (int i = 0; i < n; ++i) rt.fibers[i].stack_lo = rt.stacks[i];
  rt.nthreads = n;
  rt.info = &info;
  rt.body = body;
  rt.ctx = ctx;
  rt.abort_launch = false;
  rt.stop_after_block = false;
  rt.rng.seed(rt.seed);
  gridDim = info.grid;
  blockDim = info.block;

  char* const s_lo = __start_cuda_emu_shared;
  char* const s_hi = __stop_cuda_emu_shared;
  const size_t s_bytes = s_lo != nullptr ? static_cast<size_t>(s_hi - s_lo) : 0;
  if (s_bytes) std::memset(s_lo, 0xFF, s_bytes);
  size_t touched_lo = s_bytes, touched_hi = 0;  // static shared bytes this kernel writes

  const SegvHandler segv;
  rt.in_kernel = true;
  uint64_t block_count = 0;
  for (unsigned z = 0; z < info.grid.z && !rt.abort_launch && !rt.stop_after_block; ++z) {
    for (unsigned y = 0; y < info.grid.y && !rt.abort_launch && !rt.stop_after_block; ++y) {
      for (unsigned x = 0; x < info.grid.x && !rt.abort_launch && !rt.stop_after_block; ++x) {
        blockIdx = uint3{x, y, z};
        if (rt.dyn_bytes) std::memset(rt.dyn, 0xFF, rounded);  // poison: NaN for float data
        if (block_count > 0 && touched_lo < touched_hi) std::memset(s_lo + touched_lo, 0xFF, touched_hi - touched_lo);
        run_block();
        if (block_count == 0) {
          for (size_t b = 0; b < s_bytes; ++b)
            if (static_cast<unsigned char>(s_lo[b]) != 0xFF) {
              touched_lo = std::min(touched_lo, b);
              touched_hi = b + 1;
            }
        }
        ++block_count;
      }
    }
  }
  rt.in_kernel = false;
  rt.info = nullptr;
  blockIdx = uint3{0, 0, 0};
  gridDim = dim3();
  blockDim = dim3();
}

// ---------------------------------------------------------------------------------------------
// Test-facing control (bindings.cpp)

void begin_call() {
  rt.errors.clear();
  rt.pending_launch_error.clear();
  rt.unchecked.clear();
  rt.launches.clear();
}

std::string end_call() {
  std::vector<std::string> all = rt.errors;
  for (const auto& u : rt.unchecked) all.push_back("invalid launch not followed by C10_CUDA_KERNEL_LAUNCH_CHECK: " + u);
  if (!rt.pending_launch_error.empty())
    all.push_back("invalid launch not followed by C10_CUDA_KERNEL_LAUNCH_CHECK: " + rt.pending_launch_error);
  rt.pending_launch_error.clear();
  std::string s;
  for (const auto& e : all) s += (s.empty() ? "" : "\n") + e;
  return s;
}

void set_schedule(int mode, uint64_t seed) {
  rt.schedule = mode;
  rt.seed = seed;
}

std::vector<std::tuple<uintptr_t, std::string, std::string, int, std::vector<unsigned>, size_t, bool>> launch_records() {
  std::vector<std::tuple<uintptr_t, std::string, std::string, int, std::vector<unsigned>, size_t, bool>> out;
  for (const auto& l : rt.launches) {
    out.emplace_back(reinterpret_cast<uintptr_t>(l.info.kernel), l.expr, l.file, l.info.line,
                     std::vector<unsigned>{l.info.grid.x, l.info.grid.y, l.info.grid.z, l.info.block.x, l.info.block.y,
                                           l.info.block.z},
                     l.info.shmem, l.ran);
  }
  return out;
}

void record_ub(const std::string& msg, bool fatal) {
  record("UB sanitizer: " + msg + (rt.in_kernel ? " in " + thread_name() : "") + launch_name());
  if (!rt.in_kernel) return;
  if (fatal && rt.current != nullptr) {
    // The access itself must not run: g++ emits aligned SSE moves for 16-byte types, which
    // fault on a misaligned address. Stop this thread and the launch, as a GPU's trap would.
    rt.abort_launch = true;
    rt.current->state = kTrapped;
    yield_to_scheduler();
  }
  rt.stop_after_block = true;  // finish this block, then stop the launch
}

}  // namespace cuda_emu

// ---------------------------------------------------------------------------------------------
// UB sanitizer handlers (the kernels are compiled with -fsanitize=alignment,... and recovery;
// the module does not link libubsan, so these definitions receive the reports).

namespace {
struct SourceLocation {
  const char* file;
  uint32_t line;
  uint32_t column;
};
struct TypeDescriptor {
  uint16_t kind;
  uint16_t info;
  char name[1];
};
struct TypeMismatchData {
  SourceLocation loc;
  const TypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};

std::string loc_text(const void* data) {
  const SourceLocation* l = static_cast<const SourceLocation*>(data);
  if (l == nullptr || l->file == nullptr) return "?";
  return std::string(l->file) + ":" + std::to_string(l->line) + ":" + std::to_string(l->column);
}

void type_mismatch(void* data, uintptr_t ptr) {
  const TypeMismatchData* d = static_cast<const TypeMismatchData*>(data);
  const uintptr_t align = uintptr_t{1} << d->log_alignment;
  static const char* kinds[] = {"load of", "store to", "reference binding to", "member access within",
                                "member call on", "constructor call on", "downcast of", "downcast of",
                                "upcast of", "cast to virtual base of", "_Nonnull binding to", "dynamic operation on"};
  const char* what = d->check_kind < 12 ? kinds[d->check_kind] : "access to";
  char buf[512];
  if (ptr == 0) {
    std::snprintf(buf, sizeof buf, "%s null pointer of type %s at %s", what, d->type->name, loc_text(data).c_str());
  } else if (align > 1 && (ptr & (align - 1)) != 0) {
    std::snprintf(buf, sizeof buf, "misaligned %s address 0x%" PRIxPTR " for type %s, which requires %zu-byte alignment, at %s",
                  what, ptr, d->type->name, static_cast<size_t>(align), loc_text(data).c_str());
  } else {
    std::snprintf(buf, sizeof buf, "%s address 0x%" PRIxPTR " with insufficient space for type %s at %s", what, ptr,
                  d->type->name, loc_text(data).c_str());
  }
  cuda_emu::record_ub(buf, /*fatal=*/true);
}

void generic(const char* what, void* data) { cuda_emu::record_ub(std::string(what) + " at " + loc_text(data), false); }
}  // namespace

#define CUDA_EMU_UBSAN(name, text)                                                                        \
  extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_##name(void* d, uintptr_t, uintptr_t) { \
    generic(text, d);                                                                                     \
  }                                                                                                       \
  extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_##name##_abort(void* d, uintptr_t, uintptr_t) { \
    generic(text, d);                                                                                     \
    std::abort();                                                                                         \
  }

extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1(void* d, uintptr_t p) {
  type_mismatch(d, p);
}
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_type_mismatch_v1_abort(void* d, uintptr_t p) {
  type_mismatch(d, p);
  std::abort();
}
CUDA_EMU_UBSAN(out_of_bounds, "index out of bounds")
CUDA_EMU_UBSAN(shift_out_of_bounds, "shift out of bounds")
CUDA_EMU_UBSAN(add_overflow, "signed integer overflow in +")
CUDA_EMU_UBSAN(sub_overflow, "signed integer overflow in -")
CUDA_EMU_UBSAN(mul_overflow, "signed integer overflow in *")
CUDA_EMU_UBSAN(negate_overflow, "signed integer overflow in unary -")
CUDA_EMU_UBSAN(divrem_overflow, "division by zero or INT_MIN / -1")
CUDA_EMU_UBSAN(vla_bound_not_positive, "variable-length array bound not positive")
CUDA_EMU_UBSAN(load_invalid_value, "load of an invalid bool or enum value")
CUDA_EMU_UBSAN(pointer_overflow, "pointer arithmetic overflow")
CUDA_EMU_UBSAN(invalid_builtin, "invalid builtin argument (clz/ctz of 0)")
// Not recoverable: the code after them does not exist. Stop the CUDA thread (or the process).
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_builtin_unreachable(void* d) {
  cuda_emu::kernel_assert_failed(("__builtin_unreachable reached at " + loc_text(d)).c_str(), "(UB sanitizer)", 0);
}
extern "C" __attribute__((visibility("hidden"))) void __ubsan_handle_missing_return(void* d) {
  cuda_emu::kernel_assert_failed(("end of a value-returning function reached at " + loc_text(d)).c_str(), "(UB sanitizer)", 0);
}
