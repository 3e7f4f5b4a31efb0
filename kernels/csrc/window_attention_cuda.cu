// Fused window attention on the GPU. One thread block per (window, head); k and v of the window in shared
// memory; one thread per query row with an online softmax over the keys, so no score matrix is stored.
// The backward recomputes the probabilities from the saved log-sum-exp: pass 1 over query rows (dq and the
// bias gradient), pass 2 over key rows (dk, dv). Storage fp32 / fp16 / bf16, arithmetic in fp32.
#include <limits>

#include "cuda_utils.cuh"
#include "ops.h"

namespace esvit {
namespace {

constexpr int kThreads = 128;

// Additive score term of (i, j): bias + shift mask; returns false for an excluded (padded) key.
__device__ __forceinline__ bool score_bias(const float* bias_h, const int* reg, int N, int i, int j, float& add) {
  add = bias_h[i * N + j];
  if (reg == nullptr) return true;
  if (reg[j] < 0) return false;
  if (reg[i] >= 0 && reg[i] != reg[j]) add -= 100.f;
  return true;
}

// Loads rows of one head (rows n of the (B_, N, 3, H, D) tensor, part `which`) into shared memory as float.
template <typename scalar_t, int D>
__device__ void load_rows(float* dst, const scalar_t* qkv, int64_t b, int h, int which, int N, int H) {
  const int64_t row = 3LL * H * D;
  for (int e = threadIdx.x; e < N * D; e += blockDim.x) {
    const int n = e / D, d = e % D;
    dst[e] = to_float(qkv[(b * N + n) * row + (int64_t)which * H * D + (int64_t)h * D + d]);
  }
}

template <typename scalar_t, int D>
__global__ void forward_kernel(const scalar_t* __restrict__ qkv, const float* __restrict__ bias,
                               const int* __restrict__ region, scalar_t* __restrict__ out, float* __restrict__ lse,
                               int N, int H, int nW, float scale) {
  extern __shared__ float smem[];
  float* Ks = smem;            // (N, D)
  float* Vs = Ks + N * D;      // (N, D)
  int* reg = reinterpret_cast<int*>(Vs + N * D);  // (N)
  const int64_t t = blockIdx.x, b = t / H;
  const int h = t % H;
  load_rows<scalar_t, D>(Ks, qkv, b, h, 1, N, H);
  load_rows<scalar_t, D>(Vs, qkv, b, h, 2, N, H);
  const int* reg_w = nullptr;
  if (region != nullptr) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) reg[n] = region[(b % nW) * N + n];
    reg_w = reg;
  }
  __syncthreads();
  const float* bias_h = bias + (int64_t)h * N * N;
  const int64_t row = 3LL * H * D;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    float q[D], acc[D];
    const scalar_t* qp = qkv + (b * N + i) * row + (int64_t)h * D;
#pragma unroll
    for (int d = 0; d < D; ++d) q[d] = to_float(qp[d]) * scale, acc[d] = 0.f;
    float m = -INFINITY, l = 0.f;
    for (int j = 0; j < N; ++j) {
      float s;
      if (!score_bias(bias_h, reg_w, N, i, j, s)) continue;
#pragma unroll
      for (int d = 0; d < D; ++d) s += q[d] * Ks[j * D + d];
      const float m_new = fmaxf(m, s);
      const float corr = __expf(m - m_new), p = __expf(s - m_new);
      l = l * corr + p;
#pragma unroll
      for (int d = 0; d < D; ++d) acc[d] = acc[d] * corr + p * Vs[j * D + d];
      m = m_new;
    }
    const float inv = 1.f / l;
    scalar_t* op = out + (b * N + i) * (int64_t)H * D + (int64_t)h * D;
#pragma unroll
    for (int d = 0; d < D; ++d) op[d] = from_float<scalar_t>(acc[d] * inv);
    lse[t * N + i] = m + logf(l);
  }
}

template <typename scalar_t, int D>
__global__ void backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ qkv,
                                const scalar_t* __restrict__ out, const float* __restrict__ lse,
                                const float* __restrict__ bias, const int* __restrict__ region,
                                scalar_t* __restrict__ dqkv, float* __restrict__ dbias, int N, int H, int nW,
                                float scale) {
  extern __shared__ float smem[];
  float* Qs = smem;            // (N, D) q * scale
  float* Ks = Qs + N * D;      // (N, D)
  float* Vs = Ks + N * D;      // (N, D)
  float* Gs = Vs + N * D;      // (N, D) dO
  float* Ls = Gs + N * D;      // (N) lse
  float* delta = Ls + N;       // (N) rowsum(dO * O)
  int* reg = reinterpret_cast<int*>(delta + N);
  const int64_t t = blockIdx.x, b = t / H;
  const int h = t % H;
  const int64_t row = 3LL * H * D;
  load_rows<scalar_t, D>(Qs, qkv, b, h, 0, N, H);
  load_rows<scalar_t, D>(Ks, qkv, b, h, 1, N, H);
  load_rows<scalar_t, D>(Vs, qkv, b, h, 2, N, H);
  for (int e = threadIdx.x; e < N * D; e += blockDim.x) {
    Qs[e] *= scale;
    Gs[e] = to_float(grad[(b * N + e / D) * (int64_t)H * D + (int64_t)h * D + e % D]);
  }
  const int* reg_w = nullptr;
  if (region != nullptr) {
    for (int n = threadIdx.x; n < N; n += blockDim.x) reg[n] = region[(b % nW) * N + n];
    reg_w = reg;
  }
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const scalar_t* op = out + (b * N + i) * (int64_t)H * D + (int64_t)h * D;
    const scalar_t* gp = grad + (b * N + i) * (int64_t)H * D + (int64_t)h * D;
    float dl = 0.f;
    for (int d = 0; d < D; ++d) dl += to_float(gp[d]) * to_float(op[d]);
    delta[i] = dl;
    Ls[i] = lse[t * N + i];
  }
  __syncthreads();
  const float* bias_h = bias + (int64_t)h * N * N;
  float* dbias_h = dbias + (int64_t)h * N * N;
  // pass 1, query rows: dq_i = scale * sum_j ds_ij k_j ; dbias[h, i, j] += ds_ij
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    float dq[D];
#pragma unroll
    for (int d = 0; d < D; ++d) dq[d] = 0.f;
    for (int j = 0; j < N; ++j) {
      float s;
      if (!score_bias(bias_h, reg_w, N, i, j, s)) continue;
      float dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) s += Qs[i * D + d] * Ks[j * D + d], dp += Gs[i * D + d] * Vs[j * D + d];
      const float ds = __expf(s - Ls[i]) * (dp - delta[i]);
      atomicAdd(dbias_h + i * N + j, ds);
#pragma unroll
      for (int d = 0; d < D; ++d) dq[d] += ds * Ks[j * D + d];
    }
    scalar_t* dp_ = dqkv + (b * N + i) * row + (int64_t)h * D;
#pragma unroll
    for (int d = 0; d < D; ++d) dp_[d] = from_float<scalar_t>(dq[d] * scale);
  }
  // pass 2, key rows: dk_j = sum_i ds_ij (scale q_i) ; dv_j = sum_i p_ij dO_i
  for (int j = threadIdx.x; j < N; j += blockDim.x) {
    float dk[D], dv[D];
#pragma unroll
    for (int d = 0; d < D; ++d) dk[d] = 0.f, dv[d] = 0.f;
    for (int i = 0; i < N; ++i) {
      float s;
      if (!score_bias(bias_h, reg_w, N, i, j, s)) continue;
      float dp = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) s += Qs[i * D + d] * Ks[j * D + d], dp += Gs[i * D + d] * Vs[j * D + d];
      const float p = __expf(s - Ls[i]), ds = p * (dp - delta[i]);
#pragma unroll
      for (int d = 0; d < D; ++d) dk[d] += ds * Qs[i * D + d], dv[d] += p * Gs[i * D + d];
    }
    scalar_t* base = dqkv + (b * N + j) * row + (int64_t)h * D;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      base[(int64_t)H * D + d] = from_float<scalar_t>(dk[d]);
      base[2LL * H * D + d] = from_float<scalar_t>(dv[d]);
    }
  }
}

// bias (H, N, N) float = table[rel_index] permuted (a few KB; the kernels read it through the cache).
at::Tensor gather_bias(const at::Tensor& table, const at::Tensor& rel_index, int64_t N, int64_t H) {
  return table.to(at::kFloat).index_select(0, rel_index.reshape(-1)).view({N, N, H}).permute({2, 0, 1}).contiguous();
}

template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: TORCH_CHECK(false, "window_attention (cuda): head dim ", D, " not compiled (16, 32, 64)");
  }
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
}

// dbias (H, N, N) -> dtable (T, H) in dbias's dtype (float32 even for fp16 / bf16 tables):
// dtable[rel_index[i, j], h] += dbias[h, i, j]
at::Tensor scatter_bias_grad(const at::Tensor& dbias, const at::Tensor& rel_index, const at::Tensor& table) {
  const int64_t N = rel_index.size(0), H = table.size(1);
  return at::zeros(table.sizes(), dbias.options())
      .index_add_(0, rel_index.reshape(-1), dbias.permute({1, 2, 0}).reshape({N * N, H}));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_forward_cuda(
    const at::Tensor& qkv_in, const at::Tensor& table, const at::Tensor& rel_index, const at::Tensor& region_in,
    int64_t num_heads, double scale) {
  const WindowShape s = check_window_attention(qkv_in, table, rel_index, region_in, num_heads);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous(), region = region_in.contiguous();
  const at::Tensor bias = gather_bias(table, rel_index, s.N, s.H);
  at::Tensor out = at::empty({s.B, s.N, s.H * s.D}, qkv.options());
  at::Tensor lse = at::empty({s.B, s.H, s.N}, qkv.options().dtype(at::kFloat));
  if (s.B == 0) return {out, lse};
  const size_t smem = (2 * s.N * s.D + s.N) * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_forward_cuda", [&] {
    dispatch_head_dim(s.D, [&](auto d) {
      constexpr int D = decltype(d)::value;
      auto kernel = forward_kernel<scalar_t, D>;
      allow_smem(kernel, smem);
      kernel<<<s.B * s.H, kThreads, smem, stream>>>(
          qkv.data_ptr<scalar_t>(), bias.data_ptr<float>(), region.numel() ? region.data_ptr<int>() : nullptr,
          out.data_ptr<scalar_t>(), lse.data_ptr<float>(), s.N, s.H, s.nW, static_cast<float>(scale));
      check_launch();
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& qkv_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& table, const at::Tensor& rel_index, const at::Tensor& region_in, int64_t num_heads,
    double scale) {
  const WindowShape s = check_window_attention(qkv_in, table, rel_index, region_in, num_heads);
  const c10::cuda::CUDAGuard guard(qkv_in.device());
  const at::Tensor qkv = qkv_in.contiguous(), region = region_in.contiguous();
  const at::Tensor grad = grad_in.contiguous().to(qkv.scalar_type()), out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous().to(at::kFloat);
  const at::Tensor bias = gather_bias(table, rel_index, s.N, s.H);
  at::Tensor dqkv = at::empty_like(qkv);
  at::Tensor dbias = at::zeros({s.H, s.N, s.N}, qkv.options().dtype(at::kFloat));
  if (s.B == 0) return {dqkv.zero_(), scatter_bias_grad(dbias, rel_index, table)};   // zeros, float32 as below
  const size_t smem = (4 * s.N * s.D + 3 * s.N) * sizeof(float);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qkv.scalar_type(), "window_attention_backward_cuda", [&] {
    dispatch_head_dim(s.D, [&](auto d) {
      constexpr int D = decltype(d)::value;
      auto kernel = backward_kernel<scalar_t, D>;
      allow_smem(kernel, smem);
      kernel<<<s.B * s.H, kThreads, smem, stream>>>(
          grad.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
          bias.data_ptr<float>(), region.numel() ? region.data_ptr<int>() : nullptr, dqkv.data_ptr<scalar_t>(),
          dbias.data_ptr<float>(), s.N, s.H, s.nW, static_cast<float>(scale));
      check_launch();
    });
  });
  return {dqkv, scatter_bias_grad(dbias, rel_index, table)};
}

}  // namespace esvit
