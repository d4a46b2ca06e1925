// Python bindings of the native CPU engine (pybind11 through torch/extension.h).
//
// The module exposes the two row kernels; rlkernels/native/ops.py registers them as torch.library custom ops
// (rlkernels::block_stats, rlkernels::dlogits, rlkernels::dlogits_) with fake implementations, and
// rlkernels/engines/native_engine.py drives them chunk by chunk around ATen's GEMM.
#include <torch/extension.h>

#include "row_kernels.h"

#ifndef RLK_BUILD_DIGEST
#define RLK_BUILD_DIGEST unknown
#endif
#define RLK_STR2(x) #x
#define RLK_STR(x) RLK_STR2(x)

namespace {

// dL/dz into a new tensor: the logits op must never modify the caller's logits
at::Tensor dlogits(const at::Tensor& z, const at::Tensor& labels, int64_t v0, const std::optional<at::Tensor>& bias,
                   double temperature, const std::optional<at::Tensor>& temp_rows, double softcap,
                   const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& cs,
                   const std::optional<at::Tensor>& g_logp, const std::optional<at::Tensor>& g_ent) {
  at::Tensor out = at::empty_like(z, at::MemoryFormat::Contiguous);
  rlk::dlogits_out(z, labels, v0, bias, temperature, temp_rows, softcap, m, log_s, cs, g_logp, g_ent, out);
  return out;
}

// dL/dz over the block itself: the engine's GEMM output block is reused for the gradient GEMMs
void dlogits_inplace(at::Tensor& z, const at::Tensor& labels, int64_t v0, const std::optional<at::Tensor>& bias,
                     double temperature, const std::optional<at::Tensor>& temp_rows, double softcap,
                     const at::Tensor& m, const at::Tensor& log_s, const at::Tensor& cs,
                     const std::optional<at::Tensor>& g_logp, const std::optional<at::Tensor>& g_ent) {
  rlk::dlogits_out(z, labels, v0, bias, temperature, temp_rows, softcap, m, log_s, cs, g_logp, g_ent, z);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rlkernels native CPU engine: row kernels for per-token log-probs, entropies and dL/dlogits";
  m.def("block_stats", &rlk::block_stats, "Per-row (M, S, C, z~_y) of a logits block, merged into `state`",
        py::arg("z"), py::arg("labels"), py::arg("v0"), py::arg("bias"), py::arg("temperature"),
        py::arg("temp_rows"), py::arg("softcap"), py::arg("state"));
  m.def("dlogits", &dlogits, "dL/dz of a logits block into a new tensor", py::arg("z"), py::arg("labels"),
        py::arg("v0"), py::arg("bias"), py::arg("temperature"), py::arg("temp_rows"), py::arg("softcap"), py::arg("m"),
        py::arg("log_s"), py::arg("cs"), py::arg("g_logp"), py::arg("g_ent"));
  m.def("dlogits_", &dlogits_inplace, "dL/dz of a logits block, in place", py::arg("z"), py::arg("labels"),
        py::arg("v0"), py::arg("bias"), py::arg("temperature"), py::arg("temp_rows"), py::arg("softcap"), py::arg("m"),
        py::arg("log_s"), py::arg("cs"), py::arg("g_logp"), py::arg("g_ent"));
  m.def("capability", &rlk::capability, "The instruction set this build targets: AVX512, AVX2 or DEFAULT");
  m.def("openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "Whether this module was built with OpenMP: at::parallel_for then splits the rows over torch's threads");
  m.def("build_digest", [] { return std::string(RLK_STR(RLK_BUILD_DIGEST)); },
        "Hash of the sources, flags and torch version this module was built from (rlkernels/native/builder.py)");
}
