// Region matching on the GPU.
//   region_argmax: one block per student token; each warp scores teacher tokens (cosine via a warp reduction),
//     the block keeps only the best index: no similarity matrix.
//   matched_ce: one block per (student row, target); an online log-sum-exp over K and the sums against the
//     teacher row of that target, read in place. Backward: one elementwise pass writing dL/dlogits over all the
//     targets of a row; the output may be the logits themselves (each element is read before it is written).
#include <limits>

#include "cuda_utils.cuh"
#include "ops.h"

namespace esvit {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

template <typename scalar_t>
__global__ void argmax_kernel(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
                              int64_t* __restrict__ index, int Ls, int Lt, int C) {
  __shared__ float best_sim[kWarps];
  __shared__ int best_idx[kWarps];
  const int64_t r = blockIdx.x, n = r / Ls;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const scalar_t* s = student + r * C;
  float my_sim = -INFINITY;
  int my_idx = Lt;
  for (int j = warp; j < Lt; j += kWarps) {  // increasing j per warp: the first maximum is kept
    const scalar_t* t = teacher + (n * Lt + j) * C;
    float dot = 0.f, tt = 0.f;
    for (int c = lane; c < C; c += 32) {
      const float tv = to_float(t[c]);
      dot += to_float(s[c]) * tv;
      tt += tv * tv;
    }
    dot = warp_sum(dot);
    tt = warp_sum(tt);
    const float sim = dot / fmaxf(sqrtf(tt), 1e-12f);
    if (sim > my_sim) my_sim = sim, my_idx = j;
  }
  if (lane == 0) best_sim[warp] = my_sim, best_idx[warp] = my_idx;
  __syncthreads();
  if (threadIdx.x == 0) {
    float bs = best_sim[0];
    int bi = best_idx[0];
    for (int w = 1; w < kWarps; ++w)
      if (best_sim[w] > bs || (best_sim[w] == bs && best_idx[w] < bi)) bs = best_sim[w], bi = best_idx[w];
    index[r] = bi < Lt ? bi : 0;
  }
}

// Merges the online log-sum-exp state (m, l): sum exp(x - m) = l.
__device__ __forceinline__ void lse_merge(float& m, float& l, float m2, float l2) {
  if (m2 == -INFINITY) return;
  if (m == -INFINITY) { m = m2; l = l2; return; }
  const float mn = fmaxf(m, m2);
  l = l * __expf(m - mn) + l2 * __expf(m2 - mn);
  m = mn;
}

// Block (r, j): row r against its target j; block (r, 0) also writes lse[r].
template <typename scalar_t, typename prob_t>
__global__ void ce_forward_kernel(const scalar_t* __restrict__ logits, const prob_t* __restrict__ probs,
                                  const int64_t* __restrict__ rows, float* __restrict__ loss,
                                  float* __restrict__ lse_out, float* __restrict__ tsum_out, int64_t R, int64_t K,
                                  float inv_t) {
  __shared__ float sh_m[kThreads], sh_l[kThreads], sh_st[kThreads], sh_sts[kThreads];
  const int64_t r = blockIdx.x, jr = blockIdx.y * R + r;
  const scalar_t* s = logits + r * K;
  const prob_t* t = probs + rows[jr] * K;
  float m = -INFINITY, l = 0.f, st = 0.f, sts = 0.f;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const float x = to_float(s[k]) * inv_t, tk = to_float(t[k]);
    if (x > m) { l = l * __expf(m - x) + 1.f; m = x; }
    else l += __expf(x - m);
    st += tk;
    sts += tk * x;
  }
  sh_m[threadIdx.x] = m, sh_l[threadIdx.x] = l, sh_st[threadIdx.x] = st, sh_sts[threadIdx.x] = sts;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) {
      lse_merge(sh_m[threadIdx.x], sh_l[threadIdx.x], sh_m[threadIdx.x + stride], sh_l[threadIdx.x + stride]);
      sh_st[threadIdx.x] += sh_st[threadIdx.x + stride];
      sh_sts[threadIdx.x] += sh_sts[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const float lse = sh_m[0] + logf(sh_l[0]);
    if (blockIdx.y == 0) lse_out[r] = lse;
    tsum_out[jr] = sh_st[0];
    loss[jr] = lse * sh_st[0] - sh_sts[0];  // sum_k -t_k (s_k / T - lse)
  }
}

// grad may alias logits (no __restrict__ on either): a thread reads s[k] before it writes grad[k].
template <typename scalar_t, typename prob_t>
__global__ void ce_backward_kernel(const float* __restrict__ grad_rows, const scalar_t* logits,
                                   const prob_t* __restrict__ probs, const int64_t* __restrict__ rows,
                                   const float* __restrict__ lse, const float* __restrict__ tsum, scalar_t* grad,
                                   int64_t R, int J, int64_t K, float inv_t) {
  const int64_t r = blockIdx.x;
  const scalar_t* s = logits + r * K;
  const float l = lse[r];
  float gst = 0.f;
  for (int j = 0; j < J; ++j) gst += grad_rows[j * R + r] * inv_t * tsum[j * R + r];
  for (int64_t k = blockIdx.y * (int64_t)blockDim.x + threadIdx.x; k < K; k += (int64_t)gridDim.y * blockDim.x) {
    float v = gst * __expf(to_float(s[k]) * inv_t - l);
    for (int j = 0; j < J; ++j) v -= grad_rows[j * R + r] * inv_t * to_float(probs[rows[j * R + r] * K + k]);
    grad[r * K + k] = from_float<scalar_t>(v);
  }
}

// Runs f<scalar_t, prob_t>() for the logits dtype and probs of the same dtype or float32.
template <typename F>
void dispatch_ce(const at::Tensor& logits, const at::Tensor& probs, const char* name, F&& f) {
  TORCH_CHECK(probs.scalar_type() == logits.scalar_type() || probs.scalar_type() == at::kFloat, name,
              ": probs must be float32 or the logits' dtype, got ", probs.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "matched_ce_cuda", [&] {
    if (probs.scalar_type() == at::kFloat) f(scalar_t{}, float{});
    else f(scalar_t{}, scalar_t{});
  });
}

}  // namespace

at::Tensor region_argmax_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in) {
  check_region_argmax(student_in, teacher_in);
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const int64_t N = student.size(0), Ls = student.size(1), Lt = teacher.size(1), C = student.size(2);
  at::Tensor index = at::empty({N, Ls}, student.options().dtype(at::kLong));
  if (N * Ls == 0) return index;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "region_argmax_cuda", [&] {
    argmax_kernel<scalar_t><<<N * Ls, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        student.data_ptr<scalar_t>(), teacher.data_ptr<scalar_t>(), index.data_ptr<int64_t>(), Ls, Lt, C);
    check_launch();
  });
  return index;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_ce_forward_cuda(const at::Tensor& logits_in,
                                                                       const at::Tensor& probs_in,
                                                                       const at::Tensor& rows_in, double temp) {
  check_matched_ce(logits_in, probs_in, rows_in);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), probs = probs_in.contiguous(), rows = rows_in.contiguous();
  const int64_t R = logits.size(0), K = logits.size(1), J = rows.size(0), M = probs.size(0);
  TORCH_CHECK(rows.numel() == 0 || (rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < M),
              "matched_soft_cross_entropy: teacher row index out of range [0, ", M, ")");
  auto fopts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({J, R}, fopts), lse = at::zeros({R}, fopts), tsum = at::empty({J, R}, fopts);
  if (R * J == 0) return {loss, lse, tsum};
  dispatch_ce(logits, probs, "matched_ce_forward_cuda", [&](auto s_tag, auto p_tag) {
    using scalar_t = decltype(s_tag);
    using prob_t = decltype(p_tag);
    ce_forward_kernel<scalar_t, prob_t><<<dim3((unsigned)R, (unsigned)J), kThreads, 0,
                                          at::cuda::getCurrentCUDAStream()>>>(
        logits.data_ptr<scalar_t>(), probs.data_ptr<prob_t>(), rows.data_ptr<int64_t>(), loss.data_ptr<float>(),
        lse.data_ptr<float>(), tsum.data_ptr<float>(), R, K, static_cast<float>(1.0 / temp));
    check_launch();
  });
  return {loss, lse, tsum};
}

at::Tensor matched_ce_backward_cuda(const at::Tensor& grad_rows_in, const at::Tensor& logits_in,
                                    const at::Tensor& probs_in, const at::Tensor& rows_in, const at::Tensor& lse_in,
                                    const at::Tensor& tsum_in, double temp, const c10::optional<at::Tensor>& out) {
  check_matched_ce(logits_in, probs_in, rows_in);
  check_matched_ce_out(logits_in, out);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous(), probs = probs_in.contiguous(), rows = rows_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous().to(at::kFloat);
  const at::Tensor lse = lse_in.contiguous().to(at::kFloat), tsum = tsum_in.contiguous().to(at::kFloat);
  const int64_t R = logits.size(0), K = logits.size(1), J = rows.size(0);
  at::Tensor grad = out.has_value() ? *out : at::empty_like(logits);
  if (J == 0) return grad.zero_();
  if (R == 0 || K == 0) return grad;
  const dim3 grid((unsigned)R, (unsigned)std::min<int64_t>((K + kThreads - 1) / kThreads, 64));
  dispatch_ce(logits, probs, "matched_ce_backward_cuda", [&](auto s_tag, auto p_tag) {
    using scalar_t = decltype(s_tag);
    using prob_t = decltype(p_tag);
    ce_backward_kernel<scalar_t, prob_t><<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        grad_rows.data_ptr<float>(), logits.data_ptr<scalar_t>(), probs.data_ptr<prob_t>(),
        rows.data_ptr<int64_t>(), lse.data_ptr<float>(), tsum.data_ptr<float>(), grad.data_ptr<scalar_t>(), R,
        (int)J, K, static_cast<float>(1.0 / temp));
    check_launch();
  });
  return grad;
}

}  // namespace esvit
