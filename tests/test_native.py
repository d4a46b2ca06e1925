"""The native CPU engine: its loading, status and fallbacks, and what the shared engine-vs-reference suite cannot see
(bf16/fp16 kernels against the torch engine, extreme logits, thread-count independence, the custom ops).

The values and gradients of ``backend="native"`` are tested by the shared suite (test_logprobs.py, test_loss.py,
test_memory.py, test_hypothesis.py), which runs every available backend.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rlkernels as R
import rlkernels.native as native
from rlkernels import reference as ref
from rlkernels.engines import load_engine

from conftest import assert_matches, grads, make_problem

ROOT = Path(__file__).resolve().parents[1]
needs_native = pytest.mark.skipif(native.status()["status"] != "available",
                                  reason=f"native engine not available: {native.status()['reason']}")


def _run(code: str, env_extra: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RLKERNELS_BACKEND", "RLKERNELS_DISABLE_NATIVE")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(ROOT))


# ----------------------------------------------------------------------------------------------------------------
# loading, status, fallbacks
# ----------------------------------------------------------------------------------------------------------------
def test_status_reports_state():
    st = native.status()
    assert set(st) == {"status", "reason", "detail", "variant", "source", "path"}
    if native.disabled():
        assert st["status"] == "disabled" and "RLKERNELS_DISABLE_NATIVE" in st["reason"]
    elif st["status"] == "available":
        assert st["variant"] in native.VARIANTS and st["source"] in ("prebuilt", "jit")
        assert Path(st["path"]).is_file()
        assert R.available_backends(torch.device("cpu"))["native"] == "available"
    else:
        assert st["status"] == "unavailable" and "Fix:" in st["reason"]


def test_import_does_not_load_the_extension():
    run = _run("""
        import sys, rlkernels
        print(sorted(m for m in sys.modules if m.startswith("rlkernels.native") or "rlkernels_native" in m))
    """, {})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]", run.stdout


def test_disable_env_falls_back_silently():
    run = _run("""
        import warnings
        warnings.simplefilter("error")  # the fallback must not warn
        import torch, rlkernels as R, rlkernels.native as N
        from rlkernels.engines import resolve_backend
        st = N.status()
        assert st["status"] == "disabled", st
        assert "RLKERNELS_DISABLE_NATIVE" in R.available_backends()["native"]
        assert resolve_backend("auto", torch.device("cpu")).name == "torch"
        try:
            R.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="native")
        except ValueError as exc:
            assert "native" in str(exc) and "RLKERNELS_DISABLE_NATIVE" in str(exc), exc
        else:
            raise AssertionError("backend='native' did not raise")
        logp = R.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
        assert logp.shape == (3,)
        print("ok")
    """, {"RLKERNELS_DISABLE_NATIVE": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-3000:]
    assert "building the native" not in run.stderr


def test_broken_build_falls_back_with_one_warning(tmp_path):
    """A source that does not compile: one RuntimeWarning with the reason and the fix, the torch engine for
    backend="auto", a clear ValueError for backend="native", and the compiler's error kept for status()."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.cpp").write_text("#error deliberately broken rlkernels test source\n")
    run = _run(f"""
        import dataclasses, json, warnings
        from pathlib import Path
        import torch, rlkernels as R, rlkernels.native as N
        N.BUILDER = dataclasses.replace(N.BUILDER, name="rlk_broken_test", source_dir=Path({str(tmp_path / "src")!r}),
                                        sources=("broken.cpp",), headers=(), aot_prefix="_C_broken_test_")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backends = R.available_backends()
            logp = R.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
            R.available_backends()
            st = N.status()
            try:
                R.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), backend="native")
                native_error = None
            except ValueError as exc:
                native_error = str(exc)
        print(json.dumps(dict(warnings=[f"{{w.category.__name__}}: {{w.message}}" for w in caught
                                        if "rlkernels" in str(w.message)],
                              native=backends["native"], status=st, native_error=native_error)))
    """, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")})
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["warnings"]) == 1, out["warnings"]
    warning = out["warnings"][0]
    assert warning.startswith("RuntimeWarning") and "native CPU engine is unavailable" in warning
    assert "Fix:" in warning and "RLKERNELS_DISABLE_NATIVE=1" in warning
    assert out["status"]["status"] == "unavailable" and out["native"].startswith("the native CPU engine")
    assert out["native_error"] is not None and "not available" in out["native_error"]
    if "building it failed" in out["status"]["reason"]:  # a compiler and ninja exist: the error text is kept
        assert "deliberately broken" in out["status"]["detail"]
        assert run.stderr.count("rlkernels: building the native CPU engine") == 1


def test_a_stale_build_lock_falls_back_instead_of_hanging(tmp_path):
    """A lock file left in the build directory by an interrupted build (older than STALE_LOCK_S) makes the engine
    unavailable with a warning that names the file, instead of waiting for it forever inside torch; a fresh lock (a
    build running in another process) is waited for as before, so it is not touched."""
    run = _run("""
        import dataclasses, json, os, time, warnings
        import torch, rlkernels as R, rlkernels.native as N
        N.BUILDER = dataclasses.replace(N.BUILDER, name="rlk_stale_lock_test", aot_prefix="_C_stale_lock_test_")
        lock = N.BUILDER.jit_build_dir(N.BUILDER.variant()) / "lock"
        lock.touch()
        fresh = N._stale_build_lock(N.BUILDER, N.BUILDER.variant())
        old = time.time() - N.STALE_LOCK_S - 60
        os.utime(lock, (old, old))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            backends = R.available_backends()
            logp = R.fused_logprobs(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]))
        print(json.dumps(dict(fresh=list(fresh), native=backends["native"], lock=str(lock), exists=lock.exists(),
                              warnings=[str(w.message) for w in caught if "rlkernels" in str(w.message)])))
    """, {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["fresh"] == [None, None]
    assert "lock file 31 min old" in out["native"] and out["lock"] in out["native"], out["native"]
    assert len(out["warnings"]) == 1 and f"delete {out['lock']}" in out["warnings"][0], out["warnings"]
    assert out["exists"]  # reported, never deleted: another process might still be building
    assert "building the native CPU engine" not in run.stderr


def test_aot_module_names_and_flags():
    """The builder is the one source of truth: every variant has its own module name and ISA flags, and no
    -march=native (an AOT wheel must run on any x86-64 CPU)."""
    b = native.BUILDER
    names = {b.aot_module(v) for v in native.VARIANTS} | {b.jit_name(v) for v in native.VARIANTS}
    assert len(names) == 2 * len(native.VARIANTS)
    for v in native.VARIANTS:
        flags = b.build_flags(v)
        assert "-O3" in flags and not any(f.startswith("-march") for f in flags)
        assert f"-DCPU_CAPABILITY={v}" in flags
    assert all(Path(p).is_file() for p in b.source_paths())


# ----------------------------------------------------------------------------------------------------------------
# native-specific numerics
# ----------------------------------------------------------------------------------------------------------------
@needs_native
def test_native_engine_rejects_other_devices():
    eng = load_engine("native")
    assert eng.supports(torch.device("cpu")) is None
    reason = eng.supports(torch.device("cuda"))
    assert reason is not None and "CPU" in reason


@needs_native
def test_module_is_current():
    """The loaded module was built from the sources on disk (a stale prebuilt module is never used)."""
    module = native.load()
    assert module.build_digest() == native.BUILDER.digest(native.BUILDER.variant())


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocked", [False, True])
def test_half_kernels_match_torch_engine(dtype, blocked, monkeypatch):
    """Both engines round the same GEMM output block to the input dtype and then compute in fp32: log-probs and
    entropies agree to fp32 rounding, gradients to one rounding of the input dtype."""
    if blocked:
        monkeypatch.setenv("RLKERNELS_MEMORY_BUDGET_MB", str(8 * 300 * 4 / 2**20))  # 8 rows x 300 vocab
    p = make_problem(3, 8, 32, 1031, dtype=dtype, bias=True, per_token_temperature=True, seed=23, logit_scale=4.0)
    out = {}
    for backend in ("torch", "native"):
        logp, ent = R.fused_logprobs(p["hidden"], p["weight"], p["labels"], bias=p["bias"], return_entropy=True,
                                     temperature=p["temperature"], backend=backend, chunk_size=8)
        out[backend] = (logp, ent, grads(logp.double().sum() + 0.5 * ent.double().sum(),
                                         [p["hidden"], p["weight"], p["bias"]]))
    (lt, et, gt), (ln, en, gn) = out["torch"], out["native"]
    torch.testing.assert_close(ln, lt, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(en, et, rtol=2e-5, atol=2e-5)
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("hidden", "weight", "bias"), gn, gt):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=4 * eps, atol=4 * eps * float(b.abs().max()),
                                   msg=lambda m: f"grad_{name}: {m}")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_op_half_and_fp32_match_torch_engine(dtype):
    g = torch.Generator().manual_seed(29)
    logits = (torch.randn(37, 3001, generator=g) * 5).to(dtype)
    logits[:, 7] = -float("inf")
    labels = torch.randint(8, 3001, (37,), generator=g)
    res = {}
    for backend in ("torch", "native"):
        x = logits.clone().requires_grad_()
        logp, ent = R.logprobs_from_logits(x, labels, temperature=0.7, return_entropy=True, backend=backend)
        (gx,) = grads(logp.sum() - 0.3 * ent.sum(), [x])
        res[backend] = (logp, ent, gx)
    torch.testing.assert_close(res["native"][0], res["torch"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res["native"][1], res["torch"][1], rtol=1e-5, atol=1e-5)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(res["native"][2].float(), res["torch"][2].float(), rtol=2 * eps, atol=1e-6)
    assert torch.all(res["native"][2][:, 7] == 0)


@needs_native
@pytest.mark.parametrize("shift", [0.0, 1e4, -3e5])
def test_large_logits(shift):
    """|logits| up to 3e5 with a narrow spread: the entropy is formed without cancellation (B §1.1), so it keeps
    full relative accuracy where lse - mu would lose everything."""
    g = torch.Generator().manual_seed(31)
    base = torch.randn(16, 4099, generator=g, dtype=torch.float64) * 3
    logits = (base + shift).float()
    labels = torch.randint(0, 4099, (16,), generator=g)
    x = logits.clone().requires_grad_()
    logp, ent = R.logprobs_from_logits(x, labels, return_entropy=True, backend="native")
    x64 = logits.double().requires_grad_()
    logp_r, ent_r = ref.logprobs_from_logits(x64, labels)
    torch.testing.assert_close(logp.double(), logp_r, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent_r, rtol=2e-6, atol=0)
    (gx,) = grads(logp.sum() + ent.sum(), [x])
    (gr,) = grads(logp_r.sum() + ent_r.sum(), [x64])
    assert_matches("grad_logits", gx, gr, gr.float(), torch.float32)


@needs_native
def test_row_kernels_run_on_torchs_threads():
    """The module is built with OpenMP where torch runs on it: at::parallel_for is a header template whose parallel
    branch compiles only under _OPENMP, and without it the row loops ran on one thread whatever
    torch.set_num_threads said (block_stats on 4096 x 32000 fp32: 52.8 ms on 1 thread, 52.9 on 2; 27.0 on 2 with
    it). One OpenMP runtime: the libgomp that torch loaded."""
    import re

    module = native.load()
    assert module.openmp() == (sys.platform.startswith("linux") and torch.backends.openmp.is_available())
    if module.openmp():
        with open("/proc/self/maps") as f:
            runtimes = set(re.findall(r"\S*/libgomp[^/\s]*", f.read()))
        assert len(runtimes) == 1, runtimes


@needs_native
def test_thread_count_does_not_change_results():
    """Each row is computed by one thread with a fixed order of operations: 1 and many threads agree bit for bit."""
    g = torch.Generator().manual_seed(37)
    logits = torch.randn(64, 20011, generator=g) * 4
    labels = torch.randint(0, 20011, (64,), generator=g)
    temp = 0.5 + torch.rand(64, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, max(2, before), 4):
            torch.set_num_threads(threads)
            x = logits.clone().requires_grad_()
            logp, ent = R.logprobs_from_logits(x, labels, temperature=temp, return_entropy=True, backend="native")
            (gx,) = grads(logp.sum() + 0.1 * ent.sum(), [x])
            results.append((logp, ent, gx))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_native
def test_strided_logits():
    """Rows with a non-unit inner stride are copied chunk by chunk, with the same answer."""
    g = torch.Generator().manual_seed(41)
    base = torch.randn(501, 23, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 501, (23,), generator=g)
    x = base.T  # (23, 501), stride (1, 23)
    x.requires_grad_()
    logp, ent = R.logprobs_from_logits(x, labels, return_entropy=True, backend="native", chunk_size=5)
    logp_r, ent_r = ref.logprobs_from_logits(x, labels)
    assert_matches("logp", logp, logp_r)
    assert_matches("entropy", ent, ent_r)
    (gx,) = grads(logp.sum() + ent.sum(), [x])
    (gr,) = grads(logp_r.sum() + ent_r.sum(), [x])
    assert_matches("grad", gx, gr)


@needs_native
def test_custom_ops_opcheck():
    """Schemas, fake implementations and mutation annotations of the registered ops are consistent."""
    from rlkernels.native import ops

    g = torch.Generator().manual_seed(43)
    z = torch.randn(6, 70, generator=g)
    y = torch.randint(0, 70, (6,), generator=g)
    bias = torch.randn(70, generator=g)
    temp = 0.5 + torch.rand(6, generator=g)
    state = ops.block_stats(z, y, 0, bias, 1.0, temp, 0.0, None)
    stats = [x.contiguous() for x in ops.finish(state)[2:]]
    gl, ge = torch.randn(6, generator=g), torch.randn(6, generator=g)
    torch.library.opcheck(ops.block_stats, (z, y, 0, bias, 1.0, temp, 0.0, None))
    torch.library.opcheck(ops.block_stats, (z[:, 30:], y, 30, None, 0.7, None, 30.0, state))
    torch.library.opcheck(ops.dlogits, (z, y, 0, bias, 1.0, temp, 0.0, *stats, gl, ge))
    torch.library.opcheck(ops.dlogits_, (z.clone(), y, 0, None, 1.0, None, 30.0, *stats, gl, None))


@needs_native
def test_torch_compile_sees_the_ops():
    """The logits path traced by torch.compile(fullgraph=True): the custom ops are single graph nodes."""
    from rlkernels.native import ops

    def logits_logprobs(z, y, g):
        state = ops.block_stats(z, y, 0, None, 1.0, None, 0.0, None)
        logp, ent, m, log_s, cs = ops.finish(state)
        return logp, ent, ops.dlogits(z, y, 0, None, 1.0, None, 0.0, m, log_s, cs, g, None)

    g = torch.Generator().manual_seed(47)
    z, y, gl = torch.randn(8, 300, generator=g), torch.randint(0, 300, (8,), generator=g), torch.randn(8, generator=g)
    compiled = torch.compile(logits_logprobs, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(z, y, gl), logits_logprobs(z, y, gl)):
        torch.testing.assert_close(a, b)


@needs_native
def test_fused_chunks_without_upstream_gradient():
    """A chunk whose loss has no gradient writes no block: its grad_hidden rows, and grad_weight if no chunk wrote
    it, must come back zero (the native engine does not zero-fill its accumulators up front)."""
    from rlkernels.engines.chunking import ChunkPlan

    g = torch.Generator().manual_seed(53)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(37, 8, generator=g)
    labels = torch.randint(0, 37, (10,), generator=g)
    plan = ChunkPlan(rows=4, vocab_block=37, vocab=37)

    def skip_first(r0, r1, logp, ent):  # rows 0-3 contribute a constant
        return logp.detach() if r0 == 0 else logp - 0.1 * ent

    def constant(r0, r1, logp, ent):
        return logp.detach()

    for chunk_loss in (skip_first, constant):
        outs = [load_engine(b).linear_fused(hidden, weight, None, labels, 1.0, plan, chunk_loss, True, True, False)
                for b in ("torch", "native")]
        for name, a, b in zip(("loss", "logp", "entropy", "grad_hidden", "grad_weight"), outs[1], outs[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{chunk_loss.__name__} {name}: {m}")
        assert torch.all(outs[1][3][:4] == 0)
