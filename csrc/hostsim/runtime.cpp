// gptoss hostsim runtime: runs CUDA kernels compiled for the host (hostsim.h) on the CPU, with
// checkers. Compiled WITHOUT instrumentation; the kernel files are compiled with
// -fsanitize=thread and this file implements the instrumentation's callbacks (__tsan_*), so every
// load and store of device code reaches access() below.
//
// What is emulated, and how (the PTX semantics follow the PTX ISA; tests/test_hostsim_ptx.py checks
// them against the ISA's fragment tables, independently of the kernels):
//  - a launch runs its clusters one after another (a plain launch: clusters of one block); the
//    threads of a cluster are fibers (switch_x86_64.S) that run until they block at a barrier or
//    collective; the order in which runnable threads (and blocks) are resumed is forward, reverse
//    or seeded random, changing from launch to launch (set_order);
//  - __syncthreads, cluster.sync, warp collectives (shfl/ballot/any/match/syncwarp, ldmatrix,
//    mma.sync) and warpgroup collectives (wgmma.*) complete when every named thread arrives;
//  - cp.async copies happen at cp.async.wait_group (a read of the destination before that is
//    reported); wgmma.mma_async results land in the registers at wgmma.wait_group, and the shared
//    memory it read must be unchanged by then;
//  - shared memory: static (a section, swapped between the blocks of a cluster) and dynamic (one
//    buffer per block), each byte shadowed: never-written reads, races (no barrier between two
//    threads' accesses, one a write), out-of-bounds dynamic offsets, generic writes read by wgmma
//    without fence.proxy.async;
//  - global memory: only the byte extents registered by the caller (begin_call) and the kernel's
//    own parameters may be touched; PDL: a kernel launched with programmatic stream serialization
//    may not write anything, nor read what the previous kernel wrote, before griddepcontrol.wait.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/stat.h>
#include <unistd.h>
#include <sys/mman.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "hostsim.h"
#include "hostsim_api.h"
#include "gptoss/arch.h"

namespace gptoss {
namespace arch {
void reset_cache();  // csrc/kernels/arch.cu: the emulated device changed
}  // namespace arch
}  // namespace gptoss

extern "C" void gptoss_hs_switch(void** save_sp, void* load_sp);
uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace gptoss_hostsim {
namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kMaxDynSmem = 227 * 1024;          // sm_90 opt-in limit per block
constexpr size_t kDefaultDynSmem = 48 * 1024;       // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kDynAlloc = 256 * 1024;            // per-block buffer (accesses past the launch's size are reported)
constexpr uint32_t kStaticWindowBase = 256 * 1024;  // shared-window address of the static shared memory
constexpr uint16_t kNone = 0xFFFF, kMulti = 0xFFFE;

enum State : uint8_t { kRunnable, kWaitBlock, kWaitColl, kWaitCluster, kDone };
enum Coll : uint8_t {
  kCollShfl = 1, kCollBallot, kCollMatch, kCollSyncwarp, kCollLdmatrix, kCollMma,
  kCollWgFence, kCollWgCommit, kCollWgWait, kCollWgMma
};
const char* coll_name(int c) {
  switch (c) {
    case kCollShfl: return "__shfl*_sync";
    case kCollBallot: return "__ballot/any/all_sync";
    case kCollMatch: return "__match_any_sync";
    case kCollSyncwarp: return "__syncwarp";
    case kCollLdmatrix: return "ldmatrix";
    case kCollMma: return "mma.sync";
    case kCollWgFence: return "wgmma.fence";
    case kCollWgCommit: return "wgmma.commit_group";
    case kCollWgWait: return "wgmma.wait_group";
    case kCollWgMma: return "wgmma.mma_async";
  }
  return "?";
}

enum Flag : uint8_t { kWritten = 1, kPending = 2 };
struct Shadow {  // one per shared-memory byte; an entry of an older generation is a fresh one
  uint16_t w_tid, r_tid, w_bep, w_wep, r_bep, r_wep;
  uint16_t gen;
  uint8_t w_fence, flags;
};
uint16_t g_gen = 1;  // the running cluster's generation (bumped per cluster; wraps by a full reset)
inline Shadow& fresh(Shadow& e) {
  if (e.gen != g_gen) e = Shadow{0xFFFF, 0xFFFF, 0, 0, 0, 0, g_gen, 0, 0};
  return e;
}
static_assert(sizeof(Shadow) == 16, "shadow entry");

struct Block;
struct AsyncCopy {
  Block* blk;
  uint8_t* dst;
  Shadow* sh;
  const uint8_t* src;
  int cp, src_size;
  bool pdl_waited;
};

struct Thread {
  void* sp = nullptr;
  uint8_t* stack_lo = nullptr;
  uint8_t* stack_hi = nullptr;
  uint3 tid{};
  int linear = 0, lane = 0, warp = 0;
  uint16_t gid = 0;  // cluster-wide id (rank * threads + linear), the shadow's thread id
  Block* blk = nullptr;
  State state = kDone;
  bool pdl_waited = false;
  uint16_t proxy_fences = 0;
  // the collective this thread waits in: kind, member mask (warp lanes), inputs, outputs
  uint8_t coll = 0;
  uint32_t cmask = 0;
  uint32_t in[12] = {};
  uint64_t in64[3] = {};
  const void* ptr = nullptr;
  uint32_t out[4] = {};
  std::vector<AsyncCopy> open;
  std::vector<std::vector<AsyncCopy>> groups;
};

struct WgOp {
  int group = -1;  // commit group, -1 while uncommitted
  int n = 0;
  std::vector<float*> d;        // [128] each thread's accumulator array
  std::vector<float> result;    // [128][n/2]
  std::vector<float> d_snap;    // [128][n/2] register values read from memory at issue
  std::vector<uint8_t> d_mem;   // [128] accumulator came from memory (not from a pending op)
  std::vector<std::pair<const uint8_t*, uint16_t>> operands;  // shared bytes read, for the re-check
};
struct Warpgroup {
  bool fenced = false;
  int committed = 0;
  std::vector<WgOp> pending;
};

struct Block {
  uint3 idx{};
  int rank = 0;
  Thread* threads = nullptr;
  int nthreads = 0;
  uint8_t* dyn = nullptr;
  Shadow* dyn_sh = nullptr;
  uint8_t* static_img = nullptr;  // clusters: this block's static shared bytes while another block runs
  Shadow* static_sh = nullptr;    // [rw_size()], indexed by the offset in the writable segment
  uint32_t epoch = 0;
  std::vector<uint32_t> wepoch;  // per warp: __syncwarp count
  int arrived = 0, live = 0;
  std::vector<Warpgroup> wg;
};

struct Region {
  uintptr_t lo, hi;
  // traffic of the call (begin_call .. end_call); `arg` = the extent's position in begin_call
  int arg = -1;
  uint64_t bytes_read = 0, bytes_written = 0;
  std::unordered_set<uint64_t> blocks;  // (launch, block) keys of the blocks that touched it
};

struct Sim {
  std::mutex mu;
  // configuration
  int order_mode = -1;  // -1 rotate; 0 forward; 1 reverse; 2 random
  uint64_t seed = 0x9E3779B97F4A7C15ull;
  bool refuse_clusters = false;
  int refuse_pdl = 0;  // a launch with the PDL attribute fails with this error (0: never)
  int device_cc = 90, code_cc = 90;  // the emulated device and the code it runs (set_device)
  // call state
  std::vector<Region> regions;  // sorted
  std::vector<Traffic> last_traffic;  // the regions' traffic at the last end_call, in begin_call order
  std::vector<std::string> reports;
  std::map<std::string, uint64_t> report_counts;
  std::unordered_set<std::string> report_keys;
  std::map<std::string, uint64_t> kernel_launches;
  std::map<std::string, uint64_t> kernel_reports;  // every finding, per kernel (since load)
  uint64_t launches = 0, blocks_run = 0, threads_run = 0;
  std::unordered_map<const void*, int> max_dyn_smem;
  std::unordered_set<uintptr_t> prev_writes, cur_writes;  // 64-byte lines
  // the running launch
  LaunchSpec spec;
  std::string kernel_name;
  KernelThunk thunk = nullptr;
  void* call = nullptr;
  uintptr_t call_lo = 0, call_hi = 0;
  std::vector<Block> blocks;  // of the running cluster
  std::vector<Thread> threads;
  int cluster_arrived = 0, cluster_live = 0;
  int running_block = -1;  // whose static shared bytes are in the library's own memory
  bool aborted = false;
  void* sched_sp = nullptr;
  // resources kept between launches
  std::vector<uint8_t*> stacks;
  std::vector<uint8_t*> dyn_bufs;
  std::vector<std::unique_ptr<Shadow[]>> dyn_shadows;
  std::vector<Shadow*> static_shadows;  // calloc'd [rw_size()] per rank: pages appear on first touch
  std::vector<uint8_t*> static_imgs;    // malloc'd [rw_size()] per rank (clusters only)
  // clusters: which bytes of the writable segment the cluster's threads touched (64-byte chunks)
  std::vector<uint64_t> touched_mask;
  std::vector<uint32_t> touched_list;
  // the library's own image (constant tables may be read)
  std::vector<Region> image;
};
Sim& sim() {
  static Sim* s = new Sim();
  return *s;
}
Thread* g_cur = nullptr;
// > 0 while the runtime itself runs on a device thread's behalf: its own memory accesses (std::
// templates may be the instrumented copies from the kernel files) are not device accesses.
int g_rt = 0;
struct InRuntime {
  InRuntime() { ++g_rt; }
  ~InRuntime() { --g_rt; }
};
thread_local cudaError_t t_last_error = cudaSuccess;

// Static __shared__ variables are plain statics (hostsim.h) in the library's writable segment:
// device code can touch nothing else there (host statics are the launchers'; the runtime's
// threadIdx & co. are excluded), so a device thread's access to it is a static shared access.
// Offsets (shadow index, shared-window address) count from g_rw_lo rounded down to 1024 bytes, so
// that a window address keeps the alignment of the variable (cp.async, ldmatrix, swizzles).
uintptr_t g_rw_lo = 0, g_rw_hi = 0;
uintptr_t sect_lo() { return g_rw_lo & ~uintptr_t{1023}; }
uintptr_t sect_hi() { return g_rw_hi; }
size_t sect_size() { return g_rw_hi - sect_lo(); }
bool is_index_global(uintptr_t a) {
  auto in = [a](const void* p, size_t n) {
    return a >= reinterpret_cast<uintptr_t>(p) && a < reinterpret_cast<uintptr_t>(p) + n;
  };
  return in(&threadIdx, sizeof threadIdx) || in(&blockIdx, sizeof blockIdx) || in(&blockDim, sizeof blockDim) ||
         in(&gridDim, sizeof gridDim);
}

std::string demangle(const char* s) {
  if (s == nullptr) return "?";
  int st = 0;
  char* d = abi::__cxa_demangle(s, nullptr, nullptr, &st);
  std::string r = st == 0 && d ? d : s;
  free(d);
  return r;
}
// The library's full symbol table (.symtab: kernels in anonymous namespaces are local symbols,
// which dladdr does not see), read once from the file: function start -> (size, mangled name).
struct Sym {
  uintptr_t lo, size;
  std::string name;
};
const std::vector<Sym>& symbols() {
  static std::vector<Sym>* syms = [] {
    auto* v = new std::vector<Sym>();
    Dl_info self;
    if (!dladdr(reinterpret_cast<const void*>(&symbols), &self) || self.dli_fname == nullptr) return v;
    const int fd = open(self.dli_fname, O_RDONLY);
    if (fd < 0) return v;
    struct stat st;
    if (fstat(fd, &st) == 0) {
      void* m = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
      if (m != MAP_FAILED) {
        const auto* base = static_cast<const uint8_t*>(m);
        const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
        const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; ++i) {
          if (sh[i].sh_type != SHT_SYMTAB) continue;
          const auto* sym = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
          const char* str = reinterpret_cast<const char*>(base + sh[sh[i].sh_link].sh_offset);
          for (size_t j = 0; j < sh[i].sh_size / sizeof(Elf64_Sym); ++j)
            if (ELF64_ST_TYPE(sym[j].st_info) == STT_FUNC && sym[j].st_value != 0)
              v->push_back(Sym{reinterpret_cast<uintptr_t>(self.dli_fbase) + sym[j].st_value, sym[j].st_size, str + sym[j].st_name});
        }
        munmap(m, static_cast<size_t>(st.st_size));
      }
    }
    close(fd);
    std::sort(v->begin(), v->end(), [](const Sym& a, const Sym& b) { return a.lo < b.lo; });
    if (v->empty())
      fprintf(stderr, "gptoss hostsim: %s has no symbol table (stripped?): kernels and report sites are named "
              "by address\n", self.dli_fname);
    return v;
  }();
  return *syms;
}
const Sym* symbol_at(const void* p) {
  const auto& v = symbols();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = std::upper_bound(v.begin(), v.end(), a, [](uintptr_t x, const Sym& s) { return x < s.lo; });
  if (it == v.begin()) return nullptr;
  --it;
  return a < it->lo + std::max<uintptr_t>(it->size, 1) ? &*it : nullptr;
}

std::string symbol_of(const void* pc) {
  if (const Sym* s = symbol_at(pc)) {
    std::string n = demangle(s->name.c_str());
    if (n.size() > 160) n = n.substr(0, 157) + "...";
    char buf[64];
    snprintf(buf, sizeof buf, "+0x%zx", static_cast<size_t>(reinterpret_cast<uintptr_t>(pc) - s->lo));
    return n + buf;
  }
  Dl_info info;
  if (dladdr(pc, &info) && info.dli_sname) {
    std::string n = demangle(info.dli_sname);
    if (n.size() > 160) n = n.substr(0, 157) + "...";
    char buf[64];
    snprintf(buf, sizeof buf, "+0x%zx", static_cast<size_t>(static_cast<const char*>(pc) - static_cast<const char*>(info.dli_saddr)));
    return n + buf;
  }
  char buf[32];
  snprintf(buf, sizeof buf, "%p", pc);
  return buf;
}

// A checker finding: recorded once per (kind, site), counted always.
void report(const char* kind, const void* pc, const char* fmt, ...) {
  Sim& S = sim();
  S.report_counts[kind]++;
  S.kernel_reports[S.kernel_name]++;
  char key[256];
  snprintf(key, sizeof key, "%s|%p|%s", kind, pc, S.kernel_name.c_str());
  if (!S.report_keys.insert(key).second) return;
  if (S.reports.size() >= 40) return;
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::string where;
  if (g_cur) {
    char b[160];
    snprintf(b, sizeof b, " [block (%u,%u,%u) thread (%u,%u,%u)]", g_cur->blk->idx.x, g_cur->blk->idx.y,
             g_cur->blk->idx.z, g_cur->tid.x, g_cur->tid.y, g_cur->tid.z);
    where = b;
  }
  std::string r = std::string(kind) + ": " + S.kernel_name + where + ": " + msg;
  if (pc) r += " (at " + symbol_of(pc) + ")";
  S.reports.push_back(r);
}

// ---- fibers --------------------------------------------------------------------------------
extern "C" [[noreturn]] void gptoss_hs_fiber_main();
void thread_exit(Thread* t);

uint8_t* new_stack() {
  void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) {
    fprintf(stderr, "gptoss hostsim: cannot map a fiber stack\n");
    abort();
  }
  mprotect(p, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
  return static_cast<uint8_t*>(p);
}

void init_fiber(Thread* t, uint8_t* stack) {
  t->stack_lo = stack + 4096;
  t->stack_hi = stack + kStackBytes;
  uintptr_t top = reinterpret_cast<uintptr_t>(t->stack_hi) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top);
  *--s = 0;                                                       // fake return address of the entry
  *--s = reinterpret_cast<uint64_t>(&gptoss_hs_fiber_main);      // gptoss_hs_switch's ret
  for (int i = 0; i < 6; ++i) *--s = 0;                           // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  *--s = static_cast<uint64_t>(csr[0]) | (static_cast<uint64_t>(csr[1] & 0xFFFF) << 32);
  t->sp = s;
}

void yield_thread() {
  Thread* t = g_cur;
  const int saved = g_rt;
  g_rt = 0;
  gptoss_hs_switch(&t->sp, sim().sched_sp);
  g_rt = saved;
}

// Clusters: the library's memory holds the running block's static shared bytes; the others'
// are in their images. Only bytes the cluster touched are moved.
template <typename F>
void for_touched(F&& f) {
  Sim& S = sim();
  for (uint32_t c : S.touched_list)
    for (uint64_t m = S.touched_mask[c]; m; m &= m - 1) f(static_cast<size_t>(c) * 64 + __builtin_ctzll(m));
}
void swap_in(int rank) {
  Sim& S = sim();
  if (S.running_block == rank || S.blocks.size() == 1) {
    S.running_block = rank;
    return;
  }
  uint8_t* live = reinterpret_cast<uint8_t*>(sect_lo());
  if (S.running_block >= 0) {
    uint8_t* img = S.blocks[S.running_block].static_img;
    for_touched([&](size_t o) { img[o] = live[o]; });
  }
  uint8_t* img = S.blocks[rank].static_img;
  for_touched([&](size_t o) { live[o] = img[o]; });
  S.running_block = rank;
}
// A cluster's first touch of static shared bytes [off, off + n): every other block's copy of them
// starts as poison (their shadows say never written).
void touch_static(size_t off, size_t n) {
  Sim& S = sim();
  if (S.blocks.size() == 1) return;
  for (size_t o = off; o < off + n && o < sect_size(); ++o) {
    uint64_t& m = S.touched_mask[o / 64];
    const uint64_t bit = uint64_t{1} << (o % 64);
    if (m & bit) continue;
    if (m == 0) S.touched_list.push_back(static_cast<uint32_t>(o / 64));
    m |= bit;
    for (Block& b : S.blocks)
      if (b.rank != S.running_block) b.static_img[o] = 0xFF;
  }
}

// ---- shared-memory shadow ------------------------------------------------------------------
bool ordered(const Block* b, const Thread* t, uint16_t other, uint16_t bep, uint16_t wep) {
  if (bep != static_cast<uint16_t>(b->epoch)) return true;
  if (other == kMulti || t->blk != b) return false;
  const Thread& o = sim().threads[other];
  return o.blk == t->blk && o.warp == t->warp && wep != static_cast<uint16_t>(b->wepoch[t->warp]);
}
const char* tid_str(uint16_t id, char* buf) {
  if (id == kMulti) return "several threads";
  const Thread& o = sim().threads[id];
  snprintf(buf, 64, "thread (%u,%u,%u)", o.tid.x, o.tid.y, o.tid.z);
  return buf;
}

void shadow_access(Block* b, Shadow* s, uint32_t off, size_t n, Thread* t, bool write, const void* pc,
                   bool async_issue = false) {
  const uint16_t bep = static_cast<uint16_t>(b->epoch);
  const uint16_t wep = t->blk == b ? static_cast<uint16_t>(b->wepoch[t->warp]) : 0;
  char b1[64];
  for (size_t i = 0; i < n; ++i) {
    Shadow& e = fresh(s[i]);
    if (e.flags & kPending) {
      report("shared-async", pc, "%s shared byte 0x%x while a cp.async into it is in flight (before cp.async.wait_group)",
             write ? "writes" : "reads", off + static_cast<uint32_t>(i));
    }
    if (write) {
      if (e.w_tid != kNone && e.w_tid != t->gid && !ordered(b, t, e.w_tid, e.w_bep, e.w_wep))
        report("shared-race", pc, "write-after-write race on shared byte 0x%x with %s (no barrier between)",
               off + static_cast<uint32_t>(i), tid_str(e.w_tid, b1));
      if (e.r_tid != kNone && e.r_tid != t->gid && !ordered(b, t, e.r_tid, e.r_bep, e.r_wep))
        report("shared-race", pc, "write-after-read race on shared byte 0x%x with %s (no barrier between)",
               off + static_cast<uint32_t>(i), tid_str(e.r_tid, b1));
      e.w_tid = t->gid;
      e.w_bep = bep;
      e.w_wep = wep;
      e.w_fence = static_cast<uint8_t>(t->proxy_fences);
      e.r_tid = kNone;
      if (async_issue) e.flags |= kPending;
      else e.flags |= kWritten;
    } else {
      if (!(e.flags & kWritten))
        report("shared-uninit", pc, "reads shared byte 0x%x that no thread has written", off + static_cast<uint32_t>(i));
      if (e.w_tid != kNone && e.w_tid != t->gid && !ordered(b, t, e.w_tid, e.w_bep, e.w_wep))
        report("shared-race", pc, "read-after-write race on shared byte 0x%x written by %s (no barrier between)",
               off + static_cast<uint32_t>(i), tid_str(e.w_tid, b1));
      if (e.r_tid == kNone || ordered(b, t, e.r_tid, e.r_bep, e.r_wep)) {
        e.r_tid = t->gid;
      } else if (e.r_tid != t->gid) {
        e.r_tid = kMulti;
      }
      e.r_bep = bep;
      e.r_wep = wep;
    }
  }
}

// Where a host address lies in shared memory: the block that owns it, its shadow, its offset.
struct SharedLoc {
  Block* b = nullptr;
  Shadow* sh = nullptr;
  uint32_t off = 0;      // offset in the dynamic buffer, or in the static section
  bool dynamic = false;
  bool oob = false;      // inside a dynamic buffer but past the launch's size
};
bool locate_shared(uintptr_t a, size_t n, SharedLoc* loc) {
  Sim& S = sim();
  for (Block& b : S.blocks) {
    const uintptr_t d = reinterpret_cast<uintptr_t>(b.dyn);
    if (a >= d && a < d + kDynAlloc) {
      *loc = SharedLoc{&b, b.dyn_sh + (a - d), static_cast<uint32_t>(a - d), true, a + n > d + S.spec.smem};
      return true;
    }
    if (b.static_img != nullptr) {
      const uintptr_t s = reinterpret_cast<uintptr_t>(b.static_img);
      if (a >= s && a < s + sect_size()) {
        *loc = SharedLoc{&b, b.static_sh + (a - s), static_cast<uint32_t>(a - s), false, a + n > s + sect_size()};
        touch_static(a - s, n);
        return true;
      }
    }
  }
  const uintptr_t slo = sect_lo(), shi = sect_hi();
  if (a >= g_rw_lo && a < shi && S.running_block >= 0 && !is_index_global(a)) {
    Block* b = &S.blocks[S.running_block];
    *loc = SharedLoc{b, b->static_sh + (a - slo), static_cast<uint32_t>(a - slo), false, a + n > shi};
    touch_static(a - slo, n);
    return true;
  }
  return false;
}

// ---- global memory ---------------------------------------------------------------------------
Region* find_region(uintptr_t a) {
  Sim& S = sim();
  auto it = std::upper_bound(S.regions.begin(), S.regions.end(), a, [](uintptr_t v, const Region& r) { return v < r.lo; });
  if (it == S.regions.begin()) return nullptr;
  --it;
  return a < it->hi || (it->lo == it->hi && a == it->lo) ? &*it : nullptr;
}

void global_access(uintptr_t a, size_t n, bool write, const void* pc, bool pdl_waited) {
  Sim& S = sim();
  Region* r = find_region(a);
  if (r == nullptr || a + n > r->hi) {
    if (a >= S.call_lo && a + n <= S.call_hi) {
      if (write) report("param-write", pc, "writes its own kernel parameters");
      return;
    }
    for (const Region& im : S.image)
      if (a >= im.lo && a + n <= im.hi) {
        if (write) report("global-oob", pc, "writes into the library's own image at %p", reinterpret_cast<void*>(a));
        return;
      }
    for (const Thread& o : S.threads)
      if (a >= reinterpret_cast<uintptr_t>(o.stack_lo) && a < reinterpret_cast<uintptr_t>(o.stack_hi)) {
        report("local", pc, "touches another thread's local memory");
        return;
      }
    // say where it is relative to the nearest argument extent
    std::string near = "no argument tensor";
    uintptr_t best = UINTPTR_MAX;
    for (const Region& g : S.regions) {
      const uintptr_t dist = a < g.lo ? g.lo - a : (a >= g.hi ? a - g.hi : 0);
      if (dist < best) {
        best = dist;
        char buf[160];
        snprintf(buf, sizeof buf, "argument extent [%p, %p) (%zu bytes), %s by %" PRIuPTR " bytes",
                 reinterpret_cast<void*>(g.lo), reinterpret_cast<void*>(g.hi), static_cast<size_t>(g.hi - g.lo),
                 a < g.lo ? "before it" : "past its end", a < g.lo ? g.lo - a : a + n - g.hi);
        near = buf;
      }
    }
    report("global-oob", pc, "%s %zu bytes at %p outside every argument: nearest %s", write ? "writes" : "reads", n,
           reinterpret_cast<void*>(a), near.c_str());
    return;
  }
  if (S.spec.pdl && !pdl_waited) {
    if (write) {
      report("pdl", pc, "writes global memory (%p) before griddepcontrol.wait in a PDL launch", reinterpret_cast<void*>(a));
    } else {
      for (uintptr_t l = a >> 6; l <= (a + n - 1) >> 6; ++l)
        if (S.prev_writes.count(l)) {
          report("pdl", pc, "reads global memory (%p) that the previous kernel writes, before griddepcontrol.wait "
                 "(a PDL launch may run this part before the previous kernel)", reinterpret_cast<void*>(a));
          break;
        }
    }
  }
  if (write)
    for (uintptr_t l = a >> 6; l <= (a + n - 1) >> 6; ++l) S.cur_writes.insert(l);
  (write ? r->bytes_written : r->bytes_read) += n;
  if (g_cur != nullptr) {
    const uint3 bi = g_cur->blk->idx;
    const uint64_t key = ((S.launches & 0xffffu) << 48) |
                         ((uint64_t(bi.z) * S.spec.grid.y + bi.y) * S.spec.grid.x + bi.x);
    r->blocks.insert(key);
  }
}

inline void access(uintptr_t a, size_t n, bool write, const void* pc) {
  Thread* t = g_cur;
  if (t == nullptr || g_rt) return;  // host code of the kernel files (launchers), or the runtime
  InRuntime rt_;
  if (a >= reinterpret_cast<uintptr_t>(t->stack_lo) && a < reinterpret_cast<uintptr_t>(t->stack_hi)) return;
  SharedLoc loc;
  if (locate_shared(a, n, &loc)) {
    if (loc.oob) {
      report("shared-oob", pc, "%s %zu bytes at %s shared offset 0x%x, past the %zu bytes of the launch",
             write ? "writes" : "reads", n, loc.dynamic ? "dynamic" : "static", loc.off,
             loc.dynamic ? sim().spec.smem : sect_size());
      return;
    }
    shadow_access(loc.b, loc.sh, loc.off, n, t, write, pc);
    return;
  }
  global_access(a, n, write, pc, t->pdl_waited);
}

// ---- barriers and collectives ----------------------------------------------------------------
int lanes_in_warp(const Block* b, int warp) { return std::min(32, b->nthreads - 32 * warp); }

void release_block(Block* b) {
  b->arrived = 0;
  b->epoch++;
  for (int i = 0; i < b->nthreads; ++i)
    if (b->threads[i].state == kWaitBlock) b->threads[i].state = kRunnable;
}

void release_cluster() {
  Sim& S = sim();
  S.cluster_arrived = 0;
  for (Block& b : S.blocks) b.epoch++;
  for (Thread& t : S.threads)
    if (t.state == kWaitCluster) t.state = kRunnable;
}

void complete_collective(Block* b, int base, int size, uint32_t mask);

// Checks whether the collective that thread t waits in can complete; completes it if so.
void try_collective(Thread* t) {
  Block* b = t->blk;
  const bool wg = t->coll >= kCollWgFence;
  const int size = wg ? 128 : 32;
  const int base = wg ? (t->linear / 128) * 128 : t->warp * 32;
  const uint32_t mask = wg ? 0xFFFFFFFFu : t->cmask;
  if (mask == 0) {
    report("collective", nullptr, "%s with an empty mask", coll_name(t->coll));
    return;
  }
  for (int l = 0; l < size; ++l) {
    if (!wg && !((mask >> l) & 1u)) continue;
    const int i = base + l;
    if (i >= b->nthreads) {
      report("collective", nullptr, "%s: its mask names lane %d, which does not exist (the block has %d threads)",
             coll_name(t->coll), l, b->nthreads);
      return;  // never completes: the deadlock diagnosis ends the block
    }
    const Thread& o = b->threads[i];
    if (o.state == kDone) {
      report("collective", nullptr, "%s: lane %d of its %s exited without arriving", coll_name(t->coll), l,
             wg ? "warpgroup" : "mask");
      return;
    }
    if (o.state != kWaitColl) return;  // not there yet
    // another warp of the warpgroup still in a warp collective (shuffles between wgmma steps):
    // not there yet either
    if (wg && o.coll < kCollWgFence && o.warp != t->warp) return;
    if (o.coll != t->coll || (!wg && o.cmask != mask)) {
      report("collective", nullptr, "lanes of one warp wait in different collectives (%s mask 0x%08x vs %s mask 0x%08x)",
             coll_name(t->coll), mask, coll_name(o.coll), o.cmask);
      return;
    }
  }
  complete_collective(b, base, size, mask);
}

void arrive_collective(uint8_t kind, uint32_t mask) {
  Thread* t = g_cur;
  t->coll = kind;
  t->cmask = mask;
  if (kind < kCollWgFence && !((mask >> t->lane) & 1u))
    report("collective", __builtin_return_address(1), "%s: the calling lane %d is not in its mask 0x%08x", coll_name(kind), t->lane, mask);
  t->state = kWaitColl;
  try_collective(t);
  yield_thread();
}

// ---- the PTX operations on gathered operands ----
uint8_t* shared_ptr(Block* b, uint32_t addr, size_t n, Shadow** sh, const char* what);
void wg_complete_mma(Block* b, int base);
void wg_wait(Block* b, int base, int keep);

float bf(uint16_t h) { return bf16_to_f32(h); }

void complete_collective_impl(Block* b, int base, int size, uint32_t mask);
// (the implementation points g_cur at the lane it reads for, to attribute its accesses)
void complete_collective(Block* b, int base, int size, uint32_t mask) {
  Thread* const running = g_cur;
  complete_collective_impl(b, base, size, mask);
  g_cur = running;
}
void complete_collective_impl(Block* b, int base, int size, uint32_t mask) {
  Thread* T = b->threads + base;
  const uint8_t kind = T[__builtin_ctz(mask)].coll;
  auto member = [&](int l) { return size == 128 || ((mask >> l) & 1u); };
  switch (kind) {
    case kCollShfl: {
      for (int l = 0; l < 32; ++l) {
        if (!member(l)) continue;
        Thread& t = T[l];
        const int mode = static_cast<int>(t.in[1]), arg = static_cast<int>(t.in[2]), width = static_cast<int>(t.in[3]);
        const int seg = l & ~(width - 1);
        int src = l;
        if (mode == kShflIdx) src = seg + (arg & (width - 1));
        else if (mode == kShflUp) src = (l - arg >= seg) ? l - arg : l;
        else if (mode == kShflDown) src = (l + arg < seg + width) ? l + arg : l;
        else src = ((l ^ arg) < seg + width) ? (l ^ arg) : l;
        if (src >= 32 || !member(src)) {
          report("collective", nullptr, "__shfl_sync: lane %d reads lane %d, which is not in the mask 0x%08x", l, src, mask);
          t.out[0] = t.in[0];
        } else {
          t.out[0] = T[src].in[0];
        }
      }
      break;
    }
    case kCollBallot: {
      uint32_t bits = 0;
      for (int l = 0; l < 32; ++l)
        if (member(l) && T[l].in[0]) bits |= 1u << l;
      for (int l = 0; l < 32; ++l)
        if (member(l)) T[l].out[0] = bits;
      break;
    }
    case kCollMatch: {
      for (int l = 0; l < 32; ++l) {
        if (!member(l)) continue;
        uint32_t m = 0;
        for (int o = 0; o < 32; ++o)
          if (member(o) && T[o].in64[0] == T[l].in64[0]) m |= 1u << o;
        T[l].out[0] = m;
      }
      break;
    }
    case kCollSyncwarp:
      b->wepoch[base / 32]++;
      break;
    case kCollLdmatrix: {
      // .x{count}: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives, per matrix,
      // row l/4, columns 2(l%4), 2(l%4)+1 (.trans: column l/4, rows 2(l%4), 2(l%4)+1)
      const int count = static_cast<int>(T[0].in[1]);
      const bool trans = T[0].in[2] != 0;
      uint16_t m[4][8][8];
      for (int i = 0; i < count; ++i)
        for (int r = 0; r < 8; ++r) {
          Thread& src = T[8 * i + r];
          g_cur = &src;
          Shadow* sh = nullptr;
          const uint8_t* p = shared_ptr(b, src.in[0], 16, &sh, "ldmatrix row address");
          if (p == nullptr) {
            std::memset(m[i][r], 0xFF, 16);
            continue;
          }
          if ((src.in[0] & 15u) != 0) report("ldmatrix", nullptr, "row address 0x%x is not 16-byte aligned", src.in[0]);
          std::memcpy(m[i][r], p, 16);
        }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, c = 2 * (l % 4);
        for (int i = 0; i < count; ++i) {
          const uint16_t lo = trans ? m[i][c][g] : m[i][g][c];
          const uint16_t hi = trans ? m[i][c + 1][g] : m[i][g][c + 1];
          T[l].out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      }
      break;
    }
    case kCollMma: {
      // m16n8k16 row.col bf16 -> f32. Lane l (g = l/4, t = l%4): A a0 (g, 2t..2t+1), a1 (g+8, 2t..),
      // a2 (g, 2t+8..), a3 (g+8, 2t+8..); B b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g);
      // C/D c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1).
      float A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const uint32_t* a = T[l].in;
        const uint32_t* bb = T[l].in + 4;
        for (int h = 0; h < 2; ++h) {
          A[g][2 * t + h] = bf(static_cast<uint16_t>(a[0] >> (16 * h)));
          A[g + 8][2 * t + h] = bf(static_cast<uint16_t>(a[1] >> (16 * h)));
          A[g][2 * t + 8 + h] = bf(static_cast<uint16_t>(a[2] >> (16 * h)));
          A[g + 8][2 * t + 8 + h] = bf(static_cast<uint16_t>(a[3] >> (16 * h)));
          B[2 * t + h][g] = bf(static_cast<uint16_t>(bb[0] >> (16 * h)));
          B[2 * t + 8 + h][g] = bf(static_cast<uint16_t>(bb[1] >> (16 * h)));
        }
        const float* c = static_cast<const float*>(T[l].ptr);
        C[g][2 * t] = c[0];
        C[g][2 * t + 1] = c[1];
        C[g + 8][2 * t] = c[2];
        C[g + 8][2 * t + 1] = c[3];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        float* d = static_cast<float*>(const_cast<void*>(T[l].ptr));
        const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
        for (int i = 0; i < 4; ++i) {
          double acc = 0.0;  // products of bf16 are exact in double; one rounding of the sum
          for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[rows[i]][k]) * B[k][cols[i]];
          d[i] = static_cast<float>(acc + C[rows[i]][cols[i]]);
        }
      }
      break;
    }
    case kCollWgFence:
      b->wg[base / 128].fenced = true;
      break;
    case kCollWgCommit: {
      Warpgroup& w = b->wg[base / 128];
      ++w.committed;
      for (WgOp& op : w.pending)
        if (op.group < 0) op.group = w.committed;
      break;
    }
    case kCollWgWait:
      wg_wait(b, base, static_cast<int>(T[0].in[0]));
      break;
    case kCollWgMma:
      wg_complete_mma(b, base);
      break;
    default:
      break;
  }
  for (int l = 0; l < size; ++l)
    if (member(l) && base + l < b->nthreads) T[l].state = kRunnable;
}

// Host pointer of a shared-window address of block b (n bytes), with its shadow; nullptr and a
// report when it is not inside the launch's shared memory.
uint8_t* shared_ptr(Block* b, uint32_t addr, size_t n, Shadow** sh, const char* what) {
  Sim& S = sim();
  if (addr + n <= S.spec.smem) {
    *sh = b->dyn_sh + addr;
    return b->dyn + addr;
  }
  if (addr >= kStaticWindowBase && addr - kStaticWindowBase + n <= sect_size()) {
    const uint32_t off = addr - kStaticWindowBase;
    *sh = b->static_sh + off;
    touch_static(off, n);
    if (S.running_block == b->rank || b->static_img == nullptr) return reinterpret_cast<uint8_t*>(sect_lo()) + off;
    return b->static_img + off;
  }
  report("shared-oob", nullptr, "%s 0x%x (%zu bytes) is outside the block's shared memory (%zu dynamic bytes)", what,
         addr, n, S.spec.smem);
  return nullptr;
}

// wgmma operand element (row, k) of a 64 x 16 (A) or n x 16 (B, rows = n) tile, K-major; or of
// a 16 x n tile stored MN-major (tnsp): address before and after the swizzle.
uint32_t desc_addr(uint64_t desc, int mn, int k, bool tnsp) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3FFF) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3FFF) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3FFF) << 4;
  const int swz = static_cast<int>(desc >> 62);
  uint32_t a;
  if (swz == 1) {  // 128B swizzle: atoms of 8 rows x 128 bytes
    if (!tnsp) a = start + (mn / 8) * sbo + (mn % 8) * 128 + 2 * k;                      // rows = M/N, 64 K per row
    else a = start + (mn / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + 2 * (mn % 64);  // rows = K, 64 M/N per row
    a ^= ((a >> 7) & 7u) << 4;
  } else if (swz == 0) {  // interleaved core matrices of 8 rows x 16 bytes
    if (!tnsp) a = start + (mn / 8) * sbo + (mn % 8) * 16 + (k / 8) * lbo + 2 * (k % 8);
    else a = start + (k / 8) * sbo + (k % 8) * 16 + (mn / 8) * lbo + 2 * (mn % 8);
  } else {
    a = 0xFFFFFFFFu;
  }
  return a;
}

void wg_complete_mma(Block* b, int base) {
  Sim& S = sim();
  Thread* T = b->threads + base;
  Warpgroup& w = b->wg[base / 128];
  const int n = static_cast<int>(T[0].in[0]);
  const int scale_d = static_cast<int>(T[0].in[1]);
  const bool a_regs = T[0].in[2] != 0;
  const bool tnsp_a = T[0].in[3] != 0, tnsp_b = T[0].in[4] != 0;
  const uint64_t da = T[0].in64[0], db = T[0].in64[1];
  g_cur = &T[0];
  if (!w.fenced) report("wgmma", nullptr, "wgmma.mma_async without a wgmma.fence since the last wgmma.wait_group");
  for (int i = 1; i < 128; ++i)
    if (T[i].in[0] != T[0].in[0] || T[i].in64[1] != db || (!a_regs && T[i].in64[0] != da) || T[i].in[2] != T[0].in[2]) {
      report("wgmma", nullptr, "the threads of a warpgroup issue different wgmma.mma_async operands");
      break;
    }
  if ((((da >> 62) != 1 && (da >> 62) != 0) && !a_regs) || ((db >> 62) != 1 && (db >> 62) != 0))
    report("wgmma", nullptr, "descriptor swizzle mode other than none / 128B is not emulated");
  WgOp op;
  op.n = n;
  // operands
  std::vector<float> A(64 * 16), B(16 * n);
  auto read_elem = [&](uint32_t addr, float* dst) {
    Shadow* sh = nullptr;
    uint8_t* p = shared_ptr(b, addr, 2, &sh, "wgmma descriptor element");
    if (p == nullptr) {
      *dst = NAN;
      return;
    }
    // the async proxy reads generic-proxy writes only after the writer's fence.proxy.async
    for (int i = 0; i < 2; ++i) {
      const Shadow& e = fresh(sh[i]);
      if (e.w_tid != kNone && e.w_tid != kMulti && static_cast<uint8_t>(S.threads[e.w_tid].proxy_fences) == e.w_fence)
        report("wgmma-proxy", nullptr, "wgmma reads shared byte 0x%x written by thread %d with no fence.proxy.async since",
               addr + i, e.w_tid);
    }
    shadow_access(b, sh, addr, 2, &T[0], false, nullptr);
    uint16_t h;
    std::memcpy(&h, p, 2);
    op.operands.emplace_back(p, h);
    *dst = bf(h);
  };
  if (a_regs) {  // per warp: rows 16w.., the mma.sync A fragment
    for (int i = 0; i < 128; ++i) {
      const int wp = i / 32, l = i % 32, g = l / 4, t = l % 4;
      const uint32_t* a = T[i].in + 5;
      for (int h = 0; h < 2; ++h) {
        A[(16 * wp + g) * 16 + 2 * t + h] = bf(static_cast<uint16_t>(a[0] >> (16 * h)));
        A[(16 * wp + g + 8) * 16 + 2 * t + h] = bf(static_cast<uint16_t>(a[1] >> (16 * h)));
        A[(16 * wp + g) * 16 + 2 * t + 8 + h] = bf(static_cast<uint16_t>(a[2] >> (16 * h)));
        A[(16 * wp + g + 8) * 16 + 2 * t + 8 + h] = bf(static_cast<uint16_t>(a[3] >> (16 * h)));
      }
    }
  } else {
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) read_elem(desc_addr(da, m, k, tnsp_a), &A[m * 16 + k]);
  }
  for (int nn = 0; nn < n; ++nn)
    for (int k = 0; k < 16; ++k) read_elem(desc_addr(db, nn, k, tnsp_b), &B[k * n + nn]);
  // accumulators: from the latest pending op on the same registers, else from the registers
  const int per = n / 2;
  op.d.resize(128);
  op.result.resize(128 * per);
  op.d_snap.resize(128 * per);
  op.d_mem.resize(128);
  for (int i = 0; i < 128; ++i) {
    float* d = static_cast<float*>(const_cast<void*>(T[i].ptr));
    op.d[i] = d;
    const float* src = d;
    op.d_mem[i] = 1;
    for (auto it = w.pending.rbegin(); it != w.pending.rend(); ++it)
      if (it->d[i] == d) {
        src = it->result.data() + i * per;
        op.d_mem[i] = 0;
        break;
      }
    for (int j = 0; j < per; ++j) op.d_snap[i * per + j] = src[j];
  }
  for (int i = 0; i < 128; ++i) {
    const int wp = i / 32, l = i % 32;
    for (int j = 0; j < per; ++j) {
      const int row = 16 * wp + l / 4 + 8 * ((j / 2) % 2);
      const int col = 8 * (j / 4) + 2 * (l % 4) + (j % 2);
      double acc = 0.0;
      for (int k = 0; k < 16; ++k) acc += static_cast<double>(A[row * 16 + k]) * B[k * n + col];
      op.result[i * per + j] = static_cast<float>(acc + (scale_d ? op.d_snap[i * per + j] : 0.0f));
    }
  }
  w.pending.push_back(std::move(op));
}

void wg_wait(Block* b, int base, int keep) {
  Warpgroup& w = b->wg[base / 128];
  g_cur = &b->threads[base];
  std::vector<WgOp> still;
  for (WgOp& op : w.pending) {
    if (op.group < 0 || op.group > w.committed - keep) {
      still.push_back(std::move(op));
      continue;
    }
    for (auto& [p, v] : op.operands) {
      uint16_t now;
      std::memcpy(&now, p, 2);
      if (now != v) {
        report("wgmma", nullptr, "shared memory read by an in-flight wgmma.mma_async changed before wgmma.wait_group");
        break;
      }
    }
    const int per = op.n / 2;
    for (int i = 0; i < 128; ++i) {
      if (op.d_mem[i])
        for (int j = 0; j < per; ++j)
          if (std::memcmp(&op.d[i][j], &op.d_snap[i * per + j], 4) != 0) {
            report("wgmma", nullptr, "accumulator registers of an in-flight wgmma.mma_async were written before wgmma.wait_group");
            break;
          }
      std::memcpy(op.d[i], op.result.data() + i * per, per * sizeof(float));
    }
  }
  w.pending = std::move(still);
  w.fenced = false;
}

// ---- cp.async ----
void complete_copies(Thread* t, std::vector<AsyncCopy>& group) {
  for (AsyncCopy& c : group) {
    if (c.src_size > 0) {
      global_access(reinterpret_cast<uintptr_t>(c.src), static_cast<size_t>(c.src_size), false, nullptr, c.pdl_waited);
      std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_size));
    }
    if (c.cp > c.src_size) std::memset(c.dst + c.src_size, 0, static_cast<size_t>(c.cp - c.src_size));
    for (int i = 0; i < c.cp; ++i) {
      fresh(c.sh[i]);
      c.sh[i].flags = static_cast<uint8_t>((c.sh[i].flags & ~kPending) | kWritten);
      c.sh[i].w_tid = t->gid;
      c.sh[i].w_bep = static_cast<uint16_t>(c.blk->epoch);
      c.sh[i].w_wep = static_cast<uint16_t>(c.blk->wepoch[t->warp]);
      c.sh[i].w_fence = static_cast<uint8_t>(t->proxy_fences);
    }
  }
  group.clear();
}

void thread_exit(Thread* t) {
  Sim& S = sim();
  // copies still in flight land anyway; nobody may read them unless they waited, which they did not
  for (auto& g : t->groups) complete_copies(t, g);
  t->groups.clear();
  complete_copies(t, t->open);
  t->state = kDone;
  Block* b = t->blk;
  b->live--;
  S.cluster_live--;
  if ((t->linear % 128) == 0 && t->linear / 128 < static_cast<int>(b->wg.size()) && !b->wg[t->linear / 128].pending.empty())
    report("wgmma", nullptr, "a warpgroup exited with wgmma.mma_async results never waited for");
  if (b->arrived > 0 && b->arrived == b->live) {
    report("barrier", nullptr, "__syncthreads is not reached by every thread of the block (a thread exited while %d wait)",
           b->arrived);
    release_block(b);
  }
  if (S.cluster_arrived > 0 && S.cluster_arrived == S.cluster_live) {
    report("barrier", nullptr, "cluster.sync is not reached by every thread of the cluster (a thread exited)");
    release_cluster();
  }
  // a collective that only waited for this lane now reports it
  for (int i = 0; i < b->nthreads; ++i)
    if (b->threads[i].state == kWaitColl) {
      Thread& o = b->threads[i];
      const bool wg = o.coll >= kCollWgFence;
      if ((wg && o.linear / 128 == t->linear / 128) || (!wg && o.warp == t->warp && ((o.cmask >> t->lane) & 1u))) {
        g_cur = &o;
        try_collective(&o);
        g_cur = t;
      }
    }
}

std::vector<int> make_order(int n, int mode, uint64_t seed) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) o[i] = i;
  if (mode == 1) std::reverse(o.begin(), o.end());
  if (mode == 2) {
    std::mt19937_64 rng(seed);
    std::shuffle(o.begin(), o.end(), rng);
  }
  return o;
}

void poison(uint8_t* p, size_t n) { std::memset(p, 0xFF, n); }  // bf16 NaN, float NaN, int -1

// Runs one cluster (blocks first_block .. first_block + cluster - 1 of the grid, linear x-fastest).
void run_cluster(uint64_t first_block, int mode, uint64_t seed) {
  Sim& S = sim();
  const unsigned C = S.spec.cluster;
  const int nt = static_cast<int>(S.spec.block.x * S.spec.block.y * S.spec.block.z);
  const size_t ss = sect_size();
  if (S.touched_mask.size() != (ss + 63) / 64) S.touched_mask.assign((ss + 63) / 64, 0);
  for (uint32_t c : S.touched_list) S.touched_mask[c] = 0;
  S.touched_list.clear();
  S.blocks.resize(C);
  S.threads.resize(static_cast<size_t>(C) * nt);
  while (S.stacks.size() < S.threads.size()) S.stacks.push_back(new_stack());
  while (S.dyn_bufs.size() < C) {
    S.dyn_bufs.push_back(static_cast<uint8_t*>(aligned_alloc(1024, kDynAlloc)));
    S.dyn_shadows.emplace_back(new Shadow[kDynAlloc]());
    S.static_shadows.push_back(static_cast<Shadow*>(calloc(std::max<size_t>(ss, 1), sizeof(Shadow))));
    S.static_imgs.push_back(static_cast<uint8_t*>(malloc(std::max<size_t>(ss, 1))));
  }
  if (++g_gen == 0) {  // generations wrapped: forget every entry for real
    for (auto& d : S.dyn_shadows) std::memset(static_cast<void*>(d.get()), 0, sizeof(Shadow) * kDynAlloc);
    for (Shadow*& d : S.static_shadows) {
      free(d);
      d = static_cast<Shadow*>(calloc(std::max<size_t>(ss, 1), sizeof(Shadow)));
    }
    g_gen = 1;
  }
  S.cluster_arrived = 0;
  S.cluster_live = static_cast<int>(C) * nt;
  const dim3 g = S.spec.grid;
  for (unsigned r = 0; r < C; ++r) {
    Block& b = S.blocks[r];
    const uint64_t lin = first_block + r;
    b.idx = uint3{static_cast<unsigned>(lin % g.x), static_cast<unsigned>((lin / g.x) % g.y), static_cast<unsigned>(lin / (static_cast<uint64_t>(g.x) * g.y))};
    b.rank = static_cast<int>(r);
    b.nthreads = nt;
    b.threads = S.threads.data() + static_cast<size_t>(r) * nt;
    b.dyn = S.dyn_bufs[r];
    b.dyn_sh = S.dyn_shadows[r].get();
    poison(b.dyn, S.spec.smem);
    b.static_sh = S.static_shadows[r];
    b.static_img = C > 1 ? S.static_imgs[r] : nullptr;
    b.epoch = 0;
    b.wepoch.assign((nt + 31) / 32, 0);
    b.arrived = 0;
    b.live = nt;
    b.wg.assign((nt + 127) / 128, Warpgroup{});
    for (int i = 0; i < nt; ++i) {
      Thread& t = b.threads[i];
      t = Thread{};
      t.tid = uint3{static_cast<unsigned>(i % S.spec.block.x), static_cast<unsigned>((i / S.spec.block.x) % S.spec.block.y),
                    static_cast<unsigned>(i / (S.spec.block.x * S.spec.block.y))};
      t.linear = i;
      t.lane = i % 32;
      t.warp = i / 32;
      t.gid = static_cast<uint16_t>(r * nt + i);
      t.blk = &b;
      t.state = kRunnable;
      t.pdl_waited = !S.spec.pdl;
      init_fiber(&t, S.stacks[t.gid]);
    }
  }
  S.running_block = C == 1 ? 0 : -1;
  const std::vector<int> border = make_order(static_cast<int>(C), mode, seed ^ first_block);
  const std::vector<int> torder = make_order(nt, mode, seed * 31 + first_block);
  for (;;) {
    bool progress = false;
    for (int r : border) {
      Block& b = S.blocks[r];
      bool any = false;
      for (int i = 0; i < nt && !any; ++i) any = b.threads[i].state == kRunnable;
      if (!any) continue;
      swap_in(r);
      for (int i : torder) {
        Thread& t = b.threads[i];
        while (t.state == kRunnable) {
          g_cur = &t;
          threadIdx = t.tid;
          blockIdx = b.idx;
          const int saved = g_rt;
          g_rt = 0;
          gptoss_hs_switch(&S.sched_sp, t.sp);
          g_rt = saved;
          g_cur = nullptr;
          progress = true;
        }
      }
    }
    if (progress) continue;
    if (S.cluster_live == 0) break;
    // nothing can run and threads remain: a deadlock
    for (Block& b : S.blocks)
      for (int i = 0; i < nt; ++i) {
        Thread& t = b.threads[i];
        if (t.state == kDone) continue;
        g_cur = &t;
        if (t.state == kWaitBlock) report("barrier", nullptr, "deadlock: waits at __syncthreads that other threads never reach");
        else if (t.state == kWaitCluster) report("barrier", nullptr, "deadlock: waits at cluster.sync that other threads never reach");
        else if (t.state == kWaitColl) report("collective", nullptr, "deadlock: waits in %s (mask 0x%08x) that a named lane never reaches",
                                              coll_name(t.coll), t.cmask);
        g_cur = nullptr;
      }
    S.aborted = true;
    break;
  }
  S.running_block = -1;
  S.blocks_run += C;
  S.threads_run += static_cast<uint64_t>(C) * nt;
}

void init_image() {
  Sim& S = sim();
  if (!S.image.empty()) return;
  Dl_info self;
  if (!dladdr(reinterpret_cast<const void*>(&init_image), &self)) return;
  struct Ctx { const void* base; std::vector<Region>* out; } ctx{self.dli_fbase, &S.image};
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* p) -> int {
        Ctx* c = static_cast<Ctx*>(p);
        if (reinterpret_cast<const void*>(info->dlpi_addr) != c->base) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i)
          if (info->dlpi_phdr[i].p_type == PT_LOAD) {
            const uintptr_t lo = info->dlpi_addr + info->dlpi_phdr[i].p_vaddr;
            c->out->push_back(Region{lo, lo + info->dlpi_phdr[i].p_memsz});
            if (info->dlpi_phdr[i].p_flags & PF_W) {
              g_rw_lo = g_rw_lo ? std::min(g_rw_lo, lo) : lo;
              g_rw_hi = std::max(g_rw_hi, lo + info->dlpi_phdr[i].p_memsz);
            }
          }
        return 1;
      },
      &ctx);
}

}  // namespace

// ---- entry points used by hostsim.h ----
extern "C" [[noreturn]] void gptoss_hs_fiber_main() {
  Sim& S = sim();
  Thread* t = g_cur;
  S.thunk(S.call);
  ++g_rt;  // (never decremented: the fiber ends; the scheduler restores its own count)
  thread_exit(g_cur);
  gptoss_hs_switch(&t->sp, S.sched_sp);
  __builtin_unreachable();
}


void syncthreads() {
  InRuntime rt_;
  Thread* t = g_cur;
  Block* b = t->blk;
  t->state = kWaitBlock;
  if (++b->arrived == b->live) release_block(b);
  yield_thread();
}
void syncwarp(unsigned mask) {
  InRuntime rt_; arrive_collective(kCollSyncwarp, mask); }
unsigned activemask() {
  InRuntime rt_;
  Thread* t = g_cur;
  unsigned m = 0;
  for (int l = 0; l < lanes_in_warp(t->blk, t->warp); ++l)
    if (t->blk->threads[t->warp * 32 + l].state != kDone) m |= 1u << l;
  return m;
}
void threadfence() {}
uint32_t shfl32(unsigned mask, uint32_t v, int mode, int arg, int width) {
  InRuntime rt_;
  Thread* t = g_cur;
  if (width <= 0 || width > 32 || (width & (width - 1)))
    report("collective", __builtin_return_address(0), "__shfl_sync width %d is not a power of two <= 32", width);
  t->in[0] = v;
  t->in[1] = static_cast<uint32_t>(mode);
  t->in[2] = static_cast<uint32_t>(arg);
  t->in[3] = static_cast<uint32_t>(width > 0 && width <= 32 ? width : 32);
  arrive_collective(kCollShfl, mask);
  return g_cur->out[0];
}
unsigned ballot(unsigned mask, int pred) {
  InRuntime rt_;
  g_cur->in[0] = pred != 0;
  arrive_collective(kCollBallot, mask);
  return g_cur->out[0];
}
unsigned match_any(unsigned mask, uint64_t v) {
  InRuntime rt_;
  g_cur->in64[0] = v;
  arrive_collective(kCollMatch, mask);
  return g_cur->out[0];
}

uint64_t atomic_rmw(void* p, int type, int op, uint64_t v, uint64_t cmp) {
  InRuntime rt_;
  Thread* t = g_cur;
  const size_t n = type == kAtomicU64 ? 8 : 4;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const void* pc = __builtin_return_address(0);
  SharedLoc loc;
  if (t != nullptr) {
    if (a % n) report("atomic", pc, "misaligned atomic at %p", p);
    if (locate_shared(a, n, &loc)) {
      if (loc.oob) {
        report("shared-oob", pc, "atomic past the block's shared memory");
        return 0;
      }
      // atomics never race with each other: only the never-written check applies
      for (size_t i = 0; i < n; ++i)
        if (!(fresh(loc.sh[i]).flags & kWritten)) report("shared-uninit", pc, "atomic on shared byte 0x%x that no thread has written", loc.off + static_cast<uint32_t>(i));
    } else {
      const Region* r = find_region(a);
      global_access(a, n, true, pc, t->pdl_waited);
      if (r == nullptr || a + n > r->hi) return 0;  // reported; not performed
    }
  }
  uint64_t old = 0;
  std::memcpy(&old, p, n);
  uint64_t nv = old;
  auto f = [](uint64_t b) { return bits_f32(static_cast<uint32_t>(b)); };
  auto fb = [](float x) { return static_cast<uint64_t>(f32_bits(x)); };
  const bool is_signed = type == kAtomicI32;
  const int64_t so = is_signed ? static_cast<int32_t>(old) : static_cast<int64_t>(old);
  const int64_t sv = is_signed ? static_cast<int32_t>(v) : static_cast<int64_t>(v);
  switch (op) {
    case kAtomicAdd: nv = type == kAtomicF32 ? fb(f(old) + f(v)) : old + v; break;
    case kAtomicSub: nv = old - v; break;
    case kAtomicOr: nv = old | v; break;
    case kAtomicAnd: nv = old & v; break;
    case kAtomicXor: nv = old ^ v; break;
    case kAtomicMax: nv = type == kAtomicF32 ? fb(std::fmax(f(old), f(v))) : (so > sv ? old : v); break;
    case kAtomicMin: nv = type == kAtomicF32 ? fb(std::fmin(f(old), f(v))) : (so < sv ? old : v); break;
    case kAtomicExch: nv = v; break;
    case kAtomicCas: nv = (old == cmp) ? v : old; break;
  }
  std::memcpy(p, &nv, n);
  if (t != nullptr && locate_shared(a, n, &loc))
    for (size_t i = 0; i < n; ++i) fresh(loc.sh[i]).flags |= kWritten;
  return old;
}

unsigned cluster_block_rank() { return static_cast<unsigned>(g_cur->blk->rank); }
unsigned cluster_num_blocks() { return sim().spec.cluster; }
void cluster_sync() {
  InRuntime rt_;
  Sim& S = sim();
  g_cur->state = kWaitCluster;
  if (++S.cluster_arrived == S.cluster_live) release_cluster();
  yield_thread();
}
void* map_shared_rank(const void* p, unsigned rank) {
  InRuntime rt_;
  Sim& S = sim();
  Thread* t = g_cur;
  if (rank >= S.spec.cluster) {
    report("cluster", __builtin_return_address(0), "map_shared_rank to rank %u of a %u-block cluster", rank, S.spec.cluster);
    return const_cast<void*>(p);
  }
  SharedLoc loc;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!locate_shared(a, 1, &loc) || loc.b != t->blk) {
    report("cluster", __builtin_return_address(0), "map_shared_rank of an address that is not this block's shared memory");
    return const_cast<void*>(p);
  }
  Block& target = S.blocks[rank];
  if (loc.dynamic) return target.dyn + loc.off;
  if (static_cast<int>(rank) == S.running_block || target.static_img == nullptr)
    return reinterpret_cast<void*>(sect_lo() + loc.off);
  return target.static_img + loc.off;
}

size_t cvta_generic_to_shared(const void* p) {
  InRuntime rt_;
  SharedLoc loc;
  if (g_cur == nullptr || !locate_shared(reinterpret_cast<uintptr_t>(p), 1, &loc) || loc.b != g_cur->blk) {
    report("shared-oob", __builtin_return_address(0), "__cvta_generic_to_shared of %p, not this block's shared memory", p);
    return 0xFFFFFFF0u;
  }
  return loc.dynamic ? loc.off : kStaticWindowBase + loc.off;
}
void* dynamic_smem() { return g_cur->blk->dyn; }

void cp_async(uint32_t smem_addr, const void* gsrc, int cp_size, int src_size) {
  InRuntime rt_;
  Thread* t = g_cur;
  const void* pc = __builtin_return_address(0);
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) report("cp.async", pc, "copy size %d (must be 4, 8 or 16)", cp_size);
  if (src_size < 0 || src_size > cp_size) report("cp.async", pc, "src-size %d outside [0, %d]", src_size, cp_size);
  if (smem_addr % static_cast<uint32_t>(cp_size) || reinterpret_cast<uintptr_t>(gsrc) % static_cast<uintptr_t>(cp_size))
    if (src_size > 0) report("cp.async", pc, "misaligned %d-byte copy (shared 0x%x, global %p)", cp_size, smem_addr, gsrc);
  Shadow* sh = nullptr;
  uint8_t* dst = shared_ptr(t->blk, smem_addr, static_cast<size_t>(cp_size), &sh, "cp.async destination");
  if (dst == nullptr) return;
  shadow_access(t->blk, sh, smem_addr, static_cast<size_t>(cp_size), t, true, pc, /*async_issue=*/true);
  t->open.push_back(AsyncCopy{t->blk, dst, sh, static_cast<const uint8_t*>(gsrc), cp_size, std::max(0, std::min(src_size, cp_size)), t->pdl_waited});
}
void cp_async_commit() {
  InRuntime rt_;
  Thread* t = g_cur;
  t->groups.push_back(std::move(t->open));
  t->open.clear();
}
void cp_async_wait(int n) {
  InRuntime rt_;
  Thread* t = g_cur;
  while (static_cast<int>(t->groups.size()) > n) {
    complete_copies(t, t->groups.front());
    t->groups.erase(t->groups.begin());
  }
}
void ldmatrix(uint32_t smem_addr, int count, bool trans, uint32_t* out) {
  InRuntime rt_;
  Thread* t = g_cur;
  t->in[0] = smem_addr;
  t->in[1] = static_cast<uint32_t>(count);
  t->in[2] = trans;
  arrive_collective(kCollLdmatrix, 0xFFFFFFFFu);
  for (int i = 0; i < count; ++i) out[i] = g_cur->out[i];
}
void mma_m16n8k16_bf16(float* d, const uint32_t* a, const uint32_t* b) {
  InRuntime rt_;
  Thread* t = g_cur;
  for (int i = 0; i < 4; ++i) t->in[i] = a[i];
  t->in[4] = b[0];
  t->in[5] = b[1];
  t->ptr = d;
  arrive_collective(kCollMma, 0xFFFFFFFFu);
}
// The architecture the paths are chosen for (gptoss_arch_info.cc): the emulated device's, the
// code's, the override's, whichever is lowest.
int effective_cc() {
  const Sim& S = sim();
  int cc = S.device_cc;
  if (S.code_cc > 0 && S.code_cc < cc) cc = S.code_cc;
  const int forced = gptoss_arch_override();
  if (forced > 0 && forced < cc) cc = forced;
  return cc;
}
// Dynamic shared memory a block of architecture cc may opt in to.
size_t smem_limit(int cc) {
  if (cc == 80 || cc == 87) return 163 * 1024;
  if (cc >= 80 && cc < 90) return 99 * 1024;
  return kMaxDynSmem;
}
void wgmma_fence() {
  InRuntime rt_; arrive_collective(kCollWgFence, 0); }
void wgmma_commit() {
  InRuntime rt_; arrive_collective(kCollWgCommit, 0); }
void wgmma_wait(int n) {
  InRuntime rt_;
  g_cur->in[0] = static_cast<uint32_t>(n);
  arrive_collective(kCollWgWait, 0);
}
void wgmma_mma(float* d, int n, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, int scale_d, int tnsp_a,
               int tnsp_b) {
  InRuntime rt_;
  Thread* t = g_cur;
  if (effective_cc() != 90)
    report("arch", __builtin_return_address(0), "wgmma on the sm_%d paths (wgmma needs sm_90a code on a 9.0 device)",
           effective_cc());
  t->in[0] = static_cast<uint32_t>(n);
  t->in[1] = static_cast<uint32_t>(scale_d);
  t->in[2] = a_regs != nullptr;
  t->in[3] = static_cast<uint32_t>(tnsp_a);
  t->in[4] = static_cast<uint32_t>(tnsp_b);
  if (a_regs)
    for (int i = 0; i < 4; ++i) t->in[5 + i] = a_regs[i];  // in[5..9)
  t->in64[0] = desc_a;
  t->in64[1] = desc_b;
  t->ptr = d;
  if (t->blk->nthreads % 128) report("wgmma", __builtin_return_address(0), "wgmma in a block whose size is not a multiple of 128");
  arrive_collective(kCollWgMma, 0);
}
void fence_proxy_async() { g_cur->proxy_fences++; }
void griddep_wait() { g_cur->pdl_waited = true; }
void griddep_launch_dependents() {}
void prefetch_l2(const void*, uint32_t) {}

cudaError_t func_set_attribute(const void* kernel, int attr, int value) {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > smem_limit(S.device_cc)) return t_last_error = cudaErrorInvalidValue;
    S.max_dyn_smem[kernel] = value;
  }
  return cudaSuccess;
}
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  (void)kernel;
  const Sim& S = sim();
  if (S.code_cc == 0) return t_last_error = cudaErrorNoKernelImageForDevice;
  std::memset(attr, 0, sizeof *attr);
  attr->maxThreadsPerBlock = 1024;
  attr->ptxVersion = S.code_cc;
  attr->binaryVersion = S.code_cc;
  return cudaSuccess;
}
cudaError_t occupancy(int* blocks, const void* kernel, int threads, size_t smem) {
  (void)kernel;
  if (threads <= 0 || threads > 1024) return t_last_error = cudaErrorInvalidValue;
  int b = 2048 / threads;
  if (smem > 0) b = std::min<int>(b, static_cast<int>((228 * 1024) / (smem + 1024)));
  *blocks = std::max(0, std::min(b, 32));
  return cudaSuccess;
}

cudaError_t launch(const LaunchSpec& spec, const void* kernel, KernelThunk thunk, void* call, size_t call_bytes) {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  init_image();
  const uint64_t nt = static_cast<uint64_t>(spec.block.x) * spec.block.y * spec.block.z;
  const uint64_t nb = static_cast<uint64_t>(spec.grid.x) * spec.grid.y * spec.grid.z;
  if (nt == 0 || nt > 1024 || spec.block.z > 64 || nb == 0 || spec.grid.y > 65535 || spec.grid.z > 65535)
    return t_last_error = cudaErrorInvalidConfiguration;
  auto it = S.max_dyn_smem.find(kernel);
  const size_t allowed = std::max<size_t>(kDefaultDynSmem, it == S.max_dyn_smem.end() ? 0 : static_cast<size_t>(it->second));
  if (spec.smem > allowed) return t_last_error = cudaErrorInvalidValue;
  if (spec.cluster < 1 || spec.cluster > 8 || spec.grid.x % spec.cluster) return t_last_error = cudaErrorInvalidValue;
  if (S.code_cc == 0) return t_last_error = cudaErrorNoKernelImageForDevice;
  const Sym* ks = symbol_at(kernel);
  char addr[40];
  snprintf(addr, sizeof addr, "kernel@%p", kernel);
  S.kernel_name = ks ? demangle(ks->name.c_str()) : addr;
  const int cc = effective_cc();
  if (cc < 90 && spec.cluster > 1) {
    report("arch", nullptr, "a thread-block-cluster launch on the sm_%d paths (clusters need compute capability 9.0)", cc);
    return t_last_error = cudaErrorInvalidValue;
  }
  if (spec.smem > smem_limit(cc)) {
    report("arch", nullptr, "%zu bytes of dynamic shared memory on the sm_%d paths (at most %zu per block)", spec.smem, cc,
           smem_limit(cc));
    return t_last_error = cudaErrorInvalidValue;
  }
  if (cc < 90 && spec.pdl)
    report("arch", nullptr, "a launch with the PDL attribute on the sm_%d paths (their code has no griddepcontrol.wait)", cc);
  if (spec.cluster > 1 && S.refuse_clusters) return t_last_error = cudaErrorClusterOutOfResources;
  if (spec.pdl && S.refuse_pdl) return t_last_error = static_cast<cudaError_t>(S.refuse_pdl);
  S.spec = spec;
  blockDim = spec.block;
  gridDim = spec.grid;
  S.thunk = thunk;
  S.call = call;
  S.call_lo = reinterpret_cast<uintptr_t>(call);
  S.call_hi = S.call_lo + call_bytes;
  S.aborted = false;
  S.cur_writes.clear();
  const uint64_t seq = S.launches++;
  S.kernel_launches[S.kernel_name]++;
  const int mode = S.order_mode >= 0 ? S.order_mode : static_cast<int>(seq % 3);
  const uint64_t seed = S.seed + seq * 0x9E3779B97F4A7C15ull;
  const uint64_t clusters = nb / spec.cluster;
  const std::vector<int> corder = make_order(static_cast<int>(std::min<uint64_t>(clusters, 1u << 30)), mode, seed + 7);
  for (uint64_t c = 0; c < clusters && !S.aborted; ++c) run_cluster(static_cast<uint64_t>(corder[c]) * spec.cluster, mode, seed);
  S.prev_writes.swap(S.cur_writes);
  S.blocks.clear();
  S.threads.clear();
  S.call = nullptr;
  S.call_lo = S.call_hi = 0;
  return cudaSuccess;
}

}  // namespace gptoss_hostsim

// ---- the CUDA runtime API subset ----
using gptoss_hostsim::t_last_error;
extern "C" {
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return t_last_error; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorClusterOutOfResources: return "cudaErrorClusterOutOfResources";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
    case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
    default: return "cudaErrorUnknown";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorClusterOutOfResources: return "too many resources requested for launch of the cluster (hostsim: refused on request)";
    case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
    default: return "unknown error";
  }
}
cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : (t_last_error = cudaErrorInvalidDevice); }
cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  const int cc = gptoss_hostsim::sim().device_cc;
  switch (a) {  // an H100 SXM's values (the emulated device's compute capability and shared memory)
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *v = cc / 10; break;
    case cudaDevAttrComputeCapabilityMinor: *v = cc % 10; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(gptoss_hostsim::smem_limit(cc)); break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 48 * 1024; break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrL2CacheSize: *v = 50 * 1024 * 1024; break;
    default: *v = 0;
  }
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
}

// ---- the checker/runner interface (hostsim_api.h) ----
namespace gptoss_hostsim {
void begin_call(const std::vector<std::pair<uintptr_t, size_t>>& regions) {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  S.regions.clear();
  for (auto& [p, n] : regions) {
    Region r;
    r.lo = p;
    r.hi = p + n;
    r.arg = static_cast<int>(S.regions.size());
    S.regions.push_back(r);
  }
  std::sort(S.regions.begin(), S.regions.end(), [](const Region& a, const Region& b) { return a.lo < b.lo; });
}
std::vector<std::string> end_call() {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  S.last_traffic.assign(S.regions.size(), Traffic{});
  for (const Region& g : S.regions)
    S.last_traffic[g.arg] = Traffic{g.lo, g.hi - g.lo, g.bytes_read, g.bytes_written, g.blocks.size()};
  S.regions.clear();
  std::vector<std::string> r;
  r.swap(S.reports);
  if (!r.empty()) {
    std::string counts = "counts:";
    for (auto& [k, v] : S.report_counts) counts += " " + k + "=" + std::to_string(v);
    r.push_back(counts);
  }
  S.report_counts.clear();
  S.report_keys.clear();
  return r;
}
void set_order(int mode, uint64_t seed) {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  S.order_mode = mode;
  S.seed = seed;
}
void set_device(int cc, int code_cc) {
  {
    Sim& S = sim();
    std::lock_guard<std::mutex> lock(S.mu);
    S.device_cc = cc;
    S.code_cc = code_cc;
  }
  gptoss::arch::reset_cache();
}
std::pair<int, int> device() {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  return {S.device_cc, S.code_cc};
}
void set_refuse_clusters(bool refuse) { sim().refuse_clusters = refuse; }
void set_refuse_pdl(int error) { sim().refuse_pdl = error; }
void forget_previous_kernel() {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  S.prev_writes.clear();
}
std::vector<Traffic> last_call_traffic() {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  return S.last_traffic;
}
Stats stats() {
  Sim& S = sim();
  std::lock_guard<std::mutex> lock(S.mu);
  Stats st;
  st.launches = S.launches;
  st.blocks = S.blocks_run;
  st.threads = S.threads_run;
  st.kernels = S.kernel_launches;
  st.reports = S.kernel_reports;
  return st;
}
}  // namespace gptoss_hostsim

// ---- -fsanitize=thread instrumentation callbacks: every load/store of the kernel files ----
#define GPTOSS_HS_RW(N)                                                                                          \
  extern "C" void __tsan_read##N(void* p) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), N, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_write##N(void* p) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), N, true, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_read##N(void* p) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), N, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_unaligned_write##N(void* p) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), N, true, __builtin_return_address(0)); } \
  extern "C" void __tsan_volatile_read##N(void* p) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), N, false, __builtin_return_address(0)); } \
  extern "C" void __tsan_volatile_write##N(void* p) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), N, true, __builtin_return_address(0)); }
GPTOSS_HS_RW(1)
GPTOSS_HS_RW(2)
GPTOSS_HS_RW(4)
GPTOSS_HS_RW(8)
GPTOSS_HS_RW(16)
#undef GPTOSS_HS_RW
extern "C" {
void __tsan_read_range(void* p, unsigned long n) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), n, false, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { gptoss_hostsim::access(reinterpret_cast<uintptr_t>(p), n, true, __builtin_return_address(0)); }
void __tsan_init(void) {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void) {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
}
// Host code of the kernel files (the launchers' std::atomic flags) uses these; plain atomics.
#define GPTOSS_HS_ATOMIC(B, T)                                                                              \
  extern "C" T __tsan_atomic##B##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  extern "C" void __tsan_atomic##B##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" T __tsan_atomic##B##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
  extern "C" int __tsan_atomic##B##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {         \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }              \
  extern "C" int __tsan_atomic##B##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {           \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }              \
  extern "C" T __tsan_atomic##B##_compare_exchange_val(volatile T* a, T c, T v, int, int) {               \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
GPTOSS_HS_ATOMIC(8, uint8_t)
GPTOSS_HS_ATOMIC(16, uint16_t)
GPTOSS_HS_ATOMIC(32, uint32_t)
GPTOSS_HS_ATOMIC(64, uint64_t)
#undef GPTOSS_HS_ATOMIC
