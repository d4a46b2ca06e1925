"""setup.py shim: all metadata lives in pyproject.toml. Beyond ``setup()`` it does two things for the native C++ CPU
engine (``csrc/``; sources and flags come from ``rlkernels/native/builder.py``, the single source of truth):

* it ships ``csrc/`` inside the package (``rlkernels/native/csrc``), so that an installed rlkernels can JIT-build the
  engine on first use; this needs no compiler at install time;
* with ``RLKERNELS_BUILD_NATIVE=1`` it builds the engine ahead of time, one module per instruction-set variant
  (DEFAULT, AVX2, AVX512; the right one is picked at run time). torch must be importable while building::

      RLKERNELS_BUILD_NATIVE=1 pip install --no-build-isolation .

Without the variable nothing is compiled, torch is not imported, and ``pip install .`` works without a compiler.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into rlkernels/native/csrc of the build: the sources of the JIT build."""

    def run(self):
        super().run()
        if not CSRC.is_dir():  # building from an sdist made without csrc/: the engine then reports it is missing
            return
        dest = Path(self.build_lib) / "rlkernels" / "native" / "csrc"
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted(CSRC.iterdir()):
            if src.suffix in (".cpp", ".h"):
                shutil.copy2(src, dest / src.name)


def _native_build():
    """(ext_modules, build_ext command) for the ahead-of-time build."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError as exc:
        raise SystemExit(f"RLKERNELS_BUILD_NATIVE=1 needs torch importable at build time ({exc}): install torch, "
                         "then `RLKERNELS_BUILD_NATIVE=1 pip install --no-build-isolation .`") from None
    # loaded by path: importing the rlkernels package here would need its dependencies in the build environment
    path = ROOT / "rlkernels" / "native" / "builder.py"
    spec = importlib.util.spec_from_file_location("_rlkernels_native_builder", path)
    builder = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = builder  # dataclasses look their module up while the class is built
    spec.loader.exec_module(builder)
    return builder.NativeBuilder(source_dir=CSRC).aot_extensions(), BuildExtension.with_options(use_ninja=True)


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("RLKERNELS_BUILD_NATIVE", "").strip().lower() not in ("", "0", "false", "no"):
    ext_modules, cmdclass["build_ext"] = _native_build()

setup(cmdclass=cmdclass, ext_modules=ext_modules)
