"""Every Triton kernel compiles for sm_90 (H100/H200) here, without a GPU, and the compiler's output has what a
streaming kernel needs: no register spills, 16-byte loads of the logits, registers for at least half the threads an
SM holds. (Timings need the GPU: bench/device_check.sh.)"""
import pytest

pytest.importorskip("triton")

from rlkernels.triton_ops import aot  # noqa: E402

WHY = aot.available()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no ahead-of-time compile here: {WHY}")

VARIANTS = aot.variants() if WHY is None else []


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_kernel_compiles_for_sm90_without_spills(variant):
    report = aot.compile_variant(variant)
    assert report.local_bytes == 0, f"{variant.name}: {report.local_bytes} B of local memory (register spills)"
    bf16 = variant.signature.get("z_ptr") == "*bf16"
    if variant.streams_logits and bf16:
        assert report.vector_loads + report.async_copies > 0, \
            f"{variant.name}: no 16-byte loads of the logits (one bf16 per load would cap the bandwidth)"
        # 65536 registers per SM: above 64 per thread, fewer than half its 2048 threads fit, and a streaming
        # kernel lives on the loads it has in flight (the lanes loop at 4096 columns x 4 warps needed 128)
        assert report.registers <= 64, f"{variant.name}: {report.registers} registers per thread"


def test_the_check_can_fail():
    """The same compile of the lanes loop at 4096 columns x 4 warps, which needs 128 registers: the bound above
    is able to reject a configuration."""
    from rlkernels.triton_ops import logprobs as K

    lanes = next(v for v in VARIANTS if v.name == "stats lanes")
    wide = aot.Variant("stats lanes 4096x4", K._logits_stats_kernel, lanes.signature,
                       {**lanes.constexprs, "BLOCK_V": 4096}, 4, lanes.aligned)
    assert aot.compile_variant(wide).registers > 64


def test_unaligned_specialisation_loses_vector_loads():
    """Why the row stride and V are left specialised (not in do_not_specialize): without their divisibility by 16
    the compiler cannot prove 16-byte alignment and falls back to one bf16 per load."""
    tile = next(v for v in VARIANTS if v.name == "stats tile (hidden+W path)")
    plain = aot.Variant("stats tile, unaligned", tile.kernel, tile.signature, tile.constexprs, tile.num_warps,
                        aligned=("z_ptr",))
    report = aot.compile_variant(plain)
    assert report.vector_loads == 0 and report.scalar_2byte_loads > 1
