"""Worker entry point: ``python -m rlkernels.bench._worker SPEC.json RESULT.json``.

Runs one provider on one case in a fresh process (so that its memory peak is measured against its own inputs only,
and no compile cache or allocator state carries over from another provider) and writes the result row as JSON.
"""
from __future__ import annotations

import importlib
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    """Read the spec (``case``, ``provider``, ``settings``, ``plugins``), run it, write the row; 0 on any result."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m rlkernels.bench._worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    from . import measure

    measure.set_malloc_policy()  # before any large allocation, so the whole process follows it
    from .harness import Settings, run_case
    from .workloads import Case

    with open(args[0]) as f:
        spec = json.load(f)
    for module in spec.get("plugins", []):
        importlib.import_module(module)
    row = run_case(Case.from_dict(spec["case"]), spec["provider"], Settings(**spec["settings"]))
    with open(args[1], "w") as f:
        json.dump(row, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
