"""``python -m rlkernels.bench``: the same as the ``rlkernels-bench`` console script."""
import sys

from .cli import main

sys.exit(main())
