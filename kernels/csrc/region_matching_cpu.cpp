// Region matching of the EsViT region loss on the CPU (OpenMP over rows).
//   region_argmax: the best teacher token per student token by cosine similarity, four student rows of an image
//     at a time against each teacher row (the similarity matrix is never formed).
//   matched_ce: per student row r and target j, soft cross-entropy against teacher row rows[j, r], read in place
//     (the gathered (R, K) target is never formed). Forward keeps lse per row and sum(p_t) per (j, r);
//     backward: dL/ds_k = sum_j g_j / T * (softmax(s / T)_k * sum(p_t_j) - p_t_j[k]), optionally written
//     over the logits themselves (`out` may alias `logits`: each element is read before it is written).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_math.h"
#include "ops.h"

namespace esvit {

void check_region_argmax(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "region_argmax: expected (N, Ls, C) and (N, Lt, C), got ",
              student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(student.size(0) == teacher.size(0) && student.size(2) == teacher.size(2),
              "region_argmax: batch and channels must match, got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(teacher.size(1) > 0, "region_argmax: the teacher has no tokens");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type() && student.device() == teacher.device(),
              "region_argmax: student and teacher must share dtype and device");
}

void check_matched_ce(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && probs.dim() == 2 && rows.dim() == 2,
              "matched_soft_cross_entropy: expected logits (R, K), probs (M, K), rows (J, R), got ", logits.sizes(),
              ", ", probs.sizes(), ", ", rows.sizes());
  TORCH_CHECK(logits.size(1) == probs.size(1) && rows.size(1) == logits.size(0),
              "matched_soft_cross_entropy: shapes do not agree: ", logits.sizes(), ", ", probs.sizes(), ", ",
              rows.sizes());
  TORCH_CHECK(rows.scalar_type() == at::kLong, "matched_soft_cross_entropy: rows must be int64");
  TORCH_CHECK(logits.device() == probs.device() && rows.device() == logits.device(),
              "matched_soft_cross_entropy: all tensors must be on one device");
}

void check_matched_ce_out(const at::Tensor& logits, const c10::optional<at::Tensor>& out) {
  if (!out.has_value()) return;
  TORCH_CHECK(out->sizes() == logits.sizes() && out->scalar_type() == logits.scalar_type() &&
                  out->device() == logits.device() && out->is_contiguous(),
              "matched_ce_backward: out must be a contiguous tensor like logits ", logits.sizes(), ", got ",
              out->sizes());
}

namespace {

// dot[k] = <s[k], t> for 4 rows against one row t of C: four accumulator chains, one pass over t.
template <typename T>
inline void dot4(const T* const* s, const T* t, int64_t C, T* dot) {
  const T *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3];
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t c = 0; c < C; ++c) {
    d0 += s0[c] * t[c];
    d1 += s1[c] * t[c];
    d2 += s2[c] * t[c];
    d3 += s3[c] * t[c];
  }
  dot[0] = d0, dot[1] = d1, dot[2] = d2, dot[3] = d3;
}

template <typename scalar_t>
void argmax_impl(const at::Tensor& student, const at::Tensor& teacher, at::Tensor& index) {
  const int64_t N = student.size(0), Ls = student.size(1), Lt = teacher.size(1), C = student.size(2);
  const scalar_t *s_p = student.data_ptr<scalar_t>(), *t_p = teacher.data_ptr<scalar_t>();
  int64_t* idx = index.data_ptr<int64_t>();
  // 1 / max(|t_j|, eps) like F.normalize; |s_i| > 0 does not change the argmax.
  std::vector<scalar_t> inv_norm(N * Lt);
  at::parallel_for(0, N * Lt, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* t = t_p + r * C;
      scalar_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += t[c] * t[c];
      inv_norm[r] = scalar_t(1) / std::max(std::sqrt(ss), scalar_t(1e-12));
    }
  });
  const int64_t blocks = (Ls + 3) / 4;                 // 4 student rows of one image share each teacher row
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / blocks, i0 = task % blocks * 4, rows = std::min<int64_t>(4, Ls - i0);
      const scalar_t* s[4];
      for (int64_t k = 0; k < 4; ++k) s[k] = s_p + (n * Ls + i0 + std::min(k, rows - 1)) * C;
      scalar_t best[4], dot[4];
      int64_t best_j[4] = {0, 0, 0, 0};
      std::fill(best, best + 4, -std::numeric_limits<scalar_t>::infinity());
      for (int64_t j = 0; j < Lt; ++j) {
        dot4(s, t_p + (n * Lt + j) * C, C, dot);
        for (int64_t k = 0; k < rows; ++k) {
          const scalar_t sim = dot[k] * inv_norm[n * Lt + j];
          if (sim > best[k]) best[k] = sim, best_j[k] = j;  // first maximum wins, like torch.argmax
        }
      }
      std::copy(best_j, best_j + rows, idx + n * Ls + i0);
    }
  });
}

// Rows of K per task of the thread pool: at least 2^15 elements (a fork/join costs microseconds).
inline int64_t rows_per_task(int64_t K) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)); }

// The row loops stand alone (plain arguments, no lambda captures) so that GCC vectorises them, exp included.
// One row: s the K logits, t the K teacher probabilities -> lse of s / T, sum(t), sum_k -t_k log_softmax(s / T)_k.
template <typename T>
inline void ce_row_forward(const T* s, const T* t, int64_t K, T inv_t, T& lse, T& tsum, T& loss) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t k = 0; k < K; ++k) m = s[k] > m ? s[k] : m;
  const T ms = m * inv_t;
  T se = 0, st = 0, sts = 0;
#pragma omp simd reduction(+ : se, st, sts)
  for (int64_t k = 0; k < K; ++k) {
    se += exp_vec(s[k] * inv_t - ms);
    st += t[k];
    sts += t[k] * s[k];
  }
  lse = ms + std::log(se);
  tsum = st;
  loss = lse * st - sts * inv_t;  // sum_k -t_k (s_k / T - lse)
}

// A further target of the same row: sum(t) and the loss against the lse already known.
template <typename T>
inline void ce_row_forward_more(const T* s, const T* t, int64_t K, T inv_t, T lse, T& tsum, T& loss) {
  T st = 0, sts = 0;
#pragma omp simd reduction(+ : st, sts)
  for (int64_t k = 0; k < K; ++k) {
    st += t[k];
    sts += t[k] * s[k];
  }
  tsum = st;
  loss = lse * st - sts * inv_t;
}

// o = gst * softmax(s / T) - g_t * t, with gst = sum_j g_j / T * sum(t_j) and g_t = g_0 / T. o may alias s.
template <typename T>
inline void ce_row_backward(const T* s, const T* t, T* o, int64_t K, T inv_t, T lse, T gst, T g_t) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) o[k] = gst * exp_vec(s[k] * inv_t - lse) - g_t * t[k];
}

// o -= g_t * t: a further target's share of the gradient.
template <typename T>
inline void ce_row_backward_more(const T* t, T* o, int64_t K, T g_t) {
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) o[k] -= g_t * t[k];
}

template <typename scalar_t>
void ce_forward_impl(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& rows, double temp,
                     at::Tensor& loss, at::Tensor& lse, at::Tensor& tsum) {
  const int64_t R = logits.size(0), K = logits.size(1), J = rows.size(0);
  const scalar_t *s_p = logits.data_ptr<scalar_t>(), *t_p = probs.data_ptr<scalar_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  scalar_t *loss_p = loss.data_ptr<scalar_t>(), *lse_p = lse.data_ptr<scalar_t>(), *ts_p = tsum.data_ptr<scalar_t>();
  const scalar_t inv_t = scalar_t(1) / static_cast<scalar_t>(temp);
  at::parallel_for(0, R, rows_per_task(K * J), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = s_p + r * K;
      ce_row_forward(s, t_p + row[r] * K, K, inv_t, lse_p[r], ts_p[r], loss_p[r]);
      for (int64_t j = 1; j < J; ++j)
        ce_row_forward_more(s, t_p + row[j * R + r] * K, K, inv_t, lse_p[r], ts_p[j * R + r], loss_p[j * R + r]);
    }
  });
}

template <typename scalar_t>
void ce_backward_impl(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& probs,
                      const at::Tensor& rows, const at::Tensor& lse, const at::Tensor& tsum, double temp,
                      at::Tensor& grad) {
  const int64_t R = logits.size(0), K = logits.size(1), J = rows.size(0);
  const scalar_t *s_p = logits.data_ptr<scalar_t>(), *t_p = probs.data_ptr<scalar_t>();
  const scalar_t *g_p = grad_rows.data_ptr<scalar_t>(), *lse_p = lse.data_ptr<scalar_t>();
  const scalar_t* ts_p = tsum.data_ptr<scalar_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  scalar_t* out = grad.data_ptr<scalar_t>();
  const scalar_t inv_t = scalar_t(1) / static_cast<scalar_t>(temp);
  at::parallel_for(0, R, rows_per_task(K * J), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t gst = 0;
      for (int64_t j = 0; j < J; ++j) gst += g_p[j * R + r] * inv_t * ts_p[j * R + r];
      ce_row_backward(s_p + r * K, t_p + row[r] * K, out + r * K, K, inv_t, lse_p[r], gst, g_p[r] * inv_t);
      for (int64_t j = 1; j < J; ++j)
        ce_row_backward_more(t_p + row[j * R + r] * K, out + r * K, K, g_p[j * R + r] * inv_t);
    }
  });
}

}  // namespace

at::Tensor region_argmax_cpu(const at::Tensor& student_in, const at::Tensor& teacher_in) {
  check_region_argmax(student_in, teacher_in);
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();
  const int64_t N = student.size(0), Ls = student.size(1);
  at::Tensor index = at::empty({N, Ls}, student.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(student.scalar_type(), "region_argmax_cpu", [&] {
    argmax_impl<scalar_t>(student, teacher, index);
  });
  return index;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_ce_forward_cpu(const at::Tensor& logits_in,
                                                                      const at::Tensor& probs_in,
                                                                      const at::Tensor& rows_in, double temp) {
  check_matched_ce(logits_in, probs_in, rows_in);
  TORCH_CHECK(logits_in.scalar_type() == probs_in.scalar_type(),
              "matched_soft_cross_entropy (cpu): logits and probs must share a dtype");
  const at::Tensor logits = logits_in.contiguous(), probs = probs_in.contiguous(), rows = rows_in.contiguous();
  const int64_t R = logits.size(0), J = rows.size(0), M = probs.size(0);
  TORCH_CHECK(rows.numel() == 0 || (rows.min().item<int64_t>() >= 0 && rows.max().item<int64_t>() < M),
              "matched_soft_cross_entropy: teacher row index out of range [0, ", M, ")");
  at::Tensor loss = at::empty({J, R}, logits.options()), lse = at::empty({R}, logits.options());
  at::Tensor tsum = at::empty_like(loss);
  if (J == 0) return {loss, lse.fill_(0), tsum};
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "matched_ce_forward_cpu", [&] {
    ce_forward_impl<scalar_t>(logits, probs, rows, temp, loss, lse, tsum);
  });
  return {loss, lse, tsum};
}

at::Tensor matched_ce_backward_cpu(const at::Tensor& grad_rows_in, const at::Tensor& logits_in,
                                   const at::Tensor& probs_in, const at::Tensor& rows_in, const at::Tensor& lse_in,
                                   const at::Tensor& tsum_in, double temp, const c10::optional<at::Tensor>& out) {
  check_matched_ce(logits_in, probs_in, rows_in);
  check_matched_ce_out(logits_in, out);
  const at::Tensor logits = logits_in.contiguous(), probs = probs_in.contiguous(), rows = rows_in.contiguous();
  const at::Tensor grad_rows = grad_rows_in.contiguous().to(logits.scalar_type());
  const at::Tensor lse = lse_in.contiguous(), tsum = tsum_in.contiguous();
  at::Tensor grad = out.has_value() ? *out : at::empty_like(logits);
  if (rows.size(0) == 0) return grad.zero_();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "matched_ce_backward_cpu", [&] {
    ce_backward_impl<scalar_t>(grad_rows, logits, probs, rows, lse, tsum, temp, grad);
  });
  return grad;
}

}  // namespace esvit
