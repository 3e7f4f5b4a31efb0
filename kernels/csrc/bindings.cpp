// Python bindings of esvit_scale._C: one entry point per op, dispatching on the tensors' device.
#include <torch/extension.h>

#include "cpu_isa.h"
#include "ops.h"

namespace esvit {
namespace {

[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, op, ": got CUDA tensors but esvit_scale._C was built without CUDA");
}

std::tuple<at::Tensor, at::Tensor> window_attention_forward(const at::Tensor& qkv, const at::Tensor& table,
                                                            const at::Tensor& rel_index, const at::Tensor& region,
                                                            int64_t num_heads, double scale) {
  if (qkv.is_cuda()) {
#ifdef ESVIT_WITH_CUDA
    return window_attention_forward_cuda(qkv, table, rel_index, region, num_heads, scale);
#else
    no_cuda("window_attention_forward");
#endif
  }
  return window_attention_forward_cpu(qkv, table, rel_index, region, num_heads, scale);
}

std::tuple<at::Tensor, at::Tensor> window_attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const at::Tensor& table, const at::Tensor& rel_index,
                                                             const at::Tensor& region, int64_t num_heads,
                                                             double scale) {
  if (qkv.is_cuda()) {
#ifdef ESVIT_WITH_CUDA
    return window_attention_backward_cuda(grad_out, qkv, out, lse, table, rel_index, region, num_heads, scale);
#else
    no_cuda("window_attention_backward");
#endif
  }
  return window_attention_backward_cpu(grad_out, qkv, out, lse, table, rel_index, region, num_heads, scale);
}

at::Tensor region_argmax(const at::Tensor& student, const at::Tensor& teacher) {
  if (student.is_cuda()) {
#ifdef ESVIT_WITH_CUDA
    return region_argmax_cuda(student, teacher);
#else
    no_cuda("region_argmax");
#endif
  }
  return region_argmax_cpu(student, teacher);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> matched_ce_forward(const at::Tensor& logits, const at::Tensor& probs,
                                                                  const at::Tensor& rows, double temp) {
  if (logits.is_cuda()) {
#ifdef ESVIT_WITH_CUDA
    return matched_ce_forward_cuda(logits, probs, rows, temp);
#else
    no_cuda("matched_ce_forward");
#endif
  }
  return matched_ce_forward_cpu(logits, probs, rows, temp);
}

at::Tensor matched_ce_backward(const at::Tensor& grad_rows, const at::Tensor& logits, const at::Tensor& probs,
                               const at::Tensor& rows, const at::Tensor& lse, const at::Tensor& tsum, double temp,
                               const c10::optional<at::Tensor>& out) {
  if (logits.is_cuda()) {
#ifdef ESVIT_WITH_CUDA
    return matched_ce_backward_cuda(grad_rows, logits, probs, rows, lse, tsum, temp, out);
#else
    no_cuda("matched_ce_backward");
#endif
  }
  return matched_ce_backward_cpu(grad_rows, logits, probs, rows, lse, tsum, temp, out);
}

bool built_with_cuda() {
#ifdef ESVIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The architectures the CUDA code was built for, e.g. "sm80_sm90_sm100_ptx100" (setup.py); "" without CUDA.
std::string cuda_archs() {
#ifdef ESVIT_CUDA_ARCHS
#define ESVIT_STRINGIZE2(x) #x
#define ESVIT_STRINGIZE(x) ESVIT_STRINGIZE2(x)
  return ESVIT_STRINGIZE(ESVIT_CUDA_ARCHS);
#else
  return "";
#endif
}

}  // namespace
}  // namespace esvit

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "esvit_scale fused kernels: window attention and region matching (CPU and CUDA)";
  m.def("built_with_cuda", &esvit::built_with_cuda);
  m.def("cuda_archs", &esvit::cuda_archs, "the CUDA architectures of the build, e.g. sm80_sm90_sm100_ptx100");
  m.def("cpu_fma_peak_gflops", &esvit::cpu_fma_peak_gflops, py::arg("seconds") = 0.3,
        "fp32 FMA throughput of one thread, with the vectors of the CPU instruction set in use");
  m.def("cpu_isa", [] { return esvit::cpu_isa_name(esvit::cpu_isa()); },
        "the vector instruction set the CPU kernels run with");
  m.def("supported_cpu_isas", &esvit::supported_cpu_isas, "the instruction sets this CPU and build can run");
  m.def("set_cpu_isa", &esvit::set_cpu_isa, py::arg("name"), "'auto' or one of supported_cpu_isas()");
  m.def("window_attention_forward", &esvit::window_attention_forward);
  m.def("window_attention_backward", &esvit::window_attention_backward);
  m.def("region_argmax", &esvit::region_argmax);
  m.def("matched_ce_forward", &esvit::matched_ce_forward);
  m.def("matched_ce_backward", &esvit::matched_ce_backward, py::arg("grad_rows"), py::arg("logits"),
        py::arg("probs"), py::arg("rows"), py::arg("lse"), py::arg("tsum"), py::arg("temp"),
        py::arg("out") = py::none());
}
