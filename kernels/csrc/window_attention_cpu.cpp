// Fused window attention on the CPU: forward and backward, one (window, head) tile per task, OpenMP over
// tiles. A tile's N x N scores live in a per-thread scratch buffer (<= 196 x 196 floats for W=14), never in
// a (B_, H, N, N) tensor; the backward recomputes them from q, k and the saved log-sum-exp.
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
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

// bias (H, N, N) = table[rel_index] permuted, as the accumulation type.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> gather_bias(const scalar_t* table, const int64_t* rel, const WindowShape& s) {
  std::vector<acc_t> bias(s.H * s.N * s.N);
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t ij = 0; ij < s.N * s.N; ++ij) bias[h * s.N * s.N + ij] = static_cast<acc_t>(table[rel[ij] * s.H + h]);
  return bias;
}

// scores (N, N) = bias + mask of window w (before q k^T is added).
template <typename acc_t>
void init_scores(acc_t* S, const acc_t* bias_h, const int32_t* region, int64_t w, int64_t N) {
  std::copy(bias_h, bias_h + N * N, S);
  if (region == nullptr) return;
  const int32_t* r = region + w * N;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < N; ++j) {
      if (r[j] < 0) S[i * N + j] = neg_inf;
      else if (r[i] >= 0 && r[i] != r[j]) S[i * N + j] += acc_t(-100);
    }
}

// Copies q, k, v of tile (b, h) out of the (B_, N, 3, H, D) layout: Q, V (N, D) and Kt (D, N).
template <typename acc_t, typename scalar_t>
void load_tile(const scalar_t* qkv, int64_t b, int64_t h, const WindowShape& s, acc_t* Q, acc_t* Kt, acc_t* V) {
  const int64_t row = 3 * s.H * s.D;
  for (int64_t n = 0; n < s.N; ++n) {
    const scalar_t* base = qkv + (b * s.N + n) * row + h * s.D;
    for (int64_t d = 0; d < s.D; ++d) {
      Q[n * s.D + d] = base[d];
      Kt[d * s.N + n] = base[s.H * s.D + d];
      V[n * s.D + d] = base[2 * s.H * s.D + d];
    }
  }
}

// S (N, N) += scale * A (N, D) @ Bt (D, N)
template <typename acc_t>
void add_scaled_abt(acc_t* S, const acc_t* A, const acc_t* Bt, acc_t scale, int64_t N, int64_t D) {
  for (int64_t i = 0; i < N; ++i) {
    acc_t* s = S + i * N;
    for (int64_t d = 0; d < D; ++d) {
      const acc_t a = A[i * D + d] * scale;
      const acc_t* bt = Bt + d * N;
#pragma omp simd
      for (int64_t j = 0; j < N; ++j) s[j] += a * bt[j];
    }
  }
}

// One tile forward: O (N, D) and lse (N) from Q, Kt, V and the scores' bias + mask (already in S).
template <typename acc_t>
void tile_forward(acc_t* S, const acc_t* Q, const acc_t* Kt, const acc_t* V, acc_t scale, int64_t N, int64_t D,
                  acc_t* O, acc_t* lse) {
  add_scaled_abt(S, Q, Kt, scale, N, D);
  for (int64_t i = 0; i < N; ++i) {
    acc_t* p = S + i * N;
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    for (int64_t j = 0; j < N; ++j) m = std::max(m, p[j]);
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < N; ++j) {
      p[j] = exp_vec(p[j] - m);
      sum += p[j];
    }
    lse[i] = m + std::log(sum);
    const acc_t inv = acc_t(1) / sum;
    acc_t* o = O + i * D;
    std::fill(o, o + D, acc_t(0));
    for (int64_t j = 0; j < N; ++j) {
      const acc_t pj = p[j] * inv;
      const acc_t* v = V + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) o[d] += pj * v[d];
    }
  }
}

template <typename scalar_t>
void backward_impl(const WindowShape& s, const at::Tensor& qkv, const at::Tensor& grad, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& table, const at::Tensor& rel, const at::Tensor& region,
                   double scale, at::Tensor& dqkv, at::Tensor& dbias_threads) {
  using acc_t = scalar_t;
  const scalar_t *qkv_p = qkv.data_ptr<scalar_t>(), *g_p = grad.data_ptr<scalar_t>();
  const scalar_t *o_p = out.data_ptr<scalar_t>(), *lse_p = lse.data_ptr<scalar_t>();
  const std::vector<acc_t> bias = gather_bias<acc_t>(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(), s);
  const int32_t* reg = region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr;
  scalar_t* dqkv_p = dqkv.data_ptr<scalar_t>();
  scalar_t* dbias_all = dbias_threads.data_ptr<scalar_t>();
  const int64_t N = s.N, D = s.D, row = 3 * s.H * s.D;
  const acc_t sc = static_cast<acc_t>(scale);
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    acc_t* dbias = dbias_all + at::get_thread_num() * s.H * N * N;
    std::vector<acc_t> buf(9 * N * D + 2 * N * N + N);
    acc_t *Q = buf.data(), *Kt = Q + N * D, *V = Kt + N * D, *G = V + N * D, *Vt = G + N * D;
    acc_t *dQ = Vt + N * D, *dK = dQ + N * D, *dV = dK + N * D, *P = dV + N * D, *dS = P + N * N;
    acc_t *delta = dS + N * N, *K = delta + N;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / s.H, h = t % s.H;
      load_tile(qkv_p, b, h, s, Q, Kt, V);
      for (int64_t n = 0; n < N; ++n) {
        const scalar_t* g = g_p + (b * N + n) * s.H * D + h * D;
        const scalar_t* o = o_p + (b * N + n) * s.H * D + h * D;
        acc_t dlt = 0;
        for (int64_t d = 0; d < D; ++d) {
          G[n * D + d] = g[d];
          Vt[d * N + n] = V[n * D + d];
          K[n * D + d] = Kt[d * N + n];
          dlt += static_cast<acc_t>(g[d]) * static_cast<acc_t>(o[d]);
        }
        delta[n] = dlt;
      }
      // P = exp(scale q k^T + bias + mask - lse)
      init_scores(P, bias.data() + h * N * N, reg, b % s.nW, N);
      add_scaled_abt(P, Q, Kt, sc, N, D);
      const scalar_t* l = lse_p + t * N;
      for (int64_t i = 0; i < N; ++i) {
        const acc_t li = l[i];
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) P[i * N + j] = exp_vec(P[i * N + j] - li);
      }
      // dS = P * (dO v^T - delta)
      std::fill(dS, dS + N * N, acc_t(0));
      add_scaled_abt(dS, G, Vt, acc_t(1), N, D);
      acc_t* db = dbias + h * N * N;
      for (int64_t i = 0; i < N; ++i) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) {
          const acc_t ds = P[i * N + j] * (dS[i * N + j] - delta[i]);
          dS[i * N + j] = ds;
          db[i * N + j] += ds;
        }
      }
      // dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO
      std::fill(dQ, dQ + 3 * N * D, acc_t(0));
      for (int64_t i = 0; i < N; ++i) {
        acc_t* dq = dQ + i * D;
        const acc_t* q = Q + i * D;
        const acc_t* g = G + i * D;
        const acc_t* kk = K;
        for (int64_t j = 0; j < N; ++j) {
          const acc_t ds = dS[i * N + j] * sc, p = P[i * N + j];
          acc_t* dk = dK + j * D;
          acc_t* dv = dV + j * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) {
            dq[d] += ds * kk[j * D + d];
            dk[d] += ds * q[d];
            dv[d] += p * g[d];
          }
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        scalar_t* base = dqkv_p + (b * N + n) * row + h * D;
        std::copy(dQ + n * D, dQ + (n + 1) * D, base);
        std::copy(dK + n * D, dK + (n + 1) * D, base + s.H * D);
        std::copy(dV + n * D, dV + (n + 1) * D, base + 2 * s.H * D);
      }
    }
  });
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
    using acc_t = scalar_t;
    const scalar_t* qkv_p = qkv.data_ptr<scalar_t>();
    const std::vector<acc_t> bias = gather_bias<acc_t>(table.data_ptr<scalar_t>(), rel.data_ptr<int64_t>(), s);
    const int32_t* reg = region.numel() > 0 ? region.data_ptr<int32_t>() : nullptr;
    scalar_t* out_p = out.data_ptr<scalar_t>();
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(3 * s.N * s.D + s.N * s.N + s.N * s.D);
      acc_t *Q = buf.data(), *Kt = Q + s.N * s.D, *V = Kt + s.N * s.D, *S = V + s.N * s.D, *O = S + s.N * s.N;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / s.H, h = t % s.H;
        load_tile(qkv_p, b, h, s, Q, Kt, V);
        init_scores(S, bias.data() + h * s.N * s.N, reg, b % s.nW, s.N);
        tile_forward(S, Q, Kt, V, static_cast<acc_t>(scale), s.N, s.D, O, lse_p + t * s.N);
        for (int64_t n = 0; n < s.N; ++n)
          std::copy(O + n * s.D, O + (n + 1) * s.D, out_p + (b * s.N + n) * s.H * s.D + h * s.D);
      }
    });
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
    backward_impl<scalar_t>(s, qkv, grad, out, lse, table, rel, region, scale, dqkv, dbias_threads);
  });
  return {dqkv, dbias_threads.sum(0)};
}

}  // namespace esvit
