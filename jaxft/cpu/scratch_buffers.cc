// Keeps XLA's per-run scratch buffers mapped between runs: a library that jaxft's commands
// preload into themselves on CPU hosts (LD_PRELOAD, jaxft/cpu/process.py).
//
// Why: XLA's CPU runtime takes one scratch buffer for all the intermediate values of a run of a
// program from posix_memalign and frees it when the run ends. glibc serves a block that large
// with a fresh mmap and returns it with munmap, so every step the kernel faults the whole
// buffer in and zeroes it again, and, when it has run out of free huge pages, compacts memory
// first. Here aligned blocks of 16 MB and more (posix_memalign, aligned_alloc, memalign) come
// from a cache of mappings instead: a freed block stays mapped, faulted in, for the next run
// that needs one.
//
// Bounds: the cache holds no more than the most that was ever in use at once (a training loop
// holds two buffers: XLA takes the next step's before it frees the last step's) and no more
// than JAXFT_SCRATCH_CACHE_BYTES, read when the library loads (jaxft/cpu/process.py sets it
// from the cgroup's memory limit and the processes on the host; a quarter of physical memory
// without it); a freed block beyond that is unmapped, as glibc would.
// malloc, calloc and all smaller blocks stay glibc's; free, realloc and malloc_usable_size
// pass anything that is not one of these blocks on to glibc.

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
}

namespace {

constexpr size_t kLarge = size_t{16} << 20;  // smaller blocks stay glibc's
constexpr size_t kAlign = size_t{2} << 20;   // blocks are 2 MB aligned (huge pages), which
                                             // also tells free() quickly what is not ours
constexpr int kSlots = 64;

struct Block {
  void* start;
  size_t size;
  bool used;
  uint64_t freed;  // when it was last freed (a counter), for least-recently-freed eviction
};

pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
Block blocks[kSlots];
int count = 0;
size_t live = 0, peak = 0, cached = 0;
size_t limit = 0;  // set when the library loads (init)
uint64_t ticks = 0;

size_t round_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

size_t budget() { return peak < limit ? peak : limit; }

// JAXFT_SCRATCH_CACHE_BYTES if set to a number, else a quarter of physical memory. Read once,
// at load time: getenv and strtoull allocate nothing, and the process may change its
// environment later.
size_t configured_limit() {
  if (const char* text = getenv("JAXFT_SCRATCH_CACHE_BYTES")) {
    char* end = nullptr;
    const unsigned long long value = strtoull(text, &end, 10);
    if (end != text && *end == '\0') return static_cast<size_t>(value);
  }
  return static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) *
         static_cast<size_t>(sysconf(_SC_PAGESIZE)) / 4;
}

// A fresh mapping of `size` bytes (a multiple of kAlign) at a kAlign boundary, or nullptr.
void* map(size_t size) {
  void* raw = mmap(nullptr, size + kAlign, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t base = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t start = (base + kAlign - 1) / kAlign * kAlign;
  if (start > base) munmap(raw, start - base);
  munmap(reinterpret_cast<void*>(start + size), base + kAlign - start);
  void* p = reinterpret_cast<void*>(start);
  madvise(p, size, MADV_HUGEPAGE);  // a no-op where transparent huge pages are off
  return p;
}

void unmap(int i) {
  munmap(blocks[i].start, blocks[i].size);
  cached -= blocks[i].size;
  blocks[i] = blocks[--count];
}

// A block of at least n bytes (n >= kLarge): the smallest cached one that fits, else a new one.
void* take(size_t n) {
  n = round_up(n);
  pthread_mutex_lock(&mu);
  int best = -1;
  for (int i = 0; i < count; ++i)
    if (!blocks[i].used && blocks[i].size >= n && (best < 0 || blocks[i].size < blocks[best].size))
      best = i;
  void* p = nullptr;
  if (best >= 0) {
    blocks[best].used = true;
    cached -= blocks[best].size;
    live += blocks[best].size;
    p = blocks[best].start;
  } else if (count < kSlots && (p = map(n)) != nullptr) {
    blocks[count++] = {p, n, true, 0};
    live += n;
  }
  if (live > peak) peak = live;
  pthread_mutex_unlock(&mu);
  return p;
}

int find(void* p) {
  for (int i = 0; i < count; ++i)
    if (blocks[i].start == p) return i;
  return -1;
}

// Returns p to the cache if it is one of ours (then true), evicting what exceeds the budget.
bool give_back(void* p) {
  if (p == nullptr || reinterpret_cast<uintptr_t>(p) % kAlign != 0) return false;
  pthread_mutex_lock(&mu);
  const int i = find(p);
  if (i >= 0) {
    blocks[i].used = false;
    blocks[i].freed = ++ticks;
    live -= blocks[i].size;
    cached += blocks[i].size;
    while (cached > budget()) {  // least recently freed first
      int oldest = -1;
      for (int j = 0; j < count; ++j)
        if (!blocks[j].used && (oldest < 0 || blocks[j].freed < blocks[oldest].freed)) oldest = j;
      unmap(oldest);
    }
  }
  pthread_mutex_unlock(&mu);
  return i >= 0;
}

size_t size_of(void* p) {
  if (p == nullptr || reinterpret_cast<uintptr_t>(p) % kAlign != 0) return 0;
  pthread_mutex_lock(&mu);
  const int i = find(p);
  const size_t size = i >= 0 ? blocks[i].size : 0;
  pthread_mutex_unlock(&mu);
  return size;
}

// A child of fork() must not inherit the lock held by a thread that does not exist there.
void lock() { pthread_mutex_lock(&mu); }
void unlock() { pthread_mutex_unlock(&mu); }
__attribute__((constructor)) void init() {
  limit = configured_limit();
  pthread_atfork(lock, unlock, unlock);
}

}  // namespace

#define JAXFT_EXPORT extern "C" __attribute__((visibility("default")))

JAXFT_EXPORT int posix_memalign(void** out, size_t alignment, size_t n) {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
  if (n >= kLarge && alignment <= kAlign) {
    if (void* p = take(n)) {
      *out = p;
      return 0;
    }
  }
  void* p = __libc_memalign(alignment, n);
  if (p == nullptr) return ENOMEM;
  *out = p;
  return 0;
}

JAXFT_EXPORT void* aligned_alloc(size_t alignment, size_t n) {
  if (n >= kLarge && alignment <= kAlign) {
    if (void* p = take(n)) return p;
  }
  return __libc_memalign(alignment, n);
}

JAXFT_EXPORT void* memalign(size_t alignment, size_t n) { return aligned_alloc(alignment, n); }

JAXFT_EXPORT void free(void* p) {
  if (!give_back(p)) __libc_free(p);
}

JAXFT_EXPORT void* realloc(void* p, size_t n) {
  const size_t size = size_of(p);
  if (size == 0) return __libc_realloc(p, n);
  void* q = __libc_malloc(n);
  if (q != nullptr) {
    std::memcpy(q, p, size < n ? size : n);
    give_back(p);
  }
  return q;
}

JAXFT_EXPORT size_t malloc_usable_size(void* p) {
  if (const size_t size = size_of(p)) return size;
  using Fn = size_t (*)(void*);
  static Fn glibc = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "malloc_usable_size"));
  return glibc ? glibc(p) : 0;
}
