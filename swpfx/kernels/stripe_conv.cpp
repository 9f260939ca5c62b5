// Fused stripe-sparse direct convolution for CPUs (swpfx, DESIGN.md §4b, issue 14).
//
// A stripe-pruned conv is a sum over kernel taps (i, j) of 1x1 convs on shifted inputs, each over
// only the filters that keep that tap:
//     y[o, p] = bias[o] + sum_{t=(i,j) kept by o} sum_c W[o, c, i, j] * xpad[c, s*p + d*(i, j)]
// This kernel computes it in one pass without materialising shifted inputs or stripe maps.
//
// Layout. The zero-padded input is seen as "phase planes": phase (a, b) holds xpad[c, sh*u + a, sw*v + b]
// on a grid of Hq x Wq positions (one plane for stride 1; only the phases some tap reads are kept).
// Output pixels are enumerated on the flattened phase grid, q = y*Wq + x (x < Wo valid; the few
// columns x >= Wo are computed and discarded). Tap (i, j) then reads phase ((dh*i)%sh, (dw*j)%sw) at
// the fixed offset ((dh*i)/sh)*Wq + (dw*j)/sw, so a run of consecutive q is a run of consecutive floats
// for every tap, across row ends, and SIMD vectors run over that flat pixel axis (small maps waste
// few lanes: 7x7 is 63 flat positions = 4 vectors of 16). With "same"-style padding (every plane's real
// input columns fit in Wo) the rows are packed "dense" instead: Wo floats, real columns only, so q =
// y*Wo + x has no discarded columns, and a tap that reaches into the left/right padding loads its vectors
// with the lanes that would read padding masked off (per band, tap class and vector, precomputed). Dense
// rows at stride 1 are the input's own rows: such a conv reads its NCHW input in place, packs nothing, and
// masks the lanes of taps reaching into the padding rows above and below as well ("in place").
//
// Work. The output is cut into R row bands x G filter groups (groups: contiguous filter ranges with
// about equal kept stripes); an item is one (band, group). Items are ordered band-major and split into
// one contiguous range per thread (below). Unless the conv reads its input in place, each thread packs,
// into its own buffer, the phase-plane rows its band needs (the band plus the taps' reach below it), so
// no thread reads another's input copy and there is no barrier between packing and compute; consecutive
// items of one band reuse the packed copy. Per item, for each chunk of input channels, micro-tile of PV
// vectors and tap, the group's filters keeping that tap are processed in blocks of <= F filters by a
// register-blocked micro-kernel: F x PV accumulators, per channel PV vector loads of the shifted input and
// F broadcast weights (packed per block as [C][F]), then one add (a filter's first block: a store) of the
// accumulators into a per-thread buffer. The item ends by storing its outputs (band rows x group
// filters) into the NCHW output with bias, an optional residual and ReLU fused. Items never share an
// accumulator or an output element; the summation order of every output is fixed by the weights alone
// (chunk, then tap, then channel), so the result does not depend on the thread count or the partition.
//
// Threads. A small pool of workers that live across calls (the caller is thread 0). Thread t runs its
// own range front to back, then takes items from the back of the others' ranges (so a worker that the
// OS has not scheduled yet delays nothing). Workers spin ~SPIN us after a call for the next one, then
// sleep; on Linux each worker is pinned to a CPU other than the caller's (re-pinned when the caller
// moves): otherwise the scheduler tends to wake a worker on the caller's own CPU, where it waits.
//
// Written from scratch for swpfx. Vector width is chosen at compile time (-march=native):
// AVX-512 (16 floats), AVX2+FMA (8 floats) or portable GCC vector extensions (4 floats).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include <atomic>
#include <limits>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unistd.h>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SWP_PAUSE() _mm_pause()
#else
#define SWP_PAUSE() ((void)0)
#endif

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vbroadcast(const float* p) { return _mm512_set1_ps(*p); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vmax0(vec a) { return _mm512_max_ps(a, _mm512_setzero_ps()); }
inline vec vset1(float a) { return _mm512_set1_ps(a); }
// lanes [0, n) of p (n < VL); the others read as 0 / are not written
inline vec vload_part(const float* p, int n) { return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p); }
inline void vstore_part(float* p, vec v, int n) { _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v); }
inline __mmask16 range_mask(int a, int b) {  // lanes [a, b) of [0, 16)
  a = std::max(a, 0);
  b = std::min(b, 16);
  return b <= a ? 0 : static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
}
// lanes [a, b) from p[a..b) (a, b may lie outside [0, VL); p + lane is only read for loaded lanes), others 0
inline vec vload_range(const float* p, int a, int b) { return _mm512_maskz_loadu_ps(range_mask(a, b), p); }
// lane l = p[2 l] for l in [a, b), others 0 (reads p[2a .. 2b - 2] only)
inline vec vload_even_range(const float* p, int a, int b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const int lo = 2 * std::max(a, 0), hi = 2 * std::min(b, 16) - 1;
  const __m512 x0 = _mm512_maskz_loadu_ps(range_mask(lo, hi), p);
  const __m512 x1 = _mm512_maskz_loadu_ps(range_mask(lo - 16, hi - 16), p + 16);
  return _mm512_permutex2var_ps(x0, even, x1);
}
#define SWP_HAVE_EVEN_RANGE 1
using lanes_t = __mmask16;  // a lane mask, prepared once per micro-kernel call
inline lanes_t lanes_of(std::uint32_t bits) { return static_cast<__mmask16>(bits); }
inline vec vload_lanes(const float* p, lanes_t m) { return _mm512_maskz_loadu_ps(m, p); }
constexpr bool DENSE_ROWS = true;
constexpr const char* ISA = "avx512f";
constexpr int MAX_PV = 4, MAX_F = 16, DEF_PV = 2, DEF_F = 14;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int VL = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vbroadcast(const float* p) { return _mm256_broadcast_ss(p); }
inline vec vfmadd(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vmax0(vec a) { return _mm256_max_ps(a, _mm256_setzero_ps()); }
inline vec vset1(float a) { return _mm256_set1_ps(a); }
inline __m256i part_mask(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec vload_part(const float* p, int n) { return _mm256_maskload_ps(p, part_mask(n)); }
inline void vstore_part(float* p, vec v, int n) { _mm256_maskstore_ps(p, part_mask(n), v); }
inline vec vload_range(const float* p, int a, int b) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i m = _mm256_and_si256(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(std::max(a, -1) - 1)),
                                     _mm256_cmpgt_epi32(_mm256_set1_epi32(std::min(b, 8)), idx));
  return _mm256_maskload_ps(p, m);
}
using lanes_t = __m256i;
inline lanes_t lanes_of(std::uint32_t bits) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(bits)), bit), bit);
}
inline vec vload_lanes(const float* p, lanes_t m) { return _mm256_maskload_ps(p, m); }
constexpr bool DENSE_ROWS = true;
constexpr const char* ISA = "avx2+fma";
constexpr int MAX_PV = 4, MAX_F = 8, DEF_PV = 2, DEF_F = 6;
#else
constexpr int VL = 4;
typedef float vec __attribute__((vector_size(16)));
inline vec vzero() { return vec{0.f, 0.f, 0.f, 0.f}; }
inline vec vload(const float* p) { vec v; std::memcpy(&v, p, sizeof v); return v; }
inline void vstore(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline vec vbroadcast(const float* p) { return vec{*p, *p, *p, *p}; }
inline vec vfmadd(vec a, vec b, vec c) { return a * b + c; }
inline vec vadd(vec a, vec b) { return a + b; }
inline vec vmax0(vec a) {
  vec r;
  for (int k = 0; k < VL; ++k) r[k] = a[k] > 0.f ? a[k] : 0.f;
  return r;
}
inline vec vset1(float a) { return vec{a, a, a, a}; }
inline vec vload_part(const float* p, int n) {
  vec v = vzero();
  for (int k = 0; k < n; ++k) v[k] = p[k];
  return v;
}
inline void vstore_part(float* p, vec v, int n) {
  for (int k = 0; k < n; ++k) p[k] = v[k];
}
inline vec vload_range(const float* p, int a, int b) {
  vec v = vzero();
  for (int k = std::max(a, 0); k < std::min(b, VL); ++k) v[k] = p[k];
  return v;
}
using lanes_t = std::uint32_t;
inline lanes_t lanes_of(std::uint32_t bits) { return bits; }
inline vec vload_lanes(const float* p, lanes_t m) {
  vec v = vzero();
  for (int k = 0; k < VL; ++k)
    if (m & (1u << k)) v[k] = p[k];
  return v;
}
constexpr bool DENSE_ROWS = false;  // masked scalar loads would cost more than the lanes they save
constexpr const char* ISA = "generic";
constexpr int MAX_PV = 4, MAX_F = 8, DEF_PV = 2, DEF_F = 4;
#endif

// buf[rows[f]*ts + 0 .. PV*VL) (+)= sum_c w[c*F + f] * x[c*xs + 0 .. PV*VL)   for f < F
// (stored instead of added for the filters f whose bit is set in `first`: no zeroing pass needed).
// MASKED: vector p of x loads only the lanes set in masks[p] (the others read as 0).
template <int F, int PV, bool MASKED>
void micro(const float* __restrict x, std::int64_t xs, const float* __restrict w, int cc,
           float* __restrict buf, const std::int32_t* __restrict rows, int ts, unsigned first,
           const std::uint32_t* __restrict masks) {
  vec acc[F][PV];
  lanes_t lanes[PV];
#pragma GCC unroll 4
  for (int p = 0; p < PV; ++p) lanes[p] = lanes_of(MASKED ? masks[p] : ~0u);
#pragma GCC unroll 16
  for (int f = 0; f < F; ++f)
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p) acc[f][p] = vzero();
  // Unrolled by 4: with one tap per call the loop is short (cc <= 128), and its per-iteration branch and
  // pointer updates cost ~6% of the 64-channel (56²) calls on Zen 3 (AVX2); measured, 8 gains nothing more.
#pragma GCC unroll 4
  for (int c = 0; c < cc; ++c) {
    vec xv[PV];
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p) xv[p] = MASKED ? vload_lanes(x + p * VL, lanes[p]) : vload(x + p * VL);
#pragma GCC unroll 16
    for (int f = 0; f < F; ++f) {
      const vec wf = vbroadcast(w + f);
#pragma GCC unroll 4
      for (int p = 0; p < PV; ++p) acc[f][p] = vfmadd(wf, xv[p], acc[f][p]);
    }
    x += xs;
    w += F;
  }
#pragma GCC unroll 16
  for (int f = 0; f < F; ++f) {
    float* o = buf + static_cast<std::int64_t>(rows[f]) * ts;
    if (first & (1u << f)) {
#pragma GCC unroll 4
      for (int p = 0; p < PV; ++p) vstore(o + p * VL, acc[f][p]);
    } else {
#pragma GCC unroll 4
      for (int p = 0; p < PV; ++p) vstore(o + p * VL, vadd(vload(o + p * VL), acc[f][p]));
    }
  }
}

using kern_t = void (*)(const float*, std::int64_t, const float*, int, float*, const std::int32_t*, int, unsigned,
                       const std::uint32_t*);

template <int PV, bool MASKED, std::size_t... I>
void fill_row(kern_t* row, std::index_sequence<I...>) {
  ((row[I] = &micro<static_cast<int>(I) + 1, PV, MASKED>), ...);
}
template <bool MASKED, std::size_t... P>
void fill_table(kern_t (*table)[MAX_F], std::index_sequence<P...>) {
  (fill_row<static_cast<int>(P) + 1, MASKED>(table[P], std::make_index_sequence<MAX_F>{}), ...);
}
struct Table {
  kern_t k[2][MAX_PV][MAX_F];  // [masked][pv - 1][nf - 1]
  Table() {
    fill_table<false>(k[0], std::make_index_sequence<MAX_PV>{});
    if constexpr (DENSE_ROWS) fill_table<true>(k[1], std::make_index_sequence<MAX_PV>{});
  }
};
const Table& table() {
  static const Table t;
  return t;
}

// A growable 64-byte-aligned buffer, one per thread and purpose, kept across calls (pool threads live on).
struct Scratch {
  float* p = nullptr;
  std::size_t n = 0;
  ~Scratch() { std::free(p); }
  float* get(std::size_t want) {
    if (n < want) {
      std::free(p);
      const std::size_t bytes = ((want * sizeof(float) + 63) / 64) * 64;
      p = static_cast<float*>(std::aligned_alloc(64, bytes));
      n = p ? want : 0;
    }
    return p;
  }
};

// What a thread has in its packed-input buffer (valid for one call id and one band).
struct ThreadState {
  Scratch input, acc;
  std::uint64_t call = 0;
  std::int64_t band = -1;
};
ThreadState& thread_state() {
  static thread_local ThreadState s;
  return s;
}

std::atomic<std::uint64_t> g_call_ids{0};

// ---------------------------------------------------------------------------------------------
// The thread pool. Items [0, n) are split into `threads` contiguous ranges, one per thread (slot 0 is
// the caller). A range is one 64-bit word, epoch << 32 | lo << 16 | hi, on its own cache line: the
// owner claims lo (front), other threads claim hi - 1 (back), both by compare-and-swap, so an item is
// run exactly once and a thread that starts late (or is preempted) only loses items to the others.
// The epoch in every word makes a late worker's claim on a finished call fail. The caller returns
// once every item is done; it never waits for a worker that has not claimed anything.
// (libgomp was tried first: with its default wait policy, shared with torch's OpenMP runtime and not
// configurable once torch has loaded it, a 2-thread region on a busy 2-core machine took 20-40 ms.)
constexpr int MAX_THREADS = 64;
constexpr std::int64_t MAX_ITEMS = 0xffff;
using item_fn = void (*)(void* ctx, int slot, std::int64_t item);

class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    if (pool->pid_ != getpid()) pool = new Pool();  // after fork(): the old workers do not exist here
    return *pool;
  }

  // Run fn(ctx, slot, i) for every i in [0, n) on up to `threads` threads (the caller included).
  void run(std::int64_t n, int threads, item_fn fn, void* ctx) {
    if (n <= 0) return;
    threads = static_cast<int>(std::min<std::int64_t>({static_cast<std::int64_t>(threads), n, MAX_THREADS}));
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (threads <= 1 || n > MAX_ITEMS || !busy.owns_lock()) {  // one thread, or the pool serves another caller
      for (std::int64_t i = 0; i < n; ++i) fn(ctx, 0, i);
      return;
    }
    const std::uint32_t e = publish(n, threads, fn, ctx);
#if defined(_OPENMP)
    // The OpenMP build, for use inside torch: the items run on the process's OpenMP threads. Loaded after torch, this
    // library binds torch's libgomp (same SONAME), so the kernel and torch's ops share one pool instead of contending
    // for the cores (measured 13-17 % faster end to end in a fused ResNet-18 than with the pool below). The same
    // ranges as the own pool: a thread runs its contiguous share first, so the bands it packs and the output rows it
    // writes are the ones it wrote in the previous conv (a fused ResNet-18 ran 8.1-8.7 -> 7.4-7.9 ms against
    // `schedule(dynamic, 1)`), and it takes items from a late thread's back only when done.
    epoch_.store(e, std::memory_order_relaxed);
#pragma omp parallel num_threads(threads)
    work(e, omp_get_thread_num(), threads);  // threads OpenMP did not start leave their shares to the others
#else
    ensure_workers(threads - 1);
    pin(threads);
    epoch_.store(e, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {  // pairs with the sleeper's increment + re-check
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      sleep_cv_.notify_all();
    }
    work(e, 0, threads);
    const auto start = Clock::now();
    for (std::int64_t spins = 0; remaining_.v.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 64 || Clock::now() - start < std::chrono::microseconds(200)) SWP_PAUSE();
      else std::this_thread::yield();  // a worker holding an item was descheduled
    }
#endif
  }

  // Wake sleeping workers ahead of a call (the caller still has argument checking to do); they spin
  // for the next call for another SPIN us. Never blocks: skipped when another caller owns the pool.
  void wake(int threads) {
#if defined(_OPENMP)
    return;  // no pool of our own
#endif
    threads = std::min(threads, MAX_THREADS);
    if (threads <= 1) return;
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (!busy.owns_lock()) return;
    ensure_workers(threads - 1);
    pin(threads);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      wake_seq_.fetch_add(1, std::memory_order_seq_cst);
      { std::lock_guard<std::mutex> lock(sleep_mutex_); }
      sleep_cv_.notify_all();
    }
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct alignas(64) Word { std::atomic<std::uint64_t> v{0}; };
  struct alignas(64) Count { std::atomic<std::int64_t> v{0}; };

  Pool() : pid_(getpid()) {
    const char* s = std::getenv("SWPFX_KERNEL_SPIN_US");
    spin_us_ = s ? std::max(0, std::atoi(s)) : 100;
    const char* p = std::getenv("SWPFX_KERNEL_PIN");
    pin_enabled_ = !(p && p[0] == '0');
#if defined(__linux__)
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) == 0)
      for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &set)) allowed_.push_back(c);
#endif
  }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int slot = static_cast<int>(workers_.size()) + 1;
      std::thread t([this, slot] { loop(slot); });
#if defined(__linux__)
      handles_.push_back(t.native_handle());
#endif
      t.detach();
      workers_.push_back(slot);
    }
  }

  // Pin worker k to the k-th allowed CPU after the caller's (only when the caller's CPU changed).
  void pin(int threads) {
#if defined(__linux__)
    if (!pin_enabled_) return;
    if (static_cast<int>(allowed_.size()) < threads) {  // more threads than CPUs: let the scheduler place them
      if (pinned_count_ > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int c : allowed_) CPU_SET(c, &set);
        for (pthread_t h : handles_) pthread_setaffinity_np(h, sizeof set, &set);
        pinned_for_ = -1;
        pinned_count_ = 0;
      }
      return;
    }
    const int cpu = sched_getcpu();
    if (cpu < 0 || (cpu == pinned_for_ && threads - 1 <= pinned_count_)) return;
    const auto it = std::find(allowed_.begin(), allowed_.end(), cpu);
    if (it == allowed_.end()) return;  // the caller runs outside the process's mask: leave the workers alone
    const std::size_t base = static_cast<std::size_t>(it - allowed_.begin());
    for (int k = 0; k < static_cast<int>(handles_.size()); ++k) {
      cpu_set_t set;
      CPU_ZERO(&set);
      if (k < threads - 1) {
        CPU_SET(allowed_[(base + 1 + k) % allowed_.size()], &set);
      } else {
        for (int c : allowed_) CPU_SET(c, &set);
      }
      pthread_setaffinity_np(handles_[k], sizeof set, &set);
    }
    pinned_for_ = cpu;
    pinned_count_ = threads - 1;
#else
    (void)threads;
#endif
  }

  // Set up a call's ranges (one contiguous share of [0, n) per thread) under a new epoch, which it returns.
  std::uint32_t publish(std::int64_t n, int threads, item_fn fn, void* ctx) {
    const std::uint32_t e = epoch_.load(std::memory_order_relaxed) + 1;
    fn_.store(fn, std::memory_order_relaxed);  // published by the release stores of the range words
    ctx_.store(ctx, std::memory_order_relaxed);
    threads_.store(threads, std::memory_order_relaxed);
    remaining_.v.store(n, std::memory_order_relaxed);
    for (int t = 0; t < threads; ++t) {
      const std::uint64_t lo = n * t / threads, hi = n * (t + 1) / threads;
      ranges_[t].v.store(static_cast<std::uint64_t>(e) << 32 | lo << 16 | hi, std::memory_order_release);
    }
    return e;
  }

  // Claim the front (own) or the back (others') item of range t, if epoch e is still current.
  std::int64_t claim(int t, std::uint32_t e, bool front) {
    std::atomic<std::uint64_t>& w = ranges_[t].v;
    std::uint64_t v = w.load(std::memory_order_acquire);
    for (;;) {
      if ((v >> 32) != e) return -1;
      const std::uint64_t lo = (v >> 16) & 0xffff, hi = v & 0xffff;
      if (lo >= hi) return -1;
      const std::uint64_t next = front ? v + (1u << 16) : v - 1;
      if (w.compare_exchange_weak(v, next, std::memory_order_acq_rel, std::memory_order_acquire))
        return static_cast<std::int64_t>(front ? lo : hi - 1);
    }
  }

  void work(std::uint32_t e, int slot, int threads) {
    // A claim that succeeded with epoch e keeps the call (fn_, ctx_) alive until its item is done.
    for (std::int64_t i; (i = claim(slot, e, true)) >= 0;) {
      fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), slot, i);
      remaining_.v.fetch_sub(1, std::memory_order_acq_rel);
    }
    for (int d = 1; d < threads; ++d)
      for (std::int64_t i; (i = claim((slot + d) % threads, e, false)) >= 0;) {
        fn_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed), slot, i);
        remaining_.v.fetch_sub(1, std::memory_order_acq_rel);
      }
  }

  void loop(int slot) {
    std::uint32_t seen = epoch_.load(std::memory_order_acquire);
    for (;;) {
      std::uint32_t e = seen;
      for (;;) {
        const auto start = Clock::now();  // spin for the next call for a while, then sleep
        for (int spins = 0; e == seen; ++spins) {
          SWP_PAUSE();
          e = epoch_.load(std::memory_order_acquire);
          if ((spins & 15) == 15 && Clock::now() - start > std::chrono::microseconds(spin_us_)) break;
        }
        if (e != seen) break;
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        const std::uint32_t w = wake_seq_.load(std::memory_order_relaxed);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        sleep_cv_.wait(lock, [&] {
          return epoch_.load(std::memory_order_seq_cst) != seen || wake_seq_.load(std::memory_order_seq_cst) != w;
        });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        e = epoch_.load(std::memory_order_acquire);
        if (e != seen) break;  // else woken ahead of a call: spin again
      }
      seen = e;
      const int threads = threads_.load(std::memory_order_relaxed);  // a stale value only makes claims fail
      if (slot < threads) work(e, slot, threads);
    }
  }

  const pid_t pid_;
  int spin_us_ = 100;
  bool pin_enabled_ = true;
  std::vector<int> allowed_;
  int pinned_for_ = -1, pinned_count_ = 0;
  std::mutex run_mutex_;
  std::vector<int> workers_;
#if defined(__linux__)
  std::vector<pthread_t> handles_;
#endif
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<int> sleepers_{0};
  std::atomic<std::uint32_t> wake_seq_{0};
  alignas(64) std::atomic<std::uint32_t> epoch_{0};
  std::atomic<item_fn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> threads_{0};
  Count remaining_;
  Word ranges_[MAX_THREADS];
};

// ---------------------------------------------------------------------------------------------
struct Plan {
  std::int64_t C, H, W, O, Kh, Kw, sh, sw, ph, pw, dh, dw;
  std::int64_t Ho, Wo, ext_h, ext_w;  // ext: the taps' reach below / right of an output, in phase rows / cols
  // Packed rows are Wrow floats: Wq = Wo + ext_w with the zero padding stored ("padded rows"), or Wo with
  // only a plane's real input columns stored, from its column vlo on ("dense rows": no computed-and-
  // discarded outputs; a tap reading a padding column masks those lanes instead).
  std::int64_t Wrow, margin;  // margin: zeros in front of every packed plane (taps may read left of it)
  bool dense;
  bool in_place;  // the taps read the NCHW input itself, nothing is packed (see swp_plan_create)
  std::vector<std::int64_t> plane_a, plane_b, plane_vlo;  // per plane some tap reads
  std::vector<std::int64_t> tap_plane, tap_off, tap_cls;
  std::vector<std::int64_t> cls_shift, cls_n;  // lane class: packed column x + shift must lie in [0, n)
  std::vector<std::int64_t> cls_row;           // ... and, in place, input row (band row + cls_row) in [0, H)
  std::vector<std::uint8_t> cls_full;          // ... always true: load without a mask
  std::vector<std::int64_t> band_mask_off;     // per band: masks[off + cls * nv + v] (bit l: lane l valid)
  std::vector<std::uint32_t> masks;
  const float* wpack;
  const std::int64_t* blk_woff;
  const std::int32_t *blk_tap, *blk_nf, *blk_rows, *blk_first, *rows, *grp_blk, *grp_filt, *filters;
  const std::uint8_t* alive;  // per filter (in group order): touched by some block
  std::int64_t G, R;
  std::vector<std::int64_t> band_y;  // R + 1 output-row boundaries
  std::vector<int> grp_cc;           // channel chunk per group
  std::vector<std::int64_t> grp_kept;  // kept stripes per group (packed weight floats per input channel)
  int PV, threads, ts;
};

// Floats per packed plane of a band of `rows` output rows: the margin, the rows the taps read, then
// ext_w + one vector (the last vector's taps read past the rows).
std::int64_t band_plane_stride(const Plan& P, std::int64_t rows) {
  return (P.margin + (rows + P.ext_h) * P.Wrow + P.ext_w + VL + 15) / 16 * 16;
}

// Pack plane (phase k, channel c) for output rows [y0, y0 + rows) into dst (lps floats, the margin first):
// row u - y0, column v holds xpad[c, sh*u + a, sw*(vlo + v) + b] (zero outside the input).
void pack_plane(const Plan& P, const float* xn, float* dst, std::int64_t k, std::int64_t c, std::int64_t y0,
                std::int64_t rows, std::int64_t lps) {
  const std::int64_t a = P.plane_a[k], Wr = P.Wrow, W = P.W, sw = P.sw;
  const float* src = xn + c * P.H * W;
  const std::int64_t nrows = rows + P.ext_h;
  std::memset(dst, 0, sizeof(float) * P.margin);
  dst += P.margin;
  const std::int64_t off = sw * P.plane_vlo[k] + P.plane_b[k] - P.pw;  // v reads input column sw*v + off
  const std::int64_t lo = std::min<std::int64_t>(Wr, off >= 0 ? 0 : (-off + sw - 1) / sw);  // valid: [lo, hi)
  const std::int64_t last = W - 1 - off;
  const std::int64_t hi = last < 0 ? lo : std::max<std::int64_t>(lo, std::min<std::int64_t>(Wr, last / sw + 1));
  for (std::int64_t r = 0; r < nrows; ++r) {
    float* d = dst + r * Wr;
    const std::int64_t ir = P.sh * (y0 + r) + a - P.ph;
    if (ir < 0 || ir >= P.H) {
      std::memset(d, 0, sizeof(float) * Wr);
      continue;
    }
    const float* s = src + ir * W;
    // Whole vectors, zeros outside [lo, hi): a row's last vector may spill into the next row (written after
    // it) or into the tail (zeroed below).
    if (sw == 1) {
      // Vectors wholly inside [lo, hi) take a plain load, only the row's edge vectors a masked one (with a
      // masked load per vector, packing was 6-9% of a 1-thread 64/56² call on Zen 3, AVX2).
      for (std::int64_t v = 0; v < Wr; v += VL) {
        if (v >= lo && v + VL <= hi) vstore(d + v, vload(s + v + off));
        else vstore(d + v, vload_range(s + v + off, static_cast<int>(lo - v), static_cast<int>(hi - v)));
      }
#if defined(SWP_HAVE_EVEN_RANGE)
    } else if (sw == 2) {
      for (std::int64_t v = 0; v < Wr; v += VL)
        vstore(d + v, vload_even_range(s + 2 * v + off, static_cast<int>(lo - v), static_cast<int>(hi - v)));
#endif
    } else {
      for (std::int64_t v = 0; v < lo; ++v) d[v] = 0.f;
      for (std::int64_t v = lo; v < hi; ++v) d[v] = s[sw * v + off];
      for (std::int64_t v = hi; v < Wr; ++v) d[v] = 0.f;
    }
  }
  std::memset(dst + nrows * Wr, 0, sizeof(float) * (lps - P.margin - nrows * Wr));
}

// d[0, len) = act(s[0, len) + bias (+ r[0, len)))
inline void store_row(float* __restrict d, const float* __restrict s, const float* __restrict r, float bias,
                      std::int64_t len, int relu) {
  const vec vb = vset1(bias);
  std::int64_t k = 0;
  for (; k + VL <= len; k += VL) {
    vec v = vadd(vload(s + k), vb);
    if (r) v = vadd(v, vload(r + k));
    if (relu) v = vmax0(v);
    vstore(d + k, v);
  }
  if (k < len) {
    const int n = static_cast<int>(len - k);
    vec v = vadd(vload_part(s + k, n), vb);
    if (r) v = vadd(v, vload_part(r + k, n));
    if (relu) v = vmax0(v);
    vstore_part(d + k, v, n);
  }
}

struct Call {
  const Plan* P;
  const float *xn, *bias, *rn;
  float* yn;
  int relu;
  std::uint64_t id;
};

// Every lane of the n vectors is loaded (their masks are full): a plain load will do.
inline bool all_lanes(const std::uint32_t* masks, int n) {
  constexpr std::uint32_t full = VL >= 32 ? ~0u : (1u << VL) - 1;
  for (int v = 0; v < n; ++v)
    if (masks[v] != full) return false;
  return true;
}

// One item: band r (output rows [y0, y1)) x filter group gi, on thread `slot`.
void run_item(void* ctx, int /*slot*/, std::int64_t item) {
  const Call& call = *static_cast<const Call*>(ctx);
  const Plan& P = *call.P;
  const std::int64_t r = item / P.G, gi = item % P.G;
  const std::int64_t f0 = P.grp_filt[gi], nfg = P.grp_filt[gi + 1] - f0;
  if (nfg == 0) return;
  const std::int64_t y0 = P.band_y[r], rows = P.band_y[r + 1] - y0;
  const std::int64_t nq = rows * P.Wrow, nv = (nq + VL - 1) / VL, ntiles = (nv + P.PV - 1) / P.PV;
  const bool in_place = P.in_place;
  // the input the taps read: the band's packed phase planes (lps floats per plane and channel) or the NCHW
  // input itself from the band's first input row (one plane, H*W floats per channel)
  const std::int64_t lps = in_place ? P.H * P.W : band_plane_stride(P, rows);
  const std::int64_t nplanes = static_cast<std::int64_t>(P.plane_a.size());
  ThreadState& st = thread_state();
  float* packed = in_place ? nullptr : st.input.get(static_cast<std::size_t>(nplanes * P.C * lps));
  float* buf = st.acc.get(static_cast<std::size_t>((nfg + 1) * ntiles * P.ts + VL));
  if ((!in_place && !packed) || !buf) std::abort();  // out of memory in a worker: nothing sensible to return
  if (!in_place && (st.call != call.id || st.band != r)) {  // pack this band's input rows into this thread's buffer
    for (std::int64_t k = 0; k < nplanes; ++k)
      for (std::int64_t c = 0; c < P.C; ++c)
        pack_plane(P, call.xn, packed + (k * P.C + c) * lps, k, c, y0, rows, lps);
    st.call = call.id;
    st.band = r;
  }
  const float* in = in_place ? call.xn + (y0 - P.ph) * P.W : packed;
  const std::int64_t rs = ntiles * P.ts;  // buffer row stride
  float* zero_row = buf + nfg * rs;
  const std::int32_t b0 = P.grp_blk[gi], b1 = P.grp_blk[gi + 1];
  std::int64_t base[64];
  const std::int64_t ntaps = P.Kh * P.Kw;
  for (std::int64_t t = 0; t < ntaps && t < 64; ++t)
    base[t] = in_place ? P.tap_off[t] : P.tap_plane[t] * P.C * lps + P.margin + P.tap_off[t];
  const std::uint32_t* band_masks = P.masks.data() + P.band_mask_off[r];
  const Table& T = table();
  const int CC = P.grp_cc[gi];
  // Loop order: the larger of (the group's packed weights, the band's input) per channel chunk is read
  // once, the smaller once per block or tile. Tiles outside: a tile's input stays in L1 across the blocks
  // while the chunk's weights stream from L2. Blocks outside (large weights, small bands: 14x14, 7x7): a
  // block's weights stay in L1 across the tiles, so every weight is read from memory once per item.
  const bool blocks_outer = P.grp_kept[gi] > ntiles * P.ts;
  for (std::int64_t c0 = 0; c0 < P.C; c0 += CC) {
    const int cc = static_cast<int>(std::min<std::int64_t>(CC, P.C - c0));
    const float* xc = in + c0 * lps;
    const unsigned first_chunk = c0 == 0 ? ~0u : 0u;
    auto tile = [&](std::int64_t m, std::int32_t b) {
      const std::int64_t v0 = m * P.PV;
      const int pv = static_cast<int>(std::min<std::int64_t>(P.PV, nv - v0));
      const int nf = P.blk_nf[b];
      const std::int64_t cls = P.tap_cls[P.blk_tap[b]];
      T.k[P.cls_full[cls] || all_lanes(band_masks + cls * nv + v0, pv) ? 0 : 1][pv - 1][nf - 1](
          xc + v0 * VL + base[P.blk_tap[b]], lps, P.wpack + P.blk_woff[b] + c0 * nf, cc, buf + m * P.ts,
          P.rows + P.blk_rows[b], static_cast<int>(rs), static_cast<unsigned>(P.blk_first[b]) & first_chunk,
          band_masks + cls * nv + v0);
    };
    if (blocks_outer) {
      for (std::int32_t b = b0; b < b1; ++b)
        for (std::int64_t m = 0; m < ntiles; ++m) tile(m, b);
    } else {
      for (std::int64_t m = 0; m < ntiles; ++m)
        for (std::int32_t b = b0; b < b1; ++b) tile(m, b);
    }
  }
  // Epilogue: buffer (band-local flat positions) -> NCHW output rows, + bias, + residual, ReLU.
  std::memset(zero_row, 0, sizeof(float) * rs);
  const std::int64_t plane_out = P.Ho * P.Wo;
  for (std::int64_t k = 0; k < nfg; ++k) {
    const std::int64_t o = P.filters[f0 + k];
    const float bo = call.bias ? call.bias[o] : 0.f;
    const float* src = P.alive[f0 + k] ? buf + k * rs : zero_row;
    float* dst = call.yn + o * plane_out + y0 * P.Wo;
    const float* res = call.rn ? call.rn + o * plane_out + y0 * P.Wo : nullptr;
    if (P.Wrow == P.Wo) {  // the band's output rows are one contiguous run in the buffer and the output
      store_row(dst, src, res, bo, rows * P.Wo, call.relu);
    } else {
      for (std::int64_t yy = 0; yy < rows; ++yy)
        store_row(dst + yy * P.Wo, src + yy * P.Wrow, res ? res + yy * P.Wo : nullptr, bo, P.Wo, call.relu);
    }
  }
}

}  // namespace

extern "C" {

int swp_vector_width() { return VL; }
#if defined(_OPENMP)
const char* swp_threading() { return "the process's OpenMP runtime (torch's libgomp when torch is loaded first)"; }
#else
const char* swp_threading() { return "built-in pool (std::thread; row bands x filter groups, per-thread input packing)"; }
#endif
const char* swp_isa() { return ISA; }
int swp_default_pv() { return DEF_PV; }
int swp_default_f() { return DEF_F; }
int swp_max_pv() { return MAX_PV; }
int swp_max_f() { return MAX_F; }
int swp_max_threads() { return MAX_THREADS; }

// Builds a plan for one input geometry, one packed weight and one partition (tables are borrowed, not
// copied: they must outlive the plan). Returns null and sets *error (negative) on bad arguments.
//   Block b: tap blk_tap[b] (i*Kw + j), blk_nf[b] filters, weights wpack[blk_woff[b] ...] as [C][nf],
//   the filters' rows in the group buffer rows[blk_rows[b] ...], bit f of blk_first[b] set when block b is
//   the first of its group to touch its filter f. Group g: blocks grp_blk[g] .. grp_blk[g+1], filters
//   filters[grp_filt[g] .. grp_filt[g+1]] (buffer row r = filters[start + r]); alive[k] = 0 for a filter no
//   block touches (its output is the bias). Bands: output rows band_y[r] .. band_y[r+1], r < R.
//   grp_cc: input channels per chunk for each group (<= 0: all).
void* swp_plan_create(std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t O, std::int64_t Kh,
                      std::int64_t Kw, std::int64_t sh, std::int64_t sw, std::int64_t ph, std::int64_t pw,
                      std::int64_t dh, std::int64_t dw, const float* wpack, const std::int64_t* blk_woff,
                      const std::int32_t* blk_tap, const std::int32_t* blk_nf, const std::int32_t* blk_rows,
                      const std::int32_t* blk_first, const std::int32_t* rows, const std::int32_t* grp_blk,
                      const std::int32_t* grp_filt, const std::int32_t* filters, const std::uint8_t* alive,
                      std::int64_t G, const std::int32_t* grp_cc, std::int64_t R, const std::int64_t* band_y, int PV,
                      int threads, int* error) {
  *error = 0;
  if (C < 1 || H < 1 || W < 1 || O < 1 || Kh < 1 || Kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 ||
      dw < 1 || Kh * Kw > 64) {
    *error = -1;
    return nullptr;
  }
  if (PV < 1 || PV > MAX_PV || G < 1 || R < 1 || threads < 1 || R * G > MAX_ITEMS) {
    *error = -2;
    return nullptr;
  }
  const std::int64_t Ho = (H + 2 * ph - dh * (Kh - 1) - 1) / sh + 1, Wo = (W + 2 * pw - dw * (Kw - 1) - 1) / sw + 1;
  if (H + 2 * ph - dh * (Kh - 1) - 1 < 0 || W + 2 * pw - dw * (Kw - 1) - 1 < 0 || Ho < 1 || Wo < 1) {
    *error = -3;
    return nullptr;
  }
  if (band_y[0] != 0 || band_y[R] != Ho) {
    *error = -4;
    return nullptr;
  }
  for (std::int64_t r = 0; r < R; ++r)
    if (band_y[r + 1] <= band_y[r]) {
      *error = -4;
      return nullptr;
    }
  for (std::int64_t b = 0; b < grp_blk[G]; ++b)
    if (blk_nf[b] < 1 || blk_nf[b] > MAX_F || blk_tap[b] < 0 || blk_tap[b] >= Kh * Kw) {
      *error = -5;
      return nullptr;
    }
  Plan* P = new (std::nothrow) Plan();
  if (!P) {
    *error = -6;
    return nullptr;
  }
  P->C = C, P->H = H, P->W = W, P->O = O, P->Kh = Kh, P->Kw = Kw, P->sh = sh, P->sw = sw, P->ph = ph, P->pw = pw;
  P->dh = dh, P->dw = dw, P->Ho = Ho, P->Wo = Wo;
  P->ext_h = (dh * (Kh - 1)) / sh;
  P->ext_w = (dw * (Kw - 1)) / sw;
  P->wpack = wpack, P->blk_woff = blk_woff, P->blk_tap = blk_tap, P->blk_nf = blk_nf, P->blk_rows = blk_rows;
  P->blk_first = blk_first, P->rows = rows, P->grp_blk = grp_blk, P->grp_filt = grp_filt, P->filters = filters;
  P->alive = alive, P->G = G, P->R = R;
  P->band_y.assign(band_y, band_y + R + 1);
  P->grp_cc.resize(G);
  for (std::int64_t g = 0; g < G; ++g)
    P->grp_cc[g] = static_cast<int>(grp_cc[g] < 1 || grp_cc[g] > C ? C : grp_cc[g]);
  P->grp_kept.assign(G, 0);
  for (std::int64_t g = 0; g < G; ++g)
    for (std::int32_t b = grp_blk[g]; b < grp_blk[g + 1]; ++b) P->grp_kept[g] += blk_nf[b];
  P->PV = PV, P->threads = std::min(threads, MAX_THREADS), P->ts = PV * VL;
  // the phase planes the taps read, in first-use order, and each plane's real input columns [vlo, vhi)
  std::vector<std::int64_t> plane_of(sh * sw, -1), plane_vhi;
  P->tap_plane.resize(Kh * Kw);
  for (std::int64_t i = 0; i < Kh; ++i)
    for (std::int64_t j = 0; j < Kw; ++j) {
      const std::int64_t a = (dh * i) % sh, b = (dw * j) % sw;
      if (plane_of[a * sw + b] < 0) {
        plane_of[a * sw + b] = static_cast<std::int64_t>(P->plane_a.size());
        P->plane_a.push_back(a);
        P->plane_b.push_back(b);
        const std::int64_t vlo = std::max<std::int64_t>(0, (pw - b + sw - 1) / sw);  // sw*v + b - pw >= 0
        const std::int64_t vhi = W - 1 + pw - b < 0 ? 0 : (W - 1 + pw - b) / sw + 1;  // sw*v + b - pw < W
        P->plane_vlo.push_back(vhi > vlo ? vlo : 0);
        plane_vhi.push_back(std::max(vhi, vlo));
      }
      P->tap_plane[i * Kw + j] = plane_of[a * sw + b];
    }
  // Dense rows when every plane's real columns fit in Wo (e.g. "same" padding); else padded rows.
  const char* padded = std::getenv("SWPFX_KERNEL_PADDED_ROWS");  // testing: force the padded layout
  P->dense = DENSE_ROWS && !(padded && padded[0] && padded[0] != '0');
  for (std::size_t k = 0; k < P->plane_a.size(); ++k)
    if (plane_vhi[k] - P->plane_vlo[k] > Wo) P->dense = false;
  if (!P->dense) std::fill(P->plane_vlo.begin(), P->plane_vlo.end(), 0);
  P->Wrow = P->dense ? Wo : Wo + P->ext_w;
  std::int64_t max_vlo = 0;
  for (std::int64_t v : P->plane_vlo) max_vlo = std::max(max_vlo, v);
  P->margin = (max_vlo + 15) / 16 * 16;
  // In place: with one phase plane whose dense rows are the input's own (stride 1, "same" padding: packed
  // column v is input column v), the taps can read the NCHW input itself instead of a packed copy of each
  // band: the same floats at the same offsets, so the same result, bit for bit, and no packing pass. Taps
  // reading the padding (rows above or below the input, columns left or right) have those lanes masked; a
  // masked lane is never loaded, so it may lie outside the input. Tiles load without masks only when all
  // their lanes are valid (all_lanes), so no load reaches past the input.
  const char* pack_all = std::getenv("SWPFX_KERNEL_PACK_ALL");  // testing and A/B: pack every band
  // (stride 1 leaves one plane, phase (0, 0), whose dense rows start at input column 0: plane_vlo = pw)
  P->in_place = P->dense && sh == 1 && sw == 1 && Wo == W && !(pack_all && pack_all[0] && pack_all[0] != '0');
  // taps: offset in the packed plane and lane class (dense rows: packed column x + shift, valid in [0, n))
  P->tap_off.resize(Kh * Kw);
  P->tap_cls.resize(Kh * Kw);
  for (std::int64_t i = 0; i < Kh; ++i)
    for (std::int64_t j = 0; j < Kw; ++j) {
      const std::int64_t t = i * Kw + j, k = P->tap_plane[t];
      const std::int64_t shift = (dw * j) / sw - P->plane_vlo[k];
      const std::int64_t n = P->dense ? plane_vhi[k] - P->plane_vlo[k] : P->Wrow;
      const std::int64_t row = P->in_place ? dh * i - ph : 0;  // in place: the tap's input row - the output row
      P->tap_off[t] = ((dh * i) / sh) * P->Wrow + shift;
      std::int64_t cls = 0;
      while (cls < static_cast<std::int64_t>(P->cls_shift.size()) &&
             (P->cls_shift[cls] != shift || P->cls_n[cls] != n || P->cls_row[cls] != row))
        ++cls;
      if (cls == static_cast<std::int64_t>(P->cls_shift.size())) {
        P->cls_shift.push_back(shift);
        P->cls_n.push_back(n);
        P->cls_row.push_back(row);
        // padded rows store the zeros; in place, all_lanes decides per tile
        P->cls_full.push_back(!P->in_place && (!P->dense || (shift == 0 && n == P->Wrow)));
      }
      P->tap_cls[t] = cls;
    }
  // lane masks per band, class and vector (lanes past the band's end are not loaded)
  const std::int64_t ncls = static_cast<std::int64_t>(P->cls_shift.size());
  for (std::int64_t r = 0; r < R; ++r) {
    const std::int64_t nq = (band_y[r + 1] - band_y[r]) * P->Wrow, nv = (nq + VL - 1) / VL;
    P->band_mask_off.push_back(static_cast<std::int64_t>(P->masks.size()));
    for (std::int64_t cls = 0; cls < ncls; ++cls)
      for (std::int64_t v = 0; v < nv; ++v) {
        std::uint32_t bits = 0;
        for (int l = 0; l < VL; ++l) {
          const std::int64_t q = v * VL + l, col = q % P->Wrow + P->cls_shift[cls];
          const std::int64_t row = band_y[r] + q / P->Wrow + P->cls_row[cls];
          if (q < nq && col >= 0 && col < P->cls_n[cls] && (!P->in_place || (row >= 0 && row < H))) bits |= 1u << l;
        }
        P->masks.push_back(bits);
      }
  }
  return P;
}

// Wake the pool's sleeping workers ahead of a call with `threads` threads (optional; saves their wake-up
// latency when the caller has other work to do first).
void swp_pool_wake(int threads) { Pool::instance().wake(threads); }

// 1 when the plan packs dense rows (Wo floats per row, edge taps masked), 0 for padded rows.
int swp_plan_dense(void* plan) { return static_cast<Plan*>(plan)->dense ? 1 : 0; }

// 1 when the plan's taps read the input in place (nothing packed), 0 when it packs each band's input rows.
int swp_plan_in_place(void* plan) { return static_cast<Plan*>(plan)->in_place ? 1 : 0; }

void swp_plan_destroy(void* plan) { delete static_cast<Plan*>(plan); }

// y (N, O, Ho, Wo) = conv(x (N, C, H, W)) + bias (O or null) + residual (N, O, Ho, Wo or null), ReLU if relu.
// Re-entrant: a plan holds no per-call state (each thread packs its input into its own buffer).
int swp_plan_run(void* plan, const float* x, std::int64_t N, float* y, const float* bias, const float* residual,
                 int relu) {
  const Plan* P = static_cast<const Plan*>(plan);
  if (!P || N < 1) return -1;
  const std::int64_t plane_out = P->Ho * P->Wo;
  Pool& pool = Pool::instance();
  for (std::int64_t n = 0; n < N; ++n) {
    Call call{P, x + n * P->C * P->H * P->W, bias, residual ? residual + n * P->O * plane_out : nullptr,
              y + n * P->O * plane_out, relu, g_call_ids.fetch_add(1, std::memory_order_relaxed) + 1};
    pool.run(P->R * P->G, P->threads, &run_item, &call);
  }
  return 0;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------- max pool
// y (P, Ho, Wo) = max over each window of x (P, H, W), P = N * C planes, windows clipped to the input (implicit
// -inf padding), NaN propagating like PyTorch's. PyTorch's own NCHW float max pool is slow on the CPU, and
// oneDNN's needs two layout copies per call; this reads the input once, one plane per work item.
struct MaxPoolCall {
  const float* x;
  float* y;
  std::int64_t H, W, Ho, Wo, kh, kw, sh, sw, ph, pw;
  std::int64_t planes, per_item;  // planes per work item: small planes in groups (a work item costs ~1 us)
};

static inline float nan_max(float m, float v) { return (v > m || v != v) ? v : m; }

// Max over the kh rows of one output row's windows (`rows`; a row outside the input is replaced by one inside:
// max(a, a) = a), column by column into t[0, W): contiguous, so the compiler vectorises it (compare + blend).
template <int K>
static void max_rows_fixed(const float* const* rows, float* __restrict t, std::int64_t W) {
  for (std::int64_t x = 0; x < W; ++x) {
    float m = rows[0][x];
    for (int i = 1; i < K; ++i) m = nan_max(m, rows[i][x]);
    t[x] = m;
  }
}

static void max_rows_any(const float* const* rows, float* __restrict t, std::int64_t W, std::int64_t kh) {
  std::memcpy(t, rows[0], sizeof(float) * W);
  for (std::int64_t i = 1; i < kh; ++i)
    for (std::int64_t x = 0; x < W; ++x) t[x] = nan_max(t[x], rows[i][x]);
}

// yr[ox] = max of t[ox * S .. ox * S + K) (t holds the column maxima with the padding as -inf in front).
template <int K, int S>
static void max_cols_fixed(const float* __restrict t, float* __restrict yr, std::int64_t Wo) {
  for (std::int64_t ox = 0; ox < Wo; ++ox) {
    float m = t[ox * S];
    for (int j = 1; j < K; ++j) m = nan_max(m, t[ox * S + j]);
    yr[ox] = m;
  }
}

static void max_cols_any(const float* t, float* yr, std::int64_t Wo, std::int64_t kw, std::int64_t sw) {
  for (std::int64_t ox = 0; ox < Wo; ++ox) {
    float m = t[ox * sw];
    for (std::int64_t j = 1; j < kw; ++j) m = nan_max(m, t[ox * sw + j]);
    yr[ox] = m;
  }
}

// One plane, separably: per output row the max down its windows' rows, then across each window's columns.
// `t` holds pw + W + right columns: -inf in the padding (a max is unchanged by it; every window holds an input).
static void max_pool_plane(const MaxPoolCall& a, std::int64_t p, float* t) {
  const float* xp = a.x + p * a.H * a.W;
  float* yp = a.y + p * a.Ho * a.Wo;
  const std::int64_t right = std::max<std::int64_t>(0, (a.Wo - 1) * a.sw + a.kw - a.pw - a.W);
  const float ninf = -std::numeric_limits<float>::infinity();
  std::fill(t, t + a.pw, ninf);
  std::fill(t + a.pw + a.W, t + a.pw + a.W + right, ninf);
  const float* rows[64];
  for (std::int64_t oy = 0; oy < a.Ho; ++oy) {
    const std::int64_t y0 = oy * a.sh - a.ph;
    const std::int64_t first = std::max<std::int64_t>(0, y0), last = std::min(a.H, y0 + a.kh) - 1;
    for (std::int64_t i = 0; i < a.kh; ++i) rows[i] = xp + std::min(std::max(y0 + i, first), last) * a.W;
    if (a.kh == 2) max_rows_fixed<2>(rows, t + a.pw, a.W);
    else if (a.kh == 3) max_rows_fixed<3>(rows, t + a.pw, a.W);
    else max_rows_any(rows, t + a.pw, a.W, a.kh);
    float* yr = yp + oy * a.Wo;
    if (a.kw == 2 && a.sw == 2) max_cols_fixed<2, 2>(t, yr, a.Wo);
    else if (a.kw == 3 && a.sw == 2) max_cols_fixed<3, 2>(t, yr, a.Wo);
    else if (a.kw == 3 && a.sw == 1) max_cols_fixed<3, 1>(t, yr, a.Wo);
    else max_cols_any(t, yr, a.Wo, a.kw, a.sw);
  }
}

static void max_pool_item(void* ctx, int, std::int64_t item) {
  const MaxPoolCall& a = *static_cast<const MaxPoolCall*>(ctx);
  const std::int64_t end = std::min(a.planes, (item + 1) * a.per_item);
  float* t = thread_state().acc.get(static_cast<std::size_t>(a.pw + a.W + a.kw + a.sw * a.Wo));
  if (!t) {  // out of memory for one row of floats: NaN, never stale memory
    std::fill(a.y + item * a.per_item * a.Ho * a.Wo, a.y + end * a.Ho * a.Wo, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  for (std::int64_t p = item * a.per_item; p < end; ++p) max_pool_plane(a, p, t);
}

extern "C" int swp_max_pool2d(const float* x, float* y, std::int64_t planes, std::int64_t H, std::int64_t W, std::int64_t Ho,
                   std::int64_t Wo, std::int64_t kh, std::int64_t kw, std::int64_t sh, std::int64_t sw,
                   std::int64_t ph, std::int64_t pw, int threads) {
  if (!x || !y || planes < 1 || kh < 1 || kh > 64 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0) return -1;
  // about 8 items per thread, each at least ~16K input floats when the planes are small
  const std::int64_t by_count = (planes + 8 * std::max(1, threads) - 1) / (8 * std::max(1, threads));
  const std::int64_t by_size = (16384 + H * W - 1) / std::max<std::int64_t>(1, H * W);
  const std::int64_t per_item = std::max<std::int64_t>(1, std::min(by_count, by_size));
  MaxPoolCall call{x, y, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, planes, per_item};
  Pool::instance().run((planes + per_item - 1) / per_item, threads, &max_pool_item, &call);
  return 0;
}

