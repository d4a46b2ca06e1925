"""Triton-specific promises: runtime (not constexpr) sizes, and no recompilation when the completion length changes.

The numerical suite (test_logprobs, test_loss, test_memory, test_hypothesis) runs for the Triton engine under
``TRITON_INTERPRET=1`` on CPU (a CI step) and compiled on a GPU (``bench/device_check.sh``).
"""
import pytest
import torch

pytest.importorskip("triton")

from rlkernels.triton_ops import logprobs as K  # noqa: E402

from conftest import DEVICE, make_problem  # noqa: E402

KERNELS = [K._logits_stats_kernel, K._dlogits_kernel]
# constexpr only for tile sizes, feature flags and the accumulation dtype (STYLE.md practice 6)
ALLOWED_CONSTEXPR = {"HAS_BIAS", "ROW_TEMP", "HAS_GLOGP", "HAS_GENT", "ACC", "BLOCK_V"}


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__ if hasattr(k, "__name__") else str(k))
def test_sizes_and_hyperparameters_are_runtime_arguments(kernel):
    # read the annotations of the Python function: works for compiled and interpreted kernels alike
    import inspect

    import triton.language as tl

    params = inspect.signature(kernel.fn).parameters.values()
    constexpr = {p.name for p in params if p.annotation in (tl.constexpr, "tl.constexpr")}
    runtime = {p.name for p in params} - constexpr
    assert "BLOCK_V" in constexpr, "annotations not read"
    assert constexpr <= ALLOWED_CONSTEXPR, f"unexpected constexpr parameters {constexpr - ALLOWED_CONSTEXPR}"
    for name in ("n_cols", "v_offset", "stride_z", "inv_t_scalar"):
        assert name in runtime


@pytest.mark.skipif(DEVICE.type != "cuda", reason="counts compiled kernels: needs a GPU (bench/device_check.sh)")
def test_no_recompile_across_completion_lengths():
    import rlkernels as R

    def cached():
        return sum(len(k.device_caches[torch.cuda.current_device()][0]) for k in KERNELS
                   if torch.cuda.current_device() in k.device_caches)

    counts = []
    for T in (37, 64, 129):  # three completion lengths, one of them a multiple of 16
        p = make_problem(2, T, 64, 1000, dtype=torch.bfloat16, seed=T, device=DEVICE)
        out = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                                old_logprobs=p["old_logprobs"], config="dapo", backend="triton")
        out.loss.backward()
        torch.cuda.synchronize()
        counts.append(cached())
    assert counts[0] > 0 and counts[1] == counts[0] and counts[2] == counts[0], counts
