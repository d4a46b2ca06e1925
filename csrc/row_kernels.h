// Row kernels of the native CPU engine (see row_kernels.cpp for the algorithm and bindings.cpp for the module).
//
// Conventions shared by both kernels. A block is an (R x n) view of logits, rows with unit inner stride, holding the
// vocabulary entries [v0, v0 + n) of each row, in the input dtype (fp32, bf16, fp16 or fp64). Every row is
// transformed on the fly to  z~ = max((z + bias) / T, LOGIT_FLOOR)  in the compute dtype (fp64 for fp64 inputs, else
// fp32), so that the GEMM output block never needs an fp32 copy. The per-row state is (R x 4) in the compute dtype:
//   M  = max z~,  S = sum exp(z~ - M),  C = sum exp(z~ - M) (z~ - M),  z~_y = the label logit (before the floor)
// which is LOSSES.md B §1.1-1.2: logp = z~_y - M - log S, entropy = log S - C / S.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace rlk {

// -inf logits (banned tokens) are floored here so that exp() gives exactly 0 and p (z~ - mu) gives 0 * finite
// instead of 0 * inf = nan; must equal LOGIT_FLOOR of rlkernels/engines/torch_engine.py.
constexpr double kLogitFloor = -1e20;

// Merges one block into the running per-row state and returns the new (R x 4) state. `state` is the state of the
// previous vocabulary blocks of the same rows, or nullopt for the first block. `temp_rows` (R,) holds per-row
// temperatures in the compute dtype; when absent the scalar `temperature` applies to every row. `softcap` s > 0 caps
// each logit before the temperature, z~ = s tanh((z + bias) / s) / T; 0 leaves them.
at::Tensor block_stats(const at::Tensor& z, const at::Tensor& labels, int64_t v0,
                       const std::optional<at::Tensor>& bias, double temperature,
                       const std::optional<at::Tensor>& temp_rows, double softcap,
                       const std::optional<at::Tensor>& state);

// dL/dz = [g_logp (1_y - p) - g_ent p (z~ - mu)] / T (B §1.3) for one block, from the saved per-row statistics
// m = M, log_s = log S, cs = C / S (each (R,), compute dtype, any stride), written to `out` (same shape and dtype as
// z; may be z itself). A missing upstream gradient counts as zero. With `softcap` s > 0 the gradient is with respect
// to the raw logits: times 1 - tanh^2((z + bias) / s).
void dlogits_out(const at::Tensor& z, const at::Tensor& labels, int64_t v0, const std::optional<at::Tensor>& bias,
                 double temperature, const std::optional<at::Tensor>& temp_rows, double softcap, const at::Tensor& m,
                 const at::Tensor& log_s, const at::Tensor& cs, const std::optional<at::Tensor>& g_logp,
                 const std::optional<at::Tensor>& g_ent, at::Tensor& out);

// The instruction set this build was compiled for ("AVX512", "AVX2" or "DEFAULT").
const char* capability();

}  // namespace rlk
