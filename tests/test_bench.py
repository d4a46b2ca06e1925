"""The benchmark CLI: argument handling, the JSON schema, the correctness guard, the plot, skip reasons.

Everything runs at a tiny shape, in-process (``--in-process``) except one test of the worker-subprocess path.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rlkernels as R
from rlkernels.bench import cli, measure, providers, report
from rlkernels.bench.shapes import SHAPES, resolve_shape
from rlkernels.bench.workloads import Case
from rlkernels.config import PolicyLossConfig

from conftest import make_problem

TINY = ["--tokens", "32", "--seq-len", "8", "--hidden", "16", "--vocab", "64", "--check-tokens", "16",
        "--warmup", "1", "--repeat", "2", "--no-progress"]
FAST = "eager,rlkernels-torch,liger,gemm-roofline"


def run(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """One in-process run of three ops with JSON and plot output, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("bench")
    json_path, png_path = out / "rows.json", out / "plot.png"
    code = cli.main(TINY + ["--in-process", "--op", "grpo,logits,advantages", "--mode", "fwd,full",
                            "--provider", FAST, "--json", str(json_path), "--plot", str(png_path)])
    return code, json.loads(json_path.read_text()), png_path


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Write a plugin module registering deliberately wrong providers; returns its (unique) module name."""
    name = f"wrong_providers_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        from rlkernels.bench.providers import EagerProvider, note, register_provider

        class Wrong(EagerProvider):
            '''Eager with every output 1% too large: wrong everywhere.'''
            name = "wrong"

            def build(self, case, inputs):
                f = super().build(case, inputs)
                return lambda: {k: v * 1.01 for k, v in f().items()}

        class WrongAtScale(EagerProvider):
            '''Right at the check shape, 1% off at the bench shape (a bug in a path only long inputs take).'''
            name = "wrong-at-scale"

            def build(self, case, inputs):
                f = super().build(case, inputs)
                factor = 1.01 if inputs["labels"].numel() > 16 else 1.0
                return lambda: {k: v * factor for k, v in f().items()}

        class Noted(EagerProvider):
            '''Eager that reports a fallback, as the liger provider does when its compiled path fails.'''
            name = "noted"

            def build(self, case, inputs):
                note("noted: took its fallback path")
                return super().build(case, inputs)

        register_provider(Wrong())
        register_provider(WrongAtScale())
        register_provider(Noted())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setattr(providers, "_EXTRA", {})
    return name


# ------------------------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------------------------
def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--op", "--mode", "--provider", "--shape", "--tokens", "--dtype", "--preset", "--warmup",
                 "--repeat", "--device", "--json", "--plot", "--quick", "--full", "--no-progress", "--in-process",
                 "--softcap"):
        assert flag in text
    for name in ("eager", "compile", "rlkernels-torch", "liger", "gemm-roofline", "qwen2.5-7b", "dapo"):
        assert name in text


@pytest.mark.parametrize("argv, message", [
    (["--op", "nope"], "--op"),
    (["--mode", "sideways"], "--mode"),
    (["--provider", "eager,magic"], "magic"),
    (["--dtype", "int8"], "--dtype"),
    (["--shape", "gpt-5"], "unknown shape"),
    (["--tokens", "100", "--seq-len", "30"], "multiple of --seq-len"),
    (["--tokens", "-5"], "positive"),
    (["--warmup", "0"], "--warmup"),
    (["--repeat", "0"], "--repeat"),
    (["--preset", "nope"], "--preset"),
    (["--set", "not_a_field=1"], "unknown PolicyLossConfig field"),
    (["--set", "clip_low"], "KEY=VALUE"),
    (["--pad-frac", "1.5"], "--pad-frac"),
    (["--quick", "--full"], "exclude"),
    (["--op", "advantages", "--mode", "bwd"], "no backward"),
    (["--op", "advantages", "--tokens", "40", "--group-size", "16"], "multiple of --group-size"),
    (["--tokens", "abc"], "invalid int"),
    (["--softcap", "0"], "--softcap=0.0: must be finite and > 0"),
    (["--softcap", "30", "--op", "grpo,logits"], "--softcap applies to the ops that compute the logits"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--no-progress"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--device", "cuda"])
    assert exc.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_defaults_pick_the_quick_cpu_suite():
    parser = cli.build_parser()
    cases, names, excluded, settings = cli.resolve_args(parser.parse_args([]), parser)
    assert [(c.op, c.mode, c.shape.name, c.dtype, c.preset) for c in cases] == [
        ("grpo", "full", "cpu-small", "float32", "dapo")]
    assert cases[0].shape.tokens == 2048 and cases[0].shape.hidden == 1024 and cases[0].shape.vocab == 32000
    assert "compile" in names and "compile" in excluded and "--provider compile" in excluded["compile"]
    assert (settings.warmup, settings.repeat) == (1, 3)
    cases, names, excluded, _ = cli.resolve_args(parser.parse_args(["--provider", "compile"]), parser)
    assert names == ["compile"] and not excluded


def test_shapes():
    assert {"cpu-small", "qwen2.5-7b", "llama3-8b", "qwen3-32b"} <= set(SHAPES)
    assert (SHAPES["qwen2.5-7b"].hidden, SHAPES["qwen2.5-7b"].vocab) == (3584, 152064)
    assert (SHAPES["llama3-8b"].hidden, SHAPES["llama3-8b"].vocab) == (4096, 128256)
    assert (SHAPES["qwen3-32b"].hidden, SHAPES["qwen3-32b"].vocab) == (5120, 151936)
    s = resolve_shape("qwen2.5-7b", tokens=8192)
    assert (s.batch, s.seq_len, s.name) == (4, 2048, "qwen2.5-7b")
    assert resolve_shape("cpu-small", tokens=100).batch == 1
    assert resolve_shape("cpu-small", vocab=50).name == "cpu-small(custom)"


# ------------------------------------------------------------------------------------------------------------------
# the output
# ------------------------------------------------------------------------------------------------------------------
def test_json_schema(suite):
    code, payload, _ = suite
    assert code == 0
    assert payload["schema_version"] == report.SCHEMA_VERSION
    rows = payload["rows"]
    assert rows and all(set(r) == set(report.ROW_KEYS) for r in rows)
    cases = {(r["op"], r["mode"]) for r in rows}
    assert cases == {("grpo", "fwd"), ("grpo", "full"), ("logits", "fwd"), ("logits", "full"), ("advantages", "fwd")}
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert (r["M"], r["H"], r["V"], r["dtype"], r["device"]) == (32, 16, 64, "float32", "cpu")
        assert r["torch_version"] == torch.__version__ and r["rlkernels_version"] and r["timestamp"]
        assert isinstance(r["device_name"], str) and r["device_name"]
        if r["status"] == "ok":
            assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and len(r["times_ms"]) == 2
            assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0
            assert r["ratio_vs_eager"] is not None
        else:
            assert r["reason"] and r["median_ms"] is None
    ok = {(r["op"], r["mode"], r["provider"]): r for r in rows if r["status"] == "ok"}
    assert ok[("grpo", "full", "eager")]["ratio_vs_eager"] == 1.0
    assert ok[("grpo", "full", "gemm-roofline")]["pct_roofline"] == pytest.approx(100.0)
    assert ok[("grpo", "full", "rlkernels-torch")]["tflops"] > 0
    assert ok[("grpo", "full", "rlkernels-torch")]["flops"] == 3 * 2 * 32 * 16 * 64
    assert ok[("grpo", "fwd", "rlkernels-torch")]["flops"] == 2 * 32 * 16 * 64
    assert ok[("logits", "full", "rlkernels-torch")]["gbps"] > 0
    assert ok[("grpo", "full", "rlkernels-torch")]["check"]["grad_weight"]["rel_err"] < 1e-5
    assert ok[("grpo", "full", "eager")]["preset"] == "dapo"


def test_plot_is_a_png(suite):
    _, _, png = suite
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_has_one_line_per_provider(suite):
    _, payload, _ = suite
    text = report.format_table(payload["rows"])
    grpo = [line for line in text.splitlines() if line.startswith(("eager ", "rlkernels-torch ", "gemm-roofline "))]
    assert len(grpo) >= 3 * 2 + 2  # grpo fwd, grpo full (3 each) + logits fwd/full (eager, rlkernels-torch)
    assert "vs eager" in text and "skipped: " in text


def test_skip_reasons(suite):
    _, payload, _ = suite
    rows = {(r["op"], r["mode"], r["provider"]): r for r in payload["rows"]}
    assert "no matmul" in rows[("logits", "full", "gemm-roofline")]["reason"]
    assert "no matmul" in rows[("advantages", "fwd", "gemm-roofline")]["reason"]
    assert "Liger" in rows[("logits", "full", "liger")]["reason"]
    assert rows[("advantages", "fwd", "rlkernels-torch")]["status"] == "ok"


def test_policy_op(capsys, tmp_path):
    """The policy op (the objective alone, from per-token log-probs, padded): eager and rlkernels-torch pass the
    float64 check and are timed, fwd and full; the others say why they do not run it; rows carry the preset."""
    out = tmp_path / "policy.json"
    code, _ = run(TINY + ["--in-process", "--op", "policy", "--mode", "fwd,full", "--preset", "grpo", "--set",
                          "kl_coef=0.02", "--pad-frac", "0.25", "--provider",
                          "eager,rlkernels-torch,rlkernels-native,liger,trl,cce,gemm-roofline", "--json", str(out)],
                  capsys)
    assert code == 0
    rows = {(r["mode"], r["provider"]): r for r in json.loads(out.read_text())["rows"]}
    for mode in ("fwd", "full"):
        for name in ("eager", "rlkernels-torch"):
            row = rows[(mode, name)]
            assert row["status"] == "ok" and row["preset"] == "grpo" and row["median_ms"] > 0, row
    reasons = {name: rows[("full", name)]["reason"] for name in ("rlkernels-native", "liger", "trl", "cce",
                                                                  "gemm-roofline")}
    assert "measured once, as rlkernels-torch" in reasons["rlkernels-native"]
    assert "no matmul" in reasons["gemm-roofline"] and "GB/s" not in reasons["gemm-roofline"]
    assert all(rows[("full", name)]["status"] == "skipped" for name in reasons), reasons


def test_unavailable_engine_and_missing_liger_are_skipped_with_reasons(monkeypatch, capsys, tmp_path):
    status = {"torch": "available", "triton": "no GPU here", "native": "not built"}
    monkeypatch.setattr(providers, "engine_status", lambda name, device: status[name])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    out = tmp_path / "rows.json"
    code, _ = run(TINY + ["--in-process", "--provider", "rlkernels-triton,rlkernels-native,liger",
                          "--json", str(out)], capsys)
    assert code == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["rlkernels-triton"]["reason"] == "no GPU here"
    assert rows["rlkernels-native"]["reason"] == "not built"
    assert "pip install liger-kernel" in rows["liger"]["reason"]
    assert all(r["status"] == "skipped" for r in rows.values())


# ------------------------------------------------------------------------------------------------------------------
# the correctness guard
# ------------------------------------------------------------------------------------------------------------------
def test_a_wrong_provider_is_caught_and_not_timed(plugin, capsys, tmp_path):
    out = tmp_path / "rows.json"
    code, captured = run(TINY + ["--in-process", "--plugin", plugin, "--provider", "eager,wrong,wrong-at-scale",
                                 "--json", str(out)], capsys)
    assert code == 1
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["eager"]["status"] == "ok"
    wrong = rows["wrong"]
    assert wrong["status"] == "mismatch" and "float64 reference" in wrong["reason"]
    assert wrong["median_ms"] is None and wrong["times_ms"] is None and wrong["fingerprint"] is None
    scale = rows["wrong-at-scale"]
    assert scale["status"] == "mismatch" and "bench-shape" in scale["reason"] and scale["median_ms"] is None
    assert "MISMATCH" in captured.out


def test_worker_subprocess_path(plugin, capsys, tmp_path):
    """The default path: one fresh process per provider, plugins imported there too, memory from the RSS peak."""
    out = tmp_path / "rows.json"
    code, _ = run(TINY + ["--plugin", plugin, "--provider", "rlkernels-torch,wrong", "--json", str(out)], capsys)
    assert code == 1
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["wrong"]["status"] == "mismatch"
    ok = rows["rlkernels-torch"]
    assert ok["status"] == "ok" and ok["median_ms"] > 0 and ok["ratio_vs_eager"] is None  # no eager row
    if sys.platform.startswith("linux"):
        assert ok["memory_method"].startswith("VmHWM")


def test_a_providers_note_reaches_the_row_and_the_table(plugin, capsys, tmp_path):
    """A provider that deviates from its description (Liger falling back to compiled=False) says so in its row, also
    from the worker subprocess, and only in its own row."""
    out = tmp_path / "rows.json"
    code, captured = run(TINY + ["--plugin", plugin, "--provider", "eager,noted", "--json", str(out)], capsys)
    assert code == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["noted"]["status"] == "ok" and rows["noted"]["notes"] == ["noted: took its fallback path"]
    assert rows["eager"]["notes"] is None
    assert "note: noted: took its fallback path" in captured.out


def test_an_interrupt_keeps_what_was_measured(monkeypatch, capsys, tmp_path):
    real = cli.run_case

    def run_case(case, name, settings):
        if name == "rlkernels-torch":
            raise KeyboardInterrupt  # what Ctrl-C, or SIGTERM from `timeout`, does mid-suite
        return real(case, name, settings)
    monkeypatch.setattr(cli, "run_case", run_case)
    out = tmp_path / "rows.json"
    code, captured = run(TINY + ["--in-process", "--provider", "eager,rlkernels-torch,gemm-roofline",
                                 "--json", str(out)], capsys)
    assert code == 1
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["median_ms"] > 0
    assert rows["rlkernels-torch"]["status"] == rows["gemm-roofline"]["status"] == "interrupted"
    assert "interrupted" in captured.out


def test_worker_crash_is_reported(monkeypatch):
    case = Case(op="grpo", mode="full", shape=resolve_shape("cpu-small", 16, 8, 16, 64))
    row = cli.run_worker(case, "no-such-provider", cli.Settings(repeat=1), [], timeout=120)
    assert row["status"] == "error" and "no-such-provider" in row["reason"]


# ------------------------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------------------------
def test_liger_mapping_is_explicit():
    kw, reason = providers.liger_arguments(PolicyLossConfig.from_preset("dapo"))
    assert reason is None
    assert kw["loss_type"] == "dapo" and (kw["epsilon_low"], kw["epsilon_high"]) == (0.2, 0.28) and kw["beta"] == 0
    assert providers.liger_arguments(PolicyLossConfig.from_preset("grpo"))[0]["loss_type"] == "grpo"
    assert providers.liger_arguments(PolicyLossConfig.from_preset("cispo"))[0]["epsilon_high"] == 5.0
    assert providers.liger_arguments(PolicyLossConfig.from_preset("gspo"))[0]["importance_sampling_level"] == \
        "sequence"
    kw, reason = providers.liger_arguments(PolicyLossConfig.from_preset("ppo"))  # dual clip
    assert kw is None and "dual clip" in reason
    assert "loss_agg" in providers.liger_arguments(PolicyLossConfig.from_preset("luspo"))[1]


LIGER_CASES = [("grpo", {}), ("bnpo", {}), ("dapo", {}), ("dr_grpo", dict(norm_length=9)), ("cispo", dict(clip_high=0.2)),
               ("sapo", {}), ("gspo", dict(clip_low=0.03, clip_high=0.04)), ("dapo", dict(kl_coef=0.05)),
               ("dapo", dict(kl_coef=0.05, kl_is_corrected=True))]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel has wheels for x86_64 "
                    "Linux only (a dev dependency there)")
@pytest.mark.parametrize("preset,overrides", LIGER_CASES, ids=[f"{p}-{'-'.join(o) or 'plain'}" for p, o in LIGER_CASES])
def test_liger_mapping_gives_liger_s_loss(preset, overrides):
    """Every configuration the liger provider maps runs Liger's loss (compiled=False) to our loss and gradients: Liger
    computes in fp32 whatever the inputs, so to fp32 precision on float64 inputs."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    cfg = PolicyLossConfig.from_preset(preset, **overrides)
    kw, reason = providers.liger_arguments(cfg)
    assert reason is None, reason
    p = make_problem(4, 9, 16, 53, seed=3, mask_frac=0.25)
    ref_lp = p["ref_logprobs"] if cfg.kl_coef > 0 else None
    liger = LigerFusedLinearGRPOLoss(use_ref_model=ref_lp is not None, compiled=False, chunk_size=4, **kw)
    theirs = liger(p["hidden"], p["weight"], p["labels"], p["mask"].long(), p["advantages"],
                   ref_per_token_logps=ref_lp, old_per_token_logps=p["old_logprobs"])[0]
    ours = R.fused_grpo_loss(p["hidden"], p["weight"], p["labels"], p["advantages"], p["mask"],
                             old_logprobs=p["old_logprobs"], ref_logprobs=ref_lp, config=cfg).loss
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [p["hidden"], p["weight"]]),
                    torch.autograd.grad(theirs, [p["hidden"], p["weight"]])):
        torch.testing.assert_close(a, b.to(a.dtype), rtol=1e-5, atol=1e-6)


def test_quantiles():
    assert measure.quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    s = measure.summarize([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    assert s["median_ms"] == 3.5 and s["p20_ms"] == pytest.approx(2.0) and s["p80_ms"] == pytest.approx(5.0)


def test_pipelined_timing_queues_calls_back_to_back():
    """measure.time_pipelined (CUDA's second timing, with stand-in events here): one sync before the first call and
    one after the last, none between; each call's events bracket its step only (its setup's work lies outside both),
    and each call's state is gone before the next setup."""
    import weakref

    log, clock = [], iter(range(1000))

    class Event:
        def record(self):
            self.at = next(clock)
            log.append("record")

        def elapsed_time(self, end):
            return float(end.at - self.at)

    class State:
        pass

    live = []

    def setup():
        assert all(ref() is None for ref in live), "a call's state outlived it"
        log.append("setup")
        state = State()
        live.append(weakref.ref(state))
        return state

    def step(state):
        next(clock), next(clock)  # two time units inside every call
        log.append("step")

    times = measure.time_pipelined(setup, step, 3, event=Event, synchronize=lambda: log.append("sync"))
    assert times == [3.0, 3.0, 3.0]
    assert log == ["sync"] + ["setup", "record", "step", "record"] * 3 + ["sync"]
    given = []
    assert measure.time_pipelined(None, given.append, 2, event=Event, synchronize=lambda: None) == [1.0, 1.0]
    assert given == [None, None]  # no setup: the step gets None, as in time_calls


def test_pipelined_columns():
    """Rows with a pipelined time (CUDA) get its ratio to eager's, GB/s and % of the roofline's pipelined time beside
    the per-call ones, and a table column; rows without one (CPU) get neither; a demoted row loses both times."""
    base = dict(op="logits", mode="full", shape="s", M=4, H=1, V=8, dtype="bfloat16", device="cuda", preset=None,
                status="ok", bytes=3e9, flops=None, peak_mem_mb=1.0, check={}, fingerprint={})
    eager = dict(base, provider="eager", median_ms=10.0, pipelined_ms=8.0)
    ours = dict(base, provider="rlkernels-triton", median_ms=2.0, pipelined_ms=1.5)
    report.finalize_case([eager, ours])
    assert ours["ratio_vs_eager"] == pytest.approx(0.2) and ours["pipelined_ratio_vs_eager"] == pytest.approx(0.1875)
    assert ours["gbps"] == pytest.approx(1500.0) and ours["pipelined_gbps"] == pytest.approx(2000.0)
    text = report.format_table([dict(eager, device_name="gpu", batch=1, seq_len=4),
                                dict(ours, device_name="gpu", batch=1, seq_len=4)])
    assert "pipelined" in text.splitlines()[1] and " 1.5  " in text
    cpu = dict(base, device="cpu", provider="eager", median_ms=10.0)
    report.finalize_case([cpu])
    assert cpu["gbps"] == pytest.approx(300.0) and cpu["pipelined_gbps"] is None
    assert "pipelined" not in report.format_table([dict(cpu, device_name="cpu", batch=1, seq_len=4)])
    wrong = dict(ours, fingerprint={"logp": 2.0})
    report.finalize_case([dict(eager, fingerprint={"logp": 1.0}), wrong])
    assert wrong["status"] == "mismatch" and wrong["pipelined_ms"] is None and wrong["pipelined_gbps"] is None


def test_hbm_share_columns():
    """On a GPU of known bandwidth a row with a byte count gets its GB/s as a share of the peak, per call and
    pipelined, and the table an HBM column for each; an unlisted GPU and the CPU get none. The name is matched most
    specific first: an H100 PCIe is not an SXM H100."""
    base = dict(op="logits", mode="full", shape="s", M=4, H=1, V=8, dtype="bfloat16", device="cuda", preset=None,
                status="ok", bytes=3.35e9, flops=None, peak_mem_mb=1.0, check={}, fingerprint={}, batch=1,
                seq_len=4)
    rows = [dict(base, provider="eager", median_ms=4.0, pipelined_ms=2.0, device_name=name)
            for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "Some GPU")]
    for row in rows:
        report.finalize_case([row])
    assert [r["pct_hbm"] for r in rows[:3]] == pytest.approx([25.0, 3350 / 2000 / 4 * 100, 3350 / 4800 / 4 * 100])
    assert rows[0]["pipelined_pct_hbm"] == pytest.approx(50.0)
    assert rows[3]["pct_hbm"] is None and rows[3]["pipelined_pct_hbm"] is None
    text = report.format_table([rows[0]])
    assert text.splitlines()[1].count("HBM") == 2 and " 25% " in text and " 50% " in text
    assert "NVIDIA H100 80GB HBM3: 3350 GB/s" in text
    assert "HBM" not in report.format_table([rows[3]]).splitlines()[1]
    cpu = dict(base, device="cpu", provider="eager", median_ms=4.0, device_name="AMD EPYC")
    report.finalize_case([cpu])
    assert cpu["pct_hbm"] is None


def test_memory_probe_sees_a_transient_allocation():
    probe = measure.MemoryProbe("cpu")
    probe.begin()
    probe.arm()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written
    del x
    peak = probe.end()
    if probe.method.startswith("VmHWM"):
        assert 60 <= peak <= 80


def test_import_is_light():
    code = ("import sys, rlkernels, rlkernels.bench.cli; "
            "print(','.join(m for m in ('matplotlib', 'liger_kernel', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_compiled_rlkernels_provider(tmp_path, capsys):
    """rlkernels-torch-compile: the public functions under torch.compile(fullgraph=True), checked against float64
    like every provider (two presets in one process: each compiles its own objective); left out of the default
    suite, with the reason, like compile."""
    for preset in ("dapo", "cispo"):
        out = tmp_path / f"{preset}.json"
        code, _ = run(TINY + ["--in-process", "--op", "grpo,logprobs,logits", "--mode", "full",
                              "--preset", preset, "--provider", "eager,rlkernels-torch-compile", "--json", str(out)],
                      capsys)
        assert code == 0
        rows = [r for r in json.loads(out.read_text())["rows"] if r["provider"] == "rlkernels-torch-compile"]
        status = {r["op"]: r["status"] for r in rows}
        assert status == {"grpo": "ok", "logprobs": "ok", "logits": "ok"}, status
        assert [r for r in rows if r["op"] == "grpo"][0]["preset"] == preset
    assert "rlkernels-torch-compile " in report.format_table(rows)
    code, captured = run(TINY + ["--in-process", "--op", "logits", "--mode", "fwd", "--json",
                                 str(tmp_path / "default.json")], capsys)
    default = {r["provider"]: r for r in json.loads((tmp_path / "default.json").read_text())["rows"]}
    assert default["rlkernels-torch-compile"]["status"] == "skipped"
    assert "--provider rlkernels-torch-compile" in default["rlkernels-torch-compile"]["reason"]


def _pick_defaults():
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "pick_defaults.py")
    spec = importlib.util.spec_from_file_location("pick_defaults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_tune_idle_gaps():
    """bench/gpu_tune.py's idle_gaps: the stretches with no GPU work among overlapping events, longest first, each
    with where it starts and the work on either side (the one that ended last before it)."""
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "gpu_tune.py")
    spec = importlib.util.spec_from_file_location("gpu_tune", path)
    gt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gt)
    events = [(12, 20, "b"), (0, 10, "a"), (15, 18, "c"), (30, 40, "d"), (41, 42, "e"), (50, 51, "f")]
    assert gt.idle_gaps(events, n=3) == [(10, 20, "b", "d"), (8, 42, "e", "f"), (2, 10, "a", "b")]
    assert gt.idle_gaps([(0, 5, "a"), (1, 9, "b"), (9, 10, "c")]) == [] and gt.idle_gaps([]) == []


def test_pick_defaults_reads_a_sweep():
    """bench/pick_defaults.py on rows shaped like gpu_tune's: it ranks the launches, proposes a change only where the
    best leads today's default by more than the margin, flags launches whose statistics disagree, and reads the
    loss and logits rows."""
    pd = _pick_defaults()
    defaults = dict(BLOCK_V_FWD=4096, NUM_WARPS_FWD=4, BLOCK_V_BWD=4096, NUM_WARPS_BWD=8, SPLIT_TAIL=True,
                    SPLIT_TAIL_BWD=True, STATS_STAGES=1, STATS_PREFETCH=False, stats_loop="tile")
    rows = [dict(section="env", gpu="NVIDIA H100 80GB HBM3"),
            dict(section="kernel", baseline="torch.amax (read)", ms=0.3, gbs=3000.0),
            dict(section="kernel", baseline="copy_ (read + write)", ms=0.6, gbs=2900.0),
            dict(section="kernel", baseline="default tiles, masked_rows=True", stats_gbs=2000.0, dlogits_gbs=2100.0),
            dict(section="kernel", block_v=4096, warps=4, tile_split1_gbs=2000.0, tile_split1_vs_ref=0.0,
                 tile_split1p_gbs=2500.0, tile_split1p_vs_ref=0.0,
                 lanes_split1_gbs=1500.0, lanes_split1_vs_ref=3e-3, dlogits_split_gbs=2300.0),
            dict(section="kernel", block_v=1024, warps=1, tile_split1_gbs=2600.0, tile_split1_vs_ref=1e-7,
                 tile_split2_gbs=2650.0, tile_split2_vs_ref=1e-7, dlogits_split_gbs=2350.0),
            dict(section="kernel", block_v=4096, warps=8, tile_split1_gbs=1900.0, dlogits_split_gbs=2250.0,
                 dlogits_split_stream_gbs=2300.0),  # with streaming cache hints
            dict(section="kernel", block_v=8192, warps=8, error="RuntimeError('out of resources')")]
    tune = [dict(section="loss", preset="dapo", accum="auto", ms=90.0, vs_3gemm=1.12, extra_beyond_grads_mb=1000,
                 timeline_busy_ms=88.5, timeline_idle_ms=1.25, timeline_top=[["sm90_gemm", 25.0]]),
            dict(section="logits", stats="tile", value_checks="1", fwd_gbs=2500.0, bwd_gbs=2700.0, full_gbs=2650.0,
                 timeline_busy_ms=5.5, timeline_idle_ms=0.25)]
    text = pd.report(rows, tune, defaults)
    assert "HBM peak: 3350.0" in text
    assert ("PROPOSE (+32.5%): BLOCK_V_FWD = 1024, NUM_WARPS_FWD = 1, SPLIT_TAIL = True, STATS_STAGES = 2, "
            "STATS_PREFETCH = False") in text
    assert "2500.0 GB/s" in text and "block_v=4096 warps=4 split=True stages=1 prefetch=True" in text
    assert "keep the default (nothing leads it by more than 5%)" in text  # dL/dz: 2350 vs 2250 (4096 x 8)
    assert "2300.0 GB/s" in text and "block_v=4096 warps=8 split=True stream=True" in text
    assert "WARNING: 1 launches disagree" in text and "lanes 4096x4" in text
    assert "1.120x" in text and "fwd+bwd 2650 GB/s (79.1% of HBM)" in text
    assert "prefetch=False stream=False checks=1" in text
    assert "GPU busy 5.50 ms, idle 0.25 ms inside one call" in text
    assert "GPU busy 88.50 ms, idle 1.25 ms; longest: sm90_gemm 25.00" in text
    assert "masked_rows=True: statistics 2000.0 GB/s" in text
    assert "PROPOSE" not in pd.report(rows, None, defaults, margin=0.5)
    assert "the default was not measured" in pd.report(rows[4:5], None, {**defaults, "NUM_WARPS_FWD": 2})
    assert pd.current_defaults()["stats_loop"] == "tile"


def test_the_logits_op_times_calls_without_an_old_gradient(monkeypatch):
    """The logits op's timed calls start with no ``.grad`` (dropped in the untimed setup, so that its backward is not
    followed by an add into the last call's gradient: 3 passes over N x V more than the op makes); the linear ops'
    calls keep accumulating into theirs. Recorded at every backward, warm-up and timed calls alike."""
    from rlkernels.bench import harness

    seen = {}
    real = providers.AutogradRunner.backward

    def backward(self, state):
        seen.setdefault(self.case.op, []).append(all(leaf.grad is None for leaf in self.leaves.values()))
        real(self, state)
    monkeypatch.setattr(providers.AutogradRunner, "backward", backward)
    settings = harness.Settings(warmup=2, repeat=3, check=False)
    for op in ("logits", "grpo"):
        for mode in ("full", "bwd"):
            seen.clear()
            case = Case(op=op, mode=mode, shape=resolve_shape("cpu-small", 16, 8, 16, 64))
            row = harness.run_case(case, "eager", settings)
            assert row["status"] == "ok", row
            calls = seen[op]
            assert len(calls) == 1 + 1 + 3  # the first call, one more warm-up, three timed
            want = [True] + [op == "logits"] * 4  # the first call starts afresh (zero_grad) in every op
            assert calls == want, (op, mode, calls)


def test_pick_defaults_merges_runs():
    """With other runs' sweeps (--also) each launch is ranked by its mean; a change is proposed only where the best
    leads the default on the mean by more than the margin and in every run; a launch missing from a run drops out."""
    pd = _pick_defaults()
    defaults = dict(BLOCK_V_FWD=4096, NUM_WARPS_FWD=4, BLOCK_V_BWD=4096, NUM_WARPS_BWD=8, SPLIT_TAIL=True,
                    SPLIT_TAIL_BWD=True, STATS_STAGES=1, STATS_PREFETCH=False, stats_loop="tile")

    def run(default_gbs, other_gbs, extra=None):
        rows = [dict(section="env", gpu="NVIDIA H100 80GB HBM3"),
                dict(section="kernel", block_v=4096, warps=8, dlogits_split_gbs=default_gbs),
                dict(section="kernel", block_v=8192, warps=8, dlogits_masked_gbs=other_gbs)]
        if extra:
            rows.append(dict(section="kernel", block_v=1024, warps=1, dlogits_split_gbs=extra))
        return rows

    both = pd.report(run(2500.0, 2700.0, extra=9999.0), None, defaults, other_runs=[run(2500.0, 2650.0)])
    assert "2 runs merged" in both and "runs 2700, 2650" in both
    assert "PROPOSE (+7.0%): BLOCK_V_BWD = 8192, NUM_WARPS_BWD = 8, SPLIT_TAIL_BWD = False" in both
    assert "9999" not in both  # measured in one run only
    one = pd.report(run(2500.0, 3000.0), None, defaults, other_runs=[run(2500.0, 2450.0)])  # mean +9%, one run behind
    assert "PROPOSE" not in one and "keep the default" in one


# ------------------------------------------------------------------------------------------------------------------
# Cut Cross-Entropy (a stand-in module here: its Triton kernels need CUDA)
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_cce(monkeypatch):
    """A ``cut_cross_entropy`` module whose ``linear_cross_entropy`` is the exact cross-entropy in plain torch, with
    CCE's conventions (ignore index -100, those positions 0 with ``reduction="none"``), recording the targets it was
    given; the cce provider allowed on CPU."""
    import importlib.machinery
    import types

    module = types.ModuleType("cut_cross_entropy")
    module.__spec__ = importlib.machinery.ModuleSpec("cut_cross_entropy", None)
    module.calls = []

    def linear_cross_entropy(e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False,
                             filter_eps="high"):
        assert reduction == "none" and not shift
        assert filter_eps is None  # its exact mode: its default filtering failed the check on an H100
        module.calls.append(targets.clone())
        logits = (e @ c.T).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        keep = targets != ignore_index
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, c.shape[0]), targets.clamp(min=0).reshape(-1),
                                               reduction="none").reshape(targets.shape)
        return torch.where(keep, ce, torch.zeros_like(ce))

    module.linear_cross_entropy = linear_cross_entropy
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", module)
    monkeypatch.setattr(providers.CCEProvider, "devices", ("cuda", "cpu"))
    return module


def test_cce_provider_builds_the_loss_from_its_log_probs(fake_cce, capsys, tmp_path):
    """The cce provider: the per-token cross-entropy with masked positions given the ignore index, negated into
    log-probs, under the eager objective of the preset: its loss and gradients pass the float64 check (exact here,
    with the stand-in), on a padded batch."""
    out = tmp_path / "rows.json"
    code, _ = run(TINY + ["--in-process", "--provider", "eager,cce", "--pad-frac", "0.3", "--json", str(out)],
                  capsys)
    assert code == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["cce"]["status"] == "ok" and rows["cce"]["median_ms"] > 0, rows["cce"]
    assert all(c["rel_err"] <= c["allowed_rel"] for c in rows["cce"]["check"].values()), rows["cce"]["check"]
    targets = fake_cce.calls[0]
    assert (targets == -100).any() and (targets >= 0).any()  # the padding given the ignore index, the rest labels


def test_softcap_reaches_every_provider_and_the_rows(fake_cce, capsys, tmp_path):
    """--softcap: eager, rlkernels and CCE compute on the capped logits (each passes the float64 check against the
    capped reference), Liger, which takes no cap, is skipped saying so; the rows and the table name the cap."""
    out = tmp_path / "rows.json"
    code, printed = run(TINY + ["--in-process", "--op", "grpo,logprobs", "--provider",
                                "eager,rlkernels-torch,cce,liger", "--softcap", "0.5", "--json", str(out)], capsys)
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["softcap"] == 0.5 for r in rows)
    for r in rows:
        if r["provider"] == "liger" and r["op"] == "grpo":
            assert r["status"] == "skipped" and "no final-logit softcap" in r["reason"]
        elif r["status"] != "skipped":
            assert r["status"] == "ok", r
            assert all(c["rel_err"] <= c["allowed_rel"] for c in r["check"].values()), r["check"]
    assert {(r["op"], r["provider"]) for r in rows if r["status"] == "ok"} >= {
        ("grpo", "eager"), ("grpo", "rlkernels-torch"), ("grpo", "cce"), ("logprobs", "rlkernels-torch")}
    assert "grpo (dapo) softcap=0.5 full" in printed.out
    # the cap changes what is computed: the loss differs from an uncapped run of the same inputs
    capped = next(r for r in rows if r["op"] == "grpo" and r["provider"] == "eager")["fingerprint"]
    run(TINY + ["--in-process", "--op", "grpo", "--provider", "eager", "--json", str(out)], capsys)
    plain = json.loads(out.read_text())["rows"][0]["fingerprint"]
    assert capped != plain


def test_cce_provider_skips_what_it_cannot_compute(fake_cce, monkeypatch):
    shape = resolve_shape("qwen2.5-7b", tokens=32, hidden=16, vocab=64)
    cce = providers.CCEProvider()
    assert cce.unavailable(Case(op="grpo", mode="full", shape=shape)) is None
    assert "no 'logits' op" in cce.unavailable(Case(op="logits", mode="full", shape=shape))
    assert "no entropy" in cce.unavailable(Case(op="grpo", mode="full", shape=shape,
                                                overrides=(("entropy_coef", 0.01),)))
    monkeypatch.setattr(providers.CCEProvider, "devices", ("cuda",))
    assert "need CUDA" in cce.unavailable(Case(op="grpo", mode="full", shape=shape))
    monkeypatch.delitem(sys.modules, "cut_cross_entropy")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cut_cross_entropy" else real_find_spec(name, *a))
    assert "pip install cut-cross-entropy" in cce.unavailable(Case(op="grpo", mode="full", shape=shape,
                                                                    device="cuda"))


def test_trl_provider_runs_and_checks(capsys, tmp_path):
    """The trl provider (TRL's own kernels: its fused LM head's log-probs, under the eager objective for the grpo op)
    passes the float64 check on the logprobs and grpo ops, with padding (TRL scores the kept rows), an entropy
    preset and a softcap; the logits op is left to CUDA with its reason."""
    out, logits = tmp_path / "trl.json", tmp_path / "trl-logits.json"
    code, _ = run(TINY + ["--in-process", "--op", "logprobs,grpo", "--provider", "eager,trl", "--pad-frac", "0.3",
                          "--preset", "dapo", "--set", "entropy_coef=0.01", "--softcap", "5", "--json", str(out)],
                  capsys)
    assert code == 0
    code, _ = run(TINY + ["--in-process", "--op", "logits", "--provider", "eager,trl", "--json", str(logits)], capsys)
    assert code == 0
    rows = {(r["op"], r["provider"]): r for f in (out, logits) for r in json.loads(f.read_text())["rows"]}
    for op in ("logprobs", "grpo"):
        row = rows[(op, "trl")]
        assert row["status"] == "ok" and row["median_ms"] > 0, row
        assert all(c["rel_err"] <= c["allowed_rel"] for c in row["check"].values()), row["check"]
        assert row["trl_version"] is not None
    assert rows[("logits", "trl")]["status"] == "skipped" and "needs CUDA" in rows[("logits", "trl")]["reason"]


def test_trl_provider_without_trl_s_training_stack(capsys, tmp_path, monkeypatch):
    """Where trl.trainer.utils cannot be imported (the lent H100's image has no datasets: the backward of TRL's fused
    LM head imports one function from it), a null context stands in for that function, the rows pass the float64
    check and their notes say so, for every case of the run."""
    monkeypatch.setitem(sys.modules, "trl.trainer.utils", None)  # import of trl.trainer.utils: ImportError
    out = tmp_path / "trl.json"
    code, _ = run(TINY + ["--in-process", "--op", "logprobs,grpo", "--provider", "trl", "--preset", "dapo",
                          "--json", str(out)], capsys)
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["op"] for r in rows] == ["logprobs", "grpo"]
    for row in rows:
        assert row["status"] == "ok" and all(c["rel_err"] <= c["allowed_rel"] for c in row["check"].values()), row
        assert any("stood in" in n and "import of trl.trainer.utils halted" in n for n in row["notes"]), row["notes"]


def test_trl_provider_reasons(monkeypatch):
    shape = resolve_shape("qwen2.5-7b", tokens=32, hidden=16, vocab=64)
    trl = providers.TRLProvider()
    assert trl.unavailable(Case(op="grpo", mode="full", shape=shape)) is None
    assert "no op to time" in trl.unavailable(Case(op="advantages", mode="full", shape=shape))
    monkeypatch.setattr(providers, "_trl_version", lambda: (1, 4))
    assert "trl 1.4 has no trl.kernels" in trl.unavailable(Case(op="grpo", mode="full", shape=shape))
    monkeypatch.setattr(providers, "_trl_version", lambda: None)
    assert "pip install trl" in trl.unavailable(Case(op="grpo", mode="full", shape=shape))
