// Fused stripe-sparse direct convolution for CPUs (swpfx, DESIGN.md §4b, issue 14).
//
// A stripe-pruned conv is a sum over kernel taps (i, j) of 1x1 convs on shifted inputs, each over
// only the filters that keep that tap:
//     y[o, q] = bias[o] + sum_{t=(i,j) kept by o} sum_c W[o, c, i, j] * xpad[c, q + shift(t)]
// This kernel computes it in one pass without materialising shifted inputs or stripe maps.
//
// Layout. The input is copied once into s*s "phase planes" (s = stride; one plane for stride 1):
// phase (a, b) holds xpad[c, s*u + a, s*v + b] for a grid of Hq x Wq positions, with the zero padding
// written in. Output pixels are enumerated on the flattened phase grid, q = y*Wq + x (x < Wo valid,
// the few columns x >= Wo are computed and discarded). Then every tap is one fixed pointer offset:
// phase (i%s, j%s), offset (i/s)*Wq + j/s, and a run of consecutive q is a run of consecutive floats
// for every tap, across row ends. SIMD vectors run over that flattened pixel axis, so small feature
// maps (7x7: 63 flat positions = 4 vectors of 16) waste few lanes.
//
// Work. Filters are split into G groups (balanced by kept stripes) and the flat pixel axis into
// micro-tiles of PV vectors; an item is (group, M consecutive micro-tiles), and items are shared out
// by a small thread pool (below). The outputs of an item live in a per-thread buffer (L1/L2). For
// each chunk of input channels, micro-tile and tap, the filters of the group keeping that tap are
// processed in blocks of <= F filters by a register-blocked micro-kernel: F x PV accumulators, per
// channel PV vector loads of the shifted input and F broadcast weights (weights packed per block as
// [C][F]), then one add (for a filter's first block: a store) of the accumulators into the buffer.
// The copy of the buffer to the NCHW output fuses bias, an optional residual and ReLU.
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
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <unistd.h>
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
constexpr const char* ISA = "generic";
constexpr int MAX_PV = 4, MAX_F = 8, DEF_PV = 2, DEF_F = 4;
#endif

// buf[rows[f]*ts + 0 .. PV*VL) (+)= sum_c w[c*F + f] * x[c*xs + 0 .. PV*VL)   for f < F
// (stored instead of added for the filters f whose bit is set in `first`: no zeroing pass needed)
template <int F, int PV>
void micro(const float* __restrict x, std::int64_t xs, const float* __restrict w, int cc,
           float* __restrict buf, const std::int32_t* __restrict rows, int ts, unsigned first) {
  vec acc[F][PV];
#pragma GCC unroll 16
  for (int f = 0; f < F; ++f)
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p) acc[f][p] = vzero();
  for (int c = 0; c < cc; ++c) {
    vec xv[PV];
#pragma GCC unroll 4
    for (int p = 0; p < PV; ++p) xv[p] = vload(x + p * VL);
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

using kern_t = void (*)(const float*, std::int64_t, const float*, int, float*, const std::int32_t*, int, unsigned);

template <int PV, std::size_t... I>
void fill_row(kern_t* row, std::index_sequence<I...>) {
  ((row[I] = &micro<static_cast<int>(I) + 1, PV>), ...);
}
template <std::size_t... P>
void fill_table(kern_t (*table)[MAX_F], std::index_sequence<P...>) {
  (fill_row<static_cast<int>(P) + 1>(table[P], std::make_index_sequence<MAX_F>{}), ...);
}
struct Table {
  kern_t k[MAX_PV][MAX_F];
  Table() { fill_table(k, std::make_index_sequence<MAX_PV>{}); }
};
const Table& table() {
  static const Table t;
  return t;
}

// A per-thread scratch buffer that persists across calls (the pool's threads live on).
float* scratch(std::size_t n) {
  struct Buf {
    float* p = nullptr;
    std::size_t n = 0;
    ~Buf() { std::free(p); }
  };
  static thread_local Buf b;
  if (b.n < n) {
    std::free(b.p);
    std::size_t bytes = ((n * sizeof(float) + 63) / 64) * 64;
    b.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    b.n = b.p ? n : 0;
  }
  return b.p;
}


// ---------------------------------------------------------------------------------------------
// A small work-sharing thread pool. The calling thread takes part; items are claimed from one atomic
// counter, so a worker that the OS has not scheduled yet (a loaded machine) delays nothing: the
// caller waits only for items already claimed. Idle workers spin briefly, then sleep on a condition
// variable (they never keep spinning between calls, so they do not steal the cores from others).
// (libgomp was tried first: with its default wait policy, shared with torch's OpenMP runtime and not
// configurable once torch has loaded it, a 2-thread region on a busy 2-core machine took 20-40 ms
// instead of 0.7 ms.)
class Pool {
 public:
  static Pool& instance() {
    static Pool* pool = new Pool();  // never destroyed: workers may outlive static destructors
    if (pool->pid_ != getpid()) pool = new Pool();  // after fork(): the old workers do not exist here
    return *pool;
  }

  // Run fn(i) for i in [0, n) on up to `threads` threads (the caller included).
  void run(std::int64_t n, int threads, const std::function<void(std::int64_t)>& fn) {
    if (n <= 0) return;
    threads = static_cast<int>(std::min<std::int64_t>(threads, n));
    std::unique_lock<std::mutex> busy(run_mutex_, std::try_to_lock);
    if (threads <= 1 || !busy.owns_lock()) {  // single thread, or the pool serves another caller
      for (std::int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    ensure_workers(threads - 1);
    fn_.store(&fn, std::memory_order_relaxed);
    n_.store(n, std::memory_order_relaxed);
    active_workers_.store(threads - 1, std::memory_order_relaxed);
    remaining_.store(n, std::memory_order_relaxed);
    const std::uint64_t e = (epoch_of(next_.load(std::memory_order_relaxed)) + 1) & 0xffffffffu;
    {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      next_.store(e << 32, std::memory_order_release);
    }
    sleep_cv_.notify_all();
    work(e);
    const auto start = Clock::now();
    for (std::int64_t spins = 0; remaining_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 64 || Clock::now() - start < std::chrono::microseconds(200)) SWP_PAUSE();
      else std::this_thread::yield();  // a worker holding an item was descheduled
    }
  }

 private:
  using Clock = std::chrono::steady_clock;
  Pool() : pid_(getpid()) {}
  static std::uint64_t epoch_of(std::uint64_t v) { return v >> 32; }

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int id = static_cast<int>(workers_.size());
      workers_.emplace_back([this, id] { loop(id); });
      workers_.back().detach();
    }
  }

  // Claim and run items of epoch e until none are left.
  void work(std::uint64_t e) {
    for (;;) {
      std::uint64_t v = next_.load(std::memory_order_acquire);
      if (epoch_of(v) != e) return;
      const std::int64_t n = n_.load(std::memory_order_relaxed);
      const std::function<void(std::int64_t)>* fn = fn_.load(std::memory_order_relaxed);
      if (static_cast<std::int64_t>(v & 0xffffffffu) >= n) return;
      if (!next_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      // Claimed with epoch e still current, so fn and n belong to epoch e until this item is done.
      (*fn)(static_cast<std::int64_t>(v & 0xffffffffu));
      remaining_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void loop(int id) {
    std::uint64_t seen = epoch_of(next_.load(std::memory_order_acquire));
    for (;;) {
      std::uint64_t e = seen;
      const auto start = Clock::now();  // spin ~30 us for the next call, then sleep
      for (int spins = 0; e == seen; ++spins) {
        SWP_PAUSE();
        e = epoch_of(next_.load(std::memory_order_acquire));
        if ((spins & 15) == 15 && Clock::now() - start > std::chrono::microseconds(30)) break;
      }
      if (e == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleep_cv_.wait(lock, [&] { return epoch_of(next_.load(std::memory_order_acquire)) != seen; });
        e = epoch_of(next_.load(std::memory_order_acquire));
      }
      seen = e;
      if (id < active_workers_.load(std::memory_order_relaxed)) work(e);
    }
  }

  const pid_t pid_;
  std::mutex run_mutex_;
  std::vector<std::thread> workers_;
  std::mutex sleep_mutex_;
  std::condition_variable sleep_cv_;
  std::atomic<std::uint64_t> next_{0};  // epoch << 32 | next item index
  std::atomic<std::int64_t> remaining_{0};
  std::atomic<const std::function<void(std::int64_t)>*> fn_{nullptr};
  std::atomic<std::int64_t> n_{0};
  std::atomic<int> active_workers_{0};
};

struct Geometry {
  std::int64_t Ho, Wo, Hq, Wq, Q, NV, pstride, nph;
};

Geometry geometry(std::int64_t H, std::int64_t W, std::int64_t Kh, std::int64_t Kw, std::int64_t sh,
                  std::int64_t sw, std::int64_t ph, std::int64_t pw) {
  Geometry g;
  g.Ho = (H + 2 * ph - Kh) / sh + 1;
  g.Wo = (W + 2 * pw - Kw) / sw + 1;
  g.Hq = g.Ho + (Kh - 1) / sh;
  g.Wq = g.Wo + (Kw - 1) / sw;
  g.Q = g.Ho * g.Wq;
  g.NV = (g.Q + VL - 1) / VL;
  const std::int64_t off_max = ((Kh - 1) / sh) * g.Wq + (Kw - 1) / sw;
  g.pstride = ((g.NV * VL + off_max + 15) / 16) * 16;
  g.nph = sh * sw;
  return g;
}

// Phase plane pc = phase * C + c of the zero-padded input: [u][v] = x[c, sh*u + a - ph, sw*v + b - pw].
void fill_plane(const float* xn, float* work, std::int64_t pc, std::int64_t C, std::int64_t H, std::int64_t W,
                std::int64_t sh, std::int64_t sw, std::int64_t ph, std::int64_t pw, const Geometry& g) {
  const std::int64_t phase = pc / C, c = pc % C, a = phase / sw, b = phase % sw;
  float* dst = work + pc * g.pstride;
  const float* src = xn + c * H * W;
  for (std::int64_t u = 0; u < g.Hq; ++u) {
    float* d = dst + u * g.Wq;
    const std::int64_t ir = sh * u + a - ph;
    if (ir < 0 || ir >= H) {
      std::memset(d, 0, sizeof(float) * g.Wq);
      continue;
    }
    const float* s = src + ir * W;
    if (sw == 1) {  // v in [0, Wq) reads input column v + b - pw
      const std::int64_t lo = std::min<std::int64_t>(g.Wq, std::max<std::int64_t>(0, pw - b));
      const std::int64_t hi = std::max<std::int64_t>(lo, std::min<std::int64_t>(g.Wq, W + pw - b));
      for (std::int64_t v = 0; v < lo; ++v) d[v] = 0.f;
      if (hi > lo) std::memcpy(d + lo, s + lo + b - pw, sizeof(float) * (hi - lo));
      for (std::int64_t v = hi; v < g.Wq; ++v) d[v] = 0.f;
    } else {  // v reads input column sw*v + b - pw; valid for v in [lo, hi)
      const std::int64_t off = b - pw;
      const std::int64_t lo = std::min<std::int64_t>(g.Wq, off >= 0 ? 0 : (-off + sw - 1) / sw);
      const std::int64_t last = W - 1 - off;  // v*sw <= last
      const std::int64_t hi = last < 0 ? lo : std::max<std::int64_t>(lo, std::min<std::int64_t>(g.Wq, last / sw + 1));
      for (std::int64_t v = 0; v < lo; ++v) d[v] = 0.f;
      const float* so = s + off;
      if (sw == 2)
        for (std::int64_t v = lo; v < hi; ++v) d[v] = so[2 * v];
      else
        for (std::int64_t v = lo; v < hi; ++v) d[v] = so[sw * v];
      for (std::int64_t v = hi; v < g.Wq; ++v) d[v] = 0.f;
    }
  }
  std::memset(dst + g.Hq * g.Wq, 0, sizeof(float) * (g.pstride - g.Hq * g.Wq));
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

struct Plan {
  std::int64_t C, H, W, O, Kh, Kw, sh, sw, ph, pw;
  Geometry g;
  const float* wpack;
  const std::int64_t* blk_woff;
  const std::int32_t *blk_tap, *blk_nf, *blk_rows, *blk_first, *rows, *grp_blk, *grp_filt, *filters;
  const std::uint8_t* alive;  // per filter (in group order): touched by some block
  std::int64_t G;
  int PV, CC, M, threads;
  int ts;                  // floats per micro-tile (PV vectors)
  std::int64_t ntiles;     // micro-tiles over the flat pixel axis
  std::int64_t gitems;     // items per group (M micro-tiles each)
  std::int64_t max_group;  // filters in the largest group
  std::int64_t per_fill, nfill;
  std::vector<std::int64_t> tap_base;
  float* work;
};

// One item: filter group gi, micro-tiles [m0, m1).
void run_item(const Plan& P, const float* work, std::int64_t gi, std::int64_t m0, std::int64_t m1, const float* bias,
              const float* rn, int relu, float* yn) {
  const Geometry& g = P.g;
  const std::int64_t f0 = P.grp_filt[gi], nfg = P.grp_filt[gi + 1] - f0;
  if (nfg == 0) return;
  const std::int64_t rs = (m1 - m0) * P.ts;  // buffer row stride
  // rows of the group's filters (each written first by a storing block), then one zero row for dead filters
  float* buf = scratch(static_cast<std::size_t>((nfg + 1) * rs + VL));
  float* zero_row = buf + nfg * rs;
  std::memset(zero_row, 0, sizeof(float) * rs);
  const std::int32_t b0 = P.grp_blk[gi], b1 = P.grp_blk[gi + 1];
  const Table& T = table();
  for (std::int64_t c0 = 0; c0 < P.C; c0 += P.CC) {
    const int cc = static_cast<int>(std::min<std::int64_t>(P.CC, P.C - c0));
    for (std::int64_t m = m0; m < m1; ++m) {
      const std::int64_t v0 = m * P.PV;
      const int pv = static_cast<int>(std::min<std::int64_t>(P.PV, g.NV - v0));
      const float* xc = work + c0 * g.pstride + v0 * VL;
      float* bm = buf + (m - m0) * P.ts;
      const kern_t* krow = T.k[pv - 1];
      for (std::int32_t b = b0; b < b1; ++b) {
        const int nf = P.blk_nf[b];
        krow[nf - 1](xc + P.tap_base[P.blk_tap[b]], g.pstride, P.wpack + P.blk_woff[b] + c0 * nf, cc, bm,
                     P.rows + P.blk_rows[b], static_cast<int>(rs), c0 == 0 ? P.blk_first[b] : 0u);
      }
    }
  }
  // Epilogue: buffer (flat positions q0 ..) -> NCHW output rows, + bias, + residual, ReLU.
  const std::int64_t q0 = m0 * P.ts, q_end = std::min<std::int64_t>(m1 * P.ts, g.Q);
  const std::int64_t plane_out = g.Ho * g.Wo;
  for (std::int64_t r = 0; r < nfg; ++r) {
    const std::int64_t o = P.filters[f0 + r];
    const float bo = bias ? bias[o] : 0.f;
    const float* src = P.alive[f0 + r] ? buf + r * rs : zero_row;
    float* dst = yn + o * plane_out;
    const float* res = rn ? rn + o * plane_out : nullptr;
    for (std::int64_t yy = q0 / g.Wq; yy * g.Wq < q_end; ++yy) {
      const std::int64_t xa = std::max<std::int64_t>(0, q0 - yy * g.Wq);
      const std::int64_t xb = std::min<std::int64_t>(g.Wo, q_end - yy * g.Wq);
      if (xb > xa)
        store_row(dst + yy * g.Wo + xa, src + (yy * g.Wq + xa - q0), res ? res + yy * g.Wo + xa : nullptr, bo,
                  xb - xa, relu);
    }
  }
}

}  // namespace

extern "C" {

int swp_vector_width() { return VL; }
const char* swp_isa() { return ISA; }
int swp_default_pv() { return DEF_PV; }
int swp_default_f() { return DEF_F; }
int swp_max_pv() { return MAX_PV; }
int swp_max_f() { return MAX_F; }

// Builds a plan for one input geometry and one packed weight (tables are borrowed, not copied: they
// must outlive the plan). Returns null and sets *error (negative) on bad arguments.
//   Block b: tap blk_tap[b] (i*Kw + j), blk_nf[b] filters, weights wpack[blk_woff[b] ...] as [C][nf],
//   the filters' rows in the group buffer rows[blk_rows[b] ...], bit f of blk_first[b] set when block b is
//   the first of its group to touch its filter f. Group g: blocks grp_blk[g] ..
//   grp_blk[g+1], filters filters[grp_filt[g] .. grp_filt[g+1]] (buffer row r = filters[start + r]);
//   alive[k] = 0 for a filter no block touches (its output is the bias).
void* swp_plan_create(std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t O, std::int64_t Kh,
                      std::int64_t Kw, std::int64_t sh, std::int64_t sw, std::int64_t ph, std::int64_t pw,
                      const float* wpack, const std::int64_t* blk_woff, const std::int32_t* blk_tap,
                      const std::int32_t* blk_nf, const std::int32_t* blk_rows, const std::int32_t* blk_first,
                      const std::int32_t* rows, const std::int32_t* grp_blk, const std::int32_t* grp_filt,
                      const std::int32_t* filters, const std::uint8_t* alive, std::int64_t G, int PV, int CC, int M,
                      int threads, int* error) {
  *error = 0;
  if (C < 1 || H < 1 || W < 1 || O < 1 || Kh < 1 || Kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0) {
    *error = -1;
    return nullptr;
  }
  if (PV < 1 || PV > MAX_PV || G < 1 || threads < 1 || M < 1) {
    *error = -2;
    return nullptr;
  }
  const Geometry g = geometry(H, W, Kh, Kw, sh, sw, ph, pw);
  if (g.Ho < 1 || g.Wo < 1) {
    *error = -3;
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
  *P = Plan{C, H, W, O, Kh, Kw, sh, sw, ph, pw, g, wpack, blk_woff, blk_tap, blk_nf, blk_rows, blk_first, rows,
            grp_blk, grp_filt, filters, alive, G, PV, CC < 1 ? static_cast<int>(C) : CC, M, std::min(threads, 256), 0, 0, 0,
            0, 0, 0, {}, nullptr};
  P->ts = PV * VL;
  P->ntiles = (g.NV + PV - 1) / PV;
  P->gitems = (P->ntiles + M - 1) / M;
  for (std::int64_t k = 0; k < G; ++k) P->max_group = std::max<std::int64_t>(P->max_group, grp_filt[k + 1] - grp_filt[k]);
  const std::int64_t planes = g.nph * C;
  P->per_fill = std::max<std::int64_t>(1, planes / (4 * P->threads));
  P->nfill = (planes + P->per_fill - 1) / P->per_fill;
  P->tap_base.resize(Kh * Kw);
  for (std::int64_t i = 0; i < Kh; ++i)
    for (std::int64_t j = 0; j < Kw; ++j)
      P->tap_base[i * Kw + j] = ((i % sh) * sw + (j % sw)) * C * g.pstride + (i / sh) * g.Wq + (j / sw);
  const std::size_t bytes = ((sizeof(float) * planes * g.pstride + 63) / 64) * 64;
  P->work = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!P->work) {
    delete P;
    *error = -6;
    return nullptr;
  }
  std::memset(P->work, 0, bytes);
  return P;
}

void swp_plan_destroy(void* plan) {
  Plan* P = static_cast<Plan*>(plan);
  if (!P) return;
  std::free(P->work);
  delete P;
}

// y (N, O, Ho, Wo) = conv(x (N, C, H, W)) + bias (O or null) + residual (N, O, Ho, Wo or null), ReLU if relu.
// A plan is not re-entrant (it owns the padded-input workspace): one call at a time per plan.
int swp_plan_run(void* plan, const float* x, std::int64_t N, float* y, const float* bias, const float* residual,
                 int relu) {
  Plan* P = static_cast<Plan*>(plan);
  if (!P || N < 1) return -1;
  const Geometry& g = P->g;
  const std::int64_t plane_out = g.Ho * g.Wo;
  Pool& pool = Pool::instance();
  const std::int64_t planes = g.nph * P->C;
  const std::int64_t nitems = P->G * P->gitems;
  for (std::int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * P->C * P->H * P->W;
    float* yn = y + n * P->O * plane_out;
    const float* rn = residual ? residual + n * P->O * plane_out : nullptr;
    std::atomic<std::int64_t> filled{0};
    // One job: first the padded-input chunks, then the conv items (which wait for all the chunks; items
    // are claimed in order, so by then every chunk is claimed and in progress or done).
    pool.run(P->nfill + nitems, P->threads, [&](std::int64_t i) {
      if (i < P->nfill) {
        for (std::int64_t pc = i * P->per_fill; pc < std::min(planes, (i + 1) * P->per_fill); ++pc)
          fill_plane(xn, P->work, pc, P->C, P->H, P->W, P->sh, P->sw, P->ph, P->pw, g);
        filled.fetch_add(1, std::memory_order_acq_rel);
        return;
      }
      for (int spins = 0; filled.load(std::memory_order_acquire) != P->nfill; ++spins) {
        if (spins < 20000) SWP_PAUSE();
        else std::this_thread::yield();
      }
      const std::int64_t item = i - P->nfill, gi = item / P->gitems, m0 = (item % P->gitems) * P->M;
      run_item(*P, P->work, gi, m0, std::min<std::int64_t>(m0 + P->M, P->ntiles), bias, rn, relu, yn);
    });
  }
  return 0;
}

}  // extern "C"
