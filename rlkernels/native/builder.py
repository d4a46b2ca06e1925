"""The single source of truth for building the native CPU engine: its sources, flags and module names.

Used two ways:

* JIT (first use): :meth:`NativeBuilder.jit_load` calls ``torch.utils.cpp_extension.load`` with ninja; the build
  is cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
* ahead of time: ``RLKERNELS_BUILD_NATIVE=1 pip install --no-build-isolation .`` makes ``setup.py`` build
  :meth:`NativeBuilder.aot_extensions`, one module per instruction-set variant, into ``rlkernels/native/``.

Instruction sets. ATen's ``Vectorized<float>`` picks its implementation at compile time from ``CPU_CAPABILITY_*``
macros, exactly as ATen's own kernels do (compiled once per capability, chosen at run time). We do the same with
whole modules: one build per variant in :data:`VARIANTS`, each with explicit ISA flags, chosen at run time from
``torch.backends.cpu.get_cpu_capability()`` (which honours ``ATEN_CPU_CAPABILITY``). No ``-march=native``: an AOT
wheel must run on any x86-64 machine, and a JIT build cached in a home directory shared by machines of different
CPUs (NFS clusters) must not SIGILL on the next one. The variant is part of the module name, so each instruction
set gets its own cached build, and the flags enable nothing beyond what torch itself runs on this CPU.

This file imports nothing from rlkernels (``setup.py`` loads it by path) and imports torch only inside methods.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

HERE = Path(__file__).resolve().parent

# Flags per ATen CPU capability: the ones ATen compiles its own kernels of that capability with
# (cmake/Codegen.cmake in the pytorch repo), plus the macros that select Vectorized<T>'s implementation.
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"),
    "DEFAULT": ("-DCPU_CAPABILITY=DEFAULT",),
}
# -O3 for the vectorised loops; no -ffast-math: the kernels rely on inf and nan semantics (-inf logits).
COMMON_FLAGS: Tuple[str, ...] = ("-O3", "-fno-math-errno")
# OpenMP, as ATen is built: at::parallel_for is a header template whose parallel branch compiles only under _OPENMP;
# without the flag the kernels' row loops ran on one thread whatever torch.set_num_threads said (block_stats on a
# 4096 x 32000 fp32 block: 52.8 ms on 1 thread and 52.9 on 2, 2026-11-27). The module links libgomp.so.1, which the
# loader finds already loaded by libtorch_cpu (the same soname): one OpenMP runtime, torch's thread count.
OPENMP_FLAGS: Tuple[str, ...] = ("-fopenmp",)


def _default_source_dir() -> Path:
    installed = HERE / "csrc"  # copied into the package by setup.py's build_py
    return installed if installed.is_dir() else HERE.parents[1] / "csrc"


@dataclass(frozen=True)
class NativeBuilder:
    """Sources, flags and names of the native extension. Immutable: tests build a variant with
    ``dataclasses.replace`` (e.g. a deliberately broken source)."""

    name: str = "rlkernels_native"
    source_dir: Path = field(default_factory=_default_source_dir)
    sources: Tuple[str, ...] = ("bindings.cpp", "row_kernels.cpp")
    headers: Tuple[str, ...] = ("row_kernels.h",)
    # the AOT modules live in this package: rlkernels.native._C_<variant>
    aot_package: str = "rlkernels.native"
    aot_prefix: str = "_C_"

    def source_paths(self) -> List[str]:
        return [str(self.source_dir / s) for s in self.sources]

    @staticmethod
    def variant() -> str:
        """The variant for this CPU: torch's own dispatch level, mapped onto :data:`VARIANTS`."""
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
        return cap if cap in VARIANTS else "DEFAULT"

    def cflags(self, variant: str) -> List[str]:
        return [*COMMON_FLAGS, *self.openmp_flags(), *VARIANTS[variant]]

    @staticmethod
    def openmp_flags() -> List[str]:
        """:data:`OPENMP_FLAGS` where torch itself runs on OpenMP on Linux (its ``at::parallel_for``), else none."""
        import torch

        return list(OPENMP_FLAGS) if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []

    def build_flags(self, variant: str) -> List[str]:
        """:meth:`cflags` plus the digest, which the module reports (``build_digest()``) so that a prebuilt module
        older than the sources is never used."""
        return [*self.cflags(variant), f"-DRLK_BUILD_DIGEST={self.digest(variant)}"]

    def digest(self, variant: str) -> str:
        """A short hash of the sources, flags and torch version: a JIT build is keyed on it, so a changed source
        or another torch never loads a stale module, and two installs sharing the cache never rebuild each other's."""
        import torch

        h = hashlib.sha1()
        for path in [*self.source_paths(), *(str(self.source_dir / s) for s in self.headers)]:
            try:
                h.update(Path(path).read_bytes())
            except OSError:
                h.update(path.encode())  # a missing source fails in the build, with the compiler's message
        h.update(" ".join(self.cflags(variant)).encode())
        h.update(torch.__version__.encode())
        return h.hexdigest()[:10]

    def jit_name(self, variant: str) -> str:
        return f"{self.name}_{variant.lower()}_{self.digest(variant)}"

    def aot_module(self, variant: str) -> str:
        return f"{self.aot_package}.{self.aot_prefix}{variant.lower()}"

    def jit_build_dir(self, variant: str) -> Path:
        from torch.utils.cpp_extension import _get_build_directory

        return Path(_get_build_directory(self.jit_name(variant), verbose=False))

    def jit_is_cached(self, variant: str) -> bool:
        """Whether a finished JIT build of this exact source and flags is on disk (then loading takes ~1 s)."""
        build_dir = self.jit_build_dir(variant)
        return (build_dir / f"{self.jit_name(variant)}.so").is_file()

    def jit_load(self, variant: str, verbose: bool = False):
        """Build (if needed, with ninja) and import the module for ``variant``; raises what
        ``torch.utils.cpp_extension.load`` raises on failure."""
        from torch.utils.cpp_extension import load

        return load(name=self.jit_name(variant), sources=self.source_paths(), extra_cflags=self.build_flags(variant),
                    extra_ldflags=self.openmp_flags(), extra_include_paths=[str(self.source_dir)], verbose=verbose)

    def aot_extensions(self, variants: Sequence[str] = tuple(VARIANTS)) -> list:
        """``CppExtension`` objects for ``setup.py``: one module per instruction-set variant."""
        from torch.utils.cpp_extension import CppExtension

        rel = os.path.relpath(self.source_dir, Path.cwd())
        return [CppExtension(self.aot_module(v), [os.path.join(rel, s) for s in self.sources],
                             include_dirs=[str(self.source_dir)], extra_compile_args={"cxx": self.build_flags(v)},
                             extra_link_args=self.openmp_flags())
                for v in variants]


BUILDER = NativeBuilder()
