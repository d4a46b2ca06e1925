"""``rlkernels-bench``: speed and memory of rlkernels against eager PyTorch, ``torch.compile``, Liger-Kernel and the
GEMM roofline, with a correctness check before anything is timed.

Run ``rlkernels-bench`` (or ``python -m rlkernels.bench``) for the quick suite of this machine, ``--help`` for the
rest. Modules: :mod:`.shapes` (named sizes), :mod:`.workloads` (ops, inputs, work models, the check),
:mod:`.providers` (what is compared), :mod:`.measure` (timing and memory), :mod:`.harness` (one measurement),
:mod:`.report` (table, JSON, plot), :mod:`.cli`.

Importing this package imports neither matplotlib, tqdm, triton nor liger_kernel; each loads where it is used.
"""
from .shapes import SHAPES, Shape  # noqa: F401  (light: dataclasses only)

__all__ = ["SHAPES", "Shape"]
