// Fused window attention on the CPU: forward and backward, one (window, head) tile per task, OpenMP over
// tiles (dynamic schedule: robust to a busy core). A tile's N x N scores live in a per-thread scratch buffer (56 x 56 for W=7, 200 x 200 for W=14), never
// in a (B_, H, N, N) tensor; the backward recomputes them from q, k and the saved log-sum-exp. The small
// matrix products run a register-blocked 4 x 8 kernel on zero-padded tiles (vectorised by the compiler).
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
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

inline int64_t round8(int64_t n) { return (n + 7) / 8 * 8; }

// Additive score terms of every (window, head), computed once per call: bm (nW, H, N, Np) =
// table[rel_index[i, j], h] + shift mask of window w; -inf for padded keys and padding columns j >= N.
template <typename T>
std::vector<T> bias_mask(const T* table, const int64_t* rel, const int32_t* region, const WindowShape& s,
                         int64_t Np) {
  const int64_t N = s.N, H = s.H;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> bm(s.nW * H * N * Np, neg_inf);
  for (int64_t w = 0; w < s.nW; ++w) {
    const int32_t* r = region ? region + w * N : nullptr;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < N; ++i) {
        T* row = bm.data() + ((w * H + h) * N + i) * Np;
        for (int64_t j = 0; j < N; ++j) {
          if (r && r[j] < 0) continue;  // padded key: stays -inf
          row[j] = table[rel[i * N + j] * H + h] + (r && r[i] >= 0 && r[i] != r[j] ? T(-100) : T(0));
        }
      }
  }
  return bm;
}

// S[i, :] += bm[i, :] for the N real rows (leading dim Np for both).
template <typename T>
void add_bias_mask(T* S, const T* bm, int64_t N, int64_t Np) {
  for (int64_t i = 0; i < N; ++i) {
#pragma omp simd
    for (int64_t j = 0; j < Np; ++j) S[i * Np + j] += bm[i * Np + j];
  }
}

// C (M x Nc) = alpha * A (M x K) @ B (K x Nc); row-major with leading dims lda, ldb, ldc; M % 4 == 0 and
// Nc % 8 == 0 (the tiles are zero-padded). A 4-row x 32-byte block of C stays in registers over the K loop
// (GCC vector extensions: AVX2 with -mavx2, pairs of SSE registers otherwise).
template <typename T>
void gemm(const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t M, int64_t K, int64_t Nc,
          T alpha) {
  typedef T V __attribute__((vector_size(32)));
  constexpr int L = 32 / sizeof(T);  // 8 floats or 4 doubles
  for (int64_t i = 0; i < M; i += 4)
    for (int64_t j = 0; j < Nc; j += L) {
      V c0 = {}, c1 = {}, c2 = {}, c3 = {};
      const T *a0 = A + i * lda, *a1 = a0 + lda, *a2 = a1 + lda, *a3 = a2 + lda;
      for (int64_t k = 0; k < K; ++k) {
        V b;
        std::memcpy(&b, B + k * ldb + j, sizeof(V));
        c0 += a0[k] * b;
        c1 += a1[k] * b;
        c2 += a2[k] * b;
        c3 += a3[k] * b;
      }
      c0 *= alpha, c1 *= alpha, c2 *= alpha, c3 *= alpha;
      std::memcpy(C + i * ldc + j, &c0, sizeof(V));
      std::memcpy(C + (i + 1) * ldc + j, &c1, sizeof(V));
      std::memcpy(C + (i + 2) * ldc + j, &c2, sizeof(V));
      std::memcpy(C + (i + 3) * ldc + j, &c3, sizeof(V));
    }
}

// Bt (cols x rows) = A (rows x cols), both with leading dim ld.
template <typename T>
void transpose(const T* A, T* Bt, int64_t n, int64_t ld) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) Bt[j * ld + i] = A[i * ld + j];
}

// Per-thread tiles of one (window, head), zero-padded to Np = round8(N) rows/keys and Dp = round8(D) channels.
template <typename T>
struct Tile {
  int64_t N, D, Np, Dp;
  std::vector<T> buf;
  T *Q, *K, *Kt, *V, *Vt, *G, *S, *P, *St, *Pt, *dQ, *dK, *dV;
  Tile(int64_t n, int64_t d) : N(n), D(d), Np(round8(n)), Dp(round8(d)) {
    const int64_t nd = Np * Dp, nn = Np * Np;
    buf.assign(9 * nd + 4 * nn, T(0));
    T* p = buf.data();
    for (T** t : {&Q, &K, &Kt, &V, &Vt, &G, &dQ, &dK, &dV}) *t = p, p += nd;
    for (T** t : {&S, &P, &St, &Pt}) *t = p, p += nn;
  }
  // q, k, v of tile (b, h) from the (B_, N, 3, H, D) layout; Kt and Vt are (Dp, Np).
  void load(const T* qkv, int64_t b, int64_t h, int64_t H) {
    const int64_t row = 3 * H * D;
    for (int64_t n = 0; n < N; ++n) {
      const T* base = qkv + (b * N + n) * row + h * D;
      for (int64_t d = 0; d < D; ++d) {
        Q[n * Dp + d] = base[d];
        K[n * Dp + d] = Kt[d * Np + n] = base[H * D + d];
        V[n * Dp + d] = Vt[d * Np + n] = base[2 * H * D + d];
      }
    }
  }
};

// Forward over all tiles: out (B_, N, H*D), lse (B_, H, N).
template <typename T>
void forward_impl(const WindowShape& s, const T* qkv, const T* bm, T scale, T* out, T* lse) {
  const int64_t N = s.N, D = s.D;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    Tile<T> t(N, D);
    const int64_t Np = t.Np, Dp = t.Dp;
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < s.B * s.H; ++task) {
      const int64_t b = task / s.H, h = task % s.H;
      t.load(qkv, b, h, s.H);
      gemm(t.Q, Dp, t.Kt, Np, t.S, Np, Np, Dp, Np, scale);                   // S = scale q k^T
      add_bias_mask(t.S, bm + ((b % s.nW) * s.H + h) * N * Np, N, Np);
      T* l = lse + task * N;
      for (int64_t i = 0; i < N; ++i) {                                        // P = softmax(S) row by row
        T* p = t.S + i * Np;
        T m = -std::numeric_limits<T>::infinity();
        for (int64_t j = 0; j < N; ++j) m = std::max(m, p[j]);
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < Np; ++j) {
          p[j] = exp_vec(p[j] - m);
          sum += p[j];
        }
        l[i] = m + std::log(sum);
        const T inv = T(1) / sum;
#pragma omp simd
        for (int64_t j = 0; j < Np; ++j) p[j] *= inv;
      }
      gemm(t.S, Np, t.V, Dp, t.dQ, Dp, Np, Np, Dp, T(1));                     // O = P v (rows >= N unused)
      for (int64_t n = 0; n < N; ++n)
        std::copy(t.dQ + n * Dp, t.dQ + n * Dp + D, out + (b * N + n) * s.H * D + h * D);
    }
  }
}

// Backward over all tiles: dqkv (B_, N, 3, H, D) and per-thread dbias (threads, H, N, N).
template <typename T>
void backward_impl(const WindowShape& s, const T* qkv, const T* grad, const T* out, const T* lse, const T* bm,
                   T scale, T* dqkv, T* dbias_threads) {
  const int64_t N = s.N, D = s.D, row = 3 * s.H * s.D;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    Tile<T> t(N, D);
    const int64_t Np = t.Np, Dp = t.Dp;
    std::vector<T> delta(N);
    T* dbias = dbias_threads + omp_get_thread_num() * s.H * N * N;
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < s.B * s.H; ++task) {
      const int64_t b = task / s.H, h = task % s.H;
      t.load(qkv, b, h, s.H);
      for (int64_t n = 0; n < N; ++n) {                                        // dO and delta = rowsum(dO * O)
        const T* g = grad + (b * N + n) * s.H * D + h * D;
        const T* o = out + (b * N + n) * s.H * D + h * D;
        T dl = 0;
        for (int64_t d = 0; d < D; ++d) t.G[n * Dp + d] = g[d], dl += g[d] * o[d];
        delta[n] = dl;
      }
      gemm(t.Q, Dp, t.Kt, Np, t.P, Np, Np, Dp, Np, scale);                   // P = exp(S - lse), recomputed
      add_bias_mask(t.P, bm + ((b % s.nW) * s.H + h) * N * Np, N, Np);
      const T* l = lse + task * N;
      for (int64_t i = 0; i < Np; ++i) {
        T* p = t.P + i * Np;
        const T li = i < N ? l[i] : std::numeric_limits<T>::infinity();      // padding rows -> 0
#pragma omp simd
        for (int64_t j = 0; j < Np; ++j) p[j] = exp_vec(p[j] - li);
      }
      gemm(t.G, Dp, t.Vt, Np, t.S, Np, Np, Dp, Np, T(1));                    // dP = dO v^T
      T* db = dbias + h * N * N;
      for (int64_t i = 0; i < N; ++i) {                                        // dS = P (dP - delta)
        T* ds = t.S + i * Np;
        const T* p = t.P + i * Np;
        const T di = delta[i];
#pragma omp simd
        for (int64_t j = 0; j < Np; ++j) ds[j] = p[j] * (ds[j] - di);
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) db[i * N + j] += ds[j];
      }
      std::fill(t.S + N * Np, t.S + Np * Np, T(0));
      transpose(t.S, t.St, Np, Np);
      transpose(t.P, t.Pt, Np, Np);
      gemm(t.S, Np, t.K, Dp, t.dQ, Dp, Np, Np, Dp, scale);                   // dQ = scale dS k
      gemm(t.St, Np, t.Q, Dp, t.dK, Dp, Np, Np, Dp, scale);                  // dK = scale dS^T q
      gemm(t.Pt, Np, t.G, Dp, t.dV, Dp, Np, Np, Dp, T(1));                   // dV = P^T dO
      for (int64_t n = 0; n < N; ++n) {
        T* base = dqkv + (b * N + n) * row + h * D;
        std::copy(t.dQ + n * Dp, t.dQ + n * Dp + D, base);
        std::copy(t.dK + n * Dp, t.dK + n * Dp + D, base + s.H * D);
        std::copy(t.dV + n * Dp, t.dV + n * Dp + D, base + 2 * s.H * D);
      }
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
  at::Tensor out = at::empty({s.B, s.N, s.H * s.D}, qkv.options());
  at::Tensor lse = at::empty({s.B, s.H, s.N}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_forward_cpu", [&] {
    const std::vector<scalar_t> bm = bias_mask(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(),
                                               region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr, s,
                                               round8(s.N));
    forward_impl<scalar_t>(s, qkv.data_ptr<scalar_t>(), bm.data(), static_cast<scalar_t>(scale),
                           out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
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
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty_like(qkv);
  const int nthreads = at::get_num_threads();
  at::Tensor dbias_threads = at::zeros({nthreads, s.H, s.N, s.N}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES(qkv.scalar_type(), "window_attention_backward_cpu", [&] {
    const std::vector<scalar_t> bm = bias_mask(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(),
                                               region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr, s,
                                               round8(s.N));
    backward_impl<scalar_t>(s, qkv.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            lse.data_ptr<scalar_t>(), bm.data(), static_cast<scalar_t>(scale),
                            dqkv.data_ptr<scalar_t>(), dbias_threads.data_ptr<scalar_t>());
  });
  return {dqkv, dbias_threads.sum(0)};
}

}  // namespace esvit
