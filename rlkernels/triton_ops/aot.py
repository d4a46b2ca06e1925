"""Compile the Triton kernels ahead of time for a GPU target on any machine (no GPU needed) and report what the
compiler made of each: registers, shared and local memory (local = register spills), the width of the global loads,
whether the loop streams through ``cp.async``, how many programs (warps) an SM can keep resident, and how many
machine instructions each logit costs in the steady state (read from the SASS).

The GPU machines are lent to some sessions only; this is the check every session and CI can run. A kernel that
would not compile for sm_90 fails here first (as the 3.6 compiler once rejected a global that the interpreter
accepted), and what bounds bandwidth before any timing (16-byte loads, no spills, enough resident warps to keep
loads in flight) is read from the compiler's own output. Which configuration is fastest still takes a GPU
(bench/gpu_tune.py).

    python -m rlkernels.triton_ops.aot          # the table, for sm_90 (H100/H200)

Needs Triton's NVIDIA backend (in the PyPI wheel: the compiler toolchain and ``cuobjdump`` ship with it). Arguments
are specialised as at run time for an aligned bf16 block with V a multiple of 16 (V = 152064 or 131072): data
pointers 16-byte aligned, row strides and column counts divisible by 16, except the ``do_not_specialize`` ones.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Dict, List, Optional

import triton
import triton.language as tl

from ..config import KL_ESTIMATORS
from . import advantages as A
from . import logprobs as K
from . import objective as O
from .tl_utils import TEMP_NONE, TEMP_ROW, TEMP_SCALAR

TARGET_ARCH = 90  # sm_90: H100, H200


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object  # a triton JITFunction
    signature: Dict[str, str]  # runtime arguments -> Triton type strings
    constexprs: Dict[str, object]
    num_warps: int
    aligned: tuple = ()  # arguments specialised as divisible by 16
    streams_logits: bool = True  # reads a logits block (so its loads should be 16-byte vectors)


@dataclass
class Report:
    variant: Variant
    registers: int
    shared_bytes: int
    local_bytes: int
    vector_loads: int  # ld.global.v4 (16-byte) instructions
    async_copies: int  # cp.async instructions (pipelined loops)
    scalar_2byte_loads: int  # ld.global.b16: one bf16 at a time
    fixup_exps: int  # ex2.approx.f32 without .ftz: each costs a range fix-up (a compare, two multiplies) on sm_90
    path_instructions: int  # SASS instructions of the whole-tile path (see _whole_tile_path)

    @property
    def instructions_per_logit(self) -> Optional[float]:
        """SASS instructions per logit on the whole-tile path: what the SM issues for each logit, the budget a
        bandwidth-bound kernel must stay within (an sm_90 SM issues 4 warp instructions per clock for 16-32 bytes of
        HBM traffic). None for kernels that do not stream logits."""
        v = self.variant
        if not v.streams_logits:
            return None
        return self.path_instructions / (v.constexprs["BLOCK_V"] / (32 * v.num_warps))

    @property
    def programs_per_sm(self) -> int:
        """Programs an sm_90 SM holds at once: the least of its limits on registers (65536, allocated per warp in
        units of 256), threads (2048), blocks (32) and shared memory (228 KiB, 1 KiB reserved per block)."""
        warps = self.variant.num_warps
        regs_per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = 65536 // max(regs_per_warp * warps, 1)
        by_smem = (228 * 1024) // (self.shared_bytes + 1024)
        return min(by_regs, 2048 // (32 * warps), 32, by_smem)

    @property
    def warps_per_sm(self) -> int:
        return self.programs_per_sm * self.variant.num_warps

    def row(self) -> str:
        v = self.variant
        per = self.instructions_per_logit
        return (f"{v.name:<44} {v.num_warps:>5} {self.registers:>5} {self.shared_bytes:>7} {self.local_bytes:>6} "
                f"{self.vector_loads:>5} {self.async_copies:>5} {self.programs_per_sm:>6} {self.warps_per_sm:>6} "
                f"{'-' if per is None else f'{per:.1f}':>6}")


HEADER = (f"{'variant':<44} {'warps':>5} {'regs':>5} {'shared':>7} {'local':>6} {'ld.v4':>5} {'cp.as':>5} "
          f"{'prg/SM':>6} {'wrp/SM':>6} {'ins/el':>6}")


def _stats_signature(dtype: str = "*bf16", acc: str = "fp32") -> Dict[str, str]:
    return {"z_ptr": dtype, "stride_z": "i64", "stride_outer": "i64", "rows_inner": "i32", "bias_ptr": dtype,
            "temp_ptr": f"*{acc}", "inv_t_scalar": "fp32", "softcap": "fp32", "softcap_lo": "fp32",
            "labels_ptr": "*i64", "v_offset": "i32", "n_cols": "i32", "n_load": "i32", "m_out": f"*{acc}",
            "s_out": f"*{acc}", "c_out": f"*{acc}", "zy_out": f"*{acc}", "ent_out": f"*{acc}"}


def _dlogits_signature(dtype: str = "*bf16", acc: str = "fp32") -> Dict[str, str]:
    return {"z_ptr": dtype, "stride_z": "i64", "stride_outer": "i64", "rows_inner": "i32", "out_ptr": dtype,
            "stride_out": "i64", "bias_ptr": dtype, "temp_ptr": f"*{acc}", "inv_t_scalar": "fp32", "softcap": "fp32",
            "softcap_lo": "fp32", "labels_ptr": "*i64", "v_offset": "i32", "n_cols": "i32", "n_load": "i32",
            "m_ptr": f"*{acc}", "log_s_ptr": f"*{acc}", "cs_ptr": f"*{acc}", "g_logp_ptr": f"*{acc}",
            "g_ent_ptr": f"*{acc}"}


# the TEMP constexpr: T = 1 (the variants' default, as in the benchmarks), a scalar T, per-token T
NO_T, SCALAR_T, ROW_T = TEMP_NONE.value, TEMP_SCALAR.value, TEMP_ROW.value
_STATS_ALIGNED = ("z_ptr", "stride_z", "stride_outer", "bias_ptr", "n_cols", "n_load")
_DLOGITS_ALIGNED = ("z_ptr", "stride_z", "stride_outer", "out_ptr", "stride_out", "bias_ptr", "n_cols", "n_load")
# V not a multiple of 16 in the engine's own (padded) block: only n_cols loses its divisibility
_ODD_V = ("n_cols",)


def variants() -> List[Variant]:
    """The kernels as the engine launches them (module defaults for tiles, warps and stages), plus the opt-in
    configurations that bench/gpu_tune.py compares."""
    out = []

    def stats(name, lanes=False, rows_3d=False, bias=False, temp=NO_T, stages=None, dtype="*bf16",
              acc=tl.float32, unaligned=(), split=None, prefetch=None, softcap=False):
        # the logits path (the caller's tensor, masked rows skipped, the statistics finished in the kernel); hidden+W:
        # kept rows, the raw state
        masked_rows = finish = rows_3d
        cfg = K.stats_launch(lanes)  # the engine's own launch, with this variant's changes
        out.append(Variant(f"stats {name}", K._logits_stats_kernel,
                           _stats_signature(dtype, "fp64" if acc == tl.float64 else "fp32"),
                           dict(HAS_BIAS=bias, TEMP=temp, ACC=acc, BLOCK_V=cfg.block_v, LANES=lanes,
                                ROWS_3D=rows_3d, STAGES=cfg.stages if stages is None else stages,
                                SPLIT_TAIL=cfg.split_tail if split is None else split, MASKED_ROWS=masked_rows,
                                PREFETCH=cfg.prefetch if prefetch is None else prefetch, FINISH=finish,
                                SOFTCAP=softcap),
                           cfg.num_warps, tuple(a for a in _STATS_ALIGNED if a not in unaligned)))

    stats("tile (hidden+W path)")
    stats("tile, V odd, padded block", unaligned=_ODD_V)
    stats("tile, every tile masked", split=False)
    stats("tile, every tile masked, V odd, padded", split=False, unaligned=_ODD_V)
    stats("tile, T = 0.7", temp=SCALAR_T)
    stats("tile, bias, per-token T", bias=True, temp=ROW_T)
    stats("tile, (B,T,V) masked rows (logits)", rows_3d=True)
    stats("tile, 3 stages", stages=3)
    stats("tile, register prefetch", prefetch=True)
    stats("tile, prefetch, (B,T,V) masked rows", prefetch=True, rows_3d=True)
    stats("lanes", lanes=True)
    stats("lanes, (B,T,V) masked rows", lanes=True, rows_3d=True)
    stats("tile, fp64", dtype="*fp64", acc=tl.float64)
    stats("tile, fp64, (B,T,V) masked rows (logits)", dtype="*fp64", acc=tl.float64, rows_3d=True)
    stats("tile, softcap (Gemma)", softcap=True)
    stats("tile, softcap, T = 0.7", softcap=True, temp=SCALAR_T)

    def dlogits(name, glogp=True, gent=True, rows_3d=False, bias=False, temp=NO_T, unaligned=(), split=None,
                dtype="*bf16", acc=tl.float32, softcap=False, stream=None):
        cfg = K.dlogits_launch()
        out.append(Variant(f"dlogits {name}", K._dlogits_kernel,
                           _dlogits_signature(dtype, "fp64" if acc == tl.float64 else "fp32"),
                           dict(HAS_BIAS=bias, TEMP=temp, HAS_GLOGP=glogp, HAS_GENT=gent, ACC=acc,
                                BLOCK_V=cfg.block_v, ROWS_3D=rows_3d,
                                SPLIT_TAIL=cfg.split_tail if split is None else split, MASKED_ROWS=rows_3d,
                                SOFTCAP=softcap, STREAM=cfg.stream if stream is None else stream),
                           cfg.num_warps, tuple(a for a in _DLOGITS_ALIGNED if a not in unaligned)))

    dlogits("logp + entropy")
    dlogits("V odd, padded block", unaligned=_ODD_V)
    dlogits("whole tiles unmasked (split tail)", split=True)
    dlogits("streaming cache hints", stream=True)
    dlogits("streaming cache hints, split tail", stream=True, split=True)
    dlogits("logp only", gent=False)
    dlogits("T = 0.7", temp=SCALAR_T)
    dlogits("bias, per-token T", bias=True, temp=ROW_T)
    dlogits("per-token T, (B,T,V) masked rows", temp=ROW_T, rows_3d=True)
    dlogits("fp64", dtype="*fp64", acc=tl.float64)
    dlogits("softcap (Gemma)", softcap=True)
    dlogits("softcap, T = 0.7", softcap=True, temp=SCALAR_T)

    for method, code in (("grpo", A.GRPO), ("passk", A.PASSK)):
        for contiguous in (True, False):
            out.append(Variant(f"advantages {method}, {'fixed G' if contiguous else 'segments'}",
                               A._group_advantages_kernel,
                               {"r_ptr": "*fp64", "start_ptr": "*i64", "count_ptr": "*i64", "group_size": "i64",
                                "out_ptr": "*fp64", "keep_ptr": "*i8", "eps": "fp64"},
                               dict(METHOD=code, CONTIGUOUS=contiguous, BLOCK=A.MAX_BLOCK), 4, (),
                               streams_logits=False))
    _KL = {name: i for i, name in enumerate(KL_ESTIMATORS)}

    def objective(name, acc="fp32", **flags):
        f = {"fp32": "*fp32", "fp64": "*fp64"}[acc]
        signature = {k: f for k in ("logp_ptr", "ent_ptr", "adv_ptr", "old_ptr", "ref_ptr", "omega_ptr", "isw_ptr",
                                    "g_logp_ptr", "g_ent_ptr", "part_ptr")}
        signature.update({k: "*i1" for k in ("mask_ptr", "pg_keep_ptr", "ent_keep_ptr", "rejected_ptr")}, n="i32")
        for const in ("low", "high", "upper", "clamp", "alpha", "kappa", "tau_pos", "tau_neg", "kl_coef", "ent_coef"):
            signature.update({const: "fp32", f"{const}_lo": "fp32"})
        constexprs = dict(POLICY=O.PPO, HAS_OLD=True, CLAMP=True, SHAPING=False, HAS_ISW=False, HAS_REF=False,
                          KL_TERM=False, KL_EST=_KL["k3"], KL_ST=False, KL_CORR=False, ENT_TERM=False, METRICS=False,
                          HAS_REJ=False, ACC=tl.float64 if acc == "fp64" else tl.float32, BLOCK=O.BLOCK)
        constexprs.update(flags)
        constexprs["HAS_REF"] = constexprs["HAS_REF"] or constexprs["KL_TERM"]
        out.append(Variant(f"objective {name}", O._token_objective_kernel, signature, constexprs, O.NUM_WARPS, (),
                           streams_logits=False))

    objective("dapo")
    objective("grpo, k3", KL_TERM=True)
    objective("ppo, all terms, low_var_kl", KL_TERM=True, KL_EST=_KL["low_var_kl"], KL_CORR=True, SHAPING=True,
              HAS_ISW=True, ENT_TERM=True)
    objective("cispo, abs straight-through", POLICY=O.CISPO, KL_TERM=True, KL_EST=_KL["abs"], KL_ST=True)
    objective("sapo, k1, no old log-probs", POLICY=O.SAPO, HAS_OLD=False, KL_TERM=True, KL_EST=_KL["k1"])
    objective("reinforce, k2, no clamp", POLICY=O.REINFORCE, CLAMP=False, KL_TERM=True, KL_EST=_KL["k2"])
    objective("fp64, every term, k3", acc="fp64", KL_TERM=True, KL_CORR=True, SHAPING=True, HAS_ISW=True,
              ENT_TERM=True)
    objective("fp64 sapo, low_var_kl", acc="fp64", POLICY=O.SAPO, KL_TERM=True, KL_EST=_KL["low_var_kl"])
    objective("metrics, dapo", METRICS=True)
    objective("metrics, every input", METRICS=True, HAS_REF=True, HAS_ISW=True, HAS_REJ=True, KL_TERM=True,
              ENT_TERM=True, SHAPING=True)
    objective("metrics, cispo", METRICS=True, POLICY=O.CISPO)
    objective("metrics, fp64 ppo every input", acc="fp64", METRICS=True, HAS_REF=True, HAS_ISW=True, HAS_REJ=True,
              KL_TERM=True, ENT_TERM=True)
    return out


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in Triton's NVIDIA backend ({path})")
    return path


def _whole_tile_path(sass: str) -> int:
    """Instructions of the path a whole tile takes: the body of the first loop (from the first backward branch back to
    its target: the statistics kernels' unmasked loop), or for a kernel without a loop (dL/dz, one tile per program)
    everything up to the first EXIT, its per-row prologue included."""
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", sass)
    code = [(int(addr, 16), op, rest) for addr, op, rest in found]
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            return sum(1 for a, _, _ in code if int(target.group(1), 16) <= a <= addr)
    ends = [i for i, (_, op, _) in enumerate(code) if op == "EXIT"]
    if not ends:
        raise RuntimeError("no loop and no EXIT in the SASS")
    return ends[0] + 1


def _compile(v: Variant, arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = v.kernel.arg_names
    signature = dict(v.signature)
    signature.update({k: "constexpr" for k in v.constexprs})
    missing = set(names) - set(signature)
    if missing:
        raise ValueError(f"{v.name}: no type for {sorted(missing)}")
    constexprs = {(names.index(k),): val for k, val in v.constexprs.items()}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in v.aligned}
    src = ASTSource(v.kernel, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": v.num_warps, "enable_fp_fusion": True}  # fusion on: Triton 3.6's default on the GPUs
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ptx(v: Variant, arch: int = TARGET_ARCH) -> str:
    """The PTX of ``v`` for ``sm_<arch>`` (the tests read constants from it)."""
    return _compile(v, arch).asm["ptx"]


# a global load with any cache qualifiers before its vector width and type (``ld.global.v4.b32``, or with an eviction
# hint ``ld.global.L1::evict_first.L2::cache_hint.v4.b32``)
_LOAD = r"ld\.global(?:\.[A-Za-z0-9_]+(?:::[A-Za-z0-9_]+)?)*?"


def compile_variant(v: Variant, arch: int = TARGET_ARCH) -> Report:
    """Compile ``v`` for ``sm_<arch>`` and read its resources back from the cubin."""
    compiled = _compile(v, arch)
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+).*?SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"{v.name}: no resource usage in cuobjdump's output:\n{usage}")
    regs, shared, local = (int(x) for x in found.groups())
    return Report(v, regs, max(shared, int(getattr(compiled.metadata, "shared", 0))), local,
                  len(re.findall(_LOAD + r"\.v4\.", ptx)), len(re.findall(r"cp\.async\.c[ag]", ptx)),
                  len(re.findall(_LOAD + r"\.b16\b", ptx)), len(re.findall(r"ex2\.approx\.f32\b", ptx)),
                  _whole_tile_path(sass))


def available() -> Optional[str]:
    """None if kernels can be compiled here for sm_90, else why not."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401

        _tool("cuobjdump")
    except Exception as exc:  # an older or CPU-only Triton: say why
        return f"{type(exc).__name__}: {exc}"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: the kernels are interpreted functions, not compilable ones"
    return None


def main() -> int:
    why = available()
    if why:
        print(f"cannot compile ahead of time here: {why}")
        return 2
    print(f"Triton {triton.__version__}, target sm_{TARGET_ARCH}")
    print(HEADER)
    for v in variants():
        print(compile_variant(v).row(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
