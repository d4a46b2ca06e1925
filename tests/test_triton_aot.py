"""Every Triton kernel compiles for sm_90 (H100/H200) here, without a GPU, and the compiler's output has what a
streaming kernel needs: no register spills, 16-byte loads of the logits, enough resident warps per SM to keep loads
in flight, and exponentials without the range fix-up. (Timings need the GPU: bench/device_check.sh.)"""
import pytest
import torch

pytest.importorskip("triton")

from rlkernels.triton_ops import aot  # noqa: E402

WHY = aot.available()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"no ahead-of-time compile here: {WHY}")

VARIANTS = aot.variants() if WHY is None else []
MIN_WARPS_PER_SM = 16  # a quarter of the 64 an sm_90 SM holds


def _problems(report) -> list:
    v, out = report.variant, []
    if report.local_bytes:
        out.append(f"{report.local_bytes} B of local memory (register spills)")
    if v.streams_logits and v.signature.get("z_ptr") == "*bf16":
        if report.vector_loads + report.async_copies == 0:
            out.append("no 16-byte loads of the logits (one bf16 per load caps the bandwidth)")
        if report.warps_per_sm < MIN_WARPS_PER_SM:
            out.append(f"{report.warps_per_sm} warps resident per SM ({report.registers} registers per thread)")
    if v.streams_logits and report.fixup_exps:
        out.append(f"{report.fixup_exps} exponentials with the range fix-up (tl.exp; fast_exp has none)")
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.name for v in VARIANTS])
def test_kernel_compiles_for_sm90_without_spills(variant):
    report = aot.compile_variant(variant)
    assert not _problems(report), f"{variant.name}: {_problems(report)}"


def test_the_check_can_fail():
    """The same checks reject the lanes loop at 8192 columns x 4 warps (four 64-wide fp32 vectors per thread)."""
    from rlkernels.triton_ops import logprobs as K

    lanes = next(v for v in VARIANTS if v.name == "stats lanes")
    wide = aot.Variant("stats lanes 8192x4", K._logits_stats_kernel, lanes.signature,
                       {**lanes.constexprs, "BLOCK_V": 8192}, 4, lanes.aligned)
    assert _problems(aot.compile_variant(wide))


@pytest.mark.parametrize("name", ["stats tile (hidden+W path)", "dlogits logp + entropy"])
def test_unaligned_specialisation_loses_vector_loads(name):
    """Why the row stride and the read bound are left specialised (not in do_not_specialize), and why the engine pads
    its block rows (the "V odd, padded block" variants above keep 16-byte loads): a caller's (N, V) logits with V not
    a multiple of 16 (n_load = n_cols = V, odd strides) are read one bf16 at a time."""
    base = next(v for v in VARIANTS if v.name == name)
    odd = aot.Variant(f"{name}, V odd, caller's tensor", base.kernel, base.signature, base.constexprs,
                      base.num_warps, aligned=tuple(a for a in ("z_ptr", "out_ptr", "bias_ptr") if a in base.signature))
    report = aot.compile_variant(odd)
    assert report.vector_loads == 0 and report.scalar_2byte_loads > 1


def test_statistics_loop_instruction_budget():
    """The statistics kernel's whole-tile loop (T = 1) issues at most 12 instructions per logit on sm_90: 10.8 with
    Triton 3.6 and 11.1 with 3.9, against 15.2 when its exponentials were tl.exp's (a compare and two multiplies
    more each) and it multiplied every logit by 1/T = 1."""
    report = aot.compile_variant(next(v for v in VARIANTS if v.name == "stats tile (hidden+W path)"))
    assert report.instructions_per_logit <= 12.0, report.row()


def test_dlogits_instruction_budget():
    """The dL/dz kernel at its default launch (T = 1, logp and entropy gradients) issues at most 17.5 instructions per
    logit on sm_90: 16.8 with Triton 3.6 and 15.8 with 3.9 at 8192 x 8 with every tile masked, the launch the H100
    sweeps chose (17.4 on 3.6 at the former 4096 x 8 with the split tail; 21.9 before its exponentials were exp2)."""
    report = aot.compile_variant(next(v for v in VARIANTS if v.name == "dlogits logp + entropy"))
    assert report.instructions_per_logit <= 17.5, report.row()


@pytest.mark.parametrize("name", ["stats tile, fp64", "dlogits fp64"])
def test_fp64_kernels_floor_at_the_exact_constant(name):
    """A bare float literal compiles to an fp32 constant: in the fp64 kernels the floor of -inf logits was
    -1.0000000200408773e20 while the running max started at the fp64 -1e20, so a row of -inf logits summed to
    exp(-2e12) = 0 (its log-prob NaN) on the H100, while the interpreter, which keeps fp64, passed. The PTX holds
    the floor as the fp64 -1e20 only."""
    import struct

    text = aot.ptx(next(v for v in VARIANTS if v.name == name))
    literal = lambda x: "0d" + struct.pack(">d", x).hex().upper()  # noqa: E731  (PTX's fp64 literal syntax)
    assert literal(-1e20) in text
    assert literal(float(torch.tensor(-1e20, dtype=torch.float32))) not in text


@pytest.mark.parametrize("name, division", [("stats tile, (B,T,V) masked rows (logits)", "div.rn.f32"),
                                            ("stats tile, fp64, (B,T,V) masked rows (logits)", "div.rn.f64")])
def test_finished_statistics_divide_as_torch(name, division):
    """The logits path's kernel finishes each row (C/S among it) rounded as torch's IEEE division: the PTX divides
    with ``div.rn`` only, never the approximate ``div.full``/``div.approx`` that Triton's fp32 ``/`` compiles to. The
    fp64 variant compiles at all: its division was once built through tl.math.div_rn, fp32 only, which the
    interpreter never rejects."""
    import re

    text = aot.ptx(next(v for v in VARIANTS if v.name == name))
    divisions = set(re.findall(r"\bdiv\.(?:rn|full|approx)\.f(?:32|64)\b", text))
    assert divisions == {division}, divisions
