"""``rlkernels-bench``: the command line. Builds the suite (cases x providers), runs each provider in a fresh worker
process (or in-process with ``--in-process``), and prints the table; ``--json`` and ``--plot`` write the same rows.

Only the standard library, torch and rlkernels are imported at module level; tqdm and matplotlib load when used.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import PRESETS, resolve_config
from . import measure, report
from .harness import Settings, run_case
from .providers import all_providers, get_provider, provider_names
from .shapes import DEFAULT_SHAPE, SHAPES, resolve_shape
from .workloads import DTYPE_ALIASES, DTYPES, LINEAR_OPS, MODES, OBJECTIVE_OPS, OPS, Case

# The quick suite (no --op/--mode): the op users adopt us for, forward+backward. On the 2-core CPU machine one eager
# grpo fwd+bwd at cpu-small takes ~3.5 s, so each provider's process start (~2 s) + check (~1.5 s) + inputs (~1 s)
# + 1 warm-up + 3 timed calls takes ~15-20 s, ~90 s for five providers; the logits op would add ~20 s more and
# is left to --op logits. On a GPU each provider's process spends ~10 s starting CUDA and making 7B-sized inputs.
QUICK = {"cpu": {"ops": ("grpo",), "modes": ("full",)}, "cuda": {"ops": ("grpo",), "modes": ("full",)}}
DEFAULT_COUNTS = {"cpu": (1, 3), "cuda": (3, 10)}  # (warm-up, timed) calls
# compile is left out unless asked for: its first call at each shape compiles for 30-60 s on the CPU machine
COMPILE_EXCLUDED = ("not in the default suite: torch.compile warms up for 30-60 s per shape; "
                    "run with --provider compile (or all, or --full)")

EPILOG = f"""
ops:        logprobs (hidden, W -> logp, entropy), logits (logits -> logp, entropy),
            grpo (hidden, W -> the loss of --preset), advantages (rewards -> group advantages; fwd only),
            policy (per-token logp, entropy -> the loss of --preset: the objective alone)
modes:      fwd  = the forward of a training step (inputs require grad; single-pass kernels already form
                   the gradients here, so their bwd is nearly free; compare 'full' for the whole step)
            bwd  = the backward alone (the forward runs untimed before each call)
            full = forward + backward
providers:  {', '.join(provider_names())}, or 'all'
shapes:     {'; '.join(s.describe() for s in SHAPES.values())}
presets:    {', '.join(sorted(PRESETS))}

Every provider is first checked at a small shape (--check-tokens, same H, V and dtype) against the float64
reference: loss, outputs and gradients must satisfy ||ours - fp64|| <= 2 ||eager - fp64|| + floor(dtype) ||fp64||
(floor: 2e-6 fp32, 4e-3 bf16, 1e-3 fp16).
A provider that fails is reported as MISMATCH and not timed; so is one whose values at the bench shape differ from
eager's. Each provider then runs in a fresh process: 1st call (warm-up, allocates gradient buffers), further
warm-ups, then the timed calls (median, 20th and 80th percentiles), each probed outside its timed interval for
its transient peak memory above inputs and gradient buffers (Linux RSS high-water mark on the CPU,
max_memory_allocated on CUDA; the table shows the largest).

Exit status: 0 when every provider ran or was skipped with a reason; 1 when one failed its check or crashed;
2 on bad arguments. With no arguments: the quick suite of this machine (cpu-small grpo dapo fwd+bwd fp32 on a CPU).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (``rlkernels-bench --help`` shows it)."""
    p = argparse.ArgumentParser(
        prog="rlkernels-bench", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Speed and memory of rlkernels against eager PyTorch, torch.compile, Liger-Kernel and the "
                    "GEMM roofline. Lists take comma-separated values.")
    s = p.add_argument_group("suite")
    s.add_argument("--op", help=f"op(s): {', '.join(OPS)} or all (default: the quick suite's)")
    s.add_argument("--mode", help=f"mode(s): {', '.join(MODES)} or all (default: full)")
    s.add_argument("--provider", help="provider(s) or all (default: all but compile)")
    s.add_argument("--quick", action="store_true", help="the quick suite of this device (the default)")
    s.add_argument("--full", action="store_true", help="every op x mode x provider (long)")
    s.add_argument("--list", action="store_true", help="list providers (with availability), shapes and exit")
    z = p.add_argument_group("problem")
    z.add_argument("--shape", help=f"named shape: {', '.join(SHAPES)} (default: cpu-small on CPU, qwen2.5-7b on "
                                   "CUDA)")
    z.add_argument("--tokens", type=int, help="tokens M (= batch x seq_len)")
    z.add_argument("--seq-len", type=int, help="tokens per sequence T (default: the shape's, if it divides M)")
    z.add_argument("--hidden", type=int, help="override the hidden size H")
    z.add_argument("--vocab", type=int, help="override the vocabulary size V")
    z.add_argument("--dtype", help="float32 / bfloat16 / float16 (fp32, bf16, fp16; default fp32 CPU, bf16 CUDA)")
    z.add_argument("--preset", default="dapo", help="loss preset of the grpo op (default: dapo)")
    z.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a PolicyLossConfig field of the preset, e.g. --set kl_coef=0.04 (repeatable)")
    z.add_argument("--on-policy", action="store_true", help="grpo without old_logprobs (ratio 1, one update per "
                                                              "batch); default: old log-probs 10%% off")
    z.add_argument("--pad-frac", type=float, default=0.0, help="grpo: up to this fraction of each sequence is "
                                                                "padding (default 0)")
    z.add_argument("--group-size", type=int, default=16, help="advantages: responses per prompt (default 16)")
    z.add_argument("--softcap", type=float, help="logprobs / grpo: the final-logit cap, softcap * tanh(logits / "
                   "softcap) (Gemma 2 / 4: 30); default none")
    z.add_argument("--seed", type=int, default=0, help="seed of the inputs (default 0)")
    m = p.add_argument_group("measurement")
    m.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if available")
    m.add_argument("--warmup", type=int, help="untimed calls before the memory and timed calls (default 1 CPU, "
                                              "3 CUDA; at least 1)")
    m.add_argument("--repeat", type=int, help="timed calls (default 3 CPU, 10 CUDA)")
    m.add_argument("--check-tokens", type=int, default=64, help="tokens of the correctness check (default 64)")
    m.add_argument("--no-check", action="store_true", help="skip the correctness check (rows say 'unchecked')")
    m.add_argument("--no-memory", action="store_true", help="do not probe peak memory")
    m.add_argument("--no-pipelined", action="store_true", help="CUDA: do not also time the calls back to back "
                   "(pipelined_ms: no sync between calls, the host preparing each while the GPU runs the last)")
    m.add_argument("--in-process", action="store_true", help="run providers in this process instead of one fresh "
                                                             "process each (faster; memory numbers less exact)")
    m.add_argument("--timeout", type=float, default=900.0, help="seconds per provider before it is reported as "
                                                                "timed out (default 900)")
    m.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE (in every worker too) before running; it may call "
                        "rlkernels.bench.providers.register_provider")
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write one JSON row per measurement")
    o.add_argument("--plot", metavar="FILE.png", help="write time and memory bars (matplotlib)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _split(value: Optional[str], choices: Sequence[str], flag: str, parser: argparse.ArgumentParser) -> List[str]:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    if "all" in items:
        return list(choices)
    bad = [v for v in items if v not in choices]
    if bad or not items:
        parser.error(f"{flag}={value!r}: unknown {', '.join(bad) or 'empty list'}; choose from "
                     f"{', '.join(choices)} or all")
    return list(dict.fromkeys(items))


def _parse_overrides(items: List[str], preset: str, parser) -> Tuple[Tuple[str, Any], ...]:
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            value = raw.strip()
        out.append((key.strip(), value))
    if preset not in PRESETS:
        parser.error(f"--preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    try:
        resolve_config(preset, **dict(out))
    except (TypeError, ValueError) as exc:
        parser.error(f"--set: {exc}")
    return tuple(out)


def resolve_args(args: argparse.Namespace, parser: argparse.ArgumentParser
                 ) -> Tuple[List[Case], List[str], Dict[str, str], Settings]:
    """Turn the parsed arguments into (cases, providers, excluded providers -> reason, settings); errors exit 2."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: CUDA is not available (torch {torch.__version__})")
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other")
    quick = QUICK[device]
    ops = _split(args.op, OPS, "--op", parser) if args.op else (list(OPS) if args.full else list(quick["ops"]))
    modes = _split(args.mode, MODES, "--mode", parser) if args.mode else (
        list(MODES) if args.full else list(quick["modes"]))
    names = provider_names()
    excluded: Dict[str, str] = {}
    if args.provider:
        providers = _split(args.provider, names, "--provider", parser)
    else:
        providers = list(names)
        if not args.full:  # compile and every rlkernels-<engine>-compile
            excluded.update({n: COMPILE_EXCLUDED.replace("compile (", f"{n} (")
                             for n in names if n == "compile" or n.endswith("-compile")})
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype!r}: choose one of {', '.join(DTYPES)} (or {', '.join(DTYPE_ALIASES)})")
    try:
        shape = resolve_shape(args.shape or DEFAULT_SHAPE[device], args.tokens, args.seq_len, args.hidden, args.vocab)
    except ValueError as exc:
        parser.error(str(exc))
    if not 0.0 <= args.pad_frac < 1.0:
        parser.error(f"--pad-frac={args.pad_frac}: must be in [0, 1)")
    if args.group_size <= 0:
        parser.error(f"--group-size={args.group_size}: must be positive")
    if "advantages" in ops and shape.tokens % args.group_size:
        parser.error(f"the advantages op needs --tokens ({shape.tokens}) to be a multiple of --group-size "
                     f"({args.group_size})")
    if args.softcap is not None:
        if not (math.isfinite(args.softcap) and args.softcap > 0):
            parser.error(f"--softcap={args.softcap}: must be finite and > 0")
        others = [op for op in ops if op not in LINEAR_OPS]
        if others:
            parser.error(f"--softcap applies to the ops that compute the logits ({', '.join(LINEAR_OPS)}), not to "
                         f"{', '.join(others)}")
    overrides = _parse_overrides(args.overrides, args.preset, parser)
    warmup, repeat = DEFAULT_COUNTS[device]
    warmup = warmup if args.warmup is None else args.warmup
    repeat = repeat if args.repeat is None else args.repeat
    if warmup < 1 or repeat < 1:
        parser.error("--warmup and --repeat must be at least 1")
    if args.check_tokens < 1:
        parser.error("--check-tokens must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    cases = []
    for op in ops:
        for mode in modes:
            if op == "advantages" and mode != "fwd":
                continue  # constants: no backward (the table says so once, below, when asked for explicitly)
            cases.append(Case(op=op, mode=mode, shape=shape, dtype=dtype, device=device, preset=args.preset,
                              overrides=overrides, on_policy=args.on_policy, pad_frac=args.pad_frac,
                              group_size=args.group_size, seed=args.seed, softcap=args.softcap))
    if not cases:
        parser.error("the advantages op has no backward: use --mode fwd")
    settings = Settings(warmup=warmup, repeat=repeat, check=not args.no_check, check_tokens=args.check_tokens,
                        memory=not args.no_memory, pipelined=not args.no_pipelined)
    return cases, providers, excluded, settings


# ------------------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------------------
def run_worker(case: Case, provider: str, settings: Settings, plugins: List[str], timeout: float
               ) -> Dict[str, Any]:
    """Run one measurement in a fresh ``python -m rlkernels.bench._worker`` process; returns its row fields."""
    spec = {"case": case.to_dict(), "provider": provider, "settings": settings.to_dict(), "plugins": plugins}
    env = dict(os.environ)
    # the worker must import what this process can (plugins found through a modified sys.path included)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).strip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="rlkernels-bench-") as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "row.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        try:
            proc = subprocess.run([sys.executable, "-m", "rlkernels.bench._worker", spec_path, out_path], env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "timeout", "reason": f"no result within --timeout {timeout:g} s"}
        if os.path.exists(out_path):
            with open(out_path) as f:
                return json.load(f)
    tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:])
    if proc.returncode in (-9, 137):
        return {"status": "error", "reason": f"worker killed (SIGKILL: out of memory?) {tail}".strip()}
    return {"status": "error", "reason": f"worker exited {proc.returncode}: {tail}"[:500]}


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc="rlkernels-bench", unit="run", file=sys.stderr, leave=False)
        except ImportError:
            pass

    class _Null:
        def update(self, n=1):
            pass

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass
    return _Null()


def _base_row(case: Case, name: str, settings: Settings, device_name: str, env: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "op": case.op, "mode": case.mode, "provider": name, "shape": case.shape.name, "M": case.shape.tokens,
        "H": case.shape.hidden, "V": case.shape.vocab, "batch": case.shape.batch, "seq_len": case.shape.seq_len,
        "dtype": case.dtype, "device": case.device, "device_name": device_name,
        "preset": case.preset if case.op in OBJECTIVE_OPS else None,
        "overrides": dict(case.overrides) if case.op in OBJECTIVE_OPS else None, "on_policy": case.on_policy,
        "pad_frac": case.pad_frac, "softcap": case.softcap, "warmup": settings.warmup, "repeat": settings.repeat,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **env,
    }


def run_suite(cases: List[Case], providers: List[str], excluded: Dict[str, str], settings: Settings, *,
              in_process: bool = False, timeout: float = 900.0, plugins: Sequence[str] = (),
              progress: bool = True) -> List[Dict[str, Any]]:
    """Every case x provider; returns the rows in table order, derived columns filled.

    eager runs first (the others are compared with it) and compile last (its warm-up is the longest: under a
    time limit, as in ``bench/device_check.sh``, the rest are then already measured). An interrupt (Ctrl-C, or
    SIGTERM from ``timeout``) stops the suite: the rows measured so far are kept, the rest marked ``interrupted``.
    """
    env = measure.versions()
    order = [p.name for p in all_providers()]
    rank = {n: order.index(n) if n in order else len(order) for n in providers}
    run_order = sorted(providers, key=lambda n: (n == "compile", rank[n]))
    bar = _progress(len(cases) * len(providers), progress)
    rows: List[Dict[str, Any]] = []
    device_names: Dict[str, str] = {}
    interrupted = False
    cache = tempfile.TemporaryDirectory(prefix="rlkernels-bench-inputs-")
    settings = dataclasses.replace(settings, cache_dir=cache.name)
    try:
        for case in cases:
            if case.device not in device_names:
                device_names[case.device] = measure.device_name(case.device)
            case_rows = []
            for name in run_order:
                row = _base_row(case, name, settings, device_names[case.device], env)
                case_rows.append(row)
                if interrupted:
                    row.update(status="interrupted", reason="the suite was interrupted before this ran")
                    continue
                bar.set_postfix_str(f"{case.op}/{case.mode} {name}")
                try:
                    reason = excluded.get(name) or get_provider(name).unavailable(case)
                    if reason:
                        row.update(status="skipped", reason=reason)
                    elif in_process:
                        row.update(run_case(case, name, settings))
                    else:
                        row.update(run_worker(case, name, settings, list(plugins), timeout))
                except KeyboardInterrupt:
                    interrupted = True
                    row.update(status="interrupted", reason="interrupted while running")
                bar.update(1)
            case_rows.sort(key=lambda r: rank[r["provider"]])
            report.finalize_case(case_rows)
            rows.extend(case_rows)
    finally:
        bar.close()
        cache.cleanup()
    return rows


def _list(device: str) -> str:
    lines = ["providers:"]
    probe = Case(op="grpo", mode="full", shape=SHAPES["cpu-small"], device=device)
    for p in all_providers():
        reason = p.unavailable(probe)
        lines.append(f"  {p.name:<16} {p.description}" + (f"  [grpo: {reason}]" if reason else ""))
    lines.append("shapes:")
    lines += [f"  {s.describe()}" for s in SHAPES.values()]
    lines.append(f"presets: {', '.join(sorted(PRESETS))}")
    return "\n".join(lines)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``rlkernels-bench`` / ``python -m rlkernels.bench``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for module in args.plugin:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            parser.error(f"--plugin {module}: {exc}")
    if args.list:
        print(_list("cuda" if args.device == "cuda" else "cpu"))
        return 0
    cases, providers, excluded, settings = resolve_args(args, parser)
    # SIGTERM (from `timeout`) ends the suite like Ctrl-C: what was measured is still printed and written
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.perf_counter()
    try:
        rows = run_suite(cases, providers, excluded, settings, in_process=args.in_process, timeout=args.timeout,
                         plugins=args.plugin, progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(report.format_table(rows, width=max(120, shutil.get_terminal_size((140, 24)).columns)))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    command = ["rlkernels-bench", *(sys.argv[1:] if argv is None else list(argv))]
    if args.json:
        report.write_json(args.json, rows, command)
        print(f"wrote {args.json}")
    failed = any(r["status"] in ("mismatch", "error", "interrupted") for r in rows)
    if args.plot:
        try:
            report.write_plot(args.plot, rows)
            print(f"wrote {args.plot}")
        except ImportError as exc:  # the table and JSON are already out; say what is missing
            print(f"--plot: matplotlib is not importable ({exc}); pip install matplotlib", file=sys.stderr)
            failed = True
    return 1 if failed else 0
