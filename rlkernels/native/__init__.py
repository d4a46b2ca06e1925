"""The native C++ CPU engine: finding, building and loading the extension, and saying why when it cannot.

``load()`` returns the compiled module (``csrc/``), trying in order:

1. a module built ahead of time by ``RLKERNELS_BUILD_NATIVE=1 pip install --no-build-isolation .``
   (``rlkernels.native._C_<variant>``), if it was built from the current sources;
2. a JIT build with ``torch.utils.cpp_extension.load`` and ninja, cached in torch's extension directory
   (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): ~1 min on 2 cores the first time, ~1 s after.

When neither works (no compiler, no ninja, a failed build), the first ``load()`` emits ONE ``RuntimeWarning`` that
says why and how to fix it, and raises :class:`NativeUnavailable`; the engine registry then uses the torch engine.
The full error (compiler output included) stays available from :func:`status`. ``RLKERNELS_DISABLE_NATIVE=1`` turns
the engine off without a warning.

The registry (:mod:`rlkernels.engines`) calls ``load()`` lazily: ``import rlkernels`` never builds anything.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from typing import Any, Dict, Optional

from .builder import BUILDER, VARIANTS, NativeBuilder

DISABLE_ENV = "RLKERNELS_DISABLE_NATIVE"
# Measured JIT build of csrc/ on the project's 2-core machine (gcc 12, torch 2.13, AVX512 variant): 29 s idle,
# 45-57 s with other jobs running (75 s for the AVX2 variant under heavy load).
BUILD_ESTIMATE = "~1 min on 2 cores"


class NativeUnavailable(RuntimeError):
    """The native engine cannot be used here; the message says why and how to fix it."""


class _State:
    def __init__(self) -> None:
        self.module: Any = None
        self.source: Optional[str] = None  # "prebuilt" or "jit"
        self.error: Optional[str] = None  # short reason (the warning's)
        self.detail: Optional[str] = None  # full text: compiler output, traceback message
        self.lock = threading.Lock()


_STATE = _State()


def disabled() -> bool:
    """Whether ``RLKERNELS_DISABLE_NATIVE`` asks for the engine to stay off (read at each call)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def load():
    """The extension module, building it on first use; raises :class:`NativeUnavailable` with the reason.

    ``RLKERNELS_DISABLE_NATIVE`` is read until the module is loaded; an engine already in use stays in use.
    """
    if _STATE.module is not None:
        return _STATE.module
    if disabled():
        raise NativeUnavailable(f"disabled by {DISABLE_ENV}={os.environ.get(DISABLE_ENV)}")
    with _STATE.lock:
        if _STATE.module is None and _STATE.error is None:
            _attempt(BUILDER)
    if _STATE.module is None:
        raise NativeUnavailable(_STATE.error)
    return _STATE.module


def status() -> Dict[str, Optional[str]]:
    """Where the native engine stands, loading (and on first use building) it unless it is disabled.

    Returns a dict: ``status`` (``"available"``, ``"disabled"`` or ``"unavailable"``), ``reason`` (why not, with
    the fix), ``detail`` (the full build error), ``variant`` (the instruction set: AVX512, AVX2, DEFAULT),
    ``source`` (``"prebuilt"`` or ``"jit"``) and ``path`` (the loaded shared library).
    """
    out: Dict[str, Optional[str]] = dict(status=None, reason=None, detail=None, variant=None, source=None, path=None)
    if disabled():
        out.update(status="disabled", reason=f"{DISABLE_ENV}={os.environ.get(DISABLE_ENV)}")
        return out
    try:
        module = load()
    except NativeUnavailable as exc:
        out.update(status="unavailable", reason=str(exc), detail=_STATE.detail)
        return out
    out.update(status="available", variant=module.capability(), source=_STATE.source,
               path=getattr(module, "__file__", None))
    return out


# ----------------------------------------------------------------------------------------------------------------
def _attempt(builder: NativeBuilder) -> None:
    """One load attempt; fills _STATE with the module, or with the error after warning once."""
    variant = builder.variant()
    module = _prebuilt(builder, variant)
    if module is not None:
        _STATE.module, _STATE.source = module, "prebuilt"
        return
    reason, fix, detail = _jit_prerequisites(builder)
    if reason is None:
        reason, fix = _stale_build_lock(builder, variant)
    if reason is None:
        try:
            _STATE.module, _STATE.source = _jit(builder, variant), "jit"
            return
        except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as exc:
            # torch raises RuntimeError("Error building extension ...") with the compiler output; OSError and
            # SubprocessError when a tool cannot run; ImportError when the built library does not load
            detail = f"{type(exc).__name__}: {exc}"
            reason = f"building it failed ({_first_error_line(detail)})"
            fix = ("see rlkernels.native.status()['detail'] for the compiler output; a compiler with C++17 and "
                   "AVX intrinsics (gcc >= 9 or clang >= 10) is needed")
    _STATE.error = f"the native CPU engine is unavailable: {reason}. Fix: {fix}."
    _STATE.detail = detail
    warnings.warn(f"rlkernels: {_STATE.error} Using the slower torch engine instead; set {DISABLE_ENV}=1 to "
                  "silence this warning.", RuntimeWarning, stacklevel=2)


def _prebuilt(builder: NativeBuilder, variant: str):
    """The AOT module for ``variant`` if one is installed and was built from the current sources, else None."""
    try:
        module = importlib.import_module(builder.aot_module(variant))
    except ImportError:  # not built ahead of time (ModuleNotFoundError), or built against another torch
        return None
    built_from = getattr(module, "build_digest", lambda: None)()
    if built_from != builder.digest(variant):
        return None  # stale: sources, flags or torch changed since `pip install`; JIT-build the current ones
    return module


def _jit_prerequisites(builder: NativeBuilder):
    """(reason, fix, detail) when a JIT build cannot even start, else (None, None, None)."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = [p for p in builder.source_paths() if not os.path.isfile(p)]
    if missing:
        return (f"its C++ sources are not installed (missing {missing[0]})",
                "reinstall rlkernels from a wheel or source tree that includes csrc/", None)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler found (looked for {compiler!r} on PATH)",
                "install one (apt install g++, or xcode-select --install on macOS) or point CXX at it", None)
    if not is_ninja_available():
        return "ninja is not installed", "pip install ninja", None
    return None, None, None


# torch's JIT build holds a lock file in the build directory while it compiles and removes it when done; a build killed
# mid-way (Ctrl-C during the first call, a job's time limit) leaves it, and every later build waits for it to go,
# forever and silently (seen on this project's machine: a test run hung 11 min). A build takes about a minute on 2
# cores (BUILD_ESTIMATE), so a lock this much older than that was left by one that is no longer running.
STALE_LOCK_S = 1800.0


def _stale_build_lock(builder: NativeBuilder, variant: str):
    """(reason, fix) when the JIT build directory holds a lock older than STALE_LOCK_S, else (None, None). Checked
    for a finished build too: torch takes the lock before it looks at what is built."""
    lock = builder.jit_build_dir(variant) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None, None
    if age <= STALE_LOCK_S:
        return None, None
    return (f"its build directory holds a lock file {age / 60:.0f} min old ({lock}), left by a build that was "
            "interrupted; torch would wait for it forever",
            f"make sure no other process is building it, delete {lock} and call again")


def _jit(builder: NativeBuilder, variant: str):
    if builder.jit_is_cached(variant):
        return builder.jit_load(variant)
    sys.stderr.write(f"rlkernels: building the native CPU engine (first use, {BUILD_ESTIMATE}; {variant})... ")
    sys.stderr.flush()
    start = time.perf_counter()
    try:
        module = builder.jit_load(variant)
    except BaseException:
        sys.stderr.write("failed\n")
        raise
    sys.stderr.write(f"done in {time.perf_counter() - start:.0f} s\n")
    return module


def _first_error_line(text: str) -> str:
    """The compiler's first 'error' line, or the first line of the message."""
    for line in text.splitlines():
        if "error:" in line.lower():
            return line.strip()[:300]
    return text.splitlines()[0][:300] if text else "unknown error"


__all__ = ["load", "status", "disabled", "NativeUnavailable", "BUILDER", "NativeBuilder", "VARIANTS"]
