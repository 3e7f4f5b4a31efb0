// Declarations shared by the CPU sources, the CUDA sources and the Python bindings of esvit_scale._C.
//
// Window attention works on timm's qkv layout and never materialises the (windows x heads x N x N)
// attention matrix in global memory:
//   qkv    (B_, N, 3 * H * D)  output of the qkv Linear, viewed as (B_, N, 3, H, D); B_ = batch * nW
//   table  (T, H)              relative-position bias table; bias[h, i, j] = table[rel_index[i, j], h]
//   rel_index (N, N) int64
//   region (nW, N) int32 or empty: the key j is excluded for query i when region[w, j] < 0 (padded token);
//          otherwise -100 is added when region[w, i] >= 0 and region[w, i] != region[w, j] (shift mask,
//          the value timm uses). Window b of the batch uses region row b % nW.
//   out    (B_, N, H * D)      softmax(scale * q k^T + bias + mask) v, heads concatenated like timm
//   lse    (B_, H, N) float32  log-sum-exp of each score row, saved for the backward pass
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace esvit {

std::tuple<at::Tensor, at::Tensor> window_attention_forward_cpu(
    const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& rel_index, const at::Tensor& region,
    int64_t num_heads, double scale);
// -> dqkv (B_, N, 3 * H * D), dtable (T, H): the bias gradients scattered into the table; float32 on CUDA
//    (accumulated in fp32 for every qkv dtype), the qkv dtype on the CPU
std::tuple<at::Tensor, at::Tensor> window_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& table, const at::Tensor& rel_index, const at::Tensor& region, int64_t num_heads,
    double scale);

// student (N, Ls, C), teacher (N, Lt, C) -> (N, Ls) int64
at::Tensor region_argmax_cpu(const at::Tensor& student, const at::Tensor& teacher);
// Matched soft cross-entropy of R student rows against J targets each: target j of row r is teacher row
// rows[j, r] of probs. logits (R, K), probs (M, K), rows (J, R) int64 in [0, M)
// -> loss (J, R), lse (R), tsum (J, R), all float32 (float64 for float64 inputs)
std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_ce_forward_cpu(
    const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& rows, double temp);
// grad_rows (J, R) = dL/d loss -> grad_logits (R, K), written into `out` when given (out may be logits itself)
at::Tensor matched_ce_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& probs,
                                   const at::Tensor& rows, const at::Tensor& lse, const at::Tensor& tsum,
                                   double temp, const c10::optional<at::Tensor>& out);

#ifdef ESVIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> window_attention_forward_cuda(
    const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& rel_index, const at::Tensor& region,
    int64_t num_heads, double scale);
std::tuple<at::Tensor, at::Tensor> window_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& table, const at::Tensor& rel_index, const at::Tensor& region, int64_t num_heads,
    double scale);
at::Tensor region_argmax_cuda(const at::Tensor& student, const at::Tensor& teacher);
std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_ce_forward_cuda(
    const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& rows, double temp);
at::Tensor matched_ce_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& probs,
                                    const at::Tensor& rows, const at::Tensor& lse, const at::Tensor& tsum,
                                    double temp, const c10::optional<at::Tensor>& out);
#endif

// Measured fp32 FMA throughput of one CPU thread over about `seconds` (GFLOP/s, a multiply-add counting 2), with
// the vectors of the instruction set the CPU kernels use (cpu_isa.h).
double cpu_fma_peak_gflops(double seconds);

// Shape checks shared by both backends (defined in window_attention_cpu.cpp).
struct WindowShape {
  int64_t B, N, H, D, nW, T;
};
WindowShape check_window_attention(const at::Tensor& qkv, const at::Tensor& table, const at::Tensor& rel_index,
                                   const at::Tensor& region, int64_t num_heads);
void check_matched_ce(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& rows);
void check_matched_ce_out(const at::Tensor& logits, const c10::optional<at::Tensor>& out);
void check_region_argmax(const at::Tensor& student, const at::Tensor& teacher);

}  // namespace esvit
