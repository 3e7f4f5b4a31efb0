// Fused window attention on the CPU: forward and backward, one (window, head) tile per task, OpenMP over tiles
// (dynamic schedule: robust to a busy core; fewer threads for small calls). A tile's N x N scores live in a
// per-thread scratch buffer, never in a (B_, H, N, N) tensor; the backward recomputes them from q, k and the
// saved log-sum-exp, and takes rowsum(dO * O) as rowsum(P * dP), so it does not read the output.
// The tile loops (window_attention_cpu_tiles.h) are compiled twice: for the build's flags (AVX2) and for AVX-512,
// and run with the instruction set cpu_isa() chose (cpu_isa.h). This file holds what both share: checks, the
// bias and mask rows, the task queue, the parallel regions and the bias-table gradient.
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__AVX__)
#pragma GCC diagnostic push   // GCC 12 warns about the AVX-512 headers' own _mm512_undefined_* placeholders
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <utility>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_isa.h"
#include "cpu_math.h"
#include "ops.h"

// Built without -mavx2 (ESVIT_NO_AVX2=1), GCC notes that 32-byte vector arguments change the ABI; the tile code
// passes vectors only between always-inline functions, so no call depends on it.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace esvit {

WindowShape check_window_attention(const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& rel_index,
                                   const at::Tensor& region, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 3, "window_attention: qkv must be (B_, N, 3*H*D), got ", qkv.sizes());
  TORCH_CHECK(num_heads > 0 && qkv.size(2) % (3 * num_heads) == 0, "window_attention: last dim ", qkv.size(2),
              " is not 3 * num_heads(", num_heads, ") * head_dim");
  WindowShape s{qkv.size(0), qkv.size(1), num_heads, qkv.size(2) / (3 * num_heads), 1, table.size(0)};
  TORCH_CHECK(table.dim() == 2 && table.size(1) == num_heads, "window_attention: table must be (T, ", num_heads,
              "), got ", table.sizes());
  TORCH_CHECK(rel_index.dim() == 2 && rel_index.size(0) == s.N && rel_index.size(1) == s.N &&
                  rel_index.scalar_type() == at::kLong,
              "window_attention: rel_index must be int64 (N, N) with N=", s.N);
  if (region.numel() > 0) {
    TORCH_CHECK(region.dim() == 2 && region.size(1) == s.N && region.scalar_type() == at::kInt,
                "window_attention: region must be int32 (nW, N), got ", region.sizes(), " ", region.scalar_type());
    s.nW = region.size(0);
    TORCH_CHECK(s.B % s.nW == 0, "window_attention: B_=", s.B, " is not a multiple of nW=", s.nW);
  }
  TORCH_CHECK(table.scalar_type() == qkv.scalar_type(), "window_attention: table dtype ", table.scalar_type(),
              " differs from qkv dtype ", qkv.scalar_type());
  TORCH_CHECK(table.device() == qkv.device() && rel_index.device() == qkv.device() &&
                  (region.numel() == 0 || region.device() == qkv.device()),
              "window_attention: all tensors must be on ", qkv.device());
  return s;
}

namespace {

// The CPU kernels index the table with rel_index (contiguous int64) without further checks.
void check_rel_index_range(const at::Tensor& rel, int64_t T) {
  const int64_t* r = rel.data_ptr<int64_t>();
  const auto [lo, hi] = std::minmax_element(r, r + rel.numel());
  TORCH_CHECK(rel.numel() == 0 || (*lo >= 0 && *hi < T), "window_attention: rel_index values must lie in [0, ", T,
              "), got [", *lo, ", ", *hi, "]");
}

template <typename T>
void sum_scatter_rows(T* dbias_threads, int64_t threads, int64_t H, const int64_t* rel, int64_t N, int64_t Np,
                      int64_t rows, T* columns) {
  const int64_t block = H * N * Np;
  T* acc = dbias_threads;                  // thread 0's (H, N, Np) block collects the others'
  for (int64_t t = 1; t < threads; ++t) {
    const T* x = dbias_threads + t * block;
    for (int64_t k = 0; k < block; ++k) acc[k] += x[k];
  }
  for (int64_t h = 0; h < H; ++h) {
    T* column = columns + h * rows;
    for (int64_t i = 0; i < N; ++i) {
      const T* a = acc + (h * N + i) * Np;
      const int64_t* r = rel + i * N;
      for (int64_t j = 0; j < N; ++j) column[r[j]] += a[j];
    }
  }
}

// dtable[rel[i, j], h] = sum over threads t of dbias_threads[t, h, i, j] (rows padded to Np), scattered head by
// head into the transposed table (a head's T values stay in L1); index_add_ into the (T, H) table took ~150 us a
// call at 24 heads.
at::Tensor table_grad(at::Tensor& dbias_threads, const at::Tensor& rel, int64_t T) {
  const int64_t threads = dbias_threads.size(0), H = dbias_threads.size(1), N = dbias_threads.size(2);
  at::Tensor columns = at::zeros({H, T}, dbias_threads.options());
  AT_DISPATCH_FLOATING_TYPES(dbias_threads.scalar_type(), "window_attention_table_grad", [&] {
    sum_scatter_rows(dbias_threads.data_ptr<scalar_t>(), threads, H, rel.data_ptr<int64_t>(), N,
                     dbias_threads.size(3), T, columns.data_ptr<scalar_t>());
  });
  return columns.t().contiguous();
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// The additive score terms, built once per call, Np = N rounded up to the vector width:
//   bias (H, N, Np): table[rel_index[i, j], h]; -inf in the padding columns j >= N
//   mask (nW, N, Np): -inf for padded keys, -100 across shift regions, 0 otherwise (one zero window without region)
// The bias is filled by the threads of the kernel's parallel region, a share of the heads each (its gathers cost
// as much as a few tiles); what they read is prepared here: the transposed table and 32-bit indices, so that a
// head's rows are contiguous gathers.
template <typename T>
struct BiasSource {
  std::vector<T> columns;        // (H, T): table transposed
  std::vector<int32_t> index;    // (N, N): rel_index
  std::unique_ptr<T[]> bias;     // (H, N, Np), filled by fill_bias
  BiasSource(const T* table, const int64_t* rel, const WindowShape& s, int64_t Np)
      : columns(s.H * s.T), index(rel, rel + s.N * s.N), bias(new T[s.H * s.N * Np]) {
    for (int64_t t = 0; t < s.T; ++t)
      for (int64_t h = 0; h < s.H; ++h) columns[h * s.T + t] = table[t * s.H + h];
  }
};

// heads [h0, h1) of the bias
template <typename T>
void fill_bias(BiasSource<T>& src, const WindowShape& s, int64_t Np, int64_t h0, int64_t h1) {
  for (int64_t h = h0; h < h1; ++h) {
    const T* column = src.columns.data() + h * s.T;
    for (int64_t i = 0; i < s.N; ++i) {
      const int32_t* ri = src.index.data() + i * s.N;
      T* bi = src.bias.get() + (h * s.N + i) * Np;
      for (int64_t j = 0; j < s.N; ++j) bi[j] = column[ri[j]];
      for (int64_t j = s.N; j < Np; ++j) bi[j] = -std::numeric_limits<T>::infinity();
    }
  }
}

// this thread's share of the bias, then wait for the others' (inside a parallel region)
template <typename T>
void fill_bias_together(BiasSource<T>& src, const WindowShape& s, int64_t Np) {
  const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
  fill_bias(src, s, Np, s.H * t / n, s.H * (t + 1) / n);
#pragma omp barrier
}

// The masks of the windows, deduplicated: a window whose tokens are all real and in one shift region (every
// interior window of a shifted layout, every window without region) uses the shared zero mask at offset 0, the
// others one (N, Np) block each. Window b of the batch reads rows + offset[b % offset.size()].
template <typename T>
struct Masks {
  std::vector<T> rows;
  std::vector<int64_t> offset;
  const T* of(int64_t b) const { return rows.data() + offset[b % static_cast<int64_t>(offset.size())]; }
  // nullptr for a window on the shared zero mask (its rows need not be read), else its rows
  const T* nonzero(int64_t b) const { return offset[b % static_cast<int64_t>(offset.size())] ? of(b) : nullptr; }
};

template <typename T>
Masks<T> make_mask(const int32_t* region, const WindowShape& s, int64_t Np) {
  const int64_t N = s.N, nW = region ? s.nW : 1;
  Masks<T> m{std::vector<T>(N * Np, T(0)), std::vector<int64_t>(nW, 0)};
  if (!region) return m;
  for (int64_t w = 0; w < nW; ++w) {
    const int32_t* r = region + w * N;
    const bool uniform = std::all_of(r, r + N, [&](int32_t x) { return x >= 0 && x == r[0]; });
    if (uniform) continue;
    m.offset[w] = static_cast<int64_t>(m.rows.size());
    m.rows.resize(m.rows.size() + N * Np);
    T* mask = m.rows.data() + m.offset[w];
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < Np; ++j)
        mask[i * Np + j] = j >= N      ? T(0)                                   // padding column (bias: -inf)
                           : r[j] < 0  ? -std::numeric_limits<T>::infinity()   // padded key
                           : r[i] >= 0 && r[i] != r[j] ? T(-100) : T(0);     // across shift regions
  }
  return m;
}

// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block of floats (AVX shuffles; scalar without AVX).
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
#if defined(__AVX__)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4)
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[i + 2 * j + 1] = _mm256_shuffle_ps(t[i + j], t[i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
#else
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
#endif
}

// Threads for a call: one per 2^18 multiply-adds at least (a fork/join costs microseconds, more on a busy machine).
inline int threads_for(const WindowShape& s) {
  const int64_t work = s.B * s.H * s.N * s.N * std::max<int64_t>(s.D, 8) * 7;
  return static_cast<int>(std::clamp<int64_t>(work >> 18, 1, at::get_num_threads()));
}

// Tiles [0, total) handed out in chunks from a shared counter, so a thread on a busy core just takes fewer. Each
// thread also knows the tile it runs next (`next`, -1 at the end) and prefetches its rows while on the current one:
// a tile's rows are 3*H*D apart in qkv, a pattern the hardware prefetchers do not follow.
class TaskQueue {
 public:
  TaskQueue(int64_t total, int64_t chunk) : total_(total), chunk_(chunk) {}
  struct Cursor {
    TaskQueue& q;
    int64_t task, end, next = -1, next_end = 0;
    explicit Cursor(TaskQueue& queue) : q(queue) { q.grab(task, end), plan(); }
    void plan() {
      if (task < 0) next = -1;
      else if (task + 1 < end) next = task + 1, next_end = end;
      else q.grab(next, next_end);
    }
    void advance() { task = next, end = next_end, plan(); }
  };

 private:
  void grab(int64_t& start, int64_t& stop) {
    start = counter_.fetch_add(chunk_);
    stop = std::min(start + chunk_, total_);
    if (start >= total_) start = -1;
  }
  std::atomic<int64_t> counter_{0};
  const int64_t total_, chunk_;
};

inline int64_t chunk_for(const WindowShape& s) { return std::max<int64_t>(1, 32768 / (s.N * s.N * s.D)); }

// Row n of the (N, D) block x (row stride ld) into the cache; for writing (owned, so that the stores that follow
// do not each wait for their line) when write is true.
template <bool write = false, typename T>
inline void prefetch_row(const T* x, int64_t ld, int64_t n, int64_t D) {
  const T* r = x + n * ld;
  for (int64_t d = 0; d < D; d += 64 / sizeof(T)) __builtin_prefetch(r + d, write);
  __builtin_prefetch(r + D - 1, write);   // the last line of a row that does not start on a line
}

// What the tile loops of both passes read: the call's shape and score-row width, its bias and masks, its input.
template <typename T>
struct TileArgs {
  WindowShape s;
  int64_t Np;                 // score rows of the instruction set in use (padded_row)
  BiasSource<T>* bias_src;    // filled at the start of the parallel region
  bool copy_crowded;          // copy operands whose rows crowd L1 sets (Scratch::operand)
  const Masks<T>* masks;
  T scale;
  const T* qkv;
  const T* bias() const { return bias_src->bias.get(); }
};

template <typename T>
struct ForwardArgs : TileArgs<T> {
  T *out, *lse;
};

template <typename T>
struct BackwardArgs : TileArgs<T> {
  const T *grad, *lse;
  T *dqkv, *dbias_threads;   // dbias_threads (threads, H, N, Np): one block per thread
};

namespace base {   // the build's flags: 256-bit vectors (AVX2 + FMA on x86_64)
#define ESVIT_VEC_BYTES 32
#define ESVIT_TARGET
#include "window_attention_cpu_tiles.h"
#undef ESVIT_TARGET
#undef ESVIT_VEC_BYTES
}  // namespace base

#ifdef ESVIT_HAVE_AVX512
namespace avx512 {
#define ESVIT_VEC_BYTES 64
#define ESVIT_TARGET ESVIT_AVX512_TARGET
#include "window_attention_cpu_tiles.h"
#undef ESVIT_TARGET
#undef ESVIT_VEC_BYTES
}  // namespace avx512
#endif

// score rows of the instruction set in use are N rounded up to its vector width
template <typename T>
int64_t padded_row(int64_t N, CpuIsa isa) {
#ifdef ESVIT_HAVE_AVX512
  if (isa == CpuIsa::avx512) return round_up(N, avx512::lanes<T>());
#endif
  return round_up(N, base::lanes<T>());
}

template <typename T>
void forward_impl(const ForwardArgs<T>& a, CpuIsa isa) {
  TaskQueue queue(a.s.B * a.s.H, chunk_for(a.s));
#pragma omp parallel num_threads(threads_for(a.s))
  {
    fill_bias_together(*a.bias_src, a.s, a.Np);
#ifdef ESVIT_HAVE_AVX512
    if (isa == CpuIsa::avx512)
      avx512::forward_tiles(a, queue);
    else
#endif
      base::forward_tiles(a, queue);
  }
}

template <typename T>
void backward_impl(const BackwardArgs<T>& a, CpuIsa isa) {
  TaskQueue queue(a.s.B * a.s.H, chunk_for(a.s));
#pragma omp parallel num_threads(threads_for(a.s))
  {
    fill_bias_together(*a.bias_src, a.s, a.Np);
    T* dbias = a.dbias_threads + omp_get_thread_num() * a.s.H * a.s.N * a.Np;
#ifdef ESVIT_HAVE_AVX512
    if (isa == CpuIsa::avx512)
      avx512::backward_tiles(a, queue, dbias);
    else
#endif
      base::backward_tiles(a, queue, dbias);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_forward_cpu(
    const at::Tensor& qkv_in, const at::Tensor& table_in, const at::Tensor& rel_in, const at::Tensor& region_in,
    int64_t num_heads, double scale) {
  const WindowShape s = check_window_attention(qkv_in, table_in, rel_in, region_in, num_heads);
  TORCH_CHECK(qkv_in.scalar_type() == at::kFloat || qkv_in.scalar_type() == at::kDouble,
              "window_attention (cpu): float32 or float64 only, got ", qkv_in.scalar_type());
  const at::Tensor qkv = qkv_in.contiguous(), table = table_in.contiguous(), rel = rel_in.contiguous();
  const at::Tensor region = region_in.contiguous();
  check_rel_index_range(rel, s.T);
  at::Tensor out = at::empty({s.B, s.N, s.H * s.D}, qkv.options());
  at::Tensor lse = at::empty({s.B, s.H, s.N}, qkv.options());
  const CpuIsa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_forward_cpu", [&] {
    const int64_t Np = padded_row<scalar_t>(s.N, isa);
    const int32_t* reg = region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr;
    BiasSource<scalar_t> bias(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(), s, Np);
    const Masks<scalar_t> masks = make_mask<scalar_t>(reg, s, Np);
    const TileArgs<scalar_t> tiles{s, Np, &bias, l1d_ways() <= 8, &masks, static_cast<scalar_t>(scale),
                                   qkv.data_ptr<scalar_t>()};
    forward_impl<scalar_t>({tiles, out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>()}, isa);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& qkv_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& table_in, const at::Tensor& rel_in, const at::Tensor& region_in, int64_t num_heads,
    double scale) {
  const WindowShape s = check_window_attention(qkv_in, table_in, rel_in, region_in, num_heads);
  TORCH_CHECK(grad_in.sizes() == out_in.sizes() && out_in.size(0) == s.B && out_in.size(1) == s.N &&
                  out_in.size(2) == s.H * s.D,
              "window_attention backward: grad/out must be (B_, N, H*D)");
  const at::Tensor qkv = qkv_in.contiguous(), table = table_in.contiguous(), rel = rel_in.contiguous();
  const at::Tensor region = region_in.contiguous(), grad = grad_in.contiguous().to(qkv.scalar_type());
  const at::Tensor lse = lse_in.contiguous();   // out_in: only its shape is used on the CPU
  check_rel_index_range(rel, s.T);
  at::Tensor dqkv = at::empty_like(qkv);
  const CpuIsa isa = cpu_isa();
  at::Tensor dbias_threads;
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_backward_cpu", [&] {
    const int64_t Np = padded_row<scalar_t>(s.N, isa);
    dbias_threads = at::zeros({threads_for(s), s.H, s.N, Np}, qkv.options());
    const int32_t* reg = region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr;
    BiasSource<scalar_t> bias(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(), s, Np);
    const Masks<scalar_t> masks = make_mask<scalar_t>(reg, s, Np);
    const TileArgs<scalar_t> tiles{s, Np, &bias, l1d_ways() <= 8, &masks, static_cast<scalar_t>(scale),
                                   qkv.data_ptr<scalar_t>()};
    backward_impl<scalar_t>({tiles, grad.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), dqkv.data_ptr<scalar_t>(),
                             dbias_threads.data_ptr<scalar_t>()}, isa);
  });
  return {dqkv, table_grad(dbias_threads, rel, table.size(0))};
}

}  // namespace esvit
