// Fused window attention on the CPU: forward and backward, one (window, head) tile per task, OpenMP over tiles
// (dynamic schedule: robust to a busy core; fewer threads for small calls). A tile's N x N scores live in a
// per-thread scratch buffer, never in a (B_, H, N, N) tensor; the backward recomputes them from q, k and the
// saved log-sum-exp, and takes rowsum(dO * O) as rowsum(P * dP), so it does not read the output. Each of the 7
// products is a small GEMM on 6 x 16 register blocks whose A operand is read through two strides, so q, k, v, dO
// and the transposes dS^T, P^T are read in place and out / dqkv written in place (head dims that are a multiple of
// the vector width); only k^T and v^T are copied per tile, and q, k, v, dO too when their row stride would crowd
// them into a few L1 sets (see Scratch::operand).
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <tuple>
#include <type_traits>
#include <utility>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "ops.h"

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
void sum_scatter_rows(T* dbias_threads, int64_t threads, int64_t H, const int64_t* rel, int64_t NN, int64_t rows,
                      T* columns) {
  T* acc = dbias_threads;                  // thread 0's (H, N*N) block collects the others'
  for (int64_t t = 1; t < threads; ++t) {
    const T* x = dbias_threads + t * H * NN;
    for (int64_t k = 0; k < H * NN; ++k) acc[k] += x[k];
  }
  for (int64_t h = 0; h < H; ++h) {
    T* column = columns + h * rows;
    const T* a = acc + h * NN;
    for (int64_t ij = 0; ij < NN; ++ij) column[rel[ij]] += a[ij];
  }
}

// dtable[rel[i, j], h] = sum over threads t of dbias_threads[t, h, i, j], scattered head by head into the
// transposed table (a head's T values stay in L1); index_add_ into the (T, H) table took ~150 us a call at 24 heads.
at::Tensor table_grad(at::Tensor& dbias_threads, const at::Tensor& rel, int64_t T) {
  const int64_t threads = dbias_threads.size(0), H = dbias_threads.size(1), NN = rel.numel();
  at::Tensor columns = at::zeros({H, T}, dbias_threads.options());
  AT_DISPATCH_FLOATING_TYPES(dbias_threads.scalar_type(), "window_attention_table_grad", [&] {
    sum_scatter_rows(dbias_threads.data_ptr<scalar_t>(), threads, H, rel.data_ptr<int64_t>(), NN, T,
                     columns.data_ptr<scalar_t>());
  });
  return columns.t().contiguous();
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One AVX2 register with -mavx2, two SSE ones otherwise (GCC vector extensions; an alias template would drop the
// attribute on the dependent type).
template <typename T>
struct VecOf;
template <>
struct VecOf<float> { typedef float type __attribute__((vector_size(32))); };
template <>
struct VecOf<double> { typedef double type __attribute__((vector_size(32))); };
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = 32 / sizeof(T);

template <typename T>
inline Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
inline void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }

// exp of every lane: exp_vec (cpu_math.h) on a whole register with AVX2 intrinsics, 2/3 of the time of the
// auto-vectorised loop (one max instead of two compare-and-blend clamps, a rounding instruction). No upper clamp:
// the kernels exponentiate scores minus their row max or log-sum-exp, never above ~0. x >= -88 (-inf included)
// gives n >= -127, whose biased exponent 0 makes the result exactly 0; a NaN stays NaN (max_ps returns its second
// operand when one is NaN), so a NaN in q or k still reaches the loss. Double (gradcheck only) uses std::exp.
inline Vec<float> exp_lanes(Vec<float> x) {
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-88.0f), reinterpret_cast<__m256>(x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);       // x - n ln2, ln2 split in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return reinterpret_cast<Vec<float>>(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
#else
  for (int l = 0; l < kLanes<float>; ++l) x[l] = exp_vec(x[l]);
  return x;
#endif
}
inline Vec<double> exp_lanes(Vec<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename V>
inline auto hsum(V v) {
  auto r = v[0];
  for (size_t l = 1; l < sizeof(V) / sizeof(r); ++l) r += v[l];
  return r;
}

// C[r, :] = f_r * sum_k A(r, k) B[k, :] for MR rows and NV vectors of columns, all in registers over the k loop;
// f_r = alpha, times row_scale[r] when row_scale is given (the forward's softmax normalisation).
// A(r, k) = a[r * ars + k * aks]: any strides, so transposed operands are read in place.
template <typename T, int MR, int NV>
inline void micro_kernel(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t K,
                         T alpha, const T* row_scale) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[MR][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + k * ldb + v * L, sizeof(Vec<T>));
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * ars + k * aks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const T f = row_scale ? alpha * row_scale[r] : alpha;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] *= f;
      std::memcpy(c + r * ldc + v * L, &acc[r][v], sizeof(Vec<T>));
    }
  }
}

template <typename T, int NV>
void gemm_rows(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t M,
               int64_t K, T alpha, const T* rs) {
  int64_t i = 0;
  for (; i + 6 <= M; i += 6)
    micro_kernel<T, 6, NV>(a + i * ars, ars, aks, b, ldb, c + i * ldc, ldc, K, alpha, rs ? rs + i : rs);
  a += i * ars, c += i * ldc, rs = rs ? rs + i : rs;
  switch (M - i) {
    case 5: micro_kernel<T, 5, NV>(a, ars, aks, b, ldb, c, ldc, K, alpha, rs); break;
    case 4: micro_kernel<T, 4, NV>(a, ars, aks, b, ldb, c, ldc, K, alpha, rs); break;
    case 3: micro_kernel<T, 3, NV>(a, ars, aks, b, ldb, c, ldc, K, alpha, rs); break;
    case 2: micro_kernel<T, 2, NV>(a, ars, aks, b, ldb, c, ldc, K, alpha, rs); break;
    case 1: micro_kernel<T, 1, NV>(a, ars, aks, b, ldb, c, ldc, K, alpha, rs); break;
  }
}

// C (M x NC) = alpha * A (M x K) @ B (K x NC), B and C row-major (leading dims ldb, ldc), NC a multiple of the
// vector width; 6 x 16 float register blocks (12 accumulators), a last 8-wide column block if needed.
template <typename T>
void gemm(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t M, int64_t K,
          int64_t NC, T alpha, const T* row_scale = nullptr) {
  constexpr int L = kLanes<T>;
  int64_t j = 0;
  for (; j + 2 * L <= NC; j += 2 * L) gemm_rows<T, 2>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, alpha, row_scale);
  if (j < NC) gemm_rows<T, 1>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, alpha, row_scale);
}

// The additive score terms, built once per call, Np = N rounded up to the vector width:
//   bias (H, N, Np): table[rel_index[i, j], h]; -inf in the padding columns j >= N
//   mask (nW, N, Np): -inf for padded keys, -100 across shift regions, 0 otherwise (one zero window without region)
template <typename T>
std::vector<T> make_bias(const T* table, const int64_t* rel, const WindowShape& s, int64_t Np) {
  // through the transposed table and 32-bit indices, so that a head's rows are contiguous 8-lane gathers
  std::vector<T> columns(s.H * s.T);
  for (int64_t t = 0; t < s.T; ++t)
    for (int64_t h = 0; h < s.H; ++h) columns[h * s.T + t] = table[t * s.H + h];
  const std::vector<int32_t> index(rel, rel + s.N * s.N);
  std::vector<T> bias(s.H * s.N * Np, -std::numeric_limits<T>::infinity());
  for (int64_t h = 0; h < s.H; ++h) {
    const T* column = columns.data() + h * s.T;
    for (int64_t i = 0; i < s.N; ++i) {
      const int32_t* ri = index.data() + i * s.N;
      T* bi = bias.data() + (h * s.N + i) * Np;
      for (int64_t j = 0; j < s.N; ++j) bi[j] = column[ri[j]];
    }
  }
  return bias;
}

// The masks of the windows, deduplicated: a window whose tokens are all real and in one shift region (every
// interior window of a shifted layout, every window without region) uses the shared zero mask at offset 0, the
// others one (N, Np) block each. Window b of the batch reads rows + offset[b % offset.size()].
template <typename T>
struct Masks {
  std::vector<T> rows;
  std::vector<int64_t> offset;
  const T* of(int64_t b) const { return rows.data() + offset[b % static_cast<int64_t>(offset.size())]; }
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

// Per-thread scratch of one (window, head) tile. kt, vt: k^T, v^T (D, Np), zero beyond N. s, p: (N, Np) scores.
// When the head dim is not a multiple of the vector width, q, k, v, dO are copied into (N, Dp) zero-padded tiles
// and the results go through o (N, Dp); otherwise they are read and written in place.
template <typename T>
struct Scratch {
  int64_t N, D, Np, Dp;
  bool direct;
  std::vector<T> buf, inv;
  T *kt, *vt, *s, *p, *q, *k, *v, *g, *o;
  Scratch(int64_t n, int64_t d) : N(n), D(d), Np(round_up(n, kLanes<T>)), Dp(round_up(d, kLanes<T>)) {
    direct = Dp == D;
    const int64_t padded = N * Dp;
    buf.assign(2 * D * Np + 2 * N * Np + 5 * padded, T(0));
    inv.assign(N, T(0));
    T* ptr = buf.data();
    for (T** t : {&kt, &vt}) *t = ptr, ptr += D * Np;
    for (T** t : {&s, &p}) *t = ptr, ptr += N * Np;
    for (T** t : {&q, &k, &v, &g, &o}) *t = ptr, ptr += padded;
  }
  // x^T (D, Np) from rows of stride ld (float: 8 x 8 blocks, the rest element by element)
  void transpose_in(const T* x, int64_t ld, T* xt) const {
    int64_t n0 = 0, d0 = 0;
    if constexpr (std::is_same_v<T, float>) {
      n0 = N / 8 * 8, d0 = D / 8 * 8;
      for (int64_t n = 0; n < n0; n += 8)
        for (int64_t d = 0; d < d0; d += 8) transpose8x8(x + n * ld + d, ld, xt + d * Np + n, Np);
    }
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = n < n0 ? d0 : 0; d < D; ++d) xt[d * Np + n] = x[n * ld + d];
  }
  // rows of D values, inline (std::copy of a runtime length calls memmove: ~10 ns a row)
  static void copy_rows(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t rows, int64_t D) {
    constexpr int L = kLanes<T>;
    for (int64_t n = 0; n < rows; ++n) {
      int64_t d = 0;
      for (; d + L <= D; d += L) store(y + n * ldy + d, load(x + n * ldx + d));
      for (; d < D; ++d) y[n * ldy + d] = x[n * ldx + d];
    }
  }
  // a matrix operand (N, D) of row stride ld: in place, or copied into `pad` (N, Dp) when D is not a multiple of
  // the vector width or when its rows would crowd a few L1 sets: rows a multiple of 512 bytes apart (Swin-T's
  // last two stages) map onto at most 8 of the 64 sets, more rows per set than a set has ways
  std::pair<const T*, int64_t> operand(const T* x, int64_t ld, T* pad) const {
    if (direct && ld * sizeof(T) % 512 != 0) return {x, ld};
    copy_rows(x, ld, pad, Dp, N, D);
    return {pad, Dp};
  }
  // where a result (N, D) of row stride ld is written, and copying it there when it went through o
  std::pair<T*, int64_t> result(T* x, int64_t ld) const {
    return direct ? std::make_pair(x, ld) : std::make_pair(o, Dp);
  }
  void write_back(T* x, int64_t ld) const {
    if (direct) return;
    copy_rows(o, Dp, x, ld, N, D);
  }
};

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

// Row n of the (N, D) block x (row stride ld) into the cache.
template <typename T>
inline void prefetch_row(const T* x, int64_t ld, int64_t n, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / sizeof(T)) __builtin_prefetch(x + n * ld + d);
}

// x += b + m over one score row of n (a positive multiple of the vector width); returns max(x).
template <typename T>
inline T add_row_max(T* x, const T* b, const T* m, int64_t n) {
  constexpr int L = kLanes<T>;
  Vec<T> mx, v, bv, mv;
  for (int64_t j = 0; j < n; j += L) {
    std::memcpy(&v, x + j, sizeof v), std::memcpy(&bv, b + j, sizeof v), std::memcpy(&mv, m + j, sizeof v);
    v += bv + mv;
    std::memcpy(x + j, &v, sizeof v);
    mx = j == 0 ? v : (v > mx ? v : mx);
  }
  T r = mx[0];
  for (int l = 1; l < L; ++l) r = std::max(r, mx[l]);
  return r;
}

// Forward over all tiles: out (B_, N, H*D), lse (B_, H, N).
template <typename T>
void forward_impl(const WindowShape& s, const T* qkv, const T* bias, const Masks<T>& masks, T scale,
                  T* out, T* lse) {
  const int64_t N = s.N, D = s.D, HD = s.H * s.D, row = 3 * HD;
  TaskQueue queue(s.B * s.H, chunk_for(s));
#pragma omp parallel num_threads(threads_for(s))
  {
    Scratch<T> t(N, D);
    const int64_t Np = t.Np;
    for (TaskQueue::Cursor it(queue); it.task >= 0; it.advance()) {
      const int64_t b = it.task / s.H, h = it.task % s.H;
      const T* q = qkv + b * N * row + h * D;
      t.transpose_in(q + HD, row, t.kt);
      const auto [qa, lq] = t.operand(q, row, t.q);
      const auto [vb, lv] = t.operand(q + 2 * HD, row, t.v);
      gemm(qa, lq, int64_t(1), t.kt, Np, t.s, Np, N, D, Np, scale);          // S = scale q k^T
      const T* bh = bias + h * N * Np;
      const T* mw = masks.of(b);
      T* l = lse + it.task * N;
      const T* q_next = it.next < 0 ? nullptr : qkv + (it.next / s.H) * N * row + (it.next % s.H) * D;
      for (int64_t i = 0; i < N; ++i) {                      // exp(S + bias + mask - max); 1 / rowsum in O
        if (q_next)
          for (int64_t part = 0; part < 3; ++part) prefetch_row(q_next + part * HD, row, i, D);
        T* x = t.s + i * Np;
        const T m = add_row_max(x, bh + i * Np, mw + i * Np, Np);
        Vec<T> sums{};
        for (int64_t j = 0; j < Np; j += kLanes<T>) {
          const Vec<T> e = exp_lanes(load(x + j) - m);
          store(x + j, e);
          sums += e;
        }
        const T sum = hsum(sums);
        l[i] = m + std::log(sum);
        t.inv[i] = T(1) / sum;
      }
      T* o = out + b * N * HD + h * D;
      const auto [oc, lo] = t.result(o, HD);
      gemm(t.s, Np, int64_t(1), vb, lv, oc, lo, N, N, t.Dp, T(1), t.inv.data());  // O = P v / rowsum
      t.write_back(o, HD);
    }
  }
}

// Backward over all tiles: dqkv (B_, N, 3, H, D) and per-thread dbias (threads, H, N, N).
template <typename T>
void backward_impl(const WindowShape& s, const T* qkv, const T* grad, const T* lse, const T* bias,
                   const Masks<T>& masks, T scale, T* dqkv, T* dbias_threads) {
  const int64_t N = s.N, D = s.D, HD = s.H * s.D, row = 3 * HD;
  TaskQueue queue(s.B * s.H, chunk_for(s));
#pragma omp parallel num_threads(threads_for(s))
  {
    Scratch<T> t(N, D);
    const int64_t Np = t.Np, Dp = t.Dp;
    T* dbias = dbias_threads + omp_get_thread_num() * s.H * N * N;
    for (TaskQueue::Cursor it(queue); it.task >= 0; it.advance()) {
      const int64_t b = it.task / s.H, h = it.task % s.H;
      const T *q = qkv + b * N * row + h * D, *g = grad + b * N * HD + h * D;
      t.transpose_in(q + HD, row, t.kt);
      t.transpose_in(q + 2 * HD, row, t.vt);
      const auto [qa, lq] = t.operand(q, row, t.q);
      const auto [kb, lk] = t.operand(q + HD, row, t.k);
      const auto [ga, lg] = t.operand(g, HD, t.g);
      gemm(qa, lq, int64_t(1), t.kt, Np, t.p, Np, N, D, Np, scale);          // S again; P = exp(S - lse) below
      const T* bh = bias + h * N * Np;
      const T* mw = masks.of(b);
      const T* l = lse + it.task * N;
      const int64_t bn = it.next / s.H, hn = it.next % s.H;
      gemm(ga, lg, int64_t(1), t.vt, Np, t.s, Np, N, D, Np, T(1));           // dP = dO v^T
      T* db = dbias + h * N * N;
      for (int64_t i = 0; i < N; ++i) {                                        // P, then dS = P (dP - delta)
        if (it.next >= 0) {                                                    // the next tile's q, k, v, dO
          for (int64_t part = 0; part < 3; ++part)
            prefetch_row(qkv + bn * N * row + part * HD + hn * D, row, i, D);
          prefetch_row(grad + bn * N * HD + hn * D, HD, i, D);
        }
        T* ds = t.s + i * Np;
        T* p = t.p + i * Np;
        const T li = l[i];
        Vec<T> dv{};                       // delta_i = rowsum(dO * O)_i = sum_j P_ij dP_ij: O itself is not read
        for (int64_t j = 0; j < Np; j += kLanes<T>) {
          const Vec<T> e = exp_lanes(load(p + j) + (load(bh + i * Np + j) + load(mw + i * Np + j) - li));
          store(p + j, e);
          dv += e * load(ds + j);
        }
        const T di = hsum(dv);
#pragma omp simd
        for (int64_t j = 0; j < Np; ++j) ds[j] = p[j] * (ds[j] - di);
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) db[i * N + j] += ds[j];
      }
      T* dq = dqkv + b * N * row + h * D;
      auto [c, lc] = t.result(dq, row);
      gemm(t.s, Np, int64_t(1), kb, lk, c, lc, N, N, Dp, scale);            // dQ = scale dS k
      t.write_back(dq, row);
      std::tie(c, lc) = t.result(dq + HD, row);
      gemm(t.s, int64_t(1), Np, qa, lq, c, lc, N, N, Dp, scale);            // dK = scale dS^T q
      t.write_back(dq + HD, row);
      std::tie(c, lc) = t.result(dq + 2 * HD, row);
      gemm(t.p, int64_t(1), Np, ga, lg, c, lc, N, N, Dp, T(1));             // dV = P^T dO
      t.write_back(dq + 2 * HD, row);
    }
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
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_forward_cpu", [&] {
    const int64_t Np = round_up(s.N, kLanes<scalar_t>);
    const int32_t* reg = region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr;
    const std::vector<scalar_t> bias = make_bias(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(), s, Np);
    const Masks<scalar_t> masks = make_mask<scalar_t>(reg, s, Np);
    forward_impl<scalar_t>(s, qkv.data_ptr<scalar_t>(), bias.data(), masks,
                           static_cast<scalar_t>(scale), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
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
  const int threads = threads_for(s);
  at::Tensor dbias_threads = at::zeros({threads, s.H, s.N, s.N}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_backward_cpu", [&] {
    const int64_t Np = round_up(s.N, kLanes<scalar_t>);
    const int32_t* reg = region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr;
    const std::vector<scalar_t> bias = make_bias(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(), s, Np);
    const Masks<scalar_t> masks = make_mask<scalar_t>(reg, s, Np);
    backward_impl<scalar_t>(s, qkv.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                            lse.data_ptr<scalar_t>(), bias.data(), masks,
                            static_cast<scalar_t>(scale), dqkv.data_ptr<scalar_t>(),
                            dbias_threads.data_ptr<scalar_t>());
  });
  return {dqkv, table_grad(dbias_threads, rel, table.size(0))};
}

}  // namespace esvit
