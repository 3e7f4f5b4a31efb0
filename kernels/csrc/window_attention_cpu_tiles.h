// The per-thread tile loops of the CPU window attention, for one vector instruction set. Included once per ISA
// by window_attention_cpu.cpp (no include guard, on purpose), each time inside its own namespace with
//   ESVIT_VEC_BYTES  the vector width in bytes: 32 (AVX2 registers) or 64 (AVX-512)
//   ESVIT_TARGET     the function attribute that compiles the code for that ISA (empty: the build's flags)
// Every function here carries ESVIT_TARGET, so each copy is compiled whole for its ISA and calls between them
// pass vectors in registers of one ABI. Needs from the including file: WindowShape, Masks, TaskQueue,
// prefetch_row, round_up, transpose8x8, ForwardArgs, BackwardArgs.
//
// Per (window, head) tile: 7 small GEMMs on register blocks whose A operand is read through two strides, so q, k,
// v, dO and the transposes dS^T, P^T are read in place and out / dqkv written in place (head dims that are a
// multiple of the vector width); only k^T and v^T are copied per tile, and q, k, v, dO too when their row stride
// would crowd them into a few L1 sets (see Scratch::operand). Score rows are Np = N rounded up to the vector width.

#define ESVIT_INLINE ESVIT_TARGET inline __attribute__((always_inline))

template <typename T>
struct VecOf;
template <>
struct VecOf<float> { typedef float type __attribute__((vector_size(ESVIT_VEC_BYTES))); };
template <>
struct VecOf<double> { typedef double type __attribute__((vector_size(ESVIT_VEC_BYTES))); };
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = ESVIT_VEC_BYTES / sizeof(T);

template <typename T>
ESVIT_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
ESVIT_INLINE void store(T* p, Vec<T> v) { std::memcpy(p, &v, sizeof v); }

// exp of every lane, as exp_vec (cpu_math.h) on whole registers. No upper clamp: the kernels exponentiate scores
// minus their row max or log-sum-exp, never above ~0. x >= -88 (-inf included) gives n >= -127, whose biased
// exponent 0 makes the result exactly 0; a NaN stays NaN (max returns its second operand when one is NaN), so a
// NaN in q or k still reaches the loss. Double (gradcheck only) uses std::exp.
ESVIT_INLINE Vec<float> exp_lanes(Vec<float> x) {
#if ESVIT_VEC_BYTES == 64
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-88.0f), reinterpret_cast<__m512>(x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);       // x - n ln2, ln2 split in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return reinterpret_cast<Vec<float>>(_mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
#elif defined(__AVX2__) && defined(__FMA__)
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(-88.0f), reinterpret_cast<__m256>(x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
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
ESVIT_INLINE Vec<double> exp_lanes(Vec<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

// log of every lane for x >= FLT_MIN (the forward's row sums, >= 1): x = 2^e m with m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172, to s^9 (relative error ~1e-8 before rounding). A NaN
// stays NaN. One call a row was ~15% of the forward's time at Swin-T's last stage.
ESVIT_INLINE Vec<float> log_lanes(Vec<float> x) {
  typedef int32_t Ints __attribute__((vector_size(ESVIT_VEC_BYTES)));
  const Ints bits = reinterpret_cast<Ints>(x);
  Ints e = ((bits >> 23) & 0xff) - 127;
  Vec<float> m = reinterpret_cast<Vec<float>>((bits & 0x007fffff) | 0x3f800000);   // [1, 2)
  const Ints big = m > 1.41421356f;                                                 // -1 where m > sqrt(2)
  m = big ? m * 0.5f : m;
  e -= big;
  const Vec<float> f = m - 1.0f;
  const Vec<float> t = f / (f + 2.0f), z = t * t;
  const Vec<float> series = 1.0f + z * (1.0f / 3 + z * (1.0f / 5 + z * (1.0f / 7 + z * (1.0f / 9))));
  const Vec<float> r = __builtin_convertvector(e, Vec<float>) * 0.693147180559945f + 2.0f * t * series;
  return x == x ? r : x;
}
ESVIT_INLINE Vec<double> log_lanes(Vec<double> x) {
  for (int l = 0; l < kLanes<double>; ++l) x[l] = std::log(x[l]);
  return x;
}

// Sum and max of the lanes as a tree of shuffles (a chain of scalar adds over 16 lanes cost ~50 cycles a row).
ESVIT_INLINE float hsum(Vec<float> v) {
#if ESVIT_VEC_BYTES == 64
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
#else
  float r = v[0];
  for (int l = 1; l < kLanes<float>; ++l) r += v[l];
  return r;
#endif
}
ESVIT_INLINE float hmax(Vec<float> v) {
#if ESVIT_VEC_BYTES == 64
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#elif defined(__AVX__)
  const __m256 x = reinterpret_cast<__m256>(v);
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_max_ss(r, _mm_movehdup_ps(r)));
#else
  float r = v[0];
  for (int l = 1; l < kLanes<float>; ++l) r = std::max(r, v[l]);
  return r;
#endif
}
ESVIT_INLINE double hsum(Vec<double> v) {   // float64: gradcheck only
  double r = v[0];
  for (int l = 1; l < kLanes<double>; ++l) r += v[l];
  return r;
}
ESVIT_INLINE double hmax(Vec<double> v) {
  double r = v[0];
  for (int l = 1; l < kLanes<double>; ++l) r = std::max(r, v[l]);
  return r;
}

// C[r, :] = f_r * sum_k A(r, k) B[k, :] for MR rows and NV vectors of columns, all in registers over the k loop;
// f_r = alpha, times row_scale[r] when row_scale is given (the forward's softmax normalisation).
// A(r, k) = a[r * ars + k * aks]: any strides, so transposed operands are read in place.
template <typename T, int MR, int NV>
ESVIT_INLINE void micro_kernel(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc,
                               int64_t K, T alpha, const T* row_scale) {
  constexpr int L = kLanes<T>;
  Vec<T> acc[MR][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec<T> bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) std::memcpy(&bv[v], b + k * ldb + v * L, sizeof(Vec<T>));
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * ars + k * aks];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
    const T f = row_scale ? alpha * row_scale[r] : alpha;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] *= f;
      std::memcpy(c + r * ldc + v * L, &acc[r][v], sizeof(Vec<T>));
    }
  }
}

// the last M % MR rows of a row panel: one register block of exactly that many rows
template <typename T, int NV, int R>
ESVIT_TARGET inline void gemm_tail(int64_t rows, const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c,
                                   int64_t ldc, int64_t K, T alpha, const T* rs) {
  if constexpr (R > 0) {
    if (rows == R) return micro_kernel<T, R, NV>(a, ars, aks, b, ldb, c, ldc, K, alpha, rs);
    gemm_tail<T, NV, R - 1>(rows, a, ars, aks, b, ldb, c, ldc, K, alpha, rs);
  }
}

template <typename T, int MR, int NV>
ESVIT_TARGET inline void gemm_rows(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc,
                                   int64_t M, int64_t K, T alpha, const T* rs) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    micro_kernel<T, MR, NV>(a + i * ars, ars, aks, b, ldb, c + i * ldc, ldc, K, alpha, rs ? rs + i : rs);
  gemm_tail<T, NV, MR - 1>(M - i, a + i * ars, ars, aks, b, ldb, c + i * ldc, ldc, K, alpha, rs ? rs + i : rs);
}

// C (M x NC) = alpha * A (M x K) @ B (K x NC), B and C row-major (leading dims ldb, ldc), NC a multiple of the
// vector width. Register blocks (accumulators of MR rows x NV vectors): AVX2 (16 registers) 6 x 2; AVX-512
// (32 registers) 6 x 4 and 12 x 2, so that an N x 64 score tile and an N x 32 head tile both keep 24 in flight.
template <typename T>
ESVIT_TARGET inline void gemm(const T* a, int64_t ars, int64_t aks, const T* b, int64_t ldb, T* c, int64_t ldc,
                              int64_t M, int64_t K, int64_t NC, T alpha, const T* row_scale = nullptr) {
  constexpr int L = kLanes<T>;
  constexpr int MR = ESVIT_VEC_BYTES == 64 ? 12 : 6;
  int64_t j = 0;
  if constexpr (ESVIT_VEC_BYTES == 64)
    for (; j + 4 * L <= NC; j += 4 * L) gemm_rows<T, 6, 4>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, alpha, row_scale);
  for (; j + 2 * L <= NC; j += 2 * L) gemm_rows<T, MR, 2>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, alpha, row_scale);
  if (j < NC) gemm_rows<T, MR, 1>(a, ars, aks, b + j, ldb, c + j, ldc, M, K, alpha, row_scale);
}

// Per-thread scratch of one (window, head) tile. kt, vt: k^T, v^T (D, Np), zero beyond N. s, p: (N, Np) scores.
// When the head dim is not a multiple of the vector width, q, k, v, dO are copied into (N, Dp) zero-padded tiles
// and the results go through o (N, Dp); otherwise they are read and written in place.
template <typename T>
struct Scratch {
  int64_t N, D, Np, Dp;
  bool direct, copy_crowded;
  std::vector<T> buf, inv, rowmax, lse;   // per score row, padded to a whole vector
  T *kt, *vt, *s, *p, *q, *k, *v, *g, *o;
  ESVIT_TARGET Scratch(int64_t n, int64_t d, bool copy_crowded_rows)
      : N(n), D(d), Np(round_up(n, kLanes<T>)), Dp(round_up(d, kLanes<T>)), copy_crowded(copy_crowded_rows) {
    direct = Dp == D;
    const int64_t padded = N * Dp;
    buf.assign(2 * D * Np + 2 * N * Np + 5 * padded, T(0));
    for (std::vector<T>* r : {&inv, &rowmax, &lse}) r->assign(round_up(N, kLanes<T>), T(1));
    T* ptr = buf.data();
    for (T** t : {&kt, &vt}) *t = ptr, ptr += D * Np;
    for (T** t : {&s, &p}) *t = ptr, ptr += N * Np;
    for (T** t : {&q, &k, &v, &g, &o}) *t = ptr, ptr += padded;
  }
  // x^T (D, Np) from rows of stride ld (float: 8 x 8 blocks, the rest element by element)
  ESVIT_TARGET void transpose_in(const T* x, int64_t ld, T* xt) const {
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
  ESVIT_TARGET static void copy_rows(const T* x, int64_t ldx, T* y, int64_t ldy, int64_t rows, int64_t D) {
    constexpr int L = kLanes<T>;
    for (int64_t n = 0; n < rows; ++n) {
      int64_t d = 0;
      for (; d + L <= D; d += L) store(y + n * ldy + d, load(x + n * ldx + d));
      for (; d < D; ++d) y[n * ldy + d] = x[n * ldx + d];
    }
  }
  // a matrix operand (N, D) of row stride ld: in place, or copied into `pad` (N, Dp) when D is not a multiple of
  // the vector width or, with copy_crowded, when its rows would crowd a few L1 sets: rows a multiple of 512 bytes
  // apart (Swin-T's last two stages) map onto at most 8 of the 64 sets, more rows per set than an 8-way L1 has
  // ways (measured: copying paid on an 8-way 32 KiB L1, Zen 3; on a 12-way 48 KiB one, Zen 5, reading in place
  // was 5-9% faster at those stages)
  ESVIT_TARGET std::pair<const T*, int64_t> operand(const T* x, int64_t ld, T* pad) const {
    if (direct && (!copy_crowded || ld * sizeof(T) % 512 != 0)) return {x, ld};
    copy_rows(x, ld, pad, Dp, N, D);
    return {pad, Dp};
  }
  // where a result (N, D) of row stride ld is written, and copying it there when it went through o
  ESVIT_TARGET std::pair<T*, int64_t> result(T* x, int64_t ld) const {
    return direct ? std::make_pair(x, ld) : std::make_pair(o, Dp);
  }
  ESVIT_TARGET void write_back(T* x, int64_t ld) const {
    if (direct) return;
    copy_rows(o, Dp, x, ld, N, D);
  }
};

// x += b (+ m when masked) over one score row of n (a positive multiple of the vector width); returns max(x).
template <bool masked, typename T>
ESVIT_INLINE T add_row_max(T* x, const T* b, const T* m, int64_t n) {
  constexpr int L = kLanes<T>;
  Vec<T> mx = load(x), v;
  for (int64_t j = 0; j < n; j += L) {
    v = load(x + j) + load(b + j);
    if constexpr (masked) v += load(m + j);
    store(x + j, v);
    mx = j == 0 ? v : (v > mx ? v : mx);
  }
  return hmax(mx);
}

// One score row of the backward: p = exp(p + b (+ m) - lse) in place; returns delta = sum_j p_j dp_j
template <bool masked, typename T>
ESVIT_INLINE T probs_and_delta(T* p, const T* dp, const T* b, const T* m, T lse, int64_t n) {
  const Vec<T> li = Vec<T>{} + lse;
  Vec<T> dv{};
  for (int64_t j = 0; j < n; j += kLanes<T>) {
    Vec<T> x = load(p + j) + load(b + j);
    if constexpr (masked) x += load(m + j);
    const Vec<T> e = exp_lanes(x - li);
    store(p + j, e);
    dv += e * load(dp + j);
  }
  return hsum(dv);
}

// One thread's share of the forward: out (B_, N, H*D), lse (B_, H, N) for the tiles it takes from `queue`.
template <typename T>
ESVIT_TARGET void forward_tiles(const ForwardArgs<T>& a, TaskQueue& queue) {
  const WindowShape& s = a.s;
  const int64_t N = s.N, D = s.D, HD = s.H * s.D, row = 3 * HD;
  Scratch<T> t(N, D, a.copy_crowded);
  const int64_t Np = t.Np;
  for (TaskQueue::Cursor it(queue); it.task >= 0; it.advance()) {
    const int64_t b = it.task / s.H, h = it.task % s.H;
    const T* q = a.qkv + b * N * row + h * D;
    t.transpose_in(q + HD, row, t.kt);
    const auto [qa, lq] = t.operand(q, row, t.q);
    const auto [vb, lv] = t.operand(q + 2 * HD, row, t.v);
    gemm(qa, lq, int64_t(1), t.kt, Np, t.s, Np, N, D, Np, a.scale);          // S = scale q k^T
    const T* bh = a.bias() + h * N * Np;
    const T* mw = a.masks->nonzero(b);
    const T* q_next = it.next < 0 ? nullptr : a.qkv + (it.next / s.H) * N * row + (it.next % s.H) * D;
    for (int64_t i = 0; i < N; ++i) {                      // exp(S + bias + mask - max), row sums
      if (q_next) {                                        // the next tile's q, k, v and output rows
        for (int64_t part = 0; part < 3; ++part) prefetch_row(q_next + part * HD, row, i, D);
        prefetch_row<true>(a.out + (it.next / s.H) * N * HD + (it.next % s.H) * D, HD, i, D);
      }
      T* x = t.s + i * Np;
      const T m = mw ? add_row_max<true>(x, bh + i * Np, mw + i * Np, Np) : add_row_max<false>(x, bh + i * Np, mw, Np);
      Vec<T> sums{};
      for (int64_t j = 0; j < Np; j += kLanes<T>) {
        const Vec<T> e = exp_lanes(load(x + j) - m);
        store(x + j, e);
        sums += e;
      }
      t.rowmax[i] = m;
      t.inv[i] = hsum(sums);
    }
    for (int64_t i = 0; i < N; i += kLanes<T>) {           // lse = max + log(sum); 1 / sum applied in O
      const Vec<T> sum = load(t.inv.data() + i);
      store(t.lse.data() + i, load(t.rowmax.data() + i) + log_lanes(sum));
      store(t.inv.data() + i, T(1) / sum);
    }
    std::memcpy(a.lse + it.task * N, t.lse.data(), N * sizeof(T));
    T* o = a.out + b * N * HD + h * D;
    const auto [oc, lo] = t.result(o, HD);
    gemm(t.s, Np, int64_t(1), vb, lv, oc, lo, N, N, t.Dp, T(1), t.inv.data());  // O = P v / rowsum
    t.write_back(o, HD);
  }
}

// One thread's share of the backward: dqkv (B_, N, 3, H, D) of its tiles, their bias gradients summed into
// dbias (H, N, Np), this thread's own block (zero in the padding columns, whose dS is 0).
template <typename T>
ESVIT_TARGET void backward_tiles(const BackwardArgs<T>& a, TaskQueue& queue, T* dbias) {
  const WindowShape& s = a.s;
  const int64_t N = s.N, D = s.D, HD = s.H * s.D, row = 3 * HD;
  constexpr int L = kLanes<T>;
  Scratch<T> t(N, D, a.copy_crowded);
  const int64_t Np = t.Np, Dp = t.Dp;
  for (TaskQueue::Cursor it(queue); it.task >= 0; it.advance()) {
    const int64_t b = it.task / s.H, h = it.task % s.H;
    const T *q = a.qkv + b * N * row + h * D, *g = a.grad + b * N * HD + h * D;
    t.transpose_in(q + HD, row, t.kt);
    t.transpose_in(q + 2 * HD, row, t.vt);
    const auto [qa, lq] = t.operand(q, row, t.q);
    const auto [kb, lk] = t.operand(q + HD, row, t.k);
    const auto [ga, lg] = t.operand(g, HD, t.g);
    gemm(qa, lq, int64_t(1), t.kt, Np, t.p, Np, N, D, Np, a.scale);        // S again; P = exp(S - lse) below
    const T* bh = a.bias() + h * N * Np;
    const T* mw = a.masks->nonzero(b);
    const T* l = a.lse + it.task * N;
    const int64_t bn = it.next / s.H, hn = it.next % s.H;
    gemm(ga, lg, int64_t(1), t.vt, Np, t.s, Np, N, D, Np, T(1));           // dP = dO v^T
    T* db = dbias + h * N * Np;
    for (int64_t i = 0; i < N; ++i) {                                        // P, then dS = P (dP - delta)
      if (it.next >= 0) {                                       // the next tile's q, k, v, dO and dq, dk, dv rows
        for (int64_t part = 0; part < 3; ++part) {
          prefetch_row(a.qkv + bn * N * row + part * HD + hn * D, row, i, D);
          prefetch_row<true>(a.dqkv + bn * N * row + part * HD + hn * D, row, i, D);
        }
        prefetch_row(a.grad + bn * N * HD + hn * D, HD, i, D);
      }
      T* ds = t.s + i * Np;
      T* p = t.p + i * Np;
      // delta_i = rowsum(dO * O)_i = sum_j P_ij dP_ij: O itself is not read
      const T delta = mw ? probs_and_delta<true>(p, ds, bh + i * Np, mw + i * Np, l[i], Np)
                         : probs_and_delta<false>(p, ds, bh + i * Np, mw, l[i], Np);
      const Vec<T> di = Vec<T>{} + delta;
      T* dbi = db + i * Np;
      for (int64_t j = 0; j < Np; j += L) {
        const Vec<T> d = load(p + j) * (load(ds + j) - di);
        store(ds + j, d);
        store(dbi + j, load(dbi + j) + d);
      }
    }
    T* dq = a.dqkv + b * N * row + h * D;
    auto [c, lc] = t.result(dq, row);
    gemm(t.s, Np, int64_t(1), kb, lk, c, lc, N, N, Dp, a.scale);            // dQ = scale dS k
    t.write_back(dq, row);
    std::tie(c, lc) = t.result(dq + HD, row);
    gemm(t.s, int64_t(1), Np, qa, lq, c, lc, N, N, Dp, a.scale);            // dK = scale dS^T q
    t.write_back(dq + HD, row);
    std::tie(c, lc) = t.result(dq + 2 * HD, row);
    gemm(t.p, int64_t(1), Np, ga, lg, c, lc, N, N, Dp, T(1));               // dV = P^T dO
    t.write_back(dq + 2 * HD, row);
  }
}

template <typename T>
constexpr int64_t lanes() { return kLanes<T>; }

#undef ESVIT_INLINE
